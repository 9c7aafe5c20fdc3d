"""Perplexity of each weight format through the engine (CPU, real GGUF models),
against the dequantized-float path, and the bytes each format holds.

    python benchmarks/quant_quality.py --model qwen2.5-coder-0.5b --tokens 2048 \
        --out benchmarks/results/cpu-2026-12-01-quant-quality-0.5b.json

Perplexity over the first ``--tokens`` tokens of tests/data/textwrap.py.txt in
windows of 1,024 (``pagellm eval perplexity``'s own function).
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

from pagellm import LLM
from pagellm.bench.perplexity import perplexity

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "textwrap.py.txt"
FORMATS = ("none", "gguf", "int8", "w8a8", "int4", "int4-awq")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--text", default=str(TEXT), help="the text to score (default: the fixed one in tests/data)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for fmt in args.formats.split(","):
        start = time.perf_counter()
        llm = LLM(args.model, dtype="float32", quantization=fmt, num_kv_blocks=2 * args.window // 16 + 8,
                  max_model_len=args.window + 1)
        loaded = time.perf_counter() - start
        ids = llm.get_tokenizer().encode(Path(args.text).read_text(), add_special_tokens=False)[:args.tokens]
        result = perplexity(llm, ids, args.window)
        rows.append({"format": fmt, "perplexity": result.perplexity, "scored_tokens": result.num_scored_tokens,
                     "weights_bytes": llm.engine.memory.weights_bytes, "load_s": round(loaded, 1),
                     "eval_s": round(time.perf_counter() - start - loaded, 1)})
        print(rows[-1], flush=True)
        del llm
        gc.collect()
    base = next((r["perplexity"] for r in rows if r["format"] == "none"), None)
    print(f"\n{'format':10} {'ppl':>8} {'vs none':>8} {'weights MiB':>12}")
    for r in rows:
        r["vs_none"] = None if base is None else r["perplexity"] / base - 1
        change = "" if base is None else f"{r['vs_none']:+.2%}"
        print(f"{r['format']:10} {r['perplexity']:8.4f} {change:>8} {r['weights_bytes'] / 2**20:12,.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/quant_quality.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
            "model": args.model, "text": Path(args.text).name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
