"""Speculative decoding: a proposer guesses the next tokens of each decoding
sequence, and the target verifies them all in one forward.

The engine's hooks are small: the scheduler reserves lookahead slots for a
decoding sequence (``ScheduledBatch.lookahead``); a proposer fills
``ScheduledBatch.proposals`` (``ngram.py``: prompt lookup; ``draft.py``: a
draft model with its own paged KV); ``step.build_step_input`` feeds each
proposal after the sequence's last token and asks k+1 logits rows of it;
the worker's sampler draws every row and ``verify.py`` keeps the accepted
proposals plus one token of the target's (rejection sampling: the output
distribution is the target's, greedy output is identical to decoding without
speculation); the engine appends them through its usual stop checks and gives
the rejected slots back (``BlockManager.release_unverified``). Unverified
tokens never enter the prefix cache: blocks are published from a sequence's
verified tokens only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from pagellm.config import EngineConfig
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.model.config import ModelConfig


class Proposer(Protocol):
    def propose(self, batch: ScheduledBatch) -> None:
        """Fill ``batch.proposals`` for (some of) the sequences of ``batch.lookahead``."""

    def retain(self, running: list[Sequence]) -> None:
        """After a step: drop any state of sequences no longer running."""


def open_draft(config: EngineConfig, target: ModelConfig, max_model_len: int, open_model: Callable):
    """The draft model's runner with its weights loaded and no KV pool yet (None: no draft model), built
    before the target sizes its pool so that the draft's weights and pool are part of the memory plan.
    ``open_model`` is the engine's (config -> model config, checkpoint, weights, tokenizer)."""
    if config.speculative_method != "draft":
        return None
    from pagellm.engine.model_runner import ModelRunner
    from pagellm.quant import quantization_policy, resolve_quantization
    draft_config = replace(config, model=config.speculative_model, speculative_method=None, speculative_model=None,
                           speculative_quantization=None, quantization=config.speculative_quantization or
                           config.quantization, swap_space=None, cpu_offload_memory=None,
                           disk_offload=None)   # the draft stays resident
    model_config, checkpoint, weights, _ = open_model(draft_config)
    if model_config.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({model_config.vocab_size}) differs from the target's "
                         f"({target.vocab_size}): they must share a tokenizer")
    quantization = resolve_quantization(draft_config.quantization, checkpoint)
    return ModelRunner(draft_config, model_config, weights, max_model_len,
                       quantization_policy(quantization, checkpoint, draft_config))


def make_proposer(config: EngineConfig, draft, num_blocks: int) -> Proposer | None:
    """The proposer ``config`` asks for (None: no speculation); ``draft`` is ``open_draft``'s runner."""
    if config.speculative_method is None:
        return None
    if config.speculative_method == "ngram":
        from pagellm.spec.ngram import NgramProposer
        return NgramProposer()
    from pagellm.spec.draft import DraftProposer
    return DraftProposer(draft, num_blocks)
