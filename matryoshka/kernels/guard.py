"""The device guard every kernel launch runs under.

A Triton launch goes to the *current* CUDA device, not to the device its tensors live on, so a
tensor on ``cuda:1`` launched while ``cuda:0`` is current would run on the wrong GPU (an illegal
address, or silently wrong data through peer access).  Every host function launches inside
``device_guard(tensor)``, which makes the tensor's device current for the launch.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["device_guard"]


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor; a no-op otherwise (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
