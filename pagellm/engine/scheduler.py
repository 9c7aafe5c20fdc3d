"""Continuous batching: every step decides which sequences run and how many of
their tokens, under a token budget and a sequence cap.

One rule covers prefill, chunked prefill and decode (as in vLLM v1): a sequence
needs ``num_tokens - num_computed_tokens`` more tokens computed; running
sequences are served first, oldest first, so decodes are never starved by a long
prompt; waiting sequences fill what budget is left, a long prompt being split
across steps. While any sequence decodes, prompt tokens in a step are further
capped at ``max_prefill_tokens_with_decodes``: a step's time grows with its
prompt tokens and every running decode waits for it, so this cap bounds the
inter-token latency of the decodes (ITL p99) at little cost in throughput (the
prompt's compute is the same in any chunking, and a decode step reads the
weights anyway). With nothing decoding the whole budget goes to prompts. When the pool runs out, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of
the queue to be recomputed later (its full blocks usually survive in the prefix
cache, so recomputation is often cheap).

With a host pool (``swap_space``) a preempted sequence is swapped out instead
(its KV copied to host memory, and back when it resumes) when that is the
cheaper way back. The cost rule: recomputing ``n`` tokens is a prefill of
``n`` tokens; while ``n`` is small it rides in the spare token budget of the
decode steps that follow (a decode step of ``B`` sequences uses ``B`` tokens
of its budget and its time is set by reading the weights), so it costs
little; beyond that it costs whole prefill steps (Llama-3-8B: ~16 GFLOP a
token, more for attention as ``n`` grows). A swap moves ``2 x n`` tokens of KV
over the host link (Llama-3-8B: 2 x 128 KiB a token at ~50 GB/s, about a
fifth of that prefill's time on an H100) plus a fixed cost (the step waits on
the copies, host blocks are held). So a sequence swaps when it holds at least
``swap_min_tokens`` computed tokens (default 512, an estimate of where the
two cross, not a measurement) and the host pool has room for its blocks;
otherwise (a short context, a full host pool) it recomputes. The copies are
queued in the block manager's host pool for the next step; a step that
preempts admits no one, so no step both swaps a sequence out and one in.

A preempted sequence comes back only when its whole context fits, as a
swapped one must (its host blocks all come back at once): recomputed, it
would otherwise be admitted as soon as its first chunk fit, recompute that
chunk and be preempted again for the rest, over and over while the others
grow (``swap_preemption_model.py``, 64 x (8,192 + 512) tokens in 1,040
blocks without the prefix cache: 3,020 preemptions and 3.5x the time of the
same run swapping; with the rule, 63). Not with a sliding window, whose
blocks behind the window are given back as it advances (its whole context
may not fit at once, and need not).

Speculative decoding (``num_lookahead > 0``): a decoding sequence also gets
slots for up to ``num_lookahead`` proposed tokens (``ScheduledBatch.lookahead``),
counted against the budget, only while at most ``lookahead_max_seqs`` sequences
run and only when the pool has room: a proposal never preempts anyone. With B
sequences running, k is lowered so that the step verifies at most
``VERIFY_TOKENS_PER_MAX_SEQ x lookahead_max_seqs`` query tokens (``lookahead_for_batch``):
a verification step costs about a decode step until its tokens outgrow what one
weight read hides, then grows with them (measured: README, speculative decoding). The
slots are allocated but never published to the prefix cache; those of rejected
tokens are given back after the step (``BlockManager.release_unverified``).

Under the asynchronous step pipeline a running sequence may end with a
placeholder (its token of the step in flight): it is scheduled as a decode of
that token like any other, unless the placeholder used up its length budget
(``Sequence.reached_length``), so a sequence that ends by length wastes no
slot; one that ends by a stop token wastes one (the engine learns of the stop
only after the next step is launched, and discards that token).

The waiting queue is keyed by sequence id (an ordered dict), so finishing or
aborting any sequence costs O(1) wherever it is queued.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagellm.engine.block_manager import BlockManager
from pagellm.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from pagellm.spec.proposal import Proposal


VERIFY_TOKENS_PER_MAX_SEQ = 4   # at B = lookahead_max_seqs, k = 3


def lookahead_for_batch(k: int, max_seqs: int, num_running: int) -> int:
    """Proposed tokens per decoding sequence while ``num_running`` sequences run:
    ``k`` while ``num_running x (k + 1)`` verified queries stay within
    ``VERIFY_TOKENS_PER_MAX_SEQ x max_seqs``, as many as fit above that (at least
    3), none above ``max_seqs`` sequences."""
    if num_running > max_seqs:
        return 0
    return min(k, VERIFY_TOKENS_PER_MAX_SEQ * max_seqs // num_running - 1)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    swap_min_tokens: int = 512    # a preempted sequence with this many computed tokens swaps, when it can
    num_lookahead: int = 0              # speculative decoding: proposed tokens per decoding sequence
    lookahead_max_seqs: int = 0         # ... only while at most this many sequences run
    max_prefill_tokens_with_decodes: int | None = None   # prompt tokens beside running decodes (None: no cap)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    lookahead: dict[Sequence, int] = field(default_factory=dict)         # slots reserved for proposed tokens
    proposals: dict[Sequence, Proposal] = field(default_factory=dict)   # filled by a proposer before the step

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class _PrefillBudget:
    """Prompt tokens a step may still take (decodes, one token each, are never held back)."""
    left: int

    def take(self, num_uncomputed: int, budget: int) -> int:
        if num_uncomputed == 1:
            return min(1, budget)
        num_tokens = min(num_uncomputed, budget, self.left)
        self.left -= num_tokens
        return num_tokens


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_chunked_prefills: int = 0   # steps where some prompt was only partly computed
    num_prefill_tokens: int = 0     # prompt tokens actually computed (cache hits excluded)
    num_decode_tokens: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: OrderedDict[int, Sequence] = OrderedDict()   # seq_id -> sequence, in queue order
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence, front: bool = False) -> None:
        self.waiting[seq.seq_id] = seq
        if front:
            self.waiting.move_to_end(seq.seq_id, last=False)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        prefill = self._prefill_budget()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens, prefill)
        if not batch.preempted:
            self._schedule_waiting(batch, min(budget, prefill.left))
        self._count(batch)
        return batch

    def _prefill_budget(self) -> _PrefillBudget:
        cap = self.config.max_prefill_tokens_with_decodes
        decoding = cap is not None and any(seq.num_uncomputed_tokens == 1 for seq in self.running)
        return _PrefillBudget(cap if decoding else self.config.max_num_batched_tokens)

    def _schedule_running(self, batch: ScheduledBatch, budget: int, prefill: _PrefillBudget) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.reached_length(self.config.max_model_len):   # its last token is still on the device
                index += 1
                continue
            num_tokens = prefill.take(seq.num_uncomputed_tokens, budget)
            if not num_tokens:   # a prompt chunk, and the step has no prompt budget left
                index += 1
                continue
            lookahead = self._lookahead(seq, budget - num_tokens)
            while not self.block_manager.can_allocate(seq, num_tokens + lookahead):
                if lookahead:   # no room to speculate: decode plainly, preempt no one for a proposal
                    lookahead = 0
                elif self.running[-1] is not seq:
                    self._preempt(self.running.pop(), batch)
                elif not self._drop_waiting_forks():
                    self._preempt(self.running.pop(), batch)
                    break
            else:
                self.block_manager.allocate(seq, num_tokens, lookahead)
                batch.add(seq, num_tokens)
                if lookahead:
                    batch.lookahead[seq] = lookahead
                budget -= num_tokens + lookahead
                index += 1
        return budget

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """Slots for proposed tokens: only for a decode (one token left to
        compute) without a grammar, and never past ``max_tokens`` or
        ``max_model_len`` (the verified step adds up to lookahead + 1 tokens)."""
        c = self.config
        if not c.num_lookahead or seq.num_uncomputed_tokens != 1 or seq.grammar is not None:
            return 0
        return max(0, min(lookahead_for_batch(c.num_lookahead, c.lookahead_max_seqs, len(self.running)), budget,
                          seq.params.max_tokens - seq.num_output_tokens - 1, c.max_model_len - seq.num_tokens - 1))

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = next(iter(self.waiting.values()))
            swapped = bool(seq.host_block_table)
            if not seq.block_table and not swapped and seq.params.prompt_logprobs is None:   # no logits if cached
                self.block_manager.match_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, self._tokens_to_fit(seq, num_tokens)):
                if not swapped:
                    self.block_manager.free(seq)
                if self.running or batch or not self._drop_waiting_forks():
                    break
                continue
            del self.waiting[seq.seq_id]
            if swapped:
                self.block_manager.swap_in(seq)
            self.block_manager.allocate(seq, num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_tokens)
            budget -= num_tokens

    def _tokens_to_fit(self, seq: Sequence, num_tokens: int) -> int:
        """Tokens whose blocks must be free to admit ``seq`` for ``num_tokens`` now: a
        preempted sequence's whole context (see the module docstring), else the chunk."""
        if seq.num_preemptions and not self.block_manager.sliding_window:
            return seq.num_uncomputed_tokens
        return num_tokens

    def _drop_waiting_forks(self) -> bool:
        """The oldest sequence cannot grow, or nothing runs and the queue head
        does not fit: free the blocks that a waiting fork (a sibling sharing its
        parent's blocks) holds, newest first; the fork will recompute. False if
        there is none."""
        for seq in reversed(self.waiting.values()):
            if seq.block_table:
                self.block_manager.free(seq)
                return True
        return False

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        if (seq.num_computed_tokens >= self.config.swap_min_tokens
                and self.block_manager.can_swap_out(seq)):
            self.block_manager.swap_out(seq)
        else:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.add(seq, front=True)
        batch.preempted.append(seq)

    def _count(self, batch: ScheduledBatch) -> None:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens + n < seq.num_tokens:
                self.stats.num_chunked_prefills += 1
            if n == 1 and seq.num_output_tokens and seq.num_computed_tokens == seq.num_tokens - 1:
                self.stats.num_decode_tokens += 1
            else:  # prompt tokens, or outputs recomputed after preemption
                self.stats.num_prefill_tokens += n

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks: O(1) for a
        waiting one, O(max_num_seqs) for a running one."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.drop_placeholders()
        self.block_manager.free(seq)
