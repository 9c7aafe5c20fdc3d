"""Decoder layers whose weights live off the device and stream in one layer
ahead of use (``EngineConfig.cpu_offload_memory``, ``disk_offload``).

``LayerOffload(layers, device)`` takes decoder layers whose parameters the
builder made in host memory (``build_model(host_layers=...)``): pinned when
the device is CUDA, or, with ``disk_offload``, views of one safetensors file's
shared mmap (``map_into_file``, done before any weight is read), so the
loaders write straight into the file's pages, which the kernel writes back
and may drop: host memory holds what the page cache keeps, not the
offloaded bytes. Those parameters, whatever the layer's ``LinearMethod`` made
them (dense weights, int8/int4 codes and scales, GGUF blocks), stay where
they are. The device holds two buffers of one layer's parameters each
(every decoder layer has the same shapes): double buffering.

A forward pre-hook on each offloaded layer waits for the copy of its
parameters, points them at the buffer holding them and starts copying the
next offloaded layer (cyclically: the last fetches the first, for the next
step) into the other buffer. The copies run on a side stream that first
waits for everything the compute stream has queued, so the buffer's previous
layer is done with it; each copy thus overlaps one layer's compute, and a
step costs at least (offloaded bytes) / (host-to-device bandwidth). A buffer
keeps the layer it holds until overwritten (weights never change), so with
two or fewer layers offloaded nothing moves after the first step, and
offloading ``k`` layers saves ``k - 2`` layers of device memory.

On the CPU the buffers are separate tensors and the copies run in place.
CUDA graphs would replay the copies of the step they were captured in, so
the runner's graphs cover only the resident layers before the offloaded ones
(``CudaGraphs.eager_from``); these run eagerly after each replay.
"""
from __future__ import annotations

import functools
import json
import struct
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn


class LayerOffload:
    def __init__(self, layers: list[nn.Module], device: torch.device) -> None:
        self.layers = layers
        self.params = [dict(layer.named_parameters()) for layer in layers]
        shapes = {name: (p.shape, p.dtype) for name, p in self.params[0].items()}
        if any({name: (p.shape, p.dtype) for name, p in params.items()} != shapes for params in self.params):
            raise ValueError("offloaded layers must have the same parameter shapes")
        self.host = [{name: p.data for name, p in params.items()} for params in self.params]
        self.buffers = [{name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype)
                         in shapes.items()} for _ in range(2)]
        self.holds: list[int | None] = [None, None]   # the layer each buffer holds (or is being filled with)
        self._current = 1                             # the buffer of the layer that ran last
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready: list[torch.cuda.Event | None] = [None, None]
        for index, layer in enumerate(layers):
            self._point(index, 0)
            layer.register_forward_pre_hook(functools.partial(self._before, index))

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.host for t in tensors.values())

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.buffers for t in tensors.values())

    def _before(self, index: int, module: nn.Module, args) -> None:
        slot = self.holds.index(index) if index in self.holds else self._fetch(index, 1 - self._current)
        if self._ready[slot] is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._ready[slot])
        self._point(index, slot)
        self._current = slot
        following = (index + 1) % len(self.layers)
        if following not in self.holds:
            self._fetch(following, 1 - slot)

    def _fetch(self, index: int, slot: int) -> int:
        """Start copying layer ``index`` into buffer ``slot`` once the compute queued so far is done."""
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(stream.device))
            for name, tensor in self.host[index].items():
                self.buffers[slot][name].copy_(tensor, non_blocking=True)
            if stream is not None:
                self._ready[slot] = stream.record_event()
        self.holds[slot] = index
        return slot

    def _point(self, index: int, slot: int) -> None:
        for name, param in self.params[index].items():
            param.data = self.buffers[slot][name]


OFFLOAD_FILE = "offloaded-layers.safetensors"   # in the ``disk_offload`` folder


def map_into_file(layers: list[nn.Module], path: Path) -> None:
    """Point every parameter of ``layers`` at its place in a safetensors file
    at ``path`` (created at its full size, sparse, and mapped shared): what is
    written into a parameter from now on is written into the file. Tensors go
    by decreasing element size, so each starts aligned to its dtype; they are
    named ``{layer}.{parameter}``."""
    params = [(f"{i}.{name}", p) for i, layer in enumerate(layers) for name, p in layer.named_parameters()]
    params.sort(key=lambda item: -item[1].element_size())
    header, offset = {}, 0
    for name, p in params:
        size = p.numel() * p.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(start + offset)
    mapped = torch.from_file(str(path), shared=True, size=start + offset, dtype=torch.uint8)
    for name, p in params:
        begin, end = header[name]["data_offsets"]
        p.data = mapped[start + begin:start + end].view(p.dtype).view(p.shape)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                       torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
