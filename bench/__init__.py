"""Benchmarks: run one with ``lorainv bench NAME`` (any directory; the wheel ships this package
as ``lorainv_bench``) or ``python -m bench.NAME`` from the repository root. Each prints a table
and writes JSON to ``bench/results/`` (a ``--quick`` run: a temporary directory)."""
