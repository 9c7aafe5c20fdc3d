"""Hostile and demanding clients against the server (a tiny random model): the key is
checked before the body is read, bodies are bounded while they are read, types are
strict, text must be valid, unimplemented parameters are named, work per request is
bounded, heavy preparation runs off the event loop and the engine thread, a failing
request fails alone, structured outputs hold, /metrics is live, and shutdown is prompt."""
from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time

import httpx
import jsonschema
import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.model_runner import ModelRunner
from pagellm.server.async_engine import EngineOverloaded
from test_server_engine import make_engine
from test_server import API_KEY, AUTH, MODEL, PROMPT, assert_error_shape, metric, server_thread, wait_until_idle

MAX_BYTES = 64 * 1024
MAX_SEQS = 16
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(tiny_llama):
    with server_thread(tiny_llama, api_key=API_KEY, max_request_bytes=MAX_BYTES, allowed_origins=[ORIGIN],
                       max_seqs_per_request=MAX_SEQS) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", max_model_len=256, num_kv_blocks=64)


def raw_request(url: str, head: str) -> str:
    """Send only a request head (no body) and return the status line the server answers with."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        return sock.recv(4096).decode().split("\r\n")[0]


# ---- before the body -----------------------------------------------------------------------

def test_key_and_size_are_checked_before_the_body_is_read(server):
    """A 50 MB body announced but never sent: the answer comes at once from the head alone."""
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n"
    assert raw_request(server.url, head + "\r\n").endswith("401 Unauthorized")
    assert raw_request(server.url, head + f"Authorization: Bearer {API_KEY}\r\n\r\n").endswith(
        "413 Request Entity Too Large")


def test_a_body_without_length_is_cut_off_at_the_limit(http):
    sent = []

    def chunks():   # chunked transfer: no Content-Length to refuse up front
        for _ in range(64):
            sent.append(8192)
            yield b" " * 8192

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert assert_error_shape(response, 413)["code"] == "request_too_large"
    ok = http.post("/v1/completions", json={"prompt": "x" * (MAX_BYTES // 2), "max_tokens": 1})
    assert ok.status_code == 400 and "max_model_len" in ok.json()["error"]["message"]   # read whole, then judged


def test_docs_and_schema_need_the_key(server, tiny_llama):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_error_shape(httpx.get(server.url + path), 401)
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200
    with server_thread(tiny_llama, enable_docs=False) as open_server:
        for path in ("/docs", "/openapi.json"):
            assert_error_shape(httpx.get(open_server.url + path), 404)


def test_cors_for_allowed_origins_only(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    answer = httpx.options(server.url + "/v1/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.options(server.url + "/v1/completions", headers=preflight | {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers
    simple = httpx.get(server.url + "/health", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN


# ---- strict, valid, implemented ----------------------------------------------------------------

HOSTILE = [
    ("/v1/completions", {"prompt": "hi", "top_k": 10**20, "temperature": 1.0}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": [1, 2**64]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-2**63 - 1]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stream": "true"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "n": 1.0}, "n"),
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfffx"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "hi", "no_such_parameter": 1}, "no_such_parameter"),
    ("/v1/completions", {"prompt": ["a"] * 9, "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "(ab"}, "guided_regex"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": ["a"], "guided_regex": "a"}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]},
     "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"type": "no-such-type"}}}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, "response_format"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/detokenize", {"tokens": [2**63]}, "tokens"),
]


@pytest.mark.parametrize("path, body, param", HOSTILE, ids=lambda v: json.dumps(v)[:50] if isinstance(v, dict)
                         else str(v))
def test_hostile_fields_are_400_naming_the_field(http, path, body, param):
    body = {"max_tokens": 2} | body if path.startswith("/v1") else body
    response = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    error = assert_error_shape(response, 400, param)   # json.dumps escapes a lone surrogate as \ud800
    assert "Traceback" not in error["message"]


def test_neutral_values_of_unimplemented_parameters_pass(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tool_choice": "none", "tools": [],
            "parallel_tool_calls": True, "logit_bias": {}, "best_of": 1, "echo": False, "store": False}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_top_k_above_the_vocabulary_is_all_tokens(http, offline):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    huge = http.post("/v1/completions", json=body | {"top_k": 2**63 - 1}).json()["choices"][0]["text"]
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=5), use_tqdm=False)
    assert huge == expected[0].outputs[0].text


# ---- structured outputs over HTTP ---------------------------------------------------------------

def test_structured_outputs_over_http(http):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "n": 3, "seed": 4}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
              "required": ["ok", "kind"], "additionalProperties": False}
    answer = http.post("/v1/chat/completions", json=chat | {"response_format": {
        "type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}}).json()
    for choice in answer["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        assert choice["finish_reason"] == "stop"
    picked = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "n": 4, "seed": 1,
                                                "guided_choice": ["yes", "no", "maybe not"]}).json()
    assert {c["text"] for c in picked["choices"]} <= {"yes", "no", "maybe not"}
    matched = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "guided_regex": r"\d{3}-[xy]"})
    assert re.fullmatch(r"\d{3}-[xy]", matched.json()["choices"][0]["text"])


# ---- bounded work, off the hot threads -----------------------------------------------------------

def test_max_waiting_counts_sequences(tiny_llama):
    async def scenario() -> None:
        engine = make_engine(tiny_llama, max_waiting=8)
        with pytest.raises(EngineOverloaded, match="adds 16"):
            await engine.submit("big", [PROMPT], SamplingParams(n=16, max_tokens=1))
        stream = await engine.submit("small", [PROMPT, PROMPT], SamplingParams(n=4, max_tokens=1))
        assert len([output async for output in stream if output.finished]) == 2
        await engine.shutdown()

    asyncio.run(scenario())


def test_an_overlong_prompt_is_refused_from_its_prefix(offline, monkeypatch):
    """Only the first 8 x max_model_len characters of an overlong text are tokenized (1,400 tokens for 2,048
    characters with the tiny tokenizer: more than twice the 256-token context); a short prompt is whole."""
    engine = offline.engine
    lengths = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, **kw: lengths.append(len(text)) or encode(text, **kw))
    with pytest.raises(ValueError, match="max_model_len is 256"):
        engine.tokenize("the quick brown fox jumps over the lazy dog " * 2000)
    assert lengths == [8 * 256]
    lengths.clear()
    assert engine.tokenize(PROMPT)[1] == encode(PROMPT) and lengths == [len(PROMPT)]
    lengths.clear()   # a chat goes the same way, its template rendered first
    with pytest.raises(ValueError, match="max_model_len is 256"):
        offline.apply_chat_template([{"role": "user", "content": "the quick brown fox " * 5000}])
    assert lengths == [8 * 256]
    chat = [{"role": "user", "content": PROMPT}]
    assert offline.apply_chat_template(chat) == list(engine.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_preparation_runs_in_the_worker_pool(server, http, monkeypatch):
    engine = server.server.async_engine.engine
    threads = []
    tokenize = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda p: threads.append(threading.current_thread().name) or tokenize(p))
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert threads[0].startswith("pagellm-prepare")   # the text; the engine thread only checks the ids


def test_metrics_do_not_wait_for_the_step(server, http, monkeypatch):
    """While a step is held, a new request already shows as waiting."""
    release, entered = threading.Event(), threading.Event()
    launch = ModelRunner.launch

    def held(self, step):
        entered.set()
        release.wait(30)
        return launch(self, step)

    monkeypatch.setattr(ModelRunner, "launch", held)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as first, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as second:
        results = []
        threading.Thread(target=lambda: results.append(first.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}))).start()
        assert entered.wait(30)
        threading.Thread(target=lambda: results.append(second.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 3}))).start()
        deadline = time.monotonic() + 10
        while metric(httpx.get(server.url + "/metrics").text, "pagellm:num_requests_waiting") < 3:
            assert time.monotonic() < deadline, "the waiting request did not show while the step was held"
            time.sleep(0.02)
        release.set()
        while len(results) < 2:
            time.sleep(0.02)
    assert [r.status_code for r in results] == [200, 200]


def test_a_failing_request_is_a_500_for_it_alone(server, http, monkeypatch):
    launch = ModelRunner.launch

    def poisoned(self, step):
        if any(p.seed == 666 for p in step.sampling.params):
            raise RuntimeError("poisoned row")
        return launch(self, step)

    monkeypatch.setattr(ModelRunner, "launch", poisoned)

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "seed": 666}),
                client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "seed": 1}))

    failed, fine = asyncio.run(both())
    error = assert_error_shape(failed, 500)
    assert error["code"] == "engine_error" and "poisoned row" in error["message"]
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 8
    wait_until_idle(server)


def test_shutdown_ends_within_the_grace_period_during_a_long_step(tiny_llama, monkeypatch):
    """Steps of 5 s, grace period 0.5 s: the stream still ends with its error, usage and
    [DONE], and the server is gone well before the step would end."""
    launch = ModelRunner.launch
    slow = threading.Event()

    def long_step(self, step):
        if slow.is_set():
            time.sleep(5)
        return launch(self, step)

    monkeypatch.setattr(ModelRunner, "launch", long_step)
    server = server_thread(tiny_llama, grace_period=0.5)
    with server:
        body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            first = next(lines)
            slow.set()
            started = time.monotonic()
            server.server.drain()
            rest = list(lines)
        server.thread.join(10)
        assert not server.thread.is_alive() and time.monotonic() - started < 0.5 + 2
    assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
    aborted, usage = (json.loads(line[len("data: "):]) for line in rest[-3:-1])
    assert aborted["error"]["code"] == "service_unavailable" and usage["usage"]["completion_tokens"] >= 1


# ---- fuzz: hostile bodies while honest requests run ----------------------------------------------

NUM_HOSTILE = 1200
DEEP = "[" * 5000 + "]" * 5000
HOSTILE_VALUES = [2**63, -2**63 - 1, 10**20, 2**64 + 1, True, False, "yes", "true", 1e308, -0.0, 1.5, None, "",
                  "\ud800", "a\udfffb", [], {}, [[[]]], list(range(3000)), ["\ud800"] * 3, "x" * 5000,
                  json.loads("[" * 200 + "]" * 200), {"a": {"b": {"c": [1, {"d": None}]}}}, -1, 0, 1, 3, 2**31]
FIELDS = ["prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
          "logprobs", "min_tokens", "stream", "response_format", "guided_choice", "guided_regex", "guided_json",
          "tool_choice", "best_of", "messages", "min_p", "repetition_penalty", "stream_options", "ignore_eos"]
RAW = [DEEP.encode(), b'{"prompt": NaN}', b'{"prompt": "hi", "max_tokens": Infinity}', b"\xff\xfe{}",
       b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "top_k": 1' + b"0" * 400 + b"}", b"{" * 3000]


def hostile_bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    bodies = []
    for i in range(NUM_HOSTILE):
        if i % 10 == 0:
            bodies.append((rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize"]), rng.choice(RAW)))
            continue
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
        body = {"/v1/completions": {"prompt": "hi there", "max_tokens": 3},
                "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [5, 6]}}[path]
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS + ["tokens"] * (path == "/detokenize"))] = rng.choice(HOSTILE_VALUES)
        bodies.append((path, json.dumps(body).encode()))
    return bodies


HONEST_REQUESTS = [dict(prompt=f"{PROMPT} number {i}", max_tokens=24, temperature=[0.0, 0.9][i % 2], seed=i,
                        ignore_eos=True) for i in range(6)]


def test_hostile_bodies_beside_honest_streams(server, offline):
    """>= 1,000 hostile bodies (integers beyond int64, lone surrogates, huge lists, deep nesting,
    bad literals) while honest streams run: no 5xx, every stream intact, honest outputs
    identical to a quiet run."""
    bodies = hostile_bodies(random.Random(0))

    async def run() -> tuple[list[str], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            gate = asyncio.Semaphore(8)

            async def hostile(path: str, content: bytes) -> httpx.Response:
                async with gate:
                    return await client.post(path, content=content, headers={"Content-Type": "application/json"})

            async def honest(body: dict) -> str:
                async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                    events = [json.loads(line[6:]) async for line in response.aiter_lines()
                              if line.startswith("data: {")]
                return "".join(choice["text"] for event in events for choice in event["choices"])

            results = await asyncio.gather(*(honest(b) for b in HONEST_REQUESTS),
                                           *(hostile(path, content) for path, content in bodies))
            return results[:len(HONEST_REQUESTS)], results[len(HONEST_REQUESTS):]

    texts, responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert len(responses) >= 1000 and max(statuses) < 500, [r.text for r in responses if r.status_code >= 500][:3]
    for response in responses:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
        else:
            response.json()
    assert statuses.count(400) > NUM_HOSTILE // 2 and 200 in statuses
    quiet = offline.generate([r["prompt"] for r in HONEST_REQUESTS],
                             [SamplingParams(**{k: v for k, v in r.items() if k != "prompt"}) for r in HONEST_REQUESTS],
                             use_tqdm=False)
    assert texts == [o.outputs[0].text for o in quiet]
    wait_until_idle(server)
