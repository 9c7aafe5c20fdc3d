"""Engine variants on real weights, against a reference variant, in one process.

Random weights make near-ties that hide kernel errors; a trained model does
not. Each variant (engine settings) scores the same text (``prompt_logprobs``
perplexity over the first ``--tokens`` tokens of tests/data/textwrap.py.txt)
and decodes the same ten code prompts greedily; the table gives each variant's
perplexity against the reference's and how many continuations are identical
to the reference's (with the first divergence). The GPU machines have no model
files: the real Qwen2.5-Coder-0.5B GGUF reaches them in pieces (developers'
brief), e.g.

    python3 benchmarks/real_weights_gpu.py --model /root/qwen05.gguf --out $OUT/real.json \\
        --variant "torch-eager:attention_backend=torch,enforce_eager=1" \\
        --variant "triton-graphs:" --variant "kv-int8:kv_cache_dtype=int8"

A variant is ``NAME:key=value,...`` (``EngineConfig`` fields; ints and floats
parsed, ``1``/``0`` for booleans); the first is the reference. ``--dtype`` is
every variant's model dtype unless it sets its own.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams
from pagellm.bench.perplexity import perplexity
from pagellm.model.checkpoint import open_checkpoint

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "textwrap.py.txt"
PROMPTS = json.loads((Path(__file__).resolve().parent / "data" / "spec_code_prompts.json").read_text())


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    kwargs = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        kwargs[key] = value
    return name, kwargs


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run_variant(model: str, dtype: str, settings: dict, token_ids: list[int], prompts: list[str],
                max_tokens: int) -> dict:
    llm = LLM(model, **{"dtype": dtype, "max_model_len": len(token_ids) + 64, **settings})
    start = time.perf_counter()
    ppl = perplexity(llm, token_ids, len(token_ids))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    result = {"settings": settings, "perplexity": ppl.perplexity, "tokens_scored": ppl.num_scored_tokens,
              "continuations": [o.outputs[0].token_ids for o in outs], "seconds": time.perf_counter() - start}
    del llm
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,... (first: reference)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()

    variants = [parse_variant(v) for v in args.variant]
    tokenizer = open_checkpoint(args.model).load_tokenizer()
    token_ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"][:args.tokens]
    prompts = PROMPTS[:10]
    results = {}
    for name, settings in variants:
        try:
            results[name] = run_variant(args.model, args.dtype, settings, token_ids, prompts, args.max_tokens)
        except Exception as exc:   # a variant the device can't run is reported, the others still run
            results[name] = {"settings": settings, "error": f"{type(exc).__name__}: {exc}"}
        print(name, {k: v for k, v in results[name].items() if k != "continuations"}, flush=True)

    reference_name = variants[0][0]
    reference = results[reference_name]
    rows = []
    for name, result in results.items():
        if "error" in result or "error" in reference:
            rows.append((name, result.get("error", "reference failed"), "", ""))
            continue
        divergences = [first_divergence(a, b) for a, b in zip(result["continuations"], reference["continuations"])]
        identical = sum(d is None for d in divergences)
        firsts = sorted(d for d in divergences if d is not None)
        rows.append((name, f"{result['perplexity']:.4f}",
                     f"{100 * (result['perplexity'] / reference['perplexity'] - 1):+.2f}%",
                     f"{identical}/{len(divergences)} identical" + (f", first divergences {firsts}" if firsts else "")))
        result["identical_continuations"], result["first_divergences"] = identical, divergences
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "model": args.model,
              "dtype": args.dtype, "tokens": len(token_ids), "max_tokens": args.max_tokens,
              "reference": reference_name, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else platform.processor(), "torch": torch.__version__, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"\nreal weights, {len(token_ids)} tokens scored, {len(prompts)} prompts x {args.max_tokens} greedy tokens; "
          f"reference: {reference_name}")
    print(f"{'variant':<22} {'perplexity':>12} {'vs ref':>9}  continuations vs reference")
    for name, ppl, delta, cont in rows:
        print(f"{name:<22} {ppl:>12} {delta:>9}  {cont}")


if __name__ == "__main__":
    main()
