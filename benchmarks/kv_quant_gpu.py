"""Check and time the quantized KV cache's Triton kernels (int8, fp8) against
the bf16 cache, on one CUDA device, in one call; the table is printed last.

    PYTHONPATH=. python3 benchmarks/kv_quant_gpu.py --out $OUT [--sections check,kernels,sweep,engine]

Without a GPU, Triton's interpreter runs the checks on small fp16 int8 cases::

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kv_quant_gpu.py --device cpu --sections check

* check: the write kernel against ``kv_quant.quantize`` (scales equal, codes
  within one step), and decode + prefill attention over a bf16, int8 and fp8
  cache against the torch reference (``paged_attention`` in fp32 over the same
  codes and scales), mixed batches, GQA, a sliding window, forced decode
  splits, and queries and values at the edges of fp16's range.
* kernels: paged decode attention per layer (Llama-3-8B heads), batch 64 x 4k
  and 256 x 2k, bf16 vs int8 vs fp8, as CUDA-graph replays over batches whose
  K/V do not fit in L2; bandwidth counts the bytes the kernel reads (codes +
  scales + block tables + q) against the measured copy bandwidth. Prefill
  8 x 2048 TFLOP/s, bf16, int8, fp8.
* sweep: int8 decode at 64 x 4k over tile sizes, warps, stages and programs
  per SM; int8 prefill 8 x 2k over tiles, warps and stages. The best become
  ``QUANT_DECODE`` / ``QUANT_PREFILL`` for the rest of the run (engine too).
* engine: random Llama-3-8B, bf16 weights. (a) decode at batch 64 with 4,096-
  token prompts: decode-only steps' tokens/s; (b) the KV pool as the limit: 384
  requests of 1,536-token prompts + 128 output tokens in an 8 GiB pool, output
  tokens/s (prefill-heavy: 12 prompt tokens an output token); (c) the same kind
  of limit with more decoding: 256 requests of 1,024 + 256 tokens, 4 GiB.
"""
from __future__ import annotations

import argparse
import datetime
import gc
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
    the decode rows again through 4 flash-decoding splits; and magnitudes at the
    edges of fp16 (queries near 3,000, values near 1e-4: scales far below one)."""
    block = 16
    cases = [(48, 1.0, 1.0), (None, 1000.0, 1e-4)] + ([] if quick else [(None, 1.0, 1.0)])
    for window, q_mult, v_mult in cases:
        query_lens = [1, 1, 17, 1, 70] if quick else [1] * 6 + [33, 200, 1]
        seq_lens = [40, 300, 17, 129, 150] if quick else [1000, 77, 4100, 16, 900, 2000, 33, 1500, 64]
        meta = kb.make_batch(query_lens, seq_lens, block, device)
        cache = quant_cache(int(meta.block_tables.max()) + 1, block, kv_heads, dim, storage, device, gen, v_mult)
        q = (torch.randn(sum(query_lens), heads, dim, device=device, generator=gen) * q_mult).to(dtype)
        ref = paged_attention(q.float(), cache.k, cache.v, meta, dim ** -0.5, window, cache.k_scale, cache.v_scale)
        got = ta.TritonAttention().attend(q, cache, meta, dim ** -0.5, window)
        label = f"{name} window={window} q x{q_mult:g} v x{v_mult:g}"
        err = kb.rel_err(got, ref)
        results.append(dict(check=f"attention {label}", rel_err=err, ok=err < 1e-2))
        rows = (meta.query_start_loc[:-1][torch.tensor(query_lens) == 1]).long()
        split = torch.full_like(q, float("nan"))
        ta.decode_attention(q, cache.k, cache.v, meta, dim ** -0.5, window, split, num_splits=4,
                            k_scale=cache.k_scale, v_scale=cache.v_scale)
        err = kb.rel_err(split[rows], ref[rows])
        results.append(dict(check=f"decode 4 splits {label}", rel_err=err, ok=err < 1e-2))
    print(results[-2 * len(cases):], flush=True)


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


def time_decode(pool, batch, ctx, copy_bw, **kwargs):
    """One layer's decode attention (graph replays); ``kwargs``: tiling overrides."""
    metas = pool.metas(batch, ctx)
    q = torch.randn(batch, CFG["num_heads"], CFG["head_dim"], dtype=torch.bfloat16, device=pool.device)
    out = torch.empty_like(q)
    c = pool.cache
    calls = [lambda m=m: ta.decode_attention(q, c.k, c.v, m, CFG["head_dim"] ** -0.5, None, out,
                                             k_scale=c.k_scale, v_scale=c.v_scale, **kwargs) for m in metas]
    ms = kb.bench_graph(calls)
    read = (batch * ctx * cache_bytes_per_token(pool.storage) + batch * triton.cdiv(ctx, pool.block_size) * 4
            + 2 * q.numel() * 2)
    return dict(batch=batch, ctx=ctx, us=ms * 1e3, GBps=read / (ms * 1e-3) / 1e9,
                frac_copy_bw=read / (ms * 1e-3) / 1e9 / copy_bw, **kwargs)


def time_prefill(storage, device, batch=8, q_len=2048, **tiling):
    meta = kb.make_batch([q_len] * batch, [q_len] * batch, 16, device)
    cache = quant_cache(batch * q_len // 16, 16, CFG["num_kv_heads"], CFG["head_dim"], storage, device)
    q = torch.randn(batch * q_len, CFG["num_heads"], CFG["head_dim"], dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    ms = kb.bench(lambda: ta.prefill_attention(q, cache.k, cache.v, meta, CFG["head_dim"] ** -0.5, None, out,
                                               k_scale=cache.k_scale, v_scale=cache.v_scale, **tiling))
    flops = 4 * CFG["head_dim"] * CFG["num_heads"] * batch * q_len * (q_len + 1) / 2
    return dict(batch=batch, q_len=q_len, ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12, **tiling)


def best_of(rows, kernel, configs, run, key):
    """Time ``run(**config)`` for each config (a failure, e.g. out of shared
    memory, is recorded); the best config by ``key(row)`` (lower is better)."""
    timed = []
    for config in configs:
        try:
            row = dict(kernel=kernel, **run(**config))
            timed.append((key(row), config))
        except Exception as exc:
            row = dict(kernel=kernel, **config, error=repr(exc)[:200])
        rows.append(row)
        print(row, flush=True)
    return min(timed, key=lambda r: r[0])[1]


def tune(pool, copy_bw, device, results):
    """int8 decode at 64 x 4k over tiles, warps, stages and programs per SM, and
    int8 prefill 8 x 2k over tiles, warps and stages; sets ``ta.QUANT_DECODE``
    and ``ta.QUANT_PREFILL`` for the rest of the run."""
    decode = [dict(block_n=bn, num_warps=w, num_stages=st, programs_per_sm=pp)
              for bn in (64, 128) for w in (4, 8) for st in (2, 3) for pp in (4, 8, 16)]
    ta.QUANT_DECODE.update(best_of(results, "sweep int8", decode,
                                   lambda **t: time_decode(pool, 64, 4096, copy_bw, **t), lambda r: r["us"]))
    prefill = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
               for bm, bn, w, st in ((128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
                                     (64, 64, 4, 3), (128, 128, 8, 3))]
    ta.QUANT_PREFILL.update(best_of(results, "sweep prefill int8", prefill,
                                    lambda **t: time_prefill(torch.int8, device, **t), lambda r: -r["TFLOPs"]))
    results.append(dict(kernel="tuned", decode=dict(ta.QUANT_DECODE), prefill=dict(ta.QUANT_PREFILL)))
    print(results[-1], flush=True)
    SAVE[0]()


def kernels(device, copy_bw, results, sweep):
    pools = {name: Pool(storage, 64 * 4096 * 3, 16, device)
             for name, storage in (("int8", torch.int8), ("bf16", None), ("fp8", torch.float8_e4m3fn))}
    if sweep:
        tune(pools["int8"], copy_bw, device, results)
    for name, pool in pools.items():
        for batch, ctx in ((64, 4096), (256, 2048), (1, 32768)):
            results.append(dict(kernel=f"decode {name}", **time_decode(pool, batch, ctx, copy_bw)))
            print(results[-1], flush=True)
            SAVE[0]()
    del pools
    torch.cuda.empty_cache()
    for name, storage in (("bf16", None), ("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        results.append(dict(kernel=f"prefill {name}", **time_prefill(storage, device)))
        print(results[-1], flush=True)


# --------------------------------------------------------------------------- engine

def engine_runs(results, dtypes):
    from pagellm import LLM, SamplingParams
    from pagellm.bench.runner import run_requests

    def run(kv, label, memory, lens, out_len, max_seqs):
        llm = LLM("llama-3-8b", random_weights=True, kv_cache_dtype=kv, kv_cache_memory=memory,
                  max_model_len=max(lens) + out_len + 16, max_num_seqs=max_seqs)
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 120000) for _ in range(n)] for n in lens]
        params = [SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)] * len(prompts)
        r = run_requests(llm.engine, prompts, params, label, record_kv=False)
        decode = [s for s in r.steps if s.decode_only and s.clean]
        row = dict(workload=label, kv_cache_dtype=kv, kv_tokens=llm.engine.memory.kv_tokens,
                   output_tok_s=sum(r.num_output.values()) / r.duration(), seconds=r.duration(),
                   decode_tok_s=sum(s.num_tokens for s in decode) / max(sum(s.seconds for s in decode), 1e-9),
                   decode_steps=len(decode), max_running=max(s.num_seqs for s in r.steps))
        del llm, r
        gc.collect()
        torch.cuda.empty_cache()
        return row

    workloads = [("decode 64 x 4096", "36GiB", [4096] * 64, 64, 64, dtypes),
                 ("kv-limited 384 x 1536+128, 8 GiB pool", "8GiB", [1536] * 384, 128, 256, dtypes[:2]),
                 ("kv-limited 256 x 1024+256, 4 GiB pool", "4GiB", [1024] * 256, 256, 256, dtypes[:2])]
    for label, memory, lens, out_len, max_seqs, kinds in workloads:
        for kv in kinds:
            results.append(run(kv, label, memory, lens, out_len, max_seqs))
            print(results[-1], flush=True)
            SAVE[0]()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default="check,kernels,sweep,engine")
    parser.add_argument("--engine-dtypes", default="auto,int8")
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
            section("kernels", lambda rows: kernels(device, report["copy_GBps"], rows, "sweep" in sections))
        if "engine" in sections:
            section("engine", lambda rows: engine_runs(rows, args.engine_dtypes.split(",")))
    save()
    print("\n=== summary ===")
    for row in report["figures"].get("check", []):
        print(row)
    kern = report["figures"].get("kernels", [])
    base = {(r["batch"], r["ctx"]): r["us"] for r in kern if r.get("kernel") == "decode bf16"}
    for r in kern:
        if r.get("kernel", "").startswith("decode"):
            print(f"{r['kernel']:12} {r['batch']:4} x {r['ctx']:6}: {r['us']:8.1f} us  {r['GBps']:7.0f} GB/s "
                  f"{r['frac_copy_bw']:.2f} of copy  {base[(r['batch'], r['ctx'])] / r['us']:.2f}x bf16")
        elif r.get("kernel", "").startswith("prefill"):
            print(f"{r['kernel']:12} {r['TFLOPs']:.0f} TFLOP/s")
    sweep = sorted((r for r in kern if r.get("kernel") == "sweep int8" and "us" in r), key=lambda r: r["us"])
    for r in sweep[:6] + sweep[-2:]:
        print(f"sweep {({k: r.get(k) for k in ta.QUANT_DECODE})}: {r['us']:.1f} us {r['frac_copy_bw']:.2f} of copy")
    for r in kern:
        if r.get("kernel") == "sweep prefill int8" and "TFLOPs" in r:
            print(f"sweep prefill {({k: r.get(k) for k in ta.QUANT_PREFILL})}: {r['TFLOPs']:.0f} TFLOP/s")
    print("tuned:", ta.QUANT_DECODE, ta.QUANT_PREFILL)
    for r in report["figures"].get("engine", []):
        print(r)
    print(f"copy bandwidth {report.get('copy_GBps', 0):.0f} GB/s")


if __name__ == "__main__":
    main()
