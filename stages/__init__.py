"""One thin entry module per DVC stage: ``python -m stages.<name> [--params params.yaml]``."""
