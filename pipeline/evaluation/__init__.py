"""Evaluation: classification metrics per model and epoch (``metrics``) and the cross-task report
(``report``: headline.json and results.json for ``dvc metrics``, summary.json, a Markdown table, CSVs for
``dvc plots`` and PNG figures)."""
