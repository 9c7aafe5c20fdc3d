"""Paged attention in Triton: KV write, split-KV decode, varlen (chunked) prefill.

Layouts are those of :mod:`pagellm.kernels.attention`: ``q [T, H, D]``, caches
``[num_blocks, block_size, Hkv, D]``, one block-table row per sequence. Every
kernel reads the K/V of a tile of keys by looking up, key by key, the pool
block that holds it (``block_tables[b, key // block_size]``), so a key tile
need not line up with the cache's blocks and any power-of-two block size works.

``attend`` routes each sequence by its query length, with no host sync:

* **decode** (query_len == 1), flash-decoding: grid ``(B, Hkv, num_splits)``;
  a program loads the ``H / Hkv`` query heads of one KV head as the rows of a
  matrix (padded to 16 for the tensor cores), so each K/V tile is read once per
  group, and walks its share of the sequence's keys with an online softmax.
  Each sequence's visible keys (its window, or all of them) are cut into
  ``num_splits`` equal runs; with one split the kernel writes the output,
  otherwise it writes the partial (max, sum, normalised out) per split and a
  second kernel merges them.
* **prefill** (query_len > 1), FlashAttention-2 style: grid
  ``(T // BLOCK_M + B, H)``, one program per tile of ``BLOCK_M`` queries of one
  sequence and one head. Sequence b's tiles are numbered from
  ``query_start_loc[b] // BLOCK_M + b``, which bounds the tiles before it, so a
  program finds its sequence by binary search over ``query_start_loc``; spare
  programs return at once, and the grid runs the last (longest) tiles first.
  Key tiles fully inside the causal/window band skip the mask; only the tiles
  on its edges compute it, and they never read a cache slot outside the band
  (so stale blocks below a sliding window may hold anything).

Numbers: fp32 accumulation, scores in the log2 domain (``exp2``), fp16 or bf16
inputs. Head dims must be powers of two (64 and 128 are checked on device).

Quantized cache (``kernels.kv_quant``: int8 or fp8 codes, one fp16 scale per
token per KV head in ``[num_blocks, Hkv, block_size]``): the write kernel
quantizes each token's head vector as it stores it; the attention kernels load
the code tile and convert it to the query dtype (exact: int8 and e4m3 values
fit bf16 and fp16), apply the K scales to the score vector ``q . code`` (one
multiply per key, not per element) and fold the V scales into the
probabilities before ``P @ V``. No float copy of the cache is made. The decode
kernel can also read the codes two to an int16 (``QUANT_DECODE["packed"]``,
unpacked in registers), so that its asynchronous copies move 16 bytes at a time
as the bf16 kernel's do (on by default: on an H200 it took the int8 decode at
64 x 4k from 0.73x to 0.94x of the bf16 kernel's speed).

CUDA graphs: the decode path launches with a grid fixed by the batch size and
the split count, and the split count depends only on (batch size, Hkv,
``meta.max_seq_len``, the device's SM count). The engine pads
``meta.max_seq_len`` to its fixed bound while capturing, so a captured graph
replays correctly for any lengths up to that bound: each program derives its
key range from ``seq_lens`` on the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagellm.kernels import triton_ops
from pagellm.kernels.attention import AttentionMetadata, LayerKVCache
from pagellm.kernels.kv_quant import SCALE_DTYPE, SCALE_MIN, format_of
from pagellm.kernels.triton_ops import rotate_heads

LOG2_E = 1.4426950408889634
# Stands in for "no sliding window": larger than any sequence, small enough
# that ``position - window`` cannot overflow int32.
NO_WINDOW = 1 << 30
# Initial running max: finite, so a row whose keys are all masked in a tile
# gets exp2(-inf - NEG_BIG) = 0 rather than NaN.
NEG_BIG = tl.constexpr(-1.0e30)
MIN_SCALE = tl.constexpr(SCALE_MIN)

MIN_GROUP_ROWS = 16            # tl.dot needs at least 16 rows
DECODE_BLOCK_N = 64            # keys per decode tile
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
# Split policy: aim for this many decode programs per SM, with no split
# shorter than MIN_KEYS_PER_SPLIT keys and at most MAX_KV_SPLITS splits.
DECODE_PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 64
MAX_KV_SPLITS = 32
# A quantized cache's decode: tiles, warps, stages and programs per SM of its own
# (a tile carries half the bytes), from a sweep on an H200 (benchmarks/kv_quant_gpu.py).
QUANT_DECODE = dict(block_n=128, num_warps=4, num_stages=3, programs_per_sm=8, v_early=True, k_as_a=False,
                    packed=True)

PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 128
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 2

WRITE_KV_NUM_WARPS = 4
# The rotary embedding inside the KV write kernel (one launch per layer fewer; off: benchmarks' "before").
FUSED_ROTARY = True


# --------------------------------------------------------------------------- write_kv

@triton.jit
def _store_head_vectors(src_ptr, cache_ptr, scale_ptr, dst, scale_dst, head_ok,
                        QUANT: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
    """Store ``[HEADS_PAD, D]`` vectors; quantized: codes (rounded to integers
    when ``ROUND``: int8) and one fp16 scale per head."""
    mask = head_ok[:, None]
    x = tl.load(src_ptr, mask=mask, other=0.0)
    if QUANT:
        xf = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(xf), axis=1) / QMAX, MIN_SCALE).to(tl.float16)
        tl.store(scale_ptr + scale_dst, scale, mask=head_ok)
        xf = xf / scale.to(tl.float32)[:, None]
        if ROUND:
            xf = tl.where(xf >= 0, tl.floor(xf + 0.5), -tl.floor(0.5 - xf))
        x = tl.minimum(tl.maximum(xf, -QMAX), QMAX)
    tl.store(cache_ptr + dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                     q_ptr, positions_ptr, cos_sin_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cache_block, stride_cache_token, stride_cache_head,
                     stride_scale_block, stride_scale_head,
                     stride_qt, stride_qh, stride_cos_sin,
                     block_size, num_kv_heads, num_q_heads, half,
                     HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                     ROUND: tl.constexpr, ROTATE: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                     HALF_PAD: tl.constexpr):
    """One program per token: store its ``[Hkv, D]`` K and V into slot
    ``slot_mapping[t]``; with ``ROTATE``, first apply the rotary embedding to its
    q and k heads in place (``triton_ops.rotary``'s math, one launch fewer)."""
    token = tl.program_id(0)
    if ROTATE:
        pos = tl.load(positions_ptr + token).to(tl.int64)
        half_dims = tl.arange(0, HALF_PAD)
        table = cos_sin_ptr + pos * stride_cos_sin + half_dims
        cos = tl.load(table, mask=half_dims < half, other=0.0).to(tl.float32)
        sin = tl.load(table + half, mask=half_dims < half, other=0.0).to(tl.float32)
        t64 = token.to(tl.int64)
        rotate_heads(q_ptr, t64, cos, sin, stride_qt, stride_qh, num_q_heads, half, Q_HEADS_PAD, HALF_PAD)
        rotate_heads(k_ptr, t64, cos, sin, stride_kt, stride_kh, num_kv_heads, half, HEADS_PAD, HALF_PAD)
        tl.debug_barrier()      # the rotated k is read back below, by other threads of the program
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    head_ok = heads < num_kv_heads
    dst = block * stride_cache_block + offset * stride_cache_token + heads[:, None] * stride_cache_head + dims[None, :]
    scale_dst = block * stride_scale_block + heads * stride_scale_head + offset
    _store_head_vectors(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], k_cache_ptr,
                        k_scale_ptr, dst, scale_dst, head_ok, QUANT=QUANT, QMAX=QMAX, ROUND=ROUND)
    _store_head_vectors(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], v_cache_ptr,
                        v_scale_ptr, dst, scale_dst, head_ok, QUANT=QUANT, QMAX=QMAX, ROUND=ROUND)


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding ``write_kv`` applies first: to ``q [T, H, D]`` and k, in
    place, at ``positions [T]`` from ``cos_sin_cache [max_position, rotary_dim]``."""
    q: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None, rotation: Rotation | None = None) -> None:
    """Scatter ``k, v [T, Hkv, D]`` into the paged caches, quantized when they
    hold a ``kv_quant`` format (scales into ``k_scale``, ``v_scale``); slot -1
    writes nothing. With ``rotation``, q and k are rotated first, in the same launch."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_cache_layout(k_cache, v_cache)
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    if num_tokens == 0:
        return
    fmt, scales = _quant_args(k_cache, k_scale, v_scale)
    # Without a rotation the kernel never reads these; any tensors of the right rank stand in.
    q, positions, cos_sin = ((rotation.q, rotation.positions, rotation.cos_sin_cache) if rotation
                             else (k, slot_mapping, k))
    assert q.stride(2) == 1 and cos_sin.stride(-1) == 1
    half = cos_sin.shape[1] // 2 if rotation else 1
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, *scales, slot_mapping, q, positions, cos_sin,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scales[0].stride(0), scales[0].stride(1),
        q.stride(0), q.stride(1), cos_sin.stride(0),
        k_cache.shape[1], num_kv_heads, q.shape[1], half,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        QUANT=fmt is not None, QMAX=fmt.qmax if fmt is not None else 0.0,
        ROUND=fmt is not None and fmt.storage == torch.int8, ROTATE=rotation is not None,
        Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]), HALF_PAD=triton.next_power_of_2(half),
        num_warps=WRITE_KV_NUM_WARPS)


def _quant_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """(the cache's ``kv_quant`` format or None, (k scales, v scales) or stand-ins for a float cache)."""
    fmt = format_of(k_cache.dtype)
    if fmt is None:
        stand_in = torch.empty(1, 1, 1, dtype=SCALE_DTYPE, device=k_cache.device)
        return None, (stand_in, stand_in)
    assert k_scale is not None and v_scale is not None and k_scale.stride() == v_scale.stride()
    assert k_scale.stride(2) == 1, "a head's scales must be contiguous within a block"
    return fmt, (k_scale, v_scale)


# --------------------------------------------------------------------------- shared tile step

@triton.jit
def _unpack_codes(x, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
    """``[BLOCK_N, HEAD_DIM / 2]`` int16 holding two codes each (little-endian: the
    even dim in the low byte) -> ``[BLOCK_N, HEAD_DIM]`` int8 or fp8 codes."""
    if FP8:
        lo = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        hi = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        lo = x.to(tl.int8)
        hi = (x >> 8).to(tl.int8)
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, HEAD_DIM])


@triton.jit
def _attend_key_tile(acc, l_i, m_i, q, q_pos, key_start, key_lo, key_hi, window, scale_log2,
                     k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
                     block_size, stride_cache_block, stride_cache_token,
                     k_scale_ptr, v_scale_ptr, scale_head_offset, stride_scale_block,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, QUANT: tl.constexpr,
                     V_EARLY: tl.constexpr = True, K_AS_A: tl.constexpr = False, PACKED: tl.constexpr = False,
                     FP8: tl.constexpr = False):
    """One online-softmax step of rows ``q [M, D]`` (at positions ``q_pos [M]``)
    over keys ``key_start .. key_start + BLOCK_N - 1``.

    Unmasked tiles must lie wholly inside every row's causal window. Masked
    tiles read only keys in ``[key_lo, key_hi)`` (cache slots outside it may
    hold anything, NaN included) and apply ``pos - window < key <= pos``.
    Quantized (``QUANT``): K and V are codes with per-key scales.
    """
    keys = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM // 2 if PACKED else HEAD_DIM)
    if MASKED:
        in_seq = (keys >= key_lo) & (keys < key_hi)
        block = tl.load(block_table_ptr + keys // block_size, mask=in_seq, other=0).to(tl.int64)
    else:
        block = tl.load(block_table_ptr + keys // block_size).to(tl.int64)
    rows = block * stride_cache_block + (keys % block_size) * stride_cache_token + kv_head_offset
    kv_offsets = rows[:, None] + dims[None, :]
    if MASKED:
        k = tl.load(k_cache_ptr + kv_offsets, mask=in_seq[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_offsets)
    if PACKED:
        k = _unpack_codes(k, BLOCK_N, HEAD_DIM, FP8)

    if QUANT:
        # Codes and scales of K and V are all requested before any is used: the
        # tile's loads overlap (no pipeliner stages keep them in flight here).
        scale_offsets = block * stride_scale_block + scale_head_offset + keys % block_size
        if MASKED:
            k_scale = tl.load(k_scale_ptr + scale_offsets, mask=in_seq, other=0.0)
            v_scale = tl.load(v_scale_ptr + scale_offsets, mask=in_seq, other=0.0)
            if V_EARLY:
                v = tl.load(v_cache_ptr + kv_offsets, mask=in_seq[:, None], other=0.0)
        else:
            k_scale = tl.load(k_scale_ptr + scale_offsets)
            v_scale = tl.load(v_scale_ptr + scale_offsets)
            if V_EARLY:
                v = tl.load(v_cache_ptr + kv_offsets)
        if PACKED:
            v = _unpack_codes(v, BLOCK_N, HEAD_DIM, FP8)
        if K_AS_A:
            qk = tl.trans(tl.dot(k.to(q.dtype), tl.trans(q)))
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)))
        scores = qk * (k_scale.to(tl.float32) * scale_log2)[None, :]
    else:
        scores = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2
    if MASKED:
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] > q_pos[:, None] - window)
        visible = visible & in_seq[None, :]
        scores = tl.where(visible, scores, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    if not (QUANT and V_EARLY):
        if MASKED:
            v = tl.load(v_cache_ptr + kv_offsets, mask=in_seq[:, None], other=0.0)
        else:
            v = tl.load(v_cache_ptr + kv_offsets)
    if QUANT:
        acc = acc * alpha[:, None] + tl.dot((p * v_scale.to(tl.float32)[None, :]).to(q.dtype), v.to(q.dtype))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, l_i, m_new


# --------------------------------------------------------------------------- decode

@triton.jit(do_not_specialize=["window", "num_splits", "group_size", "stride_bt"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                   block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                   out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr,
                   scale_log2, window, num_splits, group_size,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cache_block, stride_cache_token, stride_cache_head, stride_bt,
                   stride_scale_block, stride_scale_head,
                   block_size,
                   GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   WRITE_OUTPUT: tl.constexpr, QUANT: tl.constexpr, V_EARLY: tl.constexpr,
                   K_AS_A: tl.constexpr, PACKED: tl.constexpr, FP8: tl.constexpr):
    """Program (b, kv_head, split): attention of sequence b's decode token, for all
    query heads of ``kv_head``, over the split's run of keys.

    Writes the final output when ``WRITE_OUTPUT`` (single split), else the split's
    running max (log2 domain), sum and normalised output into the partial buffers
    ``[B, H, num_splits(, D)]``.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * group_size

    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # This split's keys: an equal share, rounded up to whole tiles, of the visible run.
    first_key = tl.maximum(seq_len - window, 0)
    keys_per_split = tl.cdiv(tl.cdiv(seq_len - first_key, num_splits), BLOCK_N) * BLOCK_N
    start = first_key + split * keys_per_split
    end = tl.minimum(start + keys_per_split, seq_len)

    rows = tl.arange(0, GROUP_ROWS)
    heads = kv_head * group_size + rows
    head_ok = rows < group_size
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None], other=0.0)
    q_pos = tl.full([GROUP_ROWS], 0, tl.int32) + (seq_len - 1)

    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    m_i = tl.full([GROUP_ROWS], NEG_BIG, dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head * stride_cache_head
    for key_start in range(start, end, BLOCK_N):
        acc, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, q, q_pos, key_start, start, end, window, scale_log2,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
            block_size, stride_cache_block, stride_cache_token,
            k_scale_ptr, v_scale_ptr, kv_head * stride_scale_head, stride_scale_block,
            BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=True, QUANT=QUANT, V_EARLY=V_EARLY, K_AS_A=K_AS_A,
            PACKED=PACKED, FP8=FP8)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if WRITE_OUTPUT:
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=head_ok)
        tl.store(part_sum_ptr + part, l_i, mask=head_ok)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=head_ok[:, None])


@triton.jit
def _decode_reduce_kernel(query_start_loc_ptr, out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr,
                          stride_ot, stride_oh,
                          NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (b, head): merge the splits' partial softmaxes into the output row."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
        return
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    m = tl.load(part_max_ptr + part)
    weight = tl.exp2(m - tl.max(m, axis=0)) * tl.load(part_sum_ptr + part)
    total = tl.sum(weight, axis=0)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                  programs_per_sm: int = DECODE_PROGRAMS_PER_SM) -> int:
    """Splits per sequence for decode: the largest power of two that keeps the
    grid within about ``DECODE_PROGRAMS_PER_SM`` programs per SM (one wave at
    this kernel's occupancy), leaves no split shorter than ``MIN_KEYS_PER_SPLIT``
    keys of the longest sequence, and is at most ``MAX_KV_SPLITS``. On an H100
    (132 SMs, 8 KV heads): batch 1 -> 32, 8 -> 8, 64 and more -> 1 (fewer for short contexts)."""
    wanted = max(programs_per_sm * num_sms // max(num_seqs * num_kv_heads, 1), 1)
    by_length = triton.cdiv(max(max_seq_len, 1), MIN_KEYS_PER_SPLIT)
    limit = min(wanted, by_length, MAX_KV_SPLITS)
    return 1 << (limit.bit_length() - 1)   # largest power of two <= limit


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, sliding_window: int | None, out: torch.Tensor,
                     num_splits: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, **tiling) -> None:
    """Write ``out`` rows of the sequences whose query length is 1 (others untouched).
    ``tiling`` overrides the defaults (``block_n``, ``num_warps``, ``num_stages``,
    ``programs_per_sm``; quantized: ``QUANT_DECODE``)."""
    _, num_heads, head_dim = q.shape
    num_seqs = meta.num_seqs
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    fmt, scales = _quant_args(k_cache, k_scale, v_scale)
    t = (dict(QUANT_DECODE) if fmt is not None else
         dict(block_n=DECODE_BLOCK_N, num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
              programs_per_sm=DECODE_PROGRAMS_PER_SM, v_early=False, k_as_a=False, packed=False)) | tiling
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs, num_kv_heads, meta.max_seq_len, _num_sms(q.device.index or 0),
                                   t["programs_per_sm"])
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    write_output = num_splits == 1
    if write_output:
        part_max = part_sum = part_out = out   # unused placeholders
    else:
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    window = NO_WINDOW if sliding_window is None else sliding_window
    if t["packed"]:     # codes read two to an int16, so the async copies move 16 bytes at a time
        k_cache, v_cache = k_cache.view(torch.int16), v_cache.view(torch.int16)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, *scales, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        out, part_max, part_sum, part_out,
        scale * LOG2_E, window, num_splits, group_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        scales[0].stride(0), scales[0].stride(1),
        k_cache.shape[1],
        GROUP_ROWS=max(MIN_GROUP_ROWS, triton.next_power_of_2(group_size)), HEAD_DIM=head_dim,
        BLOCK_N=t["block_n"], WRITE_OUTPUT=write_output, QUANT=fmt is not None, V_EARLY=t["v_early"],
        K_AS_A=t["k_as_a"], PACKED=t["packed"], FP8=fmt is not None and fmt.storage != torch.int8,
        num_warps=t["num_warps"], num_stages=t["num_stages"])
    if not write_output:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            meta.query_start_loc, out, part_max, part_sum, part_out,
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, num_warps=4)


# --------------------------------------------------------------------------- prefill

@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_M: tl.constexpr):
    """Largest b with ``query_start_loc[b] // BLOCK_M + b <= tile`` (binary search)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["window", "num_seqs", "group_size", "stride_bt"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                    out_ptr, scale_log2, window, num_seqs, group_size,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cache_block, stride_cache_token, stride_cache_head, stride_bt,
                    stride_scale_block, stride_scale_head,
                    block_size,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr):
    """Program (tile, head): ``BLOCK_M`` queries of one sequence (query_len > 1)
    against its cached keys, FlashAttention-2 style."""
    # Last tiles first: they see the most keys, so the long programs start early.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group_size

    seq = _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_row = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if (q_len <= 1) | (first_row >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = context_len + rows

    # Keys [key_lo, hi) are visible to some row, [mid_lo, mid_hi) to every row;
    # the loops start at key_lo rounded down to a tile.
    first_pos = context_len + first_row
    last_pos = context_len + tl.minimum(first_row + BLOCK_M, q_len) - 1
    key_lo = tl.maximum(first_pos - window + 1, 0)
    lo = key_lo // BLOCK_N * BLOCK_N
    hi = last_pos + 1
    full_lo = tl.maximum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, lo)
    full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N
    mid_lo = tl.minimum(full_lo, hi)
    mid_hi = tl.maximum(mid_lo, full_hi)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head * stride_cache_head
    scale_head_offset = kv_head * stride_scale_head
    for key_start in range(lo, mid_lo, BLOCK_N):          # window edge
        acc, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, q, q_pos, key_start, key_lo, hi, window, scale_log2,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
            block_size, stride_cache_block, stride_cache_token,
            k_scale_ptr, v_scale_ptr, scale_head_offset, stride_scale_block,
            BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=True, QUANT=QUANT)
    for key_start in range(mid_lo, mid_hi, BLOCK_N):      # inside the band
        acc, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, q, q_pos, key_start, key_lo, hi, window, scale_log2,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
            block_size, stride_cache_block, stride_cache_token,
            k_scale_ptr, v_scale_ptr, scale_head_offset, stride_scale_block,
            BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=False, QUANT=QUANT)
    for key_start in range(mid_hi, hi, BLOCK_N):          # causal diagonal
        acc, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, q, q_pos, key_start, key_lo, hi, window, scale_log2,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
            block_size, stride_cache_block, stride_cache_token,
            k_scale_ptr, v_scale_ptr, scale_head_offset, stride_scale_block,
            BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=True, QUANT=QUANT)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, sliding_window: int | None, out: torch.Tensor,
                      block_m: int = PREFILL_BLOCK_M, block_n: int = PREFILL_BLOCK_N,
                      num_warps: int = PREFILL_NUM_WARPS, num_stages: int = PREFILL_NUM_STAGES,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Write ``out`` rows of the sequences whose query length is > 1 (others untouched)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = meta.num_seqs
    group_size = num_heads // k_cache.shape[2]
    window = NO_WINDOW if sliding_window is None else sliding_window
    grid = (num_tokens // block_m + num_seqs, num_heads)
    fmt, scales = _quant_args(k_cache, k_scale, v_scale)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *scales, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        out, scale * LOG2_E, window, num_seqs, group_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        scales[0].stride(0), scales[0].stride(1),
        k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, QUANT=fmt is not None,
        num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------- backend

def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        "k_cache and v_cache must share shape and strides"
    assert k_cache.stride(3) == 1, "head_dim must be contiguous in the cache"


class TritonAttention:
    """The Triton backend of :class:`pagellm.kernels.attention.AttentionBackend`."""

    name = "triton"
    ops = triton_ops
    fused = True

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        write_kv(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale)

    def rotate_and_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        """One launch (``FUSED_ROTARY``) or the two of ``ops.rotary`` and ``write_kv``."""
        if not FUSED_ROTARY:
            self.ops.rotary(q, k, positions, cos_sin_cache)
            self.write_kv(k, v, cache, slot_mapping)
            return
        write_kv(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale,
                 Rotation(q, positions, cos_sin_cache))

    def attend(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        """Decode tokens go to the split-KV decode kernel; when any sequence has
        more than one query (``meta.max_query_len > 1``) the prefill kernel runs
        too, each skipping the other's sequences. No host sync on either path."""
        head_dim = q.shape[2]
        k_cache, v_cache = cache.k, cache.v
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"triton attention takes fp16 or bf16 queries, got {q.dtype}")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"triton attention needs a power-of-two head_dim >= 16, got {head_dim}")
        if k_cache.shape[1] & (k_cache.shape[1] - 1):
            raise ValueError(f"triton attention needs a power-of-two block size, got {k_cache.shape[1]}")
        _check_cache_layout(k_cache, v_cache)
        assert q.stride(2) == 1, "head_dim must be contiguous in q"
        out = torch.empty_like(q)
        scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
        decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, out, **scales)
        if meta.max_query_len > 1:
            prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window, out, **scales)
        return out


__all__ = ["TritonAttention", "write_kv", "decode_attention", "prefill_attention", "num_kv_splits"]
