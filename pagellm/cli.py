"""The `pagellm` command line: each subsystem registers its own subcommands.

Subsystems do not import each other for the CLI's sake: where one command
needs another subsystem's function (``pagellm memory --measure`` builds an
engine, but the analyzer must not import the engine), this module, which
knows them all, hands it over as a parser default once all have registered.
"""
from __future__ import annotations

import argparse
import importlib
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
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagellm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
