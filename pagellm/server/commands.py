"""`pagellm serve MODEL`: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import logging
import os

from pagellm.config import EngineConfig, add_engine_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve MODEL over an OpenAI-compatible HTTP API")
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("PAGELLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PAGELLM_API_KEY; none: open)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    parser.add_argument("--max-waiting", type=int,
                        help="refuse new requests with 429 while this many sequences wait (default: no bound)")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="on SIGINT/SIGTERM, seconds running requests get to finish before being aborted")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.server.async_engine import AsyncEngine
    from pagellm.server.launcher import make_server

    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0, got {args.grace_period}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    async_engine = AsyncEngine(LLMEngine(EngineConfig.from_args(args)), max_waiting=args.max_waiting)
    server = make_server(async_engine, args.served_model_name or args.model, host=args.host, port=args.port,
                         api_key=args.api_key, grace_period=args.grace_period, log_level=args.log_level)
    server.run()
    return 0
