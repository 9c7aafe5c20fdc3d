"""Counters of speculative decoding, read by ``LLMEngine.stats`` (bench output, ``/metrics``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecStats:
    num_steps: int = 0        # sequence-steps that verified a proposal
    num_proposed: int = 0     # proposed tokens verified
    num_accepted: int = 0     # of them accepted

    def record(self, proposed: int, accepted: int) -> None:
        self.num_steps += 1
        self.num_proposed += proposed
        self.num_accepted += accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens a verifying sequence gains per step: the accepted proposals plus the target's own token."""
        return (self.num_accepted + self.num_steps) / self.num_steps if self.num_steps else 0.0
