"""What a proposer hands the engine for one decoding sequence of a step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    """Up to ``lookahead`` tokens guessed to follow the sequence, and the
    ``[len(token_ids), V]`` draft distribution each was drawn from; ``probs``
    is None when the tokens were not sampled (n-gram lookup, a greedy draft),
    and verification then treats each as certain (a one-hot proposal)."""
    token_ids: list[int]
    probs: torch.Tensor | None = None
