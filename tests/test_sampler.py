"""The sampler against closed forms and HF's logits processors."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pagellm.engine.sampler import SamplingTensors, apply_penalties, exponential_noise, sample
from pagellm.engine.sequence import Sequence
from pagellm.engine.step import _HEAVIEST_SAMPLING, sampling_metadata
from pagellm.sampling_params import SamplingParams
from pagellm import sizing
from pagellm.sizing import SAMPLER_COPIES


def tensors_for(seqs: list[Sequence], vocab_size: int) -> SamplingTensors:
    """What a worker builds from the sampling rows the engine sends for ``seqs``."""
    return SamplingTensors.from_metadata(sampling_metadata(seqs), vocab_size, torch.device("cpu"))


def make_seqs(n: int, params: SamplingParams, prompt=(1, 2, 3), outputs=()) -> list[Sequence]:
    seqs = []
    for i in range(n):
        seq = Sequence(i, str(i), 0, list(prompt), params, seed=1000 + i, arrival_time=0.0)
        for t in outputs:
            seq.append_token(t)
        seqs.append(seq)
    return seqs


def draw_counts(logits: torch.Tensor, params: SamplingParams, n: int = 20000) -> torch.Tensor:
    seqs = make_seqs(n, params)
    tensors = tensors_for(seqs, logits.shape[-1])
    tokens = sample(logits.expand(n, -1).clone(), tensors).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float() / n


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_noise_is_exponential():
    noise = exponential_noise(torch.tensor([[123, 456], [7, 8]]), 50000)
    assert abs(noise.mean().item() - 1.0) < 0.02
    assert abs(noise.var().item() - 1.0) < 0.05
    assert not torch.equal(noise[0], noise[1])


def test_temperature_sampling_follows_softmax():
    freq = draw_counts(LOGITS, SamplingParams(temperature=0.7))
    expected = torch.softmax(LOGITS[0] / 0.7, -1)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_top_k_keeps_k_tokens_renormalised():
    freq = draw_counts(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    p = torch.softmax(LOGITS[0], -1)[:2]
    torch.testing.assert_close(freq[:2], p / p.sum(), atol=0.015, rtol=0)
    assert freq[2:].sum() == 0


def test_top_p_keeps_smallest_set_reaching_p():
    p = torch.softmax(LOGITS[0], -1)
    top_p = float(p[:2].sum()) + 0.01   # needs the third token to reach p
    freq = draw_counts(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq[:3], p[:3] / p[:3].sum(), atol=0.015, rtol=0)


def test_min_p_drops_tokens_below_fraction_of_max():
    p = torch.softmax(LOGITS[0], -1)
    min_p = float(p[2] / p[0]) - 0.01   # keeps tokens 0..2
    freq = draw_counts(LOGITS, SamplingParams(temperature=1.0, min_p=min_p))
    assert freq[3:].sum() == 0 and (freq[:3] > 0).all()


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    seqs = make_seqs(1, SamplingParams(temperature=0, logprobs=3))
    out = sample(LOGITS.clone(), tensors_for(seqs, 6))
    assert out.token_ids == [0]
    expected = torch.log_softmax(LOGITS[0], -1)
    assert abs(out.logprobs[0] - expected[0].item()) < 1e-6
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1, 2]


def test_repetition_penalty_matches_hf_processor():
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    seqs = make_seqs(1, params, prompt=(0, 4), outputs=(2,))
    logits = torch.tensor([[2.0, 1.0, -0.5, 0.0, -1.0, 3.0]])
    tensors = tensors_for(seqs, 6)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[0, 4, 2]]), logits.clone())
    torch.testing.assert_close(apply_penalties(logits.clone(), tensors), expected)


def test_presence_and_frequency_penalties_closed_form():
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    seqs = make_seqs(1, params, prompt=(1,), outputs=(3, 3, 5))
    logits = torch.zeros(1, 6)
    tensors = tensors_for(seqs, 6)
    expected = torch.tensor([[0, 0, 0, -0.5 - 2 * 0.25, 0, -0.5 - 0.25]])
    torch.testing.assert_close(apply_penalties(logits, tensors), expected)


def test_draw_depends_only_on_seed_and_position():
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    lone = make_seqs(1, params)
    crowd = make_seqs(5, params)[::-1]       # seq with seed 1000 now sits last in a bigger batch
    a = sample(logits.clone(), tensors_for(lone, 1000)).token_ids[0]
    b = sample(logits.expand(5, -1).clone(),
               tensors_for(crowd, 1000)).token_ids[-1]
    assert a == b


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops inside the mode allocate (views of their
    inputs are not allocations) while they are alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()   # one Python object per storage while it lives
            key = storage.data_ptr()
            if key not in inputs and key not in self.sizes:
                self.sizes[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


def heavy_draw(rows: int, vocab: int) -> tuple[list[int], float]:
    """Tokens drawn on the heaviest sampling path, and the peak bytes the sampler allocated."""
    seqs = make_seqs(rows, _HEAVIEST_SAMPLING, prompt=range(40), outputs=range(50, 60))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1))
    with LiveBytes() as live:
        tokens = sample(logits, tensors_for(seqs, vocab)).token_ids
    return tokens, live.peak


def test_heaviest_sampling_path_holds_what_the_sizing_formula_reserves():
    """``pagellm.sizing`` reserves SAMPLER_COPIES fp32 tensors of the rows' logits for the heaviest
    sampling path (the engine profiles its activation peak with it); count them."""
    rows, vocab = 64, 4096
    _, peak = heavy_draw(rows, vocab)
    assert SAMPLER_COPIES * 0.9 <= peak / (rows * vocab * 4) <= SAMPLER_COPIES


def test_sampling_in_chunks_bounds_memory_and_changes_no_token(monkeypatch):
    rows, vocab = 64, 4096
    whole, _ = heavy_draw(rows, vocab)
    monkeypatch.setattr(sizing, "SAMPLER_CHUNK_ELEMENTS", 16 * vocab)    # 4 chunks of 16 rows
    chunked, peak = heavy_draw(rows, vocab)
    assert chunked == whole
    assert peak <= SAMPLER_COPIES * 16 * vocab * 4


class HostReads(TorchDispatchMode):
    """The ops that make a CUDA device wait for the host to read a value:
    ``item`` (``_local_scalar_dense``) and data-dependent shapes (boolean-mask
    indexing included). ``tolist`` reads below the dispatcher, unseen here."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masks = [t for t in tree_flatten(args[1:2])[0] if isinstance(t, torch.Tensor) and t.dtype == torch.bool]
        if name in self.SYNCING or (name in ("index", "index_put", "index_put_") and masks):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_device_sampler_never_reads_on_the_host():
    """Every filter, penalty, a seeded draw and logprobs: no op of ``draw_tokens`` needs the host
    (the tokens stay on the device); ``sample`` reads them once, as lists."""
    from pagellm.engine.sampler import draw_tokens
    seqs = make_seqs(6, _HEAVIEST_SAMPLING, outputs=(4, 4, 7))
    tensors = tensors_for(seqs, 40)
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    with HostReads() as reads:
        draws = draw_tokens(logits.clone(), tensors)
    assert reads.seen == []
    assert draws.token_ids.shape == (6,) and draws.top_ids.shape == (6, 5)
    assert draws.output() == sample(logits.clone(), tensors_for(seqs, 40))
