"""The accumulation dtype rule shared by every backend."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs always accumulate in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
