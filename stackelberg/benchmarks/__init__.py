"""Benchmarks run by `stackelberg bench NAME`; each prints one JSON object."""
