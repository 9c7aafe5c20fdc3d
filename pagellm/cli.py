"""The `pagellm` command line: each subsystem registers its own subcommands."""
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
    register_modules(parser.add_subparsers(dest="command", required=True), _COMMAND_MODULES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagellm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
