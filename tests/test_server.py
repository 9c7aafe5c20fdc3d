"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1 serving a tiny
random model, driven by the official `openai` client (and httpx for raw bodies)."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from pagellm import LLM, SamplingParams
from pagellm.cli import main as cli_main
from pagellm.config import EngineConfig
from pagellm.engine.llm_engine import LLMEngine
from pagellm.server.async_engine import AsyncEngine
from pagellm.server.launcher import ServerThread, make_server

MODEL = "tiny-llama"
API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NUM_KV_BLOCKS = 32
PROMPT = "Paged attention keeps the key value cache"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]


SERVER_OPTIONS = ("api_key", "grace_period", "max_request_bytes", "allowed_origins", "enable_docs")


def server_thread(model_dir, *, max_waiting=None, max_seqs_per_request=None, **kwargs) -> ServerThread:
    """A server on the tiny model; ``kwargs`` are ``make_server``'s SERVER_OPTIONS, then EngineConfig fields."""
    options = {name: kwargs.pop(name) for name in SERVER_OPTIONS if name in kwargs}
    config = EngineConfig(model=str(model_dir), dtype="float32", max_model_len=256,
                          **({"num_kv_blocks": NUM_KV_BLOCKS} | kwargs))
    async_engine = AsyncEngine(LLMEngine(config), max_waiting=max_waiting, max_seqs_per_request=max_seqs_per_request)
    return ServerThread(make_server(async_engine, MODEL, port=0, log_level="warning", **options))


def wait_until_idle(server: ServerThread, timeout: float = 20.0) -> dict[str, float]:
    """The engine's stats once nothing runs, waits or holds a KV block (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.server.async_engine.stats()
        if stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` (with ``labels`` in their label set) in a /metrics page."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(value) for label_set, value in pattern.findall(text) if labels in label_set)


def assert_error_shape(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def server(tiny_llama):
    with server_thread(tiny_llama, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", max_model_len=256, num_kv_blocks=NUM_KV_BLOCKS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http_client:
        yield http_client


# ---- happy paths --------------------------------------------------------------------------

def test_models_health_and_metrics_endpoints(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).max_model_len == 256
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(http.base_url.join("/health")).json() == {"status": "ok"}   # open without a key
    page = httpx.get(http.base_url.join("/metrics")).text
    assert metric(page, "pagellm:kv_cache_blocks_total") == NUM_KV_BLOCKS


def test_completion(client, http):
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0)
    choice = result.choices[0]
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert choice.finish_reason in ("length", "stop") and choice.index == 0
    prompt_tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.total_tokens == prompt_tokens + result.usage.completion_tokens
    assert 1 <= result.usage.completion_tokens <= 7


def test_chat_completion(client, http):
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, seed=1)
    assert result.object == "chat.completion" and result.choices[0].message.role == "assistant"
    assert result.usage.prompt_tokens == http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    content = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world!"}]
    parts = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_completion_tokens=3)
    assert parts.usage.completion_tokens <= 3


def _stream_completion(client, **kwargs) -> tuple[dict[int, str], dict[int, list], dict[int, str], list]:
    """Per choice index: streamed text, (token, logprob) pairs and finish reason; and the chunks."""
    chunks = list(client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    texts, tokens, reasons = {}, {}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.logprobs:
            tokens.setdefault(choice.index, []).extend(
                zip(choice.logprobs.tokens, choice.logprobs.token_logprobs))
        if choice.finish_reason:
            assert choice.index not in reasons, "a choice finished twice"
            reasons[choice.index] = choice.finish_reason
    return texts, tokens, reasons, chunks


@pytest.mark.parametrize("n", [1, 2])
def test_streamed_completion_equals_non_streamed(client, n):
    kwargs = dict(prompt=PROMPT, max_tokens=12, temperature=0.9, seed=1234, n=n, logprobs=0)
    whole = client.completions.create(model=MODEL, **kwargs)
    texts, tokens, reasons, chunks = _stream_completion(client, **kwargs)
    assert sorted(texts) == list(range(n))
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert tokens[choice.index] == list(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs))
        assert reasons[choice.index] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    if n == 2:
        assert whole.choices[0].logprobs.tokens != whole.choices[1].logprobs.tokens


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=0.8, seed=7, n=2)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, roles, reasons = {0: "", 1: ""}, {}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        roles.setdefault(choice.index, choice.delta.role)
        reasons[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}   # each choice opens with its role
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_several_prompts_map_to_choice_indices(client):
    prompts = ["The quick brown fox", "Hello world"]
    both = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, seed=3)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=5, seed=3)
        assert [c.text for c in both.choices[2 * i:2 * i + 2]] == [c.text for c in alone.choices]
    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
    assert ids.usage.prompt_tokens == 5 and len(ids.choices) == 2


def _stop_candidate(text: str) -> int:
    """An index k >= 2 where text[k:k+2] first occurs, free of partial characters."""
    for k in range(2, len(text) - 2):
        stop = text[k:k + 2]
        if text.find(stop) == k and "\ufffd" not in stop:
            return k
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, stream):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    k = _stop_candidate(base)
    stop = base[k:k + 2]
    kwargs = dict(prompt=PROMPT, max_tokens=30, temperature=0, stop=["never-seen", stop],
                  extra_body={"ignore_eos": True})
    if stream:
        texts, _, reasons, _ = _stream_completion(client, **kwargs)
        assert texts[0] == base[:k] and reasons[0] == "stop"
    else:
        choice = client.completions.create(model=MODEL, **kwargs).choices[0]
        assert (choice.text, choice.finish_reason, choice.stop_reason) == (base[:k], "stop", stop)
    kept = client.completions.create(model=MODEL, **kwargs | {"extra_body": {
        "ignore_eos": True, "include_stop_str_in_output": True}}).choices[0]
    assert kept.text == base[:k + 2]


def test_logprobs(client):
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=3, temperature=0)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == result.usage.completion_tokens
    assert all(3 <= len(top) <= 4 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2,
                                          temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob   # greedy picks the top token


SAMPLING_CASES = [
    dict(temperature=0.0),
    dict(temperature=1.0, top_p=0.3, seed=11),
    dict(temperature=0.7, seed=12, presence_penalty=1.5, frequency_penalty=-1.0),
    dict(temperature=1.3, seed=13, n=2, stop=["e", "a"]),
    dict(temperature=0.9, seed=14, top_k=5, min_p=0.05, repetition_penalty=1.3),   # vLLM extras
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda case: ",".join(case))
def test_sampling_fields_reach_the_engine(client, offline, case):
    """The server's output equals the offline engine's with the same SamplingParams."""
    extras = {k: v for k, v in case.items() if k in ("top_k", "min_p", "repetition_penalty")}
    fields = {k: v for k, v in case.items() if k not in extras}
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body=extras, **fields)
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, **case), use_tqdm=False)[0]
    assert [(c.text, c.finish_reason) for c in result.choices] == [
        (c.text, c.finish_reason) for c in expected.outputs]


def test_tokenize_detokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world!"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world!"}
    assert_error_shape(http.post("/detokenize", json={"tokens": [1, -1]}), 400, "tokens")
    assert_error_shape(http.post("/tokenize", json={}), 400, "prompt")


def test_metrics_count_tokens_and_latencies(client, http):
    before = httpx.get(http.base_url.join("/metrics")).text
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=2, seed=0)
    after = httpx.get(http.base_url.join("/metrics")).text
    assert metric(after, "pagellm:generation_tokens_total") - metric(before, "pagellm:generation_tokens_total") \
        == result.usage.completion_tokens
    assert metric(after, "pagellm:prompt_tokens_total") - metric(before, "pagellm:prompt_tokens_total") \
        == result.usage.prompt_tokens
    for name in ("pagellm:time_to_first_token_seconds_count", "pagellm:e2e_request_latency_seconds_count"):
        assert metric(after, name) == metric(before, name) + 1
    assert metric(after, "pagellm:inter_token_latency_seconds_count") > metric(
        before, "pagellm:inter_token_latency_seconds_count")
    for name in ("pagellm:num_requests_running", "pagellm:num_requests_waiting", "pagellm:kv_cache_blocks_used",
                 "pagellm:kv_cache_usage_perc", "pagellm:num_preemptions_total",
                 "pagellm:request_success_total"):
        assert re.search(rf"^{re.escape(name)}[ {{]", after, re.M), name


def test_bench_serve_reports_percentiles(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--num-prompts", "8",
                     "--input-len", "4", "--output-len", "4", "--max-concurrency", "4", "--request-rate", "50",
                     "--goodput", "e2e:600000", "--result-json", str(out)])
    assert code == 0 and "TTFT" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"]) == (8, 0)
    assert report["goodput_qps"] == pytest.approx(report["qps"])
    assert report["output_tokens_per_s"] > 0
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"] <= report["e2e_ms"]["p99"]


# ---- client disconnects --------------------------------------------------------------------

def test_disconnect_mid_stream_aborts_and_frees_blocks(server, client):
    finished_before = metric(httpx.get(server.url + "/metrics").text, "pagellm:request_success_total")
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert server.server.async_engine.stats()["kv_blocks_used"] > 0
    stream.close()
    wait_until_idle(server, timeout=10)
    assert metric(httpx.get(server.url + "/metrics").text, "pagellm:request_success_total") == finished_before


def test_disconnect_while_waiting_for_a_whole_response_aborts(server):
    engine = server.server.async_engine
    finished_before = metric(httpx.get(server.url + "/metrics").text, "pagellm:request_success_total")

    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http_client:
            task = asyncio.create_task(http_client.post("/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}))
            deadline = time.monotonic() + 10
            while engine.stats()["num_running"] == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            task.cancel()   # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave_early())
    wait_until_idle(server, timeout=10)
    assert metric(httpx.get(server.url + "/metrics").text, "pagellm:request_success_total") == finished_before


# ---- errors ------------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"model": "gpt-4", "prompt": "hi"}, "model"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 300}, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 1000}, "n"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "hi", "seed": "abc"}, "seed"),
    ({"prompt": "hi", "stop": ""}, "stop"),
    ({"prompt": "hi", "stop": [1, 2]}, "stop"),
    ({"prompt": "hi", "stream": "sometimes"}, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": "maybe"}}, "stream_options"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 2, 100000]}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({}, "prompt"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": CHAT, "model": "gpt-4"}, "model"),
]


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict)
                         else v)
def test_invalid_completion_fields_are_400(http, body, param):
    assert_error_shape(http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("body, param", BAD_CHATS, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict)
                         else v)
def test_invalid_chat_fields_are_400(http, body, param):
    assert_error_shape(http.post("/v1/chat/completions", json={"max_tokens": 2} | body), 400, param)


def test_malformed_bodies_are_400(http):
    for content in (b"{not json", b"[1, 2]", b"", b"null", "\"\u00e9\"".encode()):
        response = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert_error_shape(response, 400)


def test_prompt_too_long_says_how_long_and_the_limit(client, http):
    prompt = "the quick brown fox " * 80
    length = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert f"prompt is {length} tokens" in info.value.message and "max_model_len is 256" in info.value.message
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4)
    assert "max_model_len is 256" in info.value.message and info.value.body["param"] == "messages"


def test_api_key_is_required(server, http):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize"):
            method = httpx.get if path == "/v1/models" else httpx.post
            assert_error_shape(method(server.url + path, headers=headers), 401)
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_routes_and_methods_keep_the_error_shape(http):
    assert_error_shape(http.get("/v1/nothing-here"), 404)
    assert_error_shape(http.get("/v1/completions"), 405)


# ---- overload and drain --------------------------------------------------------------------------

def test_overload_is_429_and_draining_is_503(tiny_llama):
    """One sequence may run and one wait: of a burst, the rest are refused at once with 429."""
    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http_client:
            body = {"prompt": PROMPT, "max_tokens": 48, "ignore_eos": True}
            return await asyncio.gather(*(http_client.post("/v1/completions", json=body) for _ in range(12)))

    with server_thread(tiny_llama, max_waiting=1, max_num_seqs=1) as small:
        responses = asyncio.run(burst(small.url))
        refused = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert len(refused) + len(served) == 12 and refused and served
        for response in refused:
            assert assert_error_shape(response, 429)["code"] == "server_overloaded"
            assert response.headers["retry-after"] == "1"
        assert all(r.json()["usage"]["completion_tokens"] == 48 for r in served)
        page = httpx.get(small.url + "/metrics").text
        assert metric(page, "pagellm:request_rejected_total", 'reason="overloaded"') == len(refused)
        wait_until_idle(small)

        small.server.async_engine.stop_accepting()   # as a drain begins: new work is refused with 503
        refused_late = httpx.post(small.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert assert_error_shape(refused_late, 503)["code"] == "service_unavailable"
        assert_error_shape(httpx.get(small.url + "/health"), 503)


def _stream_then_drain(server: ServerThread, max_tokens: int, n: int = 1) -> tuple[list[str], BaseException | None]:
    """Start a stream, drain the server after its first chunk, read what is left."""
    async def run() -> tuple[list[str], BaseException | None]:
        lines: list[str] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http_client:
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "n": n, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                async with http_client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line:
                            lines.append(line)
                        if len(lines) == 1:
                            server.server.drain()
                            await asyncio.sleep(0.3)   # uvicorn notices within 0.1 s
                            with pytest.raises((httpx.ConnectError, httpx.HTTPStatusError)):
                                (await http_client.get("/health")).raise_for_status()
            except httpx.HTTPError as exc:
                return lines, exc
        return lines, None

    return asyncio.run(run())


def test_drain_lets_running_requests_finish(tiny_llama):
    server = server_thread(tiny_llama, grace_period=60)
    with server:
        lines, error = _stream_then_drain(server, max_tokens=40)
        server.thread.join(30)
        assert not server.thread.is_alive()
    assert error is None and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["usage"]["completion_tokens"] == 40
    assert not server.server.async_engine.accepting


def test_drain_aborts_what_outlives_the_grace_period(tiny_llama):
    server = server_thread(tiny_llama, grace_period=0)
    with server:
        started = time.monotonic()
        lines, error = _stream_then_drain(server, max_tokens=200, n=4)
        server.thread.join(30)
        assert not server.thread.is_alive() and time.monotonic() - started < 20
    assert error is None and lines[-1] == "data: [DONE]"   # ended in-band, not cut off
    aborted, usage = (json.loads(line[len("data: "):]) for line in lines[-3:-1])
    assert aborted["error"]["code"] == "service_unavailable" and "shutting down" in aborted["error"]["message"]
    streamed = sum(len(choice["text"]) > 0 for chunk in map(json.loads, (line[6:] for line in lines[:-3]))
                   for choice in chunk["choices"])
    assert usage["choices"] == [] and 0 < streamed <= usage["usage"]["completion_tokens"] < 4 * 200
    stats = server.server.async_engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
