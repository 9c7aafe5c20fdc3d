"""The engine-worker seams: the step contract crosses a process boundary, a
second linear method plugs in without changing greedy output, and the KV
cache's owner copies blocks in every layer."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.engine.kv_cache import KVCache, KVCacheSpec
from pagellm.engine.model_runner import ModelRunner
from pagellm.model.checkpoint import open_checkpoint
from pagellm.model.layers import Linear
from pagellm.quant import QUANTIZATION_FORMATS
from test_engine_parity import hf_greedy, hf_model
from tiny_models import make_tiny_hf_model

PROMPTS = [[5, 9, 12, 40, 7], list(range(30, 52)), [3, 3, 3], list(range(100, 113))]


class RemoteReplica:
    """Stands in for a worker in another process: every StepInput the engine
    sends its own runner is pickled, unpickled and run on a second runner
    built from the same checkpoint, and both answers must agree."""

    def __init__(self, local: ModelRunner, config: EngineConfig, path) -> None:
        self.local = local
        checkpoint = open_checkpoint(path)
        self.remote = ModelRunner(config, checkpoint.config, checkpoint.tensors(), local.max_model_len)
        self.remote.allocate_kv_cache(local.memory.activation_bytes, False)
        self.steps = 0
        self.deferred = 0

    def launch(self, step):
        wire = pickle.dumps(step)
        assert b"pagellm.engine.sequence" not in wire    # the worker never sees a Sequence
        answer = self.local.launch(step)
        assert self.remote.execute(pickle.loads(wire)) == answer.result()
        self.steps += 1
        self.deferred += step.deferred is not None   # tokens fed from the worker's own draws
        return answer


def test_a_pickled_step_input_gives_the_same_tokens(tiny_llama):
    config = EngineConfig(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=20,
                          max_num_batched_tokens=16)
    llm = LLM(config)
    replica = RemoteReplica(llm.engine.runner, config, tiny_llama)
    llm.engine.runner = replica
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, seed=4, n=2,
                             max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert replica.steps > 10 and llm.engine.scheduler.stats.num_preemptions > 0   # a small pool: preemption
    assert outputs[0].outputs[0].token_ids == hf_greedy(hf_model(tiny_llama), PROMPTS[0], 10)
    assert replica.deferred == 0   # penalties need the host's tokens: every step ran synchronously
    unpenalised = [params[0], params[1], params[3], params[1]]
    again = llm.generate(PROMPTS, unpenalised, use_tqdm=False)   # the pipeline: deferred tokens cross the seam
    assert replica.deferred > 5
    assert [o.outputs[0].token_ids for o in again[:2]] == [o.outputs[0].token_ids for o in outputs[:2]]


class TransposedMethod:
    """A second way to hold a matrix: ``[input_size, output_size]``, the
    transpose of the checkpoint's layout, so shards fill columns, not rows."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.input_size, layer.output_size, dtype=layer.params_dtype),
                                    requires_grad=False)
        layer.weight_loaders["weight"] = lambda loaded, shard_id: layer.load_rows(layer.weight, loaded.t(),
                                                                                  shard_id, output_dim=1)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        out = x @ layer.weight
        return out if layer.bias is None else out + layer.bias

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight.t())


@pytest.mark.parametrize("arch", [dict(arch="qwen2", num_kv_heads=2), dict(arch="llama", num_kv_heads=1,
                                                                           tie_word_embeddings=True)],
                         ids=["qwen2-bias", "llama-mqa-tied"])
def test_a_second_linear_method_leaves_greedy_output_unchanged(tmp_path, monkeypatch, arch):
    folder = make_tiny_hf_model(tmp_path, **arch)
    monkeypatch.setitem(QUANTIZATION_FORMATS, "transposed", lambda checkpoint, config: lambda prefix: TransposedMethod())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    dense = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64).generate(PROMPTS, params,
                                                                                        use_tqdm=False)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64, quantization="transposed")
    model = llm.engine.runner.model
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.weight.shape == (qkv.input_size, qkv.output_size) and isinstance(qkv.method, TransposedMethod)
    assert model.embed_tokens.weight.shape == (model.config.hidden_size, model.config.vocab_size)
    swapped = llm.generate(PROMPTS, params, use_tqdm=False)
    reference = hf_model(folder)
    for prompt, a, b in zip(PROMPTS, dense, swapped):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids == hf_greedy(reference, prompt, 12)


def test_unknown_quantization_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="quantization must be one of auto, none"):
        EngineConfig(str(tiny_llama), quantization="int3")


def test_kv_cache_layers_view_one_pool_and_copies_reach_every_layer():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32, block_size=2,
                       has_null_block=True)
    cache = KVCache(spec, num_blocks=5, device="cpu")
    assert cache.null_block == 5 and cache.pool.shape[2] == 6
    assert cache.nbytes == 6 * spec.bytes_per_block == 6 * 2 * (2 * 3 * 2 * 4 * 4)
    cache.pool.copy_(torch.randn_like(cache.pool))
    before = cache.pool.clone()
    cache.copy_blocks([(1, 3), (4, 0)])
    for layer, view in enumerate(cache.layers):
        for kv, tensor in ((0, view.k), (1, view.v)):
            assert tensor.data_ptr() == cache.pool[kv, layer].data_ptr()
            torch.testing.assert_close(tensor[3], before[kv, layer, 1])
            torch.testing.assert_close(tensor[0], before[kv, layer, 4])
            torch.testing.assert_close(tensor[[1, 2, 4, 5]], before[kv, layer, [1, 2, 4, 5]])
