"""Host-side bookkeeping shared by every scan backend: sort, fold prefix weights, unfold losses.

A row's active latents sorted by index, ``p_1 < ... < p_k``, give ``k + 1`` residuals
``r_t = x - b_dec - sum_{j <= t} v_j W_dec[p_j]``.  Prefix ``g`` (length ``m_g``) sees residual
``t(g) = #{j : p_j < m_g}``, i.e. ``t(g) = t`` exactly when ``p_t < m_g <= p_{t+1}`` (with
``p_0 = -1`` and ``p_{k+1} = n``).  So, with ``idx(m) = #{g : m_g <= m}`` (a searchsorted) and the
cumulative weights ``F[i] = w_1 + ... + w_i``:

    W_t = sum_{g : t(g) = t} w_g = F[idx(p_{t+1})] - F[idx(p_t)]            (fold)
    per_prefix_g = mean_b ||r_{t_b(g)}||^2, prefixes idx(p_t) <= g < idx(p_{t+1}) see r_t   (unfold)

Both cost O(B * k * log G): nothing here grows with the number of prefixes beyond O(G).  The fold
takes differences of float64 cumulative sums, so a weight smaller than ~1e-16 of the total weight
is lost to rounding (like adding it to the total loss would be).
"""

from __future__ import annotations

import torch

from .prefixes import Prefixes
from .sparse_acts import SparseActs

__all__ = ["SortedActs", "prefix_positions", "fold_prefix_weights", "unfold_prefix_losses"]

_PAD_KEY = torch.iinfo(torch.int64).max


class SortedActs:
    """A row-wise index-sorted copy of ``SparseActs``; padding and (unchecked) out-of-range slots last.

    ``key`` is the index with every inactive slot (padding, or out of range when validation is
    off) replaced by ``n``, which no prefix length exceeds: such a slot never changes a residual.
    """

    __slots__ = ("values", "indices", "key")

    def __init__(self, acts: SparseActs, n: int) -> None:
        inactive = (acts.indices < 0) | (acts.indices >= n)
        order = torch.where(acts.indices < 0, _PAD_KEY, acts.indices).argsort(dim=1, stable=True)
        self.values = acts.values.gather(1, order)
        self.indices = acts.indices.gather(1, order)
        self.key = torch.where(inactive, n, acts.indices).gather(1, order)


def prefix_positions(sorted_acts: SortedActs, prefixes: Prefixes) -> torch.Tensor:
    """``(B, k + 2)``: ``idx(p_t)`` for ``t = 0..k+1`` with ``p_0 = -1`` and ``p_{k+1} = n``.

    Prefixes ``positions[:, t] <= g < positions[:, t + 1]`` see residual ``r_t``.
    """
    lengths, _, _ = prefixes.on(sorted_acts.key.device)
    inner = torch.searchsorted(lengths, sorted_acts.key.contiguous(), right=True)
    first = inner.new_zeros(inner.shape[0], 1)
    past_last = inner.new_full((inner.shape[0], 1), len(prefixes))
    return torch.cat([first, inner, past_last], dim=1)


def fold_prefix_weights(positions: torch.Tensor, prefixes: Prefixes, dtype: torch.dtype) -> torch.Tensor:
    """``W`` of shape ``(B, k + 1)``: the total prefix weight on each residual ``r_0 .. r_k``."""
    _, _, cumulative = prefixes.on(positions.device)
    return (cumulative[positions[:, 1:]] - cumulative[positions[:, :-1]]).to(dtype)


def unfold_prefix_losses(norms: torch.Tensor, positions: torch.Tensor, num_prefixes: int) -> torch.Tensor:
    """The ``(G,)`` batch-mean loss of each prefix from the ``(B, k + 1)`` residual norms.

    Prefix ``g`` sees ``r_t`` for ``idx(p_t) <= g < idx(p_{t+1})``: a difference array over ``g``
    (``+||r_t||^2 - ||r_{t-1}||^2`` at ``idx(p_t)``) summed over rows and cumulated gives every
    prefix at once.  Float64 so that the cumulated differences do not lose precision.
    """
    norms = norms.detach().double()
    steps = torch.cat([norms[:, :1], norms[:, 1:] - norms[:, :-1]], dim=1)
    delta = norms.new_zeros(num_prefixes + 1).index_add_(0, positions[:, :-1].reshape(-1), steps.reshape(-1))
    return delta.cumsum(0)[:-1] / max(norms.shape[0], 1)
