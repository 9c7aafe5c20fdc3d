"""Incremental detokenization and stop strings.

Text is produced by decoding a short window of recent tokens twice (up to the
last emitted token, and including the new one) and keeping the difference, so
each step costs O(window) and characters split across several byte-level
tokens are emitted only once complete (a trailing U+FFFD means "wait").
"""
from __future__ import annotations

from dataclasses import dataclass, field

_CONTEXT_TOKENS = 5   # prompt tokens decoded with the first outputs, for correct leading spaces


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    stop_strings: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    text: str = ""
    tokens: list[int] = field(init=False)
    prefix_offset: int = field(init=False)
    read_offset: int = field(init=False)

    def __post_init__(self) -> None:
        self._decode = _fast_decode(self.tokenizer, self.skip_special_tokens)
        self.tokens = list(self.prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._hold_back = max((len(s) for s in self.stop_strings), default=1) - 1

    def push(self, token_id: int) -> str | None:
        """Add one token; return the stop string it completed, if any."""
        self.tokens.append(token_id)
        new_text = self._decode_new()
        if not new_text or new_text.endswith("\ufffd"):
            return None
        before = len(self.text)
        self._emit(new_text)
        return self._find_stop(before)

    def flush(self) -> None:
        """At the end: emit what was held back waiting for a character to complete."""
        if self.read_offset < len(self.tokens):
            self._emit(self._decode_new())

    def _decode_new(self) -> str:
        """Text of the tokens after ``read_offset``, decoded in context."""
        if self._decode is None:
            return ""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        return full[len(prefix):]

    def _emit(self, new_text: str) -> None:
        self.text += new_text
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def _find_stop(self, new_from: int) -> str | None:
        for stop in self.stop_strings:
            index = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if index >= 0:
                end = index + len(stop) if self.include_stop_str_in_output else index
                self.text = self.text[:end]
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, hold back a tail that could still
        turn out to be the start of a stop string."""
        if finished or not self._hold_back:
            return self.text
        return self.text[:max(0, len(self.text) - self._hold_back)]


def _fast_decode(tokenizer, skip_special_tokens: bool):
    """The tokenizers library's decode when it gives the same text as the
    transformers wrapper (no clean-up of spaces), which costs far more per call."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
