"""Engine settings, as one dataclass the CLI, the offline API and the server share.

``EngineConfig``'s fields are the one list of engine settings: every command
that builds an engine (generate, chat, serve, bench) gets its flags from
``add_engine_arguments``, which derives them from each field's type, default
and metadata (``help``, ``choices``). A field added here is a flag everywhere
with no other edit. Naming: ``--kebab-case``; a bool defaulting to False is a
``store_true`` flag, one defaulting to True is a ``--no-...`` flag with a
leading ``enable_`` dropped (``enable_prefix_caching`` -> ``--no-prefix-caching``).
Every flag's ``dest`` is its field name, so ``EngineConfig.from_args`` is a
plain copy.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import Field, dataclass, field, fields

import torch

from pagellm.kernels.kv_quant import KV_CACHE_DTYPES, kv_format
from pagellm.quant import check_quantization

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _setting(default, help_text: str, **metadata):
    """A field with its CLI help (and e.g. ``choices``) in its metadata."""
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class EngineConfig:
    """``kv_cache_memory`` sizes the KV pool directly; ``gpu_memory`` is a total
    budget for weights + activations + KV (both absolute, e.g. "20GiB", so two
    engines can share a device); ``num_kv_blocks`` overrides both."""

    model: str = field(metadata={"help": "HF folder, .gguf file or built-in model name"})
    dtype: str = _setting("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    quantization: str | None = _setting(
        None, "how weight matrices are stored: none (dense, in --dtype), int8 (per channel), int4 (groups of 128), "
              "int4-awq (int4 with AWQ scales from a calibration pass), w8a8 (SmoothQuant int8 weights and "
              "activations), gguf (a GGUF file's own blocks), auto (gguf for a GGUF file); default: the stored "
              "format of a checkpoint written by `pagellm quantize`, else none")
    kv_cache_dtype: str = _setting(
        "auto", "how the KV cache stores K and V: auto (the model dtype), int8 or fp8 (e4m3; GPUs of compute "
                "capability 8.9+), each with one fp16 scale per token per KV head", choices=KV_CACHE_DTYPES)
    device: str = _setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    block_size: int = _setting(16, "tokens per KV-cache block, a power of two")
    num_kv_blocks: int | None = _setting(None, "KV pool size in blocks (overrides --kv-cache-memory and "
                                               "--gpu-memory)")
    kv_cache_memory: str | int | None = _setting(None, "KV pool budget, e.g. 4GiB (a speculative draft model's pool, "
                                                        "as many blocks as the target's, is paid from it too)")
    gpu_memory: str | int | None = _setting(None, "total budget for weights + activations + KV, e.g. 40GiB")
    max_model_len: int | None = _setting(None, "longest prompt + output (default: the model's context length)")
    max_num_seqs: int = _setting(256, "sequences scheduled at once")
    max_num_batched_tokens: int | None = _setting(None, "tokens per step (default: 8192 on CUDA, 2048 on CPU)")
    max_prefill_tokens_with_decodes: int | None = _setting(
        None, "prompt tokens a step may take while other sequences decode (they all wait for the step, so this "
              "bounds their inter-token latency; with nothing decoding the whole --max-num-batched-tokens goes to "
              "prompts); default: 1024 on CUDA (measured on an H200: README, Performance), no cap on CPU")
    enable_prefix_caching: bool = _setting(True, "reuse the KV blocks of prompt prefixes already computed")
    cpu_offload_memory: str | int | None = _setting(
        None, "keep this much of the decoder layers' weights in host memory, streamed to the device one layer "
              "ahead of use, e.g. 30GiB; auto: the least that lets --gpu-memory hold the rest")
    disk_offload: str | None = _setting(None, "folder for the offloaded layers' weights: read from a "
                                              "safetensors file there through mmap instead of held in memory")
    swap_space: str | int | None = _setting(
        None, "host-memory KV pool, e.g. 16GiB: preempted sequences swap out to it and full blocks evicted "
              "from the prefix cache spill to it (restored on a later hit)")
    swap_min_tokens: int = _setting(512, "a preempted sequence with at least this many computed tokens swaps "
                                         "to the host pool (when it has room), a shorter one is recomputed")
    attention_backend: str = _setting("auto", "attention kernels", choices=("auto", "torch", "triton"))
    enforce_eager: bool = _setting(False, "no CUDA graphs")
    async_scheduling: bool = _setting(
        True, "overlap the host's work with the device: step N+1 is scheduled and launched while step N runs, "
              "its sampled tokens fed from the device (one process only; steps with structured outputs, "
              "penalties, prompt log-probs or speculative decoding run synchronously)")
    cuda_graph_max_tokens: int | None = _setting(
        None, "steps of up to this many tokens with multi-token queries (speculative verification, prefill "
              "chunks beside decodes) replay CUDA graphs too, padded to the next captured size; default: the "
              "largest step made while sequences decode (--max-prefill-tokens-with-decodes + --max-num-seqs; "
              "512 without that cap); 0: decode only")
    random_weights: bool = _setting(False, "real shapes, random weights; MODEL may name a preset (benchmarks)")
    seed: int = _setting(0, "seeds the random weights and the sampling of requests that give no seed")
    tensor_parallel_size: int = _setting(1, "processes (GPUs) that split each layer (Megatron-style)")
    pipeline_parallel_size: int = _setting(1, "processes (GPUs) that each run a contiguous range of layers")
    distributed_timeout: float = _setting(120.0, "seconds a collective between parallel ranks may wait "
                                                 "before the engine fails (a dead or stuck rank)")
    speculative_method: str | None = _setting(
        None, "speculative decoding: ngram (prompt lookup in the sequence's own tokens) or draft (needs "
              "--speculative-model); default: draft when --speculative-model is given, else off",
        choices=("ngram", "draft"))
    speculative_model: str | None = _setting(None, "draft model (HF folder, .gguf file or built-in name) sharing "
                                                   "the target's tokenizer")
    speculative_quantization: str | None = _setting(
        None, "how the draft model's weight matrices are stored (as --quantization; default: the target's). A "
              "cheaper draft format is lossless: the target verifies every proposal")
    num_speculative_tokens: int = _setting(4, "tokens proposed per decoding sequence and step")
    speculative_max_batch: int = _setting(32, "no speculation while more sequences than this run; below, k is "
                                              "lowered so that a step verifies at most 4x this many tokens")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        """The config of a namespace parsed by a parser given ``add_engine_arguments``."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        for quantization in (self.quantization, self.speculative_quantization):
            check_quantization(quantization)    # a clear error now rather than after loading
        if self.disk_offload is not None and self.cpu_offload_memory is None:
            raise ValueError("disk_offload holds the layers cpu_offload_memory offloads: set cpu_offload_memory too")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.speculative_method is None and self.speculative_model is not None:
            self.speculative_method = "draft"
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(f"speculative_method must be ngram or draft, got {self.speculative_method!r}")
        if (self.speculative_method == "draft") != (self.speculative_model is not None):
            raise ValueError("speculative_model is needed by, and only by, speculative_method='draft'")
        if self.speculative_quantization is not None and self.speculative_model is None:
            raise ValueError("speculative_quantization is the draft model's format: it needs speculative_model")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.speculative_method is not None and self.world_size > 1:
            raise ValueError("speculative decoding runs on one process: it is not supported yet with "
                             "tensor_parallel_size or pipeline_parallel_size > 1")
        kv_format(self.kv_cache_dtype)

    @property
    def world_size(self) -> int:
        """Processes the engine runs on: tensor x pipeline parallel ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        return _DTYPES[self.dtype]

    @property
    def batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.torch_device.type == "cuda" else 2048

    @property
    def prefill_tokens_with_decodes(self) -> int | None:
        if self.max_prefill_tokens_with_decodes is not None:
            return self.max_prefill_tokens_with_decodes
        return 1024 if self.torch_device.type == "cuda" else None

    @property
    def graph_tokens(self) -> int:
        """Tokens of the largest varlen CUDA graph: the setting, else every step made while
        sequences decode (at most the cap on prompt tokens plus one token per sequence), so
        none of the mixed steps that bound the decodes' inter-token latency runs eagerly (an
        eager Llama-3-8B forward is ~40 ms of host work on the H200's host)."""
        if self.cuda_graph_max_tokens is not None:
            wanted = self.cuda_graph_max_tokens
        else:
            cap = self.prefill_tokens_with_decodes
            wanted = cap + self.max_num_seqs if cap is not None else 512
        return min(wanted, self.batched_tokens)


def add_engine_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """One flag per EngineConfig field; MODEL is a positional, optional when ``default_model`` is given."""
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        if f.name == "model":
            _add_model(parser, f.metadata["help"], default_model)
        elif hints[f.name] is bool:
            _add_switch(parser, f)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(f.name, hints[f.name]),
                                default=f.default, choices=f.metadata.get("choices"), help=f.metadata["help"])


def _add_model(parser: argparse.ArgumentParser, help_text: str, default_model: str | None) -> None:
    if default_model is None:
        parser.add_argument("model", help=help_text)
    else:
        parser.add_argument("model", nargs="?", default=default_model,
                            help=help_text + (f" (default {default_model})" if default_model else ""))


def _add_switch(parser: argparse.ArgumentParser, f: Field) -> None:
    """False by default: ``--name`` turns it on; True by default: ``--no-name`` turns it off."""
    if f.default:
        parser.add_argument("--no-" + f.name.removeprefix("enable_").replace("_", "-"), dest=f.name,
                            action="store_false", help="turn off: " + f.metadata["help"])
    else:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                            help=f.metadata["help"])


def _flag_type(name: str, hint) -> type:
    """str where a string is accepted (quantities such as '4GiB' are parsed later), else the one other type."""
    members = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    if str in members:
        return str
    if len(members) != 1:
        raise TypeError(f"EngineConfig.{name}: no CLI type for {hint}")
    return members[0]
