"""How well an SAE recovers a toy model's true features: matching, mixing, absorption, learning order.

All functions take plain tensors so that they work on any SAE: ``W_dec`` ``(n, d)``, the true
``directions`` ``(F, d)``, latent activations ``(N, n)`` and true feature activations ``(N, F)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .prefixes import Prefixes
from .sae import SparseAutoencoder
from .toy import ToyModel

__all__ = [
    "cosine_matrix",
    "Matching",
    "match_latents",
    "family_mixing",
    "absorption",
    "LearningOrder",
    "reconstruction_stats",
    "evaluate",
]

Families = list[tuple[int, list[int]]]


def cosine_matrix(W_dec: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``(n, F)`` cosine of each decoder row with each true direction."""
    W = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    D = torch.nn.functional.normalize(directions.detach().float(), dim=1)
    return W @ D.T


@dataclass(frozen=True)
class Matching:
    """``latent[f]``: the latent matched to feature ``f``; ``cos[f]``: their (signed) cosine;
    ``mcc``: the mean matched ``|cos|`` (1 = every feature has its own exact latent)."""

    latent: list[int]
    cos: list[float]
    mcc: float


def match_latents(cos: torch.Tensor) -> Matching:
    """One-to-one assignment of latents to features maximising the total ``|cos|`` (Hungarian).

    Needs ``n >= F`` for every feature to get a latent; with fewer latents, unmatched features
    count as 0 in the MCC.
    """
    abs_cos = cos.abs().numpy()
    rows, cols = linear_sum_assignment(-abs_cos)
    F = cos.shape[1]
    latent = [-1] * F
    signed = [0.0] * F
    for r, c in zip(rows.tolist(), cols.tolist()):
        latent[c], signed[c] = r, float(cos[r, c])
    return Matching(latent, signed, float(np.abs(signed).sum() / F))


def family_mixing(cos: torch.Tensor, matching: Matching, families: Families) -> list[dict]:
    """Per family (a parent and its children, who are each other's siblings): over the matched
    latents of its members, the largest positive and most negative cosine with *another* member.

    A clean dictionary gives 0 and 0; absorption shows as a positive child-latent/parent cosine,
    and "feature splitting with subtraction" as negative ones.
    """
    out = []
    for parent, children in families:
        members = [parent, *children]
        pos, neg = 0.0, 0.0
        for f in members:
            latent = matching.latent[f]
            if latent < 0:
                continue
            others = cos[latent, [m for m in members if m != f]]
            pos, neg = max(pos, float(others.max())), min(neg, float(others.min()))
        out.append({"parent": parent, "max_pos": pos, "max_neg": neg})
    return out


def absorption(
    latent_acts: torch.Tensor,
    true_acts: torch.Tensor,
    cos: torch.Tensor,
    matching: Matching,
    families: Families,
    silent_fraction: float = 0.1,
) -> list[dict]:
    """Per (parent, child) pair: how often the child's latent takes over the parent's job.

    ``rate``: among samples where parent and child are both truly active, the share where the
    parent's latent is silent (below ``silent_fraction`` of its usual activation: its mean when the
    parent is active without any of its children) while the child's latent fires.  ``child_cos_parent``:
    cosine of the child latent's decoder row with the parent's direction (absorbed parents leave their
    direction there).  ``both``: the number of samples with both active.
    """
    out = []
    for parent, children in families:
        lp = matching.latent[parent]
        parent_on = true_acts[:, parent] > 0
        alone = parent_on & ~(true_acts[:, children] > 0).any(1)
        reference = alone if bool(alone.any()) else parent_on
        usual = float(latent_acts[reference, lp].mean()) if lp >= 0 and bool(reference.any()) else 0.0
        for child in children:
            lc = matching.latent[child]
            both = parent_on & (true_acts[:, child] > 0)
            if lp < 0 or lc < 0 or not bool(both.any()):
                rate = float("nan")
            else:
                silent = latent_acts[both, lp] <= silent_fraction * usual
                fires = latent_acts[both, lc] > 0
                rate = float((silent & fires).float().mean())
            out.append({
                "parent": parent,
                "child": child,
                "rate": rate,
                "child_cos_parent": float(cos[lc, parent]) if lc >= 0 else float("nan"),
                "both": int(both.sum()),
            })
    return out


class LearningOrder:
    """When each feature is first learned during training, and by which latent position.

    Call :meth:`update` with the step and the current ``(n, F)`` cosine matrix (e.g. from a training
    callback).  A feature counts as learned at the first update where some latent reaches
    ``|cos| >= threshold``; its ``position`` is that latent's index at that moment (latents may be
    re-sorted later).
    """

    def __init__(self, num_features: int, threshold: float = 0.9) -> None:
        self.threshold = threshold
        self.step: list[int | None] = [None] * num_features
        self.position: list[int | None] = [None] * num_features

    def update(self, step: int, cos: torch.Tensor) -> None:
        best, latent = cos.abs().max(0)
        for f in range(len(self.step)):
            if self.step[f] is None and float(best[f]) >= self.threshold:
                self.step[f], self.position[f] = step, int(latent[f])

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "step": list(self.step), "position": list(self.position)}


@torch.no_grad()
def reconstruction_stats(x: torch.Tensor, latent_acts: torch.Tensor, recon: torch.Tensor) -> dict:
    """``l0`` (mean active latents per sample), ``dead`` (latents never active here) and
    ``explained_variance`` (``1 - SSE / total sum of squares about the mean``)."""
    active = latent_acts > 0
    sse = (x - recon).pow(2).sum()
    sst = (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
    return {
        "l0": float(active.sum(1).float().mean()),
        "dead": int((~active.any(0)).sum()),
        "explained_variance": float(1 - sse / sst),
    }


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    toy: ToyModel,
    prefixes: Prefixes | None = None,
    num_samples: int = 20_000,
    seed: int = 12345,
) -> dict:
    """Every metric of this module for ``sae`` on fresh samples of ``toy`` (``sae`` in eval mode).

    Scalars: ``mcc``, ``absorption`` (mean pair rate), ``child_cos_parent`` (mean), ``mix_pos`` /
    ``mix_neg`` (mean over families), ``l0``, ``dead``, ``explained_variance``, ``mse`` (full
    reconstruction error per sample) and ``objective``: the Matryoshka loss over ``prefixes``
    (default: the SAE's own) on these samples; pass one prefix set to compare SAEs trained
    differently.  Details: ``cos`` (as lists), ``matching``, ``mixing``, ``pairs``.
    """
    was_training = sae.training
    sae.eval()
    x, true_acts = toy.sample(num_samples, torch.Generator().manual_seed(seed))
    out = sae(x)
    acts = out.acts if isinstance(out.acts, torch.Tensor) else out.acts.to_dense(sae.config.n)
    cos = cosine_matrix(sae.W_dec, toy.directions)
    matching = match_latents(cos)
    families = toy.families()
    mixing = family_mixing(cos, matching, families)
    pairs = absorption(acts, true_acts, cos, matching, families)
    sae.train(was_training)

    def mean(values: list[float]) -> float:
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {
        "mcc": matching.mcc,
        "absorption": mean([p["rate"] for p in pairs]),
        "child_cos_parent": mean([p["child_cos_parent"] for p in pairs]),
        "mix_pos": mean([m["max_pos"] for m in mixing]),
        "mix_neg": mean([m["max_neg"] for m in mixing]),
        **reconstruction_stats(x, acts, out.recon),
        "mse": float((x - out.recon).pow(2).sum(1).mean()),
        "objective": float(sae.reconstruction_loss(x, out.acts, prefixes).loss),
        "cos": cos.tolist(),
        "matching": {"latent": matching.latent, "cos": matching.cos},
        "mixing": mixing,
        "pairs": pairs,
    }
