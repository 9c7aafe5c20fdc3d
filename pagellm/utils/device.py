"""Host-to-device copies that never wait for the device."""
from __future__ import annotations

import torch


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` without waiting for it: built in pinned host
    memory and copied asynchronously on CUDA (``torch.tensor(..., device=cuda)``
    waits for every kernel queued before it, which would stall the asynchronous
    step pipeline behind the step in flight)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
