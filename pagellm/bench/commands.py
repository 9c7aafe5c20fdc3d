"""`pagellm bench throughput | latency | prefill | serve`."""
from __future__ import annotations

import argparse

# module -> it defines ``register(bench_subparsers)``
_BENCH_MODULES = ("pagellm.bench.offline", "pagellm.bench.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    from pagellm.cli import register_modules
    bench = subparsers.add_parser("bench", help="measure throughput and latency")
    register_modules(bench.add_subparsers(dest="bench_command", required=True), _BENCH_MODULES)
