"""Calibration: the activation statistics the activation-aware formats need.

Both SmoothQuant (``w8a8``) and AWQ (``int4`` with ``awq``) rescale each input
channel ``j`` of a linear layer by ``s_j`` (``quant.methods._InputSmoothing``);
they differ in how ``s`` is chosen:

* SmoothQuant: ``s_j = max|X_j|^a / max|W_j|^(1-a)`` with ``a = 0.5``, which
  evens out the ranges of activations and weights so that per-token int8
  activations lose little to the few channels with outliers.
* AWQ: ``s_j = mean|X_j|^a`` (normalised), with ``a`` searched on a grid per
  layer to minimise the error of the layer's output on calibration inputs
  ``||X W^T - X (Q(W diag(s)) diag(s)^-1)^T||``. ``a = 0`` is plain
  round-to-nearest and is on the grid, so the search never does worse than RTN
  on the calibration inputs. Only ``gate_up_proj`` is scaled; the other block
  linears are not smoothed (no input scale to apply at run time). Scaling one layer type at a time (first 1,024 tokens
  of the evaluation text, round-to-nearest 8.4975 / 5.3193 on the 0.5B / 1.5B):
  ``gate_up`` 8.4336 / 5.2854, ``qkv`` 8.4042 / 5.3243, ``down`` 8.4740 / 5.3838,
  ``o_proj`` 8.6892 on the 0.5B. Each lowers its layers' output error on the
  calibration rows, but only ``gate_up``'s scales lower both models' perplexity.

The statistics come from one pass of the float model over a fixed text kept in
the package (``data/calibration.txt``) through the engine itself
(``LLM.generate`` of one token), with forward pre-hooks on every block linear.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from importlib import resources

import torch

from pagellm.kernels.torch_quant import dequantize_int8, int4_round_trip, quantize_int8
from pagellm.model.layers import Linear

logger = logging.getLogger("pagellm")

CALIBRATION_TOKENS = 2048     # tokens of the calibration text run through the float model
SAMPLE_ROWS = 256             # input rows kept per layer for AWQ's search
SMOOTHQUANT_ALPHA = 0.5
AWQ_GRID = 10                 # a = 0, 1/10, ..., 1
AWQ_SCALED = ("gate_up_proj",)   # the layers AWQ scales; the others are not smoothed (module docstring)


def calibration_text() -> str:
    return (resources.files("pagellm.quant") / "data" / "calibration.txt").read_text()


@dataclass
class InputStats:
    """What one linear layer's inputs looked like over the calibration pass."""

    absmax: torch.Tensor | None = None            # [K] max |x_j|
    abssum: torch.Tensor | None = None            # [K] sum |x_j|
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)   # rows of x, fp32

    def add(self, x: torch.Tensor, stride: int) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        absx = rows.abs()
        self.absmax = absx.amax(0) if self.absmax is None else torch.maximum(self.absmax, absx.amax(0))
        self.abssum = absx.sum(0) if self.abssum is None else self.abssum + absx.sum(0)
        self.count += rows.shape[0]
        self.samples.append(rows[::stride].to("cpu", copy=True))   # a view would keep all of x alive

    @property
    def meanabs(self) -> torch.Tensor:
        return self.abssum / self.count


class InputRecorder:
    """Records ``InputStats`` of every block linear (``layers.*``) of ``model`` while active."""

    def __init__(self, model: torch.nn.Module, num_tokens: int) -> None:
        self.layers = {name: module for name, module in model.named_modules()
                       if isinstance(module, Linear) and name.startswith("layers.")}
        self.stats = {name: InputStats() for name in self.layers}
        self.stride = max(1, num_tokens // SAMPLE_ROWS)
        self._handles = []

    def __enter__(self) -> InputRecorder:
        for name, module in self.layers.items():
            stats = self.stats[name]
            self._handles.append(module.register_forward_pre_hook(
                lambda _module, args, stats=stats: stats.add(args[0], self.stride)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def smoothquant_scales(weight: torch.Tensor, stats: InputStats, alpha: float = SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """``s [K]`` for a layer's float ``weight [N, K]``."""
    w_max = weight.float().abs().amax(0).clamp_min(1e-5)
    x_max = stats.absmax.to(w_max.device).clamp_min(1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


def awq_scales(weight: torch.Tensor, stats: InputStats, group_size: int, grid: int = AWQ_GRID
               ) -> tuple[torch.Tensor, float]:
    """(``s [K]``, the chosen exponent) minimising the int4 layer's output error on the sampled inputs."""
    w = weight.float()
    x = torch.cat(stats.samples).to(w.device)
    reference = x @ w.t()
    meanabs = stats.meanabs.to(w.device).clamp_min(1e-4)
    best = (float("inf"), torch.ones_like(meanabs), 0.0)
    for step in range(grid + 1):
        alpha = step / grid
        s = meanabs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = int4_round_trip(w * s, group_size) / s
        error = (x @ wq.t() - reference).pow(2).mean().item()
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def rtn_error(weight: torch.Tensor, stats: InputStats, group_size: int) -> float:
    """The output error of plain round-to-nearest int4 on the sampled inputs (for reports and tests)."""
    w = weight.float()
    x = torch.cat(stats.samples).to(w.device)
    wq = int4_round_trip(w, group_size)
    return (x @ (wq - w).t()).pow(2).mean().item()


def w8a8_error(weight: torch.Tensor, stats: InputStats, s: torch.Tensor | None) -> float:
    """The output error of W8A8 with smoothing ``s`` (None: without) on the sampled inputs."""
    w = weight.float()
    x = torch.cat(stats.samples).to(w.device)
    s = torch.ones(w.shape[1], device=w.device) if s is None else s.to(w.device)
    xq = dequantize_int8(*quantize_int8(x / s), torch.float32)
    wq = dequantize_int8(*quantize_int8(w * s), torch.float32)
    return (xq @ wq.t() - x @ w.t()).pow(2).mean().item()


def record_inputs(config) -> tuple[torch.nn.Module, dict[str, InputStats]]:
    """Run the calibration text through ``config``'s model in float (an engine
    of its own, dropped after) and return (the float model, its block linears'
    input statistics). ``config``: the ``EngineConfig`` being quantized."""
    from pagellm.llm import LLM   # calibration drives an engine; the engine imports this module lazily

    llm = LLM(replace(config, quantization="none", enforce_eager=True, enable_prefix_caching=False,
                      max_num_seqs=1, num_kv_blocks=CALIBRATION_TOKENS // config.block_size + 2,
                      max_model_len=None))
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer (random weights have none)")
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS]
    window = min(len(ids), llm.engine.max_model_len - 1)   # a short-context model reads the text in windows
    model = llm.engine.runner.model
    with InputRecorder(model, len(ids)) as recorder:
        from pagellm.sampling_params import SamplingParams
        llm.generate([ids[i:i + window] for i in range(0, len(ids), window)], SamplingParams(max_tokens=1),
                     use_tqdm=False)
    logger.info(f"calibrated on {len(ids)} tokens of the calibration text")
    return model, recorder.stats


def calibrated_smoothing(config, method: str, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Per block linear (``layers.3.mlp.down_proj``), the smoothing ``s`` of
    ``method`` (``w8a8``: SmoothQuant, every layer; ``int4``: AWQ search, the
    ``AWQ_SCALED`` layers only)."""
    model, stats = record_inputs(config)
    layers = dict(model.named_modules())
    scales = {}
    for name, layer_stats in stats.items():
        weight = layers[name].weight
        if method == "w8a8":
            scales[name] = smoothquant_scales(weight, layer_stats).cpu()
        elif name.endswith(AWQ_SCALED):
            scales[name] = awq_scales(weight, layer_stats, group_size)[0].cpu()
    return scales
