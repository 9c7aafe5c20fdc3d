"""CUDA graphs beyond decode and the batch-1 decode step, on one GPU (random
Llama-3-8B shapes, bf16), in one process and one engine:

1. checks: the fused rotary + KV write (Triton) against the two kernels it
   replaces (bit for bit) and its torch twin; graph replays of a decode, a
   verification and a mixed batch against the same padded batch run eagerly
   (bit for bit) and against the unpadded eager step (max |diff| of logits);
2. bs1 decode, 128 -> 128: step time against the bandwidth floor (weights +
   KV over the copy bandwidth measured here), in three variants, alternating:
   neither of the two below, programmatic dependent launch
   (``triton_ops.PDL``), and PDL + silu in gate_up's GEMV
   (``triton_quant.FUSED_SILU``); the synchronous step, the graph replay,
   and the pipelined engine as ``pagellm bench latency`` runs it; greedy
   tokens compared;
3. a kernel profile of one bs1 decode graph replay (time by kernel), the
   first and last variants;
4. speculative decoding with an oracle proposer (``spec_gpu.Oracle``), k = 4
   and 8, verification under the varlen graphs and eager;
5. mixed prefill+decode steps: graph replay against the eager forward;
6. a Triton GEMV (the int8 kernel of ``triton_quant`` reading bf16 weights)
   against cuBLAS for the projections at one row, timed in CUDA graphs;
7. (``--real``, first) the dense GEMV with and without PDL, and gate_up's
   fused silu, on real Qwen2.5-0.5B projections and inputs against fp32
   math, and a PDL kernel
   captured after an external event wait (the graphs' KV-swap waits).

The engine speculates (ngram, for section 4) only when section 4 runs: a
speculating engine runs every step synchronously, so the pipelined bs1 figure
is ``pagellm bench latency``'s only without it.

    PYTHONPATH=. python3 benchmarks/graphs_gpu.py --out $OUT [--real .gpu-data/qwen05-layers.pt]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_gpu import Oracle, generate  # noqa: E402

from pagellm.bench.runner import decode_bandwidth_of, run_requests  # noqa: E402
from pagellm.bench.stats import decode_weight_bytes, measure_copy_bandwidth  # noqa: E402
from pagellm.config import EngineConfig  # noqa: E402
from pagellm.engine.cuda_graphs import GraphShape  # noqa: E402
from pagellm.engine.llm_engine import LLMEngine  # noqa: E402
from pagellm.kernels import torch_attention, triton_attention, triton_ops, triton_quant  # noqa: E402
from pagellm.kernels.attention import AttentionMetadata, LayerKVCache  # noqa: E402
from pagellm.model.context import ForwardContext  # noqa: E402
from pagellm.sampling_params import SamplingParams  # noqa: E402

RESULTS: dict = {}
OUT = Path(".")


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception:
                RESULTS[name] = {"error": traceback.format_exc()[-3000:]}
                print(RESULTS[name]["error"])
            print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            (OUT / "graphs_gpu_partial.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        return run
    return wrap


def event_time(fn, reps: int = 20) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_time(calls: list, reps: int = 20) -> float:
    """Seconds per call of ``calls`` replayed back to back in one CUDA graph."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return event_time(graph.replay, reps) / len(calls)


def synthetic_batch(query_lens: list[int], context_lens: list[int], block_size: int, first_block: int,
                    max_blocks: int, vocab: int, gen: torch.Generator):
    """Token ids, positions and metadata of a batch whose sequences own consecutive blocks from ``first_block``."""
    ids, pos, slots, tables, block = [], [], [], [], first_block
    for q, c in zip(query_lens, context_lens):
        n_blocks = triton.cdiv(q + c, block_size)
        table = list(range(block, block + n_blocks)) + [0] * (max_blocks - n_blocks)
        block += n_blocks
        tables.append(table)
        for p in range(c, c + q):
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    ids = torch.randint(0, vocab, (len(pos),), generator=gen)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(qsl, torch.tensor([q + c for q, c in zip(query_lens, context_lens)], dtype=torch.int32),
                             torch.tensor(tables, dtype=torch.int32), torch.tensor(slots), max(query_lens),
                             max(q + c for q, c in zip(query_lens, context_lens)))
    return ids.cuda(), torch.tensor(pos).cuda(), meta.to(torch.device("cuda"))


def eager_logits(runner, ids, pos, meta, rows):
    hidden = runner.model(ids, pos, ForwardContext(meta, runner.kv_cache.layers, runner.backend))
    return runner.model.compute_logits(hidden[rows])


@section("rotary_write_check")
def rotary_write_check():
    out = {}
    gen = torch.Generator().manual_seed(0)
    for kv_dtype in (torch.bfloat16, torch.int8):
        T, H, Hkv, D, bs, nb = 37, 32, 8, 128, 16, 8
        q = torch.randn(T, H, D, generator=gen).bfloat16().cuda()
        k = torch.randn(T, Hkv, D, generator=gen).bfloat16().cuda()
        v = torch.randn(T, Hkv, D, generator=gen).bfloat16().cuda()
        positions = torch.randint(0, 4000, (T,), generator=gen).cuda()
        slots = torch.randperm(nb * bs, generator=gen)[:T].cuda()
        slots[::5] = -1
        from pagellm.model.layers import RotaryEmbedding
        cos_sin = RotaryEmbedding(D, 8192, 500000.0, None).cos_sin_cache.cuda()

        def cache():
            quant = kv_dtype != torch.bfloat16
            shape = (nb, bs, Hkv, D)
            scales = (torch.zeros(nb, Hkv, bs, dtype=torch.float16, device="cuda") if quant else None)
            return LayerKVCache(torch.zeros(shape, dtype=kv_dtype, device="cuda"),
                                torch.zeros(shape, dtype=kv_dtype, device="cuda"),
                                scales, scales.clone() if quant else None)
        results = {}
        for name, fused, backend in (("fused", True, triton_attention.TritonAttention()),
                                     ("unfused", False, triton_attention.TritonAttention()),
                                     ("torch", None, torch_attention.TorchAttention())):
            if fused is not None:
                triton_attention.FUSED_ROTARY = fused
            c, qq, kk = cache(), q.clone(), k.clone()
            backend.rotate_and_write_kv(qq, kk, v, positions, cos_sin, c, slots)
            results[name] = (qq, kk, c)
        triton_attention.FUSED_ROTARY = True
        (fq, fk, fc), (uq, uk, uc), (tq, tk, tc) = results["fused"], results["unfused"], results["torch"]
        same = bool(torch.equal(fq, uq) and torch.equal(fk, uk) and torch.equal(fc.k, uc.k) and torch.equal(fc.v, uc.v)
                    and (fc.k_scale is None or torch.equal(fc.k_scale, uc.k_scale)))
        out[str(kv_dtype)] = {"fused_equals_unfused": same,
                              "q_max_diff_vs_torch": (fq.float() - tq.float()).abs().max().item(),
                              "k_cache_max_diff_vs_torch": (fc.k.float() - tc.k.float()).abs().max().item(),
                              "v_cache_equal_torch": bool(torch.equal(fc.v, tc.v)) if kv_dtype == torch.bfloat16
                              else None}
    print(json.dumps(out, indent=1))
    return out


def graph_batch(engine, query_lens: list[int], context_lens: list[int], gen: torch.Generator):
    """(ids, positions, metadata, graph shape): a synthetic batch laid out for the engine's graph inputs."""
    runner = engine.runner
    ids, pos, meta = synthetic_batch(query_lens, context_lens, runner.kv_spec.block_size, 1,
                                     runner.graphs.inputs.block_tables.shape[1], engine.model_config.vocab_size, gen)
    return ids, pos, meta, runner.graphs.shape_for(len(ids), meta)


@section("graph_exactness")
def graph_exactness(engine):
    runner = engine.runner
    graphs = runner.graphs
    gen = torch.Generator().manual_seed(1)
    cases = {"decode bs3 (graph 4)": ([1] * 3, [100, 300, 37]),
             "verify bs1 k=4 (graph 8)": ([5], [200]),
             "verify bs2 k=4 + 1 decode (graph 16)": ([5, 5, 1], [130, 600, 90]),
             "mixed: chunk 100 + 6 decodes (graph 128)": ([100] + [1] * 6, [0] + [250] * 6),
             "mixed: chunk 60 after 64 cached + 3 decodes (graph 64)": ([60, 1, 1, 1], [64, 20, 900, 33])}
    out = {}
    for name, (ql, cl) in cases.items():
        ids, pos, meta, shape = graph_batch(engine, ql, cl, gen)
        rows = torch.arange(len(ids), device="cuda")
        with torch.inference_mode():
            eager = eager_logits(runner, ids, pos, meta, rows)
            replay = graphs.run(shape, ids, pos, meta, rows).clone()
            graphs.capture = False
            padded = graphs.run(shape, ids, pos, meta, rows).clone()
            graphs.capture = True
        out[name] = {"shape": [shape.num_tokens, shape.num_seqs, shape.max_query_len],
                     "replay_equals_padded_eager": bool(torch.equal(replay, padded)),
                     "max_abs_diff_vs_unpadded_eager": (replay - eager).abs().max().item(),
                     "argmax_agree_vs_unpadded_eager": (replay.argmax(-1) == eager.argmax(-1)).float().mean().item()}
    print(json.dumps(out, indent=1))
    return out


def recapture(engine):
    runner = engine.runner
    runner.graphs = None
    torch.cuda.empty_cache()
    runner.graphs = runner.capture_graphs()


def decode_run(engine, prompt, output_len, bandwidth):
    tokens, seconds, steps = generate(engine, prompt, output_len)
    decode_steps = steps[1:]
    step = statistics.median(decode_steps)
    config = engine.model_config
    runner = engine.runner
    context = len(prompt) + output_len / 2
    floor_bytes = (decode_weight_bytes(config, runner.weights_bytes, 2, 1)
                   + context * runner.kv_spec.bytes_per_token)
    floor = floor_bytes / bandwidth
    replay = event_time(runner.graphs.graphs[GraphShape(1, 1, 1)].replay, 30)
    return {"tokens": tokens, "tok_per_s": output_len / seconds, "median_step_ms": step * 1e3,
            "mean_decode_step_ms": statistics.fmean(decode_steps) * 1e3,
            "graph_replay_ms": replay * 1e3, "floor_ms": floor * 1e3,
            "fraction_of_floor": floor / step, "replay_fraction_of_floor": floor / replay}


def pipelined_run(engine, output_len: int, bandwidth: dict, rng: random.Random, runs: int) -> dict:
    """``pagellm bench latency``'s measurement: ``runs`` fresh prompts one after another, the asynchronous
    pipeline on; the mean time per output token over them."""
    steps, tpots = [], []
    for _ in range(runs):
        prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(128)]
        run = run_requests(engine, [prompt], [SamplingParams(max_tokens=output_len, temperature=0,
                                                             ignore_eos=True)], f"pipelined{rng.random()}")
        steps += run.steps
        tpots += run.tpots()
    bw = decode_bandwidth_of(engine, steps, {"copy": bandwidth})
    tpot = statistics.fmean(tpots)
    return {"tok_per_s": 1 / tpot, "tpot_ms": tpot * 1e3, "floor_ms": bw["floor_seconds"] / bw["steps"] * 1e3,
            "fraction_of_floor": bw["fraction_of_floor"], "steps": bw["steps"], "runs": runs,
            "tpot_ms_each": [t * 1e3 for t in tpots]}


VARIANTS = {"before": (False, False), "pdl": (True, False), "pdl_silu": (True, True)}   # (PDL, FUSED_SILU)


def set_variant(engine, name: str) -> None:
    triton_ops.PDL, triton_quant.FUSED_SILU = VARIANTS[name]
    recapture(engine)


@section("bs1_decode")
def bs1_decode(engine, prompt, bandwidth, variants: list[str], pipelined_runs: int):
    out = {}
    rng = random.Random(5)
    for run in range(2):
        for name in variants:
            set_variant(engine, name)
            generate(engine, prompt, 16)
            key = f"{name}_{run}"
            out[key] = decode_run(engine, prompt, 128, bandwidth["bandwidth"])
            out[key]["pipelined"] = pipelined_run(engine, 128, bandwidth, rng, pipelined_runs)
    tokens = {name: r.pop("tokens") for name, r in out.items()}
    first = tokens[f"{variants[0]}_0"]
    out["identical_prefix_vs_first"] = {name: next((i for i, (a, b) in enumerate(zip(first, t)) if a != b), len(t))
                                        for name, t in tokens.items()}
    out["tokens_compared"] = len(first)
    print(json.dumps(out, indent=1))
    return out


@section("profile")
def profile(engine):
    out = {}
    for name in ("before", "pdl_silu"):
        set_variant(engine, name)
        out[name] = kernel_profile(engine)
    return out


def kernel_profile(engine):
    graph = engine.runner.graphs.graphs[GraphShape(1, 1, 1)]
    from torch.profiler import ProfilerActivity, profile as torch_profile
    graph.replay()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((e.key[:90], e.count / 5, t / 5))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    out = {"kernel_us_per_replay": total, "launches_per_replay": sum(r[1] for r in rows),
           "by_kernel": [{"name": n, "calls": c, "us": t} for n, c, t in rows[:25]]}
    for r in rows[:25]:
        print(f"{r[2]:9.1f} us  {r[1]:6.0f}x  {r[0]}")
    print(f"PDL {triton_ops.PDL}, fused silu {triton_quant.FUSED_SILU}: total kernel time {total:.1f} us per "
          f"replay, {out['launches_per_replay']:.0f} kernels")
    return out


def gated_check(w, xs, ref, config) -> dict:
    """gate_up's GEMV with silu(gate) * up in its epilogue: against the GEMV then the silu kernel (bit for bit)
    and against fp32 math (cuBLAS bf16 then the silu kernel beside it)."""
    gate, up = ref.chunk(2, dim=-1)
    gated_ref = gate * torch.sigmoid(gate) * up
    scale = gated_ref.abs().max().item()
    unsplit = triton_quant.MatmulConfig(1, config.block_n, config.block_k, config.num_warps, config.num_stages, 0)
    fused = torch.cat([triton_quant.dense_silu_and_mul(x[None], w, config) for x in xs])
    unfused = triton_ops.silu_and_mul(torch.cat([triton_quant.dense_matmul(x[None], w, None, unsplit) for x in xs]))
    cublas = triton_ops.silu_and_mul(torch.nn.functional.linear(xs, w))
    return {"fused_equals_gemv_then_silu": bool(torch.equal(fused, unfused)),
            "max_rel_err": (fused.float() - gated_ref).abs().max().item() / scale,
            "cublas_then_silu_max_rel_err": (cublas.float() - gated_ref).abs().max().item() / scale}


@section("real_gemv_pdl")
def real_gemv_pdl(path: str):
    """The dense GEMV (each committed tile) with and without PDL on real Qwen2.5-0.5B projections, rows of their
    real inputs, against fp32 math (cuBLAS bf16 beside it); then a PDL kernel captured after an external event
    wait, as the graphs capture layers that wait for KV swaps."""
    layers = torch.load(path)["layers"]
    out = {}
    for name, layer in layers.items():
        w = layer["weight"].cuda()
        xs = layer["inputs"][:16].cuda()
        ref = xs.float() @ w.float().T
        scale = ref.abs().max().item()
        row = {"shape": list(w.shape), "cublas_max_rel_err": (torch.nn.functional.linear(xs, w).float() - ref)
               .abs().max().item() / scale}
        for key, config in triton_quant.DENSE_GEMV.items():
            got = {}
            for pdl in (False, True):
                triton_ops.PDL = pdl
                got[pdl] = torch.cat([triton_quant.dense_matmul(x[None], w, None, config) for x in xs])
            row[f"tile_of_{key}"] = {"pdl_equals_no_pdl": bool(torch.equal(got[False], got[True])),
                                     "max_rel_err": (got[True].float() - ref).abs().max().item() / scale}
            if "gate_up" in name and config.block_n >= 4:   # pairs of gate and up rows per program
                row[f"tile_of_{key}"]["silu"] = gated_check(w, xs, ref, config)
        out[name] = row
    x, r = (torch.randn(1, 4096, device="cuda").bfloat16() for _ in range(2))
    norm_weight = torch.randn(4096, device="cuda").bfloat16()
    event = torch.cuda.Event(external=True)
    event.record()
    eager = triton_ops.silu_and_mul(triton_ops.rms_norm(x, norm_weight, 1e-5, r)[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed = triton_ops.rms_norm(x, norm_weight, 1e-5, r)[0]
        torch.cuda.current_stream().wait_event(event)
        captured = triton_ops.silu_and_mul(normed)
    graph.replay()
    torch.cuda.synchronize()
    out["pdl_after_event_wait_in_graph_equals_eager"] = bool(torch.equal(captured, eager))
    print(json.dumps(out, indent=1))
    return out


@section("spec_oracle")
def spec_oracle(engine, prompt, output_len):
    engine.scheduler.config.num_lookahead = 0
    generate(engine, prompt, 16)
    answer, plain_s, plain_steps = generate(engine, prompt, output_len)
    rows = []
    graphs = engine.runner.graphs
    token_sizes = graphs.token_sizes
    for k, graphed in ((4, True), (8, True), (4, False)):
        graphs.token_sizes = token_sizes if graphed else []   # no varlen graph: verification runs eagerly
        engine.scheduler.config.num_lookahead = k
        key = answer
        for attempt in range(4):
            engine.proposer = Oracle(key)
            generate(engine, prompt, 16)
            s0 = (engine.spec_stats.num_steps, engine.spec_stats.num_proposed, engine.spec_stats.num_accepted)
            tokens, spec_s, steps = generate(engine, prompt, output_len)
            if tokens == key:
                break
            key = tokens
        n_steps, proposed, accepted = (a - b for a, b in zip(
            (engine.spec_stats.num_steps, engine.spec_stats.num_proposed, engine.spec_stats.num_accepted), s0))
        rows.append({"k": k, "verify_graphs": graphed, "tokens_per_s": len(tokens) / spec_s,
                     "plain_tokens_per_s": len(answer) / plain_s,
                     "speedup": (len(tokens) / spec_s) / (len(answer) / plain_s), "oracle_passes": attempt + 1,
                     "identical_prefix": next((i for i, (a, b) in enumerate(zip(tokens, answer)) if a != b),
                                              len(tokens)),
                     "acceptance_rate": accepted / proposed if proposed else None,
                     "tokens_per_verify_step": (accepted + n_steps) / n_steps if n_steps else None,
                     "verify_step_ms": statistics.median(steps[1:]) * 1e3,
                     "decode_step_ms": statistics.median(plain_steps[1:]) * 1e3})
    graphs.token_sizes = token_sizes
    engine.scheduler.config.num_lookahead = 0
    for r in rows:
        print(r)
    return rows


@section("mixed_steps")
def mixed_steps(engine):
    runner = engine.runner
    graphs = runner.graphs
    gen = torch.Generator().manual_seed(2)
    out = []
    cases = [(56, 8, 512), (120, 8, 512), (248, 8, 512), (504, 8, 512), (32, 32, 512), (56, 8, 3800)]
    cases += [(t - 8, 8, 512) for t in (768, 1024, 1536, 2048) if t <= graphs.token_sizes[-1]]
    for chunk, decodes, context in cases:
        ql, cl = [chunk] + [1] * decodes, [0] + [context] * decodes
        ids, pos, meta, shape = graph_batch(engine, ql, cl, gen)
        rows = torch.tensor([chunk - 1 + i for i in range(decodes + 1)], device="cuda")

        def timed(fn, reps=20):
            with torch.inference_mode():
                fn()
                torch.cuda.synchronize()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
            return statistics.median(ts)
        g = timed(lambda: graphs.run(shape, ids, pos, meta, rows))
        e = timed(lambda: eager_logits(runner, ids, pos, meta, rows))
        out.append({"tokens": len(ids), "chunk": chunk, "decodes": decodes, "decode_context": context,
                    "graph_tokens": shape.num_tokens,
                    "graph_ms": g * 1e3, "eager_ms": e * 1e3, "eager_over_graph": e / g})
        print(out[-1])
    return out


GEMV_CONFIGS = [triton_quant.MatmulConfig(1, n, k, w, 3, p) for n, k, w, p in
                ((2, 2048, 4, 1), (4, 1024, 4, 1), (4, 2048, 4, 1), (4, 4096, 4, 1), (4, 2048, 8, 1),
                 (8, 1024, 4, 1), (8, 2048, 8, 1), (8, 512, 4, 1), (2, 4096, 8, 1), (4, 1024, 2, 1),
                 (16, 512, 4, 4), (8, 1024, 4, 4), (4, 512, 2, 4))]
GEMV_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}


@section("gemv")
def gemv(tuning):
    """cuBLAS vs the Triton GEMV at one row with the weights cold in L2: each graph
    cycles through copies of the weight that together exceed 8x the L2."""
    out = {}
    tuning["gemv"] = {}
    gen = torch.Generator(device="cuda").manual_seed(3)
    for name, (n, k) in GEMV_SHAPES.items():
        copies = max(1, -(-400 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", generator=gen).bfloat16() for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
        ref = torch.nn.functional.linear(x, weights[0]).float()
        f = torch.nn.functional.linear
        row = {"copies": copies, "bytes": n * k * 2,
               "cublas_us": graph_time([lambda w=w: f(x, w) for w in weights] * (2 if copies > 1 else 4)) * 1e6}
        best = None
        for c in GEMV_CONFIGS:
            key = f"n{c.block_n}_k{c.block_k}_w{c.num_warps}_p{c.programs_per_sm}"
            try:
                err = ((triton_quant.dense_matmul(x, weights[0], None, c).float() - ref).abs().max()
                       / ref.abs().max()).item()
                us = graph_time([lambda w=w: triton_quant.dense_matmul(x, w, None, c) for w in weights]
                                * (2 if copies > 1 else 4)) * 1e6
                row[key] = {"us": us, "max_rel_err": err}
                if err < 1e-2 and (best is None or us < row[best]["us"]):
                    best = key
                    if us < 0.97 * row["cublas_us"]:
                        tuning["gemv"][(n, k)] = c
            except Exception as exc:   # a config that does not fit
                row[key] = {"error": str(exc)[:200]}
        row["best"] = best
        row["gb_per_s"] = {"cublas": n * k * 2 / row["cublas_us"] / 1e3,
                           "best_triton": n * k * 2 / row[best]["us"] / 1e3 if best else None}
        row["chosen"] = vars(tuning["gemv"][(n, k)]) if (n, k) in tuning["gemv"] else "cublas"
        out[name] = row
        print(name, f"cublas {row['cublas_us']:.1f} us, best {best} {row[best]['us'] if best else 0:.1f} us "
              f"-> {row['chosen']}")
        del weights
    return out


@section("rms_norm")
def rms_norm_sweep(tuning):
    x, r = (torch.randn(1, 4096, device="cuda").bfloat16() for _ in range(2))
    w = torch.randn(4096, device="cuda").bfloat16()
    out = {}
    for per_warp in (256, 512, 1024, 2048):
        triton_ops.RMS_NORM_ELEMENTS_PER_WARP = per_warp
        out[per_warp] = graph_time([lambda: triton_ops.rms_norm(x, w, 1e-5, r)] * 40) * 1e6
    tuning["rms_norm_elements_per_warp"] = min(out, key=out.get)
    print("rms_norm us by elements per warp", out, "->", tuning["rms_norm_elements_per_warp"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--graph-tokens", type=int, default=512, help="cuda_graph_max_tokens")
    parser.add_argument("--sections", default="rotary,sweeps,bs1,exact,profile,spec,mixed")
    parser.add_argument("--real", default=None, help="real layers for the GEMV check (quant_real_layers.py)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="bs1 variants, run twice in this order")
    parser.add_argument("--pipelined-runs", type=int, default=1, help="bs1: pipelined 128 -> 128 runs a variant")
    args = parser.parse_args()
    wanted = args.sections.split(",")
    global OUT
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_copy_bandwidth(torch.device("cuda"))
    RESULTS["copy_bandwidth"] = bandwidth
    print("copy bandwidth", bandwidth["bandwidth"] / 1e9, "GB/s")
    if args.real:
        real_gemv_pdl(args.real)
    triton_ops.PDL = triton_quant.FUSED_SILU = True
    if "rotary" in wanted:
        rotary_write_check()
    tuning = {"gemv": dict(triton_quant.DENSE_GEMV),     # the sweeps replace these (the committed choices)
              "rms_norm_elements_per_warp": triton_ops.RMS_NORM_ELEMENTS_PER_WARP}
    if "sweeps" in wanted:
        rms_norm_sweep(tuning)
        gemv(tuning)
        triton_quant.DENSE_GEMV.clear()
        triton_quant.DENSE_GEMV.update(tuning["gemv"])
        triton_ops.RMS_NORM_ELEMENTS_PER_WARP = tuning["rms_norm_elements_per_warp"]
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig("llama-3-8b", random_weights=True, dtype="bfloat16", kv_cache_memory="8GiB",
                                    max_model_len=4096, max_num_seqs=64, cuda_graph_max_tokens=args.graph_tokens,
                                    **(dict(speculative_method="ngram", num_speculative_tokens=8)
                                       if "spec" in wanted else {})))
    RESULTS["engine_startup_s"] = time.perf_counter() - t0
    RESULTS["graph_capture_s"] = engine.runner.graphs.capture_seconds
    RESULTS["graph_shapes"] = len(engine.runner.graphs.shapes)
    RESULTS["graph_token_sizes"] = engine.runner.graphs.token_sizes
    RESULTS["memory_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    print("engine", RESULTS["engine_startup_s"], "s; capture", RESULTS["graph_capture_s"], "s")
    engine.scheduler.config.num_lookahead = 0
    rng = random.Random(0)
    prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(128)]
    if "bs1" in wanted:
        # leaves the last variant (PDL, fused silu) captured
        bs1_decode(engine, prompt, bandwidth, args.variants.split(","), args.pipelined_runs)
    if "exact" in wanted:
        graph_exactness(engine)
    if "profile" in wanted:
        profile(engine)   # leaves the last variant (PDL, fused silu) captured
    if "spec" in wanted:
        spec_oracle(engine, prompt, 128)
    if "mixed" in wanted:
        mixed_steps(engine)
    payload = {"benchmark": "graphs_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
               "device": torch.cuda.get_device_name(),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "triton": triton.__version__},
               "model": "llama-3-8b (random bf16), kv 8 GiB, max_model_len 4096, max_num_seqs 64", **RESULTS}
    Path(args.out, "graphs_gpu.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print("=== summary")
    bs1 = RESULTS.get("bs1_decode", {})
    for name in (f"{v}_{run}" for run in range(2) for v in args.variants.split(",")):
        if name in bs1:
            r, p = bs1[name], bs1[name]["pipelined"]
            print(f"bs1 {name:>13}: pipelined {p['tok_per_s']:.1f} tok/s, {p['tpot_ms']:.3f} ms, "
                  f"{p['fraction_of_floor']:.1%} of {p['floor_ms']:.3f}; synced step {r['median_step_ms']:.3f} ms, "
                  f"replay {r['graph_replay_ms']:.3f} ms, floor {r['floor_ms']:.3f} ms -> {r['fraction_of_floor']:.1%} "
                  f"(replay {r['replay_fraction_of_floor']:.1%})")
    if "identical_prefix_vs_first" in bs1:
        print(f"bs1 greedy tokens equal to the first variant's (of {bs1['tokens_compared']}): "
              f"{bs1['identical_prefix_vs_first']}")
    for label, prof in (RESULTS.get("profile") or {}).items():
        if isinstance(prof, dict) and "kernel_us_per_replay" in prof:
            print(f"profile {label}: {prof['kernel_us_per_replay']:.1f} us of kernels, "
                  f"{prof['launches_per_replay']:.0f} launches")
    for name, ok in (("exact", RESULTS.get("graph_exactness")), ("real", RESULTS.get("real_gemv_pdl"))):
        if isinstance(ok, dict):
            print(name, json.dumps(ok, default=str)[:1500])
    for r in RESULTS.get("spec_oracle", []) if isinstance(RESULTS.get("spec_oracle"), list) else []:
        print(f"spec k={r['k']} graphs={r['verify_graphs']}: {r['tokens_per_s']:.1f} tok/s vs "
              f"{r['plain_tokens_per_s']:.1f} = {r['speedup']:.2f}x (verify {r['verify_step_ms']:.2f} ms, decode "
              f"{r['decode_step_ms']:.2f} ms, {r['tokens_per_verify_step']:.2f} tok/step, passes {r['oracle_passes']})")
    for r in RESULTS.get("mixed_steps", []) if isinstance(RESULTS.get("mixed_steps"), list) else []:
        print(f"mixed {r['tokens']:>4} tok, ctx {r['decode_context']} (graph {r['graph_tokens']}): graph {r['graph_ms']:.2f} ms, eager "
              f"{r['eager_ms']:.2f} ms ({r['eager_over_graph']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
