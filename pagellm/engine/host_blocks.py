"""The host tier's block ids: sequences swapped out of the device pool, and a
host-memory prefix cache below the device's.

The KV cache's host pool (``kv_cache.py``) holds ``num_blocks`` blocks. Each
host block is in exactly one of three states: free; held by one swapped-out
sequence (``Sequence.host_block_table``); or *cached*: a copy of a full block
evicted from the device prefix cache, named by its chained hash and kept in
LRU order. A swap-out that finds no free block takes the least recently used
cached one, so swapped sequences always win over cached copies; a copy that
finds neither is dropped (the block is simply forgotten, as without the tier).

Write-back ahead: a full cached block is copied to the host when its last
holder lets go (``write_ahead``: it enters the device's free queue still
cached), not when the pool hands it out again, so a later step that takes it
(a restore, a long prompt) finds it on the host already and no spill sits on
its critical path. Such a copy is *lazy* (``write_back``): the worker starts
it after the step (the block stays in the free queue, unwritten, for this
step), and a later step waits for it only if it writes that device block
(``taking``) or restores from that host block (``reserve``):
``HostCopies.wait_write_back``, which waits for every write-back started
before (they run in order on one stream). If the block is handed out again
before the copy was taken for a step, ``spill`` makes it an ordinary
``swap_out`` (it must reach the host before the step overwrites it); if the
host block is taken for something else first, the copy is dropped. A hash
already cached on the host is never copied again (a block matched, freed,
matched and freed again moves once). The cost: every freed cached block
crosses the link once device -> host, even if it is matched again before it
would have been evicted or never evicted (then the copy was not needed); a
step whose tokens' copy to the host is queued while write-backs run gets
them when those are done (one copy engine, in order); and it may push an
older cached copy out of the host LRU sooner.

Every movement is one (device block, host block) pair, queued in
``swap_out`` (device -> host), ``swap_in`` (host -> device) or
``write_back`` (device -> host, lazy) until the engine takes them for the
next ``StepInput`` (``HostCopies``); the worker runs every ``swap_out``
before every ``swap_in``, both before the forward and the copy-on-write
copies, and the ``write_back`` copies after the step. Three rules keep
that order safe:

* a host block read by a queued swap-in is neither freed nor evicted before
  the pairs are taken (``_busy``; blocks let go meanwhile are freed then), so
  no swap-out of the same step overwrites it;
* a device block is written by at most one queued swap-in (a later one
  replaces the earlier: the block changed hands), and a device block about
  to be restored is never spilled (its hash is already cached on the host);
* a lazy copy's device block is not handed out in its step (then the copy is
  a ``swap_out``) and its host block is not read by a swap-in of its step
  (its hash is still on the device, so no restore asks for it) nor written
  by another copy (``take`` drops the lazy copy of the block it evicts;
  once started, later copies into it follow it on its stream).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple


class HostCopies(NamedTuple):
    """One step's (device block, host block) pairs, in the order the worker runs them."""
    out: list[tuple[int, int]]          # device -> host, before the swap-ins and the forward
    in_: list[tuple[int, int]]          # host -> device, before the forward
    write_back: list[tuple[int, int]]   # device -> host after the step (its tokens' copy first)
    wait_write_back: bool = False       # the step waits for earlier steps' write-backs before it writes

    @classmethod
    def none(cls) -> HostCopies:
        return cls([], [], [])


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
        self.write_back: dict[int, int] = {}                 # host block -> device block, lazy, in queue order
        self._busy: set[int] = set()                         # host blocks read by a queued swap-in
        self._in_flight: tuple[set[int], set[int]] = (set(), set())   # (device, host) blocks of write-backs
        self._wait = False                                   # that earlier steps started and none waited for
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
                self.write_back.pop(block, None)   # a copy not yet made is not needed any more
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
    def write_ahead(self, device_block: int, block_hash: int) -> None:
        """A full cached block's last holder let go: queue a lazy copy, unless the host has one."""
        if block_hash in self.cached:
            return
        host_block = self.take()
        if host_block is not None:
            self.cached[block_hash] = host_block
            self.write_back[host_block] = device_block

    def spill(self, device_block: int, block_hash: int) -> None:
        """A full cached block leaves the device: its copy must be on the host before this step writes it."""
        self.write_ahead(device_block, block_hash)
        host_block = self.cached.get(block_hash)
        if host_block is not None and self.write_back.get(host_block) == device_block:
            del self.write_back[host_block]
            self.copy_out(device_block, host_block)

    def reserve(self, block_hash: int) -> int | None:
        """The cached copy of ``block_hash``, or None. It becomes the most recently
        used, and is kept from eviction as if read by a queued swap-in already
        (the caller queues one: taking its device block may spill another)."""
        host_block = self.cached.get(block_hash)
        if host_block is not None:
            self.cached.move_to_end(block_hash)
            self._busy.add(host_block)
            self._wait |= host_block in self._in_flight[1]
        return host_block

    def taking(self, device_block: int) -> None:
        """The device pool hands ``device_block`` out: the step writes it."""
        self._wait |= device_block in self._in_flight[0]

    # ---- the step contract -----------------------------------------------------
    def take_swaps(self) -> HostCopies:
        """The queued pairs; the blocks they read may be reused after."""
        copies = HostCopies(self.swap_out, list(self.swap_in.items()),
                            [(device, host) for host, device in self.write_back.items()], self._wait)
        if self._wait:   # the worker waits for every write-back started so far (they run in order)
            self._in_flight = (set(), set())
            self._wait = False
        self._in_flight[0].update(device for device, _ in copies.write_back)
        self._in_flight[1].update(host for _, host in copies.write_back)
        self.swap_out, self.swap_in, self.write_back = [], {}, {}
        self._busy.clear()
        self.free_blocks.extend(self._free_later)
        self._free_later = []
        self.stats.blocks_to_host += len(copies.out) + len(copies.write_back)
        self.stats.blocks_to_device += len(copies.in_)
        return copies
