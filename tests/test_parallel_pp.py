"""Tensor x pipeline parallelism, TP=2 x PP=2 over 4 gloo processes: each
stage runs its contiguous layers with its own KV pool and passes hidden
states on; greedy tokens match one process under chunked prefill and
preemption. Tiny models of 4 layers (so each stage holds 2), untied and tied
(the last stage keeps its own copy of the embedding as LM head), and an int8
KV cache whose scales live in each stage's pool."""
from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.step import ScoredToken, StepOutput
from parallel_harness import Job, run_jobs
from test_engine_parity import MAX_TOKENS, prompts
from test_parallel_tp import SMALL_POOL
from tiny_models import TINY, make_tiny_hf_model

MODELS = {"qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
          "llama-mqa-tied": dict(arch="llama", num_kv_heads=1, tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    batch = prompts(TINY["vocab_size"])
    jobs = [Job(name, str(make_tiny_hf_model(tmp_path_factory.mktemp(name), num_hidden_layers=4, **arch)),
                batch, MAX_TOKENS, dict(SMALL_POOL)) for name, arch in MODELS.items()]
    jobs.append(Job("qwen2-bias-kv-int8", jobs[0].model, batch, MAX_TOKENS, dict(SMALL_POOL, kv_cache_dtype="int8")))
    parallel = run_jobs(4, [Job(j.name, j.model, j.prompts, j.max_tokens,
                                dict(j.settings, tensor_parallel_size=2, pipeline_parallel_size=2)) for j in jobs])
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    single = {j.name: [o.outputs[0].token_ids for o in LLM(j.model, **j.settings).generate(j.prompts, greedy)]
              for j in jobs}
    return parallel, single


@pytest.mark.parametrize("name", [*MODELS, "qwen2-bias-kv-int8"])
def test_tp2_pp2_greedy_matches_one_process(outputs, name):
    parallel, single = outputs
    assert parallel[name]["tokens"] == single[name]


def test_micro_batch_outputs_join_into_the_steps_output():
    """Sequences keep their order; a micro-batch without log-probabilities reports empty ones,
    as a whole step reports them for a sequence that did not ask."""
    with_logprobs = StepOutput([[4], []], logprobs=[[-0.5], []], top_logprobs=[[[(4, -0.5)]], []],
                               scored=[[], [ScoredToken(-1.0, 2, [])]])
    plain = StepOutput([[7]])
    assert StepOutput.concat([plain, with_logprobs]) == StepOutput(
        [[7], [4], []], logprobs=[[], [-0.5], []], top_logprobs=[[[]], [[(4, -0.5)]], []],
        scored=[[], [], [ScoredToken(-1.0, 2, [])]])
    assert StepOutput.concat([plain, plain]) == StepOutput([[7], [7]])
