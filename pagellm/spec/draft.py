"""A draft model proposing tokens: a smaller model sharing the target's
tokenizer, with its own weights, paged KV pool and block tables, run in the
engine's step loop just before the target verifies.

Per target sequence the draft keeps a *shadow* ``Sequence`` (same prompt,
params, seed and sample index) in its own ``BlockManager``: its tokens are the
target's verified tokens followed by the proposals of the current step. Each
step first *rolls back*: the shadow keeps the K/V of the tokens that are still
the target's own (everything verified, plus the accepted proposals) and drops
the rest, which the next forward overwrites. Then k forwards: the first
computes what the shadow lacks (the whole prompt the first time, else the
target's last one or two tokens) and draws one token; each of the other k-1
feeds the last draw and draws the next. A draw at output position ``j`` uses
the request's noise keys of ``j``, as the target's draw there would. On a GPU
the forwards replay the draft runner's own CUDA graphs (captured over its pool
at start: decode graphs for the k-1 one-token forwards, varlen ones for the
catch-up). The draft's weights and its pool are in the engine's memory plan
(``ModelRunner.allocate_kv_cache`` sizes the target's pool with them); its
graphs, like the target's, come out of the reserve left on the card.

A shadow lives while its sequence runs (the engine calls ``retain`` after
each step: a preempted or finished sequence's shadow is freed). Its pool has as many blocks as the
target's, without prefix caching (a shadow's blocks hold unverified tokens);
when it runs out, the sequences that do not fit propose nothing this step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.engine.block_manager import BlockManager
from pagellm.engine.kv_cache import KVCache
from pagellm.engine.model_runner import ModelRunner
from pagellm.engine.sampler import SamplingTensors, draw, sampling_probs
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.engine.step import build_step_input
from pagellm.spec.proposal import Proposal


@dataclass
class _Shadow:
    seq: Sequence          # the draft's copy: verified tokens, then this step's proposals
    num_verified: int      # how many of its tokens were the target's at the last sync


class DraftProposer:
    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner = runner
        spec = runner.kv_spec
        runner.kv_cache = KVCache(spec, num_blocks, runner.device)
        runner.graphs = runner.capture_graphs()
        self.block_manager = BlockManager(num_blocks, spec.block_size, enable_prefix_caching=False,
                                          sliding_window=runner.config.sliding_window,
                                          null_block=runner.kv_cache.null_block)
        self.shadows: dict[int, _Shadow] = {}

    def retain(self, running: list[Sequence]) -> None:
        live = {seq.seq_id for seq in running}
        for seq_id in [i for i in self.shadows if i not in live]:
            self.block_manager.free(self.shadows.pop(seq_id).seq)

    def propose(self, batch: ScheduledBatch) -> None:
        shadows = {seq: self._sync(seq) for seq in batch.lookahead}
        owners = {shadow: seq for seq, shadow in shadows.items()}
        drawn: dict[Sequence, list[tuple[int, torch.Tensor | None]]] = {seq: [] for seq in batch.lookahead}
        for _ in range(max(batch.lookahead.values(), default=0)):
            step = ScheduledBatch()
            for seq, k in batch.lookahead.items():
                shadow = shadows[seq]
                if len(drawn[seq]) == k or not self.block_manager.can_allocate(shadow, shadow.num_uncomputed_tokens):
                    continue
                step.add(shadow, shadow.num_uncomputed_tokens)
                self.block_manager.allocate(shadow, shadow.num_uncomputed_tokens)
            if not step:
                break
            for shadow, token, probs in zip(step.seqs, *self._forward(step)):
                shadow.num_computed_tokens = shadow.num_tokens
                shadow.append_token(token)
                self.block_manager.free_outside_window(shadow)
                drawn[owners[shadow]].append((token, probs))
        for seq, tokens in drawn.items():
            if tokens:
                probs = None if tokens[0][1] is None else torch.stack([p for _, p in tokens])
                batch.proposals[seq] = Proposal([t for t, _ in tokens], probs)

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of ``seq``, rolled back to the K/V of tokens that are
        still ``seq``'s own, with ``seq``'s tokens."""
        state = self.shadows.get(seq.seq_id)
        if state is None:
            state = self.shadows[seq.seq_id] = _Shadow(Sequence(
                seq.seq_id, seq.request_id, seq.sample_index, seq.prompt_token_ids, seq.params, seq.seed,
                seq.arrival_time), seq.num_prompt_tokens)
        shadow = state.seq
        valid = min(shadow.num_computed_tokens, seq.num_tokens - 1)
        for position in range(state.num_verified, valid):   # the proposals the target did not accept
            if shadow.token_ids[position] != seq.token_ids[position]:
                valid = position
                break
        shadow.token_ids[state.num_verified:] = seq.token_ids[state.num_verified:]
        shadow.num_computed_tokens = valid
        state.num_verified = seq.num_tokens
        self.block_manager.release_unverified(shadow)
        return shadow

    @torch.inference_mode()
    def _forward(self, batch: ScheduledBatch) -> tuple[list[int], list[torch.Tensor | None]]:
        """One draft forward: per shadow, its drawn token and (when it samples)
        the normalised distribution it was drawn from."""
        runner = self.runner
        step = build_step_input(batch, self.block_manager.block_size, [])
        logits = runner.logits(step)
        t = SamplingTensors.from_metadata(step.sampling, runner.config.vocab_size, runner.device)
        logits, probs = sampling_probs(logits, t)
        tokens = draw(logits.argmax(dim=-1), probs, t).tolist()
        if probs is None:
            return tokens, [None] * len(tokens)
        probs = probs / probs.sum(-1, keepdim=True)
        return tokens, [None if p.greedy else probs[i] for i, p in enumerate(step.sampling.params)]
