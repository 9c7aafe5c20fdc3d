"""Built-in model presets: the Hugging Face ``config.json`` of well-known models.

The dicts below are transcriptions of the published ``config.json`` files
(base checkpoints unless the name says otherwise), so that the analyzer can
size them and the engine can build random-weight models of the real shapes
without downloading anything. Keep them faithful: every shape, rope, window,
tying and token-id field is as published; bookkeeping fields we never read
(``initializer_range``, ``transformers_version``) are kept for recognisability.

``load_preset(name)`` accepts the preset name (case-insensitive) or the Hub
repository id it was transcribed from (``meta-llama/Llama-2-7b-hf``).
"""
from __future__ import annotations

import copy
from typing import Any

from pagellm.model.config import ModelConfig

_LLAMA2_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}

_LLAMA3_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Llama 3.1 extends the context to 128k with the "llama3" rope scaling.
_LLAMA31_COMMON: dict[str, Any] = {
    **_LLAMA3_COMMON,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "transformers_version": "4.43.0.dev0",
}

_QWEN2_COMMON: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "model_type": "qwen2",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_sliding_window": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": {
        **_LLAMA2_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "transformers_version": "4.31.0.dev0",
    },
    # meta-llama/Llama-2-13b-hf
    "llama-2-13b": {
        **_LLAMA2_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
        "transformers_version": "4.32.0.dev0",
    },
    # meta-llama/Llama-2-70b-hf (grouped-query attention, 8 KV heads)
    "llama-2-70b": {
        **_LLAMA2_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "transformers_version": "4.32.0.dev0",
    },
    # meta-llama/Meta-Llama-3-8B (published with "rope_scaling": null)
    "llama-3-8b": {
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
    },
    # meta-llama/Meta-Llama-3-70B
    "llama-3-70b": {
        **_LLAMA3_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
    },
    # meta-llama/Llama-3.1-8B (llama3 rope scaling, 128k context)
    "llama-3.1-8b": {
        **_LLAMA31_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
    },
    # meta-llama/Llama-3.1-70B
    "llama-3.1-70b": {
        **_LLAMA31_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
    },
    # meta-llama/Llama-3.2-1B (tied embeddings, llama3 rope scaling with factor 32)
    "llama-3.2-1b": {
        **_LLAMA31_COMMON,
        "head_dim": 64,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "rope_scaling": {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "transformers_version": "4.45.0.dev0",
    },
    # mistralai/Mistral-7B-v0.1 (sliding-window attention over 4096 tokens)
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    # Qwen/Qwen2.5-0.5B (tied embeddings)
    "qwen2.5-0.5b": {
        **_QWEN2_COMMON,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_mrope": False,
        "vocab_size": 151936,
    },
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": {
        **_QWEN2_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "use_mrope": False,
        "vocab_size": 152064,
    },
    # Qwen/Qwen2.5-72B
    "qwen2.5-72b": {
        **_QWEN2_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "max_position_embeddings": 131072,
        "max_window_layers": 80,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "transformers_version": "4.43.1",
        "vocab_size": 152064,
    },
    # Qwen/Qwen2.5-Coder-0.5B-Instruct (the project's default model)
    "qwen2.5-coder-0.5b": {
        **_QWEN2_COMMON,
        "eos_token_id": 151645,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "transformers_version": "4.43.1",
        "vocab_size": 151936,
    },
    # Qwen/Qwen2.5-Coder-1.5B-Instruct
    "qwen2.5-coder-1.5b": {
        **_QWEN2_COMMON,
        "eos_token_id": 151645,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "transformers_version": "4.43.1",
        "vocab_size": 151936,
    },
}

# Hub repository each preset was transcribed from (also accepted as a name).
HF_REPOS: dict[str, str] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}

_ALIASES: dict[str, str] = {
    "mistral-7b-v0.1": "mistral-7b",
    **{repo.lower(): name for name, repo in HF_REPOS.items()},
    **{repo.split("/", 1)[1].lower(): name for name, repo in HF_REPOS.items()},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def canonical_preset_name(name: str) -> str | None:
    """The preset key for ``name`` (case-insensitive, Hub ids accepted), or None."""
    key = name.strip().lower()
    if key in PRESETS:
        return key
    return _ALIASES.get(key)


def preset_hf_dict(name: str) -> dict[str, Any]:
    """A deep copy of the preset's config.json dict."""
    key = canonical_preset_name(name)
    if key is None:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


def load_preset(name: str) -> ModelConfig:
    """Build the ModelConfig of a preset; ``name`` is case-insensitive."""
    hf = preset_hf_dict(name)
    return ModelConfig.from_hf_dict(hf, name=canonical_preset_name(name) or name)
