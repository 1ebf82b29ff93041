"""Orchestration inside a DVC stage: a Prefect flow per stage, one task per work item.

DVC decides *whether* a stage runs; this package decides *how* its items run: which device each item
gets (`devices`), and how transient failures are retried and permanent ones reported (`flows`).
"""
