"""Datasets: canonical class lists and the bundled, offline `digits` cross-domain benchmark."""
