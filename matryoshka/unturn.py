"""Un-turning: re-base a trained SAE's nested latent pairs so that their codes are uncorrelated.

Why (research question 1; the README's "Why a frequent child turns its parent's pair"): when a
child fires on a share ``q ≥ 1/2`` of its parent's samples, the Matryoshka objective likes a
*turned* pair (latents along ``(p + c)/√2`` and ``(p − c)/√2``) at least as well as the true one
(``p``, ``c``), so no schedule of its terms can pick the truth.  Both pairs span the same plane;
they differ in the basis.  This module picks the basis outside the loss, after training.

**The rule.**  A latent ``j`` is *nested* in a latent ``i`` when ``i`` fires on at least ``nesting``
of the rows where ``j`` fires (the firing hierarchy of a child in its parent; the turned pair
obeys it too).  Given its parent, a child's presence should not change the parent's code: on the
rows where the parent fires, the parent's and the child's codes are uncorrelated.  The turned pair
breaks that: on a family's rows its codes are ``(1/√2, 1/√2)`` or ``(√2, 0)``, correlation −1.  So
for a container latent ``i`` (taken most frequent first) with nested latents whose codes correlate
with its own (``|corr| ≥ min_correlation`` on ``i``'s rows):

1. ``P``: the principal plane of ``i``'s rows (the inputs less ``b_dec``, uncentred) within the
   span of the decoder rows of ``i`` and a subset of those nested latents (the :data:`MAX_SPAN`
   most correlated at most): a turned direction may be split over two latents, and an exclusive
   sibling's latent anti-correlates with the container too (at q ≥ 0.6 on the unequal toy), so
   every subset is tried and the one whose plane gives the parent (step 3) the least varying
   projection is kept; the span keeps other features out;
2. the two eigenvectors of the rows' covariance in ``P``: the basis in which the rows' two
   coordinates are uncorrelated.  Each is signed so that the rows' mean projection is positive;
3. the one whose projections vary least relative to their mean (coefficient of variation) is the
   parent's, the other the child's: the parent's latent fires on every row of its family, the
   child's only on some.  ``i`` takes the parent's direction; the nested latent whose decoder row is
   most aligned with the child's direction takes the child's.

On a family of the toys (rows ``p`` and ``p + c``, the latter with probability ``q``) the
covariance in ``P`` is ``q(1 − q) c cᵀ`` whatever basis the SAE holds, so step 2 gives ``p`` and
``c`` exactly, and a true pair is left where it is.  The two new decoder rows keep their old
norms; their encoder columns become the new unit directions with zero bias (how a dictionary of
orthogonal directions encodes exactly, as ``-fromtruth`` starts); the other latents are untouched.
The SAE should be trained on afterwards (the encoder is only a start).  The rule assumes that a
parent's magnitude does not depend on whether its child fires; a parent and child with correlated
magnitudes have no uncorrelated basis to find.  A probe of the explanation on the toys, not a
recipe for real data (``python -m matryoshka unturn``: where it restores the truth and whether
training keeps it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .code_spread import FLOOR
from .sae import SparseAutoencoder

__all__ = ["PairRotation", "unturn_pairs", "MAX_SPAN"]

MAX_SPAN = 4  # nested latents (most correlated first) whose subsets are searched for the plane


@dataclass(frozen=True)
class PairRotation:
    """One re-based pair: the container ``parent`` latent and the nested ``child`` latent that took
    the new directions; ``span``: the nested latents whose decoder rows, with the parent's, spanned the plane kept;
    ``parent_spread``, ``child_spread``: the coefficients of variation of the rows' projections on
    the new directions; ``angle``: degrees the parent latent's decoder row moved."""

    parent: int
    child: int
    span: tuple[int, ...]
    parent_spread: float
    child_spread: float
    angle: float


@torch.no_grad()
def unturn_pairs(sae: SparseAutoencoder, x: torch.Tensor, nesting: float = 0.9, min_correlation: float = 0.5,
                 min_firings: int = 50) -> list[PairRotation]:
    """Re-base ``sae``'s nested pairs in place by the rule of the module doc, from inputs ``x``
    ``(rows, d)``; returns what moved.  A latent fires on a row when its code is above
    :data:`~matryoshka.code_spread.FLOOR` times its largest code on ``x``; latents firing on fewer
    than ``min_firings`` rows are left alone.  Computed in float64."""
    if x.dim() != 2 or x.shape[1] != sae.config.d:
        raise ValueError(f"unturn_pairs: x must be (rows, d={sae.config.d}) inputs, got shape {tuple(x.shape)}")
    if not 0 < nesting <= 1:
        raise ValueError(f"unturn_pairs: nesting must be in (0, 1], got {nesting}")
    if not 0 <= min_correlation <= 1:
        raise ValueError(f"unturn_pairs: min_correlation must be in [0, 1], got {min_correlation}")
    if min_firings < 2:
        raise ValueError(f"unturn_pairs: min_firings must be >= 2 (a spread needs two rows), got {min_firings}")
    codes = sae.dense_acts(x).double()
    fires = codes > FLOOR * codes.amax(0, keepdim=True).clamp_min(0)
    counts = fires.sum(0)
    norms = sae.W_dec.double().norm(dim=1)
    directions = sae.W_dec.double() / norms[:, None]
    centred = x.double() - sae.b_dec.double()
    taken: set[int] = set()
    moved = []
    for i in torch.argsort(counts, descending=True, stable=True).tolist():
        if i in taken or counts[i] < min_firings:
            continue
        rows = fires[:, i]
        nested = [j for j in range(sae.config.n) if j != i and j not in taken
                  and min_firings <= counts[j] <= counts[i] and (rows & fires[:, j]).sum() >= nesting * counts[j]]
        correlated = {j: abs(_correlation(codes[rows, i], codes[rows, j])) for j in nested}
        candidates = sorted((j for j in nested if correlated[j] >= min_correlation), key=correlated.get,
                            reverse=True)[:MAX_SPAN]
        if not candidates:
            continue
        inputs = centred[rows]
        # Any subset of those latents may span the family's plane (a turned direction can be split
        # over two latents; an exclusive sibling's latent anti-correlates too): keep the plane in
        # which the parent's projection varies least, the smaller subset on a tie.
        spread, new, subset = min((_rebased(inputs, directions[[i, *chosen]]) + (chosen,)
                                   for size in range(1, len(candidates) + 1)
                                   for chosen in itertools.combinations(candidates, size)),
                                  key=lambda option: (float(option[0][0]), len(option[2])))
        j = max(subset, key=lambda latent: abs(float(directions[latent] @ new[1])))
        angle = math.degrees(math.acos(min(1.0, abs(float(directions[i] @ new[0])))))
        for latent, direction in ((i, new[0]), (j, new[1])):
            sae.W_dec[latent] = (norms[latent] * direction).to(sae.W_dec.dtype)
            sae.W_enc[:, latent] = direction.to(sae.W_enc.dtype)
            sae.b_enc[latent] = 0
        taken |= {i, j}
        moved.append(PairRotation(i, j, subset, float(spread[0]), float(spread[1]), angle))
    return moved


def _rebased(inputs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(spreads, directions)``: the decorrelated pair (module doc, steps 1–3) of the rows ``inputs``
    within the span of the decoder ``rows``, the parent's direction first; ``spreads``: the
    coefficients of variation of the inputs' projections on them."""
    basis, _ = torch.linalg.qr(rows.T)  # (d, len(rows)), orthonormal
    plane = torch.linalg.svd(inputs @ basis, full_matrices=False).Vh[:2] @ basis.T  # (2, d)
    _, axes = torch.linalg.eigh(torch.cov((inputs @ plane.T).T))
    new = axes.T @ plane  # (2, d): unit, orthogonal, uncorrelated coordinates on the rows
    new = torch.where((inputs @ new.T).mean(0)[:, None] < 0, -new, new)
    projections = inputs @ new.T
    spread = projections.std(0) / projections.mean(0).abs()
    order = torch.argsort(spread)
    return spread[order], new[order]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; 0 when either is constant (a constant code carries no turn)."""
    a, b = a - a.mean(), b - b.mean()
    scale = float(a.norm() * b.norm())
    return float(a @ b) / scale if scale > 0 else 0.0
