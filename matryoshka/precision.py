"""The accumulation dtype rule shared by every backend, and the autocast switch that keeps it."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["compute_dtype", "promote", "autocast_disabled"]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """torch's type promotion of the inputs, at least float32: float64 if any input is float64, else
    float32 (half inputs, and float16 mixed with bfloat16, accumulate in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def promote(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors as they are when they share one dtype, else each cast to :func:`compute_dtype`
    (differentiably: gradients come back in each tensor's own dtype), so that every backend sees one
    dtype: float64 weights with float32 inputs compute in float64, as torch would."""
    if len({t.dtype for t in tensors if t is not None}) <= 1:
        return list(tensors)
    dtype = compute_dtype(*tensors)
    return [None if t is None else t.to(dtype) for t in tensors]


# Whether autocast exists for a device type, asked once per type: torch.compile in torch 2.11 (the
# H200 image's) refuses to trace torch.amp.is_autocast_available, so the common types are asked at import.
_AUTOCAST_AVAILABLE = {device_type: torch.amp.is_autocast_available(device_type) for device_type in ("cpu", "cuda")}


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context without autocast on ``device_type``, so the scans accumulate in :func:`compute_dtype`
    whatever autocast would pick for their matmuls and reductions (a no-op where autocast does not exist)."""
    if device_type not in _AUTOCAST_AVAILABLE:
        _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    if _AUTOCAST_AVAILABLE[device_type]:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
