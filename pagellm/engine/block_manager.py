"""Owns the KV pool's blocks: which are free, who holds each, which are cached.

Blocks are reference counted. A full block is named by a chained hash of
(hash of the previous block, its tokens), so a new sequence whose leading tokens
match blocks already in the pool reuses them instead of recomputing (automatic
prefix caching). A block whose last holder lets go keeps its contents and its
hash in the free queue; it is only forgotten when the pool hands it out again,
least recently freed first. Blocks that hold nothing reusable go to the front of
the queue so cached ones live longest.

Only positions at or after a sequence's ``num_computed_tokens`` are ever
written, and those lie in blocks that are not full, hence never hashed and never
shared: a cached block cannot be overwritten while anyone holds it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagellm.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.stats = PrefixCacheStats()

    # ---- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_queue)

    # ---- allocation ----------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` enough blocks to hold its next ``num_new_tokens`` tokens."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks (finish, abort or preemption)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every block of ``parent`` (copy-on-write)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        for block_id in child.block_table:
            self.ref_counts[block_id] += 1

    def copy_on_write(self, seq: Sequence) -> tuple[int, int] | None:
        """Before ``seq`` writes into its last block: if others share it, give
        ``seq`` a private copy. Returns (source, destination) for the KV copy."""
        index = seq.num_computed_tokens // self.block_size
        if index >= len(seq.block_table):
            return None
        block_id = seq.block_table[index]
        if self.ref_counts[block_id] == 1:
            return None
        new_block = self._take_free_block()
        self._release(block_id)
        seq.block_table[index] = new_block
        return block_id, new_block

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        old_hash = self.block_hash[block_id]
        if old_hash is not None:
            if self.cached_blocks.get(old_hash) == block_id:
                del self.cached_blocks[old_hash]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None
            if self.block_hash[block_id] is None:
                self.free_queue.move_to_end(block_id, last=False)

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
            block_id = self.cached_blocks.get(self._hash_block(seq, index))
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        hit = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = hit
        self.stats.hit_tokens += hit
        return hit

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks that ``seq`` has just filled so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        # Blocks before the last memoised hash were published (or matched) already.
        start = max(0, len(seq.block_hashes) - 1)
        for index in range(start, seq.num_computed_tokens // self.block_size):
            block_id = seq.block_table[index]
            if self.block_hash[block_id] is not None:
                continue
            block_hash = self._hash_block(seq, index)
            if block_hash not in self.cached_blocks:
                self.cached_blocks[block_hash] = block_id
                self.block_hash[block_id] = block_hash
