"""Benchmarks: each is a module run as ``python -m bench.<name>``; each prints a table and
writes JSON under ``bench/results/``."""
