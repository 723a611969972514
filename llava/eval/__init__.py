"""Evaluation: benchmarks, their prompts and their official metrics."""
