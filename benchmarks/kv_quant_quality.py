"""Quality of the quantized KV cache through the engine (CPU, real GGUF model):
``prompt_logprobs`` perplexity against the model-dtype cache, and greedy
continuations of ten code prompts against it.

    python benchmarks/kv_quant_quality.py --model qwen2.5-coder-0.5b --tokens 1024 \
        --out benchmarks/results/cpu-2026-12-02-kv-quant-quality-0.5b.json

Variants ``DTYPE[:ALPHA]``: ``int8`` (key smoothing as shipped), ``int8:0`` (no
smoothing: every ``s`` is 1), ``int8:0.5`` (``s = estimate ^ 0.5``). ``int4sim``
measures what an int4 cache (not built yet) would cost in quality: the int8
cache with codes limited to [-7, 7], one scale per token per KV head, so the
numbers are int4's and the bytes int8's; ``int4sim-g32`` the same with one scale
per 32 dims (simulated before the int8 cache). Perplexity over the first ``--tokens``
tokens of tests/data/textwrap.py.txt in one window: every key a token attends to
is read back from the cache, quantized.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import time
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams
from pagellm.bench.perplexity import perplexity
from pagellm.kernels import kv_quant, torch_attention
from pagellm.model import builder, key_smoothing

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "textwrap.py.txt"
PROMPTS = [
    "def fibonacci(n):\n", "def quicksort(xs):\n", "class LRUCache:\n    def __init__(self, capacity):\n",
    "import json\n\ndef load_config(path):\n", "def binary_search(items, target):\n",
    "# Merge two sorted lists\ndef merge(a, b):\n", "def is_prime(n: int) -> bool:\n",
    "from dataclasses import dataclass\n\n@dataclass\nclass Point:\n", "def flatten(nested):\n",
    "async def fetch_all(session, urls):\n",
]


def fake_int4(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x [..., D]`` through symmetric int4 ([-7, 7]) with one fp16 scale per ``group`` dims."""
    g = x.float().unflatten(-1, (-1, group))
    scale = (g.abs().amax(dim=-1, keepdim=True) / 7).clamp_min(kv_quant.SCALE_MIN).half().float()
    return ((g / scale).round().clamp(-7, 7) * scale).flatten(-2).to(x.dtype)


@contextlib.contextmanager
def simulated(variant: str):
    """``int4sim``: the int8 format with codes limited to [-7, 7] while the variant
    runs; ``int4sim-gN``: K and V through int4 with one scale per N dims first,
    then the int8 cache (whose own error is far below int4's)."""
    kind = variant.partition(":")[0]
    if not kind.startswith("int4sim"):
        yield
        return
    int8, quantize = kv_quant.KV_FORMATS["int8"], torch_attention.quantize
    if kind == "int4sim":
        kv_quant.KV_FORMATS["int8"] = kv_quant.KVFormat("int8", torch.int8, 7.0)
    else:
        group = int(kind.removeprefix("int4sim-g"))
        torch_attention.quantize = lambda x, fmt: quantize(fake_int4(x, group), fmt)
    try:
        yield
    finally:
        kv_quant.KV_FORMATS["int8"], torch_attention.quantize = int8, quantize


def engine(model: str, variant: str, window: int, quantization: str | None, dtype: str) -> LLM:
    kv, _, alpha = variant.partition(":")
    kv = "int8" if kv.startswith("int4sim") else kv
    real = key_smoothing.smooth_keys
    if alpha:
        builder.key_smoothing.smooth_keys = lambda m, _shipped: real(m, float(alpha))
    try:
        return LLM(model, dtype=dtype, kv_cache_dtype=kv, quantization=quantization,
                   num_kv_blocks=2 * window // 16 + 8, max_model_len=window + 1)
    finally:
        builder.key_smoothing.smooth_keys = real


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--variants", default="auto,int8,int8:0,int8:0.5,fp8,fp8:0")
    parser.add_argument("--quantization", help="weight format (default: the file's)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (bfloat16: as served on a GPU)")
    parser.add_argument("--continuations", type=int, default=128, help="greedy tokens per code prompt (0: none)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows, greedy = [], {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        with simulated(variant):
            llm = engine(args.model, variant, max(args.tokens, 256), args.quantization, args.dtype)
            ids = llm.get_tokenizer().encode(TEXT.read_text(), add_special_tokens=False)[:args.tokens]
            row = {"variant": variant, "perplexity": perplexity(llm, ids, args.tokens).perplexity,
                   "kv_bytes_per_token": llm.engine.memory.kv_bytes_per_token}
            if args.continuations:
                outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.continuations,
                                                            ignore_eos=True), use_tqdm=False)
                greedy[variant] = [o.outputs[0].token_ids for o in outs]
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        del llm
        gc.collect()
        compare(rows, greedy)
        print(rows[-1], flush=True)
        if args.out:     # after every variant, so a run cut short keeps what it measured
            write(args, rows)
    print(f"\n{'variant':10} {'ppl':>8} {'vs auto':>8}  identical  first divergence")
    for r in rows:
        print(f"{r['variant']:10} {r['perplexity']:8.4f} {r['vs_auto']:+8.2%}  "
              f"{r.get('identical_continuations', ''):>9}  {r.get('first_divergence', '')}")


def compare(rows: list[dict], greedy: dict) -> None:
    """Each row against the first (``auto``): perplexity ratio, identical continuations, first divergence."""
    base = rows[0]
    for r in rows:
        r["vs_auto"] = r["perplexity"] / base["perplexity"] - 1
        if greedy and r is not base:
            first = [next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
                     for ours, ref in zip(greedy[r["variant"]], greedy[base["variant"]])]
            r["identical_continuations"] = sum(f is None for f in first)
            r["first_divergence"] = first


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    Path(args.out).write_text(json.dumps({
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__}, "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/kv_quant_quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "model": args.model, "text": TEXT.name, "prompts": PROMPTS, "figures": rows}, indent=2))

if __name__ == "__main__":
    main()
