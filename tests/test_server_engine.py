"""AsyncEngine without HTTP: one step thread serving coroutines from several event loops."""
from __future__ import annotations

import asyncio
import threading

import pytest

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.engine.llm_engine import LLMEngine
from pagellm.server.async_engine import AsyncEngine, EngineClosed, EngineOverloaded, RequestAborted

PROMPT = "The quick brown fox"


def make_engine(model_dir, **kwargs) -> AsyncEngine:
    return AsyncEngine(LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", max_model_len=256,
                                              num_kv_blocks=32)), **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    async_engine = make_engine(tiny_llama)
    yield async_engine
    asyncio.run(async_engine.shutdown())


async def collect(engine: AsyncEngine, request_id: str, prompt, params: SamplingParams) -> list:
    return [output async for output in engine.generate(request_id, prompt, params)]


def test_generate_streams_cumulative_outputs_equal_to_offline(engine, tiny_llama):
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2)
    outputs = asyncio.run(collect(engine, "a", PROMPT, params))
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    for earlier, later in zip(outputs, outputs[1:]):
        for before, after in zip(earlier.outputs, later.outputs):
            assert after.token_ids[:len(before.token_ids)] == before.token_ids
    offline = LLM(str(tiny_llama), dtype="float32", max_model_len=256, num_kv_blocks=32)
    expected = offline.generate(PROMPT, params, use_tqdm=False)[0]
    assert [c.token_ids for c in outputs[-1].outputs] == [c.token_ids for c in expected.outputs]


def test_invalid_input_raises_before_any_output(engine):
    async def submit(prompt, params):
        return await engine.submit("bad", [prompt], params)

    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(submit(list(range(300)), SamplingParams(max_tokens=1)))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        asyncio.run(submit([1, 2, 10**6], SamplingParams()))
    assert engine.stats()["num_waiting"] == 0


def test_submit_is_all_or_nothing(engine):
    async def submit():
        return await engine.submit("batch", ["fine", [1, 10**6]], SamplingParams(max_tokens=2))

    with pytest.raises(ValueError):
        asyncio.run(submit())
    assert engine.engine.has_unfinished_requests() is False


def test_leaving_the_loop_aborts_and_frees_blocks(engine):
    async def leave_early():
        agen = engine.generate("leaver", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        async for output in agen:
            if len(output.outputs[0].token_ids) >= 2:
                break
        await agen.aclose()
        for _ in range(500):   # the abort is applied between steps
            if engine.stats()["kv_blocks_used"] == 0 and not engine.engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(engine.stats())

    asyncio.run(leave_early())


def test_callers_on_several_event_loops(engine):
    results: dict[int, list[int]] = {}

    def in_own_loop(i: int) -> None:
        outputs = asyncio.run(collect(engine, f"loop-{i}", PROMPT, SamplingParams(max_tokens=6, seed=i)))
        results[i] = outputs[-1].outputs[0].token_ids

    threads = [threading.Thread(target=in_own_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1, 2, 3] and all(len(ids) <= 6 for ids in results.values())


def test_overload_and_shutdown(tiny_llama):
    async def scenario():
        overloaded = make_engine(tiny_llama, max_waiting=0)
        with pytest.raises(EngineOverloaded):
            await overloaded.submit("x", [PROMPT], SamplingParams())
        await overloaded.shutdown()

        engine = make_engine(tiny_llama)
        agen = engine.generate("long", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        await agen.__anext__()
        await engine.shutdown()
        with pytest.raises(RequestAborted):
            async for _ in agen:
                pass
        with pytest.raises(EngineClosed):
            await engine.submit("late", [PROMPT], SamplingParams())
        assert engine.stats()["kv_blocks_used"] == 0 and not engine.accepting

    asyncio.run(scenario())
