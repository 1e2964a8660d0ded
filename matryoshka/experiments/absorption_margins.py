"""Why no prefix weighting prevents the large-child absorption: the absorbed dictionary against the
true one, term by term, in closed form.

The child-magnitude toy's pair: a parent (unit direction ``p``, probability ``P``, magnitude ``a``)
and a child (unit ``c ⟂ p``) that fires only with it (probability ``q`` given the parent) with
magnitude ``r·a``.  Two dictionaries reconstruct every sample exactly with all their latents:

* **true**: latent ``p`` fires with ``a`` on every parent sample, latent ``c`` with ``r·a`` on child
  samples;
* **absorbed**: latent ``u = (p + r c)/√(1 + r²)`` fires with ``a·√(1 + r²)`` on child samples, latent
  ``p`` with ``a`` on parent-alone samples (the parent's latent is silent when the child fires).

The distractors are the same in both, so they cancel.  A prefix holds neither latent of the pair
(the same loss in both), both (exact in both), or one; the Matryoshka loss of any prefix weighting
is therefore ``W₁ · L₁`` plus terms that are equal, ``W₁`` the weight on the prefixes that hold just
one latent and ``L₁`` that prefix's expected loss (the omitted latent's energy).  With latents sorted by
energy (the trainer's rule), the kept latent is the more energetic one, so

    L₁(true)     = P a² · min(q r², 1)
    L₁(absorbed) = P a² · min(1 − q, q (1 + r²))

and ``L₁(absorbed) <= L₁(true)`` exactly when ``r >= r* = √((1 − q)/q)``.  The L1 norm is always
smaller for the absorbed pair, by ``P q a (1 + r − √(1 + r²))`` per sample (the triangle inequality).  So for
``r >= r*`` every prefix weighting and every L1 coefficient prefer the absorbed dictionary; only a
term that sees its geometry can object: the decoder orthogonality penalty charges its pair
``cos² = 1/(1 + r²)`` each, ``2 / (n (1 + r²))`` of ``(1/n) Σ_i max_j cos²``, and that charge
shrinks as the child grows.  (Ideal encoders; the trained SAE's encoder and hedging add to this.)
"""

from __future__ import annotations

import math

from .common import format_table

__all__ = ["margins", "critical_ratio", "margins_table", "RATIOS", "PROBS"]

RATIOS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)  # the phase diagram's
PROBS = (0.25, 0.5, 0.75)


def critical_ratio(q: float) -> float:
    """``r* = √((1 − q)/q)``: from this child/parent magnitude ratio on, the absorbed pair's
    one-latent prefix is at least as good as the true pair's."""
    if not 0 < q <= 1:
        raise ValueError(f"q (the child's probability given the parent) must be in (0, 1], got {q!r}")
    return math.sqrt((1 - q) / q)


def margins(r: float, q: float, parent_p: float = 0.3, parent_magnitude: float = 2.0, n: int = 8) -> dict:
    """The true pair's expected terms minus the absorbed pair's (positive: the absorbed pair is
    better there): ``one_latent_prefix`` (``L₁``), ``l1`` (the L1 norm per sample) and
    ``orthogonality`` (the penalty's change per unit γ with ``n`` latents, negative: the penalty
    prefers the true pair); plus ``r_star`` and ``absorbed_wins`` (at least as good at every
    prefix and sparser)."""
    if not (r > 0 and 0 < q <= 1 and 0 < parent_p <= 1 and parent_magnitude > 0 and n >= 2):
        raise ValueError(f"need r > 0, 0 < q <= 1, 0 < parent_p <= 1, parent_magnitude > 0, n >= 2; got "
                         f"r={r!r}, q={q!r}, parent_p={parent_p!r}, parent_magnitude={parent_magnitude!r}, n={n!r}")
    energy = parent_p * parent_magnitude ** 2
    true_one = energy * min(q * r * r, 1.0)
    absorbed_one = energy * min(1 - q, q * (1 + r * r))
    l1 = parent_p * q * parent_magnitude * (1 + r - math.sqrt(1 + r * r))
    return {
        "r": r, "q": q, "r_star": critical_ratio(q),
        "one_latent_prefix": true_one - absorbed_one, "l1": l1,
        "orthogonality": -2.0 / (n * (1 + r * r)),
        "absorbed_wins": true_one >= absorbed_one,
    }


def margins_table(ratios=RATIOS, probs=PROBS, parent_p: float = 0.3, parent_magnitude: float = 2.0,
                  n: int = 8) -> str:
    """The margins over a grid of magnitude ratios and child probabilities, as a plain-text table."""
    rows = []
    for q in probs:
        for r in ratios:
            m = margins(r, q, parent_p, parent_magnitude, n)
            rows.append([f"{q:g}", f"{r:g}", f"{m['r_star']:.3f}", f"{m['one_latent_prefix']:+.3f}",
                         f"{m['l1']:+.3f}", f"{m['orthogonality']:+.4f}", "yes" if m["absorbed_wins"] else "no"])
    return format_table(rows, ["P(c|p)", "ratio r", "r*", "one-latent prefix", "L1", "orthogonality / gamma",
                               "absorbed >= true at every prefix"])
