"""The closed-form margins of the absorbed and the rotated pair against the true pair (child-magnitude
toy) against the losses the reference op computes on the toy's three kinds of sample, weighted by
their probabilities (exact expectations, no sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka import Prefixes, matryoshka_loss
from matryoshka.experiments.absorption_margins import critical_ratio, margins, margins_table, rotated_margins, rotated_table
from matryoshka.orthogonality import orthogonality_penalty

N = 8  # latents: the pair and six distractor directions, as the toy


def _expected_terms(r: float, q: float, P: float, a: float, absorbed: bool = False, n: int = N,
                    rotated: bool = False) -> dict:
    """Expected one-latent-prefix loss, L1 norm, active latents and orthogonality penalty of one
    dictionary (true, ``absorbed`` or ``rotated``), from the definition: the reference op on each
    kind of sample (none, parent alone, parent and child), latents sorted by energy as the trainer
    sorts them."""
    p, c = torch.eye(n, dtype=torch.float64)[:2]
    distractors = torch.eye(n, dtype=torch.float64)[2:]
    s = math.sqrt(1 + r * r)
    if absorbed:
        directions = [(p + r * c) / s, p]
        amplitudes = {"alone": [0.0, a], "both": [a * s, 0.0]}
    elif rotated:  # solve for the codes rather than write them down: only the directions are assumed
        directions = [(p + r * c) / s, (r * p - c) / s]
        basis = torch.stack(directions, 1)
        amplitudes = {kind: torch.linalg.lstsq(basis, x[:, None]).solution[:, 0].tolist()
                      for kind, x in (("alone", a * p), ("both", a * p + r * a * c))}
        assert min(amplitudes["alone"] + amplitudes["both"]) > -1e-12  # a ReLU SAE can encode it
    else:
        directions = [p, c]
        amplitudes = {"alone": [a, 0.0], "both": [a, r * a]}
    samples = {"alone": (P * (1 - q), a * p), "both": (P * q, a * p + r * a * c)}
    energy = [sum(prob * amplitudes[k][i] ** 2 for k, (prob, _) in samples.items()) for i in range(2)]
    order = sorted(range(2), key=lambda i: -energy[i])  # most energetic first
    W = torch.stack([directions[i] for i in order] + list(distractors))
    one_prefix, l1, l0 = 0.0, 0.0, 0.0
    for kind, (prob, x) in samples.items():
        acts = torch.zeros(1, n, dtype=torch.float64)
        acts[0, :2] = torch.tensor([amplitudes[kind][i] for i in order], dtype=torch.float64)
        out = matryoshka_loss(x[None], acts, W, None, Prefixes([1, 2]), backend="reference")
        assert out.per_prefix[1] < 1e-24  # both latents: exact
        one_prefix += prob * float(out.per_prefix[0])
        l1 += prob * float(acts.sum())
        l0 += prob * float((acts > 1e-12).sum())
    return {"one": one_prefix, "l1": l1, "l0": l0, "orthogonality": float(orthogonality_penalty(W, n))}


@pytest.mark.parametrize("r", [0.5, 1.0, 1.7, 2.0, 5.0, 10.0])
@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 1.0])
def test_margins_match_the_definition(r, q):
    P, a = 0.3, 2.0
    true, absorbed = (_expected_terms(r, q, P, a, absorbed=flag) for flag in (False, True))
    m = margins(r, q, P, a, N)
    assert m["one_latent_prefix"] == pytest.approx(true["one"] - absorbed["one"], abs=1e-12)
    assert m["l1"] == pytest.approx(true["l1"] - absorbed["l1"], abs=1e-12)
    assert m["orthogonality"] == pytest.approx(true["orthogonality"] - absorbed["orthogonality"], abs=1e-12)
    assert m["l1"] > 0 and m["orthogonality"] < 0  # sparsity always prefers absorption, the penalty never
    assert m["absorbed_wins"] == (r >= critical_ratio(q) - 1e-12) == (m["one_latent_prefix"] >= 0)


def test_critical_ratio_and_bad_inputs():
    assert critical_ratio(0.5) == 1.0 and critical_ratio(1.0) == 0.0
    assert critical_ratio(0.25) == pytest.approx(math.sqrt(3))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="q .* must be in"):
            critical_ratio(bad)
    with pytest.raises(ValueError, match="need r > 0"):
        margins(0.0, 0.5)
    table = margins_table(ratios=(1.0, 5.0), probs=(0.5,))
    assert table.splitlines()[2].split()[-1] == "yes" and table.splitlines()[3].split()[-1] == "yes"
    assert margins_table(ratios=(0.5,), probs=(0.5,)).splitlines()[2].split()[-1] == "no"


@pytest.mark.parametrize(("P", "a", "n"), [(0.2, 1.5, 8), (0.6, 3.0, 20)])
def test_margins_scale_with_the_toy(P, a, n):
    """Other parent probabilities, magnitudes and latent counts than the study's, against the definition."""
    true, absorbed = (_expected_terms(4.0, 0.4, P, a, absorbed=flag, n=n) for flag in (False, True))
    m = margins(4.0, 0.4, P, a, n)
    assert m["one_latent_prefix"] == pytest.approx(true["one"] - absorbed["one"], abs=1e-12)
    assert m["l1"] == pytest.approx(true["l1"] - absorbed["l1"], abs=1e-12)
    assert m["orthogonality"] == pytest.approx(true["orthogonality"] - absorbed["orthogonality"], abs=1e-12)
    row = margins_table(ratios=(4.0,), probs=(0.4,), parent_p=P, parent_magnitude=a, n=n).splitlines()[2].split()
    assert row[3:6] == [f"{m['one_latent_prefix']:+.3f}", f"{m['l1']:+.3f}", f"{m['orthogonality']:+.4f}"]


def test_defaults_are_the_child_magnitude_toy():
    """P 0.3, magnitude 2, 8 latents: the README's row at q = 0.5, r = 5, from its closed forms."""
    m = margins(5.0, 0.5)
    assert m == margins(5.0, 0.5, 0.3, 2.0, 8)
    assert m["one_latent_prefix"] == pytest.approx(0.3 * 4 * (1 - 0.5))
    assert m["l1"] == pytest.approx(0.3 * 0.5 * 2 * (6 - math.sqrt(26)))
    assert m["orthogonality"] == pytest.approx(-2 / (8 * 26)) and (m["r"], m["q"]) == (5.0, 0.5)
    row = next(line.split() for line in margins_table().splitlines() if line.split()[:2] == ["0.5", "5"])
    assert row[2:6] == ["1.000", "+0.600", "+0.270", "-0.0096"]
    assert [h.strip() for h in margins_table().splitlines()[0].split("  ") if h.strip()] == [
        "P(c|p)", "ratio r", "r*", "one-latent prefix", "L1", "orthogonality / gamma",
        "absorbed >= true at every prefix"]


@pytest.mark.parametrize("kwargs", [dict(q=0.0), dict(q=1.5), dict(parent_p=0.0), dict(parent_magnitude=0.0),
                                    dict(n=1), dict(parent_p=1.5)])
def test_margins_refuse_a_toy_that_is_not_one(kwargs):
    args = dict(r=2.0, q=0.5, parent_p=0.3, parent_magnitude=2.0, n=8) | kwargs
    with pytest.raises(ValueError, match="need r > 0"):
        margins(**args)
    # The edges of a toy are toys: a magnitude below 1, a parent on every sample, two latents.
    assert margins(2.0, 0.5, parent_magnitude=0.5)["l1"] > 0
    assert margins(2.0, 0.5, parent_p=1.0)["one_latent_prefix"] == pytest.approx(4 * 0.5)
    assert margins(2.0, 0.5, n=2)["orthogonality"] == pytest.approx(-1 / 5)


@pytest.mark.parametrize("r", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("q", [0.02, 0.2, 1 / 3, 0.5, 0.75, 1.0])
def test_rotated_margins_match_the_definition(r, q):
    P, a = 0.3, 2.0
    true, rotated = (_expected_terms(r, q, P, a, rotated=flag) for flag in (False, True))
    m = rotated_margins(r, q, P, a)
    assert m["one_latent_prefix"] == pytest.approx(true["one"] - rotated["one"], abs=1e-12)
    assert m["l1"] == pytest.approx(true["l1"] - rotated["l1"], abs=1e-12)
    assert m["l0"] == pytest.approx(true["l0"] - rotated["l0"], abs=1e-12)
    assert rotated["orthogonality"] == pytest.approx(true["orthogonality"], abs=1e-12)  # blind to the turn
    assert m["rotated_wins"] == (m["one_latent_prefix"] >= 0 and m["l1"] >= 0 and m["l0"] >= 0)


def test_the_rotation_wins_from_half_the_parents_samples():
    """At r = 1: the one-latent prefix from q = 1/3, the L1 norm from q = √2 − 1, the L0 count from
    q = 1/2 (a tie there), so all three from q = 1/2; Nabeshima's children (0.2) and the unequal toy's
    smaller ones (0.02, 0.15) keep the true pair."""
    assert rotated_margins(1.0, 1 / 3)["one_latent_prefix"] == pytest.approx(0.0, abs=1e-12)
    assert rotated_margins(1.0, 0.34)["one_latent_prefix"] > 0 > rotated_margins(1.0, 0.32)["one_latent_prefix"]
    assert rotated_margins(1.0, math.sqrt(2) - 1)["l1"] == pytest.approx(0.0, abs=1e-12)
    assert rotated_margins(1.0, 0.5)["l0"] == 0.0 and rotated_margins(1.0, 0.5)["rotated_wins"]
    assert not any(rotated_margins(1.0, q)["rotated_wins"] for q in (0.02, 0.15, 0.2, 0.45))
    assert all(rotated_margins(r, q)["rotated_wins"] for r in (0.5, 1.0, 2.0, 5.0) for q in (0.5, 0.75))
    row = next(line.split() for line in rotated_table().splitlines() if line.split()[:2] == ["0.5", "1"])
    assert row[2:] == ["+0.300", "+0.051", "+0.000", "yes"]
    assert next(line.split() for line in rotated_table().splitlines()
                if line.split()[:2] == ["0.333", "1"])[2] == "+0.000"  # the tie, not "-0.000"
    with pytest.raises(ValueError, match="need r > 0"):
        rotated_margins(1.0, 0.0)


def test_the_margins_command_prints_both_tables(capsys):
    """``python -m matryoshka child-magnitude --margins``: the README's two tables, no training."""
    from matryoshka.__main__ import main

    main(["child-magnitude", "--margins", "--phase-ratios", "1", "5", "--phase-probs", "0.5"])
    printed = capsys.readouterr().out
    assert margins_table(ratios=(1.0, 5.0), probs=(0.5,)) in printed
    assert rotated_table() in printed and printed.index("absorbed pair") < printed.index("rotated pair")


@pytest.mark.parametrize(("P", "a"), [(0.2, 1.5), (0.6, 3.0)])
def test_rotated_margins_scale_with_the_toy(P, a):
    """Other parent probabilities and magnitudes than the study's, against the definition; the
    defaults are the child-magnitude toy's; the table's header and a losing row."""
    true, rotated = (_expected_terms(1.5, 0.6, P, a, rotated=flag) for flag in (False, True))
    m = rotated_margins(1.5, 0.6, P, a)
    assert (m["r"], m["q"]) == (1.5, 0.6)
    for key, term in (("one_latent_prefix", "one"), ("l1", "l1"), ("l0", "l0")):
        assert m[key] == pytest.approx(true[term] - rotated[term], abs=1e-12)
    row = rotated_table(ratios=(1.5,), probs=(0.6,), parent_p=P, parent_magnitude=a).splitlines()[2].split()
    assert row[2:5] == [f"{m[k]:+.3f}" for k in ("one_latent_prefix", "l1", "l0")]
    assert rotated_margins(1.0, 0.5) == rotated_margins(1.0, 0.5, 0.3, 2.0)
    table = rotated_table(ratios=(1.0,), probs=(0.2,))
    assert [h.strip() for h in table.splitlines()[0].split("  ") if h.strip()] == [
        "P(c|p)", "ratio r", "one-latent prefix", "L1", "L0", "rotated >= true on all three"]
    assert table.splitlines()[2].split()[-1] == "no"


@pytest.mark.parametrize("r", [0.5, 1.0, 2.0])
def test_the_rotated_pair_is_nested_like_the_true_one_and_only_its_first_code_varies(r):
    """The codes solved from the directions (as ``_expected_terms``): in both pairs the second
    latent fires only on samples that fire the first (a firing hierarchy cannot tell them apart);
    the first latent's code is constant in the true pair, and varies by 1 + r² in the rotated one."""
    a = 2.0
    p, c = torch.eye(2, dtype=torch.float64)
    s = math.sqrt(1 + r * r)
    samples = {"alone": a * p, "both": a * p + r * a * c}
    for directions, first_code_ratio in (([p, c], 1.0), ([(p + r * c) / s, (r * p - c) / s], 1 + r * r)):
        basis = torch.stack(directions, 1)
        codes = {kind: torch.linalg.lstsq(basis, x[:, None]).solution[:, 0] for kind, x in samples.items()}
        fires = {kind: code > 1e-12 for kind, code in codes.items()}
        assert all(bool(fires[kind][0]) for kind in samples if fires[kind][1])  # second => first
        assert any(bool(fires[kind][1]) for kind in samples) and min(float(v.min()) for v in codes.values()) > -1e-12
        assert float(codes["both"][0] / codes["alone"][0]) == pytest.approx(first_code_ratio, rel=1e-12)
