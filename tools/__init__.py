"""Harness that is not installed with the package: run from a checkout (`python tools/results.py`)."""
