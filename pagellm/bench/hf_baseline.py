"""`--compare hf`: the same model shape in Hugging Face transformers, in the
same process, on the same requests.

The HF model gets its own random weights: with ``--ignore-eos`` and fixed
output lengths the work is identical whatever the weights. ``generate`` is
timed at the latency batch (TTFT from a one-token call, the rest from a full
one); ``generate_batch`` (transformers' continuous batching) on the
throughput requests. ``generate_batch`` must run outside
``torch.inference_mode``. Any failure is returned as an error string rather
than raised, so that the engine's numbers still come out.
"""
from __future__ import annotations

import gc
import inspect
import json
import time
import traceback
from pathlib import Path

import torch

_DROP_KEYS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures")


def hf_config_dict(model: str) -> dict:
    """The HF config.json dict of a preset name or of an HF folder."""
    from pagellm.model.presets import canonical_preset_name, preset_hf_dict
    if canonical_preset_name(model) is not None:
        return preset_hf_dict(model)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    raise ValueError(f"--compare hf needs a preset name or an HF folder, got {model!r}")


def transformers_version() -> str | None:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None


def build_hf_model(config_dict: dict, dtype: torch.dtype, device: torch.device):
    """``AutoModelForCausalLM.from_config`` initialised directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = {k: v for k, v in config_dict.items() if k not in _DROP_KEYS}
    model_type = d.pop("model_type", "llama")
    d["eos_token_id"] = None                     # nothing stops a request early
    config = AutoConfig.for_model(model_type, **d)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:                        # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    gc_ = getattr(model, "generation_config", None)
    if gc_ is not None:
        gc_.eos_token_id = None
        gc_.pad_token_id = 0
    return model


def free_model(model=None) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generation_config(max_new_tokens: int, min_new_tokens: int | None = None):
    from transformers import GenerationConfig
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    return GenerationConfig(**kwargs)


def hf_generate_latency(model, prompts: list[list[int]], output_len: int, iters: int = 1) -> dict:
    """Batched ``generate`` of equal-length prompts: TTFT (one-token calls) and time per
    output token ((full - TTFT) / (output_len - 1))."""
    device = model.device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, generation_config=_generation_config(2))   # warm-up
        _sync(device)
        ttfts, totals, generated = [], [], None
        for _ in range(iters):
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, generation_config=_generation_config(1))
            _sync(device)
            ttfts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 generation_config=_generation_config(output_len, output_len))
            _sync(device)
            totals.append(time.perf_counter() - t0)
            generated = out.shape[1] - ids.shape[1]
    ttft = min(ttfts)
    total = min(totals)
    tpot = (total - ttft) / (output_len - 1) if output_len > 1 else None
    return {"method": "generate", "batch_size": len(prompts), "output_len": output_len,
            "generated_tokens_per_seq": generated, "iters": iters, "ttft_s": ttft, "e2e_s": total,
            "tpot_s": tpot, "output_tokens_per_s": len(prompts) * output_len / total,
            "decode_tokens_per_s_per_seq": (1 / tpot) if tpot else None}


def hf_generate_batch(model, prompts: list[list[int]], output_len: int) -> dict:
    """transformers' continuous batching on the throughput requests (outside inference mode)."""
    generate_batch = getattr(model, "generate_batch", None)
    if generate_batch is None:
        return {"method": "generate_batch", "error": f"transformers {transformers_version()} has no generate_batch"}
    params = inspect.signature(generate_batch).parameters
    kwargs = {}
    if "progress_bar" in params:
        kwargs["progress_bar"] = False
    device = model.device
    with torch.inference_mode(False):
        _sync(device)
        t0 = time.perf_counter()
        results = generate_batch(inputs=[list(p) for p in prompts],
                                 generation_config=_generation_config(output_len), **kwargs)
        _sync(device)
        wall = time.perf_counter() - t0
    outputs = list(results.values()) if isinstance(results, dict) else list(results or [])
    tokens = [len(getattr(o, "generated_tokens", None) or []) for o in outputs]
    errors = [str(o.error) for o in outputs if getattr(o, "error", None)]
    # Generation only (the manager's set-up and CUDA-graph warm-up excluded), where the outputs say.
    created = [getattr(o, "created_time", None) for o in outputs]
    ends = [(getattr(o, "lifespan", None) or (None, None))[1] for o in outputs]
    span = None
    if outputs and all(isinstance(c, float) for c in created) and all(isinstance(e, float) and e > 0 for e in ends):
        span = max(ends) - min(created)
        if not 0 < span <= wall:
            span = None
    total_out = sum(tokens)
    seconds = span or wall
    return {"method": "generate_batch", "num_requests": len(prompts), "completed": len(outputs),
            "output_tokens": total_out, "expected_output_tokens": len(prompts) * output_len,
            "wall_s": wall, "generation_s": span,
            "output_tokens_per_s": total_out / seconds if seconds else None,
            "output_tokens_per_s_wall": total_out / wall if wall else None,
            "timing": "first request created -> last finished (GenerationOutput timestamps)" if span
            else "whole generate_batch call", "errors": errors[:5]}


def run_hf(kind: str, model_spec: str, dtype: torch.dtype, device: torch.device, prompts: list[list[int]],
           output_len: int, iters: int = 1) -> dict:
    """Build, run ``generate`` (kind='latency') or ``generate_batch`` (kind='throughput'), free.
    Never raises: errors come back under 'error'."""
    out: dict = {"transformers_version": transformers_version()}
    model = None
    try:
        t0 = time.perf_counter()
        model = build_hf_model(hf_config_dict(model_spec), dtype, device)
        out["build_s"] = time.perf_counter() - t0
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if kind == "latency":
            out.update(hf_generate_latency(model, prompts, output_len, iters))
        else:
            out.update(hf_generate_batch(model, prompts, output_len))
        if device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    except Exception as exc:  # report, don't crash the bench
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=8)
    finally:
        model = None
        free_model()
    return out
