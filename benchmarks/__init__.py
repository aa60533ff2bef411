"""Benchmarks of diffrax_deer: run each as a module from the repository root,

    .venv/bin/python -m benchmarks.bench_training --quick

(see each module's docstring for its options). Results go to `benchmarks/results/`
as JSON and a markdown table, with the machine and versions named. Every benchmark
runs in float64, switched on here, before any benchmark module creates an array.
"""

from ._common import enable_float64


enable_float64()
