"""Prometheus metrics of one AsyncEngine, in a registry of its own (not the
process-global one), so that several servers can live in one process.

Engine state (running/waiting sequences, KV blocks, preemptions) is read from
the last stats snapshot the engine thread published, at scrape time; token
counters and latency histograms are updated by the engine thread as outputs
arrive (prometheus-client metrics are thread-safe).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagellm.outputs import RequestOutput

PREFIX = "pagellm:"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0)


# The host KV tier and speculative decoding: (metric name, family, key of the engine's stats, help).
_FEATURE_METRICS = (
    ("num_swapped_out", CounterMetricFamily, "num_swapped_out", "Preempted sequences swapped to the host KV pool."),
    ("host_prefix_cache_hit_tokens", CounterMetricFamily, "host_prefix_hit_tokens",
     "Prompt tokens restored from the host prefix-cache tier instead of recomputed."),
    ("kv_bytes_to_host", CounterMetricFamily, "kv_bytes_to_host", "KV bytes copied from the device to the host pool."),
    ("kv_bytes_to_device", CounterMetricFamily, "kv_bytes_to_device",
     "KV bytes copied from the host pool to the device."),
    ("spec_decode_num_draft_tokens", CounterMetricFamily, "spec_num_proposed", "Proposed tokens verified."),
    ("spec_decode_num_accepted_tokens", CounterMetricFamily, "spec_num_accepted", "Proposed tokens accepted."),
    ("spec_decode_acceptance_rate", GaugeMetricFamily, "spec_acceptance_rate",
     "Fraction of proposed tokens accepted (0 without speculation)."),
    ("spec_decode_mean_tokens_per_step", GaugeMetricFamily, "spec_mean_tokens_per_step",
     "Tokens a verifying sequence gains per step: accepted proposals + 1."),
)


@dataclass
class RequestProgress:
    """What the latency metrics remember about one engine request."""

    arrival_time: float
    last_token_time: float | None = None
    num_output_tokens: int = 0


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily(PREFIX + "num_requests_running",
                                "Sequences in the running batch (a request with n samples counts n).",
                                value=s["num_running"])
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                "Sequences waiting to be scheduled, preempted ones included.",
                                value=s["num_waiting"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_blocks_used", "KV cache blocks in use.",
                                value=s["kv_blocks_used"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_blocks_total", "KV cache blocks in the pool.",
                                value=s["kv_blocks_total"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                                value=s["kv_usage"])
        yield GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate",
                                "Fraction of queried prompt tokens found in the prefix cache.",
                                value=s["prefix_cache_hit_rate"])
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Sequences preempted (their KV blocks freed).",
                                  value=s["num_preemptions"])
        for name, family, key, doc in _FEATURE_METRICS:
            yield family(PREFIX + name, doc, value=s[key])


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(stats))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests that began generating.",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.",
                                         registry=self.registry)
        self.requests_finished = Counter(PREFIX + "request_success",
                                         "Samples finished (n per request), by finish reason.",
                                         ["finished_reason"], registry=self.registry)
        self.requests_rejected = Counter(PREFIX + "request_rejected", "Requests refused, by reason.",
                                         ["reason"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between consecutive steps that gave a request new tokens.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)

    def observe(self, progress: RequestProgress, output: RequestOutput, now: float) -> None:
        """Account for one (cumulative) output of a request, updating ``progress``."""
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        new_tokens = num_tokens - progress.num_output_tokens
        if new_tokens > 0:
            if progress.last_token_time is None:
                self.ttft.observe(now - progress.arrival_time)
                self.prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                self.itl.observe(now - progress.last_token_time)
            self.generation_tokens.inc(new_tokens)
            progress.last_token_time, progress.num_output_tokens = now, num_tokens
        if output.finished:
            self.e2e.observe(now - progress.arrival_time)
            for completion in output.outputs:
                self.requests_finished.labels(completion.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
