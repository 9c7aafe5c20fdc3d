"""Runs the model on a scheduled batch: builds the flat input tensors and the
attention metadata, owns the KV cache tensor, and samples."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from pagellm.config import EngineConfig
from pagellm.engine.block_manager import BlockManager
from pagellm.engine.cuda_graphs import DecodeGraphs
from pagellm.engine.memory import (MemoryReport, estimated_activation_bytes, kv_bytes_per_token,
                                   plan_num_blocks)
from pagellm.engine.sampler import SamplerOutput, SamplingTensors, sample
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.kernels.attention import AttentionMetadata, get_attention_backend
from pagellm.model.config import ModelConfig
from pagellm.model.llama import LlamaForCausalLM
from pagellm.sampling_params import SamplingParams

logger = logging.getLogger("pagellm")


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                weights: Iterable[tuple[str, torch.Tensor]] | None, num_tensors: int = 0,
                seed: int = 0) -> LlamaForCausalLM:
    """Materialise the model on ``device`` without a throw-away random init, then
    fill it from ``weights`` (or with random values of the usual scale)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    model.rotary.reset_cache()
    if weights is None:
        _init_random(model, seed)
    else:
        loaded = model.load_weights(tqdm(weights, total=num_tensors or None, desc="loading weights", unit="tensor",
                                         leave=False))
        missing = {n for n, _ in model.named_parameters()} - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model.eval()


def _init_random(model: LlamaForCausalLM, seed: int) -> None:
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


class ModelRunner:
    def __init__(self, engine: EngineConfig, model: LlamaForCausalLM, max_model_len: int) -> None:
        self.engine = engine
        self.model = model
        self.config = model.config
        self.device = engine.torch_device
        self.dtype = engine.torch_dtype
        self.block_size = engine.block_size
        self.backend = get_attention_backend(engine.attention_backend, self.device)
        weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        activation_bytes, measured = self._activation_peak(max_model_len)
        per_token = kv_bytes_per_token(self.config, self.dtype)
        num_blocks = plan_num_blocks(engine, per_token * self.block_size, weights_bytes, activation_bytes)
        self.num_blocks = num_blocks
        null_block = 1 if self.config.sliding_window else 0   # see BlockManager.null_block
        self.kv_cache = torch.empty(2, self.config.num_hidden_layers, num_blocks + null_block, self.block_size,
                                    self.config.num_key_value_heads, self.config.head_dim,
                                    dtype=self.dtype, device=self.device)
        self.memory = MemoryReport(weights_bytes, activation_bytes, self.kv_cache.numel() * self.kv_cache.element_size(),
                                   per_token, num_blocks, self.block_size, max_model_len, measured)
        self.graphs = self._capture_graphs(max_model_len)

    def _capture_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        """Decode CUDA graphs need a GPU and graph-safe kernels (the Triton backend)."""
        if self.engine.enforce_eager or self.device.type != "cuda" or self.backend.name != "triton":
            return None
        graphs = DecodeGraphs(self.model, self.backend, self.kv_cache, min(self.engine.max_num_seqs, 512),
                              -(-max_model_len // self.block_size), max_model_len)
        logger.info(f"captured {len(graphs.sizes)} decode CUDA graphs (batch 1..{graphs.sizes[-1]}) "
                    f"in {graphs.capture_seconds:.1f} s")
        return graphs

    def _activation_peak(self, max_model_len: int) -> tuple[int, bool]:
        """Peak transient memory of the heaviest step: a full token budget of
        prompts (each within max_model_len) and the sampler's worst path over
        max_num_seqs rows. Measured on CUDA, estimated elsewhere."""
        tokens, rows = self.engine.batched_tokens, self.engine.max_num_seqs
        if self.device.type != "cuda":
            return estimated_activation_bytes(self.config, tokens, rows, max_model_len, self.dtype,
                                              fused_attention=self.backend.name != "torch"), False
        lengths = [min(max_model_len, tokens - start) for start in range(0, tokens, max_model_len)]
        blocks = BlockManager(sum(-(-n // self.block_size) for n in lengths), self.block_size, False)
        heavy = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, presence_penalty=0.1)
        batch = ScheduledBatch()
        for i, n in enumerate(lengths):
            seq = Sequence(i, "profile", 0, [0] * n, heavy, 0, 0.0)
            blocks.allocate(seq, n)
            batch.add(seq, n)
        scratch = torch.zeros(2, self.config.num_hidden_layers, blocks.num_blocks, self.block_size,
                              self.config.num_key_value_heads, self.config.head_dim, dtype=self.dtype,
                              device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            input_ids, positions, meta, _, _ = self.prepare(batch)
            self.model(input_ids, positions, scratch, meta, self.backend)
            logits = self.model.compute_logits(torch.zeros(rows, self.config.hidden_size, dtype=self.dtype,
                                                           device=self.device))
            dummies = [Sequence(i, "profile", 0, [0], heavy, 0, 0.0) for i in range(rows)]
            sample(logits, SamplingTensors.from_sequences(dummies, self.config.vocab_size, self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch
        torch.cuda.empty_cache()
        return int(peak), True

    # ---- one step ------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int],
                                                     list[Sequence]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            for block_index in range(start // bs, (end - 1) // bs + 1):
                base = seq.block_table[block_index] * bs
                lo, hi = max(start, block_index * bs), min(end, (block_index + 1) * bs)
                slots.extend(range(base + lo % bs, base + (hi - 1) % bs + 1))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:
                logits_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda").to(
                self.device, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=tensor(query_start, torch.int32), seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(tables, torch.int32), slot_mapping=tensor(slots, torch.int64),
            max_query_len=max(batch.num_new_tokens), max_seq_len=max(seq_lens))
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, logits_rows, sampled

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that produced a token and the draws."""
        input_ids, positions, meta, logits_rows, sampled = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(meta.num_seqs, meta.max_query_len,
                                                           meta.block_tables.shape[1]):
            logits = self.graphs.run(input_ids, positions, meta)[logits_rows]
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
            logits = self.model.compute_logits(hidden[logits_rows]) if sampled else None
        if not sampled:
            return sampled, None
        tensors = SamplingTensors.from_sequences(sampled, self.config.vocab_size, self.device)
        return sampled, sample(logits, tensors)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate KV blocks ``src -> dst`` in every layer."""
        if pairs:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*pairs))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
