"""The KV cache's owner: layout, dtype, per-layer views, the null block and
block copies, in one object.

The pool is one tensor ``[2 (K, V), num_layers, num_physical_blocks,
block_size, num_kv_heads, head_dim]``; layer ``i`` sees it as a
``LayerKVCache`` (``kernels.attention``) and nothing else, so the model and the
attention backends never index the pool. Blocks ``0 .. num_blocks-1`` are the
ones the block manager hands out. With a sliding window one more block, the
*null block* (id ``num_blocks``), stands in the block tables for pages a
sequence has given back behind its window: never allocated, never written,
never read (attention masks those positions), but a valid index. This is the
only place that rule is made; the block manager is told the id.

Everything that depends on how KV is stored (a quantized dtype and its scales,
a host-side swap pool) belongs here; the block manager deals in block ids only.

The host pool (``num_host_blocks`` > 0) lives in host memory (pinned when the
pool is on CUDA) as one tensor per *layer group* ``[num_host_blocks,
group_layers, 2, block_size, num_kv_heads, head_dim]``: consecutive layers
whose share of a block is at least ``GROUP_COPY_BYTES`` (Llama-3-8B: 4 groups
of 8 layers, 512 KiB a block each), so a run of consecutive host blocks is
one contiguous copy per group. ``swap(out, in_)`` moves every (device block,
host block) pair of ``out`` device -> host and then every pair of ``in_``
host -> device, group by group; the pairs are sorted by host block (stably: a
host block written twice keeps the later copy) and each run of consecutive
host blocks moves in one copy, at most ``STAGE_BYTES`` at a time through a
device staging tensor (the pool fills the device: a transient of a long
sequence's whole KV would not fit beside it).

On CUDA the copies are asynchronous and overlap the step. Device -> host
copies run on one side stream, host -> device on ``IN_LANES`` others (the link
carries both directions at once); all first wait for the work already queued
on the compute stream (the blocks' last writes and reads). The swap-ins'
chunks go to the lanes in turn, each lane copying into a staging tensor of its
own and scattering it into the pool, so the link stays busy while a scatter
runs (on one stream each scatter held the next copy back: H200, 512 blocks of
Llama-3-8B, 45.4 GB/s on one lane, 51.0 on two, 52.5 for one pinned copy);
they may, as every swap-in writes a different device block. The swap-outs stay
on one stream: a host block written twice must be written in queue order. Per
group, the scatter of the swap-ins into the pool waits for that group's swap-
outs (a device block swapped out and handed to another sequence in the same
step is read before it is written; a host block spilled and restored in the
same step is written before it is read: then the whole swap-in waits).
``swap`` returns, per layer, the event after which that layer's blocks are in
place (set at each group's first layer, after all lanes): the forward waits
for it where a layer first touches its KV (``ForwardContext.kv``), so layer 0
attends while later groups still copy. These are the persistent
``layer_ready`` events, re-recorded by every call that copies: the CUDA graphs
are captured waiting for them (``cuda_graphs.py``), so a graph replay waits
layer group by layer group as well. Waiting on the last group's event covers
every copy of the call but the write-backs (the copy-on-write copies do). The
write-backs (``host_blocks.py``: freed cached blocks copied ahead, which this
step neither writes nor restores) go device -> host after the step: the worker
starts them (``start_write_back``) once the step and its tokens' copy to the
host are queued (a copy engine serves copies one after another, so queued
beside the step they held up its tokens by their whole length) and nothing of
the step waits for them; a later call told to (``wait_write_back``: it writes
one of their device blocks or reads one of their host blocks,
``host_blocks.py`` says when) makes the compute stream wait for all of them
before anything else. The next call's streams wait for the compute stream,
which waited for all the copies they could touch. On the CPU everything runs
in place, in the same order.

A quantized cache (``kv_cache_dtype`` int8 or fp8, ``kernels.kv_quant``) holds
codes in the pool and a second tensor of scales ``[2, num_layers,
num_physical_blocks, num_kv_heads, block_size]`` (fp16; a token's K and V
scales adjacent in memory, ``kv_quant.scale_pairs``), indexed by the same
block ids: a prefix-cache hit or a beam sharing a block shares its scales, and
every block copy (copy-on-write forks, swaps to and from the host pool, which
has a scales tensor of its own) moves both. ``bytes_per_token`` counts the
scales, and is ``pagellm.sizing``'s formula.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pagellm import sizing
from pagellm.kernels.attention import LayerKVCache
from pagellm.kernels.kv_quant import SCALE_DTYPE, format_of, kv_format, scale_pairs
from pagellm.model.config import ModelConfig
from pagellm.sizing import shard
from pagellm.utils.device import device_tensor

STAGE_BYTES = 64 << 20
IN_LANES = 2   # host -> device streams taking chunks in turn (STAGE_BYTES / IN_LANES each)
GROUP_COPY_BYTES = 512 << 10


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one token's K/V across all layers, and the paging. ``dtype``
    is what the pool stores: the model dtype, or a quantized format's codes."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    has_null_block: bool

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: torch.dtype, block_size: int, tensor_parallel_size: int = 1,
                  num_layers: int | None = None, kv_cache_dtype: str = "auto") -> KVCacheSpec:
        """One rank's share: its KV heads (``sizing.shard``) of its ``num_layers`` (default: all).
        ``kv_cache_dtype``: ``auto`` stores ``dtype`` (the model's), else a ``kv_quant`` format."""
        fmt = kv_format(kv_cache_dtype)
        return cls(num_layers or config.num_hidden_layers, shard(config, tensor_parallel_size).kv_heads,
                   config.head_dim, dtype if fmt is None else fmt.storage, block_size,
                   has_null_block=config.sliding_window is not None)

    @property
    def quantized(self) -> bool:
        return format_of(self.dtype) is not None

    @property
    def bytes_per_token(self) -> int:
        vector = self.head_dim * self.dtype.itemsize + (sizing.KV_SCALE_BYTES if self.quantized else 0)
        return 2 * self.num_layers * self.num_kv_heads * vector

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str,
                 num_host_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.null_block: int | None = num_blocks if spec.has_null_block else None
        physical = num_blocks + spec.has_null_block
        self.pool = torch.empty(2, spec.num_layers, physical, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                dtype=spec.dtype, device=device)
        self.scales: torch.Tensor | None = None
        if spec.quantized:
            self.scales = scale_pairs(spec.num_layers, physical, spec.num_kv_heads, spec.block_size, device=device)
        self.layers = [LayerKVCache(self.pool[0, i], self.pool[1, i],
                                    *((self.scales[0, i], self.scales[1, i]) if spec.quantized else ()))
                       for i in range(spec.num_layers)]
        on_cuda = self.pool.device.type == "cuda"
        self.layer_groups = layer_groups(spec.num_layers, spec.bytes_per_block // spec.num_layers)
        rest = (2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.host_pools = [torch.empty(num_host_blocks, stop - start, *rest, dtype=spec.dtype, pin_memory=on_cuda)
                           for start, stop in self.layer_groups]
        self.host_scales = [torch.empty(num_host_blocks, stop - start, 2, spec.num_kv_heads, spec.block_size,
                                        dtype=SCALE_DTYPE, pin_memory=on_cuda)
                            for start, stop in self.layer_groups] if spec.quantized else []
        swapping = on_cuda and num_host_blocks > 0
        self._streams = (torch.cuda.Stream(self.pool.device) if swapping else None,   # device -> host
                         tuple(torch.cuda.Stream(self.pool.device) if swapping else None
                               for _ in range(IN_LANES)))                             # host -> device
        self.layer_ready = [_recorded_event() if swapping and layer == start else None
                            for start, stop in self.layer_groups for layer in range(start, stop)]
        self._write_back_pending: list[tuple[int, int]] = []   # the last call's write-backs, not yet started
        self._written_back: torch.cuda.Event | None = None   # the last write-backs started, not yet waited for

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pool, self.scales) if t is not None)

    @property
    def host_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_pools + self.host_scales)

    @property
    def num_host_blocks(self) -> int:
        return self.host_pools[0].shape[0]

    def swap(self, out: list[tuple[int, int]], in_: list[tuple[int, int]],
             write_back: list[tuple[int, int]] = (), wait_write_back: bool = True) -> list[torch.cuda.Event | None]:
        """Copy (device, host) block pairs: ``out`` device -> host, then ``in_``
        host -> device, then (``start_write_back``) ``write_back`` device -> host.
        ``wait_write_back``: first make the step wait for the write-backs of
        earlier calls. On CUDA: per layer, the event the forward waits for
        before that layer touches its KV (``[]``: nothing to wait for)."""
        self.start_write_back()   # the previous call's, if the worker did not start them after its step
        on_cuda = self._streams[0] is not None
        compute = torch.cuda.current_stream(self.pool.device) if on_cuda else None
        if wait_write_back and self._written_back is not None:   # the last one: they run in order
            compute.wait_event(self._written_back)
            self._written_back = None
        self._write_back_pending = list(write_back)
        ready = self._swap(out, in_, compute) if out or in_ else []
        if not on_cuda:   # on the CPU in place, in order; on CUDA the worker starts them after the step
            self.start_write_back()
        return ready if on_cuda else []

    def _swap(self, out: list[tuple[int, int]], in_: list[tuple[int, int]],
              compute: torch.cuda.Stream | None) -> list[torch.cuda.Event | None]:
        """``swap``'s ``out`` and ``in_`` copies, a layer group at a time; per layer, the event to wait for."""
        rows = self._stage_rows()
        to_host, lanes = self._streams
        with _on(to_host, compute):
            out_plan = _CopyPlan.build(out, rows, self.pool.device)
        with _on(lanes[0], compute):
            in_plan = _CopyPlan.build(in_, max(1, rows // len(lanes)), self.pool.device)
        in_plan.share(lanes)
        written_and_read = bool({h for _, h in out} & {h for _, h in in_})
        ready: list[torch.cuda.Event | None] = [None] * self.spec.num_layers
        for group, (start, stop) in enumerate(self.layer_groups):
            tensors = self._group_tensors(group, start, stop)
            with _on(to_host):
                for device, host in tensors:
                    out_plan.to_host(device, host)
                out_done = to_host.record_event() if to_host is not None and out else None
            last = to_host
            if in_:
                for device, host in tensors:
                    in_plan.to_device(device, host, lanes, out_done if written_and_read else None, out_done)
                last = _join(lanes)
            if last is not None:
                ready[start] = self.layer_ready[start]
                ready[start].record(last)
        return ready

    def start_write_back(self) -> None:
        """Start the last ``swap`` call's write-backs. The worker calls it after queuing
        the step and its tokens' copy to the host: on CUDA they follow all of it
        on the device -> host stream (a copy engine serves one copy after another,
        so queued earlier they would hold up the step's tokens)."""
        pairs, self._write_back_pending = self._write_back_pending, []
        if not pairs:
            return
        stream = self._streams[0]
        with _on(stream, torch.cuda.current_stream(self.pool.device) if stream is not None else None):
            plan = _CopyPlan.build(pairs, self._stage_rows(), self.pool.device)
            for group, (start, stop) in enumerate(self.layer_groups):
                for device, host in self._group_tensors(group, start, stop):
                    plan.to_host(device, host)
            if stream is not None:
                self._written_back = stream.record_event()

    def _stage_rows(self) -> int:
        """Blocks of the largest layer group that fit in ``STAGE_BYTES``."""
        return max(1, STAGE_BYTES // max(stop - start for start, stop in self.layer_groups)
                   // (self.spec.bytes_per_block // self.spec.num_layers))

    def _group_tensors(self, group: int, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device view ``[2, layers, blocks, ...]``, host tensor ``[blocks, layers, 2, ...]``) of a layer group."""
        pairs = [(self.pool[:, start:stop], self.host_pools[group])]
        if self.scales is not None:
            pairs.append((self.scales[:, start:stop], self.host_scales[group]))
        return pairs

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return device_tensor(ids, torch.int64, self.pool.device)   # without waiting for the step in flight

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate blocks ``src -> dst`` in every layer, K and V, with their scales."""
        if pairs:
            src, dst = (self._ids(list(ids)) for ids in zip(*pairs))
            self.pool[:, :, dst] = self.pool[:, :, src]
            if self.scales is not None:
                self.scales[:, :, dst] = self.scales[:, :, src]


def layer_groups(num_layers: int, layer_block_bytes: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges, as many as keep each group's share of a block
    at least ``GROUP_COPY_BYTES`` (one group when a whole block is smaller)."""
    count = max(1, min(num_layers, layer_block_bytes * num_layers // GROUP_COPY_BYTES))
    bounds = [num_layers * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def wait_for_swaps(ready: list[torch.cuda.Event | None]) -> None:
    """Make the current stream wait for every copy of the ``swap`` call that returned ``ready``."""
    last = next((event for event in reversed(ready) if event is not None), None)
    if last is not None:
        last.wait()


def _recorded_event() -> torch.cuda.Event:
    """An external event (a CUDA graph captured waiting for it waits, at each
    replay, for its last record before the replay), recorded once: torch skips
    waits on an event never recorded, also when capturing."""
    event = torch.cuda.Event(external=True)
    event.record()
    return event


def _join(lanes: tuple[torch.cuda.Stream | None, ...]) -> torch.cuda.Stream | None:
    """The first lane, made to wait for the others' queued work (on the CPU: None)."""
    for lane in lanes[1:]:
        if lane is not None:
            lanes[0].wait_stream(lane)
    return lanes[0]


@contextmanager
def _on(stream: torch.cuda.Stream | None, after: torch.cuda.Stream | None = None):
    """Run on ``stream`` (on the CPU: in place), first waiting for ``after``'s queued work."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        if after is not None:
            stream.wait_stream(after)
        yield


@dataclass
class _CopyPlan:
    """(device, host) block pairs sorted by host block (stably) and cut into
    chunks of at most ``rows`` blocks: each chunk's device block ids (on the
    device) and its runs of consecutive host blocks ``(row, host block, length)``."""
    chunks: list[tuple[torch.Tensor, list[tuple[int, int, int]]]]

    @classmethod
    def build(cls, pairs: list[tuple[int, int]], rows: int, device: torch.device) -> _CopyPlan:
        pairs = sorted(pairs, key=lambda pair: pair[1])
        if not pairs:
            return cls([])
        ids = device_tensor([d for d, _ in pairs], torch.int64, device)
        chunks = []
        for first in range(0, len(pairs), rows):
            runs: list[list[int]] = []
            for row, (_, host) in enumerate(pairs[first:first + rows]):
                if runs and host == runs[-1][1] + runs[-1][2]:
                    runs[-1][2] += 1
                else:
                    runs.append([row, host, 1])
            chunks.append((ids[first:first + rows], [tuple(run) for run in runs]))
        return cls(chunks)

    def to_host(self, device: torch.Tensor, host: torch.Tensor) -> None:
        """Gather the blocks from ``device`` ``[2, layers, blocks, ...]`` and copy them to ``host`` ``[blocks, layers, 2, ...]``."""
        for ids, runs in self.chunks:
            staged = device.index_select(2, ids).movedim(2, 0).transpose(1, 2).contiguous()
            for row, block, length in runs:
                host[block:block + length].copy_(staged[row:row + length], non_blocking=True)

    def share(self, lanes: tuple[torch.cuda.Stream | None, ...]) -> None:
        """Let every lane read the block ids built on the first: the other lanes
        wait for their copy to the device and keep them alive until they ran."""
        for lane in lanes[1:]:
            if lane is not None and self.chunks:
                lane.wait_stream(lanes[0])
                for ids, _ in self.chunks:
                    ids.record_stream(lane)

    def to_device(self, device: torch.Tensor, host: torch.Tensor, lanes: tuple[torch.cuda.Stream | None, ...],
                  before_read: torch.cuda.Event | None, before_write: torch.cuda.Event | None) -> None:
        """Copy the blocks from ``host`` into staging and scatter them into ``device``,
        the reads after ``before_read`` and the scatter after ``before_write``. Chunk
        ``i`` runs on lane ``i mod len(lanes)``, each in a staging tensor of its own
        (freed to the allocator on its lane), so while one lane scatters, the next
        chunk's copy keeps the link busy."""
        for index, (ids, runs) in enumerate(self.chunks):
            lane, first = lanes[index % len(lanes)], index < len(lanes)
            with _on(lane):
                if first and before_read is not None:
                    lane.wait_event(before_read)
                staged = torch.empty(len(ids), *host.shape[1:], dtype=host.dtype, device=device.device)
                for row, block, length in runs:
                    staged[row:row + length].copy_(host[block:block + length], non_blocking=True)
                if first and before_write is not None:
                    lane.wait_event(before_write)
                device[:, :, ids] = staged.transpose(1, 2).movedim(0, 2)
