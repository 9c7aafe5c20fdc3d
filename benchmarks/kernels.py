"""Check and time pagellm's Triton kernels against the torch references.

On a CUDA device (one call does everything; the table is printed last)::

    PYTHONPATH=. python3 benchmarks/kernels.py --out $OUT [--sections check,time,sweep]

Without a GPU, Triton's interpreter runs the checks on small fp16 cases (bf16
is not supported by the interpreter)::

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kernels.py --device cpu --quick

Checks compare every kernel with the torch reference evaluated in fp32
(``paged_attention`` and ``write_kv_cache`` of pagellm.kernels.torch_attention,
the op references below) by ||out - ref|| / ||ref||, on fresh random inputs,
with outputs poisoned with NaN first so unwritten elements fail. Timings use
``triton.testing.do_bench`` medians; decode attention is timed as CUDA-graph
replays over enough distinct batches (disjoint cache blocks) that the K/V read
by consecutive calls do not sit in L2, as in a real layer-by-layer decode step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

from pagellm.bench.stats import measure_copy_bandwidth
from pagellm.kernels import triton_attention as ta
from pagellm.kernels import triton_ops as ops
from pagellm.kernels.attention import AttentionMetadata, LayerKVCache
from pagellm.kernels.torch_attention import paged_attention, write_kv_cache

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
HEAD_CONFIGS = {"gqa1": (8, 8), "gqa4": (32, 8), "gqa8": (32, 4), "mqa": (16, 1), "gqa7": (14, 2)}
ROTATE_BYTES = 256 << 20          # K/V bytes touched between two calls on the same batch (> 5x L2)
LLAMA3_8B = dict(num_heads=32, num_kv_heads=8, head_dim=128)


# --------------------------------------------------------------------------- torch references for the ops

def rms_norm_ref(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rotary_ref(q, k, positions, cos_sin_cache):
    """NeoX rotate-half in fp32; returns new (q, k)."""
    half = cos_sin_cache.shape[1] // 2
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)

    def rotate(x):
        rot = x[..., :2 * half].float()
        x1, x2 = rot[..., :half], rot[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
        return torch.cat([out, x[..., 2 * half:]], dim=-1)
    return rotate(q), rotate(k)


def silu_and_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def cos_sin_cache(max_position, rotary_dim, device, theta=500000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


# --------------------------------------------------------------------------- helpers

def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_batch(query_lens, seq_lens, block_size, device, first_block=0, num_blocks=None, gen=None):
    """Metadata for sequences given (query_len, seq_len), their blocks drawn at random
    (without repeats) from ``first_block .. first_block + num_blocks - 1``."""
    blocks_per_seq = [triton.cdiv(s, block_size) for s in seq_lens]
    needed = sum(blocks_per_seq)
    num_blocks = num_blocks or needed
    assert num_blocks >= needed
    perm = (torch.randperm(num_blocks, generator=gen) + first_block)[:needed]
    table = torch.zeros(len(seq_lens), max(max(blocks_per_seq), 1), dtype=torch.int32)
    slots, at = [], 0
    for b, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        n = blocks_per_seq[b]
        table[b, :n] = perm[at:at + n]
        at += n
        for pos in range(s_len - q_len, s_len):
            slots.append(int(table[b, pos // block_size]) * block_size + pos % block_size)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0)
    return AttentionMetadata(
        query_start_loc=qsl.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- checks

class Checks:
    def __init__(self, device, quick):
        self.device, self.quick, self.results = device, quick, []
        self.gen = torch.Generator().manual_seed(0)

    def record(self, name, err, tol, **extra):
        ok = math.isfinite(err) and err <= tol
        self.results.append(dict(name=name, rel_err=err, tol=tol, ok=ok, **extra))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel_err={err:.2e} (tol {tol:.0e})"
              + "".join(f" {k}={v}" for k, v in extra.items()), flush=True)

    def guarded(self, name, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # record and go on: one broken case must not hide the others
            traceback.print_exc()
            self.results.append(dict(name=name, ok=False, error=f"{type(exc).__name__}: {exc}"))
            print(f"  FAIL {name}: {type(exc).__name__}: {exc}", flush=True)

    def rand_lens(self, n, low, high):
        return torch.randint(low, high + 1, (n,), generator=self.gen).tolist()

    # ---- attention
    def attention_case(self, name, dtype, heads, head_dim, block_size, window, query_lens, seq_lens,
                       splits=(None,)):
        num_heads, num_kv_heads = heads
        meta = make_batch(query_lens, seq_lens, block_size, self.device, num_blocks=None, gen=self.gen)
        num_blocks = int(meta.block_tables.max()) + 1
        k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, self.device)
        q = torch.randn(sum(query_lens), num_heads, head_dim, dtype=dtype, device=self.device)
        scale = head_dim ** -0.5
        ref = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale, window)
        lowp = rel_err(paged_attention(q, k_cache, v_cache, meta, scale, window), ref) \
            if self.device.type == "cuda" else float("nan")
        for num_splits in splits:
            out = torch.full_like(q, float("nan"))
            ta.decode_attention(q, k_cache, v_cache, meta, scale, window, out, num_splits=num_splits)
            if meta.max_query_len > 1:
                ta.prefill_attention(q, k_cache, v_cache, meta, scale, window, out)
            self.record(f"{name} splits={num_splits or 'auto'}", rel_err(out, ref), TOLERANCE[dtype],
                        torch_lowp_err=f"{lowp:.1e}")
        out = ta.TritonAttention().attend(q, LayerKVCache(k_cache, v_cache), meta, scale, window)
        self.record(f"{name} attend", rel_err(out, ref), TOLERANCE[dtype])

    def attention_matrix(self):
        dtypes = [torch.float16] if self.quick else [torch.bfloat16, torch.float16]
        head_dims = [64] if self.quick else [64, 128]
        heads = {"gqa4": (8, 2), "mqa": (4, 1)} if self.quick else HEAD_CONFIGS
        long = 90 if self.quick else 1500
        chunk = 40 if self.quick else 300
        combos = [(16, None), (32, 70 if self.quick else 700)]
        if not self.quick:
            combos += [(16, 100), (32, None)]
        for dtype in dtypes:
            for head_dim in head_dims:
                for hname, hcfg in heads.items():
                    # every (dtype, head_dim, heads) with two (block, window) combos; all four for bf16/128
                    use = combos if (dtype == torch.bfloat16 and head_dim == 128) else combos[:2]
                    for block_size, window in use:
                        tag = f"{str(dtype)[6:]} d{head_dim} {hname} bs{block_size} win{window}"
                        n = 3 if self.quick else 7
                        dec_lens = self.rand_lens(n - 3, 2, long) + [1, block_size, block_size + 1]
                        self.guarded(tag, self.attention_case, f"decode {tag}", dtype, hcfg, head_dim,
                                     block_size, window, [1] * n, dec_lens, splits=(None, 1, 4))
                        qlens = [1, self.rand_lens(1, 2, chunk)[0], 1, chunk, 2, 1]
                        prefix = self.rand_lens(len(qlens), 0, long)
                        prefix[1] = 0
                        seq_lens = [p + ql for p, ql in zip(prefix, qlens)]
                        self.guarded(tag, self.attention_case, f"mixed {tag}", dtype, hcfg, head_dim,
                                     block_size, window, qlens, seq_lens)

    def long_decode(self):
        ctx = 2000 if self.quick else 32768
        dtype = torch.float16 if self.quick else torch.bfloat16
        heads = (8, 2) if self.quick else (32, 8)
        for window in (None, 4096 if not self.quick else 300):
            self.guarded("long decode", self.attention_case, f"decode 1x{ctx} win{window}", dtype, heads,
                         64 if self.quick else 128, 16, window, [1], [ctx], splits=(None, 1))

    def stale_slots(self):
        """Slots no query may see (below every query's window, past seq_len) hold NaN:
        the kernels must not read them (the engine may recycle such blocks)."""
        dtype = torch.float16 if self.quick else torch.bfloat16
        (num_heads, num_kv_heads), head_dim, block_size, window = (8, 2), 64, 16, 50 if self.quick else 100
        query_lens = [1, 70, 1, 37] if self.quick else [1, 200, 1, 37, 300]
        prefix = [90, 30, 20, 80] if self.quick else [500, 300, 50, 700, 0]
        seq_lens = [p + q for p, q in zip(prefix, query_lens)]
        meta = make_batch(query_lens, seq_lens, block_size, self.device, gen=self.gen)
        num_blocks = int(meta.block_tables.max()) + 1
        k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, self.device)
        q = torch.randn(sum(query_lens), num_heads, head_dim, dtype=dtype, device=self.device)
        scale = head_dim ** -0.5
        ref = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale, window)
        table = meta.block_tables.cpu()
        for b, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
            first_visible = max(s_len - q_len - window + 1, 0)
            stale = list(range(first_visible)) + list(range(s_len, triton.cdiv(s_len, block_size) * block_size))
            for pos in stale:
                k_cache[table[b, pos // block_size], pos % block_size] = float("nan")
                v_cache[table[b, pos // block_size], pos % block_size] = float("nan")
        out = ta.TritonAttention().attend(q, LayerKVCache(k_cache, v_cache), meta, scale, window)
        self.record(f"stale NaN slots win{window}", rel_err(out, ref), TOLERANCE[dtype])

    def cuda_graph_decode(self):
        """Capture decode attend for a padded max_seq_len, replay with other lengths."""
        if self.device.type != "cuda":
            return
        dtype, (num_heads, num_kv_heads), head_dim, block_size, bound = torch.bfloat16, (32, 8), 128, 16, 4096
        batch = 6
        max_blocks = bound // block_size
        num_blocks = batch * max_blocks
        k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, self.device)
        static = make_batch([1] * batch, [bound] * batch, block_size, self.device, gen=self.gen)
        q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=self.device)
        backend, scale = ta.TritonAttention(), head_dim ** -0.5
        for window in (None, 1000):
            backend.attend(q, LayerKVCache(k_cache, v_cache), static, scale, window)     # compile outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = backend.attend(q, LayerKVCache(k_cache, v_cache), static, scale, window)
            for trial in range(2):
                lens = self.rand_lens(batch, 1, bound)
                fresh = make_batch([1] * batch, lens, block_size, self.device, num_blocks=num_blocks, gen=self.gen)
                static.seq_lens.copy_(fresh.seq_lens)
                static.block_tables.zero_()
                static.block_tables[:, :fresh.block_tables.shape[1]].copy_(fresh.block_tables)
                q.copy_(torch.randn_like(q))
                graph.replay()
                ref = paged_attention(q.float(), k_cache.float(), v_cache.float(), fresh, scale, window)
                self.record(f"cuda-graph decode win{window} replay{trial}", rel_err(out, ref), TOLERANCE[dtype])

    # ---- write_kv
    def write_kv(self):
        for dtype in ([torch.float16] if self.quick else [torch.bfloat16, torch.float16]):
            for num_kv_heads, head_dim, block_size in [(2, 64, 16), (8, 128, 32), (1, 64, 16)]:
                seq_lens = self.rand_lens(4, 1, 100)
                qlens = [min(s, q) for s, q in zip(seq_lens, [1, 7, 100, 1])]
                meta = make_batch(qlens, seq_lens, block_size, self.device, gen=self.gen)
                slots = meta.slot_mapping.clone()
                slots[torch.randperm(len(slots), generator=self.gen)[:3].to(slots.device)] = -1
                shape = (int(meta.block_tables.max()) + 1, block_size, num_kv_heads, head_dim)
                kc, vc = random_cache(shape[0], block_size, num_kv_heads, head_dim, dtype, self.device)
                kr, vr = kc.clone(), vc.clone()
                # K/V as the model makes them: strided views into a fused qkv projection
                qkv = torch.randn(len(slots), (4 + 2) * num_kv_heads * head_dim, dtype=dtype, device=self.device)
                k = qkv[:, 4 * num_kv_heads * head_dim:5 * num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
                v = qkv[:, 5 * num_kv_heads * head_dim:].view(-1, num_kv_heads, head_dim)
                ta.write_kv(k, v, kc, vc, slots)
                write_kv_cache(k, v, kr, vr, slots)
                exact = bool(torch.equal(kc, kr) and torch.equal(vc, vr))
                self.record(f"write_kv {str(dtype)[6:]} hkv{num_kv_heads} d{head_dim} bs{block_size}",
                            0.0 if exact else 1.0, 0.0)

    # ---- ops
    def ops(self):
        for dtype in ([torch.float16] if self.quick else [torch.bfloat16, torch.float16]):
            tol = TOLERANCE[dtype]
            for rows, hidden in [(5, 896), (33, 1000)] + ([] if self.quick else [(300, 4096)]):
                x = torch.randn(rows, hidden, dtype=dtype, device=self.device)
                res = torch.randn_like(x)
                w = (1 + 0.1 * torch.randn(hidden, device=self.device)).to(dtype)
                out, new_res = ops.rms_norm(x, w, 1e-6, res)
                ref, ref_res = rms_norm_ref(x, w, 1e-6, res)
                self.record(f"rms_norm+res {str(dtype)[6:]} {rows}x{hidden}",
                            max(rel_err(out, ref), rel_err(new_res, ref_res)), tol)
                out, same = ops.rms_norm(x, w, 1e-6)
                ref, _ = rms_norm_ref(x, w, 1e-6)
                self.record(f"rms_norm {str(dtype)[6:]} {rows}x{hidden}", rel_err(out, ref) if same is x else 1.0, tol)
            for tokens, nh, nkv, hd in [(7, 14, 2, 64), (40, 32, 8, 128)]:
                qkv = torch.randn(tokens, (nh + 2 * nkv) * hd, dtype=dtype, device=self.device)
                q = qkv[:, :nh * hd].view(tokens, nh, hd)
                k = qkv[:, nh * hd:(nh + nkv) * hd].view(tokens, nkv, hd)
                cache = cos_sin_cache(4096, hd, self.device)
                pos = torch.randint(0, 4096, (tokens,), generator=self.gen).to(self.device)
                ref_q, ref_k = rotary_ref(q, k, pos, cache)
                v_before = qkv[:, (nh + nkv) * hd:].clone()
                ops.rotary(q, k, pos, cache)
                untouched = torch.equal(v_before, qkv[:, (nh + nkv) * hd:])
                self.record(f"rotary {str(dtype)[6:]} T{tokens} h{nh}/{nkv} d{hd}",
                            max(rel_err(q, ref_q), rel_err(k, ref_k)) if untouched else 1.0, tol)
            for tokens, inter in [(3, 4864), (17, 1000)]:
                x = torch.randn(tokens, 2 * inter, dtype=dtype, device=self.device)
                self.record(f"silu_and_mul {str(dtype)[6:]} {tokens}x{inter}",
                            rel_err(ops.silu_and_mul(x), silu_and_mul_ref(x.float())), tol)

    def run(self):
        print("== checks", flush=True)
        self.guarded("write_kv", self.write_kv)
        self.guarded("ops", self.ops)
        self.attention_matrix()
        self.long_decode()
        self.guarded("stale slots", self.stale_slots)
        self.guarded("cuda graph", self.cuda_graph_decode)
        return self.results


# --------------------------------------------------------------------------- timing

def bench(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(calls, warmup=10, rep=100):
    """Median ms per call of ``calls`` (a list of thunks) captured into one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return bench(graph.replay, warmup=warmup, rep=rep) / len(calls)


class DecodePool:
    """One big bf16 cache for the decode timings; batches take disjoint blocks."""

    def __init__(self, max_tokens, block_size, device):
        self.block_size, self.device = block_size, device
        self.num_blocks = max_tokens // block_size
        cfg = LLAMA3_8B
        self.k, self.v = random_cache(self.num_blocks, block_size, cfg["num_kv_heads"], cfg["head_dim"],
                                      torch.bfloat16, device)
        self.gen = torch.Generator().manual_seed(1)

    def batches(self, batch, ctx, count):
        per = batch * triton.cdiv(ctx, self.block_size)
        assert per * count <= self.num_blocks
        return [make_batch([1] * batch, [ctx] * batch, self.block_size, self.device,
                           first_block=i * per, num_blocks=per, gen=self.gen) for i in range(count)]


def time_decode(pool, batch, ctx, with_ref, copy_bw, **kwargs):
    cfg = LLAMA3_8B
    kv_bytes = batch * ctx * cfg["num_kv_heads"] * cfg["head_dim"] * 2 * 2
    fits = pool.num_blocks // (batch * triton.cdiv(ctx, pool.block_size))
    count = max(1, min(triton.cdiv(ROTATE_BYTES, kv_bytes), fits))
    metas = pool.batches(batch, ctx, count)
    q = torch.randn(batch, cfg["num_heads"], cfg["head_dim"], dtype=torch.bfloat16, device=pool.device)
    out = torch.empty_like(q)
    scale = cfg["head_dim"] ** -0.5
    if kwargs:
        calls = [lambda m=m: ta.decode_attention(q, pool.k, pool.v, m, scale, None, out, **kwargs) for m in metas]
    else:
        backend = ta.TritonAttention()
        calls = [lambda m=m: backend.attend(q, LayerKVCache(pool.k, pool.v), m, scale, None) for m in metas]
    ms = bench_graph(calls)
    row = dict(batch=batch, ctx=ctx, triton_us=ms * 1e3, kv_GBps=kv_bytes / (ms * 1e-3) / 1e9,
               num_splits=kwargs.get("num_splits") or ta.num_kv_splits(batch, cfg["num_kv_heads"], ctx,
                                                                       ta._num_sms(pool.device.index or 0)))
    row["frac_copy_bw"] = row["kv_GBps"] / copy_bw
    if with_ref:
        ref_ms = bench(lambda: paged_attention(q, pool.k, pool.v, metas[0], scale, None), warmup=5, rep=50)
        row["torch_us"] = ref_ms * 1e3
        row["speedup"] = ref_ms / ms
    return row


def prefill_inputs(batch, q_len, prefix, device, block_size=16):
    cfg = LLAMA3_8B
    seq = prefix + q_len
    meta = make_batch([q_len] * batch, [seq] * batch, block_size, device)
    k_cache, v_cache = random_cache(batch * triton.cdiv(seq, block_size), block_size, cfg["num_kv_heads"],
                                    cfg["head_dim"], torch.bfloat16, device)
    q = torch.randn(batch * q_len, cfg["num_heads"], cfg["head_dim"], dtype=torch.bfloat16, device=device)
    flops = 4 * cfg["head_dim"] * cfg["num_heads"] * batch * sum(prefix + i + 1 for i in range(q_len))
    return meta, k_cache, v_cache, q, flops


def time_prefill(device, batch=8, q_len=2048, prefix=0, with_sdpa=True, **kwargs):
    cfg = LLAMA3_8B
    meta, k_cache, v_cache, q, flops = prefill_inputs(batch, q_len, prefix, device)
    scale = cfg["head_dim"] ** -0.5
    out = torch.empty_like(q)
    ms = bench(lambda: ta.prefill_attention(q, k_cache, v_cache, meta, scale, None, out, **kwargs))
    row = dict(batch=batch, q_len=q_len, prefix=prefix, triton_ms=ms, triton_TFLOPs=flops / (ms * 1e-3) / 1e12,
               **{k: v for k, v in kwargs.items()})
    if with_sdpa and prefix == 0:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        group = cfg["num_heads"] // cfg["num_kv_heads"]
        keys = ta_gather(k_cache, meta, q_len).repeat_interleave(group, dim=1).contiguous()
        values = ta_gather(v_cache, meta, q_len).repeat_interleave(group, dim=1).contiguous()
        queries = q.view(batch, q_len, cfg["num_heads"], cfg["head_dim"]).transpose(1, 2).contiguous()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = lambda: F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale)
            sdpa_ms = bench(sdpa)
            ref = sdpa().transpose(1, 2).reshape_as(q)
        row.update(sdpa_ms=sdpa_ms, sdpa_TFLOPs=flops / (sdpa_ms * 1e-3) / 1e12, vs_sdpa=sdpa_ms / ms,
                   rel_err_vs_sdpa=rel_err(out, ref))
    return row


def ta_gather(cache, meta, length):
    """[B, Hkv, length, D] contiguous K or V of each sequence."""
    from pagellm.kernels.torch_attention import gather_kv
    return gather_kv(cache, meta.block_tables, meta.seq_lens, length).transpose(1, 2)


def time_write_kv(device):
    rows = []
    cfg = LLAMA3_8B
    for tokens in (256, 16384):
        k = torch.randn(tokens, cfg["num_kv_heads"], cfg["head_dim"], dtype=torch.bfloat16, device=device)
        v = torch.randn_like(k)
        kc, vc = random_cache(tokens * 4 // 16, 16, cfg["num_kv_heads"], cfg["head_dim"], torch.bfloat16, device)
        slots = torch.randperm(tokens * 4, device=device)[:tokens]
        flat_k = kc.view(-1, cfg["num_kv_heads"], cfg["head_dim"])
        flat_v = vc.view(-1, cfg["num_kv_heads"], cfg["head_dim"])

        def index_copy():
            flat_k.index_copy_(0, slots, k)
            flat_v.index_copy_(0, slots, v)
        triton_calls = [lambda: ta.write_kv(k, v, kc, vc, slots)] * 20
        rows.append(dict(tokens=tokens, triton_us=bench_graph(triton_calls) * 1e3,
                         index_copy_us=bench_graph([index_copy] * 20) * 1e3,
                         torch_ref_eager_us=bench(lambda: write_kv_cache(k, v, kc, vc, slots)) * 1e3,
                         bytes=4 * k.numel() * 2))
        rows[-1]["triton_GBps"] = rows[-1]["bytes"] / rows[-1]["triton_us"] / 1e3
    return rows


def time_ops(device):
    """GPU time per call (CUDA-graph replays of 20 calls), Triton and torch eager references."""
    dtype, rows = torch.bfloat16, []
    per_call = lambda fn: bench_graph([fn] * 20) * 1e3
    for tokens in (256, 8192):
        x = torch.randn(tokens, 4096, dtype=dtype, device=device)
        res, w = torch.randn_like(x), torch.randn(4096, dtype=dtype, device=device)
        nbytes = 4 * x.numel() * 2
        rows.append(dict(op="rms_norm+residual", tokens=tokens, bytes=nbytes,
                         triton_us=per_call(lambda: ops.rms_norm(x, w, 1e-5, res)),
                         torch_us=per_call(lambda: rms_norm_ref(x, w, 1e-5, res))))
        qkv = torch.randn(tokens, 48 * 128, dtype=dtype, device=device)
        q, k = qkv[:, :4096].view(tokens, 32, 128), qkv[:, 4096:5120].view(tokens, 8, 128)
        cache, pos = cos_sin_cache(8192, 128, device), torch.randint(0, 8192, (tokens,), device=device)
        rows.append(dict(op="rotary", tokens=tokens, bytes=2 * 40 * 128 * tokens * 2,
                         triton_us=per_call(lambda: ops.rotary(q, k, pos, cache)),
                         torch_us=per_call(lambda: rotary_ref(q, k, pos, cache))))
        x2 = torch.randn(tokens, 2 * 14336, dtype=dtype, device=device)
        rows.append(dict(op="silu_and_mul", tokens=tokens, bytes=3 * 14336 * tokens * 2,
                         triton_us=per_call(lambda: ops.silu_and_mul(x2)),
                         torch_us=per_call(lambda: silu_and_mul_ref(x2))))
    for row in rows:
        row["triton_GBps"] = row["bytes"] / row["triton_us"] / 1e3
    return rows


def timings(device, sections, copy_bw, results, save):
    """Fill ``results`` section by section, calling ``save()`` after each."""
    def guarded(key, fn, *args, **kwargs):
        t0 = time.time()
        try:
            results[key] = fn(*args, **kwargs)
        except Exception as exc:
            traceback.print_exc()
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"== {key} done in {time.time() - t0:.1f}s", flush=True)
        save()

    decode_timings(device, sections, copy_bw, guarded)
    torch.cuda.empty_cache()
    prefill_and_other_timings(device, sections, guarded)


def decode_timings(device, sections, copy_bw, guarded):
    batches, contexts = (1, 8, 64, 256), (512, 1024, 2048, 4096, 8192, 16384, 32768)
    pool = DecodePool(256 * 32768, 16, device)

    def decode_table():
        rows = []
        for batch in batches:
            for ctx in contexts:
                row = time_decode(pool, batch, ctx, with_ref=batch * ctx <= (1 << 20), copy_bw=copy_bw)
                rows.append(row)
                print(f"  decode B={batch:<3} ctx={ctx:<6} {row['triton_us']:9.1f} us  "
                      f"{row['frac_copy_bw']:.2f} of copy bw  splits={row['num_splits']}"
                      + (f"  torch {row['torch_us']:9.1f} us" if "torch_us" in row else ""), flush=True)
        return rows

    guarded("decode", decode_table)
    if "sweep" in sections:
        def decode_sweep():
            rows = []
            for batch, ctx in [(1, 512), (1, 4096), (1, 32768), (8, 8192), (64, 4096)]:
                for splits in (1, 2, 4, 8, 16, 32, 64):
                    if splits <= triton.cdiv(ctx, 64):
                        rows.append(time_decode(pool, batch, ctx, False, copy_bw, num_splits=splits))
            return rows
        guarded("decode_sweep", decode_sweep)


def prefill_and_other_timings(device, sections, guarded):
    guarded("prefill", lambda: [time_prefill(device), time_prefill(device, batch=4, q_len=512, prefix=8192),
                                time_prefill(device, batch=1, q_len=8192, prefix=0)])
    if "sweep" in sections:
        def prefill_sweep():
            rows = []
            for bm, bn, warps, stages in [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)]:
                rows.append(time_prefill(device, with_sdpa=False, block_m=bm, block_n=bn,
                                         num_warps=warps, num_stages=stages))
                print(f"  prefill sweep {bm}x{bn} w{warps} s{stages}: "
                      f"{rows[-1]['triton_TFLOPs']:.0f} TFLOP/s", flush=True)
            return rows
        guarded("prefill_sweep", prefill_sweep)
    guarded("write_kv", time_write_kv, device)
    guarded("ops", time_ops, device)


# --------------------------------------------------------------------------- main

def print_tables(report):
    print("\n==== summary", report["device"], "copy bw", f"{report.get('copy_GBps', 0):.0f} GB/s")
    checks = report.get("checks", [])
    bad = [c for c in checks if not c.get("ok")]
    worst = max((c["rel_err"] / c["tol"] for c in checks if c.get("ok") and c["tol"] > 0), default=0)
    print(f"checks: {len(checks) - len(bad)} passed, {len(bad)} failed; worst err/tol {worst:.2f}")
    for c in bad[:20]:
        print("  FAILED", c["name"], c.get("rel_err", c.get("error")))
    decode = report.get("timing", {}).get("decode")
    if isinstance(decode, list):
        print(f"{'decode B':>8} {'ctx':>6} {'splits':>6} {'triton us':>10} {'torch us':>10} {'speedup':>7} "
              f"{'KV GB/s':>8} {'of copy':>7}")
        for r in decode:
            print(f"{r['batch']:>8} {r['ctx']:>6} {r['num_splits']:>6} {r['triton_us']:>10.1f} "
                  f"{r.get('torch_us', float('nan')):>10.1f} {r.get('speedup', float('nan')):>7.1f} "
                  f"{r['kv_GBps']:>8.0f} {r['frac_copy_bw']:>7.2f}")
    prefill = report.get("timing", {}).get("prefill")
    if isinstance(prefill, list):
        for r in prefill:
            print(f"prefill {r['batch']}x{r['q_len']} prefix {r['prefix']}: triton {r['triton_ms']:.3f} ms "
                  f"{r['triton_TFLOPs']:.0f} TFLOP/s"
                  + (f" | sdpa flash {r['sdpa_ms']:.3f} ms {r['sdpa_TFLOPs']:.0f} TFLOP/s "
                     f"(triton/sdpa speed {r['vs_sdpa']:.2f}, rel err {r['rel_err_vs_sdpa']:.1e})"
                     if "sdpa_ms" in r else ""))
    for key in ("write_kv", "ops"):
        rows = report.get("timing", {}).get(key)
        if isinstance(rows, list):
            for r in rows:
                print(key, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small cases (for Triton's CPU interpreter)")
    parser.add_argument("--sections", default="check,time", help="comma list of check, time, sweep")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    device = torch.device(args.device)
    if device.type == "cpu":
        ta._num_sms = lambda index: 132       # the interpreter has no device to ask
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    report = dict(device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                  command="PYTHONPATH=. python3 " + " ".join(sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(args.out, exist_ok=True)
    tag = name.replace("NVIDIA ", "").split()[0].lower() if device.type == "cuda" else "cpu"
    path = os.path.join(args.out, f"kernels-{tag}-{datetime.datetime.now():%Y%m%d-%H%M}.json")
    t0 = time.time()

    def save():                      # after every section, so a run cut short keeps what it measured
        report["wall_s"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    if device.type == "cuda":
        report["copy_GBps"] = measure_copy_bandwidth(device, 2**31)["bandwidth"] / 1e9   # read + write
        print(f"{name}: copy bandwidth {report['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    if "check" in sections:
        report["checks"] = Checks(device, args.quick).run()
        print(f"== checks done in {time.time() - t0:.1f}s", flush=True)
        save()
    if "time" in sections and device.type == "cuda":
        report["timing"] = {}
        timings(device, sections, report["copy_GBps"], report["timing"], save)
    save()
    print_tables(report)
    print("wrote", path)
    failed = [c for c in report.get("checks", []) if not c.get("ok")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
