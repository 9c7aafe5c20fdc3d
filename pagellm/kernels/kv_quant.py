"""Quantized KV-cache formats (``EngineConfig.kv_cache_dtype``), in plain torch:
the reference the Triton write and attention kernels are checked against.

A K (or V) vector of one token and one KV head is stored as ``head_dim`` codes
and one fp16 scale, symmetric, so ``value ~ code * scale``:

* ``int8``: ``scale = amax / 127``, codes ``round(x / scale)`` in [-127, 127];
* ``fp8``:  ``scale = amax / 448``, codes ``x / scale`` cast to float8 e4m3.

One scale per token per head, not per tensor: a token's scale is fixed when it
is written, so a block's codes never need re-scaling and blocks are shared,
copied and freed exactly like float ones (``pagellm.engine.kv_cache`` keeps the
scales beside their blocks). The scale is rounded to fp16 before the codes are
made, so ``code * stored_scale`` is what was quantized. 2 bytes of scale per
``head_dim`` codes is ``pagellm.sizing.KV_SCALE_BYTES``.

The K and V scales of one token and head sit side by side in memory
(``scale_pairs``): the Triton attention kernels read them as one int32 a key,
a load wide enough for the pipeliner to issue ahead with the code tiles (a
2-byte load a key stays synchronous, and its latency was paid every tile).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
SCALE_MIN = 2.0 ** -20    # a zero vector's scale: not zero in fp16, so dividing by it is safe


@dataclass(frozen=True)
class KVFormat:
    name: str
    storage: torch.dtype    # the codes' dtype in the pool
    qmax: float             # largest code magnitude


KV_FORMATS = {"int8": KVFormat("int8", torch.int8, 127.0),
              "fp8": KVFormat("fp8", torch.float8_e4m3fn, 448.0)}
KV_CACHE_DTYPES = ("auto", *KV_FORMATS)


def kv_format(name: str) -> KVFormat | None:
    """The quantized format ``name``, None for ``auto`` (the model dtype)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_FORMATS.get(name)


def format_of(storage: torch.dtype) -> KVFormat | None:
    """The format whose codes are stored as ``storage``, None for a float cache."""
    return next((f for f in KV_FORMATS.values() if f.storage == storage), None)


def check_kv_cache_dtype(name: str, device: torch.device) -> None:
    """Fail early for a format the device cannot hold: fp8 needs a CUDA device of
    compute capability 8.9 or later (Ada, Hopper); the CPU converts in software."""
    kv_format(name)
    if name == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype fp8 needs a GPU with fp8 support (compute capability 8.9+); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use kv_cache_dtype int8")


def scale_pairs(*shape: int, device: torch.device | str | None = None) -> torch.Tensor:
    """fp16 scales ``[2 (K, V), *shape]`` (uninitialised) whose K and V entries of
    the same index are adjacent in memory, K first: ``[..., num_blocks, Hkv,
    block_size]`` views of K and of V, each with a last stride of 2."""
    return torch.empty(*shape, 2, dtype=SCALE_DTYPE, device=device).movedim(-1, 0)


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> (codes ``[..., D]`` in ``fmt.storage``, fp16 scales ``[...]``)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / fmt.qmax).clamp_min(SCALE_MIN).to(SCALE_DTYPE)
    scaled = xf / scale.float()[..., None]
    if fmt.storage == torch.int8:
        return scaled.round().clamp(-fmt.qmax, fmt.qmax).to(torch.int8), scale
    return scaled.clamp(-fmt.qmax, fmt.qmax).to(fmt.storage), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes [..., D] * scale [...]`` in ``dtype``."""
    return (codes.float() * scale.float()[..., None]).to(dtype)
