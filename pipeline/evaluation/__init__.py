"""Evaluation: classification metrics per model and epoch (``metrics``) and the cross-task report
(``report``: results.json for ``dvc metrics``, a Markdown table, CSVs for ``dvc plots`` and PNG figures)."""
