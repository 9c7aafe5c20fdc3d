"""Decoder layers whose weights live off the device and stream in one layer
ahead of use (``EngineConfig.cpu_offload_memory``, ``disk_offload``).

``LayerOffload(layers, device, disk_folder)`` takes decoder layers whose
parameters the builder made in host memory (``build_model(host_layers=...)``,
pinned when the device is CUDA; the rest of the model is on the device).
Those parameters, whatever the layer's ``LinearMethod`` made them (dense
weights, int8/int4 codes and scales, GGUF blocks), stay where they are, or,
with ``disk_folder``, go to a safetensors file there read through mmap (pages
come from disk as a copy needs them). The device holds two buffers of one layer's parameters each
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
from safetensors.torch import save_file
from torch import nn


class LayerOffload:
    def __init__(self, layers: list[nn.Module], device: torch.device, disk_folder: str | None = None) -> None:
        self.layers = layers
        self.params = [dict(layer.named_parameters()) for layer in layers]
        shapes = {name: (p.shape, p.dtype) for name, p in self.params[0].items()}
        if any({name: (p.shape, p.dtype) for name, p in params.items()} != shapes for params in self.params):
            raise ValueError("offloaded layers must have the same parameter shapes")
        host = [{name: p.data for name, p in params.items()} for params in self.params]
        self.host = (host if disk_folder is None
                     else _mmap_safetensors(host, Path(disk_folder) / "offloaded-layers.safetensors"))
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


def _mmap_safetensors(tensors: list[dict[str, torch.Tensor]], path: Path) -> list[dict[str, torch.Tensor]]:
    """Write the layers' tensors to one safetensors file and read them back as views of its mmap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{i}.{name}": t.contiguous() for i, layer in enumerate(tensors) for name, t in layer.items()},
              str(path))
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    mapped = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    out: list[dict[str, torch.Tensor]] = [{} for _ in tensors]
    for i, layer in enumerate(tensors):
        for name, t in layer.items():
            start, end = header[f"{i}.{name}"]["data_offsets"]
            out[i][name] = mapped[8 + header_len + start:8 + header_len + end].view(t.dtype).view(t.shape)
    return out
