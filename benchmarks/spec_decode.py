"""Speculative decoding against plain decoding, batch 1, greedy, same engine:
the plain runs switch speculation off (no lookahead slots), so weights,
kernels and KV pool are the same. Outputs must be identical; the figure is
output tokens/s over all prompts, plain and speculative runs alternated
prompt by prompt (the machine's load hits both alike). Each run is timed in
wall seconds and in this process's CPU seconds (``time.process_time``): on a
machine shared with other work the CPU-time ratio is the steadier figure.
``uptime`` is recorded before and after; results are written after every prompt.

    # draft model, code completion (benchmarks/data/spec_code_prompts.json)
    python benchmarks/spec_decode.py --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --max-tokens 64
    # the same, target fp32 (plain and speculative), draft in the GGUF file's blocks (packed int8/int4)
    python benchmarks/spec_decode.py --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --quantization none \
        --draft-quantization gguf --max-tokens 32 --limit 10
    # n-gram lookup, code editing: the prompt holds the code being rewritten (spec_code_edits.json)
    python benchmarks/spec_decode.py --model qwen2.5-coder-0.5b --method ngram --workload edits --max-tokens 256
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams

DATA = Path(__file__).parent / "data"


def prompts_of(llm: LLM, workload: str, limit: int | None) -> list[list[int]]:
    if workload == "completion":
        texts = json.loads((DATA / "spec_code_prompts.json").read_text())
        prompts = [llm.get_tokenizer().encode(t) for t in texts]
    else:
        tasks = json.loads((DATA / "spec_code_edits.json").read_text())
        prompts = [llm.apply_chat_template([{"role": "user", "content": f"{t['instruction']}\n\n```python\n"
                                                                        f"{t['code']}```"}]) for t in tasks]
    return prompts[:limit]


def timed(llm: LLM, prompt: list[int], params: SamplingParams, lookahead: int) -> tuple[list[int], float, float]:
    """(tokens, wall seconds, CPU seconds)."""
    llm.engine.scheduler.config.num_lookahead = lookahead
    start, cpu = time.perf_counter(), time.process_time()
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", help="draft model (else --method ngram)")
    parser.add_argument("--method", choices=("draft", "ngram"), default="draft")
    parser.add_argument("--workload", choices=("completion", "edits"), default="completion")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="first N prompts only")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--draft-quantization", help="the draft's weight format (default: --quantization)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a shared "
                                                     "machine, see benchmarks/cpu_decode.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load_start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory="512MiB",
              max_model_len=4096, speculative_method=args.method,
              speculative_model=args.draft if args.method == "draft" else None,
              speculative_quantization=args.draft_quantization, num_speculative_tokens=args.k)
    load_s = time.perf_counter() - load_start
    prompts = prompts_of(llm, args.workload, args.limit)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    timed(llm, prompts[0][:8], SamplingParams(temperature=0, max_tokens=4), args.k)   # warm-up, both paths
    rows, plain_s, spec_s, plain_cpu, spec_cpu, plain_tokens, spec_tokens = [], 0.0, 0.0, 0.0, 0.0, 0, 0
    spec = llm.engine.spec_stats
    for i, prompt in enumerate(prompts):
        plain, t_plain, c_plain = timed(llm, prompt, params, 0)
        before = (spec.num_steps, spec.num_proposed, spec.num_accepted)
        fast, t_spec, c_spec = timed(llm, prompt, params, args.k)
        steps, proposed, accepted = (a - b for a, b in zip((spec.num_steps, spec.num_proposed, spec.num_accepted),
                                                            before))
        rows.append({"prompt": i, "prompt_tokens": len(prompt), "output_tokens": len(plain), "identical": plain == fast,
                     "plain_s": t_plain, "spec_s": t_spec, "speedup": t_plain / t_spec,
                     "plain_cpu_s": c_plain, "spec_cpu_s": c_spec, "cpu_speedup": c_plain / c_spec,
                     "acceptance_rate": accepted / proposed if proposed else None,
                     "tokens_per_verify_step": (accepted + steps) / steps if steps else None})
        plain_s, spec_s = plain_s + t_plain, spec_s + t_spec
        plain_cpu, spec_cpu = plain_cpu + c_plain, spec_cpu + c_spec
        plain_tokens, spec_tokens = plain_tokens + len(plain), spec_tokens + len(fast)
        print(f"prompt {i}: {len(plain)} tokens, plain {len(plain) / t_plain:.2f} tok/s, "
              f"spec {len(fast) / t_spec:.2f} tok/s ({t_plain / t_spec:.2f}x wall, {c_plain / c_spec:.2f}x CPU), "
              f"identical {plain == fast}, acceptance {rows[-1]['acceptance_rate']}", flush=True)
        figures = {"plain_tokens_per_s": plain_tokens / plain_s, "spec_tokens_per_s": spec_tokens / spec_s,
                   "speedup": (spec_tokens / spec_s) / (plain_tokens / plain_s),
                   "plain_tokens_per_cpu_s": plain_tokens / plain_cpu, "spec_tokens_per_cpu_s": spec_tokens / spec_cpu,
                   "cpu_speedup": (spec_tokens / spec_cpu) / (plain_tokens / plain_cpu),
                   "all_identical": all(r["identical"] for r in rows),
                   "acceptance_rate": spec.acceptance_rate, "tokens_per_verify_step": spec.mean_tokens_per_step,
                   "prompts": len(rows), "load_s": load_s}
        write(args, llm, uptime_before, figures, rows)
    print(json.dumps(figures, indent=1))
    return 0


def write(args: argparse.Namespace, llm: LLM, uptime_before: str, figures: dict, rows: list[dict]) -> None:
    payload = {"benchmark": "spec_decode", "date": datetime.date.today().isoformat(),
               "command": "benchmarks/spec_decode.py " + " ".join(os.sys.argv[1:]),
               "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "threads": torch.get_num_threads(),
               "versions": {"python": platform.python_version(), "torch": torch.__version__},
               "model": args.model, "draft": args.draft, "method": args.method, "workload": args.workload,
               "k": args.k, "max_tokens": args.max_tokens, "quantization": llm.engine.quantization,
               "draft_quantization": args.draft_quantization or args.quantization,
               "uptime_before": uptime_before,
               "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
               "figures": figures, "per_prompt": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
