"""`pagellm bench throughput | latency | prefill` on a tiny random model (CPU, seconds).

The JSON's counts are checked against closed forms: requests, prompt tokens
(the lengths the seed draws), output tokens (N x output length with
--ignore-eos), ITLs per request, prefill FLOPs; and the measured fields for
sanity (KV waste in [0, 1], p50 <= p99, one prefill step per iteration).
"""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from pagellm.bench import hf_baseline
from pagellm.bench.offline import _length
from pagellm.bench.stats import distribution_ms, kv_occupancy, prefill_flops
from pagellm.cli import main
from pagellm.engine.block_manager import BlockManager
from pagellm.engine.sequence import Sequence
from pagellm.sampling_params import SamplingParams
from tiny_models import make_tiny_hf_model

SMALL = ["--kv-cache-memory", "8MiB", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("bench")))


def _bench(tmp_path, *argv) -> dict:
    path = tmp_path / "out.json"
    assert main(["bench", *argv, *SMALL, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def _ordered(dist: dict) -> None:
    assert dist["n"] > 0
    assert dist["min"] <= dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
    assert dist["min"] <= dist["mean"] <= dist["max"]


@pytest.fixture(scope="module")
def throughput(tiny, tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("tp"), "throughput", "--random-model", tiny, "--num-prompts", "5",
                  "--input-len", "3-40", "--output-len", "4", "--ignore-eos", "--seed", "7",
                  "--warmup-requests", "1", "--bandwidth", "100GB/s", "--flops", "1TFLOP/s")


def test_throughput_counts_match_closed_forms(throughput):
    rng = random.Random(7)
    input_lens = [rng.randint(3, 40) for _ in range(5)]
    r = throughput["results"]
    assert throughput["bench"] == "throughput"
    assert r["num_requests"] == r["completed"] == 5
    assert r["input_lens"] == input_lens
    assert r["total_prompt_tokens"] == sum(input_lens)
    assert r["total_output_tokens"] == r["expected_output_tokens"] == 5 * 4
    assert r["output_lens"] == [4] * 5
    assert r["output_tokens_per_s"] == pytest.approx(20 / r["duration_s"])
    assert r["total_tokens_per_s"] == pytest.approx((sum(input_lens) + 20) / r["duration_s"])
    assert r["requests_per_s"] == pytest.approx(5 / r["duration_s"])
    lat = throughput["latency_ms"]
    assert lat["ttft"]["n"] == lat["e2e"]["n"] == 5
    assert lat["itl"]["n"] == 5 * (4 - 1)
    for name in ("ttft", "itl", "e2e", "tpot"):
        _ordered(lat[name])
    assert lat["ttft"]["max"] <= lat["e2e"]["max"]
    sched = throughput["scheduler"]
    assert sched["num_prefill_tokens"] == sum(input_lens)        # nothing cached, nothing preempted
    assert sched["num_decode_tokens"] == 5 * (4 - 1)


def test_throughput_kv_and_bandwidth_fields(throughput):
    kv = throughput["kv"]
    assert 0.0 <= kv["waste_mean"] <= kv["waste_max"] <= 1.0
    assert 0.0 < kv["usage_mean"] <= kv["usage_max"] <= 1.0
    assert kv["steps_measured"] == throughput["results"]["num_steps"] > 0
    assert kv["peak_holding_slots"] <= kv["peak_allocated_slots"] == kv["peak_used_blocks"] * kv["block_size"]
    bw = throughput["decode_bandwidth"]
    assert bw["steps"] >= 4 - 1 and bw["bytes"] > 0 and 0 < bw["fraction_of_floor"]
    assert throughput["peaks"]["copy"]["bandwidth"] > 0
    assert throughput["checks"]["kv_waste_max"]["target"] == 0.04
    (pred,) = throughput["roofline"]           # --bandwidth/--flops: one custom-hardware prediction
    assert pred["hardware"] == "custom" and pred["predicted"] > 0
    for key in ("device", "date", "argv", "args", "engine_config", "runner", "memory"):
        assert key in throughput
    assert throughput["engine_config"]["random_weights"] is True
    assert throughput["runner"]["attention_backend"] == "torch"


def test_throughput_of_a_checkpoint_path_with_fixed_lengths(tiny, tmp_path):
    out = _bench(tmp_path, "throughput", tiny, "--num-prompts", "3", "--input-len", "9", "--output-len", "3",
                 "--ignore-eos", "--warmup-requests", "0")
    r = out["results"]
    assert out["engine_config"]["random_weights"] is False
    assert r["total_prompt_tokens"] == 3 * 9 and r["total_output_tokens"] == 3 * 3
    assert out["roofline"] == []               # CPU, no --hardware: no prediction


def test_latency_counts(tiny, tmp_path):
    out = _bench(tmp_path, "latency", "--random-model", tiny, "--batch-size", "2", "--input-len", "12",
                 "--output-len", "5", "--num-iters", "2", "--warmup-iters", "1", "--hardware", "H100")
    r = out["results"]
    assert r["output_tokens"] == [2 * 5, 2 * 5]
    assert out["engine_config"]["max_num_seqs"] == 2
    assert 0 < r["ttft_s"] < r["e2e_s"] and r["tpot_s"] > 0
    assert r["decode_tokens_per_s"] == pytest.approx(2 / r["tpot_s"])
    assert out["latency_ms"]["itl"]["n"] == 2 * 2 * (5 - 1)
    _ordered(out["latency_ms"]["itl"])
    assert {p["metric"] for p in out["roofline"]} == {"ttft_s", "tpot_s"}
    assert out["decode_bandwidth"]["steps"] == 2 * (5 - 1)


def test_latency_compare_hf_generate(tiny, tmp_path):
    out = _bench(tmp_path, "latency", "--random-model", tiny, "--input-len", "8", "--output-len", "4",
                 "--num-iters", "1", "--warmup-iters", "0", "--compare", "hf")
    hf = out["hf"]
    assert "error" not in hf, hf.get("traceback")
    assert hf["method"] == "generate" and hf["generated_tokens_per_seq"] == 4
    assert hf["ttft_s"] > 0 and isinstance(hf["speedup_tpot"], float)   # its sign is timing noise on a tiny model


def test_compare_hf_failure_is_reported_not_raised(tiny, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no HF here")
    monkeypatch.setattr(hf_baseline, "build_hf_model", boom)
    out = _bench(tmp_path, "throughput", "--random-model", tiny, "--num-prompts", "2", "--input-len", "5",
                 "--output-len", "2", "--ignore-eos", "--warmup-requests", "0", "--compare", "hf")
    assert "no HF here" in out["hf"]["error"]
    assert out["hf"]["speedup_output_tokens_per_s"] is None
    assert out["checks"]["throughput_vs_hf_generate_batch"]["met"] is None


def test_prefill_one_step_and_flops(tiny, tmp_path):
    # 3 x 100 = 300 batched tokens, more than max_model_len (128): the engine profiles its activation
    # peak with sequences no longer than max_model_len.
    out = _bench(tmp_path, "prefill", "--random-model", tiny, "--batch-size", "3", "--input-len", "100",
                 "--num-iters", "2", "--warmup-iters", "1")
    r = out["results"]
    assert r["one_step_per_iter"] and r["steps_per_iter"] == [[[3, 300]], [[3, 300]]]
    assert out["engine_config"]["max_num_batched_tokens"] >= 300
    assert out["model"]["max_model_len"] == 128
    h, i, layers, v, heads, hd = 64, 128, 2, 320, 4, 16
    q, kv = heads * hd, 2 * hd
    linear = 2 * 300 * layers * (h * q + 2 * h * kv + q * h + 3 * h * i)
    attention = 4 * layers * heads * hd * 3 * (100 * 101 // 2)
    assert r["flops"]["total"] == linear + 2 * 3 * h * v + attention
    assert r["achieved_flops"] == pytest.approx(r["flops"]["total"] / r["step_s_median"])
    assert r["fraction_of_matmul"] is None     # no matmul peak measured on the CPU


def test_model_arguments_are_checked(tiny, capsys):
    assert main(["bench", "throughput", "--num-prompts", "1"]) == 2
    assert main(["bench", "throughput", tiny, "--random-model", tiny]) == 2
    assert main(["bench", "latency", "--random-model", "no-such-model"]) == 2
    assert "error" in capsys.readouterr().err


def test_length_ranges():
    assert _length("128") == (128, 128)
    assert _length("32-512") == (32, 512)
    assert _length("32:512") == (32, 512)
    for bad in ("0", "9-3", "-4"):
        with pytest.raises(Exception):
            _length(bad)


def test_distribution_nearest_rank():
    d = distribution_ms([i / 1000 for i in range(1, 101)])      # 1..100 ms
    assert (d["p50"], d["p90"], d["p99"], d["max"]) == pytest.approx((50, 90, 99, 100))
    assert distribution_ms([])["n"] == 0


def test_kv_occupancy_counts_shared_prefix_blocks_once():
    bm = BlockManager(num_blocks=16, block_size=16)
    params = SamplingParams(max_tokens=4)
    first = Sequence(0, "a", 0, list(range(40)), params, 0, 0.0)
    bm.allocate(first, 40)
    first.num_computed_tokens = 40
    second = Sequence(1, "b", 0, list(range(32)) + [999] * 5, params, 0, 0.0)
    assert bm.match_prefix(second) == 32                       # two full blocks shared
    bm.allocate(second, 5)
    second.num_computed_tokens = 37
    engine = SimpleNamespace(block_manager=bm, scheduler=SimpleNamespace(running=[first, second], waiting={}))
    used, allocated, holding = kv_occupancy(engine)
    assert (used, allocated) == (4, 64)
    assert holding == 32 + 8 + 5                               # shared blocks once, then each partial block


def test_prefill_flops_of_a_preset():
    from pagellm.model.presets import load_preset
    config = load_preset("llama-3-8b")
    f = prefill_flops(config, 8, 2048)
    non_embedding = config.num_parameters - 2 * config.vocab_size * config.hidden_size - \
        (2 * config.num_hidden_layers + 1) * config.hidden_size            # norms are not matmuls
    assert f["linear"] == 2 * non_embedding * 8 * 2048


def test_step_records_hold_the_time_of_the_step_they_read(tiny):
    """A call of ``engine.step()`` under the asynchronous pipeline launches step
    N+1 and reads step N: its record is step N's (every scheduled step gets one
    record, in order, and the moment its tokens were read lies in that
    record's span). Given to N+1, the first decode step took the last prefill
    step's time (``kv_quant_gpu.py``'s decode figure)."""
    from pagellm import LLM
    from pagellm.bench.runner import Run
    from pagellm.bench.stats import step_shape

    engine = LLM(tiny, dtype="float32", max_model_len=128, kv_cache_memory="8MiB", max_num_batched_tokens=16).engine
    assert engine.overlap
    run = Run(engine, record_kv=False)
    scheduled, shapes, reads = [], {}, []

    class Watch:
        def on_schedule(self, batch):
            if batch:
                shapes[id(batch)] = step_shape(batch)
                scheduled.append(shapes[id(batch)])

        def on_step(self, batch, outputs):
            reads.append((shapes.pop(id(batch)), run.clock()))

    engine.add_observer(Watch())
    for i, n in enumerate([20, 5, 11]):   # prompt chunks, then decode-only steps
        run.add(f"r{i}", list(range(3, 3 + n)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    run.go()
    assert [r.decode_only for r in run.steps].count(True) >= 2 and not run.steps[0].decode_only
    assert [(r.num_seqs, r.num_tokens, r.decode_only, r.kv_tokens_read) for r in run.steps] == [
        (s.num_seqs, s.num_tokens, s.decode_only, s.kv_read) for s in scheduled]
    assert [shape for shape, _ in reads] == scheduled
    for record, (_, read_at) in zip(run.steps, reads):
        assert record.start <= read_at <= record.end
