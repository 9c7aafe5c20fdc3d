"""Every EngineConfig field is a flag of every command that builds an engine, derived from the dataclass."""
from __future__ import annotations

import argparse
from dataclasses import asdict, fields

import pytest

from pagellm.cli import build_parser, main
from pagellm.config import EngineConfig

ENGINE_COMMANDS = [("generate",), ("chat",), ("serve",), ("bench", "throughput"), ("bench", "latency"),
                   ("bench", "prefill")]
REQUIRED = {("generate",): ["--prompt", "x"]}
# Defaults a command sets on purpose: bench latency/prefill size max_num_seqs from --batch-size.
OWN_DEFAULTS = {("bench", "latency"): {"max_num_seqs": None}, ("bench", "prefill"): {"max_num_seqs": None}}


def _subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


@pytest.mark.parametrize("path", ENGINE_COMMANDS, ids=" ".join)
def test_every_field_has_a_flag_and_its_default(path):
    flags = {a.dest: a.option_strings for a in _subparser(path)._actions}
    for f in fields(EngineConfig):
        assert f.name in flags, f"{' '.join(path)} has no flag for EngineConfig.{f.name}"
        assert bool(flags[f.name]) == (f.name != "model"), f"{f.name}: model is the positional, the rest flags"
    args = build_parser().parse_args([*path, "some-model", *REQUIRED.get(path, [])])
    parsed = {f.name: getattr(args, f.name) for f in fields(EngineConfig)}
    assert parsed == asdict(EngineConfig(model="some-model")) | OWN_DEFAULTS.get(path, {})


def test_flags_are_named_from_the_fields():
    args = build_parser().parse_args(
        ["generate", "m", "--prompt", "x", "--seed", "5", "--no-prefix-caching", "--random-weights",
         "--kv-cache-memory", "4GiB", "--max-num-batched-tokens", "64", "--attention-backend", "torch"])
    assert EngineConfig.from_args(args) == EngineConfig(
        model="m", seed=5, enable_prefix_caching=False, random_weights=True, kv_cache_memory="4GiB",
        max_num_batched_tokens=64, attention_backend="torch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--attention-backend", "cuda"])


def test_serve_needs_a_model_generate_has_a_default():
    assert build_parser().parse_args(["generate", "--prompt", "x"]).model
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])


def _generate(tiny_llama, capsys, *extra: str) -> str:
    assert main(["generate", str(tiny_llama), "--dtype", "float32", "--prompt", "Hello", "--max-tokens", "8",
                 "--temperature", "1", *extra]) == 0
    return capsys.readouterr().out


def test_the_engine_seed_makes_sampling_repeatable(tiny_llama, capsys):
    first = _generate(tiny_llama, capsys, "--seed", "3")
    assert _generate(tiny_llama, capsys, "--seed", "3") == first
    assert _generate(tiny_llama, capsys, "--seed", "4") != first


def test_varlen_graphs_cover_the_steps_made_while_sequences_decode():
    """Closed form of ``graph_tokens``: the prompt-token cap beside decodes plus one token per
    sequence (the scheduler's bound, checked in test_block_manager), within the step budget."""
    cuda = dict(model="m", device="cuda")
    assert EngineConfig(**cuda).prefill_tokens_with_decodes == 1024
    assert EngineConfig(**cuda).graph_tokens == 1024 + 256
    assert EngineConfig(**cuda, max_prefill_tokens_with_decodes=300, max_num_seqs=20).graph_tokens == 320
    assert EngineConfig(**cuda, max_num_seqs=10_000).graph_tokens == 8192             # the step budget
    assert EngineConfig(**cuda, cuda_graph_max_tokens=0).graph_tokens == 0
    assert EngineConfig(**cuda, cuda_graph_max_tokens=700).graph_tokens == 700
    assert EngineConfig(model="m", device="cpu").graph_tokens == 512                   # no cap on the CPU
