"""The one sampler: grammar mask, penalties, temperature, min-p/top-k/top-p, then a draw.

Draws use the Gumbel-max form of categorical sampling (argmax of p / E with E ~
Exp(1)) where E comes from a counter-based hash of (seed, sample index, output
position, token id). A request's randomness is therefore a pure function of its
own seed and progress: the same seed gives the same tokens whatever else shares
the batch, after preemption and recomputation, and on any device.

Nothing here waits for the device: per-row settings and token histories reach
it as one pinned-memory copy each (``device_tensor``, asynchronous), the rows
are filtered, penalised and drawn with batched tensor ops, and the draws stay
on the device (``Draws``) until the caller asks for them on the host, so the
asynchronous step pipeline can feed them to the next step first.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from pagellm.sampling_params import SamplingParams
from pagellm import sizing
from pagellm.utils.device import device_tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@dataclass
class SamplingMetadata:
    """What the sampler needs per logits row, as plain values (it travels in the ``StepInput``)."""
    params: list[SamplingParams]
    row_keys: list[tuple[int, int]]                   # noise keys (``row_keys``); [] when all rows are greedy
    prompt_token_ids: list[list[int]] | None = None   # only when some row has a penalty
    output_token_ids: list[list[int]] | None = None
    token_bitmask: torch.Tensor | None = None         # [N, ceil(V/32)] int32 allowed tokens; None: no grammar


@dataclass
class SamplingTensors:
    """Per-row settings as device tensors; only what the batch needs is built
    (an all-greedy batch without penalties or logprobs needs none)."""
    all_greedy: bool
    needs_filtering: bool
    needs_penalties: bool
    wants_logprobs: bool
    max_logprobs: int
    temperature: torch.Tensor | None = None         # [N] fp32, 0 = greedy
    top_k: torch.Tensor | None = None               # [N] int64, vocab size = off
    top_p: torch.Tensor | None = None               # [N] fp32
    min_p: torch.Tensor | None = None               # [N] fp32
    row_keys: torch.Tensor | None = None            # [N, 2] int64, 32-bit hash keys per row
    repetition_penalty: torch.Tensor | None = None  # [N] fp32
    presence_penalty: torch.Tensor | None = None    # [N] fp32
    frequency_penalty: torch.Tensor | None = None   # [N] fp32
    prompt_token_ids: list[list[int]] | None = None   # the rows' histories, when penalties need them
    output_token_ids: list[list[int]] | None = None
    token_bitmask: torch.Tensor | None = None       # [N, ceil(V/32)] int32, on the device

    @classmethod
    def from_metadata(cls, meta: SamplingMetadata, vocab_size: int, device: torch.device) -> "SamplingTensors":
        params = meta.params

        def tensor(values, dtype=torch.float32):
            return device_tensor(values, dtype, device)

        t = cls(all_greedy=all(p.greedy for p in params),
                needs_filtering=any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params),
                needs_penalties=any(p.has_penalties for p in params),
                wants_logprobs=any(p.logprobs is not None for p in params),
                max_logprobs=max((p.logprobs or 0) for p in params))
        if not t.all_greedy:
            t.temperature = tensor([p.temperature for p in params])
            t.row_keys = tensor(meta.row_keys, torch.int64)
        if not t.all_greedy and t.needs_filtering:
            t.top_k = tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], torch.int64)
            t.top_p = tensor([p.top_p for p in params])
            t.min_p = tensor([p.min_p for p in params])
        if t.needs_penalties:
            t.repetition_penalty = tensor([p.repetition_penalty for p in params])
            t.presence_penalty = tensor([p.presence_penalty for p in params])
            t.frequency_penalty = tensor([p.frequency_penalty for p in params])
            t.prompt_token_ids, t.output_token_ids = meta.prompt_token_ids, meta.output_token_ids
        if meta.token_bitmask is not None:
            t.token_bitmask = meta.token_bitmask.to(device, non_blocking=True)
        return t

    def rows(self, start: int, end: int) -> SamplingTensors:
        """The settings of rows ``start .. end-1``."""
        return replace(self, **{f.name: getattr(self, f.name)[start:end] for f in fields(self)
                                if isinstance(getattr(self, f.name), (torch.Tensor, list))})


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack allowed-token bit rows (bit ``j`` of word ``i``: token ``32 i + j``) into ``[N, V]`` booleans."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def token_histograms(prompt_token_ids: list[list[int]], output_token_ids: list[list[int]], vocab_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: which tokens occur in prompt or output, and how often each occurs in the output.
    One copy and one scatter for the whole batch (not one per row)."""
    rows = len(prompt_token_ids)
    seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
    counts = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
    histories = [prompt + output for prompt, output in zip(prompt_token_ids, output_token_ids)]
    for flags, lists in ((seen, histories), (counts, output_token_ids)):
        row_ids = [row for row, tokens in enumerate(lists) for _ in tokens]
        if row_ids:
            index = device_tensor([row_ids, [t for tokens in lists for t in tokens]], torch.int64, device)
            flags.index_put_((index[0], index[1]), torch.ones(len(row_ids), dtype=flags.dtype, device=device),
                             accumulate=flags.dtype != torch.bool)
    return seen, counts


def row_keys(seed: int, sample_index: int, output_position: int) -> tuple[int, int]:
    """The noise keys of one draw: a pure function of the request's seed, the
    sample and the position of the token drawn."""
    # Python's hash of a tuple of ints is fixed across runs (no hash randomisation).
    base = (seed, sample_index, output_position)
    return hash(base) & _MASK32, hash(base + (1,)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on values in [0, 2^32) held in int64."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def exponential_noise(row_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[N, V]`` Exp(1) variates, a pure function of the row keys and token ids."""
    token = torch.arange(vocab_size, device=row_keys.device, dtype=torch.int64)
    h = _fmix32((row_keys[:, :1] + token[None, :] * _GOLDEN) & _MASK32)
    h = _fmix32(h ^ row_keys[:, 1:])
    uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition penalty over prompt and output (HF semantics); presence and
    frequency penalties over the output only (OpenAI semantics)."""
    seen, counts = token_histograms(t.prompt_token_ids, t.output_token_ids, logits.shape[-1], logits.device)
    rep = t.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - t.frequency_penalty[:, None] * counts
    return logits - t.presence_penalty[:, None] * (counts > 0)


def filter_probs(probs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Zero out tokens outside min-p, top-k and top-p (renormalisation is not
    needed for the argmax draw)."""
    probs = probs.masked_fill(probs < t.min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    cumulative = sorted_probs.cumsum(-1)
    drop = (rank >= t.top_k[:, None]) | (cumulative - sorted_probs > t.top_p[:, None] * cumulative[:, -1:])
    drop[:, 0] = False
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def score_tokens(logits: torch.Tensor, targets: torch.Tensor, num_top: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per row of ``logits [N, V]`` (the raw model distribution): the
    log-probability of ``targets[row]``, its rank (1 = most likely) and the
    ``num_top`` largest log-probabilities with their token ids."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    if not num_top:
        return chosen, ranks, None, None
    values, ids = logprobs.topk(num_top, dim=-1)
    return chosen, ranks, values, ids


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None                   # of the chosen tokens (raw model distribution)
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class Draws:
    """The sampler's answer as tensors: on the device until ``to_host``."""
    token_ids: torch.Tensor                # [N] int64
    logprobs: torch.Tensor | None = None   # [N] fp32, of the chosen tokens
    top_values: torch.Tensor | None = None   # [N, k] fp32
    top_ids: torch.Tensor | None = None      # [N, k] int64

    def to_host(self) -> Draws:
        """Host copies, started without waiting (pinned memory on CUDA); read
        them only after the device got past this point (an event)."""
        return Draws(*(x.to("cpu", non_blocking=True) if x is not None else None
                       for x in (self.token_ids, self.logprobs, self.top_values, self.top_ids)))

    def output(self) -> SamplerOutput:
        """As lists (this waits for the device when the tensors live there)."""
        top = None
        if self.top_ids is not None:
            top = [list(zip(i, v)) for i, v in zip(self.top_ids.tolist(), self.top_values.tolist())]
        return SamplerOutput(self.token_ids.tolist(), self.logprobs.tolist() if self.logprobs is not None else None,
                             top)


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """``logits [N, V]`` fp32 -> one token per row, on the host."""
    return draw_tokens(logits, t).output()


def draw_tokens(logits: torch.Tensor, t: SamplingTensors) -> Draws:
    """``logits [N, V]`` fp32 -> one token per row, left on the device.

    Rows go through in chunks of ``sizing.sampler_chunk_rows(V)``, which
    bounds the working memory of the heavy paths whatever the batch size; a
    row's draw depends only on its own keys, so chunking changes no token."""
    if t.all_greedy and not t.needs_penalties and not t.wants_logprobs and t.token_bitmask is None:
        return Draws(logits.argmax(dim=-1))
    step = sizing.sampler_chunk_rows(logits.shape[-1])
    chunks = [_sample_rows(logits[start:start + step], t.rows(start, start + step))
              for start in range(0, logits.shape[0], step)]
    tokens, chosen, top_values, top_ids = (torch.cat(parts) if parts[0] is not None else None
                                           for parts in zip(*chunks))
    return Draws(tokens, chosen, top_values if t.max_logprobs else None, top_ids if t.max_logprobs else None)


def sampling_probs(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution each row samples from: (the logits after mask and
    penalties, whose argmax is the greedy token; the probabilities after
    temperature and filters too, not renormalised, None when every row is greedy)."""
    if t.token_bitmask is not None:
        logits = logits.masked_fill(~allowed_tokens(t.token_bitmask, logits.shape[-1]), float("-inf"))
    if t.needs_penalties:
        logits = apply_penalties(logits, t)
    if t.all_greedy:
        return logits, None
    probs = torch.softmax(logits / t.temperature.clamp_min(1e-5)[:, None], dim=-1)
    return logits, filter_probs(probs, t) if t.needs_filtering else probs


def draw(greedy: torch.Tensor, probs: torch.Tensor | None, t: SamplingTensors) -> torch.Tensor:
    """One token per row: the greedy one for temperature 0, else the Gumbel-max draw with the row's keys."""
    if probs is None:
        return greedy
    drawn = (probs / exponential_noise(t.row_keys, probs.shape[-1])).argmax(dim=-1)
    return torch.where(t.temperature == 0, greedy, drawn)


def _sample_rows(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, ...]:
    """(tokens, their log-probabilities, top log-probabilities, their ids) of
    some rows; the last three None when not asked for."""
    raw_logprobs = torch.log_softmax(logits, dim=-1) if t.wants_logprobs else None
    logits, probs = sampling_probs(logits, t)
    tokens = draw(logits.argmax(dim=-1), probs, t)
    if raw_logprobs is None:
        return tokens, None, None, None
    chosen = raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    if not t.max_logprobs:
        return tokens, chosen, None, None
    values, ids = raw_logprobs.topk(t.max_logprobs, dim=-1)
    return tokens, chosen, values, ids
