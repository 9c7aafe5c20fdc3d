"""The `pagellm` command line: each subsystem registers its own subcommands.

Subsystems do not import each other for the CLI's sake: where one command
needs another subsystem's function (``pagellm memory --measure`` builds an
engine, but the analyzer must not import the engine), this module, which
knows them all, hands it over as a parser default once all have registered.

Under a launcher that starts every rank of a parallel engine (``torchrun
--nproc-per-node N -m pagellm serve ... --tensor-parallel-size N``: ``RANK`` in
the environment), every process parses the same command; rank 0 runs it and
the others serve rank 0's engines until it is done (``engine.parallel``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

# module path -> it defines ``register(subparsers)``; each parser sets ``func``.
_COMMAND_MODULES = (
    "pagellm.engine.commands",     # generate, chat
    "pagellm.analysis.commands",   # memory, roofline
    "pagellm.server.commands",     # serve
    "pagellm.bench.commands",      # bench
    "pagellm.bench.perplexity",    # eval perplexity
    "pagellm.quant.export",        # quantize
)


def register_modules(subparsers: argparse._SubParsersAction, module_names: tuple[str, ...]) -> None:
    """Let each module that exists add its subcommands."""
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagellm", description="Run and serve decoder-only LLMs in tight memory.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_modules(subparsers, _COMMAND_MODULES)
    _connect(subparsers.choices)
    return parser


def _connect(commands: dict[str, argparse.ArgumentParser]) -> None:
    """Give `memory` the engine's memory measurement, when both are installed."""
    if "memory" in commands and "generate" in commands:
        from pagellm.engine.commands import measure_memory
        commands["memory"].set_defaults(measure_engine=measure_memory)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _launched_ranks(args) as runs_command:
            return int(args.func(args) or 0) if runs_command else 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagellm {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _launched_ranks(args: argparse.Namespace):
    """Whether this process runs the command (``engine.parallel.launched_ranks``): always, unless a
    launcher started it as a rank other than 0 of an engine command."""
    if "RANK" not in os.environ or not hasattr(args, "tensor_parallel_size"):
        return contextlib.nullcontext(True)
    from pagellm.config import EngineConfig
    from pagellm.engine.parallel import launched_ranks
    return launched_ranks(EngineConfig.from_args(args))


if __name__ == "__main__":
    sys.exit(main())
