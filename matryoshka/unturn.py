"""Un-turning: re-base a trained SAE's nested latents so that a parent's code does not vary.

Why (research question 1; the README's "Why a frequent child turns its parent's pair"): when a
child fires on a share ``q ≥ 1/2`` of its parent's samples, the Matryoshka objective likes a
*turned* pair (latents along ``(p + c)/√2`` and ``(p − c)/√2``) at least as well as the true one
(``p``, ``c``), so no schedule of its terms can pick the truth.  Both pairs span the same plane;
they differ in the basis.  This module picks the basis outside the loss, after training.

**The rule.**  A latent ``j`` is *nested* in a container latent ``i`` when ``i`` fires on at least
``nesting`` of the rows where ``j`` fires (the firing hierarchy of a child in its parent; the turned
pair obeys it too).  Given its parent, a child's presence should not change the parent's code; the
turned pair breaks that (on a family's rows its first code is ``1/√2`` or ``√2``, and its codes
correlate −1).  So for a container ``i`` (taken most frequent first) with nested latents whose
codes correlate with its own (``|corr| ≥ min_correlation`` on ``i``'s rows):

1. ``S``: the subspace ``i``'s rows (the inputs less ``b_dec``) occupy within the span of the
   decoder rows of ``i`` and a subset ``T`` of those nested latents: their principal directions
   with at least ``energy`` of the first one's energy, 2 to ``1 + MAX_CHILDREN`` of them (a turned
   direction may be split over two latents: the span then has a dimension the rows do not use);
2. the parent's direction (``parent_rule``, :data:`PARENT_RULES`): by default
   (``"least-varying"``) the unit ``u`` in ``S`` whose projections of the rows vary least relative
   to their mean (the coefficient of variation ``√(uᵀCu) / uᵀμ``, with ``μ`` and ``C`` the rows' mean
   and covariance in ``S``): ``u ∝ C⁻¹μ``, which points along the rows (``uᵀμ > 0``).  With
   ``"uncorrelated"``, the eigenvector of ``C`` whose projections vary least relative to their mean
   (below, "A parent whose magnitude varies");
3. the children's directions: the orthonormal basis of the rest of ``S`` (orthogonal to ``u``) in
   which the rows' coordinates have the smallest L1 norm, each oriented so the rows project
   positively on it (one direction: nothing to choose; two: a search over the angle).

Every subset ``T`` of up to :data:`MAX_SPAN` of the correlated latents (most correlated first) is
tried, and the one whose parent direction varies least is kept.  Where several agree to 1e-6 (on
rows that take two values, any direction orthogonal to their difference has a constant
projection, and a subspace tilted out of the rows' plane holds one), the one on which the rows
project furthest (their mean projection), then the smaller subset.  With ``"uncorrelated"``, the
subset whose ``S`` holds the largest share of the rows' energy (to 1e-6), then the smaller, then
the least varying: across subspaces, least variation leans as ``C⁻¹μ`` does (on rows read off a
trained SAE at q = 0.7, σ = 0.3, the plane of the container and one latent, missing the parent,
held a direction of spread 0.291 against the parent's 0.305).  A varying parent's own spread also
dilutes a turned latent's correlation with the container (0.65 at σ = 0, 0.45 at σ = 0.2, 0.26 at
σ = 0.3 for a latent of a three-way turn), so ``min_correlation`` must be lowered with it.  ``i``
takes the parent's direction; the children's directions go to the latents of ``T`` most aligned
with them (one to one); latents of ``T`` left over keep their rows.

On a family of the toys (rows ``p``, and ``p + c_k`` for an exclusive child ``c_k``) the parent's
projection is constant exactly along ``p`` (``C p = 0``), whatever basis the SAE holds, and the rest
of the rows are the children's directions themselves, so the rule gives ``p`` and the ``c_k``
exactly; a true parent's code does not vary, so no nested code correlates with it and a true
dictionary is left alone.  The new decoder rows keep their old norms; their encoder columns become
the new unit directions with zero bias (how a dictionary of orthogonal directions encodes exactly,
as ``-fromtruth`` starts).  The SAE should be trained on afterwards (the encoder is only a start).

**A parent whose magnitude varies** independently of its children has a projection on ``p`` that
varies too, and ``C⁻¹μ`` then leans towards the children: the mean grows faster than the spread
along a child.  With one child of probability ``q`` given the parent, fixed magnitudes 1 and a
parent magnitude of standard deviation ``σ``, ``C = diag(σ², q(1−q))`` and ``μ = (1, q)`` in the
``(p, c)`` basis, so ``C⁻¹μ ∝ (1/σ², 1/(1−q))``: a tilt of ``atan(σ²/(1−q))`` off ``p``, 7.6° at
``q = 0.7, σ = 0.2`` (more with the sibling in ``S``: 20° measured, ``tests/test_unturn.py``).
Independence itself gives the exact rule: the parent's projection is uncorrelated with every
direction orthogonal to ``p``, so ``C p ∥ p``: ``p`` is an eigenvector of ``C`` (with eigenvalue
``σ²``, 0 for fixed magnitudes).  ``"uncorrelated"`` takes, among ``C``'s eigenvectors, the one
whose coefficient of variation is least, and then refines it (step 3 done twice): the rows on
which no child direction's coordinate reaches half its largest hold the parent alone, whatever its
magnitude, so the parent's direction becomes their mean direction (given :data:`ALONE` such rows),
and the children's directions are found again orthogonal to it.  The eigenvector is exact in
expectation but not on a sample when ``σ²`` lies close to an eigenvalue of the children's
(at q = 0.7, σ = 0.2: 0.04 against 0.056), where sampling mixes the two eigenvectors: 7.5° off on
20 000 samples, 0.03° once refined (``tests/test_unturn.py``).  The eigenvector is ``p`` while the parent's
coefficient of variation ``σ`` is below every other eigenvector's; a child direction's is
``√((1−q)/q)`` (0.65 at q = 0.7), but "some child fires" is steadier than one child, and with the
sibling in ``S`` a mixed eigenvector undercuts ``σ = 0.3`` at q = 0.7.

**The order.**  A child's latent takes the place of the turned latent most aligned with it, which
in a Matryoshka SAE's order may lie behind unrelated latents: every prefix between them then holds
the parent without its child, and pulls the parent towards the child.  At q = 0.7, where the
objective already prefers the turn, the first steps of training on (before the trainer's first
re-sort) were enough to turn most re-based families again; so by default the latents are re-sorted
by energy once re-based.

**A parent whose magnitude depends on which child fires** (``s`` times larger with a child ``c``)
breaks the assumption, and no rule on the inputs alone can see it: the rows ``p`` and ``s·p + c``
are also those of a fixed parent whose child leans towards it, ``(s − 1)p + c``.  The correlated
codes get a true dictionary re-based.  ``"least-varying"`` then takes the direction orthogonal to
the rows' difference, ``atan((s − 1)|p|/|c|)`` off ``p`` and leaning *away* from the child, towards
the turned pair's second latent ``p − c`` (11° at s = 1.2).  ``"uncorrelated"``'s refinement takes the
parent from the rows where it fires alone, so it keeps the truth (tested at s = 1.2 and 1.5).
At s = 2, q = 0.7, with the sibling in the span, the eigenvector lies 51° off ``p`` and the rows
taken as alone include the sibling's (500 of 872 on the true dictionary), which pull the parent's
direction towards the sibling.

The rule assumes that a parent's magnitude does not depend on which child fires, and that features
are orthogonal; a probe of the explanation on the toys, not a recipe for real data
(``python -m matryoshka unturn``: where it restores the truth and whether training keeps it).
"""

from __future__ import annotations

import itertools
import math
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import scipy.optimize
import torch

from .code_spread import FLOOR
from .sae import SparseAutoencoder

__all__ = ["Rebasing", "unturn", "check_settings", "reorder", "MAX_SPAN", "MAX_CHILDREN", "PARENT_RULES"]

MAX_SPAN = 4  # correlated nested latents (most correlated first) whose subsets are searched
MAX_CHILDREN = 2  # child directions found per container: the frequent child and one sibling
# A code whose standard deviation is at most this share of its mean is constant: a fixed-magnitude
# parent's float32 codes vary by ~1e-7 of it, and that noise correlates with a child's code by chance
# (a true family in rotated coordinates was re-based on one CPU and not on another).
CONSTANT = 1e-4
PARENT_RULES = ("least-varying", "uncorrelated")  # how step 2 picks the parent's direction (module doc)
ALONE = 10  # "uncorrelated": rows holding the parent alone needed to refine its direction (module doc)


class _Option(NamedTuple):
    """One subset's re-basing (:func:`_rebased`): the coefficient of variation (``spread``) and the
    mean (``level``) of the rows' projections on the parent's direction, the share of the rows'
    energy the subspace holds (``captured``), the parent's unit direction ``(d,)``, the children's
    ``(k, d)``, and the nested latents whose rows spanned it."""

    spread: float
    level: float
    captured: float
    parent: torch.Tensor
    children: torch.Tensor
    span: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rebasing:
    """One re-based container: the ``parent`` latent, the ``children`` latents that took the child
    directions, ``span``: the nested latents whose decoder rows spanned the subspace kept;
    ``parent_spread``: the coefficient of variation of the rows' projections on the parent's new
    direction; ``angle``: degrees the parent latent's decoder row moved."""

    parent: int
    children: tuple[int, ...]
    span: tuple[int, ...]
    parent_spread: float
    angle: float


@torch.no_grad()
def unturn(sae: SparseAutoencoder, x: torch.Tensor, nesting: float = 0.9, min_correlation: float = 0.5,
           min_firings: int = 50, energy: float = 0.01, resort: bool = True,
           parent_rule: str = PARENT_RULES[0]) -> list[Rebasing]:
    """Re-base ``sae``'s nested latents in place by the rule of the module doc, from inputs ``x``
    ``(rows, d)``; returns what moved.  A latent fires on a row when its code is above
    :data:`~matryoshka.code_spread.FLOOR` times its largest code on ``x``; latents firing on fewer
    than ``min_firings`` rows are left alone.  ``resort``: when anything moved, re-order the latents
    by decreasing energy (mean squared code on ``x``), as the trainer's re-sort does, so that each
    re-based child follows its parent in the Matryoshka order (module doc, "The order"); the
    returned indices are then the new ones.  ``parent_rule``: step 2's rule (:data:`PARENT_RULES`;
    ``"uncorrelated"`` for a parent whose magnitude varies, module doc).  Computed in float64."""
    if x.dim() != 2 or x.shape[1] != sae.config.d:
        raise ValueError(f"unturn: x must be (rows, d={sae.config.d}) inputs, got shape {tuple(x.shape)}")
    check_settings(nesting, min_correlation, min_firings, energy, parent_rule)
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
        inside = fires[rows].sum(0)  # each latent's firings on i's rows
        nested = [j for j in range(sae.config.n) if j != i and j not in taken
                  and min_firings <= counts[j] <= counts[i] and inside[j] >= nesting * counts[j]]
        correlated = {j: abs(_correlation(codes[rows, i], codes[rows, j])) for j in nested}
        candidates = sorted((j for j in nested if correlated[j] >= min_correlation), key=correlated.get,
                            reverse=True)[:MAX_SPAN]
        if not candidates:
            continue
        inputs = centred[rows]
        options = [_rebased(inputs, directions[[i, *chosen]], energy, parent_rule)._replace(span=chosen)
                   for size in range(1, len(candidates) + 1) for chosen in itertools.combinations(candidates, size)]
        if parent_rule == "least-varying":
            best = min(options, key=lambda o: (round(o.spread, 6), -round(o.level, 6), len(o.span)))
        else:
            best = min(options, key=lambda o: (-round(o.captured, 6), len(o.span), round(o.spread, 6)))
        spread, parent, children, span = best.spread, best.parent, best.children, best.span
        # each child direction to the latent of the span most aligned with it, one to one
        child_of, latent_of = scipy.optimize.linear_sum_assignment(-(children @ directions[list(span)].T).abs().numpy())
        assigned = [(i, parent)] + [(span[j], children[c]) for c, j in zip(child_of, latent_of)]
        for latent, direction in assigned:
            sae.W_dec[latent] = (norms[latent] * direction).to(sae.W_dec.dtype)
            sae.W_enc[:, latent] = direction.to(sae.W_enc.dtype)
            sae.b_enc[latent] = 0
        taken |= {latent for latent, _ in assigned}
        angle = math.degrees(math.acos(min(1.0, abs(float(directions[i] @ parent)))))
        moved.append(Rebasing(i, tuple(latent for latent, _ in assigned[1:]), span, spread, angle))
    if resort and moved:
        order = torch.argsort(sae.dense_acts(x).double().pow(2).mean(0), descending=True, stable=True)
        moved = reorder(sae, moved, order.tolist())
    return moved


def check_settings(nesting: float = 0.9, min_correlation: float = 0.5, min_firings: int = 50, energy: float = 0.01,
                   parent_rule: str = PARENT_RULES[0]) -> None:
    """Refuse, naming it, a setting of :func:`unturn` out of its range (a study checks its own before
    training anything)."""
    if not 0 < nesting <= 1:
        raise ValueError(f"unturn: nesting must be in (0, 1], got {nesting}")
    if not 0 <= min_correlation <= 1:
        raise ValueError(f"unturn: min_correlation must be in [0, 1], got {min_correlation}")
    if min_firings < 2:
        raise ValueError(f"unturn: min_firings must be >= 2 (a spread needs two rows), got {min_firings}")
    if not 0 < energy < 1:
        raise ValueError(f"unturn: energy must be in (0, 1), got {energy}")
    if parent_rule not in PARENT_RULES:
        raise ValueError(f"unturn: parent_rule must be one of {PARENT_RULES}, got {parent_rule!r}")


def reorder(sae: SparseAutoencoder, moved: list[Rebasing], order: list[int]) -> list[Rebasing]:
    """Permute ``sae``'s latents in place (new latent ``k`` is old latent ``order[k]``) and return
    ``moved`` with its indices in the new order."""
    sae.permute_latents_(torch.tensor(order, device=sae.W_dec.device))
    position = {old: new for new, old in enumerate(order)}
    return [dataclasses.replace(m, parent=position[m.parent], children=tuple(position[c] for c in m.children),
                                span=tuple(position[j] for j in m.span)) for m in moved]


def _rebased(inputs: torch.Tensor, rows: torch.Tensor, energy: float, parent_rule: str) -> _Option:
    """Steps 1–3 (module doc) for the rows ``inputs`` within the span of the decoder ``rows``."""
    basis, _ = torch.linalg.qr(rows.T)  # (d, len(rows)), orthonormal
    _, singular, right = torch.linalg.svd(inputs @ basis, full_matrices=False)
    used = int((singular**2 >= energy * singular[0] ** 2).sum())
    subspace = right[: min(max(used, 2), len(rows), 1 + MAX_CHILDREN)] @ basis.T  # (r, d)
    coords = inputs @ subspace.T
    u = _parent_direction(coords, parent_rule)
    children = _children_directions(coords, u)
    if parent_rule == "uncorrelated":
        # the rows on which no child's coordinate reaches half its largest hold the parent alone
        along = coords @ children.T
        alone = (along < 0.5 * along.amax(0)).all(1)
        if int(alone.sum()) >= ALONE:
            u = coords[alone].mean(0)
            u = u / u.norm()
            children = _children_directions(coords, u)
    projections = coords @ u
    spread = _spread(projections)
    captured = float(coords.pow(2).sum() / inputs.pow(2).sum())
    return _Option(spread, float(projections.mean()), captured, u @ subspace, children @ subspace)


def _children_directions(coords: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Step 3 (module doc): the children's unit directions ``(r − 1, r)`` in the coordinates
    ``coords`` ``(rows, r)`` of the subspace, orthogonal to the parent's ``u``."""
    rest = torch.linalg.qr(torch.cat([u[:, None], torch.eye(len(u), dtype=u.dtype)], 1)).Q[:, 1:len(u)].T  # ⊥ u
    children = _sparsest_basis(coords @ rest.T) @ rest
    return torch.where((coords @ children.T).mean(0)[:, None] < 0, -children, children)


def _parent_direction(coords: torch.Tensor, rule: str) -> torch.Tensor:
    """Step 2 (module doc): the parent's unit direction in the coordinates ``coords`` ``(rows, r)``
    of the subspace, pointing along the rows."""
    mean, cov = coords.mean(0), torch.cov(coords.T)
    if rule == "least-varying":
        # argmin_u √(uᵀCu) / uᵀμ is u ∝ C⁻¹μ; a ridge of 1e-12 of C's scale keeps a zero-variance
        # direction (the toys' parent) solvable.
        ridge = 1e-12 * float(cov.diagonal().sum()) + 1e-300
        u = torch.linalg.solve(cov + ridge * torch.eye(len(mean), dtype=cov.dtype), mean)
        return u / u.norm()  # uᵀμ = μᵀ(C + ridge)⁻¹μ / |…| > 0: it already points along the rows
    # A fixed-magnitude parent's eigenvector has no variance and is taken.  ``S`` holds no second
    # direction without variance: a direction's energy is its variance plus its mean squared, so
    # only one along the rows' mean has energy without variance, and step 1 keeps no direction
    # without energy.
    _, vectors = torch.linalg.eigh(cov)
    u = min(vectors.T, key=lambda v: _spread(coords @ v))
    return u if float(u @ mean) >= 0 else -u  # an eigenvector's sign is arbitrary


def _spread(projections: torch.Tensor) -> float:
    """The coefficient of variation of ``projections``: their standard deviation over their mean's
    size (a direction whose projections average 0 varies without bound)."""
    return float(projections.std() / projections.mean().abs().clamp_min(1e-300))


def _sparsest_basis(coords: torch.Tensor) -> torch.Tensor:
    """The orthonormal basis (rows) of ``coords``' space (``(rows, k)``, k ≤ 2) in which the
    coordinates have the smallest L1 norm: a grid over the angle, then a bounded refinement."""
    if coords.shape[1] == 1:
        return torch.ones(1, 1, dtype=coords.dtype)

    def basis(angle: float) -> torch.Tensor:
        c, s = math.cos(angle), math.sin(angle)
        return torch.tensor([[c, s], [-s, c]], dtype=coords.dtype)

    def l1(angle: float) -> float:
        return float((coords @ basis(angle).T).abs().sum())

    # a basis repeats every 90°, so [0°, 90°) holds every one; L1 is piecewise smooth in the angle
    step = math.radians(1.0)
    start = min((k * step for k in range(90)), key=l1)
    best = scipy.optimize.minimize_scalar(l1, bounds=(start - step, start + step), method="bounded").x
    return basis(best)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; 0 when either is constant to :data:`CONSTANT` (a constant code carries
    no turn, and the correlation of its rounding noise is anything)."""
    if any(float(v.std()) <= CONSTANT * float(v.abs().mean()) for v in (a, b)):
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b) / float(a.norm() * b.norm())
