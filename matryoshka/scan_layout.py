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

Rank order (``order="rank"``): the same with each row sorted by value, largest first, and ``p_t``
replaced by the slot's rank ``t - 1`` (:meth:`SortedActs.ranked`): prefix ``j`` is the first ``j``
slots, and the scan, fold and unfold run unchanged.  Detached levels: ``idx(p_t)`` is also slot
``t``'s level, the prefix that adds it; :func:`fold_level_weights` splits ``W_t`` into the part
whose gradient reaches that level's slots and the part that reaches only ``x`` and ``b_dec``.
"""

from __future__ import annotations

import torch

from .prefixes import Prefixes
from .sparse_acts import SparseActs

__all__ = ["SortedActs", "slot_counts", "prefix_positions", "fold_prefix_weights", "fold_level_weights", "unfold_prefix_losses"]

_PAD_KEY = torch.iinfo(torch.int64).max


class SortedActs:
    """A row-wise sorted copy of ``SparseActs``: by latent index, padding and (unchecked) out-of-range
    slots last.  :meth:`ranked` re-sorts it by value for rank-order prefixes.

    ``key`` is what prefix lengths are compared with: the index (index order) or the rank (rank
    order) of each slot, with every inactive slot (padding, or out of range when validation is off)
    replaced by a key no prefix length exceeds (``n``, resp. ``k``): such a slot never changes a
    residual.
    """

    __slots__ = ("values", "indices", "key")

    def __init__(self, acts: SparseActs, n: int) -> None:
        inactive = (acts.indices < 0) | (acts.indices >= n)
        order = torch.where(acts.indices < 0, _PAD_KEY, acts.indices).argsort(dim=1, stable=True)
        self.values = acts.values.gather(1, order)
        self.indices = acts.indices.gather(1, order)
        self.key = torch.where(inactive, n, acts.indices).gather(1, order)

    def ranked(self, n: int) -> SortedActs:
        """The same slots by value, largest first, ties by latent index, inactive slots last; key = rank.

        A stable sort of the index-sorted rows breaks ties by index.  Rank-order prefix ``j`` is
        then "the first ``j`` slots", so the scan and the prefix bookkeeping run unchanged.
        """
        inactive = self.key >= n
        by_value = torch.where(inactive, torch.inf, -self.values.detach().double())
        order = by_value.argsort(dim=1, stable=True)
        ranked = object.__new__(SortedActs)
        ranked.values = self.values.gather(1, order)
        ranked.indices = self.indices.gather(1, order)
        k = self.key.shape[1]
        rank = torch.arange(k, device=self.key.device).expand_as(self.key)
        ranked.key = torch.where(inactive.gather(1, order), k, rank)
        return ranked

    def scaled(self, per_latent: torch.Tensor) -> SortedActs:
        """The same slots with each value multiplied by ``per_latent[index]`` (differentiably, in
        ``per_latent``'s dtype); inactive slots keep their value (the scans ignore it)."""
        n = per_latent.shape[0]
        active = (self.indices >= 0) & (self.indices < n)
        scaled = object.__new__(SortedActs)
        factor = torch.where(active, per_latent[torch.where(active, self.indices, 0)], 1.0)
        scaled.values, scaled.indices, scaled.key = self.values.to(per_latent.dtype) * factor, self.indices, self.key
        return scaled


def slot_counts(active: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64: one past each row's last active slot (0 for a row with none).

    Sorted rows hold their inactive slots last, so this is the number of active slots; the scans
    stop each row there, which is what makes a ragged batch (BatchTopK) cost its mean row, not its
    widest.  An inactive slot before the last active one (unsorted input) is still scanned, as a zero.
    """
    slot = torch.arange(1, active.shape[1] + 1, device=active.device)
    return torch.cat([slot.new_zeros(active.shape[0], 1), torch.where(active, slot, 0)], dim=1).amax(1)


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


def fold_level_weights(positions: torch.Tensor, prefixes: Prefixes, dtype: torch.dtype) -> torch.Tensor:
    """``U`` of shape ``(B, k + 1)``: the part of ``W`` (see :func:`fold_prefix_weights`) whose
    gradient reaches the slots under ``detach=True``.

    Slot ``t`` belongs to level ``h = idx(p_t)`` (``m_{h-1} <= p_t < m_h``, 0-based ``h``), the
    prefix that adds it.  Residual ``r_t`` is prefix ``h``'s own residual exactly when ``t`` is the
    last slot of its level (``idx(p_{t+1}) > h``); then ``U_t = w_h``, else 0, and ``U_0 = 0``.
    Every other prefix that sees ``r_t`` adds no slot of its own level, so it reaches ``x`` and
    ``b_dec`` only.
    """
    _, weights, _ = prefixes.on(positions.device)
    level = positions[:, 1:-1]
    last_of_level = positions[:, 2:] > level
    own = torch.where(last_of_level, weights[level.clamp(max=len(prefixes) - 1)], 0.0)
    return torch.cat([own.new_zeros(own.shape[0], 1), own], dim=1).to(dtype)


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
