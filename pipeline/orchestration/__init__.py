"""Orchestration inside a DVC stage: a Prefect flow per stage, one task per work item.

DVC decides *whether* a stage runs; this package decides *how* its items run: which device each item
gets (`devices`), and how transient failures are retried and permanent ones reported (`flows`); what the
Prefect UI shows of a stage run: its name, tags and parameters (`stage`), its log lines (`run_logs`) and the
report's artifacts (`artifacts`); and which Prefect server the runs report to (`server` for a temporary one
per stage, `local_server` for ``uda-distill server``).
"""
