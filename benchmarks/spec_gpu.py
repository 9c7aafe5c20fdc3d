"""The verification mechanism on a GPU, where random weights make real
acceptance meaningless: batch 1, greedy, Llama-3-8B shapes (random bf16).

1. plain decoding (CUDA graphs) of ``--output-len`` tokens; its output is the
   oracle's answer key;
2. the same engine with an *oracle* proposer (benchmark only) that proposes
   the plain run's own continuation, k tokens a step: every proposal that the
   verification's logits agree with is accepted. bf16 verification (k+1
   queries, the prefill attention kernel) may break a near tie of the random
   model the other way than the decode graph did, after which the plain run's
   tokens are no longer the target's continuation: the oracle then takes the
   speculative run's own output as its key and the run is repeated (up to 4 passes);
3. the cost of one verification step (k+1 query tokens, under a varlen CUDA
   graph: ``engine.cuda_graphs``) against one decode step, median over the runs' steps.

``benchmarks/graphs_gpu.py`` runs the same oracle with verification under graphs and eager.

    PYTHONPATH=. python3 benchmarks/spec_gpu.py --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from pagellm.config import EngineConfig
from pagellm.engine.llm_engine import LLMEngine
from pagellm.sampling_params import SamplingParams
from pagellm.spec.proposal import Proposal


class Oracle:
    def __init__(self, answer: list[int]) -> None:
        self.answer = answer

    def retain(self, running) -> None:
        pass

    def propose(self, batch) -> None:
        for seq, k in batch.lookahead.items():
            done = seq.num_output_tokens
            if self.answer[done:done + k]:
                batch.proposals[seq] = Proposal(self.answer[done:done + k])


def generate(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[list[int], float, list[float]]:
    """(tokens, seconds, seconds of each step)."""
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    steps, out = [], None
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
        out = outputs[0] if outputs else out
    return out.outputs[0].token_ids, time.perf_counter() - start, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 2, 8])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(args.model, random_weights=True, dtype="bfloat16", kv_cache_memory="4GiB",
                                    max_model_len=2048, speculative_method="ngram",
                                    num_speculative_tokens=max(args.k)))
    rng = random.Random(0)
    prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(args.input_len)]
    engine.scheduler.config.num_lookahead = 0
    generate(engine, prompt, 16)   # warm-up
    answer, plain_s, plain_steps = generate(engine, prompt, args.output_len)
    decode_step = statistics.median(plain_steps[1:])
    graphs, engine.runner.graphs = engine.runner.graphs, None
    eager_decode_step = statistics.median(generate(engine, prompt, args.output_len)[2][1:])
    engine.runner.graphs = graphs
    rows = []
    for k in args.k:
        engine.scheduler.config.num_lookahead = k
        key = answer
        for attempt in range(4):   # bf16 verification may break a near tie the other way: use its own answer
            engine.proposer = Oracle(key)
            generate(engine, prompt, 16)   # warm-up of the verification shapes
            before = (engine.spec_stats.num_steps, engine.spec_stats.num_proposed, engine.spec_stats.num_accepted)
            tokens, spec_s, steps = generate(engine, prompt, args.output_len)
            if tokens == key:
                break
            key = tokens
        n_steps, proposed, accepted = (a - b for a, b in zip(
            (engine.spec_stats.num_steps, engine.spec_stats.num_proposed, engine.spec_stats.num_accepted), before))
        verify_step = statistics.median(steps[1:])
        rows.append({"k": k, "tokens_per_s": len(tokens) / spec_s, "plain_tokens_per_s": len(answer) / plain_s,
                     "speedup": (len(tokens) / spec_s) / (len(answer) / plain_s), "oracle_passes": attempt + 1,
                     "eager_decode_step_ms": eager_decode_step * 1e3,
                     "identical_prefix": next((i for i, (a, b) in enumerate(zip(tokens, answer)) if a != b),
                                              len(tokens)),
                     "acceptance_rate": accepted / proposed if proposed else None,
                     "tokens_per_verify_step": (accepted + n_steps) / n_steps if n_steps else None,
                     "verify_step_ms": verify_step * 1e3, "decode_step_ms": decode_step * 1e3,
                     "verify_over_decode": verify_step / decode_step,
                     "ideal_speedup": (k + 1) * decode_step / verify_step})
    payload = {"benchmark": "spec_gpu", "date": datetime.date.today().isoformat(),
               "command": "PYTHONPATH=. python3 benchmarks/spec_gpu.py --out $OUT",
               "device": torch.cuda.get_device_name(), "versions": {"python": platform.python_version(),
                                                                     "torch": torch.__version__},
               "model": f"{args.model} (random bf16)", "input_len": args.input_len, "output_len": args.output_len,
               "figures": rows}
    Path(args.out, "spec_gpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{'k':>3} {'plain tok/s':>12} {'oracle tok/s':>13} {'speedup':>8} {'accept':>7} {'tok/step':>9} "
          f"{'verify ms':>10} {'decode ms':>10} {'eager decode ms':>16} {'same as plain':>14} {'passes':>7}")
    for r in rows:
        print(f"{r['k']:>3} {r['plain_tokens_per_s']:>12.1f} {r['tokens_per_s']:>13.1f} {r['speedup']:>8.2f} "
              f"{r['acceptance_rate'] or 0:>7.2f} {r['tokens_per_verify_step'] or 0:>9.2f} "
              f"{r['verify_step_ms']:>10.2f} "
              f"{r['decode_step_ms']:>10.2f} {r['eager_decode_step_ms']:>16.2f} {r['identical_prefix']:>14} "
              f"{r['oracle_passes']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
