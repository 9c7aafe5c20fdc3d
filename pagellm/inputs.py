"""What a request's prompt may be, shared by the offline API (``LLM``) and the server.

A prompt is text or a list of token ids (or a ``TokenizedPrompt``: text already
tokenized elsewhere, as the server does in its worker pool); wherever one prompt or several are
accepted, a ``str`` or a sequence whose first element is an ``int`` is one
prompt and anything else is a sequence of prompts. A conversation becomes
token ids through the tokenizer's chat template, with the generation prompt
appended so that the model's reply comes next; any failure to render is a
``ValueError`` (a 400 in the server, one line on the CLI).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jinja2


@dataclass
class TokenizedPrompt:
    """A text prompt and the token ids the engine's tokenizer made of it."""

    text: str
    token_ids: list[int]


Prompt = str | list[int] | TokenizedPrompt


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt or several, as a list of prompts."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def apply_chat_template(tokenizer, conversation: list[dict],
                        encode: Callable[[str], list[int]] | None = None) -> list[int]:
    """Token ids of ``conversation`` (``{"role": ..., "content": ...}`` dicts) ready for the reply: the
    template's text, then ``encode`` (default: the tokenizer's, adding no special tokens: the template
    writes them), so that an engine can bound the tokenization of an overlong conversation."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages cannot be used: this model has no chat template "
                         "(send plain prompts: LLM.generate, /v1/completions)")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as exc:
        raise ValueError(f"messages could not be rendered by the model's chat template: {exc}") from exc
    return list(encode(text) if encode is not None else tokenizer.encode(text, add_special_tokens=False))
