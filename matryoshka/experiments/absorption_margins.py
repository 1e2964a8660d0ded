"""Why no prefix weighting prevents the large-child absorption, or the rotation of a frequent child:
the absorbed and the rotated dictionaries against the true one, term by term, in closed form.

The child-magnitude toy's pair: a parent (unit direction ``p``, probability ``P``, magnitude ``a``)
and a child (unit ``c ⟂ p``) that fires only with it (probability ``q`` given the parent) with
magnitude ``r·a``.  Three dictionaries reconstruct every sample exactly with both their latents:

* **true**: latent ``p`` fires with ``a`` on every parent sample, latent ``c`` with ``r·a`` on child
  samples;
* **absorbed**: latent ``u = (p + r c)/√(1 + r²)`` fires with ``a·√(1 + r²)`` on child samples, latent
  ``p`` with ``a`` on parent-alone samples (the parent's latent is silent when the child fires);
* **rotated**: ``u`` as in the absorbed pair, and ``v = (r p − c)/√(1 + r²) ⟂ u`` in place of ``p``:
  a parent-alone sample is ``a (u + r v)/√(1 + r²)`` (both latents fire, codes >= 0), a child sample
  ``a√(1 + r²) u`` (one latent).  At ``r = 1`` it is the 45° turn of the true pair.

The distractors are the same in all three, so they cancel.  A prefix holds neither latent of the pair
(the same loss in all), both (exact in all), or one; the Matryoshka loss of any prefix weighting
is therefore ``W₁ · L₁`` plus terms that are equal, ``W₁`` the weight on the prefixes that hold just
one latent and ``L₁`` that prefix's expected loss.  With latents sorted by energy (the trainer's
rule), the kept latent is the more energetic one, so

    L₁(true)     = P a² · min(q r², 1)
    L₁(absorbed) = P a² · min(1 − q, q (1 + r²))
    L₁(rotated)  = P a² · min((1 − q) r²/(1 + r²), q (1 + r²) + (1 − q)/(1 + r²))

(an orthonormal pair loses the other latent's energy).  ``L₁(absorbed) <= L₁(true)`` exactly when
``r >= r* = √((1 − q)/q)``.  The L1 norm is always smaller for the absorbed pair, by
``P q a (1 + r − √(1 + r²))`` per sample (the triangle inequality).  So for ``r >= r*`` every prefix
weighting and every L1 coefficient prefer the absorbed dictionary; only a term that sees its geometry
can object: the decoder orthogonality penalty charges its pair ``cos² = 1/(1 + r²)`` each,
``2 / (n (1 + r²))`` of ``(1/n) Σ_i max_j cos²``, and that charge shrinks as the child grows.

The rotated pair is orthogonal, so the penalty cannot tell it from the true one.  Its L1 norm per
sample is ``P a ((1 − q)(1 + r)/√(1 + r²) + q √(1 + r²))`` against ``P a (1 + q r)``, and it fires
``P (2 − q)`` latents against ``P (1 + q)``.  At ``r = 1`` it wins the one-latent prefix from
``q > 1/3`` and the L1 norm from ``q > √2 − 1``, and ties the L0 count at ``q = 1/2``: a child present
on half its parent's samples is better served, by every term of a ReLU Matryoshka SAE with the
penalty, by the 45° turn of the pair.  (Ideal encoders; the trained SAE's encoder and hedging add
to this.)

Nor would a rule on firing that knows the hierarchy ("a child's latent fires only with its
parent's"): the rotated pair obeys it.  ``v`` fires only on parent-alone samples, and ``u`` fires on
every one of them, so ``v`` is nested in ``u`` as ``c`` is in ``p``: a latent for "the parent without
the child".  What sets the true pair apart is ``u``'s code, ``a/√(1 + r²)`` alone and ``a√(1 + r²)``
with the child (a factor ``1 + r²``), where ``p``'s is ``a`` on every parent sample.
"""

from __future__ import annotations

import math

from .common import format_table

__all__ = ["margins", "rotated_margins", "critical_ratio", "margins_table", "rotated_table", "RATIOS", "PROBS",
           "ROTATED_PROBS"]

RATIOS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)  # the phase diagram's
PROBS = (0.25, 0.5, 0.75)
# The rotated pair's grid: Nabeshima's children (0.2) and the unequal toy's (0.02, 0.15, 0.5).
ROTATED_PROBS = (0.02, 0.15, 0.2, 1 / 3, 0.5, 0.75)
ROTATED_RATIOS = (0.5, 1.0, 2.0)


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
    _check_pair(r, q, parent_p, parent_magnitude, n)
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


def _check_pair(r, q, parent_p, parent_magnitude, n=2) -> None:
    if not (r > 0 and 0 < q <= 1 and 0 < parent_p <= 1 and parent_magnitude > 0 and n >= 2):
        raise ValueError(f"need r > 0, 0 < q <= 1, 0 < parent_p <= 1, parent_magnitude > 0, n >= 2; got "
                         f"r={r!r}, q={q!r}, parent_p={parent_p!r}, parent_magnitude={parent_magnitude!r}, n={n!r}")


def rotated_margins(r: float, q: float, parent_p: float = 0.3, parent_magnitude: float = 2.0) -> dict:
    """The true pair's expected terms minus the rotated pair's (positive: the rotated pair is
    better there): ``one_latent_prefix`` (``L₁``), ``l1`` (the L1 norm per sample) and ``l0`` (the
    latents that fire per sample); the orthogonality penalty is the same for both (0 for the pair).
    ``rotated_wins``: at least as good on all three."""
    _check_pair(r, q, parent_p, parent_magnitude)
    energy = parent_p * parent_magnitude ** 2
    s = 1 + r * r
    u_energy, v_energy = q * s + (1 - q) / s, (1 - q) * r * r / s
    true_one = energy * min(q * r * r, 1.0)
    rotated_one = energy * min(u_energy, v_energy)
    l1 = parent_p * parent_magnitude * ((1 + q * r) - ((1 - q) * (1 + r) / math.sqrt(s) + q * math.sqrt(s)))
    l0 = parent_p * ((1 + q) - (2 - q))
    return {"r": r, "q": q, "one_latent_prefix": true_one - rotated_one, "l1": l1, "l0": l0,
            "rotated_wins": true_one >= rotated_one and l1 >= 0 and l0 >= 0}


def rotated_table(ratios=ROTATED_RATIOS, probs=ROTATED_PROBS, parent_p: float = 0.3,
                  parent_magnitude: float = 2.0) -> str:
    """The rotated pair's margins over a grid of child probabilities and magnitude ratios."""
    rows = []
    for q in probs:
        for r in ratios:
            m = rotated_margins(r, q, parent_p, parent_magnitude)
            rows.append([f"{q:.3g}", f"{r:g}", *[_signed(m[k]) for k in ("one_latent_prefix", "l1", "l0")],
                         "yes" if m["rotated_wins"] else "no"])
    return format_table(rows, ["P(c|p)", "ratio r", "one-latent prefix", "L1", "L0", "rotated >= true on all three"])


def _signed(value: float) -> str:
    """``+0.123``; a tie that rounding leaves a hair below 0 prints as ``+0.000``, not ``-0.000``."""
    return f"{(value if abs(value) >= 5e-13 else 0.0):+.3f}"


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
