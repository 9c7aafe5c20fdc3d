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
   allocate it (``KVCache``) and capture the CUDA graphs (``engine.cuda_graphs``:
   decode, and varlen ones for verification and small mixed batches);
3. ``execute(step)`` for every step.

Under tensor/pipeline parallelism (``groups``) every rank runs one, on its
slice of the model and its own KV pool, in lockstep: rank 0's runner (the
engine's) first broadcasts each call's input to the others
(``engine.parallel``), the pool takes the block count every rank can hold, a
stage other than the first takes its hidden states from the one before, and
rank 0 receives the last stage's ``StepOutput``; other ranks' calls return
None. A step may come as several micro-batches (``execute(*steps)``): each
stage runs them in order and passes each on as soon as it is done, so while
stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1; the last
stage sends the outputs back together.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from pagellm import sizing
from pagellm.config import EngineConfig
from pagellm.engine.cuda_graphs import CudaGraphs
from pagellm.engine.kv_cache import KVCache, KVCacheSpec
from pagellm.engine.memory import MemoryReport, estimated_activation_bytes, plan_num_blocks
from pagellm.engine.sampler import SamplingTensors, sample, score_tokens
from pagellm.engine.step import PromptScoring, ScoredToken, StepInput, StepOutput
from pagellm.distributed.groups import SINGLE, ParallelGroups, layer_range
from pagellm.kernels.attention import AttentionMetadata, get_attention_backend
from pagellm.kernels.kv_quant import check_kv_cache_dtype
from pagellm.model.builder import build_model
from pagellm.model.config import ModelConfig
from pagellm.model.context import ForwardContext
from pagellm.model.layers import LinearMethod, RotaryEmbedding, dense_everywhere
from pagellm.model.offload import LayerOffload
from pagellm.model.layers import LinearMethod, dense_everywhere
from pagellm.spec.verify import verify
from pagellm.utils.math import cdiv
from pagellm.utils.units import parse_bytes

logger = logging.getLogger("pagellm")


class ModelRunner:
    def __init__(self, engine: EngineConfig, model_config: ModelConfig,
                 weights: Iterable[tuple[str, torch.Tensor]], max_model_len: int,
                 linear_method: Callable[[str], LinearMethod] = dense_everywhere,
                 groups: ParallelGroups | None = None) -> None:
        self.engine = engine
        self.config = model_config
        self.groups = groups
        self.device = engine.torch_device
        self.dtype = engine.torch_dtype
        self.max_model_len = max_model_len
        check_kv_cache_dtype(engine.kv_cache_dtype, self.device)   # before any weight is read
        smooth_keys = engine.kv_cache_dtype != "auto"
        tp = groups.tensor if groups else SINGLE
        self.tensor_parallel_size = tp.size
        layers = (layer_range(model_config.num_hidden_layers, groups.num_stages, groups.stage) if groups
                  else (0, model_config.num_hidden_layers))
        self.kv_spec = KVCacheSpec.for_model(model_config, self.dtype, engine.block_size, tp.size,
                                             layers[1] - layers[0], engine.kv_cache_dtype)
        self.offload: LayerOffload | None = None
        if engine.cpu_offload_memory is None:
            self.model = build_model(model_config, self.dtype, self.device, weights, linear_method, tp, layers,
                                     smooth_keys=smooth_keys)
        else:   # built on the host; what stays on the device moves there
            self.model = build_model(model_config, self.dtype, "cpu", weights, linear_method,
                                     smooth_keys=smooth_keys)
            num_offloaded = self._layers_to_offload()
            if num_offloaded:
                self.offload = LayerOffload(list(self.model.layers)[-num_offloaded:], self.device,
                                            engine.disk_offload)
            self.model.to(self.device)
            rotary = self.model.rotary
            with torch.device(self.device):   # the rotary table as a model built there computes it, bit for bit
                rotary.cos_sin_cache = RotaryEmbedding(rotary.head_dim, rotary.max_positions, rotary.theta,
                                                       rotary.scaling).cos_sin_cache
        self.backend = get_attention_backend(engine.attention_backend, self.device)
        self.weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.host_weights_bytes = 0
        if self.offload is not None:   # its layers' parameters are counted at their size, pointing at a buffer
            self.host_weights_bytes = self.offload.host_bytes
            self.weights_bytes += self.offload.buffer_bytes - self.host_weights_bytes
        self.kv_cache: KVCache | None = None
        self.graphs: CudaGraphs | None = None
        self.memory: MemoryReport | None = None
        self.rank_memory: list[MemoryReport] = []   # on rank 0: every rank's report, in rank order

    # ---- start-up ------------------------------------------------------------
    def _layers_to_offload(self) -> int:
        """Decoder layers to keep off the device: those ``cpu_offload_memory``
        covers, or with ``auto`` the fewest that let ``gpu_memory`` hold the rest
        beside the estimated activation peak and one ``max_model_len`` sequence's KV."""
        layer = sum(p.numel() * p.element_size() for p in self.model.layers[0].parameters())
        num_layers = len(self.model.layers)
        if self.engine.cpu_offload_memory != "auto":
            return min(num_layers, cdiv(parse_bytes(self.engine.cpu_offload_memory), layer))
        if self.engine.gpu_memory is None:
            raise ValueError("cpu_offload_memory='auto' needs gpu_memory (the budget to fit)")
        activations = estimated_activation_bytes(self.config, self.engine.batched_tokens,
                                                 min(self.engine.max_num_seqs, self.engine.batched_tokens),
                                                 self.max_model_len, self.dtype, fused_attention=True)
        budget = (parse_bytes(self.engine.gpu_memory) - activations
                  - self.kv_spec.bytes_per_token * self.max_model_len)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        num_offloaded = sizing.offloaded_layers(weights, layer, num_layers, budget)
        if num_offloaded is None:
            raise ValueError(f"gpu_memory {self.engine.gpu_memory} cannot hold the weights outside the decoder "
                             f"layers, two layer buffers, the activations and one sequence's KV")
        return num_offloaded

    def profile_activations(self, step: StepInput) -> tuple[int, bool]:
        """(peak bytes of ``step`` beyond weights and KV, whether measured)."""
        if self.device.type != "cuda":
            return estimated_activation_bytes(self.config, len(step.input_ids), len(step.logits_indices),
                                              self.max_model_len, self.dtype, fused_attention=self.backend.fused,
                                              tensor_parallel_size=self.tensor_parallel_size), False
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
        if self.groups:
            num_blocks = self.groups.agree_min(num_blocks)
        num_host_blocks = parse_bytes(self.engine.swap_space or 0) // self.kv_spec.bytes_per_block
        self.kv_cache = KVCache(self.kv_spec, num_blocks, self.device, num_host_blocks)
        self.memory = MemoryReport(self.weights_bytes, activation_bytes, self.kv_cache.nbytes,
                                   self.kv_spec.bytes_per_token, num_blocks, self.kv_spec.block_size,
                                   self.max_model_len, activation_measured, self.backend.fused,
                                   host_kv_cache_bytes=self.kv_cache.host_nbytes, num_host_blocks=num_host_blocks,
                                   host_weights_bytes=self.host_weights_bytes,
                                   offloaded_layers=len(self.offload.layers) if self.offload else 0,
                                   offload_tier="disk" if self.engine.disk_offload else "host",
                                   kv_cache_dtype=self.engine.kv_cache_dtype)
        self.rank_memory = (self.groups.gather(self.memory) or []) if self.groups else [self.memory]
        self.graphs = self._capture_graphs()
        return num_blocks

    def _capture_graphs(self) -> CudaGraphs | None:
        """CUDA graphs need a GPU, graph-safe kernels (the Triton backend), no streamed layers and
        one pipeline stage."""
        if (self.engine.enforce_eager or self.device.type != "cuda" or self.backend.name != "triton"
                or self.offload is not None or (self.groups and self.groups.num_stages > 1)):
            return None
        graphs = CudaGraphs(self.model, self.backend, self.kv_cache, min(self.engine.max_num_seqs, 512),
                            min(self.engine.cuda_graph_max_tokens, self.engine.batched_tokens),
                            cdiv(self.max_model_len, self.kv_spec.block_size), self.max_model_len)
        logger.info(f"captured {len(graphs.shapes)} CUDA graphs (decode batch 1..{graphs.sizes[-1]}, varlen "
                    f"{graphs.token_sizes[-1] if graphs.token_sizes else 0} tokens) "
                    f"in {graphs.capture_seconds:.1f} s")
        return graphs

    # ---- one step ------------------------------------------------------------
    def execute(self, *steps: StepInput) -> StepOutput | None:
        """One step, given as one or more micro-batches (consecutive sequences):
        the output of all their sequences, in order."""
        if self.groups and self.groups.rank == 0:
            self.groups.broadcast(("step", *steps))
        with torch.inference_mode():
            outputs = [self._run(step, self.kv_cache) for step in steps]
        return self._deliver(StepOutput.concat(outputs) if self.model.is_last_stage else None)

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's token ids, positions and attention metadata on the device
        (asynchronous copies when the engine built the step in pinned memory)."""
        return (step.input_ids.to(self.device, non_blocking=True), step.positions.to(self.device, non_blocking=True),
                step.attention.to(self.device))

    @torch.inference_mode()
    def _execute(self, step: StepInput, kv_cache: KVCache) -> StepOutput | None:
        return self._deliver(self._run(step, kv_cache))

    def _run(self, step: StepInput, kv_cache: KVCache) -> StepOutput | None:
        """This rank's part of a step: the output on the last stage; elsewhere the
        hidden states go on to the next stage and this returns None."""
        kv_cache.swap(step.swap_out, step.swap_in)
        kv_cache.copy_blocks(step.block_copies)
        input_ids, positions, meta = self.prepare(step)
        rows = step.logits_indices.to(self.device, non_blocking=True)
        scored = None
        shape = (self.graphs.shape_for(len(step.input_ids), meta)
                 if kv_cache is self.kv_cache and step.scoring is None and self.graphs is not None else None)
        if shape is not None:
            logits = self.graphs.run(shape, input_ids, positions, meta, rows)
        else:
            hidden = self.model(input_ids, positions, ForwardContext(meta, kv_cache.layers, self.backend),
                                self._carried(len(step.input_ids)))
            if not self.model.is_last_stage:
                self.groups.send_activations(*hidden)
                return None
            logits = self.model.compute_logits(hidden[rows])
            scored = self._score(hidden, step.scoring) if step.scoring is not None else None
        if not step.sampling.params:
            return StepOutput([[] for _ in step.num_logits], scored=scored)
        tensors = SamplingTensors.from_metadata(step.sampling, self.config.vocab_size, self.device)
        draws = sample(logits, tensors)
        if step.verification is not None:
            return replace(verify(logits, tensors, draws, step.num_logits, step.verification), scored=scored)
        return replace(StepOutput.from_rows(draws, step.num_logits), scored=scored)

    def _carried(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A later pipeline stage's input: the previous stage's hidden states and residual."""
        if self.model.is_first_stage:
            return None
        return self.groups.recv_activations(num_tokens, self.config.hidden_size, self.dtype)

    def _deliver(self, output: StepOutput | None) -> StepOutput | None:
        """The last stage's output (None elsewhere), for rank 0: its own, or sent there
        by the last stage's tensor rank 0."""
        groups = self.groups
        if groups is None or groups.num_stages == 1:
            return output if groups is None or groups.rank == 0 else None
        if groups.is_last_stage and groups.tensor.rank == 0:
            groups.send_output(output)
        return groups.recv_output() if groups.rank == 0 else None

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
