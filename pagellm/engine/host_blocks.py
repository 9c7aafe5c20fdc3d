"""The host tier's block ids: sequences swapped out of the device pool, and a
host-memory prefix cache below the device's.

The KV cache's host pool (``kv_cache.py``) holds ``num_blocks`` blocks. Each
host block is in exactly one of three states: free; held by one swapped-out
sequence (``Sequence.host_block_table``); or *cached*: a copy of a full block
evicted from the device prefix cache, named by its chained hash and kept in
LRU order. A swap-out that finds no free block takes the least recently used
cached one, so swapped sequences always win over cached copies; a spill that
finds neither is dropped (the block is simply forgotten, as without the tier).

Every movement is one (device block, host block) pair, queued in
``swap_out`` (device -> host) or ``swap_in`` (host -> device) until the
engine takes them for the next ``StepInput``; the worker runs every
``swap_out`` before every ``swap_in`` and both before the forward and the
copy-on-write copies. Two rules keep that order safe:

* a host block read by a queued swap-in is neither freed nor evicted before
  the pairs are taken (``_busy``; blocks let go meanwhile are freed then), so
  no swap-out of the same step overwrites it;
* a device block is written by at most one queued swap-in (a later one
  replaces the earlier: the block changed hands), and a device block about
  to be restored is never spilled (its hash is already cached on the host).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class HostTierStats:
    swapped_out_seqs: int = 0    # preemptions by swap
    hit_tokens: int = 0          # prompt tokens restored from the host prefix cache
    blocks_to_host: int = 0
    blocks_to_device: int = 0


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_blocks: list[int] = list(range(num_blocks))
        self.cached: OrderedDict[int, int] = OrderedDict()   # hash -> host block, least recently used first
        self.swap_out: list[tuple[int, int]] = []            # (device block, host block)
        self.swap_in: dict[int, int] = {}                    # device block -> host block, in queue order
        self._busy: set[int] = set()                         # host blocks read by a queued swap-in
        self._free_later: list[int] = []
        self.stats = HostTierStats()

    @property
    def num_available(self) -> int:
        """Blocks a swap-out may take: free ones and cached copies that no swap-in reads."""
        return len(self.free_blocks) + sum(block not in self._busy for block in self.cached.values())

    @property
    def num_held(self) -> int:
        """Blocks held by swapped-out sequences."""
        return self.num_blocks - len(self.free_blocks) - len(self.cached) - len(self._free_later)

    def take(self) -> int | None:
        """A free block, else the least recently used cached copy not being read; None if neither."""
        if self.free_blocks:
            return self.free_blocks.pop()
        for block_hash, block in self.cached.items():
            if block not in self._busy:
                del self.cached[block_hash]
                return block
        return None

    def release(self, block: int) -> None:
        (self._free_later if block in self._busy else self.free_blocks).append(block)

    def copy_out(self, device_block: int, host_block: int) -> None:
        self.swap_out.append((device_block, host_block))

    def copy_in(self, device_block: int, host_block: int) -> None:
        self.swap_in.pop(device_block, None)
        self.swap_in[device_block] = host_block
        self._busy.add(host_block)

    # ---- the prefix-cache tier -------------------------------------------------
    def spill(self, device_block: int, block_hash: int) -> None:
        """A full cached block leaves the device: keep a copy, unless one is already here."""
        if block_hash in self.cached:
            return
        host_block = self.take()
        if host_block is not None:
            self.cached[block_hash] = host_block
            self.copy_out(device_block, host_block)

    def reserve(self, block_hash: int) -> int | None:
        """The cached copy of ``block_hash``, or None. It becomes the most recently
        used, and is kept from eviction as if read by a queued swap-in already
        (the caller queues one: taking its device block may spill another)."""
        host_block = self.cached.get(block_hash)
        if host_block is not None:
            self.cached.move_to_end(block_hash)
            self._busy.add(host_block)
        return host_block

    # ---- the step contract -----------------------------------------------------
    def take_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The queued (device, host) pairs, swap-outs then swap-ins; the blocks they read may be reused after."""
        out, in_ = self.swap_out, list(self.swap_in.items())
        self.swap_out, self.swap_in = [], {}
        self._busy.clear()
        self.free_blocks.extend(self._free_later)
        self._free_later = []
        self.stats.blocks_to_host += len(out)
        self.stats.blocks_to_device += len(in_)
        return out, in_
