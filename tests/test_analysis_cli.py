"""`pagellm memory` and `pagellm roofline` through the real CLI entry point."""
import json

import pytest

from pagellm.cli import main
from pagellm.model.presets import PRESETS

KiB, MiB, GiB = 2**10, 2**20, 2**30


def run_json(capsys, *argv):
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_memory_json_llama2_7b(capsys):
    out = run_json(capsys, "memory", "llama-2-7b", "--context-len", "2048", "--dtype", "fp16")
    mem = out["memory"]
    assert mem["kv_bytes_per_token"] == 512 * KiB
    assert mem["kv_bytes"] == GiB
    assert mem["weights_bytes"] == 2 * 6_738_415_616
    assert mem["total_bytes"] == pytest.approx(mem["weights_bytes"] + mem["kv_bytes"] + mem["activation_bytes"]
                                               + mem["workspace_bytes"])
    assert out["fit"] is None and out["hardware"] is None


def test_memory_fit_and_advice(capsys):
    out = run_json(capsys, "memory", "llama-3-70b", "--tp", "2", "--hardware", "H100-SXM",
                   "--context-len", "32768", "--advise", "--target-concurrency", "16")
    assert out["memory"]["tp"] == 2
    assert out["memory"]["kv_bytes_per_token"] == 2 * 80 * 4 * 128 * 2          # 8 KV heads / 2 GPUs
    assert out["fit"]["memory_bytes"] == 80 * GiB
    rec = out["advice"]["recommended"]
    assert (rec["w_bits"], rec["kv_bits"], rec["max_len"]) == (8, 8, 32768) and rec["concurrency"] >= 16
    assert any("exceeds the model's 8192 positions" in n for n in out["notes"])


def test_memory_gpu_memory_units(capsys):
    a = run_json(capsys, "memory", "llama-2-7b", "--gpu-memory", "24GiB")
    b = run_json(capsys, "memory", "llama-2-7b", "--gpu-memory", str(24 * 2**30))
    assert a["fit"] == b["fit"] and a["fit"]["memory_bytes"] == 24 * GiB


def test_memory_table(capsys):
    assert main(["memory", "mistral-7b", "--gpu-memory", "24GiB", "--kv-bits", "8", "--advise"]) == 0
    out = capsys.readouterr().out
    assert "KV cache per token" in out and "largest batch" in out and "advice" in out


def test_roofline_json(capsys):
    out = run_json(capsys, "roofline", "llama-2-7b", "--hardware", "A100-80G", "--prompt-len", "2048",
                   "--gen-len", "16", "--batch-size", "2")
    assert out["hardware"]["name"] == "A100-80G"
    prefill = {r["name"]: r for r in out["prefill"]["layers"]}
    assert prefill["q_proj"]["ops"] == 2 * 4096 * 4096 * 2 * 2048
    assert prefill["q_proj"]["weight_bytes"] == 32 * MiB
    assert {"qk_matmul", "softmax", "sv_matmul"} <= set(prefill)
    decode = {r["name"]: r for r in out["decode"]["layers"]}
    assert decode["q_proj"]["bound"] == "memory"
    assert out["e2e"]["ttft_s"] == pytest.approx(out["prefill"]["total"]["time_s"])
    assert out["memory"]["kv_bytes_per_token"] == 512 * KiB


def test_roofline_custom_hardware_and_flash(capsys):
    a = run_json(capsys, "roofline", "llama-3-8b", "--bandwidth", "3.35TB/s", "--flops", "989.4TFLOP/s",
                 "--flash-attention", "--prompt-len", "1024", "--gen-len", "2")
    b = run_json(capsys, "roofline", "llama-3-8b", "--bandwidth", "3.35e12", "--flops", "9.894e14",
                 "--flash-attention", "--prompt-len", "1024", "--gen-len", "2")
    assert a["prefill"]["total"] == b["prefill"]["total"]
    assert a["hardware"]["name"] == "custom" and a["hardware"]["source"] == "user"
    names = [r["name"] for r in a["prefill"]["layers"]]
    assert "flash_attention" in names and "qk_matmul" not in names


def test_roofline_table_and_plot(capsys, tmp_path):
    png = tmp_path / "roof.png"
    assert main(["roofline", "qwen2.5-0.5b", "--hardware", "RTX4090", "--prompt-len", "512", "--gen-len", "8",
                 "--tp", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "TTFT" in out and "attn_all_reduce" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_model_from_config_json_path(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-3-8b"]))
    out = run_json(capsys, "memory", str(tmp_path), "--context-len", "1024")
    assert out["memory"]["kv_bytes_per_token"] == 128 * KiB


@pytest.mark.parametrize("argv,message", [
    (["memory", "llama-9b"], "neither a file, a folder nor a preset"),
    (["memory", "llama-2-7b", "--hardware", "TPUv9"], "unknown hardware 'TPUv9'"),
    (["memory", "llama-2-7b", "--gpu-memory", "80GB/s"], "--gpu-memory: '80GB/s' is not a quantity in B"),
    (["memory", "llama-2-7b", "--gpu-memory", "lots"], "cannot parse quantity 'lots'"),
    (["memory", "llama-2-7b", "--advise"], "--advise needs --gpu-memory or --hardware"),
    (["memory", "llama-2-7b", "--tp", "3"], "does not divide the 32 attention heads"),
    (["memory", "llama-2-7b", "--dtype", "fp12"], "unknown dtype 'fp12'"),
    (["roofline", "llama-2-7b", "--bandwidth", "3.35TB"], "--bandwidth: '3.35TB' is not a quantity in B/s"),
    (["roofline", "llama-2-7b", "--bandwidth", "3.35TB/s"], "needs both --bandwidth and --flops"),
    (["roofline", "llama-2-7b", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_input_gives_clean_error(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
