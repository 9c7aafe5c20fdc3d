"""Server hardening figures (issue 15), on the real default model, in four parts:

- abort: 200 prompts x n=128 = 25,600 sequences queued in the engine, then all aborted
  (``LLMEngine.abort_request``, the work the server does when such a client leaves);
- sigterm: ``pagellm serve --grace-period 3`` holding that request, then SIGTERM: seconds to exit;
- health: ``/health`` latency (p50/p99/max) and the largest gap between chunks of a running
  stream while maximum-size bodies (a chat message and a completion prompt) are processed,
  beside the same figures with no such bodies;
- structured: >= 20 JSON schemas answered with ``response_format``-style constraints
  (``StructuredOutputsParams``), each output parsed and validated with jsonschema; the mask's
  cost as the throughput of the same batch replayed without the grammar (same prompts, same
  number of tokens per request, so the same schedule).

    python benchmarks/server_hardening.py --json benchmarks/results/cpu-2026-12-01-server-hardening.json
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import torch

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import StructuredOutputsParams

MODEL = "qwen2.5-coder-0.5b"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- abort -------------------------------------------------------------------------------------

def bench_abort(llm: LLM) -> dict:
    engine = llm.engine
    params = SamplingParams(n=128, max_tokens=1, temperature=1.0, seed=0)
    ids = [f"abort-{i}" for i in range(200)]
    for i, request_id in enumerate(ids):
        engine.add_request(request_id, f"prompt number {i} of the abort benchmark", params)
    engine.step()   # some prompts computed: their samples forked into the waiting queue
    queued = engine.stats()
    start = time.perf_counter()
    for request_id in ids:
        engine.abort_request(request_id)
    seconds = time.perf_counter() - start
    after = engine.stats()
    return {"sequences": 200 * 128, "waiting_before_abort": queued["num_waiting"],
            "running_before_abort": queued["num_running"], "abort_seconds": seconds,
            "left_after": {k: after[k] for k in ("num_waiting", "num_running", "kv_blocks_used")}}


# ---- served ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pagellm.cli", "serve", model, "--log-level", "warning",
                                "--kv-cache-memory", "1GiB", "--port", str(port), *flags])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def bench_sigterm(model: str, grace: float) -> dict:
    process, url = start_server(model, "--grace-period", str(grace), "--max-seqs-per-request", "25600")
    body = {"prompt": [f"prompt number {i}" for i in range(200)], "n": 128, "max_tokens": 1}
    result: dict = {}
    threading.Thread(target=lambda: result.update(status=_post(url, body)), daemon=True).start()
    while _metric(url, "pagellm:num_requests_waiting") < 1000:
        time.sleep(0.1)
    waiting = _metric(url, "pagellm:num_requests_waiting")
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=300)
    return {"grace_period_s": grace, "waiting_sequences_at_sigterm": waiting,
            "exit_seconds_after_sigterm": time.monotonic() - start, "exit_code": code,
            "held_request_status": result.get("status")}


def _post(url: str, body: dict) -> int | str:
    try:
        return httpx.post(url + "/v1/completions", json=body, timeout=600).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _health_and_stream(url: str, big_bodies: list[tuple[str, dict]], max_tokens: int) -> dict:
    health: list[float] = []
    gaps: list[float] = []
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def stream() -> None:
            body = {"prompt": "def fibonacci(n):", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                    "temperature": 0}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                last = None
                async for line in response.aiter_lines():
                    now = time.perf_counter()
                    if line.startswith("data: {"):
                        if last is not None:
                            gaps.append(now - last)
                        last = now

        async def poll(done: asyncio.Event) -> None:
            while not done.is_set():
                start = time.perf_counter()
                await client.get("/health")
                health.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        async def send_bodies() -> None:
            for path, body in big_bodies:
                statuses.append((await client.post(path, content=json.dumps(body).encode(),
                                                   headers={"Content-Type": "application/json"})).status_code)

        done = asyncio.Event()
        poller = asyncio.create_task(poll(done))
        streamer = asyncio.create_task(stream())
        await asyncio.sleep(2.0)   # the stream is decoding
        await send_bodies()
        await streamer
        done.set()
        await poller
    return {"health_ms": {"p50": 1e3 * percentile(health, 0.5), "p99": 1e3 * percentile(health, 0.99),
                          "max": 1e3 * max(health), "samples": len(health)},
            "stream_gap_ms": {"p50": 1e3 * percentile(gaps, 0.5), "max": 1e3 * max(gaps), "chunks": len(gaps) + 1},
            "big_body_statuses": statuses}


def bench_health(model: str, repeats: int, stream_tokens: int) -> dict:
    process, url = start_server(model)
    try:
        limit = max(1 << 20, 64 * httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"])
        text = "the quick brown fox jumps over the lazy dog " * (limit // 45)   # just under the limit, as JSON
        text = text[:limit - 200]
        bodies = [("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
                  ("/v1/completions", {"prompt": text, "max_tokens": 1})] * repeats
        quiet = asyncio.run(_health_and_stream(url, [], stream_tokens))
        loaded = asyncio.run(_health_and_stream(url, bodies, stream_tokens))
        return {"max_request_bytes": limit, "body_bytes": len(json.dumps(bodies[0][1])), "bodies_sent": len(bodies),
                "quiet": quiet, "with_max_size_bodies": loaded}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


# ---- structured outputs ------------------------------------------------------------------------

def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 24}
SCHEMAS = [
    ("a user with a name and an age", _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a point in 2D", _obj({"x": {"type": "number"}, "y": {"type": "number"}})),
    ("a todo item", _obj({"title": NAME, "done": {"type": "boolean"}})),
    ("a traffic light state", _obj({"color": {"enum": ["red", "amber", "green"]}})),
    ("a book", _obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}})),
    ("an HTTP response summary", _obj({"status": {"type": "integer", "minimum": 100, "maximum": 599},
                                       "ok": {"type": "boolean"}})),
    ("a list of three fruit names", _obj({"fruits": {"type": "array", "items": NAME, "minItems": 3, "maxItems": 3}})),
    ("a city with its country", _obj({"city": NAME, "country": NAME})),
    ("a temperature reading", _obj({"celsius": {"type": "number", "minimum": -90, "maximum": 60},
                                    "unit": {"const": "C"}})),
    ("a product with a price", _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                     "price": {"type": "number", "minimum": 0}})),
    ("a rectangle", _obj({"width": {"type": "integer", "minimum": 1, "maximum": 1000},
                          "height": {"type": "integer", "minimum": 1, "maximum": 1000}})),
    ("a git commit", _obj({"sha": {"type": "string", "pattern": "^[0-9a-f]{7}$"}, "message": NAME})),
    ("a person with an address", _obj({"name": NAME, "address": _obj({"street": NAME, "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("a yes or no answer", _obj({"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number",
                                                                                 "minimum": 0, "maximum": 1}})),
    ("a color in RGB", _obj({"r": {"type": "integer", "minimum": 0, "maximum": 255},
                             "g": {"type": "integer", "minimum": 0, "maximum": 255},
                             "b": {"type": "integer", "minimum": 0, "maximum": 255}})),
    ("a function signature", _obj({"name": NAME, "params": {"type": "array", "items": NAME, "maxItems": 4},
                                   "returns": NAME})),
    ("an email", _obj({"to": NAME, "subject": NAME, "urgent": {"type": "boolean"}})),
    ("a date", _obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                     "month": {"type": "integer", "minimum": 1, "maximum": 12},
                     "day": {"type": "integer", "minimum": 1, "maximum": 31}})),
    ("a log entry", _obj({"level": {"enum": ["debug", "info", "warning", "error"]}, "message": NAME})),
    ("a chess move", _obj({"from": {"type": "string", "pattern": "^[a-h][1-8]$"},
                           "to": {"type": "string", "pattern": "^[a-h][1-8]$"}})),
    ("a movie rating", _obj({"title": NAME, "stars": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("a shopping cart", _obj({"items": {"type": "array", "maxItems": 3, "items": _obj({
        "name": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}})),
    ("an optional nickname", _obj({"name": NAME, "nickname": {"anyOf": [NAME, {"type": "null"}]}})),
    ("a version number", _obj({"major": {"type": "integer", "minimum": 0, "maximum": 99},
                               "minor": {"type": "integer", "minimum": 0, "maximum": 99},
                               "prerelease": {"type": "boolean"}})),
]


def _timed_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list, float]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, time.perf_counter() - start


def bench_structured(llm: LLM, max_tokens: int, rounds: int) -> dict:
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Reply with JSON describing {what}."}])
               for what, _ in SCHEMAS]
    specs = [StructuredOutputsParams(json=schema) for _, schema in SCHEMAS]
    start = time.perf_counter()
    for spec in specs:   # as the server does in its worker pool: the engine then meets cache hits
        llm.engine.grammars.compile(spec)
    compile_seconds = time.perf_counter() - start
    constrained = [SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=s) for s in specs]
    outputs, _ = _timed_generate(llm, prompts, constrained)
    results = []
    for (what, schema), out in zip(SCHEMAS, outputs):
        completion = out.outputs[0]
        try:
            jsonschema.validate(json.loads(completion.text), schema)
            valid = True
        except (json.JSONDecodeError, jsonschema.ValidationError):
            valid = False
        results.append({"schema": what, "valid": valid, "tokens": len(completion.token_ids),
                        "finish_reason": completion.finish_reason, "text": completion.text})
    replay = [SamplingParams(temperature=0, max_tokens=r["tokens"], ignore_eos=True) for r in results]
    with_mask, without_mask = [], []
    for _ in range(rounds):   # alternated, best of each: the machine is shared
        with_mask.append(_timed_generate(llm, prompts, constrained)[1])
        without_mask.append(_timed_generate(llm, prompts, replay)[1])
    tokens = sum(r["tokens"] for r in results)
    best_with, best_without = min(with_mask), min(without_mask)
    return {"schemas": len(SCHEMAS), "valid": sum(r["valid"] for r in results), "output_tokens": tokens,
            "compile_seconds_all_schemas": compile_seconds, "seconds_with_mask": with_mask,
            "seconds_without_mask": without_mask, "tokens_per_s_with_mask": tokens / best_with,
            "tokens_per_s_without_mask": tokens / best_without, "mask_cost_fraction": 1 - best_without / best_with,
            "responses": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="served model (health, sigterm: a tiny model shows stalls "
                        "that a slow decode step would hide)")
    parser.add_argument("--parts", nargs="+", default=["abort", "sigterm", "health", "structured"])
    parser.add_argument("--grace-period", type=float, default=3.0)
    parser.add_argument("--stream-tokens", type=int, default=48,
                        help="tokens of the stream timed beside the big bodies (it must outlast them)")
    parser.add_argument("--health-repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs with and without the mask, alternated")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    report = {"benchmark": "server_hardening", "date": datetime.date.today().isoformat(),
              "command": " ".join(["benchmarks/server_hardening.py", *sys.argv[1:]]),
              "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
              "python": platform.python_version(), "torch": torch.__version__,
              "xgrammar": importlib.metadata.version("xgrammar"),
              "model": args.model}
    if {"abort", "structured"} & set(args.parts):
        llm = LLM(args.model, kv_cache_memory="1GiB")
        if "abort" in args.parts:
            report["abort"] = bench_abort(llm)
            print(json.dumps(report["abort"]), flush=True)
        if "structured" in args.parts:
            report["structured"] = bench_structured(llm, args.max_tokens, args.rounds)
            print(json.dumps({k: v for k, v in report["structured"].items() if k != "responses"}), flush=True)
        del llm
    if "sigterm" in args.parts:
        report["sigterm"] = bench_sigterm(args.model, args.grace_period)
        print(json.dumps(report["sigterm"]), flush=True)
    if "health" in args.parts:
        report["health"] = bench_health(args.model, args.health_repeats, args.stream_tokens)
        print(json.dumps(report["health"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
