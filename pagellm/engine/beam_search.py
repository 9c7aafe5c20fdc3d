"""Beam search over the engine, with HF transformers' selection rules.

Each round every live beam is one engine request for a single token with the
top-K log-probabilities; the prefix cache lets all beams of a prompt share the
blocks of their common tokens (a beam's full blocks are found by hash, only its
last partial block is recomputed), and a pruned beam's blocks simply drop a
reference. Selection follows ``GenerationMixin._beam_search`` (transformers
5): keep the top ``max(2, 1 + #eos) * width`` continuations, the best ``width``
that do not end continue, those among the top ``width`` that end become
hypotheses scored ``sum_logprob / generated_len ** length_penalty``, and the
search stops when no running beam can beat the worst kept hypothesis (HF's
``early_stopping=False`` heuristic) or the length limit is reached.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagellm.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class BeamSearchSequence:
    tokens: list[int]          # generated tokens (an ending EOS included)
    cum_logprob: float
    score: float               # cum_logprob / len(tokens) ** length_penalty
    text: str = ""


@dataclass
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]   # best first


@dataclass
class _Beam:
    tokens: list[int]
    cum_logprob: float


@dataclass
class BeamSearchState:
    """Beams and hypotheses of one prompt; ``advance`` is one round."""
    prompt_token_ids: list[int]
    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    running: list[_Beam] = field(default_factory=lambda: [_Beam([], 0.0)])
    finished: list[BeamSearchSequence] = field(default_factory=list)
    improvable: bool = True
    done: bool = False

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + len(self.eos_token_ids)) * self.params.beam_width

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=self.num_candidates)

    def advance(self, top_logprobs: list[list[tuple[int, float]]]) -> None:
        """``top_logprobs[b]``: (token, logprob) of the best continuations of beam b."""
        width, generated = self.params.beam_width, len(self.running[0].tokens)
        candidates = sorted(((beam.cum_logprob + lp, b, token) for b, beam in enumerate(self.running)
                             for token, lp in top_logprobs[b]), key=lambda c: -c[0])[:self.num_candidates]
        at_limit = generated + 1 >= self.params.max_tokens
        ends = [at_limit or (token in self.eos_token_ids and not self.params.ignore_eos) for _, _, token in candidates]
        if self.improvable:
            for (score, b, token), end in list(zip(candidates, ends))[:width]:
                if end:
                    tokens = self.running[b].tokens + [token]
                    self.finished.append(BeamSearchSequence(tokens, score, score / len(tokens) ** self.params.length_penalty))
            self.finished = sorted(self.finished, key=lambda s: -s.score)[:width]
        self.running = [_Beam(self.running[b].tokens + [token], score)
                        for (score, b, token), end in zip(candidates, ends) if not end][:width]
        self.improvable = self.improvable and (
            len(self.finished) < width or not self.running
            or self.running[0].cum_logprob / (generated + 1) ** self.params.length_penalty > self.finished[-1].score)
        self.done = not self.improvable or all(ends) or not self.running
