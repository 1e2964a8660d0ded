"""The hedging study and the child-magnitude phase diagram: study modes, the hedging prediction,
tiny end-to-end runs."""

import json
import math

import numpy as np
import pytest
import torch

from matryoshka.experiments import child_magnitude, hedging
from matryoshka.experiments.common import (RESAMPLE_EVERY, RunSpec, fmt, study_activation, study_init, study_mode,
                                          summarize)
from matryoshka.toy import ToyModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_study_modes_parse():
    assert study_mode("every") == ("every", {})
    assert study_mode("detached") == ("every", {"detach": True})
    assert study_mode("every-uniform") == ("every", {"every_weights": "uniform"})
    assert study_mode("every-b0.3") == ("every", {"balance_beta": 0.3, "balance_normalise": False})
    assert study_mode("every-b1-norm") == ("every", {"balance_beta": 1.0, "balance_normalise": True})
    assert study_mode("balanced-b0.5") == ("balanced", {"balance_beta": 0.5, "balance_normalise": False})
    assert study_mode("every-uniform-b2")[1]["every_weights"] == "uniform"
    assert study_mode("sampled-freq") == ("sampled", {"resort_by": "frequency"})
    assert study_mode("every-pp") == ("every", {"sparsity_weighting": "prefix"})
    assert study_mode("every-uniform-pp") == ("every", {"every_weights": "uniform", "sparsity_weighting": "prefix"})
    assert study_mode("every-b0.3-pp-freq") == ("every", {"balance_beta": 0.3, "balance_normalise": False,
                                                         "sparsity_weighting": "prefix", "resort_by": "frequency"})
    assert study_mode("every-orth3") == ("every", {"orthogonality_coeff": 3.0})
    assert study_mode("vanilla-freq-orth0.1") == ("vanilla", {"resort_by": "frequency", "orthogonality_coeff": 0.1})
    assert study_mode("every-b0.5-orth1e-2") == ("every", {"balance_beta": 0.5, "balance_normalise": False,
                                                          "orthogonality_coeff": 0.01})
    # -jumprelu picks the SAE's activation, wherever it sits in the chain; the trainer settings are the rest's
    for name, base in (("every-b0.2-jumprelu", "every-b0.2"), ("every-b0.2-jumprelu-orth3", "every-b0.2-orth3"),
                       ("every-jumprelu-freq-pp", "every-freq-pp"), ("vanilla-pp-jumprelu", "vanilla-pp")):
        assert study_mode(name) == study_mode(base) and study_activation(name) == "jumprelu"
        assert study_activation(base) == "relu"
    assert study_mode("every-b0.2-batchtopk-orth3") == study_mode("every-b0.2-orth3")
    assert study_activation("every-b0.2-batchtopk-orth3") == study_activation("vanilla-freq-batchtopk") == "batchtopk"
    assert study_mode("every-b0.2-batchtopk-resample-orth3") == (
        "every", {"balance_beta": 0.2, "balance_normalise": False, "resample_every": RESAMPLE_EVERY,
                  "orthogonality_coeff": 3.0})
    assert study_activation("every-b0.2-batchtopk-resample-orth3") == "batchtopk"
    assert study_mode("vanilla-resample") == ("vanilla", {"resample_every": RESAMPLE_EVERY})
    assert study_mode("every-b0.2-resample-dead300-orth3") == (
        "every", {"balance_beta": 0.2, "balance_normalise": False, "resample_every": RESAMPLE_EVERY,
                  "dead_after": 300, "orthogonality_coeff": 3.0})
    assert study_activation("every-batchtopk-dead50") == "batchtopk"
    assert study_mode("every-auxk192") == ("every", {"aux_k": 192})
    assert study_mode("vanilla-batchtopk-resample-auxk64-dead300") == (
        "vanilla", {"resample_every": RESAMPLE_EVERY, "aux_k": 64, "dead_after": 300})
    # -fromtruth sets the SAE's start, wherever it sits in the chain, and nothing else
    assert study_mode("every-b0.2-fromtruth-orth3") == study_mode("every-b0.2-orth3")
    assert study_init("every-b0.2-fromtruth-orth3") == study_init("vanilla-batchtopk-fromtruth") == "truth"
    assert study_activation("every-fromtruth-batchtopk") == "batchtopk" and study_init("every-b0.2-orth3") == "random"
    assert study_mode("every-b0.2-fromtruth-coeff0.3")[1]["sparsity_coeff"] == 0.3
    # -startangle<a> likewise, with its angle; one start per mode, and an angle within the plane's quarter
    assert study_mode("every-b0.2-orth3-startangle10") == study_mode("every-b0.2-orth3")
    assert study_init("every-b0.2-startangle22.5-orth3") == "angle22.5"
    with pytest.raises(ValueError, match="twice"):
        study_mode("every-fromtruth-startangle10")
    with pytest.raises(ValueError, match="0 to 90 degrees"):
        study_mode("every-startangle120")
    assert RunSpec(hedging.family_toy_spec("unequal"), "every-b0.2-coeff0.3-orth3", 0, 10).train_config(
        ToyModel(hedging.family_toy_spec("unequal"))).sparsity_coeff == 0.3  # over the recipe's start
    assert study_mode("every-cool0") == ("every", {"cooldown_frac": 0.0})
    assert study_mode("vanilla-auxk64-cool0.5") == ("vanilla", {"aux_k": 64, "cooldown_frac": 0.5})
    with pytest.raises(ValueError, match="-cool<f>.*got 1.5"):
        study_mode("every-cool1.5")
    with pytest.raises(ValueError, match="-dead<N>"):
        study_mode("every-dead")
    assert hedging.beta_of("every-b0.2-jumprelu-orth3") == 0.2
    assert hedging.beta_of("every-pp") == hedging.beta_of("every") == hedging.beta_of("every-orth3") == 9.0
    assert hedging.beta_of("every-b0.5-orth3") == 0.5 and hedging.beta_of("every-freq") == 9.0
    assert hedging.beta_of("detached") is None and hedging.beta_of("sampled-orth1") is None
    assert hedging.beta_of("every-uniform-pp") == 19.0 and hedging.beta_of("every-b0.3-pp") == 0.3
    assert "every-pp" in hedging.MODES and "every-uniform-pp" in hedging.MODES
    for bad in ("every-b", "everything", "balanced", "every-b-1", "every-orth", "every-orth-1", "orth1",
                "jumprelu", "every-jumprelu2", "every-topk", "every-auxk", "every-auxk-1"):
        with pytest.raises(ValueError):
            study_mode(bad)


def test_confidence_intervals():
    stat = summarize([1.0, 3.0])
    assert stat["ci95"] == pytest.approx(12.7062047, rel=1e-6)  # t(0.975, 1) * s / sqrt(2), s = sqrt(2)
    assert fmt(stat) == "2.000 ± 12.706"
    assert fmt(summarize([0.5])) == "0.500" and math.isnan(summarize([0.5])["ci95"])


def test_hedging_prediction():
    q = [0.2, 0.2, 0.2]
    full = 0.2 / math.sqrt(1 + 3 * 0.04)  # the parent pointing at E[x | parent]
    w = hedging.objective_weights("every-b0.3", 20)
    # children behind the parent: detached levels give the full hedge, beta = 0 none
    assert hedging.hedging_prediction(w, 0, [3, 4, 5], q, detached=True)["parent_child"] == pytest.approx([full] * 3)
    none = hedging.hedging_prediction(hedging.objective_weights("every-b0", 20), 0, [3, 4, 5], q)
    assert none["parent_child"] == [0, 0, 0]
    # normalising the objective rescales every weight alike: the same prediction
    a = hedging.hedging_prediction(w, 1, [3, 6, 9], q)
    b = hedging.hedging_prediction(hedging.objective_weights("every-b0.3-norm", 20), 1, [3, 6, 9], q)
    for key in a:
        assert a[key] == pytest.approx(b[key])
    assert 0 < a["parent_child"][0] < a["parent_child"][1] < a["parent_child"][2] < full
    # larger beta, more hedging
    c = hedging.hedging_prediction(hedging.objective_weights("every-b1", 20), 1, [3, 6, 9], q)
    assert all(x < y for x, y in zip(a["parent_child"], c["parent_child"]))
    assert all(s < 0 for s in c["child_sibling"])


def test_family_cosines_tell_a_rotated_pair_from_an_absorbed_one():
    """On Nabeshima's toy (orthonormal-enough features taken as the basis): family A's third child
    turned with its parent into (A ± A3)/√2, family B's first child absorbed into (B + B1)/√2, the
    rest true.  Only the turned pair counts as rotated."""
    from matryoshka.toy import ToyModel

    toy = ToyModel(hedging.TOYS["nabeshima"]())
    cos = np.eye(toy.num_features)
    (a, (_, _, a3)), (b, (b1, _, _)) = toy.families()[:2]
    cos[[a, a3]] = 0.0
    cos[a, [a, a3]] = cos[a3, a] = 1 / math.sqrt(2)
    cos[a3, a3] = -1 / math.sqrt(2)
    cos[b1] = 0.0
    cos[b1, [b, b1]] = 1 / math.sqrt(2)
    metrics = {"cos": cos.tolist(), "matching": {"latent": list(range(toy.num_features))}}
    rotated = hedging.family_cosines(metrics, toy)["rotated"]
    assert rotated == [0.0, 0.0, 1.0] + [0.0] * 6
    cos[a3, a] = 0.49  # below the bar: only one latent shares the pair
    assert hedging.family_cosines({**metrics, "cos": cos.tolist()}, toy)["rotated"] == [0.0] * 9


def test_hedging_tiny_run(tmp_path, capsys):
    hedging.hedging(tmp_path, steps=20, seeds=1, jobs=1, toys=("unequal",),
                    modes=("every-b0.3", "every-pp", "detached"))
    printed = capsys.readouterr().out
    assert "L_n + beta * sum" in printed and "parent->child" in printed and "vanish (seeds)" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["toys"]["unequal"]["summary"]
    assert set(summary) == {"every-b0.3", "every-pp", "detached"} and summary["detached"]["seeds"] == 1
    runs = results["toys"]["unequal"]["runs"]
    assert [r["spec"]["mode"] for r in runs] == ["every-b0.3", "every-pp", "detached"]
    assert (tmp_path / "hedging_unequal.png").stat().st_size > 10_000
    assert (tmp_path / "hedging_pareto_unequal.png").stat().st_size > 10_000


def test_phase_tiny_run(tmp_path, capsys):
    child_magnitude.phase(tmp_path, steps=20, seeds=1, jobs=1, ratios=(5.0,), probs=(0.5,),
                          modes=("every", "detached"), freq_modes=("every-freq",))
    printed = capsys.readouterr().out
    assert "1/sqrt(1+r^2)" in printed and "every-freq" in printed
    results = json.loads((tmp_path / "phase_results.json").read_text())
    assert set(results["rows"]) == {"5|0.5|every", "5|0.5|detached", "5|0.5|every-freq"}
    assert results["mode_settings"]["every-freq"][1] == {"resort_by": "frequency"}
    for name in ("phase_absorption.png", "phase_child_first.png", "phase_child_cos.png"):
        assert (tmp_path / name).stat().st_size > 5_000


@pytest.mark.parametrize("activation", ["", "-jumprelu", "-batchtopk"])
def test_a_run_from_the_truth_starts_exact(activation):
    """``-fromtruth``: the SAE starts at the toy's true dictionary, on which a ReLU or JumpReLU SAE
    encodes and decodes samples exactly; without it the start is the seeded random one."""
    spec = hedging.family_toy_spec("unequal")
    toy = ToyModel(spec)
    x, _ = toy.sample(512, torch.Generator().manual_seed(0))
    truth = RunSpec(spec, f"every-b0.2{activation}-fromtruth-orth3", 0, 10).build_sae(toy).train()
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    assert torch.equal(truth.W_dec.detach(), unit)
    if activation != "-batchtopk":  # BatchTopK keeps its budget of round(k B) codes, whatever the batch's L0
        assert torch.allclose(truth(x).recon, x, atol=1e-5)
    random = RunSpec(spec, f"every-b0.2{activation}-orth3", 0, 10).build_sae(toy)
    assert not torch.allclose(random(x).recon, x, atol=1e-1)


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0])
def test_a_start_angle_places_one_latent_per_family_in_its_plane(angle):
    """``-startangle<a>``: latent i starts at cos(a) p + sin(a) c in family i's plane (its parent p and
    most frequent child c), decoder and encoder alike; every other latent is the seeded random start."""
    spec = hedging.family_toy_spec("unequal-q0.4")
    toy = ToyModel(spec)
    placed = RunSpec(spec, f"every-b0.2-orth3-startangle{angle:g}", 3, 10).build_sae(toy)
    random = RunSpec(spec, "every-b0.2-orth3", 3, 10).build_sae(toy)
    unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
    planes = toy.family_planes()
    assert [q for _, _, q in planes] == pytest.approx([0.4] * 3)
    for latent, (parent, child, _) in enumerate(planes):
        row = placed.W_dec[latent].detach()
        assert float(row @ unit[parent]) == pytest.approx(math.cos(math.radians(angle)), abs=1e-6)
        assert float(row @ unit[child]) == pytest.approx(math.sin(math.radians(angle)), abs=1e-6)
        assert torch.equal(placed.W_enc[:, latent], placed.W_dec[latent])
    others = slice(len(planes), None)
    assert torch.equal(placed.W_dec[others], random.W_dec[others]) and torch.equal(placed.W_enc[:, others], random.W_enc[:, others])
    with pytest.raises(ValueError, match="families"):
        from matryoshka.toy import nabeshima_spec
        flat = {**nabeshima_spec(), "features": [{"name": "I1", "p": 0.1}]}
        RunSpec(flat, "every-startangle10", 0, 10).build_sae(ToyModel(flat))
