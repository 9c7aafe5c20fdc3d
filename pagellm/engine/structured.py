"""Structured outputs: each constrained sequence carries a grammar matcher, and
every step hands the sampler an allowed-token mask.

Built on xgrammar (the library vLLM and SGLang use). Invariants:

- Engine side only. A request's ``StructuredOutputsParams`` is compiled once
  per engine into a grammar (cached by the compiler: a caller may compile in
  another thread first, as the server does in its worker pool, so the engine
  thread only meets cache hits); each of its sequences gets a matcher that
  advances as tokens are appended (``LLMEngine._append``).
- The worker sees the mask only, as plain data: per sampled row, int32 words
  whose bit ``j`` of word ``i`` allows token ``32 i + j``
  (``SamplingMetadata.token_bitmask``); rows without a grammar are all ones.
- A matcher never rolls back: preemption recomputes KV but never re-draws a
  token, so the tokens it accepted stay.
- A matcher that reached the end of its grammar allows only the stop tokens,
  and the sequence stops there.
- JSON is generated compact (no optional whitespace): small models otherwise
  loop on whitespace.
"""
from __future__ import annotations

import json
import re
import threading

import torch

from pagellm.sampling_params import StructuredOutputsParams

_CACHE_BYTES = 256 << 20   # compiled grammars kept per engine
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")   # "[11:41:52] /project/cpp/x.cc:94: "


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; thread-safe, cached.
    The tokenizer's tables are built on first use (about 0.5 s for a 150k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> "CompiledGrammar":
        """Raises ValueError (starting with ``structured_outputs``) for a grammar that cannot be compiled."""
        compiler = self._get()
        try:
            if spec.json is not None:
                grammar = compiler.compile_json_schema(spec.json, any_whitespace=False)
            elif spec.json_object:
                grammar = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec.regex is not None:
                grammar = compiler.compile_regex(spec.regex)
            else:
                grammar = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
        except RuntimeError as exc:
            message = _XGRAMMAR_LOCATION.sub("", str(exc).strip())
            raise ValueError(f"structured_outputs could not be compiled: {message}") from exc
        return CompiledGrammar(grammar)

    def _get(self):
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured_outputs needs a tokenizer; this model has none")
                import xgrammar
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=_CACHE_BYTES)
            return self._compiler


class CompiledGrammar:
    def __init__(self, grammar) -> None:
        self.grammar = grammar

    def matcher(self) -> GrammarState:
        import xgrammar
        return GrammarState(xgrammar.GrammarMatcher(self.grammar), self.grammar.tokenizer_info.vocab_size)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} was drawn outside the grammar's mask")

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def token_bitmask(grammars: list[GrammarState | None]) -> torch.Tensor:
    """``[rows, ceil(V/32)]`` int32 allowed-token bits, all ones where a row has no grammar."""
    vocab_size = next(g.vocab_size for g in grammars if g is not None)
    bitmask = torch.full((len(grammars), -(-vocab_size // 32)), -1, dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.fill(bitmask, row)
    return bitmask
