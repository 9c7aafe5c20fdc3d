"""`pagellm eval perplexity MODEL FILE`: quality measured through the engine itself.

The file's tokens are cut into windows of ``--window`` tokens, each scored on
its own (its first token has no context and is not scored): every window is
one request with ``prompt_logprobs=0`` and one generated token, so the engine's
own forward — chunked prefill, paged KV cache, quantized weights or KV — makes
every log-probability. Perplexity is ``exp`` of the mean negative
log-likelihood over the scored tokens.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pagellm.config import EngineConfig, add_engine_arguments


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    num_scored_tokens: int
    num_windows: int
    window: int


def windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens; a last one shorter than 2 tokens scores nothing and is dropped."""
    return [token_ids[i:i + window] for i in range(0, len(token_ids), window) if len(token_ids) - i >= 2]


def perplexity(llm, token_ids: list[int], window: int) -> Perplexity:
    from pagellm.sampling_params import SamplingParams

    parts = windows(token_ids, window)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outputs = llm.generate(parts, params, use_tqdm=len(parts) > 1)
    nll = [-entry[token].logprob for part, out in zip(parts, outputs)
           for entry, token in zip(out.prompt_logprobs[1:], part[1:])]
    mean = math.fsum(nll) / len(nll)
    return Perplexity(math.exp(mean), mean, len(nll), len(parts), window)


def register(subparsers: argparse._SubParsersAction) -> None:
    from pagellm.model.zoo import DEFAULT_MODEL
    evaluate = subparsers.add_parser("eval", help="measure model quality through the engine")
    commands = evaluate.add_subparsers(dest="eval_command", required=True)
    p = commands.add_parser("perplexity", help="perplexity of MODEL over a text file")
    add_engine_arguments(p, DEFAULT_MODEL)
    p.add_argument("file", help="text file (UTF-8)")
    p.add_argument("--window", type=int, default=1024, help="tokens per independently scored window")
    p.add_argument("--max-file-tokens", type=int, help="score only the file's first N tokens")
    p.add_argument("--json", metavar="PATH", help="also write the result here")
    p.set_defaults(func=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    from pagellm.llm import LLM

    if args.window < 2:
        raise ValueError(f"--window must be at least 2, got {args.window}")
    text = Path(args.file).read_text(encoding="utf-8")
    llm = LLM(EngineConfig.from_args(args))
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to read {args.file} with")
    token_ids = tokenizer.encode(text, add_special_tokens=False)[:args.max_file_tokens]
    result = perplexity(llm, token_ids, min(args.window, llm.engine.max_model_len - 1))
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.4f} over {result.num_scored_tokens} "
          f"tokens, {result.num_windows} windows of {result.window})")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result) | {"model": args.model, "file": args.file,
                                                                "engine_config": asdict(EngineConfig.from_args(args))},
                                              indent=2))
    return 0
