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
   decode, and varlen ones for verification and mixed batches);
3. ``launch(step)`` for every step: it queues the step's kernels and returns
   a ``PendingOutput`` at once; its ``result()`` waits for the device (one
   event) and reads the sampled tokens, which were copied to pinned host
   memory behind the step. The step's token ids and positions go into
   device buffers allocated once (``InputBuffers``); a step with a
   ``step_id`` keeps its sampled ids on the device, where the next step's
   ``deferred`` tokens are taken from (the asynchronous step pipeline of
   ``llm_engine``). ``execute(step)`` is ``launch(step).result()``.

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
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pagellm import sizing
from pagellm.config import EngineConfig
from pagellm.engine.cuda_graphs import CudaGraphs, GraphShape
from pagellm.engine.kv_cache import KVCache, KVCacheSpec, wait_for_swaps
from pagellm.engine.memory import MemoryReport, estimated_activation_bytes, plan_num_blocks
from pagellm.engine.sampler import Draws, SamplingTensors, draw_tokens, score_tokens
from pagellm.engine.step import PromptScoring, ScoredToken, StepInput, StepOutput
from pagellm.distributed.groups import SINGLE, ParallelGroups, layer_range
from pagellm.kernels.attention import AttentionMetadata, get_attention_backend
from pagellm.kernels.kv_quant import check_kv_cache_dtype
from pagellm.model.builder import build_model
from pagellm.model.config import ModelConfig
from pagellm.model.context import ForwardContext
from pagellm.model.key_smoothing import KEY_SMOOTHING_ALPHA
from pagellm.model.layers import LayerFactory, LinearMethod, dense_everywhere
from pagellm.model.llama import LlamaForCausalLM
from pagellm.model.offload import OFFLOAD_FILE, LayerOffload
from pagellm.spec.verify import verify
from pagellm.utils.math import cdiv
from pagellm.utils.units import parse_bytes

logger = logging.getLogger("pagellm")
KEPT_DRAWS = 2   # steps whose sampled ids stay on the device for a later step's deferred tokens


@dataclass
class _Sampled:
    """A step's draws on their way to the host (valid once its event has passed)."""
    draws: Draws
    num_logits: list[int]
    scored: list[list[ScoredToken]] | None

    def output(self) -> StepOutput:
        return replace(StepOutput.from_rows(self.draws.output(), self.num_logits), scored=self.scored)


@dataclass
class PendingOutput:
    """A launched step's output: ``result()`` waits for the device once, then
    gives the ``StepOutput`` (None on a rank that receives none)."""
    parts: list[StepOutput | _Sampled] | None
    event: torch.cuda.Event | None = None
    _output: StepOutput | None = None

    def result(self) -> StepOutput | None:
        if self._output is None and self.parts is not None:
            if self.event is not None:
                self.event.synchronize()
            self._output = StepOutput.concat([p.output() if isinstance(p, _Sampled) else p for p in self.parts])
        return self._output


@dataclass
class InputBuffers:
    """Each step's token ids and positions on the device: allocated once, written
    in place (asynchronously from pinned memory), grown for a bigger step."""
    input_ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def allocate(cls, num_tokens: int, device: torch.device) -> InputBuffers:
        return cls(*(torch.zeros(num_tokens, dtype=torch.int64, device=device) for _ in range(2)))

    def load(self, step: StepInput, kept: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's (token ids, positions), its deferred tokens taken from the ``kept`` draws."""
        n = len(step.input_ids)
        if n > len(self.input_ids):
            grown = InputBuffers.allocate(n, self.input_ids.device)
            self.input_ids, self.positions = grown.input_ids, grown.positions
        device = self.input_ids.device
        input_ids, positions = self.input_ids[:n], self.positions[:n]
        input_ids.copy_(step.input_ids, non_blocking=True)
        positions.copy_(step.positions, non_blocking=True)
        deferred = step.deferred
        if deferred is not None:
            rows = deferred.rows.to(device, non_blocking=True)
            input_ids[deferred.positions.to(device, non_blocking=True)] = kept[deferred.source_step][rows]
        return input_ids, positions


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
        smoothing = KEY_SMOOTHING_ALPHA.get(engine.kv_cache_dtype)   # None for the model dtype's cache
        if engine.kv_cache_dtype == "fp8" and model_config.attention_bias:
            logger.warning("kv_cache_dtype fp8 keeps 3 mantissa bits a key; with key biases (Qwen2) a few large "
                           "key channels carry the scores, and their rounding costs perplexity (Qwen2.5-Coder-1.5B: "
                           "+36%): kv_cache_dtype int8 keeps them within 0.5%")
        tp = groups.tensor if groups else SINGLE
        self.tensor_parallel_size = tp.size
        layers = (layer_range(model_config.num_hidden_layers, groups.num_stages, groups.stage) if groups
                  else (0, model_config.num_hidden_layers))
        self.kv_spec = KVCacheSpec.for_model(model_config, self.dtype, engine.block_size, tp.size,
                                             layers[1] - layers[0], engine.kv_cache_dtype)
        num_offloaded = 0 if engine.cpu_offload_memory is None else self._layers_to_offload(linear_method)
        self.model = build_model(model_config, self.dtype, self.device, weights, linear_method, tp, layers,
                                 key_smoothing_alpha=smoothing, host_layers=num_offloaded,
                                 pin_host_layers=self.device.type == "cuda",
                                 host_file=Path(engine.disk_offload) / OFFLOAD_FILE if engine.disk_offload else None)
        self.offload = LayerOffload(list(self.model.layers)[-num_offloaded:], self.device) if num_offloaded else None
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
        self.buffers = InputBuffers.allocate(engine.batched_tokens, self.device)
        self.kept_draws: dict[int, torch.Tensor] = {}   # step id -> its sampled ids, on the device

    # ---- start-up ------------------------------------------------------------
    def _layers_to_offload(self, linear_method: Callable[[str], LinearMethod]) -> int:
        """Decoder layers to keep off the device: those ``cpu_offload_memory``
        covers, or with ``auto`` the fewest that let ``gpu_memory`` hold the rest
        beside the estimated activation peak and one ``max_model_len`` sequence's KV.
        Sizes come from the model made on the meta device (no memory), before any is allocated."""
        with torch.device("meta"):
            shapes = LlamaForCausalLM(self.config, LayerFactory(self.dtype, linear_method))
        layer = sum(p.numel() * p.element_size() for p in shapes.layers[0].parameters())
        num_layers = len(shapes.layers)
        if self.engine.cpu_offload_memory != "auto":
            return min(num_layers, cdiv(parse_bytes(self.engine.cpu_offload_memory), layer))
        if self.engine.gpu_memory is None:
            raise ValueError("cpu_offload_memory='auto' needs gpu_memory (the budget to fit)")
        activations = estimated_activation_bytes(self.config, self.engine.batched_tokens,
                                                 min(self.engine.max_num_seqs, self.engine.batched_tokens),
                                                 self.max_model_len, self.dtype, fused_attention=True)
        budget = (parse_bytes(self.engine.gpu_memory) - activations
                  - self.kv_spec.bytes_per_token * self.max_model_len)
        weights = sum(p.numel() * p.element_size() for p in shapes.parameters())
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

    def allocate_kv_cache(self, activation_bytes: int, activation_measured: bool,
                          draft: ModelRunner | None = None) -> int:
        """Size the pool from the budget, allocate it, capture the graphs; returns the block count. A
        speculative ``draft`` model (weights loaded) will get a pool of as many blocks: the budget
        pays for its weights and its blocks too."""
        draft_block, draft_weights = (draft.kv_spec.bytes_per_block, draft.weights_bytes) if draft else (0, 0)
        num_blocks = plan_num_blocks(self.engine, self.kv_spec.bytes_per_block + draft_block,
                                     self.weights_bytes + draft_weights, activation_bytes, 1 + (draft is not None))
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
                                   kv_cache_dtype=self.engine.kv_cache_dtype,
                                   draft_bytes=draft_weights + draft_block * num_blocks)
        self.rank_memory = (self.groups.gather(self.memory) or []) if self.groups else [self.memory]
        self.graphs = self.capture_graphs()
        return num_blocks

    def capture_graphs(self) -> CudaGraphs | None:
        """CUDA graphs need a GPU, graph-safe kernels (the Triton backend) and one pipeline stage; with
        streamed layers they cover the resident layers before them (``CudaGraphs.eager_from``)."""
        eager_from = None if self.offload is None else self.model.layer_range[1] - len(self.offload.layers)
        if (self.engine.enforce_eager or self.device.type != "cuda" or self.backend.name != "triton"
                or eager_from == 0 or (self.groups and self.groups.num_stages > 1)):
            return None
        graphs = CudaGraphs(self.model, self.backend, self.kv_cache, min(self.engine.max_num_seqs, 512),
                            self.engine.graph_tokens,
                            cdiv(self.max_model_len, self.kv_spec.block_size), self.max_model_len,
                            eager_from=eager_from)
        logger.info(f"captured {len(graphs.shapes)} CUDA graphs (decode batch 1..{graphs.sizes[-1]}, varlen "
                    f"{graphs.token_sizes[-1] if graphs.token_sizes else 0} tokens) "
                    f"in {graphs.capture_seconds:.1f} s")
        return graphs

    # ---- one step ------------------------------------------------------------
    def execute(self, *steps: StepInput) -> StepOutput | None:
        """One step, given as one or more micro-batches (consecutive sequences):
        the output of all their sequences, in order."""
        return self.launch(*steps).result()

    def launch(self, *steps: StepInput) -> PendingOutput:
        """Queue a step on the device and return without waiting for it (on one
        process; under tensor/pipeline parallelism the output is gathered first)."""
        if self.groups and self.groups.rank == 0:
            self.groups.broadcast(("step", *steps))
        with torch.inference_mode():
            parts = [self._run(step, self.kv_cache) for step in steps]
        pending = PendingOutput(parts if self.model.is_last_stage else None, self._record_event())
        self.kv_cache.start_write_back()   # behind the step's tokens on the copy engine
        if self.groups is None:
            return pending
        return PendingOutput(None, _output=self._deliver(pending.result()))

    def _record_event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's token ids, positions and attention metadata on the device
        (asynchronous copies when the engine built the step in pinned memory)."""
        return (*self.buffers.load(step, self.kept_draws), step.attention.to(self.device))

    @torch.inference_mode()
    def _execute(self, step: StepInput, kv_cache: KVCache) -> StepOutput | None:
        return self._deliver(PendingOutput([self._run(step, kv_cache)], self._record_event()).result())

    def _run(self, step: StepInput, kv_cache: KVCache) -> StepOutput | _Sampled | None:
        """This rank's part of a step: the output on the last stage; elsewhere the
        hidden states go on to the next stage and this returns None."""
        ready = kv_cache.swap(step.swap_out, step.swap_in, step.write_back, step.wait_write_back)   # asynchronous
        if step.block_copies:
            wait_for_swaps(ready)
            kv_cache.copy_blocks(step.block_copies)
        input_ids, positions, meta = self.prepare(step)
        rows = step.logits_indices.to(self.device, non_blocking=True)
        scored = None
        shape = self._graph_shape(step, meta) if kv_cache is self.kv_cache and step.scoring is None else None
        if shape is not None:   # the graph waits for each layer group's swaps itself (cuda_graphs.py)
            logits = self.graphs.run(shape, input_ids, positions, meta, rows)
        else:
            hidden = self.model(input_ids, positions, ForwardContext(meta, kv_cache.layers, self.backend, ready),
                                self._carried(len(step.input_ids)))
            if not self.model.is_last_stage:
                self.groups.send_activations(*hidden)
                return None
            logits = self.model.compute_logits(hidden[rows])
            scored = self._score(hidden, step.scoring) if step.scoring is not None else None
        if not step.sampling.params:
            return StepOutput([[] for _ in step.num_logits], scored=scored)
        tensors = SamplingTensors.from_metadata(step.sampling, self.config.vocab_size, self.device)
        draws = draw_tokens(logits, tensors)
        if step.step_id is not None:
            self._keep(step.step_id, draws.token_ids)
        if step.verification is not None:
            return replace(verify(logits, tensors, draws.output(), step.num_logits, step.verification),
                           scored=scored)
        return _Sampled(draws.to_host(), step.num_logits, scored)

    def _graph_shape(self, step: StepInput, meta: AttentionMetadata) -> GraphShape | None:
        return self.graphs.shape_for(len(step.input_ids), meta) if self.graphs is not None else None

    def logits(self, step: StepInput) -> torch.Tensor:
        """The logits of ``step``'s sampled rows, through a CUDA graph when one
        fits: a step without swaps, copies or scoring, on one process (the
        draft model's forwards, ``spec.draft``)."""
        input_ids, positions, meta = self.prepare(step)
        rows = step.logits_indices.to(self.device, non_blocking=True)
        shape = self._graph_shape(step, meta)
        if shape is not None:
            return self.graphs.run(shape, input_ids, positions, meta, rows)
        hidden = self.model(input_ids, positions, ForwardContext(meta, self.kv_cache.layers, self.backend))
        return self.model.compute_logits(hidden[rows])

    def _keep(self, step_id: int, token_ids: torch.Tensor) -> None:
        """Hold a step's sampled ids on the device for the next step's deferred tokens."""
        self.kept_draws[step_id] = token_ids
        while len(self.kept_draws) > KEPT_DRAWS:
            del self.kept_draws[next(iter(self.kept_draws))]

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
