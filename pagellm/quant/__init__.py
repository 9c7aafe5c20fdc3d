"""Weight formats: the registry behind ``EngineConfig.quantization``.

A format turns the opened checkpoint (None for random weights) into a policy:
given a layer's name in the model (``layers.3.mlp.down_proj``, ``embed_tokens``,
``lm_head``) the policy returns the ``LinearMethod`` (``model.layers``,
``quant.methods``) that stores and applies that layer's matrix. The model, the
loaders, the attention and KV code and the sampler never change for a format.

* ``none``: every matrix dense in the model dtype (a GGUF file is dequantized).
* ``int8``: block linears weight-only int8, per output channel; ``int4``: groups
  of 128, asymmetric. Embeddings and the LM head stay dense (as the analyzer
  assumes). A float checkpoint is quantized at load by round-to-nearest.
* ``gguf``: every matrix kept in the GGUF file's own blocks.
* ``auto``: ``gguf`` for a GGUF file, ``none`` otherwise.
"""
from __future__ import annotations

from collections.abc import Callable

from gguf import GGMLQuantizationType

from pagellm.model.layers import LinearMethod, dense_everywhere

MethodPolicy = Callable[[str], LinearMethod]


def _blocks_only(method: LinearMethod) -> MethodPolicy:
    """``method`` for the transformer blocks' linears, dense for the embedding and LM head."""
    from pagellm.model.layers import DENSE
    return lambda prefix: method if prefix.startswith("layers.") else DENSE


def _int8(checkpoint) -> MethodPolicy:
    from pagellm.quant.methods import Int8LinearMethod
    return _blocks_only(Int8LinearMethod())


def _int4(checkpoint) -> MethodPolicy:
    from pagellm.quant.methods import Int4LinearMethod
    return _blocks_only(Int4LinearMethod(group_size=128))


def _gguf(checkpoint) -> MethodPolicy:
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
    return lambda prefix: GGUFLinearMethod([types[name] for name in LlamaForCausalLM.checkpoint_names(prefix)])


QUANTIZATION_FORMATS: dict[str, Callable[[object], MethodPolicy]] = {
    "none": lambda checkpoint: dense_everywhere,
    "int8": _int8,
    "int4": _int4,
    "gguf": _gguf,
}


def check_quantization(name: str) -> None:
    if name != "auto" and name not in QUANTIZATION_FORMATS:
        raise ValueError(f"quantization must be one of auto, {', '.join(QUANTIZATION_FORMATS)}, got {name!r}")


def resolve_quantization(name: str, checkpoint) -> str:
    """``auto`` -> the format the checkpoint is stored in."""
    check_quantization(name)
    if name != "auto":
        return name
    return "gguf" if checkpoint is not None and checkpoint.format == "gguf" else "none"


def quantization_policy(name: str, checkpoint=None) -> MethodPolicy:
    return QUANTIZATION_FORMATS[resolve_quantization(name, checkpoint)](checkpoint)


def keeps_blocks(name: str, checkpoint) -> bool:
    """Whether the checkpoint's quantized tensors must reach the loaders as blocks, not floats."""
    return resolve_quantization(name, checkpoint) == "gguf"
