"""`pagellm bench serve`: load-test a running OpenAI-compatible server through its streaming API.

Requests arrive as a Poisson process of ``--request-rate`` per second (``inf``:
all at once), at most ``--max-concurrency`` in flight. Each streams its
completion; the client times the first text (TTFT), the gaps between later
text chunks (ITL) and the whole request (E2E). Prompts are random words, and
``ignore_eos`` makes every request generate exactly ``--output-len`` tokens.
Goodput counts the requests per second that met every ``--goodput`` SLO.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

_WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps keys and values in blocks "
          "so many requests share one pool of memory on the device").split()
_SLO_KEYS = ("ttft", "itl", "e2e")


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None          # default: the server's first model
    api_key: str | None = None
    endpoint: str = "completions"     # completions | chat
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len: int = 32               # words per prompt
    output_len: int = 64              # max_tokens
    seed: int = 0
    goodput: dict[str, float] = field(default_factory=dict)   # SLOs in ms: ttft, itl (each gap), e2e
    timeout: float = 600.0


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0                 # seconds
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    def meets(self, slos_ms: dict[str, float]) -> bool:
        worst = {"ttft": self.ttft, "itl": max(self.itls, default=0.0), "e2e": self.e2e}
        return self.ok and all(worst[key] * 1000 <= limit for key, limit in slos_ms.items())


@dataclass
class BenchReport:
    completed: int
    failed: int
    duration_s: float
    qps: float
    output_tokens_per_s: float
    goodput_qps: float | None
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]

    def table(self) -> str:
        lines = [f"requests completed: {self.completed}   failed: {self.failed}   duration: {self.duration_s:.2f} s",
                 f"throughput: {self.qps:.2f} req/s   {self.output_tokens_per_s:.1f} output tokens/s"]
        if self.goodput_qps is not None:
            lines.append(f"goodput: {self.goodput_qps:.2f} req/s")
        lines.append(f"{'':6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)")
        for name, dist in (("TTFT", self.ttft_ms), ("ITL", self.itl_ms), ("E2E", self.e2e_ms)):
            lines.append(f"{name:6}" + "".join(f"{dist[k]:>10.1f}" for k in ("mean", "p50", "p90", "p99")))
        lines += [f"error: {e}" for e in self.errors[:5]]
        return "\n".join(lines)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """Mean and nearest-rank p50/p90/p99 of ``values`` (seconds), in milliseconds."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {"mean": statistics.fmean(ordered) * 1000, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99)}


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """["ttft:500", "e2e:3000"] -> {"ttft": 500.0, "e2e": 3000.0} (milliseconds)."""
    slos = {}
    for spec in specs:
        key, _, value = spec.partition(":")
        if key not in _SLO_KEYS or not value:
            raise ValueError(f"--goodput takes KEY:MS with KEY one of {', '.join(_SLO_KEYS)}; got {spec!r}")
        slos[key] = float(value)
    return slos


def _request_body(config: BenchConfig, model: str, prompt: str) -> dict:
    body = {"model": model, "max_tokens": config.output_len, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if config.endpoint == "chat":
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


def _chunk_text(chunk: dict) -> str:
    choice = (chunk.get("choices") or [{}])[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _one_request(client: httpx.AsyncClient, path: str, body: dict) -> RequestResult:
    start = last = time.perf_counter()
    result = RequestResult(ok=False)
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result.ok = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"].get("message", "error event")
                break
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if _chunk_text(chunk):
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    if not result.ok and result.error is None:
        result.error = "the stream ended without [DONE]"
    result.e2e = time.perf_counter() - start
    return result


async def _resolve_model(client: httpx.AsyncClient, model: str | None) -> str:
    if model is not None:
        return model
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _prompts(config: BenchConfig) -> list[str]:
    rng = random.Random(config.seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(config.input_len)) for _ in range(config.num_prompts)]


async def run_benchmark(config: BenchConfig) -> BenchReport:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.max_concurrency or config.num_prompts or 1)
    async with httpx.AsyncClient(base_url=config.url, headers=headers, timeout=config.timeout,
                                 limits=limits) as client:
        model = await _resolve_model(client, config.model)
        path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
        gate = asyncio.Semaphore(config.max_concurrency or config.num_prompts or 1)
        arrivals = random.Random(config.seed + 1)

        async def limited(prompt: str) -> RequestResult:
            async with gate:
                try:
                    return await _one_request(client, path, _request_body(config, model, prompt))
                except httpx.HTTPError as exc:
                    return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")

        start = time.perf_counter()
        tasks = []
        for prompt in _prompts(config):
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(config.request_rate):
                await asyncio.sleep(arrivals.expovariate(config.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, config.goodput)


def summarize(results: list[RequestResult], duration: float, slos_ms: dict[str, float]) -> BenchReport:
    done = [r for r in results if r.ok]
    return BenchReport(
        completed=len(done), failed=len(results) - len(done), duration_s=duration, qps=len(done) / duration,
        output_tokens_per_s=sum(r.output_tokens for r in done) / duration,
        goodput_qps=sum(r.meets(slos_ms) for r in done) / duration if slos_ms else None,
        ttft_ms=percentiles_ms([r.ttft for r in done]), itl_ms=percentiles_ms([t for r in done for t in r.itls]),
        e2e_ms=percentiles_ms([r.e2e for r in done]), errors=[r.error for r in results if r.error])


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser("serve", help="load-test a running server through its streaming API")
    parser.add_argument("--url", default=BenchConfig.url, help="server base URL")
    parser.add_argument("--model", help="model name (default: the server's first)")
    parser.add_argument("--api-key")
    parser.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    parser.add_argument("--num-prompts", type=int, default=BenchConfig.num_prompts)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="mean requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--input-len", type=int, default=BenchConfig.input_len, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=BenchConfig.output_len, help="tokens per completion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                        help="SLOs for goodput, e.g. ttft:500 itl:100 e2e:5000")
    parser.add_argument("--result-json", help="also write the report here")
    parser.set_defaults(func=run_bench_serve)


def run_bench_serve(args: argparse.Namespace) -> int:
    concurrency_ok = args.max_concurrency is None or args.max_concurrency >= 1
    if args.num_prompts < 1 or args.request_rate <= 0 or not concurrency_ok:
        raise ValueError("--num-prompts, --request-rate and --max-concurrency must be positive")
    config = BenchConfig(url=args.url.rstrip("/"), model=args.model, api_key=args.api_key, endpoint=args.endpoint,
                         num_prompts=args.num_prompts, request_rate=args.request_rate,
                         max_concurrency=args.max_concurrency, input_len=args.input_len, output_len=args.output_len,
                         seed=args.seed, goodput=parse_goodput(args.goodput))
    report = asyncio.run(run_benchmark(config))
    print(report.table())
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(asdict(report), f, indent=2)
    return 0 if report.completed else 1
