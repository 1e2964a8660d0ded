"""The turn-dynamics study: the leading direction against the toy's own samples, the folding of
angles, the end states, the first latent, and the study from the command line (and ``--replot``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from matryoshka.experiments import turn_dynamics as study
from matryoshka.experiments.hedging import family_toy_spec
from matryoshka.toy import ToyModel


def test_leading_angle_by_hand():
    # tan 2θ = 2q / (1 - q) for unit norms
    assert study.leading_angle(0.5) == pytest.approx(0.5 * math.degrees(math.atan(2.0)))  # 31.72°
    assert study.leading_angle(0.2) == pytest.approx(0.5 * math.degrees(math.atan(0.5)))  # 13.28°
    assert study.leading_angle(1.0) == pytest.approx(45.0)  # the child always there: p + c
    assert study.leading_angle(0.5, norm_c=2.0) > study.leading_angle(0.5)  # a larger child pulls it over


@pytest.mark.parametrize("q", [0.3, 0.5, 0.7])
def test_leading_angle_is_the_leading_direction_of_the_toys_family_samples(q):
    """The second moment of the samples whose parent fires, projected on the plane of the parent and
    its most frequent child: its leading eigenvector's angle is θ*(q) with the toy's jittered norms."""
    toy = ToyModel(family_toy_spec(f"unequal-q{q:g}"))
    [(parent, child, given), *_] = toy.family_planes()
    assert given == pytest.approx(q)
    x, active = toy.sample(200_000, torch.Generator().manual_seed(0))
    rows = active[:, parent] > 0
    p_dir, c_dir = (toy.directions[f] / toy.directions[f].norm() for f in (parent, child))
    plane = torch.stack([x[rows] @ p_dir, x[rows] @ c_dir], 1).double()
    moment = plane.T @ plane / plane.shape[0]
    _, vectors = torch.linalg.eigh(moment)
    lead = vectors[:, -1] * torch.sign(vectors[0, -1])
    measured = math.degrees(math.atan2(float(lead[1]), float(lead[0])))
    norms = (float(toy.directions[parent].norm()), float(toy.directions[child].norm()))
    assert measured == pytest.approx(study.leading_angle(q, *norms), abs=0.5)


def test_axis_angle_folds_onto_the_pairs_axes():
    assert [study.axis_angle(t) for t in (0, 10, 47, -47, 90, 135, 170, -120, 180)] == \
        pytest.approx([0, 10, 47, 47, 90, 45, 10, 60, 0])


def _cosines(latents: list[tuple[float, float]], others: int = 4) -> tuple[list[float], list[float]]:
    """Cosines with p and with c of the given latents (as unit vectors in the plane), plus
    ``others`` latents off the plane."""
    cos_p = [a for a, _ in latents] + [0.0] * others
    cos_c = [b for _, b in latents] + [0.0] * others
    return cos_p, cos_c


def test_end_states():
    r = 1 / math.sqrt(2)
    assert study.end_state(*_cosines([(1.0, 0.0), (0.0, 1.0)])) == "true"
    assert study.end_state(*_cosines([(0.98, 0.1), (-0.05, 0.95)])) == "true"  # hedged, still held
    assert study.end_state(*_cosines([(r, r), (r, -r)])) == "turned"
    assert study.end_state(*_cosines([(-r, -r), (r, -r)])) == "turned"  # signs do not matter
    assert study.end_state(*_cosines([(1.0, 0.0), (r, r)])) == "other"  # absorbed: c held by no latent
    assert study.end_state(*_cosines([(0.8, 0.6), (0.0, 1.0)])) == "other"  # p held by no latent
    assert study.end_state(*_cosines([(0.95, 0.92)])) == "other"  # one latent holding both is no pair


def test_first_latent_is_the_first_to_enter_the_plane():
    reads = [  # per family: every latent's cosine with p, then with c
        {"step": 10, "families": [[[0.5, 0.1, 0.0], [0.5, 0.0, 0.0]], [[0.9, 0.0, 0.0], [0.0, 0.0, 0.0]]]},
        {"step": 20, "families": [[[0.7, 0.6, 0.0], [0.45, 0.6, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]},
        {"step": 30, "families": [[[0.7, 0.9, 0.0], [0.7, 0.2, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]},
    ]
    first = study.first_latent(reads, 0)
    # step 20: latents 0 (in-plane norm 0.832) and 1 (0.849) past 0.8: the one most in the plane
    assert first["step"] == 20 and first["latent"] == 1
    assert first["theta"] == pytest.approx(45.0)
    assert study.first_latent(reads, 1) == {"step": 10, "latent": 0, "theta": 0.0}
    assert study.first_latent(reads, 0, threshold=0.99) is None


def test_identities_follow_the_rows_through_a_resort():
    g = torch.Generator().manual_seed(0)
    before = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # now[i] is before[perm[i]], moved a little, one sign flipped
    now = torch.nn.functional.normalize(before[perm] + 0.05 * torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    now[2] = -now[2]
    ids = [10, 11, 12, 13, 14, 15]
    assert study.follow_identities(ids, before, now) == [ids[j] for j in perm.tolist()]


def test_family_rows_read_a_run():
    r = 1 / math.sqrt(2)
    result = {
        "spec": {"seed": 3}, "qs": [0.5000000000000001, 0.2], "norms": [[1.0, 1.0], [1.0, 1.0]],
        "reads": [{"step": 10, "families": [[[0.0, 0.0, 0.85], [0.0, 0.0, 0.52]], [[0.0, 0.99, 0.0], [0.0, 0.1, 0.0]]]}],
        "final": [_cosines([(r, r), (r, -r)]), _cosines([(1.0, 0.0), (0.0, 1.0)])],
    }
    turned, true = study.family_rows(result)
    assert (turned["q"], turned["end"], turned["seed"]) == (0.5, "turned", 3)
    assert turned["axis"] == pytest.approx(math.degrees(math.atan2(0.52, 0.85)))
    assert turned["theta_star"] == pytest.approx(study.leading_angle(0.5))
    assert (turned["first"]["latent"], true["end"], true["first"]["latent"]) == (2, "true", 1)


def test_cli_runs_and_replots_the_study(tmp_path, capsys, monkeypatch):
    from matryoshka.__main__ import main

    main(["turn-dynamics", "--out", str(tmp_path), "--steps", "60", "--seeds", "2", "--jobs", "1", "--qs", "0.2", "0.5",
          "--read-every", "20"])
    first = capsys.readouterr().out
    payload = (tmp_path / "turn_results.json").read_text()
    assert '"read_every": 20' in payload and len(json.loads(payload)["runs"]) == 4
    runs = json.loads(payload)["runs"]
    assert [read["step"] for read in runs[0]["reads"]] == [20, 40, 60]
    assert all(len(cos) == 20 for read in runs[0]["reads"] for family in read["families"] for cos in family)
    (tmp_path / "turn_first_angles.png").unlink()
    monkeypatch.setattr(study, "run_many", lambda *args, **kwargs: pytest.fail("--replot must not train"))
    main(["turn-dynamics", "--replot", "--out", str(tmp_path)])
    again = capsys.readouterr().out
    assert (tmp_path / "turn_first_angles.png").exists()
    table = lambda text: text[text.index("q    θ*"):text.index("wrote")]  # noqa: E731
    assert table(again) == table(first)
    assert np.isclose(float(table(first).splitlines()[2].split()[1]), study.leading_angle(0.2), atol=0.6)


def test_refuses_bad_read_settings(tmp_path):
    with pytest.raises(ValueError, match="read_until"):
        study.turn_dynamics(tmp_path, qs=(0.5,), steps=10, seeds=1, read_every=20, read_until=10)
    with pytest.raises(ValueError, match="0 < x <= 0.83"):
        study.turn_dynamics(tmp_path, qs=(0.9,), steps=10, seeds=1)


def test_read_outs_do_not_change_training():
    """The study reads every 10 steps where the others read every 100: the same run either way, bit
    for bit (the adaptive coefficient, the penalty and the re-sorting do not depend on read-outs)."""
    from matryoshka.experiments.common import RunSpec
    from matryoshka.train import train

    decoders = []
    for every in (10, 100):
        spec = RunSpec(family_toy_spec("unequal"), "every-b0.2-orth3", 0, 250, log_every=every)
        toy = ToyModel(spec.toy_spec)
        sae = spec.build_sae(toy)
        train(sae, lambda rows, g: toy.sample(rows, g)[0], spec.train_config(toy))
        decoders.append(sae.W_dec.detach().clone())
    assert torch.equal(*decoders)
