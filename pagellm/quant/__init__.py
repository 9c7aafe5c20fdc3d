"""Weight formats: the registry behind ``EngineConfig.quantization``.

A format turns the opened checkpoint (None for random weights) into a policy:
given a layer's name in the model (``layers.3.mlp.down_proj``, ``embed_tokens``,
``lm_head``) the policy returns the ``LinearMethod`` (``model.layers``,
``quant.methods``) that stores and applies that layer's matrix. The model, the
loaders, the attention and KV code and the sampler never change for a format.

* ``none``: every matrix dense in the model dtype (a GGUF file is dequantized).
* ``int8``: block linears weight-only int8, per output channel; ``int4``: groups
  of 128, asymmetric. An untied LM head is int8 per output channel in both
  (and in ``int4-awq``): at batch 1 it is the largest single matrix read per
  token (1 GB in bf16 for Llama-3-8B, a fifth of the bytes an int4 token reads), and logits keep
  int8's accuracy where 4-bit groups would cost more. The embedding (and a
  tied LM head, which is the embedding) stays dense; the analyzer counts the
  same (``sizing``). A float checkpoint is quantized at load by round-to-nearest.
* ``int4-awq``: ``int4`` with AWQ scales searched on a calibration pass at load.
* ``w8a8``: int8 weights and per-token int8 activations, SmoothQuant-smoothed by
  a calibration pass at load (random weights: no smoothing).
* ``gguf``: every matrix kept in the GGUF file's own blocks; on the CPU the
  linears are repacked at load for torch's packed CPU matmuls (Q4_K codes
  kept, other types requantized to per-row int8; ``quant_ops.pack_gguf_for_cpu``)
  and only an untied token embedding stays in blocks. A tied one is the LM
  head, packed as int8 (whose rows serve the lookups); so is the embedding of
  a file that holds a tied matrix twice (``Checkpoint.sharing_embedding``,
  which the engine applies in this format), loaded once from ``output.weight``.
* ``auto``: ``gguf`` for a GGUF file, ``none`` for other float checkpoints.
* None (the default): ``none``, except that a checkpoint written by ``pagellm
  quantize`` always runs in its stored format (its ``quantization_config``).

A checkpoint written by ``pagellm quantize`` holds codes, scales and smoothing
vectors under the checkpoint's tensor names (``...q_proj.qweight``), so it loads
without calibrating or quantizing anything.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from pagellm.model.layers import DENSE, LinearMethod, dense_everywhere

logger = logging.getLogger("pagellm")
GROUP_SIZE = 128
SAVED_METHOD = "pagellm"     # quantization_config.quant_method of checkpoints written by `pagellm quantize`
MethodPolicy = Callable[[str], LinearMethod]


def _blocks_only(method: Callable[[str], LinearMethod]) -> MethodPolicy:
    """``method(prefix)`` for the transformer blocks' linears, dense for the embedding and LM head."""
    return lambda prefix: method(prefix) if prefix.startswith("layers.") else DENSE


def _weight_only(method: Callable[[str], LinearMethod]) -> MethodPolicy:
    """``_blocks_only``, and an untied LM head (prefix ``lm_head``; a tied one is ``embed_tokens``) as int8
    per output channel, without smoothing (calibration records the blocks' inputs only)."""
    from pagellm.quant.methods import Int8LinearMethod
    blocks = _blocks_only(method)
    return lambda prefix: Int8LinearMethod() if prefix == "lm_head" else blocks(prefix)


def saved_format(checkpoint) -> dict | None:
    """The ``quantization_config`` of a checkpoint written by ``pagellm quantize``, else None."""
    if checkpoint is None or checkpoint.format != "hf":
        return None
    saved = checkpoint.source.config_dict.get("quantization_config")
    return saved if saved and saved.get("quant_method") == SAVED_METHOD else None


def _smoothing(name: str, checkpoint, config) -> Callable[[str], dict]:
    """Per layer, how its input smoothing arrives: loaded (a saved checkpoint
    holding the layer's ``input_scale``), calibrated now (a float checkpoint;
    AWQ scales some layers only, the others are not smoothed), or none
    (random weights)."""
    if saved_format(checkpoint) is not None:
        from pagellm.model.llama import LlamaForCausalLM
        names = set(checkpoint.tensor_names())
        return lambda prefix: {"smoothed": LlamaForCausalLM.checkpoint_names(prefix)[0].removesuffix(".weight")
                               + ".input_scale" in names}
    if checkpoint is None or name not in CALIBRATED_FORMATS:
        if name in CALIBRATED_FORMATS:
            logger.warning(f"quantization {name!r} without a calibration pass (random weights)")
        return lambda prefix: {}
    from pagellm.quant.calibrate import calibrated_smoothing
    scales = calibrated_smoothing(config, "int4" if name == "int4-awq" else name, GROUP_SIZE)
    return lambda prefix: {"smoothing": scales.get(prefix)}


def _int8(checkpoint, config) -> MethodPolicy:
    from pagellm.quant.methods import Int8LinearMethod
    smoothing = _smoothing("int8", checkpoint, config)
    return _weight_only(lambda prefix: Int8LinearMethod(**smoothing(prefix)))


def _w8a8(checkpoint, config) -> MethodPolicy:
    from pagellm.quant.methods import W8A8LinearMethod
    smoothing = _smoothing("w8a8", checkpoint, config)
    return _blocks_only(lambda prefix: W8A8LinearMethod(**smoothing(prefix)))


def _int4(checkpoint, config, name: str = "int4") -> MethodPolicy:
    from pagellm.quant.methods import Int4LinearMethod
    smoothing = _smoothing(name, checkpoint, config)
    return _weight_only(lambda prefix: Int4LinearMethod(GROUP_SIZE, **smoothing(prefix)))


def _gguf(checkpoint, config) -> MethodPolicy:
    """Each layer keeps the types its shards have in the file; a type no kernel serves is refused now,
    before any weight is read."""
    from pagellm.kernels.torch_quant import GGUF_DEQUANTIZERS
    from pagellm.model.llama import LlamaForCausalLM
    from pagellm.quant.methods import FLOAT_GGUF_TYPES, GGUFLinearMethod

    if checkpoint is None or checkpoint.format != "gguf":
        raise ValueError("quantization 'gguf' serves a GGUF file's own blocks: MODEL must be a .gguf file")
    types = checkpoint.tensor_types()
    served = {*GGUF_DEQUANTIZERS, *FLOAT_GGUF_TYPES}
    if unserved := sorted({t.name for t in types.values() if t not in served}):
        raise ValueError(f"quantization 'gguf' cannot serve {', '.join(unserved)} blocks (served: "
                         f"{', '.join(t.name for t in GGUF_DEQUANTIZERS)}); use quantization 'none'")
    cpu = config is not None and config.torch_device.type == "cpu"
    tied = checkpoint.config.tie_word_embeddings     # the embedding is the LM head: packed for its matmul too
    return lambda prefix: GGUFLinearMethod([types[name] for name in LlamaForCausalLM.checkpoint_names(prefix)],
                                           cpu_packed=cpu and (prefix != "embed_tokens" or tied),
                                           lookups=prefix == "embed_tokens")


QUANTIZATION_FORMATS: dict[str, Callable[[object, object], MethodPolicy]] = {
    "none": lambda checkpoint, config: dense_everywhere,
    "int8": _int8,
    "int4": _int4,
    "int4-awq": lambda checkpoint, config: _int4(checkpoint, config, "int4-awq"),
    "w8a8": _w8a8,
    "gguf": _gguf,
}
CALIBRATED_FORMATS = ("int4-awq", "w8a8")
SAVABLE_FORMATS = ("int8", "int4", "int4-awq", "w8a8")


def check_quantization(name: str | None) -> None:
    if name not in (None, "auto") and name not in QUANTIZATION_FORMATS:
        raise ValueError(f"quantization must be one of auto, {', '.join(QUANTIZATION_FORMATS)}, got {name!r}")


def resolve_quantization(name: str | None, checkpoint) -> str:
    """The format to run: a saved quantized checkpoint's own (for None, ``auto``
    or that name); ``auto``: ``gguf`` for a GGUF file; None: ``none``."""
    check_quantization(name)
    if saved := saved_format(checkpoint):
        stored = saved["format"]
        _check_packing(saved, checkpoint)
        if name not in (None, "auto", stored):
            raise ValueError(f"quantization {name!r}: this checkpoint is stored quantized as {stored!r}; "
                             f"use quantization 'auto' or {stored!r}")
        return stored
    if name != "auto":
        return name or "none"
    return "gguf" if checkpoint is not None and checkpoint.format == "gguf" else "none"


def _check_packing(saved: dict, checkpoint) -> None:
    """A saved int4 checkpoint holds its codes in the layout it was written with; one in an earlier layout
    than ``torch_quant.INT4_PACKING`` (16 weights apart until the GEMV's bf16x2 pairs) would read as other
    codes, so it is refused."""
    from pagellm.kernels.torch_quant import INT4_PACKING
    packing = saved.get("int4_packing", "pairs")
    if saved["format"] == "int4" and packing != INT4_PACKING:
        raise ValueError(f"{checkpoint.path}: int4 codes packed as {packing!r}, this engine reads "
                         f"{INT4_PACKING!r}; write the checkpoint again with `pagellm quantize`")


def check_quantization_fits(name: str, model_config, device: torch.device) -> None:
    """ValueError naming the option when the model or the device cannot run format
    ``name`` (checked before any weight is read)."""
    if name in ("int4", "int4-awq"):
        sizes = {"hidden_size": model_config.hidden_size, "intermediate_size": model_config.intermediate_size,
                 "attention heads x head_dim": model_config.q_size}
        if bad := [f"{k} {v}" for k, v in sizes.items() if v % GROUP_SIZE]:
            raise ValueError(f"quantization {name!r} quantizes groups of {GROUP_SIZE} input channels, which do "
                             f"not divide this model's {', '.join(bad)}; use quantization 'int8'")
    if name == "w8a8":
        from pagellm.kernels.quant_ops import int_mm_supported
        if not int_mm_supported(device):
            raise ValueError(f"quantization 'w8a8' needs an int8 matmul (torch._int_mm), which {device} lacks; "
                             f"use quantization 'int8' (weight-only)")


def quantization_policy(name: str, checkpoint=None, config=None) -> MethodPolicy:
    """The policy of format ``name`` (already resolved) for ``checkpoint``;
    ``config`` (the ``EngineConfig``) drives a calibration pass where one is needed."""
    return QUANTIZATION_FORMATS[name](checkpoint, config)


def keeps_blocks(name: str, checkpoint) -> bool:
    """Whether the checkpoint's quantized tensors must reach the loaders as blocks, not floats."""
    return resolve_quantization(name, checkpoint) == "gguf"
