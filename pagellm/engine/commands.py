"""`pagellm generate` and `pagellm chat`, and the engine's side of `pagellm memory --measure`.

``--seed`` is the engine's: it seeds the random weights and the per-request
sampling seeds, so the same ``--seed`` gives the same output.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from pagellm.config import EngineConfig, add_engine_arguments

if TYPE_CHECKING:
    from pagellm.engine.memory import MemoryReport


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace):
    from pagellm.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop=args.stop)


def measure_memory(**settings) -> MemoryReport:
    """The memory report of an engine built with these EngineConfig fields (rank 0's, with several ranks)."""
    from pagellm.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(**settings))
    engine.close()
    return engine.memory


def register(subparsers: argparse._SubParsersAction) -> None:
    from pagellm.model.zoo import DEFAULT_MODEL
    gen = subparsers.add_parser("generate", help="generate text for one or more prompts")
    add_engine_arguments(gen, DEFAULT_MODEL)
    add_sampling_arguments(gen, max_tokens=64)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="interactive chat, streaming tokens as they come")
    add_engine_arguments(chat, DEFAULT_MODEL)
    add_sampling_arguments(chat, max_tokens=512)
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=run_chat)


def _make_llm(args: argparse.Namespace):
    from pagellm.llm import LLM
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return LLM(EngineConfig.from_args(args))


def run_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = sampling_params_from_args(args)
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    for prompt, output in zip(args.prompt, llm.generate(prompts, params)):
        completion = output.outputs[0]
        print(f"--- prompt: {prompt!r}\n{completion.text}\n--- {len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = sampling_params_from_args(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            return 0
        if not user:
            return 0
        history.append({"role": "user", "content": user})
        reply = ""
        for output in llm.stream(llm.apply_chat_template(history), params):
            text = output.outputs[0].text
            print(text[len(reply):], end="", flush=True)
            reply = text
        print()
        history.append({"role": "assistant", "content": reply})
