"""Engine behaviour on a tiny random Llama: stopping, n, seeds, logprobs,
streaming, aborts and input validation. References are HF transformers on the
same weights, the tokenizer itself, or closed forms."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def greedy(max_tokens=16, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_text_prompt_uses_tokenizer_and_detokenizes(llm):
    out = llm.generate("Hello world!", greedy())[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode("Hello world!")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 16


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate([[5, 6, 7, 8]], greedy(24))[0].outputs[0]
    stop_token = base.token_ids[5]
    first = base.token_ids.index(stop_token)
    out = llm.generate([[5, 6, 7, 8]], greedy(24, stop_token_ids=[stop_token]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)

    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("generated text has no usable stop string")
    cut = llm.generate([[5, 6, 7, 8]], greedy(24, stop=[stop]))[0].outputs[0]
    assert cut.text == text[:text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate([[5, 6, 7, 8]], greedy(24, stop=stop, include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8,
                                                   stop_token_ids=[], logprobs=None))[0].outputs[0]
    if eos not in out.token_ids:
        # Make EOS the greedy choice: the engine must stop on it, HF's way.
        llm.engine.eos_token_ids.add(out.token_ids[2])
        try:
            stopped = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
            ignored = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8,
                                                               ignore_eos=True))[0].outputs[0]
        finally:
            llm.engine.eos_token_ids.discard(out.token_ids[2])
        assert stopped.token_ids == out.token_ids[:3] and stopped.finish_reason == "stop"
        assert ignored.token_ids == out.token_ids and ignored.finish_reason == "length"


def test_seeded_sampling_is_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=42, ignore_eos=True)
    alone = llm.generate([[9, 10, 11]], params)[0].outputs[0].token_ids
    crowd = llm.generate([[1, 2], [9, 10, 11], list(range(3, 30))],
                         [SamplingParams(temperature=1.0, max_tokens=20, seed=1), params, greedy()])
    assert crowd[1].outputs[0].token_ids == alone
    other = llm.generate([[9, 10, 11]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=43,
                                                       ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_n_samples_are_independent_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    out = llm.generate([[4, 5, 6]], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    samples = [tuple(o.token_ids) for o in out.outputs]
    assert len(set(samples)) == 3
    again = llm.generate([[4, 5, 6]], params)[0]
    assert [tuple(o.token_ids) for o in again.outputs] == samples


def test_logprobs_match_hf_log_softmax(llm, hf):
    prompt = [7, 8, 9, 10]
    out = llm.generate([prompt], greedy(4, logprobs=2))[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        expected = reference[len(prompt) - 1 + i]
        assert abs(entry[token].logprob - expected[token].item()) < 1e-4
        assert len(entry) >= 2
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))) < 1e-4


def test_stream_yields_growing_prefixes_ending_in_generate_result(llm):
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    params = SamplingParams(temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
    expected = [o.outputs[0] for o in llm.generate(prompts, params)]
    seen: dict[str, list] = {}
    for output in llm.stream(prompts, params):
        history = seen.setdefault(output.request_id, [])
        if history:
            assert output.outputs[0].token_ids[:len(history[-1])] == history[-1]
        history.append(list(output.outputs[0].token_ids))
    finals = [h[-1] for h in seen.values()]
    assert finals == [e.token_ids for e in expected]
    assert all(len(h) == 10 for h in seen.values())    # one update per generated token


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("abort-me", list(range(3, 40)), greedy(50))
    engine.add_request("keep", [3, 4], greedy(3))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request("abort-me")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_chat_applies_template(llm):
    tok = llm.get_tokenizer()
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(4))[0]
    expected = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=False)
    assert tok.decode(out.prompt_token_ids) == expected


@pytest.mark.parametrize("prompt, params, field", [
    ("", None, "prompt"),
    ([], None, "prompt_token_ids"),
    ([1, 10_000], None, "prompt_token_ids"),
    ([1, -1], None, "prompt_token_ids"),
    ([1] * 200, None, "max_model_len"),
    ([1] * 100, dict(max_tokens=50), "max_tokens"),
])
def test_bad_requests_raise_value_error_naming_the_field(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], SamplingParams(**(params or {})))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"), (dict(n=0), "n"),
    (dict(top_k=0), "top_k"),
])
def test_bad_sampling_params_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_request_larger_than_pool_is_rejected(tiny_llama):
    small = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.generate([[1] * 10], SamplingParams(max_tokens=10))


@pytest.mark.parametrize("text", ["héllo wörld 你好 🎉🚀 ünïcödé", "emoji 👩‍👩‍👧 and 日本語テキスト"])
def test_incremental_detokenizer_handles_multibyte_characters(llm, text):
    tok = llm.get_tokenizer()
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "test text should split characters across tokens"
    detok = IncrementalDetokenizer(tok, [5, 6])
    pieces = []
    for token in ids:
        before = detok.text
        detok.push(token)
        pieces.append(detok.text[len(before):])
    assert detok.text == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)


def test_max_model_len_beyond_the_model_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="max_model_len 10000 exceeds the model's context length 256"):
        LLM(str(tiny_llama), dtype="float32", max_model_len=10_000)
