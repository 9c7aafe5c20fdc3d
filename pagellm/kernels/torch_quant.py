"""Quantized weight formats in plain torch: packing, dequantization and the
reference matmuls the fused kernels (``triton_quant``) are checked against.

Formats (rows are output channels, ``K`` the input dimension):

* **int8**: ``q int8 [N, K]``, one scale per row: ``w = q * scale``.
* **w8a8**: int8 weights as above, and activations quantized at run time to
  int8 per token (row): ``x = qx * xscale``, ``xscale = absmax / 127`` and
  ``qx = round(x / xscale)`` (half to even); the product is an int32 matmul
  scaled by ``xscale[m] * scale[n]``.
* **int4**: ``q`` in 0..15, eight per 32-bit word, groups of ``G`` along K
  with a scale and an integer zero point each: ``w = (q - zero) * scale``.
  ``packed uint8 [N, K/2]`` is read as little-endian words ``int32 [N, K/8]``,
  interleaved in runs of ``PACK_RUN`` (128) weights: word ``w`` (0..15) of a
  run holds weights ``32 i + 2 w`` and ``32 i + 2 w + 1`` of the run in its
  nibbles ``i`` and ``i + 4`` (i = 0..3; nibble j is bits 4j..4j+3). So
  ``(word >> 4 i) & 0x000F000F`` puts two codes of adjacent weights in the
  two 16-bit halves of a register, where one LOP3 makes them a bf16x2 or
  fp16x2 pair that multiplies the pair of activations ``x[32 i + 2 w : +2]``
  read as one 32-bit word (``triton_quant``'s GEMV, two codes an
  instruction). K must be a multiple of ``PACK_RUN``.
* **GGUF blocks** (llama.cpp's layouts, bytes ``uint8 [N, K / block * bytes]``):
  Q8_0, Q5_0 (32 weights, one fp16 scale), Q4_K (256 weights in 8 groups, 6-bit
  scales and mins under fp16 super-scales), Q6_K (256 weights in 16 groups,
  int8 scales under one fp16 super-scale). ``dequantize_gguf`` turns the
  bytes of any of them into floats exactly as ``gguf.quants.dequantize``
  does; ``GGUF_DEQUANTIZERS`` lists the types served.
* **GGUF blocks for torch's CPU kernels** (``gguf_int4_groups``,
  ``requantize_int8``): Q4_K's codes as groups of 32 in the
  ``(q - 8) * scale + zero`` form of ``torch._weight_int4pack_mm_for_cpu``
  (the codes unchanged, only scale and zero rounded to the kernel's dtype);
  every other type requantized per row to int8 (round to nearest from the
  blocks' values; ``kernels.quant_ops.pack_gguf_for_cpu`` says why).

Everything here runs on any device and is vectorised over whole tensors: no
Python loop over blocks or rows.
"""
from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagellm.kernels import cpu_linear


# --------------------------------------------------------------------------- int8 / int4

def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest, symmetric, per row: (``q int8 [N, K]``, ``scale [N]`` in ``scale_dtype``), the
    codes rounded against the scale as stored."""
    scale = (w.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0).to(scale_dtype)
    q = torch.round(w.float() / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[M, K]`` -> (``q int8 [M, K]``, ``scale fp32 [M]``), symmetric per row."""
    return quantize_int8(x)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


def int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest, asymmetric, groups of ``group_size`` along K, unpacked and in fp32:
    (codes ``[N, K/G, G]`` in 0..15, scale ``[N, K/G]`` (fp16 values), zero ``[N, K/G]`` in 0..15)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1).clamp_max(0), groups.amax(dim=-1).clamp_min(0)
    scale = ((hi - lo) / 15.0).clamp_min(1e-7).half().float()     # stored in fp16, as AWQ/GPTQ store it
    zero = torch.round(-lo / scale).clamp_(0, 15)
    return torch.round(groups / scale[..., None] + zero[..., None]).clamp_(0, 15), scale, zero


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int4_groups`` as stored: (``packed uint8 [N, K/2]``, ``scale fp16 [N, K/G]``, ``zero uint8 [N, K/G]``)."""
    q, scale, zero = int4_groups(w, group_size)
    return pack_int4(q.to(torch.uint8).reshape(w.shape)), scale.half(), zero.to(torch.uint8)


def int4_round_trip(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dequantize_int4(*quantize_int4(w))`` in fp32, the same values without packing (for searches)."""
    q, scale, zero = int4_groups(w, group_size)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)


PACK_RUN = 128      # int4 weights interleaved into 16 words (see the module docstring)
INT4_PACKING = "words-pairs-128"   # the layout's name in saved checkpoints (``quant.export``)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` values in 0..15 -> ``uint8 [N, K/2]`` in the interleaved word layout."""
    n, k = q.shape
    if k % PACK_RUN:
        raise ValueError(f"int4 packing takes rows of whole runs of {PACK_RUN} weights, not {k}")
    weights = q.reshape(n, k // PACK_RUN, 4, 16, 2)                       # weight 32 i + 2 w + b: [N, run, i, w, b]
    nibbles = weights.permute(0, 1, 3, 4, 2).reshape(n, -1, 16, 8)        # [N, run, w, nibble j = 4 b + i]
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).reshape(n, k // 2)   # byte c: nibbles 2c, 2c+1


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``."""
    n, half = packed.shape
    words = packed.reshape(n, half // (PACK_RUN // 2), 16, 4)             # [N, run, word w, byte c]
    nibbles = torch.stack([words & 0xF, words >> 4], dim=-1).reshape(n, -1, 16, 2, 4)   # [N, run, w, b, i]
    return nibbles.permute(0, 1, 4, 2, 3).reshape(n, 2 * half)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = q.reshape(n, scale.shape[1], -1)
    return ((groups - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k).to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference: ``x @ dequant(q)^T + bias``."""
    return cpu_linear.linear(x, dequantize_int8(q, scale, x.dtype), bias)


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference: both operands quantized, multiplied exactly (float64 holds every sum of int8 products for
    K < 2**39, and its matmul runs on any device, fast), rescaled in float64, rounded once to x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    qx, xscale = quantize_per_token(x2)
    acc = qx.double() @ q.double().t()
    out = (acc.double() * xscale.double()[:, None] * scale.double()[None, :]).to(x.dtype).reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Reference: ``x @ dequant(packed)^T + bias``."""
    return cpu_linear.linear(x, dequantize_int4(packed, scale, zero, x.dtype), bias)


# --------------------------------------------------------------------------- GGUF blocks

def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``start`` of every block, as float32 ``[..., 1]``."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[..., 2:].contiguous().view(torch.int8).float()


def _bits(data: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian ``width``-bit fields of the bytes along the last dim (uint8, no widening)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=data.device)
    return ((data[..., None] >> shifts) & ((1 << width) - 1)).flatten(-2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    high = _bits(blocks[..., 2:6], 1)                                         # bit j of the uint32: element j
    qs = blocks[..., 6:22]
    low = torch.cat([qs & 0xF, qs >> 4], dim=-1)                              # elements 0..15, 16..31
    return d * ((low | high << 4).to(torch.int8) - 16).float()


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> two ``[..., 8]`` tensors."""
    s = scales.long()
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], dim=-1).float(), torch.cat([lo_m, hi_m], dim=-1).float()


def q4_k_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K blocks ``[..., 144]`` -> (codes ``uint8 [..., 8, 32]`` in 0..15, ``scale`` and ``minimum``
    fp32 ``[..., 8]``): group ``j`` of a block holds ``scale[j] * code - minimum[j]``."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales_mins(blocks[..., 4:16])
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)             # 4 chunks of 64 weights
    codes = torch.stack([qs & 0xF, qs >> 4], dim=-2).reshape(*blocks.shape[:-1], 8, 32)
    return codes, d * sc, dmin * m


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    codes, scale, minimum = q4_k_groups(blocks)
    return (scale[..., None] * codes.float() - minimum[..., None]).flatten(-2)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 2, 32).long()                  # [half, low/high 32, l]
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32).long()
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float().reshape(*lead, 2, 4, 2)
    d = _f16(blocks, 208)
    low = torch.cat([ql & 0xF, ql >> 4], dim=-2)                              # [half, 4 quarters, l]
    high = (qh >> (2 * torch.arange(4, device=blocks.device)[:, None])) & 3
    q = ((low | high << 4) - 32).float().reshape(*lead, 2, 4, 2, 16)          # quarter, l in two 16s
    return (d[..., None, None, None] * scales[..., None] * q).flatten(-4)


GGUF_DEQUANTIZERS = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}


def gguf_row_bytes(qtype: GGMLQuantizationType, num_columns: int) -> int:
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if num_columns % block:
        raise ValueError(f"{qtype.name} rows hold whole blocks of {block}, not {num_columns} values")
    return num_columns // block * nbytes


def dequantize_gguf(data: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype) -> torch.Tensor:
    """``uint8 [N, row bytes]`` blocks of ``qtype`` -> ``[N, K]`` in ``dtype``."""
    try:
        dequantize = GGUF_DEQUANTIZERS[qtype]
    except KeyError:
        raise ValueError(f"GGUF type {qtype.name} is not served quantized (served: "
                         f"{', '.join(t.name for t in GGUF_DEQUANTIZERS)})") from None
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rows = data.shape[0]
    return dequantize(data.reshape(rows, -1, nbytes)).reshape(rows, -1).to(dtype)


# --------------------------------------------------------------------------- GGUF blocks for torch's CPU kernels

def gguf_int4_groups(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows ``uint8 [N, row bytes]`` -> (codes ``uint8 [N, K]``, ``scale`` and ``zero`` fp32
    ``[N, K / 32]``) with weight ``k`` of group ``g`` equal to ``(code - 8) * scale[g] + zero[g]``."""
    rows = data.shape[0]
    codes, scale, minimum = q4_k_groups(data.reshape(rows, -1, GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1]))
    return codes.reshape(rows, -1), scale.reshape(rows, -1), (8 * scale - minimum).reshape(rows, -1)


def requantize_int8(data: torch.Tensor, qtype: GGMLQuantizationType, scale_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``qtype`` blocks -> per-row int8 (``q int8 [N, K]``, ``scale [N]`` in ``scale_dtype``),
    rounded to nearest with the scale as stored (no further rounding at run time)."""
    return quantize_int8(dequantize_gguf(data, qtype, torch.float32), scale_dtype)
