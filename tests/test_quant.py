"""Quantized weights: formats against references (gguf's own numpy
dequantizer, closed-form error bounds), the engine's memory against the
analyzer, and greedy output of quantized layers against dense ones."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from pagellm import LLM, SamplingParams
from pagellm.kernels import torch_quant
from pagellm.kernels.quant_ops import gguf_linear
from pagellm.model.model_spec import load_model_config
from pagellm.sizing import Precision, weights_bytes

SERVED = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K)


# --------------------------------------------------------------------------- formats

def test_int8_round_trip_error_is_half_a_step_per_row():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, scale = torch_quant.quantize_int8(w)
    error = (torch_quant.dequantize_int8(q, scale, torch.float32) - w).abs()
    assert q.dtype == torch.int8 and (error <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))   # the range is used


def test_int4_pack_round_trip_and_error_is_half_a_step_per_group():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 256), dtype=torch.uint8, generator=gen)
    assert torch.equal(torch_quant.unpack_int4(torch_quant.pack_int4(codes)), codes)
    w = torch.randn(32, 512, generator=gen) + 0.5          # off-centre groups need the zero point
    packed, scale, zero = torch_quant.quantize_int4(w, 128)
    assert packed.shape == (32, 256) and scale.shape == zero.shape == (32, 4)
    served = torch_quant.dequantize_int4(packed, scale, zero, torch.float32)
    error = (served - w).abs().reshape(32, 4, 128)
    assert (error <= scale[..., None] / 2 + 1e-6).all()
    assert torch.equal(torch_quant.int4_round_trip(w, 128), served)     # what AWQ's search scores


def test_int4_words_hold_pairs_of_adjacent_weights():
    """The layout the Triton GEMV reads: little-endian int32 words; nibbles i and i + 4 of word w of a run of
    128 weights (the two 16-bit halves' low nibbles after a shift by 4 i) are weights 32 i + 2 w and
    32 i + 2 w + 1 of the run."""
    codes = torch.randint(0, 16, (3, 384), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    words = torch_quant.pack_int4(codes).view(torch.int32).long() & 0xFFFFFFFF
    run, w, i, half = torch.meshgrid(torch.arange(3), torch.arange(16), torch.arange(4), torch.arange(2),
                                     indexing="ij")
    nibbles = (words.reshape(3, 3, 16)[:, run, w] >> (4 * i + 16 * half)) & 0xF      # [row, run, w, i, half]
    expected = codes.reshape(3, 3, 128)[:, run, 32 * i + 2 * w + half]
    assert torch.equal(nibbles, expected.long())


def test_reference_matmuls_are_dequantize_then_linear():
    gen = torch.Generator().manual_seed(2)
    x, w, bias = torch.randn(3, 256, generator=gen), torch.randn(48, 256, generator=gen), torch.randn(48)
    q, scale = torch_quant.quantize_int8(w)
    expected = x @ torch_quant.dequantize_int8(q, scale, torch.float32).t() + bias
    torch.testing.assert_close(torch_quant.int8_linear(x, q, scale, bias), expected)
    packed, s4, z4 = torch_quant.quantize_int4(w, 128)
    expected = x @ torch_quant.dequantize_int4(packed, s4, z4, torch.float32).t() + bias
    torch.testing.assert_close(torch_quant.int4_linear(x, packed, s4, z4, bias), expected)


def _blocks(qtype: GGMLQuantizationType, rows: int, cols: int, gen: np.random.Generator) -> np.ndarray:
    """Valid blocks of ``qtype``: quantized by gguf where it can, else random bytes with sane fp16 scales."""
    if qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0):
        return quantize(gen.standard_normal((rows, cols)).astype(np.float32), qtype)
    block, nbytes = {GGMLQuantizationType.Q4_K: (256, 144), GGMLQuantizationType.Q6_K: (256, 210)}[qtype]
    data = gen.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scales = gen.uniform(1e-3, 1e-2, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.Q4_K:
        data[..., 0:4] = scales.reshape(rows, cols // block, 4)          # d, dmin
    else:
        data[..., 208:210] = scales[..., :2]                              # d
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", SERVED, ids=lambda t: t.name)
def test_gguf_dequantizers_match_the_gguf_package(qtype):
    data = _blocks(qtype, 6, 512, np.random.default_rng(3))
    expected = dequantize(data, qtype)
    got = torch_quant.dequantize_gguf(torch.from_numpy(data), qtype, torch.float32)
    np.testing.assert_array_equal(got.numpy(), expected.reshape(got.shape))


def test_gguf_linear_in_row_slices_is_the_dense_product(monkeypatch):
    qtype = GGMLQuantizationType.Q5_0
    data = torch.from_numpy(_blocks(qtype, 40, 256, np.random.default_rng(4)))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    dense = (x.double() @ torch_quant.dequantize_gguf(data, qtype, torch.float64).t()).float()
    monkeypatch.setattr("pagellm.kernels.quant_ops.ROWS_ELEMENTS", 7 * 256)   # 6 slices, the last one short
    torch.testing.assert_close(gguf_linear(x, data, qtype), dense, rtol=1e-5, atol=1e-4)   # fp32 sums of 256


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_formats_dequantized_in_row_slices_are_the_dense_product(monkeypatch, fmt):
    """The path above ``FUSED_MAX_ROWS`` rows (and on the CPU in fp32) dequantizes a slice of output rows at
    a time; the product equals float64 math over the whole dequantized matrix, bias included."""
    from pagellm.kernels import quant_ops
    gen = torch.Generator().manual_seed(6)
    w, x, bias = torch.randn(40, 256, generator=gen), torch.randn(3, 256, generator=gen), torch.randn(40, generator=gen)
    if fmt == "int8":
        q, scale = torch_quant.quantize_int8(w)
        stored, linear = torch_quant.dequantize_int8(q, scale, torch.float64), lambda: quant_ops.int8_linear(x, q, scale, bias)
    else:
        packed, scale, zero = torch_quant.quantize_int4(w, 128)
        stored = torch_quant.dequantize_int4(packed, scale, zero, torch.float64)
        linear = lambda: quant_ops.int4_linear(x, packed, scale, zero, bias)   # noqa: E731
    dense = (x.double() @ stored.t() + bias.double()).float()
    monkeypatch.setattr(quant_ops, "DEQUANT_ELEMENTS", 7 * 256)   # 6 slices, the last one short
    torch.testing.assert_close(linear(), dense, rtol=1e-5, atol=1e-4)


def test_q4_k_groups_are_the_int4pack_form_of_the_gguf_values():
    """Q4_K as int4pack wants it, ``(code - 8) * scale + zero`` per group of 32: the gguf package's values, exactly."""
    data = _blocks(GGMLQuantizationType.Q4_K, 6, 512, np.random.default_rng(5))
    codes, scale, zero = torch_quant.gguf_int4_groups(torch.from_numpy(data))
    values = (codes.float() - 8).reshape(6, 16, 32) * scale[..., None] + zero[..., None]
    np.testing.assert_allclose(values.reshape(6, 512).numpy(), dequantize(data, GGMLQuantizationType.Q4_K),
                               rtol=0, atol=1e-6)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15


@pytest.mark.parametrize("qtype", SERVED, ids=lambda t: t.name)
def test_cpu_packed_gguf_matmul_is_the_dequantized_product(qtype, monkeypatch):
    """``pack_gguf_for_cpu`` + ``gguf_cpu_linear`` (in row slices: 3 of 64 rows and a short one) against
    ``x @ W^T`` in float64 with W from gguf's own dequantizer: Q4_K keeps its codes, so only bf16
    rounding separates them; the int8 requantization adds at most half a step per weight."""
    from pagellm.kernels import quant_ops
    monkeypatch.setattr(quant_ops, "ROWS_ELEMENTS", 64 * 2 * GGML_QUANT_SIZES[qtype][1] * 2)
    data = _blocks(qtype, 208, 512, np.random.default_rng(6))
    w = torch.from_numpy(dequantize(data, qtype)).double()
    qweight, scales = quant_ops.pack_gguf_for_cpu(torch.from_numpy(data), qtype, quant_ops.packs_as_int4(qtype, 208))
    assert qweight.dtype == (torch.uint8 if qtype == GGMLQuantizationType.Q4_K else torch.int8)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7)).bfloat16()
    got = quant_ops.gguf_cpu_linear(x, qweight, scales).double()
    expected = x.double() @ w.t()
    bound = x.double().abs().sum(dim=1, keepdim=True) * w.abs().amax(dim=1)[None, :]   # |x| |w|_max per entry
    if qtype != GGMLQuantizationType.Q4_K:      # requantized: within half a step (|w|_max / 254) per weight
        step = scales.double()[:, None]
        assert ((qweight.double() * step - w).abs() <= step / 2 + 1e-9).all() and (step[:, 0] <= w.abs().amax(1) / 126).all()
    assert ((got - expected).abs() <= bound * (1 / 254 + 2 ** -7)).all()
    assert (got - expected).abs().mean() < 0.01 * expected.abs().mean()


@pytest.mark.parametrize("types, rows", [(("Q4_K", "Q4_K", "Q6_K"), (64, 32, 48)),
                                         (("Q5_0", "Q8_0", "Q4_K"), (40, 24, 8))])
def test_cpu_packed_gguf_layer_stacks_shards_packed_alike(types, rows):
    """A merged layer (q|k|v-like shards of mixed types) repacked for the CPU: shards packed alike share one
    matmul (int4 needs the rows before a shard to fill 64-row tiles; 8 Q4_K rows go to int8), and the layer
    computes ``x @ W^T + b`` with W from gguf's dequantizer."""
    from pagellm.model.gguf_loader import RawTensor
    from pagellm.model.layers import Linear
    from pagellm.quant.methods import GGUFLinearMethod
    qtypes = [GGMLQuantizationType[t] for t in types]
    layer = Linear(512, list(rows), bias=True, method=GGUFLinearMethod(qtypes, cpu_packed=True),
                   params_dtype=torch.float32)
    gen = np.random.default_rng(8)
    shards = [_blocks(qtype, n, 512, gen) for qtype, n in zip(qtypes, rows)]
    for i, (qtype, data) in enumerate(zip(qtypes, shards)):
        layer.weight_loaders["weight"](RawTensor("w", "w", qtype, (rows[i], 512), data), i)
    bias = torch.randn(sum(rows))
    layer.weight_loaders["bias"](bias, None)
    kinds = [layer.method.groups[0].kind, *(g.kind for g in layer.method.groups[1:])]
    assert kinds == (["int4", "int8"] if types[0] == "Q4_K" else ["int8"])
    w = torch.cat([torch.from_numpy(dequantize(d, t)) for d, t in zip(shards, qtypes)]).double()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(9))
    expected = x.bfloat16().double() @ w.t() + bias.double()
    got = layer(x).double()
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.01 * (expected - bias.double()).abs().mean()


def test_real_gguf_tensors_dequantize_exactly(qwen_gguf):
    """Every served type in the real file (the 0.5B mixes all four), a few rows each."""
    seen = {}
    for tensor in GGUFReader(qwen_gguf).tensors:
        if tensor.tensor_type in SERVED and tensor.tensor_type not in seen:
            seen[tensor.tensor_type] = np.asarray(tensor.data)[:8]
    assert set(seen) == set(SERVED)
    for qtype, data in seen.items():
        got = torch_quant.dequantize_gguf(torch.from_numpy(data.copy()), qtype, torch.float32)
        np.testing.assert_array_equal(got.numpy(), dequantize(data, qtype).reshape(got.shape))


# --------------------------------------------------------------------------- engine

PROMPT = list(range(30, 70))
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prompt_logprobs(llm) -> torch.Tensor:
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], PROMPT[1:])])


def int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    return torch_quant.dequantize_int8(*torch_quant.quantize_int8(w), w.dtype)


def fake_quantized_copy(folder, dest, round_trip):
    """The checkpoint with every block projection replaced by round_trip(weight) and an untied LM head by its
    int8 round trip: what the quantized layers hold."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(folder, dest)
    tensors = load_file(dest / "model.safetensors")
    for name, tensor in tensors.items():
        if any(f".{p}.weight" in name for p in PROJECTIONS):
            tensors[name] = round_trip(tensor)
        elif name == "lm_head.weight":
            tensors[name] = int8_round_trip(tensor)
    save_file(tensors, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_layers_compute_what_their_dequantized_weights_do(tmp_path, quantization):
    """A quantized engine (merged q|k|v and gate|up, packing, loaders, matmul dispatch) against the dense
    engine on a checkpoint whose block projections were quantized and dequantized beforehand."""
    from tiny_models import make_tiny_hf_model
    folder = make_tiny_hf_model(tmp_path / "model", arch="qwen2", num_kv_heads=2, hidden_size=256,
                                intermediate_size=512)
    round_trip = {"int8": int8_round_trip,
                  "int4": lambda w: torch_quant.dequantize_int4(*torch_quant.quantize_int4(w, 128), w.dtype)}
    reference = LLM(str(fake_quantized_copy(folder, tmp_path / "fake", round_trip[quantization])), dtype="float32",
                    num_kv_blocks=64)
    quant = LLM(str(folder), dtype="float32", num_kv_blocks=64, quantization=quantization)
    layer = quant.engine.runner.model.layers[0].mlp.down_proj
    assert "weight" not in dict(layer.named_parameters()) and layer.qweight.dtype in (torch.int8, torch.uint8)
    assert type(quant.engine.runner.model.embed_tokens.method).__name__ == "DenseLinearMethod"
    assert quant.engine.runner.model.lm_head.qweight.dtype == torch.int8       # untied: int8 in both formats
    torch.testing.assert_close(prompt_logprobs(quant), prompt_logprobs(reference), atol=1e-4, rtol=0)
    dense = LLM(str(folder), dtype="float32", num_kv_blocks=64)
    assert not torch.allclose(prompt_logprobs(dense), prompt_logprobs(quant), atol=1e-4)   # it did quantize


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-7b", "mistral-7b"])
@pytest.mark.parametrize("quantization, w_bits, group", [("int8", 8, -1), ("int4", 4, 128)])
def test_quantized_weight_bytes_match_the_analyzer(name, quantization, w_bits, group):
    """Built on the meta device (no memory): the engine's parameters against ``--w-bits``."""
    from pagellm.model.layers import LayerFactory
    from pagellm.model.llama import LlamaForCausalLM
    from pagellm.quant import quantization_policy
    config = load_model_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, LayerFactory(torch.bfloat16, quantization_policy(quantization)))
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    predicted = weights_bytes(config, Precision(w_bits=w_bits, group_size=group))
    assert held == pytest.approx(predicted, rel=0.05)


def cpu_packed_bytes(path) -> int:
    """What ``gguf`` mode holds on the CPU for the Qwen2.5 files, counted from the file's tensor list: not
    the token embedding (these files hold the tied matrix twice: the LM head's rows serve the lookups);
    the LM head and quantized linears other than Q4_K as int8 with a bf16 scale per row; Q4_K linears as
    int4 codes with a bf16 scale and zero per 32; float tensors in float32."""
    total = 0
    for t in GGUFReader(path).tensors:
        cols, rows = (int(d) for d in t.shape[:2]) if len(t.shape) > 1 else (int(t.shape[0]), 1)
        if t.name == "token_embd.weight":
            continue
        if t.tensor_type == GGMLQuantizationType.F32:
            total += rows * cols * 4
        elif t.tensor_type == GGMLQuantizationType.Q4_K and rows % 16 == 0 and t.name != "output.weight":
            total += rows * cols // 2 + cols // 32 * rows * 2 * 2
        else:
            total += rows * cols + rows * 2
    return total


def test_gguf_mode_keeps_the_file_s_codes_and_its_outputs(qwen_gguf):
    llm = LLM(str(qwen_gguf), dtype="float32", num_kv_blocks=64, max_model_len=256, quantization="auto")
    assert llm.engine.quantization == "gguf"
    model = llm.engine.runner.model
    assert model.lm_head is model.embed_tokens
    assert llm.engine.memory.weights_bytes == cpu_packed_bytes(qwen_gguf)
    assert llm.engine.memory.weights_bytes <= 1.15 * os.path.getsize(qwen_gguf)
    float_llm = LLM(str(qwen_gguf), dtype="float32", num_kv_blocks=64, max_model_len=256)
    prompts = ["def fibonacci(n):", "import numpy as np\n", "class Stack:\n    def push(self, item):"]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    blocks = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    floats = [o.outputs[0] for o in float_llm.generate(prompts, params, use_tqdm=False)]
    assert sum(b == list(f.token_ids) for b, f in zip(blocks, floats)) >= 2
    for tokens, ref in zip(blocks, floats):    # a greedy path leaves float's only at a near-tie of float's own
        i = next((i for i, (a, b) in enumerate(zip(tokens, ref.token_ids)) if a != b), None)
        if i is not None:
            top = ref.logprobs[i]
            assert tokens[i] in top and top[ref.token_ids[i]].logprob - top[tokens[i]].logprob < 0.5


def test_gguf_mode_holds_the_1_5b_within_its_file_size(qwen15_gguf):
    """The 1.5B (Q4_K and Q6_K) in ``gguf`` mode on the CPU: at most 1.15x the file, as counted."""
    llm = LLM(str(qwen15_gguf), dtype="float32", num_kv_blocks=16, max_model_len=64, quantization="gguf")
    assert llm.engine.memory.weights_bytes == cpu_packed_bytes(qwen15_gguf)
    assert llm.engine.memory.weights_bytes <= 1.15 * os.path.getsize(qwen15_gguf)


def test_gguf_holding_a_tied_matrix_twice_serves_it_once(tmp_path):
    """A tied model whose file holds its matrix twice (a Q5_0 embedding and a Q8_0 LM head, as llama.cpp
    wrote the Qwen2.5 files): ``gguf`` on the CPU holds the LM head alone, as int8, whose rows serve the
    lookups within half an int8 step of gguf's dequantized LM head; an untied model keeps both tensors."""
    from gguf.quants import dequantize as gguf_dequantize
    from pagellm.model.checkpoint import open_checkpoint
    from tiny_models import make_tiny_hf_model, write_tiny_gguf
    held = {}
    for tied in (False, True):
        folder = make_tiny_hf_model(tmp_path, arch="qwen2", tie_word_embeddings=tied)
        path = write_tiny_gguf(folder, tmp_path / f"tied{tied}.gguf", GGMLQuantizationType.Q5_0,
                               lm_head_qtype=GGMLQuantizationType.Q8_0)
        checkpoint = open_checkpoint(path)
        shared = checkpoint.sharing_embedding()
        assert not checkpoint.config.tie_word_embeddings and shared.config.tie_word_embeddings == tied
        assert ("lm_head.weight" in shared.tensor_names()) != tied
        llm = LLM(str(path), dtype="float32", num_kv_blocks=16, quantization="gguf")
        model, held[tied] = llm.engine.runner.model, llm.engine.memory.weights_bytes
        assert (model.lm_head is model.embed_tokens) == tied
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert held[True] == held[False] - tensors["token_embd.weight"].n_bytes
    head = torch.from_numpy(gguf_dequantize(tensors["output.weight"].data, GGMLQuantizationType.Q8_0))
    step = model.lm_head.scales_0.float()[:, None]
    rows = model.embed_tokens.embed(torch.arange(head.shape[0]))
    assert rows.dtype == torch.float32 and ((rows - head).abs() <= step / 2 + 1e-6).all()


def test_gguf_needs_a_gguf_file(tiny_llama):
    with pytest.raises(ValueError, match="must be a .gguf file"):
        LLM(str(tiny_llama), quantization="gguf")


# --------------------------------------------------------------------------- W8A8, calibration, saved checkpoints

def test_w8a8_matmul_is_the_exact_integer_product():
    gen = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(5, 256, generator=gen), torch.randn(48, 256, generator=gen), torch.randn(48)
    q, scale = torch_quant.quantize_int8(w)
    from pagellm.kernels.quant_ops import w8a8_linear
    qx, xscale = torch_quant.quantize_per_token(x)
    exact = (qx.double() @ q.double().t()) * xscale.double()[:, None] * scale.double()[None, :] + bias.double()
    torch.testing.assert_close(w8a8_linear(x, q, scale, bias).double(), exact, rtol=1e-6, atol=1e-6)
    assert (qx.abs().amax(dim=1) == 127).all()     # per token: every row uses the whole range


def _outlier_inputs(gen, rows=256, k=256):
    """Activations with a few channels 30x larger than the rest, as LLM activations have."""
    x = torch.randn(rows, k, generator=gen)
    x[:, :4] *= 30
    return x


def _stats(x):
    from pagellm.quant.calibrate import InputStats
    stats = InputStats()
    stats.add(x, stride=1)
    return stats


def test_awq_search_beats_round_to_nearest_on_outlier_channels():
    from pagellm.quant.calibrate import awq_scales, rtn_error
    gen = torch.Generator().manual_seed(4)
    x, w = _outlier_inputs(gen), torch.randn(64, 256, generator=gen)
    stats = _stats(x)
    s, alpha = awq_scales(w, stats, 128)
    wq = torch_quant.dequantize_int4(*torch_quant.quantize_int4(w * s, 128), torch.float32) / s
    awq_error = (x @ (wq - w).t()).pow(2).mean().item()
    assert alpha > 0 and awq_error < 0.8 * rtn_error(w, stats, 128)


def _naive_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Round-to-nearest int4 from its definition, one group of input columns at a time: the range
    [min(w, 0), max(w, 0)] in 15 steps of an fp16 scale, an integer zero point in 0..15; codes rounded from
    fp32 weights / scale (float64 would round a weight within an fp32 ulp of a half step the other way),
    returned in float64."""
    out = torch.empty(w.shape, dtype=torch.float64)
    for start in range(0, w.shape[1], group):
        cols = w[:, start:start + group].float()
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-7).half().float()[:, None]
        zero = (-lo[:, None] / scale).round().clamp(0, 15)
        out[:, start:start + group] = ((cols / scale + zero).round().clamp(0, 15) - zero).double() * scale.double()
    return out


def test_calibration_records_each_linear_s_real_inputs(tmp_path):
    """The rows recorded for down_proj are silu(gate) * up of gate_up_proj's outputs in the same pass."""
    from tiny_models import make_tiny_hf_model

    from pagellm.quant.calibrate import InputRecorder
    folder = make_tiny_hf_model(tmp_path, arch="qwen2", hidden_size=256, intermediate_size=512)
    llm = LLM(str(folder), dtype="float32", num_kv_blocks=64, enforce_eager=True)
    model = llm.engine.runner.model
    outputs = []
    handle = model.layers[0].mlp.gate_up_proj.register_forward_hook(
        lambda _module, _args, out: outputs.append(out.detach().clone()))
    with InputRecorder(model, num_tokens=len(PROMPT)) as recorder:     # every row kept
        llm.generate([PROMPT], SamplingParams(max_tokens=1), use_tqdm=False)
    handle.remove()
    gate, up = torch.cat(outputs).reshape(-1, 1024).chunk(2, dim=-1)
    recorded = torch.cat(recorder.stats["layers.0.mlp.down_proj"].samples)
    torch.testing.assert_close(recorded, torch.nn.functional.silu(gate) * up)


def test_awq_layers_serve_the_searched_quantizer_and_beat_round_to_nearest(tmp_path):
    """Each served int4-awq layer of a tiny model computes x @ (naive_int4(W * s) / s)^T (float64 reference
    over the calibrated s, shared by the shards of a merged layer), and its output error on the calibration
    rows is no larger than round-to-nearest's."""
    from tiny_models import make_tiny_hf_model

    from pagellm.quant.calibrate import AWQ_SCALED, calibrated_smoothing, record_inputs
    folder = make_tiny_hf_model(tmp_path, arch="qwen2", hidden_size=256, intermediate_size=512)
    served = LLM(str(folder), dtype="float32", num_kv_blocks=64, quantization="int4-awq")
    float_model, stats = record_inputs(served.engine.config)
    scales = calibrated_smoothing(served.engine.config, "int4")     # the same pass again: the same s
    float_layers, served_layers = dict(float_model.named_modules()), dict(served.engine.runner.model.named_modules())
    for name, layer_stats in stats.items():
        x, w, layer = torch.cat(layer_stats.samples).double(), float_layers[name].weight, served_layers[name]
        s = scales.get(name, torch.ones(w.shape[1]))     # a layer AWQ does not scale is not smoothed: s = 1
        awq = _naive_int4(w * s, 128) / s.double()         # W * s rounded to fp32 as it loads
        bias = 0 if layer.bias is None else layer.bias.double()
        reference = x @ awq.t()           # fp32 sums over outputs of tens: 1e-5 relative to the largest
        torch.testing.assert_close(layer(x.float()).double() - bias, reference, rtol=1e-4,
                                   atol=1e-5 * reference.abs().max().item())
        error = lambda wq: (x @ (wq - w.double()).t()).pow(2).mean().item()   # noqa: E731
        assert error(awq) <= 1.001 * error(_naive_int4(w, 128)), name
        assert name.endswith(AWQ_SCALED) or torch.all(s == 1)
    assert sum(not torch.all(s == 1) for s in scales.values()) > 0


def test_smoothquant_lowers_w8a8_error_on_outlier_channels():
    from pagellm.quant.calibrate import smoothquant_scales, w8a8_error
    gen = torch.Generator().manual_seed(5)
    x, w = _outlier_inputs(gen), torch.randn(64, 256, generator=gen)
    stats = _stats(x)
    assert w8a8_error(w, stats, smoothquant_scales(w, stats)) < 0.5 * w8a8_error(w, stats, None)


def test_smoothed_merged_layer_computes_the_reference():
    """A merged (two-shard) W8A8 layer with smoothing s, loaded shard by shard, against
    quantize(x / s) @ quantize(W * s)^T computed from the whole matrix."""
    from pagellm.model.layers import Linear
    from pagellm.quant.methods import W8A8LinearMethod
    gen = torch.Generator().manual_seed(6)
    w0, w1 = torch.randn(32, 128, generator=gen), torch.randn(16, 128, generator=gen)
    s = torch.rand(128, generator=gen) + 0.5
    layer = Linear(128, [32, 16], False, W8A8LinearMethod(smoothing=s), torch.float32)
    layer.weight_loaders["weight"](w0, 0)
    layer.weight_loaders["weight"](w1, 1)
    x = torch.randn(7, 128, generator=gen)
    q, scale = torch_quant.quantize_int8(torch.cat([w0, w1]) * s)
    torch.testing.assert_close(layer(x), torch_quant.w8a8_linear(x / s, q, scale, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int4-awq", "w8a8"])
def test_saved_checkpoint_loads_without_calibrating(tmp_path, monkeypatch, method):
    from tiny_models import make_tiny_hf_model

    from pagellm.cli import main
    folder = make_tiny_hf_model(tmp_path / "model", arch="qwen2", num_kv_heads=2, hidden_size=256,
                                intermediate_size=512)
    in_memory = LLM(str(folder), dtype="float32", num_kv_blocks=64, quantization=method)
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--method", method, "--dtype", "float32"]) == 0

    def no_calibration(*args, **kwargs):
        raise AssertionError("a saved checkpoint must not calibrate again")

    monkeypatch.setattr("pagellm.quant.calibrate.calibrated_smoothing", no_calibration)
    saved = LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=64)
    assert saved.engine.quantization == method.removesuffix("-awq")
    assert torch.equal(prompt_logprobs(saved), prompt_logprobs(in_memory))
    assert saved.engine.memory.weights_bytes == in_memory.engine.memory.weights_bytes
    with pytest.raises(ValueError, match="stored quantized"):
        LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=64, quantization="none")
    if method == "int4-awq":    # written before the interleaved words: its codes would read wrong, so refused
        config_path = tmp_path / "q" / "config.json"
        config = json.loads(config_path.read_text())
        del config["quantization_config"]["int4_packing"]
        config_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match="int4 codes packed as 'pairs'"):
            LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=64)


def test_unsupported_quantization_fails_before_loading(tmp_path, monkeypatch):
    from tiny_models import make_tiny_hf_model
    folder = make_tiny_hf_model(tmp_path / "model", hidden_size=96, intermediate_size=192)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("pagellm.engine.model_runner.build_model", no_loading)
    with pytest.raises(ValueError, match="quantization 'int4'.*hidden_size 96"):
        LLM(str(folder), quantization="int4")
    monkeypatch.setattr("pagellm.kernels.quant_ops.int_mm_supported", lambda device: False)
    with pytest.raises(ValueError, match="quantization 'w8a8' needs an int8 matmul"):
        LLM(str(folder), quantization="w8a8")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(folder), quantization="int3")


TRITON_CHECK = """
import torch
import ptx_emulation
from pagellm.kernels import torch_quant as tq, triton_quant as t
ptx_emulation.install()
t._num_sms = lambda device: 4
gen = torch.Generator().manual_seed(0)
gemv_configs = [t.MatmulConfig(1, 8, 128, 4, 1, 1), t.MatmulConfig(1, 16, 256, 4, 1, 4)]
for n, k in ((40, 256), (24, 384)):
    w, bias = torch.randn(n, k, generator=gen) * 0.02 + 0.01, torch.randn(n, generator=gen)
    q8, s8 = tq.quantize_int8(w)
    p4, s4, z4 = tq.quantize_int4(w, 128)
    for m, configs in ((1, gemv_configs), (3, [t.MatmulConfig(16, 16, 128, 4, 1, 2)])):
        x = torch.randn(m, k, generator=gen)
        for config in configs:
            for got, ref in ((t.int8_matmul(x, q8, s8, bias, config), tq.int8_linear(x, q8, s8, bias)),
                             (t.int4_matmul(x, p4, s4, z4, bias, config), tq.int4_linear(x, p4, s4, z4, bias))):
                error = ((got - ref).norm() / ref.norm()).item()
                assert error < 1e-4, (n, k, m, config, error)
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float16, 1e-3)):   # the int4 GEMV's 16-bit pairs
        x = torch.randn(1, k, generator=gen).to(dtype)
        ref = tq.int4_linear(x.float(), p4, s4, z4, bias)
        for config in gemv_configs:
            got = t.int4_matmul(x, p4, s4, z4, bias.to(dtype), config)
            error = ((got.float() - ref).norm() / ref.norm()).item()
            assert got.dtype == dtype and error < tolerance, (n, k, dtype, config, error)
# The dense GEMV, also as launched under PDL (its first weight tile read before the wait; the interpreter has
# no griddepcontrol, so the wait is a no-op here). K = 640: five tiles of 128, so four splits leave one empty.
# Its gated form: w as gate|up of 20 outputs each (programs of 4 or 8 outputs, the last one partly masked).
from pagellm.kernels import triton_ops
t.wait_for_producer = lambda PDL: None
w, bias = torch.randn(40, 640, generator=gen), torch.randn(40, generator=gen)
x = torch.randn(1, 640, generator=gen)
ref = x.double() @ w.double().T + bias.double()
gate, up = (x.double() @ w.double().T).split(20, dim=-1)
gated_ref = gate * torch.sigmoid(gate) * up
for pdl in (False, True):
    t.pdl_args = lambda x, pdl=pdl: {"PDL": pdl, "launch_pdl": False}
    for config in (t.MatmulConfig(1, 8, 128, 4, 1, 1), t.MatmulConfig(1, 16, 128, 4, 1, 4)):
        error = ((t.dense_matmul(x, w, bias, config).double() - ref).norm() / ref.norm()).item()
        assert error < 1e-6, (pdl, config, error)
        gated = t.dense_silu_and_mul(x, w, config)
        error = ((gated.double() - gated_ref).norm() / gated_ref.norm()).item()
        assert gated.shape == (1, 20) and error < 1e-6, (pdl, config, error)
        unsplit = t.MatmulConfig(1, config.block_n, config.block_k, 4, 1, 0)   # the gated GEMV never splits K
        assert torch.equal(gated, triton_ops.silu_and_mul(t.dense_matmul(x, w, None, unsplit)))
print("ok")
"""


def test_triton_matmuls_match_the_torch_twins_under_the_interpreter():
    """The fused int8/int4 kernels (one-row GEMVs with their magic-number decoding, the int4 one in bf16
    and fp16 pairs, split K, and the tl.dot path, which an fp32 row takes in int4) against ``torch_quant``
    in fp32, the dense GEMV with and without its PDL prologue, and with its silu(gate) * up epilogue, against
    float64 math, run by Triton's interpreter in a subprocess (the interpreter is chosen when the kernels are
    defined; the int4 GEMV's inline PTX goes through ``ptx_emulation``'s model of its instructions). Shapes
    with a partial K tile and masked rows."""
    _run_interpreted(TRITON_CHECK)


def _run_interpreted(script: str) -> None:
    """``script`` (which prints "ok" when its checks pass) under Triton's interpreter, in a subprocess."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


W8A8_CHECK = """
import torch
import ptx_emulation
from pagellm.kernels import torch_quant as tq, triton_quant as t
ptx_emulation.round_bf16_to_nearest_even()
t._num_sms = lambda device: 4
gen = torch.Generator().manual_seed(0)
# Quantization: codes and scales bit for bit, with and without the input scale, in each activation dtype;
# a zero row, and a row with scale exactly 1 whose halves round to even (closed form).
k = 200
ties = torch.zeros(k)
ties[:6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5])
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.cat([torch.randn(5, k, generator=gen) * 3, torch.zeros(1, k), ties[None]]).to(dtype)
    smoothing = torch.rand(k, generator=gen) + 0.5
    q, scale = t.quantize_per_token(x)
    assert q[6, :6].tolist() == [127, 2, -4, 0, 2, 0] and scale[6].item() == 1.0 and (q[5] == 0).all()
    for input_scale, smoothed in ((None, x), (smoothing, x * smoothing.to(dtype))):
        q, scale = t.quantize_per_token(x, input_scale)
        q_ref, scale_ref = tq.quantize_per_token(smoothed)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref), (dtype, input_scale is None)
# The GEMM against the twin's math (its quantization, the exact product, the scales): equal up to the output's rounding (fp32: a few ulps of the
# terms' magnitude; bf16: half a bf16 ulp more). K = 200 is no multiple of the 64/128 tiles (masked);
# rows 1-300 (masked m tiles; 19 m tiles of 16: more than a band of GROUP_M); split K and not; None: the tables.
w, bias = torch.randn(40, k, generator=gen), torch.randn(40, generator=gen)
q8, s8 = tq.quantize_int8(w)
for m, configs in ((1, [t.MatmulConfig(16, 16, 64, 4, 1, 2), None]), (5, [t.MatmulConfig(16, 32, 128, 4, 1, 1)]),
                   (17, [t.MatmulConfig(16, 16, 64, 4, 1, 2), None]), (64, [None]),
                   (300, [t.MatmulConfig(16, 32, 128, 4, 1, 1), None])):
    for dtype, rounding in ((torch.float32, 0.0), (torch.bfloat16, 2.0 ** -8)):
        x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
        input_scale = torch.rand(k, generator=gen) + 0.5 if m % 2 else None
        smoothed = x if input_scale is None else x * input_scale.to(dtype)
        qx, xscale = tq.quantize_per_token(smoothed)
        outer = xscale.double()[:, None] * s8.double()[None, :]
        for b in (None, bias.to(dtype)):
            extra = 0.0 if b is None else b.double()
            exact = (qx.double() @ q8.double().t()) * outer + extra
            magnitude = (qx.double().abs() @ q8.double().abs().t()) * outer + abs(extra)
            for config in configs:
                got = t.w8a8_matmul(x, q8, s8, b, input_scale, config)
                error = (got.double() - exact).abs() - rounding * exact.abs() - 1e-6 * magnitude
                assert got.dtype == dtype and got.shape == (m, 40) and (error <= 0).all(), (m, dtype, config)
print("ok")
"""


def test_w8a8_kernels_match_the_torch_twin_under_the_interpreter():
    """The W8A8 path's two kernels run by Triton's interpreter: the activations' quantization (input scale
    folded in) bit for bit the torch twin's (the interpreter's bf16 casts made to round to nearest even, as
    the GPU's do), and the int8 GEMM equal to the exact integer product up to the output's rounding."""
    _run_interpreted(W8A8_CHECK)


DEQUANTIZE_CHECK = """
import torch
import ptx_emulation
from pagellm.kernels import torch_quant as tq, triton_quant as t
ptx_emulation.round_bf16_to_nearest_even()
gen = torch.Generator().manual_seed(0)
w = torch.randn(37, 384, generator=gen) * 3
q8, s8 = tq.quantize_int8(w)
p4, s4, z4 = tq.quantize_int4(w, 128)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for start, end in ((0, 37), (5, 22)):     # the whole matrix (masked row and K tiles) and a slice of rows
        got = t.dequantize(q8[start:end], s8[start:end], None, dtype)
        assert torch.equal(got, tq.dequantize_int8(q8[start:end], s8[start:end], dtype)), ("int8", dtype, start)
        got = t.dequantize(p4[start:end], s4[start:end], z4[start:end], dtype)
        assert torch.equal(got, tq.dequantize_int4(p4[start:end], s4[start:end], z4[start:end], dtype)), (
            "int4", dtype, start)
print("ok")
"""


def test_triton_dequantize_matches_the_torch_twins_under_the_interpreter():
    """The long steps' dequantization kernel (int8 rows, packed int4 groups) gives the torch twins' values
    bit for bit, for whole matrices and row slices (as ``quant_ops.dequantized_linear`` takes them), in
    every activation dtype."""
    _run_interpreted(DEQUANTIZE_CHECK)
