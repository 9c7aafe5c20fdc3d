"""Load: 200 concurrent streaming clients on a KV pool far too small for them all (so
sequences are preempted), a fifth of them hanging up at random points. Every client that
stays gets exactly what the offline engine generates for its request; the pool ends fully
free; the server stays up."""
from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest

from pagellm import LLM, SamplingParams
from test_server import MODEL, metric, server_thread, wait_until_idle
from tiny_models import CORPUS

NUM_CLIENTS = 200
NUM_LEAVERS = NUM_CLIENTS // 5
NUM_KV_BLOCKS = 16
WORDS = " ".join(CORPUS).split()


@pytest.fixture(scope="module")
def server(tiny_llama):
    with server_thread(tiny_llama, num_kv_blocks=NUM_KV_BLOCKS) as running:
        yield running


def make_requests(rng: random.Random) -> list[dict]:
    return [dict(prompt=" ".join(rng.choices(WORDS, k=rng.randint(2, 10))), max_tokens=rng.randint(3, 12),
                 temperature=rng.choice([0.0, 0.8, 1.0]), seed=i) for i in range(NUM_CLIENTS)]


async def stream_one(client: openai.AsyncOpenAI, request: dict, leave_after: int | None
                     ) -> tuple[str, str | None, int] | None:
    """(text, finish_reason, completion_tokens), or None for a client that hung up."""
    stream = await client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                             **request)
    text, finish_reason, num_tokens = "", None, -1
    async for index, chunk in aenumerate(stream):
        if index == leave_after:
            await stream.close()
            return None
        if chunk.choices:
            text += chunk.choices[0].text
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        if chunk.usage:
            num_tokens = chunk.usage.completion_tokens
    return text, finish_reason, num_tokens


async def aenumerate(iterable):
    index = 0
    async for item in iterable:
        yield index, item
        index += 1


async def run_clients(url: str, requests: list[dict], leave_after: dict[int, int]) -> list:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        return await asyncio.gather(*(stream_one(client, r, leave_after.get(i)) for i, r in enumerate(requests)))


def test_200_streams_with_random_disconnects(server, tiny_llama):
    rng = random.Random(0)
    requests = make_requests(rng)
    leave_after = {i: rng.randint(0, requests[i]["max_tokens"] - 1)
                   for i in rng.sample(range(NUM_CLIENTS), NUM_LEAVERS)}

    results = asyncio.run(run_clients(server.url, requests, leave_after))

    reference = LLM(str(tiny_llama), dtype="float32", max_model_len=256, num_kv_blocks=512).generate(
        [r["prompt"] for r in requests],
        [SamplingParams(**{k: v for k, v in r.items() if k != "prompt"}) for r in requests], use_tqdm=False)
    stayed = 0
    for i, (result, expected) in enumerate(zip(results, reference)):
        if result is None:
            assert i in leave_after
            continue
        stayed += 1
        completion = expected.outputs[0]
        assert result == (completion.text, completion.finish_reason, len(completion.token_ids)), f"request {i}"
    assert stayed >= NUM_CLIENTS - NUM_LEAVERS

    stats = wait_until_idle(server)
    assert stats["kv_blocks_used"] == 0 and stats["num_preemptions"] > 0
    page = httpx.get(server.url + "/metrics").text
    assert metric(page, "pagellm:kv_cache_blocks_used") == 0 and metric(page, "pagellm:kv_cache_usage_perc") == 0
    assert httpx.get(server.url + "/health").status_code == 200
    after = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).completions.create(
        model=MODEL, prompt="Hello world", max_tokens=3)
    assert after.choices[0].finish_reason is not None
