"""CUDA graphs for decode, speculative verification and mixed batches (prompt chunks beside decodes)
(as in gpt-fast / nano-vllm for decode; vLLM's "full graphs" for the rest).

A step of a few tokens is small kernels back to back; launching them costs
more than running them (an eager forward of Llama-3-8B is ~27 ms of host work
on the H200's host, a graph replay of the same step ~5 ms). At start-up graphs
are captured over static input buffers (``StaticInputs``), in two families:

* **decode graphs**, one per padded batch size (``graph_batch_sizes``): every
  sequence has one query (``max_query_len == 1``), so only the split-KV
  decode kernel runs; the graph ends in the logits of every row.
* **varlen graphs**, one per padded token count (``graph_token_sizes``, up to
  ``max_tokens``) and padded sequence count (``graph_seq_sizes``: 4, 16, 64,
  256 and the most that many tokens can hold): any batch that fits, in which
  sequences may have several queries: a speculative verification step (k+1 per
  sequence), prefill chunks beside decodes. Both attention kernels run (each
  skips the other's sequences, on the device). The graph ends in the hidden
  states; the logits of the rows the step samples are computed after the
  replay (a 512-token graph would otherwise compute 512 rows of logits).

The graphs of a family write their outputs into one buffer, allocated outside
the graphs' memory pool at the family's largest shape (each graph a view of
its first rows): an output per graph would stay allocated per graph, and the
float32 logits of every decode batch size of a Llama-3 vocabulary alone are
1.1 GB, over the 1 GiB a card's default sizing reserves for them (a
Llama-3-8B bf16 engine on an H200 now leaves 1.53 GiB free after start-up,
0.63 before; h200-2026-12-02-graph-memory.json). Callers
get rows gathered out of the buffer (a copy), so a later replay of another
size never changes what they hold.

Padding (``StaticInputs.fill``): the step's tokens and sequences come first.
Padding tokens ``[T, T_pad)`` belong to no sequence (``query_start_loc[B:] =
T``), sit at position 0 and write nothing (slot -1); padding sequences have no
queries and no context, so both kernels skip them. A padding row's hidden
states are garbage that no real row reads: every op outside attention is
row-wise. Launch shapes depend only on the padded shape (``GraphShape``): the
decode split count on (``B_pad``, Hkv, ``max_seq_len``), the prefill grid on
(``T_pad``, ``B_pad``), and ``max_seq_len`` is fixed to ``max_model_len``.
The sequence buckets matter: every padding sequence adds programs to both
attention grids (each prefill program finds its sequence by a binary search
before it can exit), and the decode split count falls as ``B_pad`` grows; with
``B_pad = T_pad`` a 512-token graph of one prompt chunk and 8 decodes ran no
faster than the eager step on an H200, and decodes of long contexts beside a
chunk got one split each.

Host swaps: every graph is captured waiting, where each layer group first
touches its KV, for that group's event of the KV cache (``KVCache.layer_ready``,
external events: a replay waits for their last records before it, those of
the step's own ``swap`` when it copies anything, else long-passed ones). So a
step restoring blocks from the host replays at once: layer 0 computes while
later groups still copy, as in the eager forward.

Streamed layers (``eager_from``, weight offload): a replay would repeat the
host-to-device copies of the step it was captured in, so when the last layers
stream from the host (``model.offload``) the graphs run only the resident
layers before them and end in their ``(hidden, residual)``, side by side in
one buffer; the streamed layers, the final norm and the LM head then run
eagerly on the padded batch (the same static inputs), their copies
overlapping the next layers as without graphs.

Exactness: a replay runs the kernels an eager forward of the padded batch
runs, so its tokens are that run's. With ``capture=False`` the same padded
batch runs eagerly (no graph): the CPU tests compare its tokens with the
unpadded step's, which checks the padding; the GPU check compares replays
with it bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagellm.engine.kv_cache import KVCache
from pagellm.kernels.attention import AttentionBackend, AttentionMetadata
from pagellm.model.context import ForwardContext
from pagellm.model.llama import LlamaForCausalLM


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


LINEAR_TOKEN_STEP = 256   # varlen graph sizes above 512 tokens: every this many tokens


def graph_token_sizes(max_tokens: int) -> list[int]:
    """Padded token counts of the varlen graphs: powers of two from 8, the
    midpoints from 64 to 512 (at most a third of a graph is padding there),
    then every ``LINEAR_TOKEN_STEP`` tokens (a mixed step of prompt chunks
    beside decodes, compute-bound there, pays for its padding in FLOPs: at
    most 256 / 768 of it), up to ``max_tokens``; none when it is 0."""
    if max_tokens <= 0:
        return []
    sizes, size = [], 8
    while size < min(max_tokens, 512):
        sizes += [size] if size < 64 else [size, size * 3 // 2]
        size *= 2
    sizes += list(range(512, max_tokens, LINEAR_TOKEN_STEP))
    return sorted({s for s in sizes if s < max_tokens}) + [max_tokens]


def graph_seq_sizes(num_tokens: int, max_batch: int) -> list[int]:
    """Padded sequence counts of the varlen graphs of ``num_tokens`` tokens."""
    most = min(num_tokens, max_batch)
    return [b for b in (4, 16, 64, 256) if b < most] + [most]


@dataclass(frozen=True)
class GraphShape:
    """A captured batch shape: padded tokens, padded sequences, and the query
    length the metadata announces (1: decode only; else the prefill kernel runs too)."""
    num_tokens: int
    num_seqs: int
    max_query_len: int

    @property
    def decode(self) -> bool:
        return self.max_query_len == 1


@dataclass
class StaticInputs:
    """The device buffers every graph reads; a step is copied in, padded to its graph's shape."""
    input_ids: torch.Tensor         # [max_tokens] int64
    positions: torch.Tensor         # [max_tokens] int64
    slot_mapping: torch.Tensor      # [max_tokens] int64
    query_start_loc: torch.Tensor   # [max_seqs + 1] int32
    seq_lens: torch.Tensor          # [max_seqs] int32
    block_tables: torch.Tensor      # [max_seqs, max_blocks_per_seq] int32
    max_seq_len: int

    @classmethod
    def allocate(cls, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, max_seq_len: int,
                 device: torch.device) -> StaticInputs:
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)
        return cls(zeros(max_tokens), zeros(max_tokens), torch.full((max_tokens,), -1, device=device),
                   zeros(max_seqs + 1, dtype=torch.int32), zeros(max_seqs, dtype=torch.int32),
                   zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32), max_seq_len)

    def batch(self, shape: GraphShape) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and metadata of a ``shape`` batch: views of the buffers."""
        t, b = shape.num_tokens, shape.num_seqs
        meta = AttentionMetadata(self.query_start_loc[:b + 1], self.seq_lens[:b], self.block_tables[:b],
                                 self.slot_mapping[:t], max_query_len=shape.max_query_len,
                                 max_seq_len=self.max_seq_len)
        return self.input_ids[:t], self.positions[:t], meta

    def fits(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        return (num_tokens <= self.input_ids.shape[0] and meta.num_seqs < self.query_start_loc.shape[0]
                and meta.block_tables.shape[1] <= self.block_tables.shape[1]
                and meta.max_seq_len <= self.max_seq_len)

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             shape: GraphShape) -> None:
        """Copy a step in and pad it to ``shape`` (see the module docstring)."""
        n, b, t, pad_b = input_ids.shape[0], meta.num_seqs, shape.num_tokens, shape.num_seqs
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.query_start_loc[:b + 1] = meta.query_start_loc
        self.seq_lens[:b] = meta.seq_lens
        self.block_tables[:b, :meta.block_tables.shape[1]] = meta.block_tables
        if t > n:       # each launch costs host time in the step: none when the step fits exactly
            self.input_ids[n:t] = 0
            self.positions[n:t] = 0
            self.slot_mapping[n:t] = -1
        if pad_b > b:
            self.query_start_loc[b + 1:pad_b + 1] = n
            self.seq_lens[b:pad_b] = 0


class CudaGraphs:
    """Decode and varlen graphs over one ``StaticInputs`` and one memory pool
    (``capture=False``: the same padded batches, run eagerly)."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, kv_cache: KVCache,
                 max_batch: int, max_tokens: int, max_blocks_per_seq: int, max_seq_len: int,
                 capture: bool = True, eager_from: int | None = None) -> None:
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.eager_from = eager_from   # the first layer run after a replay, eagerly (None: the graphs run all)
        self.sizes = graph_batch_sizes(max_batch)
        self.token_sizes = graph_token_sizes(max_tokens)
        most = max([max_batch, *self.token_sizes])
        self.inputs = StaticInputs.allocate(most, most, max_blocks_per_seq, max_seq_len, kv_cache.pool.device)
        self.shapes = ([GraphShape(b, b, 1) for b in self.sizes]
                       + [GraphShape(t, b, t) for t in self.token_sizes for b in graph_seq_sizes(t, max_batch)])
        self.graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphShape, torch.Tensor] = {}
        self.capture = capture
        start = time.perf_counter()
        if capture:
            self._capture_all()
        self.capture_seconds = time.perf_counter() - start

    def _context(self, shape: GraphShape) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        input_ids, positions, meta = self.inputs.batch(shape)
        return input_ids, positions, ForwardContext(meta, self.kv_cache.layers, self.backend,
                                                    self.kv_cache.layer_ready)

    def _forward(self, shape: GraphShape, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every row (decode) or hidden states (varlen) of the padded batch in the buffers, or
        with ``eager_from`` the resident layers' ``[hidden | residual]``; written into ``out`` when given."""
        input_ids, positions, ctx = self._context(shape)
        if self.eager_from is not None:
            carried = torch.cat(self.model(input_ids, positions, ctx, span=(0, self.eager_from)), dim=-1)
            return carried if out is None else out.copy_(carried)
        hidden = self.model(input_ids, positions, ctx)
        if shape.decode:
            return self.model.compute_logits(hidden, out)
        return hidden if out is None else out.copy_(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool, buffers = None, {}
        for shape in sorted(self.shapes, key=lambda s: (-s.num_tokens, -s.num_seqs)):   # largest first: others reuse
            warm_up = self._forward(shape)       # compiles kernels, sets up workspaces
            if shape.decode not in buffers:      # the family's largest shape comes first
                buffers[shape.decode] = torch.empty_like(warm_up)
            del warm_up
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[shape] = self._forward(shape, buffers[shape.decode][:shape.num_tokens])
            pool = graph.pool()
            self.graphs[shape] = graph
        torch.cuda.synchronize()

    def shape_for(self, num_tokens: int, meta: AttentionMetadata) -> GraphShape | None:
        """The smallest captured shape that holds the step, or None (run it eagerly)."""
        if not self.inputs.fits(num_tokens, meta):
            return None
        if meta.max_query_len == 1:
            size = next((s for s in self.sizes if s >= num_tokens), None)
            return GraphShape(size, size, 1) if size is not None else None
        size = next((s for s in self.token_sizes if s >= num_tokens), None)
        if size is None:
            return None
        seqs = next((b for b in graph_seq_sizes(size, self.sizes[-1]) if b >= meta.num_seqs), None)
        return GraphShape(size, seqs, size) if seqs is not None else None

    def run(self, shape: GraphShape, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[len(rows), vocab]`` of the step's rows ``rows``, through ``shape``'s graph."""
        self.inputs.fill(input_ids, positions, meta, shape)
        if self.capture:
            self.graphs[shape].replay()
            out = self.outputs[shape]
        else:
            out = self._forward(shape)
        if self.eager_from is not None:
            out = self._streamed_layers(shape, out)
        return out[rows] if shape.decode and self.eager_from is None else self.model.compute_logits(out[rows])

    def _streamed_layers(self, shape: GraphShape, carried: torch.Tensor) -> torch.Tensor:
        """The layers from ``eager_from`` on and the final norm, eagerly, on the replay's padded batch."""
        input_ids, positions, ctx = self._context(shape)
        hidden, residual = carried.chunk(2, dim=-1)
        return self.model(input_ids, positions, ctx, carried=(hidden.contiguous(), residual.contiguous()),
                          span=(self.eager_from, self.model.layer_range[1]))
