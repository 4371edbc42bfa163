"""Batch conversion: many checkpoints, one process each, and the resumable report."""
