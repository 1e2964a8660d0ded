"""The code-spread penalty: how much a latent's codes vary across the samples it fires on.

For latent ``i`` with codes ``a_bi`` on the ``N_i`` rows of the batch where it fires above a floor,
``a_bi > FLOOR · max_b a_bi`` (the batch's largest code of that latent, without gradient), the squared
coefficient of variation of those codes,

    V_i = Var(a_i | fired) / E[a_i | fired]^2 = N_i Σ_b a_bi^2 / (Σ_b a_bi)^2 - 1,

and the penalty is the mean of ``V_i`` over the latents that fire on at least two rows (0 when none
does).  ``V_i`` is scale-free (a latent firing at one magnitude costs 0, whatever the magnitude) and
moves only the codes of the rows where a latent fires (through the encoder); it is a per-batch
statistic, so its value and gradient depend on the batch.  The floor keeps faint firings out: a
ReLU latent's codes of 1e-3 beside codes of 1 would make ``V`` huge, and its gradient, which pulls
every counted code towards the latent's mean, would hold those firings up against the sparsity term
(a development trial without the floor on the unequal toy, λ = 0.1: L0 stayed high until the
adaptive L1 coefficient rose over tenfold and killed most latents).

Why (research question 1, ``experiments/absorption_margins.py``): from ``q = P(child | parent) = 1/2``
on, the *rotated pair* (one latent along the parent-and-child sample, the other orthogonal to it) is
as good as the true pair for every prefix loss, the L1 and L0 counts and the decoder orthogonality
penalty.  It obeys the firing hierarchy too; what sets it apart is its first latent's code,
``a/√(1 + r²)`` on parent-alone samples and ``a√(1 + r²)`` with the child, while the true parent's
latent fires at ``a`` on every parent sample.  On binary features at fixed magnitudes (the toys)
the true pair has ``V = 0`` and the rotated pair's first latent

    V_rot = ((1 - q)/s + q s) / ((1 - q)/√s + q √s)^2 - 1,   s = 1 + r²

(0.111 at q = 1/2, r = 1; every firing counted while ``1/s > FLOOR``, i.e. r < 3), so this
penalty is the prior "a latent fires at one magnitude" that the objective lacks.  It cannot see
absorption (the absorbed pair's latents each fire at one magnitude too) and on real data, where a
feature's magnitude varies, it has no claim to truth: it is a probe of the toys' explanation, not a
recipe.  A latent escapes it by firing on fewer than two rows: the penalty pays a latent to die.
"""

from __future__ import annotations

import torch

from .sparse_acts import SparseActs

__all__ = ["code_spread_penalty", "rotated_pair_spread", "FLOOR"]

FLOOR = 0.1  # codes at or below this share of the latent's largest code in the batch are not counted


def code_spread_penalty(acts: torch.Tensor | SparseActs, n: int | None = None) -> torch.Tensor:
    """The mean over latents firing on >= 2 rows (above the floor) of the squared coefficient of
    variation of their codes there (module doc).  ``acts``: dense ``(B, n)`` codes, or ``SparseActs`` with ``n``,
    the number of latents.  A 0-d tensor, differentiable in the codes; no host sync."""
    if isinstance(acts, SparseActs):
        if n is None:
            raise ValueError("code_spread_penalty(SparseActs, n): n, the number of latents, is needed for sparse codes")
        real = torch.where(acts.active(), acts.values.detach(), torch.zeros_like(acts.values))
        slot = torch.where(acts.indices < 0, n, acts.indices)  # padding lands in a spill entry
        largest = real.new_zeros(n + 1).scatter_reduce_(0, slot.reshape(-1), real.reshape(-1), "amax")
        fired = acts.active() & (acts.values > FLOOR * largest[slot])
        values = torch.where(fired, acts.values, torch.zeros_like(acts.values))
        count = acts.per_latent_sum(fired.to(values.dtype), n)
        first, second = acts.per_latent_sum(values, n), acts.per_latent_sum(values * values, n)
    else:
        if acts.dim() != 2:
            raise ValueError(f"code_spread_penalty: acts must be (B, n) codes, got shape {tuple(acts.shape)}")
        fired = acts > FLOOR * acts.detach().amax(0, keepdim=True).clamp_min(0)
        values = torch.where(fired, acts, torch.zeros_like(acts))
        count, first, second = fired.to(acts.dtype).sum(0), values.sum(0), (values * values).sum(0)
    counted = count >= 2  # one firing has no spread
    spread = count * second / torch.where(counted, first * first, torch.ones_like(first)) - 1
    return torch.where(counted, spread, torch.zeros_like(spread)).sum() / counted.sum().clamp_min(1)


def rotated_pair_spread(q: float, r: float) -> float:
    """``V`` of the rotated pair's first latent (module doc): codes ``a/√s`` on the parent-alone
    share ``1 - q`` of its firings and ``a√s`` on the share ``q`` with the child, ``s = 1 + r²``."""
    s = 1.0 + r * r
    mean = (1 - q) / s**0.5 + q * s**0.5
    return ((1 - q) / s + q * s) / mean**2 - 1
