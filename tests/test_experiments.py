"""Smoke runs of the studies through the command line, and the study helpers."""

import json
import math

import pytest

from matryoshka.__main__ import main
from matryoshka.experiments.common import RunSpec, format_table, run_many, summarize
from matryoshka.toy import ToyModel, child_magnitude_spec


pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_quick(tmp_path, capsys):
    main(["compare", "--quick", "--steps", "100", "--jobs", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "reused" not in printed and len(list((tmp_path / "run_cache").glob("*.json"))) == 4
    assert "100 steps per run (the original recipe: 40 000)" in printed
    for mode in ("vanilla", "groups", "sampled", "every"):
        assert f"\n{mode} " in printed
    assert "MCC" in printed and "absorption" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"vanilla", "groups", "sampled", "every"}
    assert results["steps"] == 100 and len(results["runs"]) == 4
    assert 0 < results["summary"]["every"]["mcc"]["mean"] <= 1
    for name in ("compare_heatmap.png", "learning_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    # Started again (as after a kill), the study reuses its finished runs and reports the same.
    main(["compare", "--quick", "--steps", "100", "--jobs", "1", "--out", str(tmp_path)])
    assert f"compare: 4 of 4 runs reused from {tmp_path / 'run_cache'}" in capsys.readouterr().out
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["summary"] == results["summary"]


def test_child_magnitude_quick_with_sweep(tmp_path, capsys):
    main(["child-magnitude", "--quick", "--steps", "80", "--jobs", "1", "--out", str(tmp_path),
          "--sweep", "--ratios", "1", "5", "--modes", "vanilla", "every"])
    printed = capsys.readouterr().out
    assert "Learning order" in printed and "Sweep over child/parent magnitude ratio" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"vanilla", "every"}
    assert results["sweep"]["ratios"] == [1.0, 5.0]
    row = results["summary"]["every"][0]
    assert row["first"] in ("parent", "child", "same", "neither")
    for name in ("child_cosines.png", "absorption_vs_ratio.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_parallel_runs_match_serial_runs(tmp_path):
    specs = [RunSpec(child_magnitude_spec(distractors=2), mode, 0, 40, num_sampled=2, eval_samples=500)
             for mode in ("sampled", "every")]
    serial, parallel = run_many(specs, jobs=1), run_many(specs, jobs=2, cache=tmp_path)
    for a, b in zip(serial, parallel):
        assert a["spec"]["mode"] == b["spec"]["mode"]
        assert a["metrics"]["cos"] == b["metrics"]["cos"]
    assert run_many(specs, jobs=1, cache=tmp_path) == parallel  # the processes' results, reused


def test_a_jumprelu_mode_trains_a_jumprelu_sae_on_the_same_recipe():
    """``-jumprelu`` swaps the activation (and with it the sparsity term: L0 for L1), nothing else:
    the trainer settings equal the ReLU mode's, and the adaptive coefficient moves the L0 penalty."""
    toy = child_magnitude_spec(distractors=2)
    relu, jump = run_many([RunSpec(toy, mode, 0, 60, num_sampled=2, eval_samples=500, log_every=20)
                           for mode in ("every-orth1", "every-jumprelu-orth1")], jobs=1)
    assert relu["sae_config"]["activation"] == "relu" and jump["sae_config"]["activation"] == "jumprelu"
    assert jump["train_config"] == relu["train_config"]
    assert jump["history"][-1]["sparsity_coeff"] != jump["history"][0]["sparsity_coeff"]
    assert jump["metrics"]["cos"] != relu["metrics"]["cos"]


def test_a_batchtopk_mode_keeps_the_toys_l0():
    """``-batchtopk``: a BatchTopK SAE whose (fractional) k is the toy's expected L0."""
    spec = child_magnitude_spec(distractors=2)
    [run] = run_many([RunSpec(spec, "every-batchtopk", 0, 60, num_sampled=2, eval_samples=500, log_every=20)], jobs=1)
    assert run["sae_config"]["activation"] == "batchtopk"
    assert run["sae_config"]["k"] == pytest.approx(ToyModel(spec).expected_l0())
    assert run["history"][-1]["l0"] == pytest.approx(ToyModel(spec).expected_l0(), abs=0.05)


def test_summaries_and_tables():
    stat = summarize([1.0, 3.0, float("nan"), None])
    assert {k: stat[k] for k in ("mean", "std", "n")} == {"mean": 2.0, "std": 1.0, "n": 2}
    assert stat["ci95"] == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5, rel=1e-4)
    assert math.isnan(summarize([None])["mean"])
    table = format_table([["a", "1.0"], ["bbb", "22.5"]], ["mode", "x"])
    assert table.splitlines() == ["mode     x", "----  ----", "a      1.0", "bbb   22.5"]
