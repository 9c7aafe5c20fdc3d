"""A Sequence is one stream of tokens being generated: prompt + outputs, its
progress through the KV cache, and the blocks that hold it. Sequences compare
by identity (the scheduler finds them by id, never by value).

Under the asynchronous step pipeline (``llm_engine``) a token the device has
sampled but the host has not read yet is held as a placeholder
(``PLACEHOLDER``) at the end of ``token_ids``: ``num_pending`` of them, at most
two (the step in flight and the one being scheduled). They count in
``num_tokens`` and ``num_output_tokens`` (positions, noise keys, the length
budget), never in ``output_token_ids``; ``append_token`` fills the oldest one.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagellm.engine.structured import GrammarState
from pagellm.sampling_params import SamplingParams

PLACEHOLDER = -1   # a sampled token still on the device (the runner feeds it from there)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    sample_index: int          # which of the request's n samples this is
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                  # resolved seed: the user's, or one drawn at submission
    arrival_time: float
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0   # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    host_block_table: list[int | None] = field(default_factory=list)   # swapped out: its blocks on the host
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)   # of prompt tokens 1.. as they are computed
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: GrammarState | None = None   # structured outputs: advanced as tokens are appended
    num_pending: int = 0                  # trailing placeholders: sampled on the device, not read yet

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens the host has read (placeholders excluded)."""
        return len(self.token_ids) - self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:self.num_known_tokens]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reached_length(self, max_model_len: int) -> bool:
        """No token may follow (placeholders counted): max_tokens or the context is used up."""
        return self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len

    def append_token(self, token_id: int) -> None:
        """The next token: it fills the oldest placeholder, if any."""
        if self.num_pending:
            self.token_ids[self.num_known_tokens] = token_id
            self.num_pending -= 1
        else:
            self.token_ids.append(token_id)

    def add_placeholder(self) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def drop_placeholders(self) -> None:
        """Forget tokens sampled after the sequence ended (their slots are wasted)."""
        del self.token_ids[self.num_known_tokens:]
        self.num_pending = 0
