"""`pagellm generate` and `pagellm chat`."""
from __future__ import annotations

import argparse
import logging
import sys

from pagellm.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """Arguments shared by every command that builds an engine."""
    if default_model is None:
        parser.add_argument("model", help="HF folder, .gguf file or built-in model name")
    else:
        parser.add_argument("model", nargs="?", default=default_model,
                            help=f"HF folder, .gguf file or built-in model name (default {default_model})")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int)
    parser.add_argument("--kv-cache-memory", help="KV pool budget, e.g. 4GiB")
    parser.add_argument("--gpu-memory", help="total budget for weights + activations + KV, e.g. 40GiB")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--random-weights", action="store_true", help="MODEL names a preset; random weights")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory, gpu_memory=args.gpu_memory,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        random_weights=args.random_weights)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace):
    from pagellm.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


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
    return LLM(engine_config_from_args(args))


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
