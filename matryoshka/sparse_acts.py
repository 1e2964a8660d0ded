"""``SparseActs``: a TopK-style activation list, ``k`` (value, latent index) pairs per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseActs", "PADDING_INDEX"]

PADDING_INDEX = -1
"""Index that marks an unused slot (BatchTopK rows keep different numbers of latents)."""


@dataclass(frozen=True)
class SparseActs:
    """Sparse latent activations: ``values[b, j]`` is the activation of latent ``indices[b, j]``.

    Args:
        values: ``(B, k)`` floating tensor.
        indices: ``(B, k)`` int64 tensor with entries in ``[0, n)``, or ``-1`` for padding.  Any order
            within a row; no latent twice in a row.  Padding slots are ignored whatever their value.
    """

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def to_dense(self, n: int) -> torch.Tensor:
        """The ``(B, n)`` dense activation matrix (differentiable in ``values``)."""
        rows = self.values.shape[0]
        slot = torch.where(self.indices < 0, n, self.indices)  # padding lands in a spill column
        values = torch.where(self.indices < 0, torch.zeros_like(self.values), self.values)
        dense = self.values.new_zeros(rows, n + 1).scatter(1, slot, values)
        return dense[:, :n]

    @classmethod
    def from_dense(cls, acts: torch.Tensor, k: int) -> SparseActs:
        """The ``k`` largest entries of each row of a dense ``(B, n)`` tensor (a TopK encoder)."""
        values, indices = acts.topk(k, dim=-1)
        return cls(values, indices)
