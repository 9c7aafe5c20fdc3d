"""One request never hurts another, and no request makes unbounded work: values the
sampler cannot represent are refused or clamped, a request whose step fails is failed
alone, and aborting tens of thousands of sequences is linear."""
from __future__ import annotations

import time

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.model_runner import ModelRunner
from pagellm.sampling_params import INT64_MAX

POISON_SEED = 666


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_kv_blocks=256, max_model_len=128)


HONEST = [("The quick brown fox", SamplingParams(max_tokens=12, temperature=0.8, seed=i, n=1 + i % 2))
          for i in range(8)] + [("Hello world", SamplingParams(max_tokens=10, temperature=0, logprobs=2))]


def run(llm: LLM, requests: list[tuple[str, SamplingParams]]) -> list:
    return llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)


@pytest.mark.parametrize("field, value", [("top_k", 10**20), ("seed", 2**63), ("seed", -2**63 - 1),
                                          ("max_tokens", 2**64), ("n", True), ("min_tokens", 1.5),
                                          ("logprobs", 2**70), ("temperature", float("inf")),
                                          ("top_p", float("nan")), ("stop_token_ids", [2**63])])
def test_values_the_sampler_cannot_represent_are_refused(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_top_k_beyond_the_vocabulary_means_all_tokens(llm):
    """Clamped, not refused: the same tokens as top_k off (the original 'overflow' request)."""
    prompts = ["hi", "The quick brown fox"]
    off = run(llm, [(p, SamplingParams(max_tokens=8, temperature=1.0, seed=3)) for p in prompts])
    huge = run(llm, [(p, SamplingParams(max_tokens=8, temperature=1.0, seed=3, top_k=INT64_MAX)) for p in prompts])
    assert [o.outputs[0].token_ids for o in huge] == [o.outputs[0].token_ids for o in off]


def test_logprobs_beyond_the_vocabulary_is_refused(llm):
    with pytest.raises(ValueError, match="^logprobs must be at most the vocabulary size"):
        llm.generate("hi", SamplingParams(logprobs=10**6), use_tqdm=False)


def test_a_failing_request_fails_alone(llm, monkeypatch):
    """A request whose sampling row always makes the worker raise, among many: every other
    request's output is what it is without it, and the poisoned one ends with an error."""
    quiet = run(llm, HONEST)
    launch = ModelRunner.launch

    def poisoned_launch(self, step):
        if any(p.seed == POISON_SEED for p in step.sampling.params):
            raise RuntimeError("Overflow when unpacking long long")
        return launch(self, step)

    monkeypatch.setattr(ModelRunner, "launch", poisoned_launch)
    poison = ("a poisoned request", SamplingParams(max_tokens=12, seed=POISON_SEED, n=2))
    mixed = run(llm, HONEST[:4] + [poison] + HONEST[4:])
    failed = mixed.pop(4)
    assert [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in mixed] == \
        [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in quiet]
    for got, want in zip(mixed[-1].outputs[0].logprobs, quiet[-1].outputs[0].logprobs):   # other batch shapes
        assert got.keys() == want.keys()
        assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in got)
    assert failed.finished and failed.error == "RuntimeError: Overflow when unpacking long long"
    assert {c.finish_reason for c in failed.outputs} == {"error"}
    assert all(o.error is None for o in mixed)
    stats = llm.engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_blocks_used"]) == (0, 0, 0)


def test_aborting_25600_sequences_is_linear(llm):
    """200 prompts x n=128, some forked into the waiting queue: all aborted in well under a
    second (the dataclass-comparing queue took 49 s for half as many)."""
    engine = llm.engine
    ids = [f"many-{i}" for i in range(200)]
    for i, request_id in enumerate(ids):
        engine.add_request(request_id, [5 + i % 50, 6, 7], SamplingParams(n=128, max_tokens=1, seed=i))
    engine.step()
    assert engine.stats()["num_waiting"] > 25_000   # the first samples ran; their forks wait
    start = time.perf_counter()
    for request_id in ids:
        engine.abort_request(request_id)
    assert time.perf_counter() - start < 1.0
    stats = engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
