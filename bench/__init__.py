"""Benchmarks of the LAION-FACE builder: `python -m bench.build_speed` (also `make bench`)."""
