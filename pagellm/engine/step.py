"""The step contract between the engine and a worker.

The engine (scheduler, block manager, sequences) turns each scheduled batch
into a ``StepInput``: plain tensors on the host and plain values, everything a
worker needs to run one forward pass and sample, and nothing it must look up
elsewhere. The worker answers with a ``StepOutput``. A worker never sees a
``Sequence``, so it can live in another process (a tensor- or
pipeline-parallel rank receives a pickled ``StepInput``).

Layout of the flat batch (``StepInput.attention``, the attention metadata of
``kernels.attention``, still on the host): sequence ``b`` owns
tokens ``query_start_loc[b]:query_start_loc[b+1]``; its context after the step
is ``seq_lens[b]`` tokens; ``block_tables[b]`` names its pages (padded with
block 0, which no kernel reads past ``seq_lens``); ``slot_mapping[t]`` is where
token ``t``'s K/V go. Sequence ``b`` wants logits for its last
``num_logits[b]`` tokens: 0 for a prompt chunk that is not the last, 1 for a
decode or a prompt's last chunk, k+1 when k proposed tokens are verified.
``logits_indices`` lists those rows of the flat batch, sequence by sequence,
and ``sampling`` describes each of them. A sequence verifying proposed tokens
(``verification``) feeds its last token and the k proposals at the next
positions; its row ``i`` samples output position ``num_output_tokens + i`` as
if the first ``i`` proposals were already its own (noise keys, penalties), and
it gets back the accepted proposals plus one token of the target's own. Separately, ``scoring`` names the
rows whose logits score the prompt's own next tokens (prompt log-probs): the
worker reports the log-probability of each target token, its rank and the top
ones, and samples nothing there.

Under the asynchronous step pipeline a step is built before the previous one's
tokens reach the host: a sequence's last input token may be a placeholder
(``Sequence.num_pending``), and ``deferred`` tells the worker where to put the
token it sampled for that sequence in the step named ``source_step`` (the
worker keeps the sampled ids of a step with a ``step_id`` on the device until
the next step has read them). A worker in another process gets the same plain
indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagellm.engine.host_blocks import HostCopies
from pagellm.engine.sampler import SamplerOutput, SamplingMetadata, row_keys
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.engine.structured import token_bitmask
from pagellm.kernels.attention import AttentionMetadata
from pagellm.sampling_params import SamplingParams
from pagellm.utils.math import cdiv


@dataclass
class StepInput:
    input_ids: torch.Tensor         # [T] int64
    positions: torch.Tensor         # [T] int64
    attention: AttentionMetadata    # on the host; the worker moves it to its device
    num_logits: list[int]           # [B]
    logits_indices: torch.Tensor    # [sum(num_logits)] int64
    sampling: SamplingMetadata
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # (src, dst), run before the forward
    # (device block, host block) copies to and from the KV cache's host pool: all of swap_out, then all of
    # swap_in, then block_copies, then the forward; write_back after the step, which does not wait for it
    # (kv_cache.py, host_blocks.py)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    write_back: list[tuple[int, int]] = field(default_factory=list)
    wait_write_back: bool = False   # wait for the write-backs of earlier steps first
    scoring: PromptScoring | None = None
    verification: Verification | None = None
    step_id: int | None = None              # set when the next step takes its sampled ids (``deferred``)
    deferred: DeferredTokens | None = None


@dataclass
class DeferredTokens:
    """Input tokens still on the device: flat batch position ``positions[i]``
    takes the token that step ``source_step`` sampled in its row ``rows[i]``."""
    source_step: int
    positions: torch.Tensor         # [K] int64
    rows: torch.Tensor              # [K] int64


@dataclass
class PreviousStep:
    """The step in flight, as the next one's inputs see it: its id and the
    row among its draws of each sequence that sampled there."""
    step_id: int
    rows: dict[Sequence, int]


@dataclass
class Verification:
    """Proposed tokens to verify, per sequence of the step (``[]``: none), and
    for a sampled proposal the draft distribution each was drawn from (``[k, V]``
    float32; None: a proposal drawn greedily or not drawn, as n-gram lookup)."""
    proposed: list[list[int]]
    draft_probs: list[torch.Tensor | None]


@dataclass
class PromptScoring:
    """Rows scored against the token that follows them in the prompt."""
    num_rows: list[int]             # [B], 0 for sequences that want no prompt log-probs
    row_indices: torch.Tensor       # [sum(num_rows)] int64, rows of the flat batch
    target_token_ids: torch.Tensor  # [sum(num_rows)] int64
    num_top: int                    # top log-probs per row (the largest any sequence asks for)


@dataclass
class ScoredToken:
    """A known token's log-probability, its rank (1 = the most likely) and the top tokens of the row."""
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class StepOutput:
    """Per sequence of the step, in order: the tokens it sampled (``[]`` when
    it wanted no logits) and, when asked, their log-probabilities; and the
    prompt tokens it scored."""
    token_ids: list[list[int]]
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None
    scored: list[list[ScoredToken]] | None = None

    @classmethod
    def from_rows(cls, draws: SamplerOutput, num_logits: list[int]) -> StepOutput:
        """Regroup the sampler's per-row draws by sequence."""
        def split(values: list | None) -> list[list] | None:
            if values is None:
                return None
            out, start = [], 0
            for n in num_logits:
                out.append(values[start:start + n])
                start += n
            return out

        return cls(split(draws.token_ids), split(draws.logprobs), split(draws.top_logprobs))

    @classmethod
    def concat(cls, parts: list[StepOutput]) -> StepOutput:
        """The outputs of consecutive micro-batches of one step, as one; a part
        that reports no log-probabilities reports empty ones."""
        def join(field_name: str, empty) -> list | None:
            values = [getattr(part, field_name) for part in parts]
            if all(v is None for v in values):
                return None
            return [entry for part, v in zip(parts, values)
                    for entry in (v if v is not None else [empty(tokens) for tokens in part.token_ids])]

        return cls([ids for part in parts for ids in part.token_ids], join("logprobs", lambda tokens: []),
                   join("top_logprobs", lambda tokens: [[] for _ in tokens]), join("scored", lambda tokens: []))


def build_step_input(batch: ScheduledBatch, block_size: int, block_copies: list[tuple[int, int]],
                     pin_memory: bool = False, swaps: HostCopies = HostCopies.none(),
                     previous: PreviousStep | None = None, step_id: int | None = None) -> StepInput:
    """The StepInput of a scheduled batch: each sequence computes its next
    ``num_new_tokens`` tokens from ``num_computed_tokens`` on. ``pin_memory``
    (for a CUDA worker) lets its copies to the device run asynchronously;
    ``swaps`` are the host pool's copies; a sequence's
    placeholder token comes from its row of the ``previous`` step's draws."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    num_logits: list[int] = []
    logits_indices: list[int] = []
    sampled, drafts = [], []
    scored = _ScoredRows()
    deferred_positions, deferred_rows = [], []
    verification = Verification([], []) if batch.proposals else None
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        scored.add(seq, start, end, first_row=len(input_ids))
        proposal = batch.proposals.get(seq)
        proposed = proposal.token_ids if proposal is not None else []
        input_ids.extend(seq.token_ids[start:end] + proposed)
        if seq.num_pending:   # its last token: the previous step's draw, still on the device
            deferred_positions.append(len(input_ids) - len(proposed) - 1)
            deferred_rows.append(previous.rows[seq])
        end += len(proposed)
        positions.extend(range(start, end))
        slots.extend(slot_range(seq.block_table, block_size, start, end))
        query_start.append(query_start[-1] + end - start)
        seq_lens.append(end)
        rows = 1 + len(proposed) if end == seq.num_tokens + len(proposed) else 0
        num_logits.append(rows)
        logits_indices.extend(range(len(input_ids) - rows, len(input_ids)))
        sampled.extend([seq] * rows)
        drafts.extend(proposed[:i] for i in range(rows))
        if verification is not None:
            verification.proposed.append(proposed)
            verification.draft_probs.append(proposal.probs if proposal is not None else None)
    width = max(len(s.block_table) for s in batch.seqs)
    tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=pin_memory)

    attention = AttentionMetadata(
        query_start_loc=tensor(query_start, torch.int32), seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor(tables, torch.int32), slot_mapping=tensor(slots, torch.int64),
        max_query_len=max(b - a for a, b in zip(query_start, query_start[1:])), max_seq_len=max(seq_lens))
    return StepInput(input_ids=tensor(input_ids, torch.int64), positions=tensor(positions, torch.int64),
                     attention=attention, num_logits=num_logits,
                     logits_indices=tensor(logits_indices, torch.int64),
                     sampling=sampling_metadata(sampled, drafts), block_copies=block_copies,
                     swap_out=swaps.out, swap_in=swaps.in_, write_back=swaps.write_back,
                     wait_write_back=swaps.wait_write_back, scoring=scored.request(tensor),
                     verification=verification, step_id=step_id,
                     deferred=DeferredTokens(previous.step_id, tensor(deferred_positions, torch.int64),
                                             tensor(deferred_rows, torch.int64)) if deferred_positions else None)


@dataclass
class _ScoredRows:
    """Collects the prompt positions to score: a position ``p`` of the prompt
    scores token ``p + 1``; a position scored before a preemption is not
    scored again (``seq.prompt_logprobs`` holds what is done)."""
    num_rows: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    num_top: int = -1

    def add(self, seq: Sequence, start: int, end: int, first_row: int) -> None:
        wanted = seq.params.prompt_logprobs
        lo, hi = max(start, len(seq.prompt_logprobs)), min(end, seq.num_prompt_tokens - 1)
        count = hi - lo if wanted is not None and lo < hi else 0
        self.num_rows.append(count)
        if count:
            self.rows.extend(range(first_row + lo - start, first_row + hi - start))
            self.targets.extend(seq.token_ids[lo + 1:hi + 1])
            self.num_top = max(self.num_top, wanted)

    def request(self, tensor) -> PromptScoring | None:
        if not self.rows:
            return None
        return PromptScoring(self.num_rows, tensor(self.rows, torch.int64), tensor(self.targets, torch.int64),
                             self.num_top)


def slot_range(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Pool slots of positions ``start .. end-1`` through ``block_table``."""
    slots: list[int] = []
    for index in range(start // block_size, (end - 1) // block_size + 1):
        base = block_table[index] * block_size
        lo, hi = max(start, index * block_size), min(end, (index + 1) * block_size)
        slots.extend(range(base + lo % block_size, base + (hi - 1) % block_size + 1))
    return slots


def sampling_metadata(seqs: list[Sequence], drafts: list[list[int]] | None = None) -> SamplingMetadata:
    """One row per sequence that samples its next token (greedy rows need no
    noise keys); ``drafts[row]``: proposed tokens that row samples after."""
    drafts = drafts or [[] for _ in seqs]
    params = [s.params for s in seqs]
    keys = [] if all(p.greedy for p in params) else [
        row_keys(s.seed, s.sample_index, s.num_output_tokens + len(d)) for s, d in zip(seqs, drafts)]
    meta = SamplingMetadata(params, keys)
    if any(p.has_penalties for p in params):
        meta.prompt_token_ids = [s.prompt_token_ids for s in seqs]
        meta.output_token_ids = [s.output_token_ids + d for s, d in zip(seqs, drafts)]
    if any(s.grammar is not None for s in seqs):
        meta.token_bitmask = token_bitmask([s.grammar for s in seqs])
    return meta


# The sampling path that allocates the most: every filter, penalty and logprobs on.
_HEAVIEST_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1,
                                    presence_penalty=0.1, frequency_penalty=0.1, logprobs=5)


def profile_step_input(num_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int) -> StepInput:
    """The heaviest step the scheduler can hand a worker: a full token budget
    of prompts, each within ``max_model_len``, in as many sequences as allowed
    (each samples a token, with the heaviest sampling settings), over blocks
    ``0 .. n-1`` of a scratch pool."""
    num_tokens = min(num_tokens, max_num_seqs * max_model_len)
    num_seqs = min(max_num_seqs, num_tokens)
    batch = ScheduledBatch()
    next_block = 0
    for i in range(num_seqs):
        length = num_tokens // num_seqs + (i < num_tokens % num_seqs)
        seq = Sequence(i, "profile", 0, [0] * length, _HEAVIEST_SAMPLING, seed=0, arrival_time=0.0)
        seq.block_table = list(range(next_block, next_block + cdiv(length, block_size)))
        next_block += len(seq.block_table)
        batch.add(seq, length)
    return build_step_input(batch, block_size, [])
