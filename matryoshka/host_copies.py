"""Host-to-device copies that do not block the host: to a GPU through pinned memory.

A copy from pageable host memory may make the driver wait for the device's stream; from pinned
memory it is queued like a kernel.  The trainer's batches, the prefix tables and the orthogonality
penalty's random chunks go through here, so a training step needs no host sync.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor goes to a GPU through pinned memory, without blocking."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
