"""`pagellm serve MODEL`: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import logging
import os

from pagellm.config import EngineConfig, add_engine_arguments

# The default bound on prompts x n per request: one full batch at max_num_seqs 256. (The CLI registers
# `serve` without importing the server's dependencies, so the other commands run where those are absent.)
MAX_SEQS_PER_REQUEST = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve MODEL over an OpenAI-compatible HTTP API")
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("PAGELLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PAGELLM_API_KEY; none: open)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    parser.add_argument("--max-waiting", type=int,
                        help="refuse a request with 429 when its sequences (prompts x n) would take those waiting "
                             "past this bound (default: no bound)")
    parser.add_argument("--max-seqs-per-request", type=int, default=MAX_SEQS_PER_REQUEST,
                        help="refuse a request with 400 when it asks for more sequences (prompts x n) than this "
                             f"(default {MAX_SEQS_PER_REQUEST})")
    parser.add_argument("--max-request-bytes", type=int,
                        help="refuse request bodies larger than this with 413, counted while they are read "
                             "(default: 64 bytes per token of --max-model-len, at least 1 MiB)")
    parser.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                        help="let browser pages from these origins call the API (CORS); '*' for any")
    parser.add_argument("--disable-docs", action="store_true", help="serve no /docs, /redoc or /openapi.json")
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
    for flag, value in (("--max-seqs-per-request", args.max_seqs_per_request),
                        ("--max-request-bytes", args.max_request_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0, got {args.grace_period}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    async_engine = AsyncEngine(LLMEngine(EngineConfig.from_args(args)), max_waiting=args.max_waiting,
                               max_seqs_per_request=args.max_seqs_per_request)
    server = make_server(async_engine, args.served_model_name or args.model, host=args.host, port=args.port,
                         api_key=args.api_key, grace_period=args.grace_period, log_level=args.log_level,
                         max_request_bytes=args.max_request_bytes, allowed_origins=args.allowed_origins,
                         enable_docs=not args.disable_docs)
    server.run()
    if not async_engine.stopped:   # a step outlived the shutdown: exit without waiting for it
        logging.shutdown()         # (interpreter teardown under a running torch op aborts the process)
        os._exit(0)
    return 0
