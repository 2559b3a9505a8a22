"""Benchmarks shipped with the package (``patchserve bench``)."""
