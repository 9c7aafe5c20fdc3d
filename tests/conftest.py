import pytest

from tiny_models import make_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama (GQA) HF folder with a byte-level BPE tokenizer and chat template."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", num_kv_heads=2)


def zoo_file(name: str):
    """The joined GGUF of a zoo model (the test is skipped when its packages are not installed)."""
    from pagellm.model.zoo import ZOO, ensure_model_file
    model = ZOO[name]
    if not model.is_installed():
        pytest.skip(f"real model packages not installed: {model.pip_command}")
    return ensure_model_file(model.name, progress=False)


@pytest.fixture(scope="session")
def qwen_gguf():
    """The real Qwen2.5-Coder-0.5B GGUF from the zoo packages (skipped when not installed)."""
    return zoo_file("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen15_gguf():
    """The real Qwen2.5-Coder-1.5B GGUF (same tokenizer as the 0.5B; skipped when not installed)."""
    return zoo_file("qwen2.5-coder-1.5b")


@pytest.fixture(scope="session")
def qwen_hf(qwen_gguf):
    """HF transformers' own loading of the same GGUF file (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name,
                                                dtype=torch.float32).eval()
