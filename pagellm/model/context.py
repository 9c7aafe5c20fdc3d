"""What one forward pass needs besides token ids and positions.

The worker builds a ``ForwardContext`` per step and passes it down the layers;
nothing lives in globals, so two engines (a draft and a target model, or two
tests) can run side by side in one process.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from pagellm.kernels.attention import AttentionBackend, AttentionMetadata, LayerKVCache


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    kv_caches: Sequence[LayerKVCache]   # indexed by layer
    backend: AttentionBackend
    kv_ready: Sequence[torch.cuda.Event | None] = ()   # per layer: wait before touching its KV (host swaps)

    def kv(self, layer_index: int) -> LayerKVCache:
        """Layer ``layer_index``'s cache, once the swaps into and out of it are done (``KVCache.swap``)."""
        if self.kv_ready and self.kv_ready[layer_index] is not None:
            self.kv_ready[layer_index].wait()
        return self.kv_caches[layer_index]

    @property
    def ops(self) -> ModuleType:
        """The elementwise ops (rms_norm, rotary, silu_and_mul) that go with the backend."""
        return self.backend.ops
