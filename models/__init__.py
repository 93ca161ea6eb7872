"""Torch modules and their loaders. Knows nothing of Prefect or storage."""
