"""Weight formats: the registry behind ``EngineConfig.quantization``.

A format is a policy: given a layer's name in the model (``layers.3.mlp.down_proj``,
``embed_tokens``, ``lm_head``) it returns the ``LinearMethod`` (``model.layers``)
that stores and applies that layer's matrix. ``none`` keeps every matrix dense
in the model dtype. A new format is one more entry here: the model, the
loaders, the attention and KV code and the sampler stay as they are.
"""
from __future__ import annotations

from collections.abc import Callable

from pagellm.model.layers import LinearMethod, dense_everywhere

MethodPolicy = Callable[[str], LinearMethod]

QUANTIZATION_FORMATS: dict[str, MethodPolicy] = {"none": dense_everywhere}


def quantization_policy(name: str) -> MethodPolicy:
    try:
        return QUANTIZATION_FORMATS[name]
    except KeyError:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_FORMATS)}, got {name!r}") from None
