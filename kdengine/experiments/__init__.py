"""Reproducible experiments (``python -m kdengine.experiments.<name>``)."""
