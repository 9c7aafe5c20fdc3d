"""The Llama-family decoder (Llama 1/2/3, Qwen2/2.5, Mistral): one
implementation, switched by ModelConfig (QKV bias, tied embeddings, rope
scaling, sliding window, MHA/GQA/MQA through num_key_value_heads).

Weight matrices come from a ``LayerFactory`` (see ``layers``), so the model
does not know how they are stored; the KV cache and the attention backend
come in the per-step ``ForwardContext``, so it does not know the pool's
layout either.

Under pipeline parallelism a model holds only its stage's layers
(``layer_range``): the first stage the embedding, the last the final norm and
the LM head (and, tied, the embedding it reads); the others pass on
``(hidden, residual)``. A layer's KV sits at its index within the stage.

The last ``host_layers`` decoder layers are made in host memory whatever the
ambient device (weight offload, ``model.offload``, streams them from there), so
a model bigger than the device is built with every layer in its final home.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from pagellm.model.config import ModelConfig
from pagellm.model.context import ForwardContext
from pagellm.model.layers import LayerFactory, RotaryEmbedding


class Attention(nn.Module):
    """This rank's heads (all of them with one rank), and its slot ``kv_index`` in the stage's KV pool."""

    def __init__(self, config: ModelConfig, kv_index: int, rotary: RotaryEmbedding, make: LayerFactory,
                 prefix: str) -> None:
        super().__init__()
        self.kv_index = kv_index
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj = make.qkv(f"{prefix}.qkv_proj", config.hidden_size, config.head_dim,
                                 config.num_attention_heads, config.num_key_value_heads, bias=config.attention_bias)
        self.split_sizes = self.qkv_proj.output_sizes
        self.num_heads, self.num_kv_heads = (size // self.head_dim for size in self.split_sizes[:2])
        self.o_proj = make.row(f"{prefix}.o_proj", config.q_size, config.hidden_size)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        cache = ctx.kv(self.kv_index)
        ctx.backend.rotate_and_write_kv(q, k, v, positions, self.rotary.cos_sin_cache, cache, ctx.meta.slot_mapping)
        out = ctx.backend.attend(q, cache, ctx.meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, make: LayerFactory, prefix: str) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (silu)")
        self.gate_up_proj = make.column(f"{prefix}.gate_up_proj", config.hidden_size,
                                        [config.intermediate_size] * 2)
        self.down_proj = make.row(f"{prefix}.down_proj", config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x, ctx.ops))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, kv_index: int, rotary: RotaryEmbedding,
                 make: LayerFactory) -> None:
        super().__init__()
        prefix = f"layers.{layer_index}"
        self.self_attn = Attention(config, kv_index, rotary, make, f"{prefix}.self_attn")
        self.mlp = MLP(config, make, f"{prefix}.mlp")
        self.input_layernorm = make.norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = make.norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual, ctx.ops)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual, ctx.ops)
        return self.mlp(x, ctx), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> (merged layer, shard index)
    packed_modules_mapping = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @classmethod
    def checkpoint_names(cls, prefix: str) -> list[str]:
        """The checkpoint (HF) names of the weight matrices a layer holds, shard
        by shard: ``layers.0.self_attn.qkv_proj`` -> the q, k and v projections."""
        module, _, leaf = prefix.rpartition(".")
        parts = [part for part, (merged, _) in cls.packed_modules_mapping.items() if merged == leaf] or [leaf]
        hf_prefix = "" if prefix == "lm_head" else "model."
        return [f"{hf_prefix}{module + '.' if module else ''}{part}.weight" for part in parts]

    def __init__(self, config: ModelConfig, make: LayerFactory, layer_range: tuple[int, int] | None = None,
                 host_layers: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_range = start, end = layer_range or (0, config.num_hidden_layers)
        self.is_first_stage, self.is_last_stage = start == 0, end == config.num_hidden_layers
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling)
        if self.is_first_stage or (self.is_last_stage and config.tie_word_embeddings):
            self.embed_tokens = make.vocab("embed_tokens", config.hidden_size, config.vocab_size)
        # Model-wide indices (``layers.5``) match the checkpoint; other stages' layers are empty modules.
        self.layers = nn.ModuleList(self._decoder_layer(config, i, make, on_host=i >= end - host_layers)
                                    if start <= i < end else nn.Module() for i in range(config.num_hidden_layers))
        if self.is_last_stage:
            self.norm = make.norm(config.hidden_size, config.rms_norm_eps)
            # Tied: the LM head is the embedding matrix itself (one module, one copy of the weights).
            self.lm_head = self.embed_tokens if config.tie_word_embeddings else \
                make.vocab("lm_head", config.hidden_size, config.vocab_size)

    def _decoder_layer(self, config: ModelConfig, index: int, make: LayerFactory, on_host: bool) -> DecoderLayer:
        with torch.device("cpu") if on_host else nullcontext():
            return DecoderLayer(config, index, index - self.layer_range[0], self.rotary, make)

    def holds(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` (HF name) belongs to this stage."""
        name = name.removeprefix("model.")
        if name.startswith("layers."):
            return self.layer_range[0] <= int(name.split(".")[1]) < self.layer_range[1]
        if name.startswith("embed_tokens."):
            return hasattr(self, "embed_tokens")
        return self.is_last_stage

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                carried: tuple[torch.Tensor, torch.Tensor] | None = None, span: tuple[int, int] | None = None):
        """Hidden states ``[T, hidden]`` after the final norm, for a flat batch
        of tokens; a stage other than the first starts from the ``(hidden,
        residual)`` its predecessor ``carried``, and one other than the last
        returns its own. ``span``: the layers to run (default: the stage's);
        one that starts later takes ``carried`` too, one that ends earlier
        returns ``(hidden, residual)`` (a CUDA graph over the resident layers
        of a model whose last layers stream from the host)."""
        start, end = span or self.layer_range
        x, residual = carried if carried is not None else (self.embed_tokens.embed(input_ids), None)
        for layer in self.layers[start:end]:
            x, residual = layer(positions, x, residual, ctx)
        if not self.is_last_stage or end < self.layer_range[1]:
            return x, residual
        x, _ = self.norm(x, residual, ctx.ops)
        return x

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits, into ``out`` when given (a CUDA graph's shared output buffer)."""
        logits = self.lm_head(hidden)
        return logits.float() if out is None else out.copy_(logits)
