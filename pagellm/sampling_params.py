"""Per-request sampling settings, named and validated as in vLLM's offline API.

Every integer must fit in int64 (the sampler's tensors) and every float must be
finite, so a request that passes ``__post_init__`` cannot make a step fail.
``top_k`` larger than the vocabulary means "all tokens" (the sampler clamps it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

INT64_MAX = 2**63 - 1
INT64_MIN = -2**63
_OPTIONAL = ("seed", "max_tokens", "logprobs")   # integer fields that may be None


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (exactly one field set): ``json`` (a JSON
    schema, as a dict or its text), ``json_object`` (any JSON object), ``regex``,
    or ``choice`` (one of the given strings)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "json_object", "regex", "choice") if getattr(self, name)]
        _check(len(given) == 1, "structured_outputs", f"must set exactly one of json, json_object, regex, choice; "
                                                      f"got {given or 'none'}")
        _check(self.choice is None or all(isinstance(c, str) and c for c in self.choice), "structured_outputs",
               "choice must be a list of non-empty strings")
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json, sort_keys=True)


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop.

    ``temperature == 0`` means greedy. ``seed`` makes a request's samples a pure
    function of (seed, sample index, output position): the same seed gives the
    same output whatever else is in the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None   # per prompt token: its log-probability and this many top ones
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"):
            value = getattr(self, name)
            _check(_is_int64(value) or (value is None and name in _OPTIONAL), name,
                   f"must be an integer within int64, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), name,
                   f"must be a finite number, got {value!r}")
        _check(all(_is_int64(t) for t in self.stop_token_ids), "stop_token_ids",
               "must be integers within int64")
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n!r}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", f"must be >= 0, got {self.logprobs}")
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
               f"must be >= 0, got {self.prompt_logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
               "must be a non-empty string or a list of them")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
