"""Structured outputs: the allowed-token mask in the sampler against closed forms, and
generations constrained by a regex, a choice or a JSON schema, checked by ``re``, set
membership and jsonschema (and, with the real model, a JSON schema)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from pagellm import LLM, SamplingParams, StructuredOutputsParams
from pagellm.engine.sampler import SamplingMetadata, SamplingTensors, allowed_tokens, sample
from pagellm.engine.step import sampling_metadata
from test_sampler import make_seqs

V = 70


def test_allowed_tokens_unpacks_bit_j_of_word_i_as_token_32i_plus_j():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31, (3, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    expected = [[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(V)] for r in range(3)]
    assert allowed_tokens(bitmask, V).tolist() == expected


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
                                    SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.2, logprobs=2)])
def test_mask_draws_only_allowed_tokens_and_all_ones_changes_nothing(params):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, V, generator=gen)
    seqs = make_seqs(64, params, outputs=(4, 5))
    meta = sampling_metadata(seqs)
    plain = sample(logits.clone(), SamplingTensors.from_metadata(meta, V, torch.device("cpu")))
    ones = SamplingMetadata(**{**vars(meta), "token_bitmask": torch.full((64, 3), -1, dtype=torch.int32)})
    assert sample(logits.clone(), SamplingTensors.from_metadata(ones, V, torch.device("cpu"))) == plain
    allowed = torch.zeros(64, 96, dtype=torch.bool)
    for row in range(64):
        allowed[row, torch.randperm(V, generator=gen)[:1 + row % 4]] = True
    words = (allowed.view(64, 3, 32).long() << torch.arange(32)).sum(-1)
    masked = SamplingMetadata(**{**vars(meta), "token_bitmask": words.to(torch.int64).to(torch.int32)})
    drawn = sample(logits.clone(), SamplingTensors.from_metadata(masked, V, torch.device("cpu")))
    assert all(allowed[row, token] for row, token in enumerate(drawn.token_ids))
    if params.greedy:   # the best allowed token
        best = logits.masked_fill(~allowed[:, :V], float("-inf")).argmax(-1).tolist()
        assert drawn.token_ids == best


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_kv_blocks=128, max_model_len=128)


def constrained(spec: StructuredOutputsParams, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=60, structured_outputs=spec, **kwargs)


def texts(llm: LLM, params: SamplingParams, prompts=("Hello world", "The quick brown fox")) -> list[str]:
    return [c.text for o in llm.generate(list(prompts), params, use_tqdm=False) for c in o.outputs]


def test_regex_and_choice_constrain_a_random_model(llm):
    for text in texts(llm, constrained(StructuredOutputsParams(regex=r"[ab]{2,4}c(x|yz)"), n=3, seed=0)):
        assert re.fullmatch(r"[ab]{2,4}c(x|yz)", text)
    choices = ["red", "amber", "green light", 'say "hi"']
    outputs = texts(llm, constrained(StructuredOutputsParams(choice=choices), n=4, seed=1, temperature=1.5))
    assert set(outputs) <= set(choices) and len(set(outputs)) > 1


def test_json_schema_constrains_a_random_model(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "bb", "ccc"]},
                                               "tags": {"type": "array", "items": {"enum": ["x", "y"]},
                                                        "maxItems": 2}},
              "required": ["ok", "kind", "tags"], "additionalProperties": False}
    for text in texts(llm, constrained(StructuredOutputsParams(json=schema), n=3, seed=2)):
        jsonschema.validate(json.loads(text), schema)


def test_grammar_errors_name_the_field(llm):
    with pytest.raises(ValueError, match="^structured_outputs could not be compiled: .*parenthesis"):
        llm.generate("hi", constrained(StructuredOutputsParams(regex="(ab")), use_tqdm=False)
    with pytest.raises(ValueError, match="^structured_outputs must set exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_real_model_answers_a_json_schema(qwen_gguf):
    llm = LLM(str(qwen_gguf), dtype="float32", kv_cache_memory="64MiB", max_model_len=256)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    person = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, structured_outputs=(
        StructuredOutputsParams(json=schema))), use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(person.text), schema)
    assert person.finish_reason == "stop"
