"""Host lists to device tensors without a stream sync.

`torch.tensor(xs, device=cuda)` and `cpu_tensor.to(cuda)` copy synchronously: the host
waits until every kernel queued before the copy has finished, so the next kernels cannot
be queued while the GPU works. A step's small index tensors go through pinned memory
with a non-blocking copy instead (the copy stays ordered on the stream).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`data` (a list, or a CPU tensor) as a `dtype` tensor on `device`, queued without a sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.as_tensor(data, dtype=dtype, device=device)
    if isinstance(data, torch.Tensor):
        host = data.to(dtype).pin_memory()
    else:
        host = torch.tensor(data, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)
