"""Runnable examples: ``python -m nonlocal_kernels.examples.train`` trains a small video
classifier with a non-local block on a task that needs it."""
