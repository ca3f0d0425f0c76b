"""Benchmarks and kernel tools (``run.py bench``: ``benchmarks.bench``), outside the library: they use only
its public names."""
