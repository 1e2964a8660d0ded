"""Un-turning (``matryoshka.unturn``): a turned family re-based onto its true pair, a true dictionary
left alone, the decoder norms kept, bad settings refused; and the ``unturn`` study from the command
line (and ``--replot``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from matryoshka.experiments import unturn as study
from matryoshka.experiments.common import RunSpec
from matryoshka.experiments.hedging import family_toy_spec
from matryoshka.toy import ToyModel
from matryoshka.train import train
from matryoshka.unturn import PARENT_RULES, unturn


def _toy_and_truth(q: float = 0.5, rotation_seed: int | None = None):
    """The unequal toy at ``q`` and an SAE at its true dictionary (unit rows, tied encoder, zero
    biases); with ``rotation_seed``, the toy's directions turned by a random orthogonal matrix
    first (the same problem in other coordinates: other signs for the eigenvectors found)."""
    spec = family_toy_spec(f"unequal-q{q:g}")
    toy = ToyModel(spec)
    if rotation_seed is not None:
        turn, _ = torch.linalg.qr(torch.randn(toy.d, toy.d, generator=torch.Generator().manual_seed(rotation_seed)))
        toy.directions = toy.directions @ turn
    return toy, RunSpec(spec, "every-b0.2-fromtruth", 0, 1).build_sae(toy)


def _turn(sae, toy, families):
    """Put the given families' (parent, most frequent child) latents on the turned pair: along
    (p̂ + ĉ)/√2 and (p̂ − ĉ)/√2, encoder tied, zero biases (how a random start ends at q = 1/2)."""
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    planes = toy.family_planes()
    with torch.no_grad():
        for family in families:
            parent, child, _ = planes[family]
            for latent, row in ((parent, unit[parent] + unit[child]), (child, unit[parent] - unit[child])):
                sae.W_dec[latent] = row / math.sqrt(2)
                sae.W_enc[:, latent] = sae.W_dec[latent]
                sae.b_enc[latent] = -0.01  # a trained bias: the re-basing resets it


def _samples(toy, rows=20_000):
    return toy.sample(rows, torch.Generator().manual_seed(7))[0]


@pytest.mark.parametrize("parent_rule", PARENT_RULES)
@pytest.mark.parametrize("q, rotation_seed", [(0.5, None), (0.6, None), (0.7, None), (0.5, 0), (0.5, 1), (0.5, 2)])
def test_a_turned_family_is_rebased_onto_its_true_pair(q, rotation_seed, parent_rule):
    toy, sae = _toy_and_truth(q, rotation_seed)
    _turn(sae, toy, families=[0, 2])
    moved = unturn(sae, _samples(toy), resort=False, parent_rule=parent_rule)
    sae.requires_grad_(False)
    planes = toy.family_planes()
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    # the container latent (fires on every family row) takes the parent, the nested one the child
    if parent_rule == "least-varying":
        assert sorted((m.parent, m.children) for m in moved) == [(planes[f][0], (planes[f][1],)) for f in (0, 2)]
    else:  # the span holding the most energy may take the true sibling's latent too, and leave it on the sibling
        assert sorted(m.parent for m in moved) == [planes[f][0] for f in (0, 2)]
        assert all(dict((p, c) for p, c, _ in planes)[m.parent] in m.children for m in moved)
        for latent in {c for m in moved for c in m.children}:
            assert float(sae.W_dec[latent] @ unit[latent]) == pytest.approx(1.0, abs=1e-6)
    for m in moved:
        parent, child, _ = next(plane for plane in planes if plane[0] == m.parent)
        assert float(sae.W_dec[m.parent] @ unit[parent]) == pytest.approx(1.0, abs=1e-6)
        assert float(sae.W_dec[child] @ unit[child]) == pytest.approx(1.0, abs=1e-6)
        assert m.angle == pytest.approx(45.0, abs=1e-4)
        assert m.parent_spread == pytest.approx(0.0, abs=1e-6)
        assert torch.allclose(sae.W_enc[:, m.parent], sae.W_dec[m.parent]) and float(sae.b_enc[m.parent]) == 0.0
    # the untouched family's latents stay where they were
    untouched = planes[1][:2]
    assert all(float(sae.W_dec[f] @ unit[f]) == pytest.approx(1.0, abs=1e-6) for f in untouched)


# Rows of a three-way turn (columns along the parent, the child and the sibling): read off a trained
# seed at σ = 0 and at σ = 0.3 (q = 0.7, every-b0.2-orth3, seed 0), each made orthonormal.
THREE_WAY = torch.tensor([[0.66, 0.75, 0.0], [0.43, -0.38, 0.82], [0.62, -0.54, -0.57]])
THREE_WAY_SPREAD = torch.tensor([[0.637, 0.771, 0.025], [0.286, -0.255, 0.924], [0.726, -0.577, -0.375]])


@pytest.mark.parametrize("parent_rule, parent_std, rows", [
    ("least-varying", 0.0, THREE_WAY), ("uncorrelated", 0.0, THREE_WAY), ("uncorrelated", 0.2, THREE_WAY),
    ("uncorrelated", 0.3, THREE_WAY), ("uncorrelated", 0.3, THREE_WAY_SPREAD)])
def test_a_three_way_turn_with_the_sibling_is_rebased_onto_the_truth(parent_rule, parent_std, rows):
    """At q = 0.7 trained SAEs turn the parent, its frequent child and their exclusive sibling
    together: three latents, each mixing all three (the rows below, read off a trained seed and made
    orthonormal).  The container takes the parent, the other two the child and the sibling; with
    the uncorrelated rule also when the parent's magnitude varies.  With the σ = 0.3 rows the plane
    of the container and the sibling's latent holds a direction that varies less than the parent
    (0.291 against 0.305): the span is chosen by the rows' energy it holds, not by least variation."""
    spec = study.with_parent_std(family_toy_spec("unequal-q0.7"), parent_std)
    toy = ToyModel(spec)
    sae = RunSpec(spec, "every-b0.2-fromtruth", 0, 1).build_sae(toy)
    parent, child, _ = toy.family_planes()[0]
    sibling = max((f for f in dict(toy.families())[parent] if f != child),
                  key=lambda f: float(toy.marginal_probabilities()[f]))
    # columns along (parent, child, sibling)
    mixing, _ = torch.linalg.qr(rows.T)
    mixing = mixing.T * torch.sign(mixing.T[:, :1])  # rows as read: positive along the parent
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    latents = (parent, sibling, child)  # the second row lies most along the sibling, the third along the child
    with torch.no_grad():
        for latent, row in zip(latents, mixing):
            sae.W_dec[latent] = row @ unit[[parent, child, sibling]]
            sae.W_enc[:, latent] = sae.W_dec[latent]
    # the parent's own spread dilutes the turned codes' correlation (the child's latent: 0.65 at
    # σ = 0, 0.45 at σ = 0.2, 0.26 at σ = 0.3), so the detection threshold is lowered with it
    [moved] = unturn(sae, _samples(toy), resort=False, parent_rule=parent_rule,
                     min_correlation={0.0: 0.5, 0.2: 0.4, 0.3: 0.25}[parent_std])
    sae.requires_grad_(False)
    assert moved.parent == parent and sorted(moved.children) == sorted((child, sibling))
    for latent in latents:
        assert float(sae.W_dec[latent] @ unit[latent]) == pytest.approx(1.0, abs=1e-5 if parent_std else 1e-6)
    assert moved.parent_spread == pytest.approx(parent_std, abs=0.01)  # the parent's own spread


@pytest.mark.parametrize("parent_rule", PARENT_RULES)
def test_a_turned_direction_split_over_two_latents_is_rebased_onto_the_truth(parent_rule):
    """A hedge: the turned pair's second direction shared by two latents that lean either way off
    the family's plane, along a spare dimension no row uses.  Each latent alone spans a plane
    holding a constant-projection direction tilted off ``p``; with both, the span holds ``p``, on
    which the rows project furthest, and the spare dimension is dropped (no rows' energy there)."""
    spec = {**family_toy_spec("unequal-q0.5"), "d": 21}  # one dimension more than features
    toy = ToyModel(spec)
    sae = RunSpec(spec, "every-b0.2-fromtruth", 0, 1).build_sae(toy)
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    spare = torch.linalg.svd(unit).Vh[-1]  # orthogonal to every feature
    parent, child, _ = toy.family_planes()[0]
    helper = next(f for f in range(toy.num_features) if f not in (parent, child) and toy.parents[f] == -1
                  and f not in dict(toy.families()))  # a distractor's latent lends itself to the hedge
    turned, second = (unit[parent] + unit[child]) / math.sqrt(2), (unit[parent] - unit[child]) / math.sqrt(2)
    with torch.no_grad():
        for latent, row in ((parent, turned), (child, 0.8 * second + 0.6 * spare), (helper, 0.8 * second - 0.6 * spare)):
            sae.W_dec[latent] = row
            sae.W_enc[:, latent] = row
    rebased = {m.parent: m for m in unturn(sae, _samples(toy), resort=False, parent_rule=parent_rule)}
    sae.requires_grad_(False)
    moved = rebased.pop(parent)
    assert all(m.angle < 1e-4 for m in rebased.values())  # true families stay where they are
    assert sorted(moved.span) == sorted((child, helper))
    assert float(sae.W_dec[parent] @ unit[parent]) == pytest.approx(1.0, abs=1e-6)
    [taker] = moved.children
    assert float(sae.W_dec[taker] @ unit[child]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q", [0.5, 0.7])
def test_a_parent_whose_magnitude_varies_needs_the_uncorrelated_rule(q):
    """Parents of magnitude N(1, 0.2²): the least-varying direction C⁻¹μ leans off the parent
    towards its children by at least atan(σ²/(1−q)) (the one-child bound of the module doc; the
    sibling adds to it), while the uncorrelated rule finds the parent and the children."""
    std = 0.2
    spec = study.with_parent_std(family_toy_spec(f"unequal-q{q:g}"), std)
    toy = ToyModel(spec)
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    planes = {parent: child for parent, child, _ in toy.family_planes()}
    tilts = {}
    for rule in PARENT_RULES:
        sae = RunSpec(spec, "every-b0.2-fromtruth", 0, 1).build_sae(toy)
        _turn(sae, toy, families=[0, 2])
        moved = unturn(sae, _samples(toy), resort=False, parent_rule=rule)
        sae.requires_grad_(False)
        assert sorted(m.parent for m in moved) == sorted(toy.family_planes()[f][0] for f in (0, 2))
        rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        tilts[rule] = [math.degrees(math.acos(min(1.0, float(rows[m.parent] @ unit[m.parent])))) for m in moved]
        if rule == "uncorrelated":
            child_tilts = [math.degrees(math.acos(min(1.0, float(rows[planes[m.parent]] @ unit[planes[m.parent]]))))
                           for m in moved]
            assert max(child_tilts) < 0.2
    assert min(tilts["least-varying"]) >= 0.8 * math.degrees(math.atan(std**2 / (1 - q)))
    # refined on the rows holding the parent alone (the eigenvector alone was 0.1–7.5° off here)
    assert max(tilts["uncorrelated"]) < 0.2


@pytest.mark.parametrize("level", [1.0, 3.0])
@pytest.mark.parametrize("turn", range(0, 360, 45))
def test_step_two_on_a_parent_and_child_plane_in_any_basis(turn, level):
    """Step 2 alone, in the plane of a parent of magnitude N(m, (0.2 m)²) and a child of magnitude 1
    (q = 0.7) written in a basis turned by ``turn`` degrees (an eigenvector's sign is arbitrary
    there): the uncorrelated rule gives the parent, oriented along the rows; the least-varying one
    leans towards the child by atan(σ²/(m(1−q))) (7.6° at m = 1, with the sample's σ, m and q).  At
    m = 3 the parent's variance (0.36) exceeds the child's (0.21) but its coefficient of variation
    does not: the parent is the least *relatively* varying eigenvector, not the least varying."""
    from matryoshka.unturn import _parent_direction

    generator = torch.Generator().manual_seed(turn)
    rows = 200_000
    magnitude = level * (1 + 0.2 * torch.randn(rows, generator=generator, dtype=torch.float64))
    child = (torch.rand(rows, generator=generator, dtype=torch.float64) < 0.7).double()
    angle = math.radians(turn)
    parent_axis = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    child_axis = torch.tensor([-math.sin(angle), math.cos(angle)], dtype=torch.float64)
    coords = magnitude[:, None] * parent_axis + child[:, None] * child_axis
    u = _parent_direction(coords, "uncorrelated")
    assert float(u @ parent_axis) == pytest.approx(1.0, abs=1e-4)
    u = _parent_direction(coords, "least-varying")
    lean = math.degrees(math.atan2(float(u @ child_axis), float(u @ parent_axis)))
    q = float(child.mean())
    assert lean == pytest.approx(math.degrees(math.atan(float(magnitude.var()) / (float(magnitude.mean()) * (1 - q)))),
                                 abs=0.3)


def test_with_parent_std_draws_only_the_family_parents_magnitudes():
    spec = family_toy_spec("unequal-q0.7")
    assert study.with_parent_std(spec, 0.0) is spec
    varied = study.with_parent_std(spec, 0.3)
    parents = [f for f in varied["features"] if f.get("children")]
    assert len(parents) == 3 and all(f["magnitude"] == {"mean": 1.0, "std": 0.3} for f in parents)
    assert all("magnitude" not in c for f in parents for c in f["children"])
    assert all("magnitude" not in f for f in varied["features"] if not f.get("children"))
    assert all("magnitude" not in f for f in spec["features"])  # the given spec is left as it was
    toy = ToyModel(varied)
    parent = toy.family_planes()[0][0]
    codes = toy.sample(20_000, torch.Generator().manual_seed(0))[1][:, parent]
    firing = codes[codes > 0]
    assert float(firing.mean()) == pytest.approx(1.0, abs=0.02) and float(firing.std()) == pytest.approx(0.3, abs=0.02)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="parent_std must be a finite number >= 0"):
            study.with_parent_std(spec, bad)


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_a_parent_whose_magnitude_depends_on_its_child_turns_the_least_varying_rule_off_the_truth(scale):
    """A true dictionary whose parents' codes are ``s`` times larger where the most frequent child
    fires: the codes correlate, so every family is re-based.  The least-varying rule takes the
    direction orthogonal to the rows' difference ``(s − 1)p + c``, atan((s − 1)|p|/|c|) off the
    parent (the inputs of a fixed parent whose child leans towards it); the uncorrelated rule's
    refinement, on the rows holding the parent alone, keeps the truth."""
    spec = study.with_parent_scale(family_toy_spec("unequal-q0.7"), scale)
    toy = ToyModel(spec)
    norms = toy.directions.norm(dim=1)
    unit = toy.directions / norms[:, None]
    planes = {parent: child for parent, child, _ in toy.family_planes()}
    for rule in PARENT_RULES:
        sae = RunSpec(spec, "every-b0.2-fromtruth", 0, 1).build_sae(toy)
        moved = unturn(sae, _samples(toy), resort=False, parent_rule=rule)
        sae.requires_grad_(False)
        assert sorted(m.parent for m in moved) == sorted(planes)
        for m in moved:
            child = planes[m.parent]
            expected = math.degrees(math.atan((scale - 1) * float(norms[m.parent] / norms[child])))
            assert m.angle == pytest.approx(expected if rule == "least-varying" else 0.0, abs=1e-3)
            assert float(sae.W_dec[child] @ unit[child]) == pytest.approx(
                math.cos(math.radians(expected)) if rule == "least-varying" else 1.0, abs=1e-5)


def test_with_parent_scale_scales_each_parent_with_its_most_frequent_child_only():
    spec = family_toy_spec("unequal-q0.7")
    assert study.with_parent_scale(spec, 1.0) is spec
    scaled = study.with_parent_scale(spec, 1.5)
    children = [f["children"] for f in scaled["features"] if f.get("children")]
    assert len(children) == 3
    assert all([c.get("parent_scale", 1.0) for c in group] == [1.0, 1.0, 1.5] for group in children)  # p 0.02, 0.15, 0.7
    assert all("parent_scale" not in c for f in spec["features"] for c in f.get("children", []))  # left as it was
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="parent_scale must be a finite number > 0"):
            study.with_parent_scale(spec, bad)


def test_a_true_dictionary_is_left_alone():
    """A true parent's code is constant on its rows: no nested latent's code correlates with it."""
    toy, sae = _toy_and_truth()
    before = {name: value.clone() for name, value in sae.state_dict().items()}
    assert unturn(sae, _samples(toy)) == []
    assert all(torch.equal(before[name], value) for name, value in sae.state_dict().items())


def test_decoder_norms_are_kept():
    toy, sae = _toy_and_truth()
    _turn(sae, toy, families=[1])
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.config.n)[:, None])
    norms = sae.W_dec.norm(dim=1).clone()
    [moved] = unturn(sae, _samples(toy), resort=False)
    assert torch.allclose(sae.W_dec.norm(dim=1), norms, rtol=1e-6)
    assert float(sae.W_enc[:, moved.parent].detach().norm()) == pytest.approx(1.0)


def test_too_few_firings_leave_the_pair_alone():
    toy, sae = _toy_and_truth()
    _turn(sae, toy, families=[0])
    assert unturn(sae, _samples(toy, rows=300), min_firings=300) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"x": torch.zeros(5, 3)}, "x must be"),
    ({"nesting": 0.0}, "nesting"),
    ({"min_correlation": 1.5}, "min_correlation"),
    ({"min_firings": 1}, "min_firings"),
    ({"energy": 1.0}, "energy"),
    ({"parent_rule": "largest"}, "parent_rule must be one of"),
])
def test_bad_settings_are_refused(kwargs, match):
    toy, sae = _toy_and_truth()
    with pytest.raises(ValueError, match=match):
        unturn(sae, **{"x": _samples(toy, rows=100), **kwargs})


def test_cli_runs_and_replots_the_study(tmp_path, capsys, monkeypatch):
    from matryoshka.__main__ import main

    main(["unturn", "--out", str(tmp_path), "--steps", "60", "--retrain-steps", "20", "--seeds", "2", "--jobs", "1",
          "--qs", "0.5", "--retrain-resort-every", "25", "--min-correlation", "0.45", "--parent-scale", "1.2",
          "--retrain-beta", "0.5"])
    first = capsys.readouterr().out
    payload = json.loads((tmp_path / "unturn_results.json").read_text())
    runs = payload["runs"]
    assert (payload["retrain_warmup"], payload["retrain_resort_every"]) == (None, 25)
    assert all(run["spec"]["retrain_resort_every"] == 25 and run["spec"]["min_correlation"] == 0.45
               and run["spec"]["retrain_beta"] == 0.5 for run in runs)
    assert "the recipe's warm-up, re-sorted every 25 steps; inner prefixes ×0.5" in (tmp_path / "unturn_results.md").read_text()
    assert payload["parent_scale"] == 1.2 and "×1.2 where the most frequent child fires" in (
        tmp_path / "unturn_results.md").read_text()
    assert all(sorted(c.get("parent_scale", 1) for c in f["children"]) == [1, 1, 1.2]
               for run in runs for f in run["spec"]["toy_spec"]["features"] if f.get("children"))
    assert len(runs) == 2 and all(list(run["stages"]) == list(study.STAGES) for run in runs)
    assert all(len(stage["families"]) == 3 for run in runs for stage in run["stages"].values())
    # the control starts from the trained SAE, the re-based run from the re-based one: without
    # pairs to re-base the two train the same SAE on the same data
    for run in runs:
        if not run["moved"]:
            assert run["stages"]["re-based, trained on"] == run["stages"]["control: trained on"]
    assert payload["reused"] == 0 and "reused" not in (tmp_path / "unturn_results.md").read_text()
    # the same command again: every run from the run cache, which the results say
    main(["unturn", "--out", str(tmp_path), "--steps", "60", "--retrain-steps", "20", "--seeds", "2", "--jobs", "1",
          "--qs", "0.5", "--retrain-resort-every", "25", "--min-correlation", "0.45", "--parent-scale", "1.2",
          "--retrain-beta", "0.5"])
    capsys.readouterr()
    assert json.loads((tmp_path / "unturn_results.json").read_text())["reused"] == 2
    assert "2 runs (2 reused from run_cache: their training is not in the wall time)" in (
        tmp_path / "unturn_results.md").read_text()
    (tmp_path / "unturn_states.png").unlink()
    monkeypatch.setattr(study, "run_many", lambda *args, **kwargs: pytest.fail("--replot must not train"))
    main(["unturn", "--replot", "--out", str(tmp_path)])
    again = capsys.readouterr().out
    assert (tmp_path / "unturn_states.png").exists()
    table = lambda text: text[text.index("q    "):text.index("wrote")]  # noqa: E731
    assert table(again) == table(first)
    states, paths = table(first).strip().split("\n\n")
    assert len(states.splitlines()) == 2 + len(study.STAGES) and len(paths.splitlines()) == 3


@pytest.mark.parametrize("keys, order", [({"order": "children-last", "resort": True}, "children-last"),
                                         ({"resort": True}, "re-sorted"), ({"resort": False}, "kept"), ({}, "kept")])
def test_the_results_title_names_the_order_of_payloads_from_every_version(keys, order):
    """A payload from before ``order`` said ``resort``, and one from before that kept the order."""
    settings = {"mode": study.DEFAULT_MODE, "steps": 10, "retrain_steps": 5, "seeds": 1, **keys}
    assert f"re-based (order: {order}), then 5 more" in study._settings_text(settings)


def test_a_sibling_is_entangled_when_a_latent_lies_along_it_and_the_pair():
    toy, sae = _toy_and_truth()
    cos = torch.eye(toy.num_features, sae.config.n).T  # latent f along feature f: nothing entangled
    assert study._entangled(cos, toy) == [False, False, False]
    parent, child, _ = toy.family_planes()[1]
    siblings = [f for f in dict(toy.families())[parent] if f != child]
    sibling = max(siblings, key=lambda f: float(toy.marginal_probabilities()[f]))
    assert float(toy.marginal_probabilities()[sibling]) > min(float(toy.marginal_probabilities()[f]) for f in siblings)
    cos[child, sibling] = cos[child, child] = 0.7  # the child's latent half along the sibling
    assert study._entangled(cos, toy) == [False, True, False]
    cos[child, sibling] = 0.2
    assert study._entangled(cos, toy) == [False, False, False]
    rarest = min(siblings, key=lambda f: float(toy.marginal_probabilities()[f]))
    cos[child, rarest] = 0.7  # along the rarest child: not the sibling that enters the span
    assert study._entangled(cos, toy) == [False, False, False]


def test_refuses_bad_step_counts_retrain_and_order(tmp_path):
    with pytest.raises(ValueError, match="retrain_steps"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=0, seeds=1)
    with pytest.raises(ValueError, match="retrain must be one of"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, retrain="frozen")
    with pytest.raises(ValueError, match="order must be one of"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, order="reversed")
    with pytest.raises(ValueError, match="parent_rule must be one of"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, parent_rule="largest")
    with pytest.raises(ValueError, match="parent_std must be"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, parent_std=-1.0)
    with pytest.raises(ValueError, match="parent_scale must be"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, parent_scale=0.0)
    with pytest.raises(ValueError, match="min_correlation must be in"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, min_correlation=1.5)
    with pytest.raises(ValueError, match="retrain_warmup must be a share"):
        study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, retrain_warmup=1.5)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="retrain_resort_every must be an integer >= 0"):
            study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, retrain_resort_every=bad)
    for bad, mode in ((0.0, "every-b0.2-batchtopk-orth3"), (math.inf, "every-b0.2-batchtopk-orth3"), (1.3, study.DEFAULT_MODE)):
        with pytest.raises(ValueError, match="retrain_budget must be a finite number > 0 .* with a BatchTopK mode"):
            study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, retrain_budget=bad, mode=mode)
    for bad, mode in ((-0.1, study.DEFAULT_MODE), (math.nan, study.DEFAULT_MODE), (0.5, "vanilla-orth3")):
        with pytest.raises(ValueError, match="retrain_beta must be a finite number >= 0 .* with an 'every' mode"):
            study.unturn_study(tmp_path, qs=(0.5,), steps=10, retrain_steps=10, seeds=1, retrain_beta=bad, mode=mode)


@pytest.mark.parametrize("warmup, resort_every, beta", [(None, None, None), (0.0, 25, 0.0), (0.2, 0, 1.0)])
def test_the_schedule_given_for_training_on_reaches_both_stages_trained_on_and_nothing_else(monkeypatch, warmup,
                                                                                           resort_every, beta):
    configs = []

    def recording_train(sae, sampler, config):
        configs.append(config)
        return train(sae, sampler, config)

    rebasings = []

    def recording_unturn(sae, x, **settings):
        rebasings.append(settings)
        return unturn(sae, x, **settings)

    monkeypatch.setattr(study, "train", recording_train)
    monkeypatch.setattr(study, "unturn", recording_unturn)
    spec = study.UnturnSpec(family_toy_spec("unequal-q0.7"), study.DEFAULT_MODE, 0, steps=30, retrain_steps=20,
                            samples=1_000, retrain_warmup=warmup, retrain_resort_every=resort_every,
                            retrain_beta=beta, parent_rule="uncorrelated", min_correlation=0.4)
    study.run_unturn(spec)
    assert rebasings == [{"resort": True, "parent_rule": "uncorrelated", "min_correlation": 0.4}]
    recipe = RunSpec(spec.toy_spec, spec.mode, spec.seed, spec.steps).train_config(ToyModel(spec.toy_spec))
    assert len(configs) == len(study.TRAINED_ON)
    for config in configs:
        assert config.steps == 20
        assert config.warmup_frac == (recipe.warmup_frac if warmup is None else warmup)
        assert config.resort_every == (recipe.resort_every if resort_every is None else resort_every)
        assert config.balance_beta == (recipe.balance_beta if beta is None else beta)
    assert (recipe.warmup_frac, recipe.resort_every, recipe.balance_beta) == (0.05, 100, 0.2)  # as the study's docs say


@pytest.mark.parametrize("retrain", study.RETRAINS)
def test_training_on_records_the_coefficient_the_retrain_setting_gives(retrain):
    """"fixed" holds the coefficient at the recipe's start; the recipe adapts it (a re-based or a
    short-trained SAE is far from the toy's L0, so it moves)."""
    toy_spec = family_toy_spec("unequal-q0.7")
    result = study.run_unturn(study.UnturnSpec(toy_spec, study.DEFAULT_MODE, 0, steps=60, retrain_steps=40,
                                               samples=2_000, retrain=retrain))
    for stage in study.TRAINED_ON:
        low, high = result["stages"][stage]["coeff_end"], result["stages"][stage]["coeff_max"]
        assert low <= high
        if retrain == "fixed":
            assert low == pytest.approx(1e-3) and high == pytest.approx(1e-3)
        else:
            assert high > 1e-3 * 1.01 or low < 1e-3 / 1.01
    assert all("coeff_max" not in result["stages"][stage] for stage in study.STAGES[:2])


def test_a_code_constant_to_rounding_correlates_with_nothing():
    """A true parent's float32 codes vary by rounding only; that noise must not read as a turn."""
    from matryoshka.unturn import _correlation

    child = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    noise = 1e-7 * (child - 0.5)  # rounding that happens to follow the child: correlation 1
    assert _correlation(1.0 + noise, child) == 0.0
    assert _correlation(child, 1.0 + noise) == 0.0
    turned = 1.0 + 0.4 * child  # a real variation: a turned pair's parent code
    assert _correlation(turned, child) == pytest.approx(1.0)
    assert _correlation(turned, -child) == pytest.approx(-1.0)


def test_rebased_latents_are_resorted_by_energy_and_their_indices_follow():
    """The child's latent takes the turned latent's place, here the last one, behind unrelated
    latents; re-sorted, every latent's energy is at most its predecessor's and the returned
    indices name the re-based rows in the new order."""
    toy, sae = _toy_and_truth()
    _turn(sae, toy, families=[0])
    parent, child, _ = toy.family_planes()[0]
    last = sae.config.n - 1
    swap = list(range(sae.config.n))
    swap[child], swap[last] = last, child
    sae.permute_latents_(torch.tensor(swap))  # the turned (p − c) latent is now the last
    x = _samples(toy)
    [moved] = unturn(sae, x)
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    energy = sae.dense_acts(x).detach().pow(2).mean(0)
    assert bool((energy[1:] <= energy[:-1]).all())
    assert float(sae.W_dec[moved.parent].detach() @ unit[parent]) == pytest.approx(1.0, abs=1e-6)
    [child_latent] = moved.children
    assert float(sae.W_dec[child_latent].detach() @ unit[child]) == pytest.approx(1.0, abs=1e-6)
    along_last = int((sae.W_dec.detach() @ unit[last]).abs().argmax())  # the independent feature's latent
    assert child_latent < along_last
    assert child_latent in moved.span


def test_children_last_moves_only_the_rebased_children_and_their_indices_follow():
    toy, sae = _toy_and_truth()
    _turn(sae, toy, families=[0, 2])
    moved = unturn(sae, _samples(toy))
    rows = {m.parent: sae.W_dec[m.parent].detach().clone() for m in moved}
    rows |= {c: sae.W_dec[c].detach().clone() for m in moved for c in m.children}
    others = [i for i in range(sae.config.n) if i not in rows]
    before_others = sae.W_dec.detach()[others].clone()
    moved_last = study.children_last(sae, moved)
    children = [c for m in moved_last for c in m.children]
    assert sorted(children) == list(range(sae.config.n - len(children), sae.config.n))
    for old, new in zip(moved, moved_last):
        assert torch.equal(sae.W_dec[new.parent].detach(), rows[old.parent])
        assert all(torch.equal(sae.W_dec[n].detach(), rows[o]) for o, n in zip(old.children, new.children))
    # every other latent keeps its order
    rest = [i for i in range(sae.config.n) if i not in children]
    kept = [i for i in rest if i not in {m.parent for m in moved_last}]
    assert torch.equal(sae.W_dec.detach()[kept], before_others)


@pytest.mark.parametrize("q, parent_cut, child_cut", [(0.5, 0.068, 0.37), (0.2, 0.128, 0.453)])
def test_batchtopk_cuts_the_smallest_true_codes_of_the_unequal_toy(q, parent_cut, child_cut):
    """The README's reading of why BatchTopK leaves the basin ("The batch selection drops that
    family's parent", and the resampling section's q = 0.2 pair): on the true dictionary of the
    toy, half the batches of 200 hold more firings than the budget, and the cut falls on family A's
    parent and family C's child, the frequent features with the shortest true directions (their
    codes are the smallest)."""
    spec = family_toy_spec(f"unequal-q{q:g}")
    toy = ToyModel(spec)
    sae = RunSpec(spec, "every-b0.2-batchtopk-fromtruth", 0, 1).build_sae(toy).train()
    generator = torch.Generator().manual_seed(3)
    fired, cut, over = torch.zeros(toy.num_features), torch.zeros(toy.num_features), 0
    with torch.no_grad():
        for _ in range(500):
            x, acts = toy.sample(200, generator)
            kept, true = sae.dense_acts(x) > 0, acts > 0
            fired += true.sum(0)
            cut += (true & ~kept).sum(0)
            over += int(true.sum() > sae.batch_budget(200))
    share = cut / fired
    (parent_a, _, _), _, (_, child_c, _) = toy.family_planes()
    assert 0.4 < over / 500 < 0.6
    assert float(share[parent_a]) == pytest.approx(parent_cut, abs=0.02)
    assert float(share[child_c]) == pytest.approx(child_cut, abs=0.05)
    others = [f for f in range(toy.num_features) if f not in (parent_a, child_c)]
    assert float(share[others].max()) < 0.005
    norms = toy.directions.norm(dim=1).tolist()
    parents, children = zip(*((p, c) for p, c, _ in toy.family_planes()))
    assert min(parents, key=norms.__getitem__) == parent_a and min(children, key=norms.__getitem__) == child_c


def test_a_retrain_budget_scales_batchtopks_k_for_both_stages_trained_on_only(monkeypatch):
    budgets = []

    def recording_train(sae, sampler, config):
        budgets.append(sae.batch_budget(200))
        return train(sae, sampler, config)

    monkeypatch.setattr(study, "train", recording_train)
    spec = study.UnturnSpec(family_toy_spec("unequal-q0.5"), "every-b0.2-batchtopk-orth3", 0, steps=20, retrain_steps=10,
                            samples=1_000, retrain_budget=1.3)
    k = ToyModel(spec.toy_spec).expected_l0()
    result = study.run_unturn(spec)
    assert budgets == [round(1.3 * k * 200)] * len(study.TRAINED_ON)  # 299 against the recipe's 230
    assert list(result["stages"]) == list(study.STAGES)


def test_the_command_line_passes_the_retrain_budget(tmp_path, capsys):
    from matryoshka.__main__ import main

    with pytest.raises(SystemExit):
        main(["unturn", "--out", str(tmp_path), "--steps", "10", "--retrain-steps", "10", "--seeds", "1",
              "--mode", "every-b0.2-batchtopk-orth3", "--retrain-budget", "0"])
    captured = capsys.readouterr()
    assert "retrain_budget must be a finite number > 0" in captured.err + captured.out  # the study refused it: it got there


def test_the_study_gives_its_retrain_settings_to_every_run(tmp_path, monkeypatch):
    given = []

    def recording_run_many(specs, *args, **kwargs):
        given.extend(specs)
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(study, "run_many", recording_run_many)
    with pytest.raises(KeyboardInterrupt):
        study.unturn_study(tmp_path, qs=(0.5, 0.7), steps=10, retrain_steps=10, seeds=2, mode="every-b0.2-batchtopk-orth3",
                           retrain_budget=1.3, retrain_beta=0.5)
    assert len(given) == 4 and all((s.retrain_budget, s.retrain_beta) == (1.3, 0.5) for s in given)
