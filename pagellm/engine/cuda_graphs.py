"""CUDA graphs for decode steps (as in gpt-fast / nano-vllm).

A decode step is small kernels back to back; launching them costs more than
running them at small batch sizes. At start-up one graph per padded batch size
is captured over static input buffers; a decode-only batch is copied into those
buffers, padded up to the next captured size (padding tokens write nothing:
slot -1), and replayed. The attention metadata's ``max_seq_len`` is fixed to
``max_model_len`` so kernel launch shapes never change between replays.
"""
from __future__ import annotations

import time

import torch

from pagellm.engine.kv_cache import KVCache
from pagellm.kernels.attention import AttentionBackend, AttentionMetadata
from pagellm.model.context import ForwardContext
from pagellm.model.llama import LlamaForCausalLM


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, kv_cache: KVCache,
                 max_batch: int, max_blocks_per_seq: int, max_seq_len: int) -> None:
        device = kv_cache.pool.device
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.max_seq_len = max_seq_len
        self.sizes = graph_batch_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        self._capture_all()
        self.capture_seconds = time.perf_counter() - start

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(self.query_start_loc[:batch + 1], self.seq_lens[:batch], self.block_tables[:batch],
                                 self.slot_mapping[:batch], max_query_len=1, max_seq_len=self.max_seq_len)

    def _forward(self, batch: int) -> torch.Tensor:
        ctx = ForwardContext(self._meta(batch), self.kv_cache.layers, self.backend)
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for batch in reversed(self.sizes):       # largest first, so smaller graphs reuse its memory
            self._forward(batch)                 # warm-up: compiles kernels, sets up workspaces
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (meta.max_query_len == 1 and meta.num_seqs <= self.sizes[-1]
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits ``[num_seqs, vocab]`` of a decode-only batch."""
        n = input_ids.shape[0]
        batch = next(s for s in self.sizes if s >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:batch] = -1
        self.seq_lens[:n] = meta.seq_lens
        self.seq_lens[n:batch] = 1
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width] = meta.block_tables
        self.graphs[batch].replay()
        return self.logits[batch][:n]
