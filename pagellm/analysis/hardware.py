"""Accelerator presets for the analyzer: memory, bandwidth and peak throughputs.

Every preset is a *datasheet* figure (``source="datasheet"``), not a
measurement, so roofline times built on them are lower bounds. For scale, on
one H100 SXM with torch 2.11 bf16: a 2048x8192x8192 ``F.linear`` ran at 78 %
of the 989 TFLOP/s peak (2048x4096x4096: 68 %), a 1 GiB device copy at 89 %
of 3.35 TB/s, the linears of a Llama-2-7B decode step replayed as one CUDA
graph at 74 % of the bandwidth bound, and SDPA FlashAttention prefill of 2048
tokens (32 heads) at only ~20 % of the tensor peak.

Conventions
-----------
* Peaks are **dense** (no 2:4 structured sparsity) tensor-core rates.
* ``fp16_flops`` is the FP16/BF16 tensor-core rate with FP32 accumulation
  (what LLM kernels use). On GeForce cards (RTX 4090) this is half the FP16
  accumulate rate that marketing quotes.
* ``int8_ops`` is the dense INT8 tensor-core rate; ``fp8_flops`` the dense FP8
  rate, ``None`` where the chip has no FP8 tensor cores (Ampere).
* ``fp32_flops`` is the non-tensor (CUDA core) FP32 rate; the analyzer uses
  it for element-wise work (norms, softmax, activations, rotary), which is
  memory bound on every preset anyway.
* ``memory_bytes`` is the marketed capacity read as GiB: HBM and GDDR are
  built in binary sizes (an "80 GB" H100 shows 81559 MiB in nvidia-smi).
  The CUDA context and allocator slack come off that (see ``memory.py``).
* ``bandwidth`` is in decimal bytes/s as datasheets quote it (3.35 TB/s).
* ``link_bandwidth`` is the per-GPU, per-direction bandwidth used by the
  tensor-parallel all-reduce: NVLink for SXM parts, PCIe for PCIe cards
  (no NVLink bridge assumed; GeForce cards lack peer-to-peer, so real
  all-reduces there are slower still).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GiB = 2**30
TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    bandwidth: float                 # bytes/s
    fp16_flops: float                # dense FP16/BF16 tensor FLOP/s
    int8_ops: float                  # dense INT8 tensor OP/s
    fp8_flops: float | None          # dense FP8 tensor FLOP/s, None if unsupported
    fp32_flops: float                # non-tensor FP32 FLOP/s
    link_bandwidth: float | None = None  # per-direction GPU-GPU bytes/s (tensor parallelism)
    source: str = "datasheet"
    note: str = ""

    def matmul_peak(self, bits: int) -> float:
        """Peak for matmuls whose inputs are ``bits`` wide.

        8-bit (or narrower) inputs use the INT8 tensor-core rate (W8A8); on
        Hopper and Ada data-center parts the dense FP8 rate is the same figure.
        16-bit uses the FP16/BF16 tensor cores, 32-bit the FP32 vector units.
        """
        if bits <= 8:
            return self.int8_ops
        return self.fp16_flops if bits <= 16 else self.fp32_flops

    def ridge_point(self, bits: int = 16) -> float:
        """Arithmetic intensity (OPs/byte) where the roofline turns flat."""
        return self.matmul_peak(bits) / self.bandwidth

    def to_json(self) -> dict:
        return asdict(self)


def _hw(name, mem_gib, bw_tb, fp16_tf, int8_tops, fp8_tf, fp32_tf, link_gb, note=""):
    return Hardware(
        name=name, memory_bytes=mem_gib * GiB, bandwidth=bw_tb * TB,
        fp16_flops=fp16_tf * TB, int8_ops=int8_tops * TB,
        fp8_flops=None if fp8_tf is None else fp8_tf * TB,
        fp32_flops=fp32_tf * TB, link_bandwidth=link_gb * GB, note=note)


HARDWARE_PRESETS: dict[str, Hardware] = {h.name.lower(): h for h in (
    _hw("A6000", 48, 0.768, 154.8, 309.7, None, 38.7, 32,
        "NVIDIA RTX A6000 (Ampere GA102), GDDR6; PCIe Gen4 (a 2-way NVLink bridge gives 56 GB/s/dir)"),
    _hw("A100-40G", 40, 1.555, 312, 624, None, 19.5, 300, "NVIDIA A100 SXM4 40GB, HBM2, NVLink3"),
    _hw("A100-80G", 80, 2.039, 312, 624, None, 19.5, 300, "NVIDIA A100 SXM4 80GB, HBM2e, NVLink3"),
    _hw("H100-SXM", 80, 3.35, 989.4, 1978.9, 1978.9, 67, 450, "NVIDIA H100 SXM5 80GB, HBM3, NVLink4"),
    _hw("H100-PCIe", 80, 2.0, 756.5, 1513, 1513, 51, 64,
        "NVIDIA H100 PCIe 80GB, HBM2e, PCIe Gen5 (a NVLink bridge gives 300 GB/s/dir)"),
    _hw("H200", 141, 4.8, 989.4, 1978.9, 1978.9, 67, 450, "NVIDIA H200 SXM 141GB, HBM3e, NVLink4"),
    _hw("L40S", 48, 0.864, 362.05, 733, 733, 91.6, 32, "NVIDIA L40S (Ada), GDDR6, PCIe Gen4"),
    _hw("RTX-4090", 24, 1.008, 165.2, 660.6, 330.3, 82.6, 32,
        "NVIDIA GeForce RTX 4090 (Ada), GDDR6X; FP16/FP8 with FP32 accumulate; no P2P"),
)}

_ALIASES = {
    "rtx4090": "rtx-4090", "4090": "rtx-4090", "rtx 4090": "rtx-4090",
    "rtx-a6000": "a6000", "rtx a6000": "a6000",
    "a100": "a100-80g", "a100-40gb": "a100-40g", "a100-80gb": "a100-80g",
    "h100": "h100-sxm", "h100-sxm5": "h100-sxm", "h100-pcie": "h100-pcie",
    "h200-sxm": "h200", "l40s": "l40s",
}


def hardware_names() -> list[str]:
    return [h.name for h in HARDWARE_PRESETS.values()]


def get_hardware(name: str) -> Hardware:
    """The preset named ``name`` (case-insensitive; 'RTX4090', 'H100' accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in HARDWARE_PRESETS:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(hardware_names())} "
                         "(or give --bandwidth and --flops)")
    return HARDWARE_PRESETS[key]


def custom_hardware(bandwidth: float, flops: float, memory_bytes: float = 0.0,
                    link_bandwidth: float | None = None, name: str = "custom") -> Hardware:
    """A user-described device: one peak for every precision."""
    if bandwidth <= 0 or flops <= 0:
        raise ValueError("--bandwidth and --flops must be positive")
    return Hardware(name=name, memory_bytes=memory_bytes, bandwidth=bandwidth, fp16_flops=flops,
                    int8_ops=flops, fp8_flops=flops, fp32_flops=flops, link_bandwidth=link_bandwidth,
                    source="user", note="user-supplied peaks")


def override(hw: Hardware, *, bandwidth: float | None = None, flops: float | None = None,
             memory_bytes: float | None = None, link_bandwidth: float | None = None) -> Hardware:
    """A preset with some figures replaced by the user's."""
    changes: dict = {}
    if bandwidth is not None:
        changes["bandwidth"] = bandwidth
    if flops is not None:
        ratio = flops / hw.fp16_flops  # keep the preset's INT8/FP8 : FP16 ratios
        changes.update(fp16_flops=flops, int8_ops=hw.int8_ops * ratio,
                       fp8_flops=None if hw.fp8_flops is None else hw.fp8_flops * ratio)
    if memory_bytes is not None:
        changes["memory_bytes"] = memory_bytes
    if link_bandwidth is not None:
        changes["link_bandwidth"] = link_bandwidth
    if not changes:
        return hw
    return replace(hw, source=f"{hw.source} + user overrides", **changes)


def match_device_name(device_name: str) -> Hardware | None:
    """Best preset for a CUDA device name (``torch.cuda.get_device_name()``), or None.

    For ``pagellm bench``: 'NVIDIA H100 80GB HBM3' -> H100-SXM,
    'NVIDIA A100-SXM4-40GB' -> A100-40G, 'NVIDIA GeForce RTX 4090' -> RTX-4090.
    """
    n = device_name.lower().replace("_", " ")
    if "h200" in n:
        return HARDWARE_PRESETS["h200"]
    if "h100" in n:
        return HARDWARE_PRESETS["h100-pcie" if "pcie" in n else "h100-sxm"]
    if "a100" in n:
        return HARDWARE_PRESETS["a100-40g" if "40gb" in n.replace(" ", "") else "a100-80g"]
    if "l40s" in n:
        return HARDWARE_PRESETS["l40s"]
    if "4090" in n:
        return HARDWARE_PRESETS["rtx-4090"]
    if "a6000" in n:
        return HARDWARE_PRESETS["a6000"]
    return None
