"""Owns the KV pool's blocks: which are free, who holds each, which are cached.

Blocks are reference counted. A full block is named by a chained hash of
(hash of the previous block, its tokens), so a new sequence whose leading tokens
match blocks already in the pool reuses them instead of recomputing (automatic
prefix caching). A block whose last holder lets go keeps its contents and its
hash in the free queue; it is only forgotten when the pool hands it out again,
least recently freed first. Blocks that hold nothing reusable go to the front of
the queue so cached ones live longest.

Only positions at or after a sequence's ``num_computed_tokens`` are ever
written. Such a position lies in a block that is not yet published, or in a
shared block (a fork for parallel sampling or beam search), which the writer
first copies (copy-on-write): a block is never overwritten while another
sequence holds it.

With a sliding window, blocks a sequence can never attend to again are given
back as it advances; their places in its block table point at the KV cache's
null block (``kv_cache.py`` says which id), never allocated and never read.

With a host tier (``host``, ``host_blocks.py``), a preempted sequence may be
swapped out (``swap_out``: its computed blocks are copied to host blocks, its
device blocks freed, its progress kept) and back in when it is scheduled
again (``swap_in``: fresh device blocks, copied back); and a cached block is
copied to the host's prefix cache when its last holder lets go (write-back
ahead, ``host_blocks.py``: beside the next step, so that handing it out
again later costs no copy), from which ``match_prefix`` restores it on a
later hit (a fresh device block, copied back, published under its hash)
instead of recomputing it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagellm.engine.host_blocks import HostBlockPool
from pagellm.engine.sequence import Sequence
from pagellm.utils.math import cdiv


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, null_block: int | None = None,
                 host: HostBlockPool | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        if sliding_window and null_block is None:
            raise ValueError("a sliding window needs the KV cache's null block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.null_block = -1 if null_block is None else null_block   # never allocated, never counted
        physical = max(num_blocks, self.null_block + 1)
        self.ref_counts = [0] * physical
        self.block_hash: list[int | None] = [None] * physical
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []   # (src, dst) KV block copies to run
        self.stats = PrefixCacheStats()
        self.host = host

    # ---- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Fresh blocks to compute ``num_new_tokens`` more (a swapped-out sequence's own blocks included)."""
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        held = len(seq.block_table) + len(seq.host_block_table)   # one of them is empty
        swapped = sum(block is not None for block in seq.host_block_table)
        return max(0, total - held) + self._write_block_is_shared(seq) + swapped

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_queue)

    # ---- allocation ----------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> None:
        """Give ``seq`` room for its next ``num_new_tokens`` tokens: a private copy
        of a shared block it is about to write into (copy-on-write; the copy is
        queued in ``pending_copies`` for the model runner), then fresh blocks.
        Blocks those tokens fill are published to the prefix cache at once, so a
        request admitted in the same step can already share them: each layer
        writes the whole batch's K/V before any token attends. ``num_lookahead``
        more slots hold proposed (unverified) tokens: allocated, never published."""
        if self._write_block_is_shared(seq):
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[index]
            seq.block_table[index] = self._take_free_block()
            self._release(shared)
            self.pending_copies.append((shared, seq.block_table[index]))
        total = cdiv(seq.num_computed_tokens + num_new_tokens + num_lookahead, self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_free_block())
        self._publish_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks, device and host (finish, abort or preemption)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        for host_block in seq.host_block_table:
            if host_block is not None:
                self.host.release(host_block)
        seq.block_table.clear()
        seq.host_block_table = []
        seq.num_computed_tokens = 0

    # ---- the host tier -------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        needed = sum(b != self.null_block for b in seq.block_table[:cdiv(seq.num_computed_tokens, self.block_size)])
        return self.host is not None and 0 < needed <= self.host.num_available

    def swap_out(self, seq: Sequence) -> None:
        """Copy the blocks holding ``seq``'s computed tokens to the host and free
        its device blocks; it keeps its progress (``can_swap_out`` first)."""
        computed = seq.num_computed_tokens
        host_table: list[int | None] = []
        for block_id in seq.block_table[:cdiv(computed, self.block_size)]:
            if block_id == self.null_block:
                host_table.append(None)
            else:
                host_table.append(self.host.take())
                self.host.copy_out(block_id, host_table[-1])
        self.free(seq)
        seq.host_block_table, seq.num_computed_tokens = host_table, computed
        self.host.stats.swapped_out_seqs += 1

    def swap_in(self, seq: Sequence) -> None:
        """Give a swapped-out sequence fresh device blocks holding its host blocks
        (``can_allocate`` first: it counts them)."""
        for host_block in seq.host_block_table:
            if host_block is None:
                seq.block_table.append(self.null_block)
                continue
            block_id = self._take_free_block()
            self.host.copy_in(block_id, host_block)
            self.host.release(host_block)
            seq.block_table.append(block_id)
        seq.host_block_table = []
    def release_unverified(self, seq: Sequence) -> None:
        """Give back the blocks past ``seq``'s tokens: lookahead slots whose
        proposed tokens were rejected (never published, so nothing to forget)."""
        keep = cdiv(seq.num_tokens, self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def forget(self, seq: Sequence) -> None:
        """Drop from the prefix cache the blocks only ``seq`` holds (their K/V may
        never have been written: its step failed)."""
        for block_id in seq.block_table:
            block_hash = self.block_hash[block_id] if block_id != self.null_block else None
            if block_hash is not None and self.ref_counts[block_id] == 1:
                if self.cached_blocks.get(block_hash) == block_id:
                    del self.cached_blocks[block_hash]
                self.block_hash[block_id] = None

    def free_outside_window(self, seq: Sequence) -> None:
        """Give back the leading blocks that no future token of ``seq`` can
        see: its next query sits at ``num_computed_tokens`` and sees keys after
        ``num_computed_tokens - sliding_window``."""
        if not self.sliding_window:
            return
        index = max(0, seq.num_computed_tokens - self.sliding_window + 1) // self.block_size - 1
        while index >= 0 and seq.block_table[index] != self.null_block:
            self._release(seq.block_table[index])
            seq.block_table[index] = self.null_block
            index -= 1

    def fork(self, parent: Sequence, child: Sequence, num_computed_tokens: int) -> None:
        """Let ``child`` share ``parent``'s blocks holding its first
        ``num_computed_tokens`` tokens; whoever writes into a shared block
        later gets a private copy first."""
        num_blocks = cdiv(num_computed_tokens, self.block_size)
        child.block_table = parent.block_table[:num_blocks]
        child.block_hashes = parent.block_hashes[:num_computed_tokens // self.block_size]
        child.num_computed_tokens = num_computed_tokens
        for block_id in child.block_table:
            if block_id != self.null_block:
                self.ref_counts[block_id] += 1

    def _write_block_is_shared(self, seq: Sequence) -> bool:
        index = seq.num_computed_tokens // self.block_size
        return index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        if self.host is not None:
            self.host.taking(block_id)
        old_hash = self.block_hash[block_id]
        if old_hash is not None:
            if self.cached_blocks.get(old_hash) == block_id:
                del self.cached_blocks[old_hash]
                if self.host is not None:
                    self.host.spill(block_id, old_hash)
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        if block_id == self.null_block:
            return
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None
            block_hash = self.block_hash[block_id]
            if block_hash is None:
                self.free_queue.move_to_end(block_id, last=False)
            elif self.host is not None and self.cached_blocks.get(block_hash) == block_id:
                self.host.write_ahead(block_id, block_hash)

    # ---- prefix cache --------------------------------------------------------
    def _hash_block(self, seq: Sequence, index: int) -> int:
        """Chained hash of the index-th full block (memoised on the sequence)."""
        while len(seq.block_hashes) <= index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else None
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(hash((parent, tokens)))
        return seq.block_hashes[index]

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that hold ``seq``'s leading tokens; return how
        many tokens they cover. The last token is always left to compute, since
        its logits are needed."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        self.stats.queried_tokens += seq.num_tokens
        for index in range((seq.num_tokens - 1) // self.block_size):
            block_hash = self._hash_block(seq, index)
            block_id = self.cached_blocks.get(block_hash)
            if block_id is not None:
                if self.ref_counts[block_id] == 0:
                    del self.free_queue[block_id]
                self.ref_counts[block_id] += 1
            elif (block_id := self._restore_from_host(block_hash)) is None:
                break
            seq.block_table.append(block_id)
        hit = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = hit
        self.stats.hit_tokens += hit
        return hit

    def _restore_from_host(self, block_hash: int) -> int | None:
        """A fresh device block for the host tier's copy of ``block_hash``, published; None if it has none."""
        host_block = self.host.reserve(block_hash) if self.host is not None and self.free_queue else None
        if host_block is None:
            return None
        block_id = self._take_free_block()
        self.host.copy_in(block_id, host_block)
        self.block_hash[block_id] = block_hash
        self.cached_blocks[block_hash] = block_id
        self.host.stats.hit_tokens += self.block_size
        return block_id

    def _publish_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name the blocks that ``seq``'s first ``num_tokens`` tokens fill so
        other sequences can reuse them; a block holding a placeholder (a token
        still on the device) waits for the next allocation."""
        if not self.enable_prefix_caching:
            return
        num_tokens = min(num_tokens, seq.num_known_tokens)
        # Blocks before the last memoised hash were published (or matched) already.
        start = max(0, len(seq.block_hashes) - 1)
        for index in range(start, num_tokens // self.block_size):
            block_id = seq.block_table[index]
            if block_id == self.null_block or self.block_hash[block_id] is not None:
                continue
            block_hash = self._hash_block(seq, index)
            if block_hash not in self.cached_blocks:
                self.cached_blocks[block_hash] = block_id
                self.block_hash[block_id] = block_hash
