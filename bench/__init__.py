"""Benchmarks: each script prints its figures; results and how they were taken are kept
in docs/benchmarks.md. Run them from the repository root as `python -m bench.<name>`."""
