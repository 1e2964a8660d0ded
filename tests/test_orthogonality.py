"""The decoder orthogonality penalty (``TrainConfig.orthogonality_coeff``, :mod:`matryoshka.orthogonality`):
its value and gradient against a plain loop over pairs, its random chunks, and the trainer's use of it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from matryoshka import checkpoint
from matryoshka.experiments.common import fmt
from matryoshka.experiments.hedging import per_child_slot
from matryoshka.orthogonality import chunk_partition, orthogonality_penalty
from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.train import TrainConfig, train
from tests.tiny_runs import N, final_state, sample, tiny_config, tiny_sae


def _loop_penalty(W: torch.Tensor, chunks: list[torch.Tensor]) -> torch.Tensor:
    """The definition, pair by pair: (1/n) Σ_i max over j ≠ i in i's chunk of cos(W_i, W_j)²."""
    n = W.shape[0]
    terms = []
    for members in chunks:
        members = members.tolist()
        for i in members:
            others = [torch.nn.functional.cosine_similarity(W[i], W[j], dim=0, eps=0.0) ** 2
                      for j in members if j != i]
            if others:
                terms.append(torch.stack(others).max())
    return torch.stack(terms).sum() / n if terms else W.sum() * 0


@pytest.mark.parametrize("n, d, chunk_size", [(7, 5, 7), (7, 5, 100), (13, 3, 4), (9, 6, 2), (10, 17, 3)])
def test_value_and_gradient_match_the_pairwise_definition(n, d, chunk_size):
    W = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n * d))
    W = (W * torch.rand(n, 1, dtype=torch.float64) * 3).requires_grad_()  # rows of any norm
    penalty = orthogonality_penalty(W, chunk_size, torch.Generator().manual_seed(5))
    chunks = chunk_partition(n, chunk_size, torch.Generator().manual_seed(5))
    loop = _loop_penalty(W, chunks)
    assert penalty.dtype == torch.float64 and penalty.shape == ()
    torch.testing.assert_close(penalty, loop, rtol=1e-12, atol=1e-15)
    grad, = torch.autograd.grad(penalty, W)
    grad_loop, = torch.autograd.grad(loop, W)
    assert grad_loop.abs().sum() > 0
    torch.testing.assert_close(grad, grad_loop, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("n, chunk_size", [(10, 3), (12, 4), (12, 5), (5, 4), (1000, 64)])
def test_chunks_cover_every_latent_once_in_near_equal_parts(n, chunk_size):
    chunks = chunk_partition(n, chunk_size, torch.Generator().manual_seed(0))
    assert len(chunks) == math.ceil(n / chunk_size)
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))
    sizes = [len(c) for c in chunks]
    assert max(sizes) <= chunk_size and max(sizes) - min(sizes) <= 1
    again = chunk_partition(n, chunk_size, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))  # a seeded generator: the same chunks
    other = chunk_partition(n, chunk_size, torch.Generator().manual_seed(1))
    assert not all(torch.equal(a, b) for a, b in zip(chunks, other))


def test_one_chunk_needs_no_generator_and_is_exact():
    assert [c.tolist() for c in chunk_partition(4, 4, None)] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="generator is needed"):
        chunk_partition(5, 4, None)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 2"):
            chunk_partition(5, bad, None)
    with pytest.raises(ValueError, match=r"W_dec must be \(n, d\)"):
        orthogonality_penalty(torch.ones(3), 4)


def test_known_values():
    eye = torch.eye(4, 6)
    assert float(orthogonality_penalty(eye, 8)) == 0.0  # orthogonal rows
    twins = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 antiparallel, row 2 apart
    torch.testing.assert_close(orthogonality_penalty(twins, 8), torch.tensor(2 / 3))
    at_45 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(orthogonality_penalty(at_45, 8), torch.tensor(0.5))
    zero_row = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)  # no direction, no NaN
    penalty = orthogonality_penalty(zero_row, 8)
    penalty.backward()
    assert float(penalty.detach()) == 0.0 and torch.isfinite(zero_row.grad).all()
    assert float(orthogonality_penalty(torch.ones(1, 3), 8)) == 0.0  # one latent has no partner


def test_training_with_the_penalty_makes_the_decoder_more_orthogonal(one_thread):
    def run(coeff):
        sae = SparseAutoencoder(SAEConfig(d=8, n=8), generator=torch.Generator().manual_seed(0))
        config = TrainConfig(steps=40, prefix_mode="every", num_sampled=4, orthogonality_coeff=coeff, log_every=10,
                             progress=False)
        history = train(sae, lambda rows, g: torch.randn(rows, 8, generator=g), config).history
        return sae, history

    plain, plain_history = run(0.0)
    ortho, ortho_history = run(10.0)
    assert "orthogonality" not in plain_history[-1]
    logged = [row["orthogonality"] for row in ortho_history]
    # the logged value is the decoder's penalty at the read-out
    assert logged[-1] == pytest.approx(float(orthogonality_penalty(ortho.W_dec.detach(), 8192)), rel=1e-6)
    assert logged[-1] < 0.2 * float(orthogonality_penalty(plain.W_dec.detach(), 8192))
    assert ortho_history[-1]["loss"] > ortho_history[-1]["recon"]  # the loss holds γ·P


def test_resume_with_random_chunks_is_bit_exact(tmp_path, one_thread):
    """Chunks come from a generator seeded by the seed and the step: a resumed run draws the same."""
    overrides = dict(orthogonality_coeff=0.5, orthogonality_chunk=5)  # 12 latents: 3 chunks of 4
    want = tiny_sae("relu")
    want_history = train(want, sample, tiny_config("relu", **overrides)).history
    other = tiny_sae("relu")
    train(other, sample, tiny_config("relu", **{**overrides, "seed": 1}))
    assert not torch.equal(final_state(other)["W_dec"], final_state(want)["W_dec"])

    class Crash(Exception):
        pass

    def crash_at_12(done, sae, logs):
        if done == 12:
            raise Crash
    with pytest.raises(Crash):
        train(tiny_sae("relu"), sample, tiny_config("relu", **overrides), callback=crash_at_12, checkpoint_dir=tmp_path)
    assert checkpoint.checkpoints(tmp_path)[-1].name == "step_0000010"
    sae = tiny_sae("relu", seed=99)
    history = train(sae, sample, tiny_config("relu", **overrides), checkpoint_dir=tmp_path, resume=True).history
    for name, value in final_state(want).items():
        assert torch.equal(final_state(sae)[name], value), name
    assert history == want_history
    assert N > 5  # the chunks are random here, not one exact chunk


@pytest.mark.parametrize("bad, message", [
    (dict(orthogonality_coeff=-0.1), r"orthogonality_coeff must be a finite number >= 0 \(0: off\), got -0\.1$"),
    (dict(orthogonality_coeff=float("inf")), r"orthogonality_coeff must be a finite number >= 0"),
    (dict(orthogonality_chunk=1), r"orthogonality_chunk must be an integer >= 2, got 1$"),
    (dict(orthogonality_chunk=64.0), r"orthogonality_chunk must be an integer >= 2, got 64\.0$"),
])
def test_config_refuses_bad_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_orthogonality_study_tiny_run(tmp_path, capsys):
    from matryoshka.experiments import orthogonality as study

    assert study.mode_name("every", 0.0) == "every" and study.mode_name("every-b0.5", 3.0) == "every-b0.5-orth3"
    payload = study.orthogonality(tmp_path, steps=20, seeds=2, jobs=1, bases=("vanilla",), gammas=(1.0, 0.0),
                                  ratios=(5.0,), child_bases=("every",))
    printed = capsys.readouterr().out
    assert "nabeshima toy" in printed and "unequal toy" in printed and "ratio 5" in printed
    assert payload["gammas"] == [0.0, 1.0]  # sorted: the base mode first
    assert set(payload["rows"]) == {"nabeshima|vanilla|0", "nabeshima|vanilla|1", "unequal|vanilla|0",
                                    "unequal|vanilla|1", "child r=5|every|0", "child r=5|every|1"}
    assert all(len(rows) == 2 for rows in payload["rows"].values())
    assert {"absorption", "max_offtarget", "clean"} <= set(payload["rows"]["unequal|vanilla|1"][0])
    assert {"absorption", "child_cos_parent", "child_first"} <= set(payload["rows"]["child r=5|every|1"][0])
    cached = sorted((tmp_path / "run_cache").glob("*.json"))
    assert len(cached) == 12
    modes = {json.loads(p.read_text())["spec"]["mode"] for p in cached}
    assert modes == {"vanilla", "vanilla-orth1", "every", "every-orth1"}
    settings = {json.loads(p.read_text())["train_config"]["orthogonality_coeff"] for p in cached}
    assert settings == {0.0, 1.0}
    assert (tmp_path / "orthogonality.png").stat().st_size > 20_000
    assert "## nabeshima toy" in (tmp_path / "orthogonality_results.md").read_text()
    replotted = study.replot(tmp_path)  # from the JSON alone: the same tables
    assert replotted["tables"] == payload["tables"] and replotted["rows"] == json.loads(json.dumps(payload["rows"]))


def test_each_mode_gets_its_own_colour():
    from matryoshka.experiments.plots import MODE_COLORS, mode_colors

    colors = mode_colors(["vanilla", "every", "every-b0.5", "every-orth1", "sampled"])
    assert colors["every"] == MODE_COLORS["every"] and colors["vanilla"] == MODE_COLORS["vanilla"]
    assert len(set(colors.values())) == 5


def test_cli_runs_and_replots_the_study(tmp_path, capsys, monkeypatch):
    from matryoshka.__main__ import main
    from matryoshka.experiments import orthogonality as study

    main(["orthogonality", "--out", str(tmp_path), "--steps", "10", "--seeds", "1", "--jobs", "1",
          "--bases", "every", "--child-bases", "every", "--gammas", "0", "2"])
    first = capsys.readouterr().out
    (tmp_path / "orthogonality.png").unlink()
    monkeypatch.setattr(study, "run_many", lambda *args, **kwargs: pytest.fail("--replot must not train"))
    main(["orthogonality", "--replot", "--out", str(tmp_path)])
    again = capsys.readouterr().out
    assert (tmp_path / "orthogonality.png").exists()  # redrawn from the results file
    table = lambda text: text[text.index("nabeshima toy"):text.index("total time")]  # noqa: E731
    assert table(again) == table(first) and "every      2" in first
    monkeypatch.undo()
    main(["orthogonality", "--out", str(tmp_path / "one"), "--steps", "10", "--seeds", "1", "--jobs", "1",
          "--toys", "nabeshima", "--child-bases", "--bases", "vanilla", "--gammas", "1"])
    rows = json.loads((tmp_path / "one" / "orthogonality_results.json").read_text())["rows"]
    assert list(rows) == ["nabeshima|vanilla|1"]


def _seed_row(max_offtarget: float, max_absorption: float, dead: float) -> dict:
    return {"max_offtarget": max_offtarget, "max_absorption": max_absorption, "dead": dead}


@pytest.mark.parametrize("row, expected", [
    (_seed_row(0.049, 0.0, 0.0), "clean"),
    (_seed_row(0.049, 0.05, 0.0), "absorbed"),      # the bar is strict: 0.05 is not below it
    (_seed_row(0.6, 1.0, 2.0), "absorbed"),         # absorption comes before a dead latent
    (_seed_row(0.3, 0.0, 1.0), "dead latent"),
    (_seed_row(0.05, 0.0, 0.0), "mixed"),
    (_seed_row(0.3, float("nan"), 0.0), "mixed"),   # no finite absorption rate: nothing absorbed
])
def test_outcome_of_a_seed(row, expected):
    from matryoshka.experiments.orthogonality import outcome

    assert outcome(row) == expected


def test_clean_share_interval_is_the_exact_binomial_one():
    from matryoshka.experiments.orthogonality import share_interval

    # Clopper-Pearson closed forms at the ends: 0/n -> [0, 1 - 0.025^(1/n)], n/n -> [0.025^(1/n), 1].
    low, high = share_interval(0, 5)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 5), abs=1e-9)
    low, high = share_interval(10, 10)
    assert low == pytest.approx(0.025 ** (1 / 10), abs=1e-9) and high == 1.0
    low, high = share_interval(3, 10)
    assert low < 0.3 < high and high - low > 0.5  # ten seeds pin a share down only roughly


def test_study_on_one_family_toy_reports_each_seeds_outcome(tmp_path, capsys):
    from matryoshka.experiments import orthogonality as study

    payload = study.orthogonality(tmp_path, steps=20, seeds=2, jobs=1, bases=("every-b0.1",), gammas=(0.0, 3.0),
                                  child_bases=(), family_toys=("nabeshima",))
    printed = capsys.readouterr().out
    assert set(payload["rows"]) == {"nabeshima|every-b0.1|0", "nabeshima|every-b0.1|3"}
    assert "unequal toy" not in printed and "child-magnitude" not in printed.split("\n", 1)[1]
    outcomes = payload["tables"]["nabeshima outcomes"]
    assert "nabeshima toy, outcome of each seed" in printed and outcomes in printed
    for gamma in (0.0, 3.0):  # each seed in exactly one outcome, and the row says so
        seeds = payload["rows"][f"nabeshima|every-b0.1|{gamma:g}"]
        counts = [sum(study.outcome(r) == o for r in seeds) for o in study.OUTCOMES]
        line = next(line for line in outcomes.splitlines() if line.split()[:2] == ["every-b0.1", f"{gamma:g}"])
        assert [int(v) for v in line.split()[2:6]] == counts and sum(counts) == 2
    assert (tmp_path / "orthogonality_outcomes.png").stat().st_size > 10_000
    assert "outcome of each seed" in (tmp_path / "orthogonality_results.md").read_text()
    # Keeping the lowest-loss seed: the final loss is each run's last read-out, and the table says
    # which seed that keeps.
    for gamma in (0.0, 3.0):
        seeds = payload["rows"][f"nabeshima|every-b0.1|{gamma:g}"]
        assert all(math.isfinite(r["final_loss"]) for r in seeds)
        kept = min(seeds, key=lambda r: r["final_loss"])
        line = next(line for line in payload["tables"]["nabeshima selection"].splitlines()
                    if line.split()[:2] == ["every-b0.1", f"{gamma:g}"])
        assert line.split()[-2] == f"{float(study.outcome(kept) == 'clean'):.2f}"  # best of all (2) seeds
    assert (tmp_path / "orthogonality_selection.png").stat().st_size > 10_000
    # The training objective at the end: the loss's reconstruction term and the sparsity coefficient
    # come from the same last read-out as the loss, and the table means them over the seeds.
    for gamma in (0.0, 3.0):
        seeds = payload["rows"][f"nabeshima|every-b0.1|{gamma:g}"]
        # (below the loss: the sparsity term is positive)
        assert all(0 < r["final_recon"] < r["final_loss"] and r["final_sparsity_coeff"] > 0 for r in seeds)
        line = next(line for line in payload["tables"]["nabeshima objective"].splitlines()
                    if line.split()[:2] == ["every-b0.1", f"{gamma:g}"])
        assert line.split()[2] == f"{np.mean([r['final_loss'] for r in seeds]):.4f}"
        assert line.split()[5] == f"{np.mean([r['final_recon'] for r in seeds]):.4f}"
    assert "the training objective at the end" in (tmp_path / "orthogonality_results.md").read_text()
    # Per child slot: absorption and rotated share, as hedging.per_child_slot summarises the seeds.
    per_child = payload["tables"]["nabeshima per child"]
    assert per_child in printed and "per child: absorbed and rotated pairs" in printed
    header = [h.strip() for h in per_child.splitlines()[0].split("  ") if h.strip()]
    assert header[2:] == [f"{what} q=0.2" for what in ("absorption", "rotated") for _ in "123"]
    for gamma in (0.0, 3.0):
        seeds = payload["rows"][f"nabeshima|every-b0.1|{gamma:g}"]
        line = next(line for line in per_child.splitlines() if line.split()[:2] == ["every-b0.1", f"{gamma:g}"])
        expected = [fmt(v) for key in ("absorption_by_child", "rotated_by_child") for v in per_child_slot(seeds, key)]
        assert " ".join(line.split()[2:]) == " ".join(expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(family_toys=("nabeshima", "tiny")), "family_toys: a family toy is one of .* got 'tiny'"),
    (dict(family_toys=("unequal-q0.9",)), "family_toys: .*unequal-q<x> with 0 < x <= 0.83"),
    (dict(family_toys=(), child_bases=()), "nothing to train"),
    (dict(family_toys=(), ratios=()), "nothing to train"),
])
def test_study_refuses_an_empty_or_unknown_grid(tmp_path, kwargs, message):
    from matryoshka.experiments import orthogonality as study

    with pytest.raises(ValueError, match=message):
        study.orthogonality(tmp_path, steps=5, seeds=1, **kwargs)


def test_best_of_k_matches_every_draw_of_k_seeds():
    import itertools
    import random

    from matryoshka.experiments.orthogonality import best_of_k_clean

    rng = random.Random(0)
    losses = [rng.random() for _ in range(7)]
    clean = [rng.random() < 0.4 for _ in range(7)]
    for k in range(1, 8):
        draws = list(itertools.combinations(range(7), k))
        by_hand = sum(clean[min(d, key=lambda i: losses[i])] for d in draws) / len(draws)
        assert best_of_k_clean(losses, clean, k) == pytest.approx(by_hand, abs=1e-12)
    assert best_of_k_clean(losses, clean, 1) == pytest.approx(sum(clean) / 7)  # one seed: the clean share
    assert best_of_k_clean(losses, clean, 7) == clean[losses.index(min(losses))]  # all seeds: the lowest one


def test_selection_table_auc_is_the_share_of_clean_below_unclean_pairs():
    from matryoshka.experiments.orthogonality import _selection_table, outcome_counts

    clean, mixed = dict(max_offtarget=0.01, max_absorption=0.0, dead=0.0), dict(max_offtarget=0.3, max_absorption=0.0, dead=0.0)
    seeds = [dict(clean, final_loss=1.0), dict(mixed, final_loss=2.0), dict(clean, final_loss=3.0),
             dict(mixed, final_loss=4.0), dict(mixed, final_loss=3.0)]
    assert outcome_counts(seeds) == [2, 0, 0, 3]
    # Clean below unclean: 1<2, 1<4, 1<3, 3<4, and 3 = 3 counts half: 4.5 of 6 pairs.
    row = _selection_table([("every", 1.0, seeds)]).splitlines()[2].split()
    assert row[-1] == "0.75" and row[2] == "2/5"


def test_unequal_toy_with_another_most_frequent_child():
    from matryoshka.experiments.hedging import family_toy_spec, unequal_spec
    from matryoshka.toy import ToyModel

    assert family_toy_spec("unequal") == unequal_spec() and family_toy_spec("unequal-q0.5") == unequal_spec()
    spec = family_toy_spec("unequal-q0.3")
    assert [[c["p"] for c in f["children"]] for f in spec["features"][:3]] == [[0.02, 0.15, 0.3]] * 3
    assert "children" not in spec["features"][3]
    ToyModel(family_toy_spec("unequal-q0.83"))  # the largest that leaves the exclusive draw a valid one
    for bad in ("unequal-q0.84", "unequal-q0", "unequal-q-0.1", "unequal-qx", "unequal-q", "unequal-qnan", "tiny"):
        with pytest.raises(ValueError, match="a family toy is one of"):
            family_toy_spec(bad)


def test_cli_refuses_an_unknown_family_toy(tmp_path, capsys):
    from matryoshka.__main__ import main

    with pytest.raises(SystemExit):
        main(["orthogonality", "--out", str(tmp_path / "o"), "--toys", "unequal-q2"])
    assert "--toys" in capsys.readouterr().err


def test_unequal_toys_at_several_q_get_the_most_frequent_childs_table(tmp_path, capsys):
    from matryoshka.experiments import orthogonality as study

    payload = study.orthogonality(tmp_path, steps=20, seeds=2, jobs=1, bases=("every-b0.2",), gammas=(3.0,),
                                  child_bases=(), family_toys=("unequal-q0.6", "unequal-q0.3"))
    table = payload["tables"]["most frequent child"]
    assert table in capsys.readouterr().out
    lines = table.splitlines()[2:]
    assert [line.split()[:3] for line in lines] == [["0.3", "every-b0.2", "3"], ["0.6", "every-b0.2", "3"]]
    for line, toy in zip(lines, ("unequal-q0.3", "unequal-q0.6")):
        seeds = payload["rows"][f"{toy}|every-b0.2|3"]
        slot = [per_child_slot(seeds, key)[-1] for key in ("rotated_by_child", "absorption_by_child")]
        clean = sum(study.outcome(r) == "clean" for r in seeds)
        assert " ".join(line.split()[3:]) == f"{fmt(slot[0])} {fmt(slot[1])} {clean}/2"
    assert (tmp_path / "orthogonality_rotation.png").stat().st_size > 10_000
    assert "most frequent child" in (tmp_path / "orthogonality_results.md").read_text()
    # One unequal toy: nothing to set against q.
    one = study.orthogonality(tmp_path / "one", steps=20, seeds=2, jobs=1, bases=("every-b0.2",), gammas=(3.0,),
                              child_bases=(), family_toys=("unequal-q0.3", "nabeshima"))
    assert "most frequent child" not in one["tables"] and not (tmp_path / "one" / "orthogonality_rotation.png").exists()
