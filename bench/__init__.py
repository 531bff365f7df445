"""Benchmarks that measure the pipeline against the baseline a user would otherwise pick; run as `python -m bench.<name>`."""
