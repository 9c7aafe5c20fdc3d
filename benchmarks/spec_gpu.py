"""Speculative decoding on a GPU, batch 1, greedy, CUDA graphs on; each part
writes ``spec_gpu_<part>.json`` under ``--out`` as soon as it is done.

* ``oracle`` (random Llama-3-8B bf16, where random weights make real
  acceptance meaningless): plain decoding of ``--output-len`` tokens, whose
  output is the answer key of an *oracle* proposer (benchmark only) that
  proposes the target's own continuation, k tokens a step. bf16 verification
  (k+1 queries, the prefill attention kernel) may break a near tie of the
  random model the other way than the decode graph did, after which the plain
  run's tokens are no longer the target's continuation: the key then becomes
  the speculative run's own output and the run is repeated (up to 4 passes).
  Also the verification step (under a varlen CUDA graph) against a decode step.
* ``ngram``: the real Qwen2.5-Coder-0.5B (``--gguf``, dequantized to bf16),
  prompt lookup on the code-editing workload (``benchmarks/data/spec_code_edits.json``),
  plain and n-gram at each ``--ngram-k`` alternated prompt by prompt, outputs compared.
* ``batch-cost``: ``spec_batch_cost.measure`` on the 8B (verification vs
  decode step per batch size and k, the ``speculative_max_batch`` rule's
  basis), and the 1B draft's decode step per batch size.
* ``draft``: a random Llama-3.2-1B shape drafting for the 8B, with a *fixed
  acceptance pattern* (benchmark only, ``FixedAcceptance``): the draft runs
  its k forwards (its cost is real), then its proposal is replaced by the
  answer key's first ``a`` tokens and wrong ones after, so each step accepts
  exactly ``a`` of k and yields a + 1 tokens. Tokens/s against the analytic
  (a + 1) / (k t_draft + t_verify) with t_draft, t_verify from ``batch-cost``.

    PYTHONPATH=. python3 benchmarks/spec_gpu.py --out $OUT --parts oracle
    PYTHONPATH=. python3 benchmarks/spec_gpu.py --out $OUT --parts ngram batch-cost draft --gguf /root/qwen05.gguf
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from pagellm import LLM
from pagellm.config import EngineConfig
from pagellm.engine.llm_engine import LLMEngine
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.sampling_params import SamplingParams
from pagellm.spec import Proposer
from pagellm.spec.proposal import Proposal

sys.path.insert(0, str(Path(__file__).parent))
from spec_batch_cost import contexts, measure, step_seconds  # noqa: E402
from spec_decode import prompts_of, timed  # noqa: E402

PARTS = ("oracle", "ngram", "batch-cost", "draft")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Oracle:
    """Proposes the answer key's next k tokens."""

    def __init__(self, answer: list[int]) -> None:
        self.answer = answer

    def retain(self, running) -> None:
        pass

    def propose(self, batch: ScheduledBatch) -> None:
        for seq, k in batch.lookahead.items():
            done = seq.num_output_tokens
            if self.answer[done:done + k]:
                batch.proposals[seq] = Proposal(self.answer[done:done + k])


class FixedAcceptance(Oracle):
    """Runs ``draft`` (its cost is paid), then proposes the key's first
    ``accept`` tokens and wrong ones after: exactly ``accept`` of k accepted."""

    def __init__(self, draft: Proposer, answer: list[int], accept: int, vocab: int) -> None:
        super().__init__(answer)
        self.draft, self.accept, self.vocab = draft, accept, vocab
        self.propose_seconds: list[float] = []

    def retain(self, running) -> None:
        self.draft.retain(running)

    def propose(self, batch: ScheduledBatch) -> None:
        start = time.perf_counter()
        self.draft.propose(batch)
        sync()
        self.propose_seconds.append(time.perf_counter() - start)
        super().propose(batch)
        for seq, proposal in batch.proposals.items():
            ids = proposal.token_ids
            proposal.token_ids = ids[:self.accept] + [(t + 1) % self.vocab for t in ids[self.accept:]]


def generate(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[list[int], float, list[float]]:
    """(tokens, seconds, seconds of each step)."""
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    steps, out = [], None
    sync()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        sync()
        steps.append(time.perf_counter() - t0)
        out = outputs[0] if outputs else out
    return out.outputs[0].token_ids, time.perf_counter() - start, steps


def spec_counters(engine: LLMEngine) -> tuple[int, int, int]:
    s = engine.spec_stats
    return s.num_steps, s.num_proposed, s.num_accepted


def keyed_run(engine: LLMEngine, make, answer: list[int], prompt: list[int], k: int, output_len: int) -> dict:
    """Speculative runs at k with proposer ``make(key)``; the key becomes the run's own output
    until they agree (bf16 near ties, see the module docstring)."""
    engine.scheduler.config.num_lookahead = k
    key = answer
    for attempt in range(4):
        engine.proposer = make(key)
        generate(engine, prompt, 16)   # warm-up of the verification shapes
        before = spec_counters(engine)
        tokens, seconds, steps = generate(engine, prompt, output_len)
        if tokens == key:
            break
        key = tokens
    n_steps, proposed, accepted = (a - b for a, b in zip(spec_counters(engine), before))
    return {"k": k, "tokens": tokens, "seconds": seconds, "steps": steps, "oracle_passes": attempt + 1,
            "identical_prefix": next((i for i, (a, b) in enumerate(zip(tokens, answer)) if a != b), len(tokens)),
            "acceptance_rate": accepted / proposed if proposed else None,
            "tokens_per_verify_step": (accepted + n_steps) / n_steps if n_steps else None}


def eight_b(args: argparse.Namespace, **spec) -> tuple[LLMEngine, list[int]]:
    engine = LLMEngine(EngineConfig(args.model, random_weights=True, dtype="bfloat16", kv_cache_memory="8GiB",
                                    max_model_len=args.max_model_len, max_num_seqs=max(args.batches), **spec))
    rng = random.Random(0)
    return engine, [rng.randrange(engine.model_config.vocab_size) for _ in range(args.input_len)]


def plain(engine: LLMEngine, prompt: list[int], output_len: int) -> tuple[list[int], float, float]:
    """(tokens, seconds, median decode step) without speculation."""
    engine.scheduler.config.num_lookahead = 0
    generate(engine, prompt, 16)   # warm-up
    answer, seconds, steps = generate(engine, prompt, output_len)
    return answer, seconds, statistics.median(steps[1:])


def oracle_part(args: argparse.Namespace, state: dict) -> dict:
    engine, prompt = eight_b(args, speculative_method="ngram", num_speculative_tokens=max(args.k))
    answer, plain_s, decode_step = plain(engine, prompt, args.output_len)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    eager_decode_step = statistics.median(generate(engine, prompt, args.output_len)[2][1:])
    engine.runner.graphs = graphs
    rows = []
    for k in args.k:
        run = keyed_run(engine, Oracle, answer, prompt, k, args.output_len)
        verify_step = statistics.median(run.pop("steps")[1:])
        tokens = run.pop("tokens")
        rows.append({**run, "tokens_per_s": len(tokens) / run["seconds"], "plain_tokens_per_s": len(answer) / plain_s,
                     "speedup": (len(tokens) / run["seconds"]) / (len(answer) / plain_s),
                     "eager_decode_step_ms": eager_decode_step * 1e3, "verify_step_ms": verify_step * 1e3,
                     "decode_step_ms": decode_step * 1e3, "verify_over_decode": verify_step / decode_step,
                     "ideal_speedup": (k + 1) * decode_step / verify_step})
    print(f"{'k':>3} {'plain tok/s':>12} {'oracle tok/s':>13} {'speedup':>8} {'accept':>7} {'verify ms':>10} "
          f"{'decode ms':>10} {'passes':>7}")
    for r in rows:
        print(f"{r['k']:>3} {r['plain_tokens_per_s']:>12.1f} {r['tokens_per_s']:>13.1f} {r['speedup']:>8.2f} "
              f"{r['acceptance_rate'] or 0:>7.2f} {r['verify_step_ms']:>10.2f} {r['decode_step_ms']:>10.2f} "
              f"{r['oracle_passes']:>7}")
    return {"model": f"{args.model} (random bf16)", "input_len": args.input_len, "output_len": args.output_len,
            "figures": rows}


def ngram_part(args: argparse.Namespace, state: dict) -> dict:
    start = time.perf_counter()
    # No prefix cache: every run of a prompt (plain, then each k) computes it alike (the recorded run had it on,
    # so its speculative runs reused the plain run's blocks).
    llm = LLM(args.gguf, dtype="bfloat16", kv_cache_memory="4GiB", max_model_len=4096, speculative_method="ngram",
              num_speculative_tokens=max(args.ngram_k), enable_prefix_caching=False)
    load_s = time.perf_counter() - start
    prompts = prompts_of(llm, "edits", args.ngram_limit)
    params = SamplingParams(temperature=0, max_tokens=args.ngram_max_tokens)
    for k in (0, *args.ngram_k):   # warm-up: Triton builds, every verification shape's first use
        timed(llm, prompts[0], params, k)
    spec = llm.engine.spec_stats
    totals = {k: dict.fromkeys(("tokens", "seconds", "identical", "steps", "proposed", "accepted"), 0)
              for k in args.ngram_k}
    plain_tokens, plain_s, rows = 0, 0.0, []
    for i, prompt in enumerate(prompts):
        expected, seconds, _ = timed(llm, prompt, params, 0)
        plain_tokens, plain_s = plain_tokens + len(expected), plain_s + seconds
        row = {"prompt": i, "prompt_tokens": len(prompt), "output_tokens": len(expected), "plain_s": seconds}
        for k in args.ngram_k:
            before = (spec.num_steps, spec.num_proposed, spec.num_accepted)
            tokens, seconds, _ = timed(llm, prompt, params, k)
            steps, proposed, accepted = (a - b for a, b in zip((spec.num_steps, spec.num_proposed,
                                                                 spec.num_accepted), before))
            for key, value in (("tokens", len(tokens)), ("seconds", seconds), ("identical", tokens == expected),
                               ("steps", steps), ("proposed", proposed), ("accepted", accepted)):
                totals[k][key] += value
            row[f"k{k}"] = {"spec_s": seconds, "speedup": row["plain_s"] / seconds, "identical": tokens == expected,
                            "identical_prefix": next((j for j, (a, b) in enumerate(zip(tokens, expected)) if a != b),
                                                     min(len(tokens), len(expected))),
                            "acceptance_rate": accepted / proposed if proposed else None}
        rows.append(row)
    figures = {"plain_tokens_per_s": plain_tokens / plain_s, "load_s": load_s, "prompts": len(rows)}
    for k, t in totals.items():
        figures[f"k{k}"] = {"tokens_per_s": t["tokens"] / t["seconds"],
                            "speedup": (t["tokens"] / t["seconds"]) / (plain_tokens / plain_s),
                            "identical_prompts": t["identical"], "acceptance_rate": t["accepted"] / t["proposed"],
                            "tokens_per_verify_step": (t["accepted"] + t["steps"]) / t["steps"]}
    print(f"n-gram, {len(rows)} edit prompts: plain {figures['plain_tokens_per_s']:.1f} tok/s")
    for k in args.ngram_k:
        f = figures[f"k{k}"]
        print(f"  k={k}: {f['tokens_per_s']:.1f} tok/s, {f['speedup']:.2f}x, identical {f['identical_prompts']}/"
              f"{len(rows)}, acceptance {f['acceptance_rate']:.2f}, {f['tokens_per_verify_step']:.2f} tokens/step")
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": f"{args.gguf} (Qwen2.5-Coder-0.5B-Instruct, dequantized to bf16)", "workload": "edits",
            "max_tokens": args.ngram_max_tokens, "figures": figures, "per_prompt": rows}


def draft_engine(args: argparse.Namespace, state: dict) -> tuple[LLMEngine, list[int]]:
    if "draft_engine" not in state:
        state["draft_engine"] = eight_b(args, speculative_model=args.draft, num_speculative_tokens=max(args.k))
    return state["draft_engine"]


def batch_cost_part(args: argparse.Namespace, state: dict) -> dict:
    engine, _ = draft_engine(args, state)
    rows = measure(engine, args.context, args.k, args.batches, args.repeats)
    draft = engine.proposer
    seqs = contexts(draft.block_manager, engine.model_config.vocab_size, max(args.batches), args.context, 0)
    for row in rows:
        row["draft_decode_ms"] = step_seconds(draft.runner, draft.block_manager.block_size, seqs[:row["batch"]], 0,
                                              args.repeats) * 1e3
    for seq in seqs:
        draft.block_manager.free(seq)
    state["batch_cost"] = rows
    return {"model": f"{args.model} (random bf16), draft {args.draft} (random bf16)", "context": args.context,
            "figures": rows}


def draft_part(args: argparse.Namespace, state: dict) -> dict:
    engine, prompt = draft_engine(args, state)
    draft, vocab = engine.proposer, engine.model_config.vocab_size
    answer, plain_s, decode_step = plain(engine, prompt, args.output_len)
    cost = next((r for r in state.get("batch_cost", []) if r["batch"] == 1), None)
    rows = []
    for k in args.draft_k:
        for accept in range(k + 1):
            proposers = []

            def make(key):
                proposers.append(FixedAcceptance(draft, key, accept, vocab))
                return proposers[-1]
            run = keyed_run(engine, make, answer, prompt, k, args.output_len)
            tokens, steps = run.pop("tokens"), run.pop("steps")
            propose_s = statistics.median(proposers[-1].propose_seconds[1:])
            row = {**run, "accept": accept, "tokens_per_s": len(tokens) / run["seconds"],
                   "plain_tokens_per_s": len(answer) / plain_s, "decode_step_ms": decode_step * 1e3,
                   "step_ms": statistics.median(steps[1:]) * 1e3, "propose_ms": propose_s * 1e3}
            row["speedup"] = row["tokens_per_s"] / row["plain_tokens_per_s"]
            row["verify_ms"] = row["step_ms"] - row["propose_ms"]
            if cost is not None and f"k{k}" in cost:
                t_draft, t_verify = cost["draft_decode_ms"], cost[f"k{k}"]["verify_ms"]
                row["analytic_tokens_per_s"] = (accept + 1) / (k * t_draft + t_verify) * 1e3
                row["measured_over_analytic"] = row["tokens_per_s"] / row["analytic_tokens_per_s"]
            rows.append(row)
            print(f"draft k={k} a={accept}: {row['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x plain "
                  f"{row['plain_tokens_per_s']:.1f}), analytic {row.get('analytic_tokens_per_s', 0):.1f}, "
                  f"step {row['step_ms']:.2f} ms = propose {row['propose_ms']:.2f} + verify {row['verify_ms']:.2f}, "
                  f"acceptance {run['acceptance_rate']}, passes {run['oracle_passes']}", flush=True)
    engine.proposer = draft
    return {"model": f"{args.model} (random bf16), draft {args.draft} (random bf16)", "input_len": args.input_len,
            "output_len": args.output_len, "t_draft_ms": cost and cost["draft_decode_ms"], "figures": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["oracle"])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--draft", default="llama-3.2-1b")
    parser.add_argument("--gguf", help="the real Qwen2.5-Coder-0.5B-Instruct GGUF (part ngram)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 2, 8])
    parser.add_argument("--draft-k", type=int, nargs="+", default=[4])
    parser.add_argument("--ngram-k", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--ngram-max-tokens", type=int, default=256)
    parser.add_argument("--ngram-limit", type=int, help="first N edit prompts only")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    state: dict = {}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for part in args.parts:
        start = time.perf_counter()
        try:
            result = globals()[part.replace("-", "_") + "_part"](args, state)
        except Exception:   # one part's failure must not lose the others' figures
            traceback.print_exc()
            result = {"error": traceback.format_exc()}
        payload = {"benchmark": f"spec_gpu {part}", "date": datetime.date.today().isoformat(),
                   "command": "PYTHONPATH=. python3 benchmarks/spec_gpu.py " + " ".join(sys.argv[1:]),
                   "device": device, "versions": {"python": platform.python_version(), "torch": torch.__version__},
                   "part_seconds": time.perf_counter() - start, **result}
        Path(args.out, f"spec_gpu_{part}.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"[{part}: {payload['part_seconds']:.1f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
