"""Key smoothing for a quantized KV cache, folded into the weights at load.

A quantized cache keeps one scale per token per KV head (``kernels.kv_quant``),
set by the largest channel of the vector. Some models' keys have a few channels
far larger than the rest (Qwen2.5's ``k_proj`` has a large bias): they set the
scale and the other channels keep only a few levels. Dividing key channel ``c``
by ``s_c`` and multiplying the matching query channel by ``s_c`` leaves every
``q . k`` unchanged and evens the key channels out before they are quantized.

Both are folded into the merged q|k|v projection's output rows (and bias) with
``Linear.scale_outputs``, so no kernel and no model code changes: key rows of
KV head ``g`` by ``1 / s``, the query rows of every head of ``g``'s group by
``s``. Rotary embedding rotates channel pairs ``(i, i + head_dim / 2)``; ``s``
is equal on both channels of a pair, so the rotation commutes with it.

``s`` comes from the weights alone: a key channel's typical magnitude is
estimated as ``|b_c| + ||W_c * g||`` (bias, and the row of ``k_proj`` times the
input norm's weight ``g`` against a unit-RMS input), a pair's as the root sum of
squares of its two channels, and ``s = estimate ^ alpha`` normalised to a
geometric mean of 1 per head. The matrix ``W * g`` is read through the layer's
own ``apply`` (on the rows of ``diag(g)``), so it works for every weight format.
"""
from __future__ import annotations

import torch

from pagellm.model.llama import Attention, LlamaForCausalLM

# The exponent per cache format, measured on Qwen2.5-Coder-0.5B and 1.5B (1,024 tokens, README): int8's
# uniform steps want the channels evened half-way (0.5: +0.27% / -0.01% perplexity; 1.0: -0.05% / +0.59%).
# fp8 wants none: its error is relative to each value, which scaling a channel does not change (a model in
# bf16, as served on a GPU: 0 gives the 0.5B +1.04%, 0.5 +3.58%, 1.0 +2.52%; 1.0 broke the 1.5B).
KEY_SMOOTHING_ALPHA = {"int8": 0.5, "fp8": 0.0}


@torch.inference_mode()
def key_channel_estimates(attn: Attention, norm_weight: torch.Tensor) -> torch.Tensor:
    """``[Hkv, D]``: the typical magnitude of each key channel of ``attn``."""
    qkv = attn.qkv_proj
    q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    rows = qkv(torch.diag(norm_weight.to(qkv.params_dtype)))[:, q_size:q_size + kv_size].float()
    bias = torch.zeros(kv_size, device=rows.device) if qkv.bias is None else qkv.bias[q_size:q_size + kv_size].float()
    weight = rows - bias                                       # row j: g_j * W[:, j]
    return (bias.abs() + weight.norm(dim=0)).view(attn.num_kv_heads, attn.head_dim)


def smoothing_factors(estimates: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s [Hkv, D]`` from channel estimates: equal on each rotary pair, geometric mean 1 per head."""
    half = estimates.shape[-1] // 2
    pair = estimates[:, :half].hypot(estimates[:, half:]).clamp_min(1e-6).pow(alpha)
    pair = pair / pair.log().mean(dim=-1, keepdim=True).exp()
    return torch.cat([pair, pair], dim=-1)


def smooth_keys(model: LlamaForCausalLM, alpha: float) -> None:
    """Fold per-channel key smoothing into the q|k|v projection of every layer the model
    holds (a pipeline stage holds its own range; a tensor-parallel rank its own heads,
    whose factors are those one process gives them: they depend on the head alone). ``alpha`` 0: every
    ``s`` is 1, nothing to fold."""
    if alpha == 0:
        return
    for layer in model.layers[model.layer_range[0]:model.layer_range[1]]:
        attn = layer.self_attn
        s = smoothing_factors(key_channel_estimates(attn, layer.input_layernorm.weight), alpha)
        group = attn.num_heads // attn.num_kv_heads
        factors = torch.cat([s.repeat_interleave(group, dim=0).flatten(), 1.0 / s.flatten(),
                             torch.ones(s.numel(), device=s.device)])
        attn.qkv_proj.scale_outputs(factors)
