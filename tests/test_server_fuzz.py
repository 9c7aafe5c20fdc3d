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


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a well-typed value (in or near its range), one time in twelve junk."""
    return st.integers(0, 11).flatmap(lambda roll: JUNK if roll == 0 else valid)


TEXT = st.text(max_size=30)
TOKEN_IDS = st.lists(st.integers(0, 330), min_size=1, max_size=12)
MESSAGE = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "tool", "developer"]))},
    optional={"content": mostly(TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                                max_size=2)),
              "name": mostly(TEXT)})
SAMPLING = {
    "model": mostly(st.just(MODEL)), "n": mostly(st.integers(0, 4)), "temperature": mostly(st.floats(0, 2.2)),
    "top_p": mostly(st.floats(0, 1)), "top_k": mostly(st.integers(-1, 20)), "min_p": mostly(st.floats(0, 1)),
    "seed": mostly(st.integers()), "stop": mostly(TEXT | st.lists(TEXT, max_size=3)),
    "presence_penalty": mostly(st.floats(-2.2, 2.2)), "frequency_penalty": mostly(st.floats(-2.2, 2.2)),
    "repetition_penalty": mostly(st.floats(0, 2)), "min_tokens": mostly(st.integers(0, 8)),
    "stream": mostly(st.booleans()), "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": mostly(st.booleans()), "stop_token_ids": mostly(st.lists(st.integers(0, 330), max_size=3)),
    "include_stop_str_in_output": mostly(st.booleans()), "skip_special_tokens": mostly(st.booleans()),
    "user": mostly(TEXT), "echo": mostly(st.just(False)), "logit_bias": mostly(st.none()), "unknown_field": JUNK,
}
COMPLETION = st.fixed_dictionaries(
    {"prompt": mostly(TEXT | TOKEN_IDS | st.lists(TEXT, min_size=1, max_size=3) | st.lists(TOKEN_IDS, max_size=3))},
    optional=SAMPLING | {"max_tokens": mostly(st.integers(0, 8)), "logprobs": mostly(st.integers(0, 21))})
# chat's max_tokens defaults to the rest of the context: always bound it so examples stay fast
CHAT = st.fixed_dictionaries(
    {"messages": mostly(st.lists(MESSAGE, min_size=1, max_size=3)), "max_tokens": st.integers(0, 8)},
    optional=SAMPLING | {"logprobs": mostly(st.booleans()), "top_logprobs": mostly(st.integers(0, 21)),
                         "tools": mostly(st.none())})
TOKENIZE = st.fixed_dictionaries({}, optional={
    "prompt": mostly(TEXT), "messages": mostly(st.lists(MESSAGE, max_size=2)),
    "add_special_tokens": mostly(st.booleans()), "model": mostly(st.just(MODEL))})
DETOKENIZE = st.fixed_dictionaries({"tokens": mostly(st.lists(st.integers(-5, 400), max_size=8))},
                                   optional={"model": mostly(st.just(MODEL))})
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


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
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
