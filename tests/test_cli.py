"""`pagellm generate` and `pagellm chat` end to end on a tiny model."""
from __future__ import annotations

import io

from pagellm import LLM, SamplingParams
from pagellm.cli import main


def test_generate_prints_the_completion(tiny_llama, capsys):
    expected = LLM(str(tiny_llama), dtype="float32").generate(
        "Hello world", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    assert main(["generate", str(tiny_llama), "--dtype", "float32", "--prompt", "Hello world",
                 "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert expected in out and "finish_reason=" in out


def test_chat_streams_replies_until_an_empty_line(tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\nand again\n\n"))
    assert main(["chat", str(tiny_llama), "--dtype", "float32", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.count("> ") == 3


def test_bad_flag_value_is_a_clean_error(tiny_llama, capsys):
    assert main(["generate", str(tiny_llama), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
