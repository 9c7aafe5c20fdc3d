"""Property-based fuzzing of request bodies: whatever JSON a client sends, the server answers
below 500, errors come in OpenAI's shape, streams end with [DONE], and the server stays up."""
from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_server import MODEL, server_thread, wait_until_idle

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=12),
    st.lists(st.integers(-3, 400), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
SMALL_INTS = st.integers(-2, 6)
FLOATS = st.floats(-3, 3)
TEXT = st.text(max_size=30)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]) | JUNK},
    optional={"content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text") | JUNK, "text": TEXT}),
                                         max_size=2) | JUNK,
              "name": TEXT | JUNK})
SAMPLING = {
    "model": st.just(MODEL) | JUNK, "n": SMALL_INTS | JUNK, "temperature": FLOATS | JUNK,
    "top_p": FLOATS | JUNK, "top_k": SMALL_INTS | JUNK, "min_p": FLOATS | JUNK, "seed": st.integers() | JUNK,
    "stop": TEXT | st.lists(TEXT, max_size=3) | JUNK, "presence_penalty": FLOATS | JUNK,
    "frequency_penalty": FLOATS | JUNK, "repetition_penalty": FLOATS | JUNK, "min_tokens": SMALL_INTS | JUNK,
    "stream": st.booleans() | JUNK, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JUNK,
    "ignore_eos": st.booleans() | JUNK, "stop_token_ids": st.lists(st.integers(-5, 400), max_size=3) | JUNK,
    "include_stop_str_in_output": st.booleans() | JUNK, "skip_special_tokens": st.booleans() | JUNK,
    "user": TEXT | JUNK, "echo": st.booleans() | JUNK, "logit_bias": JUNK, "unknown_field": JUNK,
}
COMPLETION = st.fixed_dictionaries({}, optional=SAMPLING | {
    "prompt": TEXT | st.lists(st.integers(-2, 400), max_size=12) | st.lists(TEXT, max_size=3)
    | st.lists(st.lists(st.integers(0, 330), max_size=6), max_size=3) | JUNK,
    "max_tokens": SMALL_INTS | JUNK, "logprobs": st.integers(-1, 25) | JUNK})
# chat's max_tokens defaults to the rest of the context: always bound it so examples stay fast
CHAT = st.fixed_dictionaries({"max_tokens": SMALL_INTS | st.booleans() | st.text(max_size=3)}, optional=SAMPLING | {
    "messages": st.lists(MESSAGE, max_size=3) | JUNK, "logprobs": st.booleans() | JUNK,
    "top_logprobs": st.integers(-1, 25) | JUNK, "tools": JUNK})
TOKENIZE = st.fixed_dictionaries({}, optional={"prompt": TEXT | JUNK, "messages": st.lists(MESSAGE, max_size=2) | JUNK,
                                               "add_special_tokens": st.booleans() | JUNK, "model": JUNK})
DETOKENIZE = st.fixed_dictionaries({}, optional={"tokens": st.lists(st.integers(-5, 400), max_size=8) | JUNK,
                                                 "model": st.just(MODEL) | JUNK})
REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"), COMPLETION), st.tuples(st.just("/v1/chat/completions"), CHAT),
    st.tuples(st.just("/tokenize"), TOKENIZE), st.tuples(st.just("/detokenize"), DETOKENIZE),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), JUNK))


@pytest.fixture(scope="module")
def server(tiny_llama):
    with server_thread(tiny_llama) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def check_response(response: httpx.Response) -> None:
    event(f"{response.request.url.path} -> {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    else:
        response.json()


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=REQUESTS)
def test_fuzzed_bodies_never_get_a_5xx(http, request):
    path, body = request
    check_response(http.post(path, content=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"}))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=40) | st.text(max_size=40).map(str.encode),
       content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzzed_raw_bytes_never_get_a_5xx(http, raw, content_type):
    check_response(http.post("/v1/completions", content=raw, headers={"Content-Type": content_type}))


def test_server_is_healthy_and_idle_after_fuzzing(server, http):
    assert http.get("/health").status_code == 200
    assert wait_until_idle(server)["kv_blocks_used"] == 0
    assert not math.isnan(server.server.async_engine.stats()["kv_usage"])
