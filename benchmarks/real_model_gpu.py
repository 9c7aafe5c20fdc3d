"""The real Qwen2.5-Coder GGUF through the whole engine on the GPU, one engine per
variant: ``prompt_logprobs`` perplexity over the fixed text and greedy
continuations of ten code prompts, each variant against the default engine
(``base``: the weights dequantized to bf16, as the engine loads a GGUF file by
default; Triton kernels, CUDA graphs, the asynchronous pipeline).

It checks on real weights what the random-weight GPU runs cannot (random
weights give near-ties that hide errors): the pipeline and the graphs must not
change a token; the Triton attention must score the text as the torch
reference does; int8 / fp8 KV and int8 / int4 weights must stay within the
issues' quality bounds with the GPU kernels doing the work.

    PYTHONPATH=. python3 benchmarks/real_model_gpu.py --model /root/qwen2.5-coder-0.5b.gguf --out $OUT/real.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kv_quant_quality import PROMPTS, TEXT, compare
from pagellm import LLM, SamplingParams
from pagellm.bench.perplexity import perplexity

VARIANTS = {
    "base": {},
    "pipeline-off": {"async_scheduling": False},
    "graphs-off": {"enforce_eager": True},
    "torch-attention": {"attention_backend": "torch", "enforce_eager": True},
    "kv-int8": {"kv_cache_dtype": "int8"},
    "kv-fp8": {"kv_cache_dtype": "fp8"},
    "kv-fp8-torch": {"kv_cache_dtype": "fp8", "attention_backend": "torch", "enforce_eager": True},
    "weights-gguf": {"quantization": "gguf"},
    "weights-int8": {"quantization": "int8"},
    "weights-int4": {"quantization": "int4"},
}
MUST_MATCH = ("pipeline-off",)      # the same kernels on the same batches: every token identical


def run_variant(model: str, name: str, tokens: int, continuation: int) -> tuple[dict, list[list[int]]]:
    start = time.perf_counter()
    llm = LLM(model, dtype="bfloat16", max_model_len=tokens + 1, max_num_seqs=16,
              num_kv_blocks=2 * tokens // 16 + 64, **VARIANTS[name])
    loaded = time.perf_counter() - start
    ids = llm.get_tokenizer().encode(TEXT.read_text(), add_special_tokens=False)[:tokens]
    row = {"variant": name, "options": VARIANTS[name], "perplexity": perplexity(llm, ids, tokens).perplexity,
           "weights_bytes": llm.engine.memory.weights_bytes, "load_s": round(loaded, 1)}
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=continuation, ignore_eos=True),
                        use_tqdm=False)
    row["seconds"] = round(time.perf_counter() - start, 1)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return row, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the GGUF file (or a zoo name)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows, greedy = [], {}
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "command": "PYTHONPATH=. python3 benchmarks/real_model_gpu.py " + " ".join(sys.argv[1:]),
              "model": args.model, "text": TEXT.name, "prompts": PROMPTS, "rows": rows}
    for name in args.variants.split(","):
        try:
            row, greedy[name] = run_variant(args.model, name, args.tokens, args.continuation)
        except Exception as exc:      # one variant's failure is a finding, not the end of the run
            rows.append({"variant": name, "error": repr(exc)[-1500:]})
            print(rows[-1], flush=True)
            continue
        rows.append(row)
        good = [r for r in rows if "perplexity" in r]
        compare(good, {r["variant"]: greedy[r["variant"]] for r in good})
        print(row, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [r["variant"] for r in rows if r["variant"] in MUST_MATCH and r.get("identical_continuations") != len(PROMPTS)]
    report["must_match_failed"] = failed
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{'variant':16} {'ppl':>8} {'vs base':>8} {'MiB':>7}  identical  first divergence")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:16} ERROR {r['error'][:200]}")
            continue
        print(f"{r['variant']:16} {r['perplexity']:8.4f} {r['vs_auto']:+8.2%} "
              f"{r['weights_bytes'] / 2**20:7.0f}  {r.get('identical_continuations', ''):>9}  "
              f"{[f for f in r.get('first_divergence', []) if f is not None]}")
    print("must-match variants that changed a token:", failed or "none")


if __name__ == "__main__":
    main()
