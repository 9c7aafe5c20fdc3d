"""The worker side of the step contract: a model, its KV cache and CUDA
graphs on one device, turning a ``StepInput`` into a ``StepOutput``.

It never sees a ``Sequence``; everything it is told arrives in plain values
(``EngineConfig``, ``ModelConfig``, ``StepInput``), so a tensor-parallel rank in
another process can run the same class. Start-up is driven by the engine in
three calls, as each needs the last one's answer:

1. ``profile_activations(step)``: the peak transient memory of the heaviest
   step (``step.profile_step_input``), run through the same ``execute`` path
   on a scratch pool, measured on CUDA and taken from ``pagellm.sizing``
   elsewhere;
2. ``allocate_kv_cache(activation_bytes)``: size the pool from the budget,
   allocate it (``KVCache``) and capture the decode CUDA graphs;
3. ``execute(step)`` for every step.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from pagellm import sizing
from pagellm.config import EngineConfig
from pagellm.engine.cuda_graphs import DecodeGraphs
from pagellm.engine.kv_cache import KVCache, KVCacheSpec
from pagellm.engine.memory import MemoryReport, estimated_activation_bytes, plan_num_blocks
from pagellm.engine.sampler import SamplingTensors, sample, score_tokens
from pagellm.engine.step import PromptScoring, ScoredToken, StepInput, StepOutput
from pagellm.kernels.attention import AttentionMetadata, get_attention_backend
from pagellm.kernels.kv_quant import check_kv_cache_dtype
from pagellm.model.builder import build_model
from pagellm.model.config import ModelConfig
from pagellm.model.context import ForwardContext
from pagellm.model.layers import LinearMethod, dense_everywhere
from pagellm.utils.math import cdiv

logger = logging.getLogger("pagellm")


class ModelRunner:
    def __init__(self, engine: EngineConfig, model_config: ModelConfig,
                 weights: Iterable[tuple[str, torch.Tensor]], max_model_len: int,
                 linear_method: Callable[[str], LinearMethod] = dense_everywhere) -> None:
        self.engine = engine
        self.config = model_config
        self.device = engine.torch_device
        self.dtype = engine.torch_dtype
        self.max_model_len = max_model_len
        check_kv_cache_dtype(engine.kv_cache_dtype, self.device)   # before any weight is read
        self.model = build_model(model_config, self.dtype, self.device, weights, linear_method,
                                 smooth_keys=engine.kv_cache_dtype != "auto")
        self.backend = get_attention_backend(engine.attention_backend, self.device)
        self.kv_spec = KVCacheSpec.for_model(model_config, self.dtype, engine.block_size, engine.kv_cache_dtype)
        self.weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.kv_cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.memory: MemoryReport | None = None

    # ---- start-up ------------------------------------------------------------
    def profile_activations(self, step: StepInput) -> tuple[int, bool]:
        """(peak bytes of ``step`` beyond weights and KV, whether measured)."""
        if self.device.type != "cuda":
            return estimated_activation_bytes(self.config, len(step.input_ids), len(step.logits_indices),
                                              self.max_model_len, self.dtype,
                                              fused_attention=self.backend.fused), False
        scratch = KVCache(self.kv_spec, int(step.attention.block_tables.max()) + 1, self.device)
        self._execute(step, scratch)   # once first: kernel builds and library workspaces stay, they are no activations
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self._execute(step, scratch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch
        torch.cuda.empty_cache()
        return int(peak), True

    def allocate_kv_cache(self, activation_bytes: int, activation_measured: bool) -> int:
        """Size the pool from the budget, allocate it, capture the graphs; returns the block count."""
        num_blocks = plan_num_blocks(self.engine, self.kv_spec.bytes_per_block, self.weights_bytes,
                                     activation_bytes)
        self.kv_cache = KVCache(self.kv_spec, num_blocks, self.device)
        self.memory = MemoryReport(self.weights_bytes, activation_bytes, self.kv_cache.nbytes,
                                   self.kv_spec.bytes_per_token, num_blocks, self.kv_spec.block_size,
                                   self.max_model_len, activation_measured, self.backend.fused,
                                   self.engine.kv_cache_dtype)
        self.graphs = self._capture_graphs()
        return num_blocks

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Decode CUDA graphs need a GPU and graph-safe kernels (the Triton backend)."""
        if self.engine.enforce_eager or self.device.type != "cuda" or self.backend.name != "triton":
            return None
        graphs = DecodeGraphs(self.model, self.backend, self.kv_cache, min(self.engine.max_num_seqs, 512),
                              cdiv(self.max_model_len, self.kv_spec.block_size), self.max_model_len)
        logger.info(f"captured {len(graphs.sizes)} decode CUDA graphs (batch 1..{graphs.sizes[-1]}) "
                    f"in {graphs.capture_seconds:.1f} s")
        return graphs

    # ---- one step ------------------------------------------------------------
    def execute(self, step: StepInput) -> StepOutput:
        return self._execute(step, self.kv_cache)

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's token ids, positions and attention metadata on the device
        (asynchronous copies when the engine built the step in pinned memory)."""
        return (step.input_ids.to(self.device, non_blocking=True), step.positions.to(self.device, non_blocking=True),
                step.attention.to(self.device))

    @torch.inference_mode()
    def _execute(self, step: StepInput, kv_cache: KVCache) -> StepOutput:
        kv_cache.copy_blocks(step.block_copies)
        input_ids, positions, meta = self.prepare(step)
        rows = step.logits_indices.to(self.device, non_blocking=True)
        scored = None
        if (kv_cache is self.kv_cache and step.scoring is None and self.graphs is not None
                and self.graphs.can_run(meta)):
            logits = self.graphs.run(input_ids, positions, meta)[rows]
        else:
            hidden = self.model(input_ids, positions, ForwardContext(meta, kv_cache.layers, self.backend))
            logits = self.model.compute_logits(hidden[rows])
            scored = self._score(hidden, step.scoring) if step.scoring is not None else None
        if not step.sampling.params:
            return StepOutput([[] for _ in step.num_logits], scored=scored)
        draws = sample(logits, SamplingTensors.from_metadata(step.sampling, self.config.vocab_size, self.device))
        return replace(StepOutput.from_rows(draws, step.num_logits), scored=scored)

    def _score(self, hidden: torch.Tensor, scoring: PromptScoring) -> list[list[ScoredToken]]:
        """Score each row against its target token, a chunk of rows at a time
        (the logits of a long prompt chunk would not fit at once)."""
        rows = scoring.row_indices.to(self.device, non_blocking=True)
        targets = scoring.target_token_ids.to(self.device, non_blocking=True)
        chunk = sizing.sampler_chunk_rows(self.config.vocab_size)
        parts = [score_tokens(self.model.compute_logits(hidden[rows[start:start + chunk]]),
                              targets[start:start + chunk], scoring.num_top)
                 for start in range(0, len(rows), chunk)]
        logprobs, ranks, top_values, top_ids = (torch.cat(p).tolist() if p[0] is not None else None
                                                for p in zip(*parts))
        scored = [ScoredToken(lp, rank, list(zip(top_ids[i], top_values[i])) if top_ids else [])
                  for i, (lp, rank) in enumerate(zip(logprobs, ranks))]
        out, start = [], 0
        for n in scoring.num_rows:
            out.append(scored[start:start + n])
            start += n
        return out
