"""Check and time the quantized KV cache's Triton kernels (int8, fp8) against
the bf16 cache, on one CUDA device, in one call; the table is printed last.

    PYTHONPATH=. python3 benchmarks/kv_quant_gpu.py --out $OUT [--sections check,kernels,sweep,engine]

Without a GPU, Triton's interpreter runs the checks on small fp16 int8 cases::

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kv_quant_gpu.py --device cpu --sections check

* check: the write kernel against ``kv_quant.quantize`` (scales equal, codes
  within one step), and decode + prefill attention over a bf16, int8 and fp8
  cache against the torch reference (``paged_attention`` in fp32 over the same
  codes and scales), mixed batches, GQA, a sliding window, forced decode
  splits, other tilings (``CHECK_VARIANTS``), and queries and values at the
  edges of fp16's range.
* kernels: paged decode attention per layer (Llama-3-8B heads), batch 64 x 4k
  and 256 x 2k, bf16 vs int8 vs fp8, as CUDA-graph replays over batches whose
  K/V do not fit in L2; bandwidth counts the bytes the kernel reads (codes +
  scales + block tables + q) against the measured copy bandwidth. Prefill
  8 x 2048 TFLOP/s, bf16, int8, fp8.
* sweep: int8 and bf16 decode at 64 x 4k over tile sizes, warps, stages and
  programs per SM, then the grid order, then batch 1 x 32k over the split
  limit; int8 prefill 8 x 2k over tiles, warps and stages. Every timed output is
  checked against the torch reference. The best become ``QUANT_DECODE``,
  ``DECODE`` and ``QUANT_PREFILL`` for the rest of the run (engine too).
  ``--sweep-int8``, ``--sweep-bf16``, ``--sweep-prefill`` replace the lists
  (an empty one skips that part).
* ``--baseline FILE``: another revision's ``triton_attention.py``, whose kernels
  the kernels section times too, with its own defaults, in the same run.
* engine (``--engine-workloads``, default all): random Llama-3-8B, bf16 weights. (a) decode at batch 64 with 4,096-
  token prompts: decode-only steps' tokens/s; (b) the KV pool as the limit: 384
  requests of 1,536-token prompts + 128 output tokens in an 8 GiB pool, output
  tokens/s (prefill-heavy: 12 prompt tokens an output token); (c) the same kind
  of limit with more decoding: 256 requests of 1,024 + 256 tokens, 4 GiB.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import random
import sys
import time
import traceback

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import kernels as kb  # noqa: E402  (benchmarks/kernels.py: batches, graph timing, errors)

from pagellm.bench.stats import measure_copy_bandwidth  # noqa: E402
from pagellm.kernels import triton_attention as ta  # noqa: E402
from pagellm.kernels.attention import LayerKVCache  # noqa: E402
from pagellm.kernels.kv_quant import KV_FORMATS, quantize, scale_pairs  # noqa: E402
from pagellm.kernels.torch_attention import paged_attention, write_kv_cache  # noqa: E402

CFG = kb.LLAMA3_8B
SAVE = [lambda: None]    # main's save(): called after every row, so a run cut short keeps what it measured
CHECK_TOLERANCE = 1e-2   # relative error against the torch reference over the same codes and scales


def quant_cache(num_blocks, block_size, kv_heads, head_dim, storage, device, gen=None, v_mult=1.0):
    """A cache of random K/V with a few large key channels (as real keys have), quantized
    (``storage`` None: bf16); values times ``v_mult``."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, device=device, generator=gen)
    k[..., :4] *= 20
    v = torch.randn(shape, device=device, generator=gen) * v_mult
    if storage is None:
        return LayerKVCache(k.to(torch.bfloat16), v.to(torch.bfloat16))
    fmt = next(f for f in KV_FORMATS.values() if f.storage == storage)
    (kc, ks), (vc, vs) = quantize(k, fmt), quantize(v, fmt)
    scales = scale_pairs(num_blocks, kv_heads, block_size, device=device)    # [2, blocks, heads, block_size]
    scales[0], scales[1] = ks.transpose(1, 2), vs.transpose(1, 2)
    return LayerKVCache(kc, vc, scales[0], scales[1])


def cache_bytes_per_token(storage) -> int:
    """K and V bytes of one token of one layer as the kernel reads them."""
    per_vector = CFG["head_dim"] * (2 if storage is None else 1) + (0 if storage is None else 2)
    return 2 * CFG["num_kv_heads"] * per_vector


# --------------------------------------------------------------------------- check

def check(device, quick, results):
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    formats = ["int8"] if device.type == "cpu" else list(KV_FORMATS)
    heads, kv_heads, dim = (8, 2, 32) if quick else (CFG["num_heads"], CFG["num_kv_heads"], CFG["head_dim"])
    if device.type == "cpu":     # the interpreter: no SM count to split by
        ta._num_sms = lambda index: 8
    gen = torch.Generator(device=device).manual_seed(0)
    attention_checks("bf16", None, heads, kv_heads, dim, dtype, device, quick, gen, results)
    for name in formats:
        fmt = KV_FORMATS[name]
        # write kernel
        tokens, block = 37, 16
        k = (torch.randn(tokens, kv_heads, dim, device=device, generator=gen) * 3).to(dtype)
        v = torch.randn(tokens, kv_heads, dim, device=device, generator=gen).to(dtype)
        slots = torch.randperm(8 * block, device=device)[:tokens]
        slots[3] = -1
        caches = []
        for write in (ta.write_kv, write_kv_cache):
            c = torch.zeros(8, block, kv_heads, dim, device=device).to(fmt.storage)
            cv = torch.zeros_like(c)
            ks, vs = scale_pairs(8, kv_heads, block, device=device).zero_()
            write(k, v, c, cv, slots, ks, vs)
            caches.append((c, cv, ks, vs))
        (tc, tcv, tks, tvs), (rc, rcv, rks, rvs) = caches
        code_diff = max((tc.float() - rc.float()).abs().max().item(), (tcv.float() - rcv.float()).abs().max().item())
        scale_err = max(kb.rel_err(tks.float(), rks.float()), kb.rel_err(tvs.float(), rvs.float()))
        step = 1.0 if name == "int8" else 32.0     # e4m3: one step near 448 is 32
        results.append(dict(check=f"write_kv {name}", max_code_diff=code_diff, scale_rel_err=scale_err,
                            ok=code_diff <= step and scale_err < 1e-3))
        print(results[-1], flush=True)
        attention_checks(name, fmt.storage, heads, kv_heads, dim, dtype, device, quick, gen, results)


def attention_checks(name, storage, heads, kv_heads, dim, dtype, device, quick, gen, results):
    """Triton attention over a cache against the torch reference over the same
    codes and scales: mixed decode / prefill, GQA, with and without a window;
    the decode rows again through 4 flash-decoding splits; magnitudes at the
    edges of fp16 (queries near 3,000, values near 1e-4: scales far below one);
    and blocks of 64 keys, larger than the first variant's 32-key tiles."""
    first_row = len(results)
    cases = [(48, 1.0, 1.0, 16), (None, 1000.0, 1e-4, 16), (24, 1.0, 1.0, 64)]
    cases += [] if quick else [(None, 1.0, 1.0, 16)]
    for window, q_mult, v_mult, block in cases:
        query_lens = [1, 1, 17, 1, 70] if quick else [1] * 6 + [33, 200, 1]
        seq_lens = [40, 300, 17, 129, 150] if quick else [1000, 77, 4100, 16, 900, 2000, 33, 1500, 64]
        meta = kb.make_batch(query_lens, seq_lens, block, device)
        cache = quant_cache(int(meta.block_tables.max()) + 1, block, kv_heads, dim, storage, device, gen, v_mult)
        q = (torch.randn(sum(query_lens), heads, dim, device=device, generator=gen) * q_mult).to(dtype)
        ref = paged_attention(q.float(), cache.k, cache.v, meta, dim ** -0.5, window, cache.k_scale, cache.v_scale)
        got = ta.TritonAttention().attend(q, cache, meta, dim ** -0.5, window)
        label = f"{name} window={window} q x{q_mult:g} v x{v_mult:g} block {block}"
        err = kb.rel_err(got, ref)
        results.append(dict(check=f"attention {label}", rel_err=err, ok=err < CHECK_TOLERANCE))
        rows = (meta.query_start_loc[:-1][torch.tensor(query_lens) == 1]).long()
        split = torch.full_like(q, float("nan"))
        ta.decode_attention(q, cache.k, cache.v, meta, dim ** -0.5, window, split, num_splits=4,
                            k_scale=cache.k_scale, v_scale=cache.v_scale)
        err = kb.rel_err(split[rows], ref[rows])
        results.append(dict(check=f"decode 4 splits {label}", rel_err=err, ok=err < CHECK_TOLERANCE))
        for i, variant in enumerate(CHECK_VARIANTS if device.type == "cuda" else CHECK_VARIANTS[:1 if window else 0]):
            got = torch.full_like(q, float("nan"))
            scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
            ta.decode_attention(q, cache.k, cache.v, meta, dim ** -0.5, window, got, **scales, **variant["decode"])
            ta.prefill_attention(q, cache.k, cache.v, meta, dim ** -0.5, window, got, **scales, **variant["prefill"])
            err = kb.rel_err(got, ref)
            results.append(dict(check=f"attention tiles {i} {label}", rel_err=err, ok=err < CHECK_TOLERANCE,
                                **variant))
    print(results[first_row:], flush=True)


# Tilings other than the defaults that the check also runs (the first on the
# CPU too, with a window): other tiles, stages, grid orders, more splits.
CHECK_VARIANTS = [dict(decode=dict(block_n=32, num_warps=4, num_stages=5, heads_inner=True),
                       prefill=dict(block_m=64, block_n=32, num_stages=5)),
                  dict(decode=dict(block_n=64, num_stages=5, programs_per_sm=16, max_splits=128, heads_inner=False),
                       prefill=dict(block_m=128, block_n=64, num_warps=8, num_stages=5)),
                  dict(decode=dict(block_n=128, num_stages=5, programs_per_sm=4),
                       prefill=dict(block_m=64, block_n=64, num_warps=4, num_stages=5))]


# --------------------------------------------------------------------------- kernels

class Pool:
    """Caches of one format for the decode timings; batches take disjoint blocks."""

    def __init__(self, storage, max_tokens, block_size, device):
        self.block_size, self.device, self.storage = block_size, device, storage
        self.num_blocks = max_tokens // block_size
        self.cache = quant_cache(self.num_blocks, block_size, CFG["num_kv_heads"], CFG["head_dim"], storage, device)
        self.gen = torch.Generator().manual_seed(1)

    def metas(self, batch, ctx):
        per = batch * triton.cdiv(ctx, self.block_size)
        count = max(1, min(triton.cdiv(kb.ROTATE_BYTES, batch * ctx * cache_bytes_per_token(self.storage)),
                           self.num_blocks // per))
        return [kb.make_batch([1] * batch, [ctx] * batch, self.block_size, self.device,
                              first_block=i * per, num_blocks=per, gen=self.gen) for i in range(count)]

    def reference(self, q, meta):
        """The torch reference's output for ``q`` over batch ``meta`` (fp32)."""
        c = self.cache
        return paged_attention(q.float(), c.k, c.v, meta, CFG["head_dim"] ** -0.5, None, c.k_scale, c.v_scale)


def time_decode(pool, batch, ctx, copy_bw, module=ta, **kwargs):
    """One layer's decode attention (graph replays) by ``module`` (``triton_attention``
    or a ``--baseline`` revision of it); ``kwargs``: tiling overrides. The last
    batch's output is checked against the torch reference (``rel_err``)."""
    metas = pool.metas(batch, ctx)
    q = torch.randn(batch, CFG["num_heads"], CFG["head_dim"], dtype=torch.bfloat16, device=pool.device,
                    generator=torch.Generator(pool.device).manual_seed(batch))
    out = torch.full_like(q, float("nan"))
    c = pool.cache
    calls = [lambda m=m: module.decode_attention(q, c.k, c.v, m, CFG["head_dim"] ** -0.5, None, out,
                                                 k_scale=c.k_scale, v_scale=c.v_scale, **kwargs) for m in metas]
    ms = kb.bench_graph(calls)
    read = (batch * ctx * cache_bytes_per_token(pool.storage) + batch * triton.cdiv(ctx, pool.block_size) * 4
            + 2 * q.numel() * 2)
    return dict(batch=batch, ctx=ctx, us=ms * 1e3, GBps=read / (ms * 1e-3) / 1e9,
                frac_copy_bw=read / (ms * 1e-3) / 1e9 / copy_bw, rel_err=kb.rel_err(out, pool.reference(q, metas[-1])),
                **kwargs)


def time_prefill(storage, device, batch=8, q_len=2048, module=ta, **tiling):
    """Causal prefill of ``batch`` sequences of ``q_len`` tokens; the output of
    the first sequence is checked against the torch reference (``rel_err``)."""
    meta = kb.make_batch([q_len] * batch, [q_len] * batch, 16, device)
    cache = quant_cache(batch * q_len // 16, 16, CFG["num_kv_heads"], CFG["head_dim"], storage, device,
                        torch.Generator(device).manual_seed(2))
    q = torch.randn(batch * q_len, CFG["num_heads"], CFG["head_dim"], dtype=torch.bfloat16, device=device,
                    generator=torch.Generator(device).manual_seed(3))
    out = torch.full_like(q, float("nan"))
    ms = kb.bench(lambda: module.prefill_attention(q, cache.k, cache.v, meta, CFG["head_dim"] ** -0.5, None, out,
                                                   k_scale=cache.k_scale, v_scale=cache.v_scale, **tiling))
    first = kb.make_batch([q_len], [q_len], 16, device)
    first.block_tables = meta.block_tables[:1]
    ref = paged_attention(q[:q_len].float(), cache.k, cache.v, first, CFG["head_dim"] ** -0.5, None,
                          cache.k_scale, cache.v_scale)
    flops = 4 * CFG["head_dim"] * CFG["num_heads"] * batch * q_len * (q_len + 1) / 2
    return dict(batch=batch, q_len=q_len, ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12,
                rel_err=kb.rel_err(out[:q_len], ref), **tiling)


def best_of(rows, kernel, configs, run, key):
    """Time ``run(**config)`` for each config (a failure, e.g. out of shared
    memory, or an output off the reference, is recorded); the best config by
    ``key(row)`` (lower is better) among those within ``CHECK_TOLERANCE``."""
    timed = []
    for config in configs:
        try:
            row = dict(kernel=kernel, **run(**config))
            if row["rel_err"] < CHECK_TOLERANCE:
                timed.append((key(row), config))
        except Exception as exc:
            row = dict(kernel=kernel, **config, error=repr(exc)[:200])
        rows.append(row)
        print(row, flush=True)
        SAVE[0]()
    return min(timed, key=lambda r: r[0])[1]


# int8 decode at 64 x 4k: tiles, warps, stages, programs per SM (the grid order
# and the batch-1 split limit are swept after, from the best of these). Triton
# 3.6 double-buffers the code tiles from 5 stages on (fewer: one buffer, each
# tile's copies waited out before its math).
DECODE_SWEEP = [dict(block_n=bn, num_warps=w, num_stages=st, programs_per_sm=pp)
                for bn, w, st, pps in ((128, 4, 3, (8,)), (128, 4, 5, (4, 8)), (64, 4, 3, (4, 8)),
                                       (64, 4, 5, (4, 8, 16)), (32, 4, 5, (8, 16)), (64, 2, 5, (4, 8, 16)),
                                       (32, 1, 5, (8,)))
                for pp in pps]
BF16_DECODE_SWEEP = [dict(block_n=bn, num_warps=4, num_stages=st, programs_per_sm=pp)
                     for bn, st, pp in ((64, 3, 4), (64, 5, 4), (32, 5, 8))]
PREFILL_SWEEP = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                 for bm, bn, w, st in ((128, 64, 4, 3), (128, 64, 8, 4), (128, 64, 8, 5), (64, 64, 4, 5),
                                       (64, 32, 4, 5), (128, 32, 8, 5))]


def tune(pools, copy_bw, device, results, sweeps):
    """Decode at 64 x 4k over ``sweeps["int8"]`` / ``sweeps["bf16"]`` (default
    ``DECODE_SWEEP`` / ``BF16_DECODE_SWEEP``), then the grid order, then batch
    1 x 32k over the split limit; int8 prefill 8 x 2k over ``sweeps["prefill"]``
    (``PREFILL_SWEEP``); an empty list skips its part. Sets ``ta.QUANT_DECODE``,
    ``ta.DECODE`` and ``ta.QUANT_PREFILL`` for the rest of the run."""
    for name, defaults in (("int8", ta.QUANT_DECODE), ("bf16", ta.DECODE)):
        sweep, pool = sweeps[name], pools[name]
        if not sweep:
            continue
        run = lambda b, c: lambda **t: time_decode(pool, b, c, copy_bw, **t)   # noqa: E731
        defaults.update(best_of(results, f"sweep {name}", sweep, run(64, 4096), lambda r: r["us"]))
        defaults.update(best_of(results, f"sweep {name} grid order", [dict(heads_inner=h) for h in (False, True)],
                                run(64, 4096), lambda r: r["us"]))
        defaults.update(best_of(results, f"sweep {name} batch 1", [dict(max_splits=m) for m in (32, 64, 128)],
                                run(1, 32768), lambda r: r["us"]))
    if sweeps["prefill"]:
        ta.QUANT_PREFILL.update(best_of(results, "sweep prefill int8", sweeps["prefill"],
                                        lambda **t: time_prefill(torch.int8, device, **t), lambda r: -r["TFLOPs"]))
    results.append(dict(kernel="tuned", decode=dict(ta.QUANT_DECODE), bf16_decode=dict(ta.DECODE),
                        prefill=dict(ta.QUANT_PREFILL)))
    print(results[-1], flush=True)
    SAVE[0]()


def kernels(device, copy_bw, results, sweeps, baseline):
    """Decode at 64 x 4k, 256 x 2k and 1 x 32k and prefill 8 x 2k for each cache
    format, with the tuned tiles and, given a ``baseline`` module, with its own
    defaults in the same run."""
    pools = {name: Pool(storage, 64 * 4096 * 3, 16, device)
             for name, storage in (("int8", torch.int8), ("bf16", None), ("fp8", torch.float8_e4m3fn))}
    if sweeps:
        tune(pools, copy_bw, device, results, sweeps)
    modules = [("", ta)] + ([("baseline ", baseline)] if baseline else [])
    for label, module in modules:
        for name, pool in pools.items():
            for batch, ctx in ((64, 4096), (256, 2048), (1, 32768)):
                results.append(dict(kernel=f"{label}decode {name}",
                                    **time_decode(pool, batch, ctx, copy_bw, module=module)))
                print(results[-1], flush=True)
                SAVE[0]()
    del pools
    torch.cuda.empty_cache()
    for label, module in modules:
        for name, storage in (("bf16", None), ("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
            results.append(dict(kernel=f"{label}prefill {name}", **time_prefill(storage, device, module=module)))
            print(results[-1], flush=True)
            SAVE[0]()


# --------------------------------------------------------------------------- engine

ENGINE_WORKLOADS = ("decode", "kv-prefill", "kv-decode")


def engine_runs(results, dtypes, names=ENGINE_WORKLOADS, weights=("none",)):
    """Each workload for each KV dtype, over each weight format in ``weights`` (the
    64 x 4k decode step reads the weights beside the cache, so their format sets
    how much of the step the cache's bytes are)."""
    from pagellm import LLM, SamplingParams
    from pagellm.bench.runner import run_requests

    def run(kv, quantization, label, memory, lens, out_len, max_seqs, full_batch):
        # full_batch: prompts take the whole step budget even beside decodes (so all are admitted early;
        # mixed-step graphs kept at 512 tokens), and decode_tok_s counts only the steps that decode all
        # max_seqs sequences
        llm = LLM("llama-3-8b", random_weights=True, kv_cache_dtype=kv, kv_cache_memory=memory,
                  quantization=quantization,
                  max_model_len=max(lens) + out_len + 16, max_num_seqs=max_seqs,
                  **(dict(max_prefill_tokens_with_decodes=8192, cuda_graph_max_tokens=512) if full_batch else {}))
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 120000) for _ in range(n)] for n in lens]
        params = [SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)] * len(prompts)
        r = run_requests(llm.engine, prompts, params, label, record_kv=False)
        decode = [s for s in r.steps if s.decode_only and s.clean and (not full_batch or s.num_seqs == max_seqs)]
        row = dict(workload=label, kv_cache_dtype=kv, quantization=quantization, kv_tokens=llm.engine.memory.kv_tokens,
                   output_tok_s=sum(r.num_output.values()) / r.duration(), seconds=r.duration(),
                   decode_tok_s=sum(s.num_tokens for s in decode) / max(sum(s.seconds for s in decode), 1e-9),
                   decode_steps=len(decode), max_running=max(s.num_seqs for s in r.steps))
        del llm, r
        gc.collect()
        torch.cuda.empty_cache()
        return row

    workloads = [("decode 64 x 4096", "36GiB", [4096] * 64, 128, 64, dtypes, True),
                 ("kv-limited 384 x 1536+128, 8 GiB pool", "8GiB", [1536] * 384, 128, 256, dtypes[:2], False),
                 ("kv-limited 256 x 1024+256, 4 GiB pool", "4GiB", [1024] * 256, 256, 256, dtypes[:2], False)]
    for (label, memory, lens, out_len, max_seqs, kinds, full_batch), name in zip(workloads, ENGINE_WORKLOADS):
        if name not in names:
            continue
        for quantization in weights:
            for kv in kinds:
                results.append(run(kv, quantization, label, memory, lens, out_len, max_seqs, full_batch))
                print(results[-1], flush=True)
                SAVE[0]()


def decode_tilings(text):
    return [dict(zip(("block_n", "num_warps", "num_stages", "programs_per_sm", "maxnreg"), map(int, t.split(":"))))
            for t in text.split(",") if t]


def prefill_tilings(text):
    return [dict(zip(("block_m", "block_n", "num_warps", "num_stages"), map(int, t.split(":"))))
            for t in text.split(",") if t]


def load_module(path):
    """A Python file as a module of its own (an older ``triton_attention``)."""
    spec = importlib.util.spec_from_file_location("baseline_triton_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default="check,kernels,sweep,engine")
    parser.add_argument("--engine-dtypes", default="auto,int8")
    parser.add_argument("--engine-workloads", default=",".join(ENGINE_WORKLOADS))
    parser.add_argument("--engine-weights", default="none", help="weight formats of the engine runs, e.g. none,int8")
    parser.add_argument("--sweep-int8", type=decode_tilings, default=DECODE_SWEEP,
                        help="int8 decode tilings to sweep, BLOCK_N:WARPS:STAGES:PROGRAMS_PER_SM[:MAXNREG],...")
    parser.add_argument("--sweep-bf16", type=decode_tilings, default=BF16_DECODE_SWEEP)
    parser.add_argument("--sweep-prefill", type=prefill_tilings, default=PREFILL_SWEEP,
                        help="int8 prefill tilings to sweep, BLOCK_M:BLOCK_N:WARPS:STAGES,...")
    parser.add_argument("--baseline", help="a triton_attention.py of another revision, timed beside this one "
                                           "with its own defaults (git show REV:pagellm/kernels/triton_attention.py)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    sections = args.sections.split(",")
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  versions=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()),
                  command="PYTHONPATH=. python3 benchmarks/kv_quant_gpu.py " + " ".join(sys.argv[1:]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), figures={})

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "kv_quant_gpu.json"), "w") as f:
                json.dump(report, f, indent=1)

    def section(name, fn, *a):
        rows = report["figures"].setdefault(name, [])
        start = time.perf_counter()
        try:
            fn(*a, rows)
        except Exception:
            rows.append(dict(error=traceback.format_exc()[-2000:]))
            print(rows[-1]["error"], flush=True)
        report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
        save()

    SAVE[0] = save
    if "check" in sections:
        section("check", check, device, device.type == "cpu")
    if device.type == "cuda":
        report["copy_GBps"] = measure_copy_bandwidth(device, 2**31)["bandwidth"] / 1e9
        if "kernels" in sections:
            baseline = load_module(args.baseline) if args.baseline else None
            sweeps = dict(int8=args.sweep_int8, bf16=args.sweep_bf16, prefill=args.sweep_prefill)
            section("kernels", lambda rows: kernels(device, report["copy_GBps"], rows,
                                                    sweeps if "sweep" in sections else None, baseline))
        if "engine" in sections:
            section("engine", lambda rows: engine_runs(rows, args.engine_dtypes.split(","),
                                                       args.engine_workloads.split(","),
                                                       args.engine_weights.split(",")))
    save()
    print("\n=== summary ===")
    for row in report["figures"].get("check", []):
        print(row)
    kern = report["figures"].get("kernels", [])
    base = {(r["batch"], r["ctx"]): r["us"] for r in kern if r.get("kernel") == "decode bf16"}
    for r in kern:
        if "decode" in r.get("kernel", "") and "us" in r:
            print(f"{r['kernel']:24} {r['batch']:4} x {r['ctx']:6}: {r['us']:8.1f} us  {r['GBps']:7.0f} GB/s "
                  f"{r['frac_copy_bw']:.2f} of copy  {base.get((r['batch'], r['ctx']), 0) / r['us']:.2f}x bf16  "
                  f"err {r['rel_err']:.1e}  {({k: r[k] for k in ta.QUANT_DECODE if k in r})}")
        elif "prefill" in r.get("kernel", "") and "TFLOPs" in r:
            print(f"{r['kernel']:24} {r['TFLOPs']:.0f} TFLOP/s  err {r['rel_err']:.1e}  "
                  f"{({k: r[k] for k in ta.QUANT_PREFILL if k in r})}")
    print("tuned:", ta.QUANT_DECODE, ta.DECODE, ta.QUANT_PREFILL)
    for r in report["figures"].get("engine", []):
        print(r)
    print(f"copy bandwidth {report.get('copy_GBps', 0):.0f} GB/s")


if __name__ == "__main__":
    main()
