"""Verification of proposed tokens by the target's logits: which are accepted,
and the target's own token after them, with the target distribution preserved
exactly.

Row ``i`` of a verifying sequence holds the target's logits after its tokens
and the first ``i`` proposals; the sampler has already drawn each row's token
the way decoding without speculation would (``draws``: the same mask,
penalties, filters and noise keys of that output position). Then, in order:

- a proposal without a draft distribution (n-gram lookup, or any greedy row):
  accepted iff it is that draw. For a one-hot proposal this *is* rejection
  sampling (accepted with probability p(t); on rejection the draw is a sample
  of p restricted to the other tokens, i.e. of the residual max(0, p - onehot)
  renormalised), and it returns exactly the tokens decoding would have drawn;
- a proposal ``t`` drawn from a draft distribution q: accepted iff
  u < p(t) / q(t), else replaced by a draw from max(0, p - q) renormalised
  (Leviathan et al. 2023), where u and that draw use the row's noise keys
  salted (``_ACCEPT``, ``_RESIDUAL``): still a pure function of the request's
  seed and progress, so seeded requests stay reproducible;
- after the last accepted proposal comes the next row's draw (after all k:
  the bonus row k).

Log-probabilities are those of the raw model distribution, as without
speculation.
"""
from __future__ import annotations

import torch

from pagellm.engine.sampler import SamplerOutput, SamplingTensors, exponential_noise, sampling_probs
from pagellm.engine.step import StepOutput, Verification

_ACCEPT = 0x5851F42D
_RESIDUAL = 0x2545F491


def verify(logits: torch.Tensor, t: SamplingTensors, draws: SamplerOutput, num_logits: list[int],
           verification: Verification) -> StepOutput:
    """Per sequence, the accepted proposals and one token of the target's."""
    out = StepOutput([], [] if draws.logprobs is not None else None,
                     [] if draws.top_logprobs is not None else None)
    start = 0
    for rows, proposed, q in zip(num_logits, verification.proposed, verification.draft_probs):
        if not rows:
            chosen = []
        else:
            chosen = _accepted(logits, t, draws, start, proposed, q) if proposed else [(start, None)]
        out.token_ids.append([draws.token_ids[row] if token is None else token for row, token in chosen])
        if out.logprobs is not None:
            out.logprobs.append([draws.logprobs[row] if token is None else
                                 float(torch.log_softmax(logits[row], -1)[token]) for row, token in chosen])
        if out.top_logprobs is not None:
            out.top_logprobs.append([draws.top_logprobs[row] for row, _ in chosen])
        start += rows
    return out


def _accepted(logits: torch.Tensor, t: SamplingTensors, draws: SamplerOutput, start: int, proposed: list[int],
              q: torch.Tensor | None) -> list[tuple[int, int | None]]:
    """(row, token) of each token the sequence gets; token None: the row's own draw."""
    if q is None:
        chosen = []
        for i, token in enumerate(proposed):
            chosen.append((start + i, None))
            if draws.token_ids[start + i] != token:
                return chosen
        return chosen + [(start + len(proposed), None)]
    k = len(proposed)
    rows = t.rows(start, start + k)
    _, p = sampling_probs(logits[start:start + k], rows)
    p = p / p.sum(-1, keepdim=True)
    q = q.to(p.device)
    index = torch.arange(k, device=p.device)
    ids = torch.tensor(proposed, device=p.device)
    uniform = torch.exp(-exponential_noise(rows.row_keys ^ _ACCEPT, 1)[:, 0])
    accept = (uniform * q[index, ids] < p[index, ids]).tolist()
    chosen = []
    for i, token in enumerate(proposed):
        if not accept[i]:
            residual = (p[i] - q[i]).clamp_min(0)
            noise = exponential_noise(rows.row_keys[i:i + 1] ^ _RESIDUAL, p.shape[-1])[0]
            return chosen + [(start + i, int((residual / noise).argmax()))]
        chosen.append((start + i, token))
    return chosen + [(start + k, None)]
