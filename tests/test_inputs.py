"""Prompt normalisation and chat templating shared by LLM and the server."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagellm.inputs import apply_chat_template, as_prompt_list


@pytest.mark.parametrize("given, expected", [
    ("hi", ["hi"]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]]),
    (["a", [1]], ["a", [1]]), ([], []), (("a", "b"), ["a", "b"])])
def test_one_prompt_or_several(given, expected):
    assert as_prompt_list(given) == expected


def test_chat_template_failures_are_value_errors():
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(None, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(SimpleNamespace(chat_template=None), [{"role": "user", "content": "hi"}])


def test_chat_template_renders_with_the_generation_prompt(tiny_llama):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    conversation = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(tokenizer, conversation) == list(tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False))
    tokenizer.chat_template = "{{ raise_exception('no') }}"
    with pytest.raises(ValueError, match="could not be rendered"):
        apply_chat_template(tokenizer, conversation)
