"""Check and time the quantized KV cache's Triton kernels (int8, fp8) against
the bf16 cache, on one CUDA device, in one call; the table is printed last.

    PYTHONPATH=. python3 benchmarks/kv_quant_gpu.py --out $OUT [--sections check,kernels,sweep,engine]

Without a GPU, Triton's interpreter runs the checks on small fp16 int8 cases::

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kv_quant_gpu.py --device cpu --sections check

* check: the write kernel against ``kv_quant.quantize`` (scales equal, codes
  within one step), and decode + prefill attention over a quantized cache
  against the torch reference (``paged_attention`` in fp32 over the same codes
  and scales), mixed batches, GQA, a sliding window.
* kernels: paged decode attention per layer (Llama-3-8B heads), batch 64 x 4k
  and 256 x 2k, bf16 vs int8 vs fp8, as CUDA-graph replays over batches whose
  K/V do not fit in L2; bandwidth counts the bytes the kernel reads (codes +
  scales + block tables + q) against the measured copy bandwidth. Prefill
  8 x 2048 TFLOP/s.
* sweep: int8 decode at 64 x 4k: load order, operand order and packed (int16)
  loads, then tile sizes, warps, stages and programs per SM around the best.
* engine: random Llama-3-8B, bf16 weights. (a) decode at batch 64 with 4,096-
  token prompts: decode-only steps' tokens/s; (b) the KV pool as the limit: 384
  requests of 1,536-token prompts + 128 output tokens in an 8 GiB pool, output
  tokens/s.
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
from pagellm.kernels.kv_quant import KV_FORMATS, SCALE_DTYPE, quantize  # noqa: E402
from pagellm.kernels.torch_attention import paged_attention, write_kv_cache  # noqa: E402

CFG = kb.LLAMA3_8B
SAVE = [lambda: None]    # main's save(): called after every row, so a run cut short keeps what it measured


def quant_cache(num_blocks, block_size, kv_heads, head_dim, storage, device, gen=None):
    """A cache of random K/V with a few large key channels (as real keys have), quantized."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, device=device, generator=gen)
    k[..., :4] *= 20
    v = torch.randn(shape, device=device, generator=gen)
    if storage is None:
        return LayerKVCache(k.to(torch.bfloat16), v.to(torch.bfloat16))
    fmt = next(f for f in KV_FORMATS.values() if f.storage == storage)
    (kc, ks), (vc, vs) = quantize(k, fmt), quantize(v, fmt)
    # scales are [blocks, heads, block_size]
    return LayerKVCache(kc, vc, ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous())


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
            ks = torch.zeros(8, kv_heads, block, dtype=SCALE_DTYPE, device=device)
            vs = torch.zeros_like(ks)
            write(k, v, c, cv, slots, ks, vs)
            caches.append((c, cv, ks, vs))
        (tc, tcv, tks, tvs), (rc, rcv, rks, rvs) = caches
        code_diff = max((tc.float() - rc.float()).abs().max().item(), (tcv.float() - rcv.float()).abs().max().item())
        scale_err = max(kb.rel_err(tks.float(), rks.float()), kb.rel_err(tvs.float(), rvs.float()))
        step = 1.0 if name == "int8" else 32.0     # e4m3: one step near 448 is 32
        results.append(dict(check=f"write_kv {name}", max_code_diff=code_diff, scale_rel_err=scale_err,
                            ok=code_diff <= step and scale_err < 1e-3))
        # attention: mixed decode / prefill, GQA, with and without a window
        for window in (None, 48):
            query_lens = [1, 1, 17, 1, 70] if quick else [1] * 6 + [33, 200, 1]
            seq_lens = [40, 300, 17, 129, 150] if quick else [1000, 77, 4100, 16, 900, 2000, 33, 1500, 64]
            meta = kb.make_batch(query_lens, seq_lens, block, device)
            cache = quant_cache(int(meta.block_tables.max()) + 1, block, kv_heads, dim, fmt.storage, device, gen)
            q = torch.randn(sum(query_lens), heads, dim, device=device, generator=gen).to(dtype)
            ref = paged_attention(q.float(), cache.k, cache.v, meta, dim ** -0.5, window, cache.k_scale,
                                  cache.v_scale)
            got = ta.TritonAttention().attend(q, cache, meta, dim ** -0.5, window)
            err = kb.rel_err(got, ref)
            results.append(dict(check=f"attention {name} window={window}", rel_err=err, ok=err < 1e-2))
            # the packed decode loads (two codes an int16), on the decode rows
            rows = (meta.query_start_loc[:-1][torch.tensor(query_lens) == 1]).long()
            packed = torch.full_like(q, float("nan"))
            ta.decode_attention(q, cache.k, cache.v, meta, dim ** -0.5, window, packed, k_scale=cache.k_scale,
                                v_scale=cache.v_scale, packed=True)
            err = kb.rel_err(packed[rows], ref[rows])
            results.append(dict(check=f"packed decode {name} window={window}", rel_err=err, ok=err < 1e-2))
        print(results[-5:], flush=True)


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


def time_prefill(storage, device, batch=8, q_len=2048):
    meta = kb.make_batch([q_len] * batch, [q_len] * batch, 16, device)
    cache = quant_cache(batch * q_len // 16, 16, CFG["num_kv_heads"], CFG["head_dim"], storage, device)
    q = torch.randn(batch * q_len, CFG["num_heads"], CFG["head_dim"], dtype=torch.bfloat16, device=device)
    ms = kb.bench(lambda: ta.TritonAttention().attend(q, cache, meta, CFG["head_dim"] ** -0.5, None))
    flops = 4 * CFG["head_dim"] * CFG["num_heads"] * batch * q_len * (q_len + 1) / 2
    return dict(batch=batch, q_len=q_len, ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12)


def tune(pool, copy_bw, results):
    """int8 decode at 64 x 4k: the tile's load order and operand order, then tiles,
    warps, stages and programs per SM around the best; sets ``ta.QUANT_DECODE``."""
    def timed(**t):
        try:
            row = dict(kernel="sweep int8", **time_decode(pool, 64, 4096, copy_bw, **t))
        except Exception as exc:   # e.g. out of shared memory
            row = dict(kernel="sweep int8", **t, error=repr(exc)[:200])
        results.append(row)
        return row.get("us", float("inf"))

    best = min(((timed(**(ta.QUANT_DECODE | dict(v_early=ve, k_as_a=ka, packed=pk))),
                 dict(v_early=ve, k_as_a=ka, packed=pk))
                for ve in (False, True) for ka in (False, True) for pk in (False, True)), key=lambda r: r[0])[1]
    grid = [dict(block_n=bn, num_warps=w, num_stages=st, programs_per_sm=pp)
            for bn in (64, 128) for w in (4, 8) for st in (2, 3) for pp in (4, 8, 16)]
    us, tiling = min(((timed(**(best | g)), g) for g in grid), key=lambda r: r[0])
    ta.QUANT_DECODE.update(best | tiling)
    results.append(dict(kernel="tuned", us=us, **ta.QUANT_DECODE))
    print(results[-1], flush=True)
    SAVE[0]()


def kernels(device, copy_bw, results, sweep):
    pools = {name: Pool(storage, 64 * 4096 * 3, 16, device)
             for name, storage in (("int8", torch.int8), ("bf16", None), ("fp8", torch.float8_e4m3fn))}
    if sweep:
        tune(pools["int8"], copy_bw, results)
    for name, pool in pools.items():
        for batch, ctx in ((64, 4096), (256, 2048), (1, 32768)):
            results.append(dict(kernel=f"decode {name}", **time_decode(pool, batch, ctx, copy_bw)))
            print(results[-1], flush=True)
            SAVE[0]()
    del pools
    torch.cuda.empty_cache()
    for name, storage in (("bf16", None), ("int8", torch.int8)):
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

    for kv in dtypes:
        results.append(run(kv, "decode 64 x 4096", "36GiB", [4096] * 64, 64, 64))
        print(results[-1], flush=True)
        SAVE[0]()
    for kv in dtypes[:2]:
        results.append(run(kv, "kv-limited 384 x 1536+128, 8 GiB pool", "8GiB", [1536] * 384, 128, 256))
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
    print("tuned:", ta.QUANT_DECODE)
    for r in report["figures"].get("engine", []):
        print(r)
    print(f"copy bandwidth {report.get('copy_GBps', 0):.0f} GB/s")


if __name__ == "__main__":
    main()
