"""Benchmarks for laperm (run e.g. ``python -m benchmarks.sync``)."""
