"""The asynchronous step pipeline (``async_scheduling``) against the synchronous
engine: the same tokens, text and finish reasons with chunked prefill,
preemption (recompute and swap) under a tiny pool, stop strings, n > 1,
seeded sampling and aborts while a step is in flight; the block manager's
invariants hold after every step and no block leaks; steps really were fed
tokens from the device, except while a request needs the host's tokens."""
from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.sequence import PLACEHOLDER
from test_block_manager import check_invariants
from tiny_models import make_tiny_hf_model

PROMPTS = [list(range(3, 30)), [5, 9, 12], list(range(40, 61)), [7] * 9, list(range(100, 138)), [11, 12]]


def make_llm(folder, overlap: bool, **overrides) -> LLM:
    config = dict(dtype="float32", block_size=4, num_kv_blocks=24, max_num_batched_tokens=24, max_model_len=96,
                  async_scheduling=overlap)
    return LLM(str(folder), **(config | overrides))


class Watch:
    """Counts launched steps that took tokens from the device, and checks the
    block manager (and that no published block hashes a placeholder) after every step."""

    def __init__(self, llm: LLM) -> None:
        self.engine = llm.engine
        self.deferred = 0
        runner = self.engine.runner
        launch = runner.launch

        def counting_launch(*steps):
            self.deferred += any(step.deferred is not None for step in steps)
            return launch(*steps)

        runner.launch = counting_launch
        self.engine.add_observer(self)

    def on_schedule(self, batch) -> None:
        pass

    def on_step(self, batch, outputs) -> None:
        sched, bm = self.engine.scheduler, self.engine.block_manager
        live = [*sched.running, *sched.waiting.values()]
        check_invariants(bm, live)
        for seq in live:
            published = seq.token_ids[:len(seq.block_hashes) * bm.block_size]
            assert PLACEHOLDER not in published and seq.num_pending <= 1


def params_for(stop: str | None) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=20, stop=[stop] if stop else None),
            SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, n=2, max_tokens=11, ignore_eos=True),
            SamplingParams(temperature=1.0, min_p=0.05, seed=3, max_tokens=9, logprobs=2),
            SamplingParams(temperature=0, max_tokens=1),
            SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)]


def generate(llm: LLM, params: list[SamplingParams]) -> list[list[tuple]]:
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def assert_all_freed(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_blocks_used"]) == (0, 0, 0)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("qwen2", {"enable_prefix_caching": False}),
    ("mistral", {"swap_space": "1MiB", "swap_min_tokens": 8}),
])
def test_pipeline_gives_the_synchronous_tokens(tmp_path, arch, overrides):
    folder = make_tiny_hf_model(tmp_path, arch=arch, sliding_window=24 if arch == "mistral" else None)
    sync = make_llm(folder, False, **overrides)
    probe = sync.generate([PROMPTS[1]], params_for(None)[1], use_tqdm=False)[0].outputs[0].text
    stop = probe[len(probe) // 2:][:3]   # text in the middle of a greedy output: it stops there
    expected = generate(sync, params_for(stop))
    overlap = make_llm(folder, True, **overrides)
    watch = Watch(overlap)
    assert generate(overlap, params_for(stop)) == expected
    assert expected[1][0][2] == "stop" and len(expected[1][0][0]) < 20
    assert watch.deferred > 10
    stats = overlap.engine.stats()
    assert stats["num_preemptions"] > 0
    if "swap_space" in overrides:
        assert stats["num_swapped_out"] > 0
    assert_all_freed(overlap)


def test_aborts_while_a_step_is_in_flight(tiny_llama):
    """Requests aborted with a step in flight (running, waiting, one just
    preempted) report nothing more, the others are unchanged, no block leaks."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    survivors = {}
    for overlap in (False, True):
        llm = make_llm(tiny_llama, overlap, num_kv_blocks=20)
        watch = Watch(llm)
        engine = llm.engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, params)
        outputs: dict[str, list[int]] = {}
        for _ in range(6):
            for out in engine.step():
                outputs[out.request_id] = out.outputs[0].token_ids
        assert engine.step_in_flight == overlap
        aborted = {"0", "3", "5"}
        for request_id in aborted:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id not in aborted
                outputs[out.request_id] = out.outputs[0].token_ids
        engine.step()   # reads the last step in flight, if any
        survivors[overlap] = {k: v for k, v in outputs.items() if k not in aborted}
        assert_all_freed(llm)
        assert engine.scheduler.stats.num_preemptions > 0
        assert (watch.deferred > 0) == overlap
    assert survivors[True] == survivors[False] and len(survivors[True]) == 3
    assert all(len(tokens) == 16 for tokens in survivors[True].values())


def test_requests_that_need_host_tokens_run_synchronously(tiny_llama):
    """While a request with penalties is in the engine no step takes device
    tokens; the tokens are those of the synchronous engine all the same."""
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 5 + [
        SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=12,
                       ignore_eos=True)]
    expected = generate(make_llm(tiny_llama, False), params)
    overlap = make_llm(tiny_llama, True)
    watch = Watch(overlap)
    assert generate(overlap, params) == expected
    assert watch.deferred == 0
