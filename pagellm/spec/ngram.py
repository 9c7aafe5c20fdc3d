"""Prompt lookup: propose what followed the last earlier occurrence of the
sequence's current n-gram in its own tokens (prompt and output), trying the
longest n-gram first. No model, no state: a proposal is a pure function of the
sequence's tokens, so preemption and rollback need nothing here."""
from __future__ import annotations

from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.spec.proposal import Proposal

MAX_NGRAM = 3
MIN_NGRAM = 1


def lookup(tokens: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of
    the last ``n`` tokens, for the largest ``n`` in ``max_n .. min_n`` that occurs."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = tokens[size - n:]
        first = tail[0]
        for start in range(size - n - 1, -1, -1):   # the latest match first
            if tokens[start] == first and tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


class NgramProposer:
    def retain(self, running: list[Sequence]) -> None:
        """Nothing to keep."""

    def propose(self, batch: ScheduledBatch) -> None:
        for seq, k in batch.lookahead.items():
            tokens = lookup(seq.token_ids, k)
            if tokens:
                batch.proposals[seq] = Proposal(tokens)
