"""Shipping a trained student: bundles, prediction, export."""
