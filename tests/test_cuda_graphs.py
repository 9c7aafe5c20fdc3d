"""CUDA graphs' padding, on the CPU: the graphs run padded batches (tokens and
sequences that belong to nothing, slot -1), so the same padded batches run
eagerly (``CudaGraphs(capture=False)``) must give the tokens the unpadded
steps give, for decode, speculative verification and mixed prefill+decode
steps. The GPU check (``benchmarks/graphs_gpu.py``) compares replays with
these eager padded runs bit for bit."""
from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.cuda_graphs import CudaGraphs, graph_batch_sizes, graph_seq_sizes, graph_token_sizes
from pagellm.utils.math import cdiv
from pagellm.engine.model_runner import ModelRunner
from test_spec_decode import ARCHS, draft_pair, repetitive_prompts, token_ids, with_oracle  # noqa: F401 (fixture)
from tiny_models import make_tiny_hf_model


def test_graph_sizes():
    assert graph_token_sizes(512) == [8, 16, 32, 64, 96, 128, 192, 256, 384, 512]
    assert graph_token_sizes(100) == [8, 16, 32, 64, 96, 100]
    assert graph_token_sizes(8) == [8] and graph_token_sizes(0) == []
    above = graph_token_sizes(2304)[10:]   # every 256 tokens above 512: padding at most 256 / 768
    assert above == [768, 1024, 1280, 1536, 1792, 2048, 2304] and graph_token_sizes(1000)[10:] == [768, 1000]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_seq_sizes(512, 256) == [4, 16, 64, 256] and graph_seq_sizes(96, 256) == [4, 16, 64, 96]
    assert graph_seq_sizes(8, 256) == [4, 8] and graph_seq_sizes(4, 256) == [4]


class RecordingGraphs(CudaGraphs):
    """Eager padded batches; remembers each step's (tokens, sequences, padded shape)."""

    def __init__(self, llm: LLM, max_batch: int, max_tokens: int, runner: ModelRunner | None = None,
                 eager_from: int | None = None) -> None:
        runner = runner or llm.engine.runner
        super().__init__(runner.model, runner.backend, runner.kv_cache, max_batch, max_tokens,
                         cdiv(runner.max_model_len, runner.kv_spec.block_size), runner.max_model_len, capture=False,
                         eager_from=eager_from)
        self.steps = []

    def run(self, shape, input_ids, positions, meta, rows):
        self.steps.append((len(input_ids), meta.num_seqs, shape))
        return super().run(shape, input_ids, positions, meta, rows)


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window"])
def test_padded_batches_give_the_unpadded_tokens(arch, tmp_path_factory):
    folder = make_tiny_hf_model(tmp_path_factory.mktemp(arch), **ARCHS[arch])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    config = dict(dtype="float32", block_size=4, num_kv_blocks=64, max_num_batched_tokens=12, max_model_len=64)
    reference = LLM(str(folder), **config)
    prompts = repetitive_prompts(reference.engine.model_config.vocab_size)
    expected = reference.generate(prompts, params)

    plain = LLM(str(folder), **config)
    plain.engine.runner.graphs = graphs = RecordingGraphs(plain, max_batch=4, max_tokens=24)
    assert token_ids(plain.generate(prompts, params)) == token_ids(expected)
    decode = [(n, s) for n, _, s in graphs.steps if s.decode]
    varlen = [(n, s) for n, _, s in graphs.steps if not s.decode]
    assert any(n < s.num_tokens for n, s in decode) and any(n < s.num_tokens for n, s in varlen)

    spec = LLM(str(folder), speculative_method="ngram", num_speculative_tokens=3, **config)
    with_oracle(spec, prompts, expected)
    spec.engine.runner.graphs = graphs = RecordingGraphs(spec, max_batch=8, max_tokens=24)
    assert token_ids(spec.generate(prompts, params)) == token_ids(expected)
    assert spec.engine.spec_stats.num_accepted > 0
    assert any(not s.decode and n < s.num_tokens and b < s.num_seqs for n, b, s in graphs.steps)


def test_draft_forwards_through_padded_graphs(draft_pair):
    """The draft model's forwards go through its runner's graphs (decode for
    the one-token forwards, varlen for the prompts and catch-ups), and padding changes none
    of its proposals: the same accepted count as the unpadded draft."""
    target, draft = draft_pair
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    config = dict(dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=64, speculative_model=str(draft),
                  num_speculative_tokens=3)
    eager = LLM(str(target), **config)
    prompts = repetitive_prompts(eager.engine.model_config.vocab_size)
    expected = token_ids(eager.generate(prompts, params))
    padded = LLM(str(target), **config)
    runner = padded.engine.proposer.runner
    runner.graphs = graphs = RecordingGraphs(padded, max_batch=8, max_tokens=64, runner=runner)
    assert token_ids(padded.generate(prompts, params)) == expected
    assert padded.engine.spec_stats == eager.engine.spec_stats and 0 < eager.engine.spec_stats.num_accepted
    assert any(s.decode and n < s.num_tokens for n, _, s in graphs.steps)
    assert any(not s.decode and n < s.num_tokens for n, _, s in graphs.steps)


def test_graphs_over_the_resident_layers_leave_the_streamed_ones_eager(tmp_path_factory):
    """Layers 1..4 of 5 stream from the host: the graphs run layer 0 and end in its (hidden, residual); the
    streamed layers, norm and LM head run after each (here eager, padded) replay. Tokens: the resident model's."""
    folder = make_tiny_hf_model(tmp_path_factory.mktemp("five-layers"), num_hidden_layers=5)
    config = dict(dtype="float32", block_size=4, num_kv_blocks=64, max_num_batched_tokens=12, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    resident = LLM(str(folder), **config)
    prompts = repetitive_prompts(resident.engine.model_config.vocab_size)
    expected = token_ids(resident.generate(prompts, params))
    layer = sum(p.numel() * p.element_size() for p in resident.engine.runner.model.layers[0].parameters())
    llm = LLM(str(folder), cpu_offload_memory=4 * layer, **config)
    runner = llm.engine.runner
    assert runner.offload.layers == list(runner.model.layers)[1:]
    runner.graphs = graphs = RecordingGraphs(llm, max_batch=4, max_tokens=24, eager_from=1)
    streamed = []
    runner.model.layers[1].register_forward_pre_hook(lambda module, args: streamed.append(args[1].shape[0]))
    assert token_ids(llm.generate(prompts, params)) == expected
    # each graph step ran the streamed layers on its padded batch (the other steps ran eagerly, all layers)
    padded, calls = [shape.num_tokens for _, _, shape in graphs.steps], iter(streamed)
    assert len(padded) > 4 and all(any(call == size for call in calls) for size in padded)
