"""``SparseActs``: a TopK-style activation list, ``k`` (value, latent index) pairs per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
        dense = self.values.new_zeros(rows, n + 1).scatter_add(1, slot, values)  # a repeat counts twice
        return dense[:, :n]

    def active(self) -> torch.Tensor:
        """``(B, k)`` bool: slots that hold a latent (not padding) with a positive value, i.e. fired."""
        return (self.indices >= 0) & (self.values > 0)

    def decode(self, W_dec: torch.Tensor) -> torch.Tensor:
        """``(B, d)``: ``sum_j values[b, j] * W_dec[indices[b, j]]``, padding ignored.

        One ``embedding_bag`` gather-and-sum: ``O(B * k * d)`` work and no ``(B, n)`` tensor, forward
        or backward.  Differentiable in ``values`` and ``W_dec``.
        """
        if self.values.shape[1] == 0:  # no slots (e.g. from_mask with nothing kept): embedding_bag
            return W_dec.new_zeros(self.values.shape[0], W_dec.shape[1])  # rejects empty 2-D bags
        real = self.indices >= 0
        weights = torch.where(real, self.values, 0.0).to(W_dec.dtype)
        return F.embedding_bag(torch.where(real, self.indices, 0), W_dec, per_sample_weights=weights, mode="sum")

    def per_latent_sum(self, slot_values: torch.Tensor, n: int) -> torch.Tensor:
        """``(n,)``: for each latent, the sum over rows of ``slot_values`` (a ``(B, k)`` tensor laid
        out like ``values``) at the slots that hold it; padding slots add nothing."""
        slot = torch.where(self.indices < 0, n, self.indices)  # padding lands in a spill entry
        totals = slot_values.new_zeros(n + 1).index_add_(0, slot.reshape(-1), slot_values.reshape(-1))
        return totals[:n]

    @classmethod
    def from_dense(cls, acts: torch.Tensor, k: int | None = None) -> SparseActs:
        """The ``k`` largest entries of each row of a dense ``(B, n)`` tensor (a TopK encoder), or
        with ``k=None`` every non-zero entry (BatchTopK, JumpReLU: rows of different lengths; see
        :meth:`from_mask`)."""
        if k is None:
            return cls.from_mask(acts, acts != 0)
        values, indices = acts.topk(k, dim=-1)
        return cls(values, indices)

    @classmethod
    def from_mask(cls, acts: torch.Tensor, keep: torch.Tensor) -> SparseActs:
        """The entries of a dense ``(B, n)`` tensor where the bool ``keep`` holds, in latent order,
        each row padded to the longest one (width ``max_b #keep[b]``: one host sync).

        Differentiable in ``acts``.  The loss scans each row only up to its own count, so the
        padding costs memory (``B x width`` slots) but not scan time.
        """
        rows, latents = keep.nonzero(as_tuple=True)
        counts = keep.sum(1)
        width = int(counts.max()) if keep.shape[0] else 0
        slot = torch.arange(rows.shape[0], device=keep.device) - (counts.cumsum(0) - counts)[rows]
        indices = torch.full((keep.shape[0], width), PADDING_INDEX, dtype=torch.int64, device=keep.device)
        values = acts.new_zeros(keep.shape[0], width).index_put((rows, slot), acts[rows, latents])
        return cls(values, indices.index_put_((rows, slot), latents))
