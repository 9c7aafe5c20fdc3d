"""`pagellm bench throughput | latency | serve`."""
from __future__ import annotations

import argparse
import importlib

# module -> it defines ``register(bench_subparsers)``
_BENCH_MODULES = ("pagellm.bench.offline", "pagellm.bench.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="measure throughput and latency")
    bench_subparsers = bench.add_subparsers(dest="bench_command", required=True)
    for module_name in _BENCH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(bench_subparsers)
