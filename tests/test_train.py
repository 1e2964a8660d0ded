"""The trainer: prefix modes and their weights, schedule, re-sorting, determinism, loss going down."""

import math

import pytest
import torch

from matryoshka import Prefixes
from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.toy import ToyModel, nabeshima_spec
from matryoshka.train import (
    PrefixSchedule,
    TrainConfig,
    _LatentStats,
    _resort,
    default_group_widths,
    every_prefix_weights,
    lr_factor,
    sampled_inclusion_probabilities,
    train,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n, num", [(20, 10), (12, 3), (7, 6)])
def test_inclusion_probabilities_match_monte_carlo(n, num):
    pi = sampled_inclusion_probabilities(n, num)
    assert pi.shape == (n,) and float(pi[-1]) == 1.0
    assert float(pi.sum()) == pytest.approx(num, abs=1e-8)
    draws = 4000
    g = torch.Generator().manual_seed(n * 100 + num)
    counts = torch.zeros(n, dtype=torch.float64)
    for _ in range(draws):
        counts[Prefixes.sample(n, num, generator=g).lengths - 1] += 1
    se = (pi * (1 - pi) / draws).sqrt().clamp(min=1e-12)
    assert bool((((counts / draws) - pi).abs() <= 5 * se + 1e-12).all())


def test_inclusion_edge_cases():
    assert sampled_inclusion_probabilities(5, 1).tolist() == [0, 0, 0, 0, 1]
    torch.testing.assert_close(sampled_inclusion_probabilities(5, 5), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError):
        sampled_inclusion_probabilities(5, 6)


def test_sampled_and_every_agree_in_expectation():
    """The mean over draws of the sampled prefix weights, per length, is the every-mode weight."""
    n, num, draws = 20, 10, 4000
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(draws):
        p = Prefixes.sample(n, num, generator=g)
        total[p.lengths - 1] += p.weights
    every = every_prefix_weights(n, num)
    assert float(every.sum()) == pytest.approx(1.0)
    se = (every * (1 / num - every) / draws).sqrt().clamp(min=1e-12)  # weight is 1/num w.p. num*every
    assert bool(((total / draws - every).abs() <= 5 * se + 1e-12).all())
    schedule = PrefixSchedule("every", n, num)
    torch.testing.assert_close(schedule().weights, every)


def test_prefix_modes():
    assert PrefixSchedule("vanilla", 8)().lengths.tolist() == [8]
    groups = PrefixSchedule("groups", 20)()
    assert groups.lengths.tolist() == default_group_widths(20) == [3, 5, 10, 20]
    # small n: doubling widths collapse, the smallest group is one latent
    assert [default_group_widths(n) for n in (1, 3, 4, 8)] == [[1], [1, 2, 3], [1, 2, 4], [1, 2, 4, 8]]
    g = torch.Generator().manual_seed(0)
    sampled = PrefixSchedule("sampled", 20, 10, generator=g)
    a, b = sampled(), sampled()
    assert len(a) == 10 and a.max_length == 20 and a.lengths.tolist() != b.lengths.tolist()
    with pytest.raises(ValueError):
        PrefixSchedule("random", 20)


def test_lr_schedule_warms_up_holds_and_cools_down():
    config = TrainConfig(steps=100, warmup_frac=0.1, cooldown_frac=0.2)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[79] == 1.0 and factors[99] == pytest.approx(1 / 20)
    assert all(b <= a for a, b in zip(factors[80:], factors[81:]))


def test_resort_permutes_latents_and_adam_state():
    sae = SparseAutoencoder(SAEConfig(d=4, n=5, activation="jumprelu"), torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    (sae.reconstruction_loss(x, out.acts).loss + sae.sparsity_penalty(out)).backward()
    opt.step()
    stats = _LatentStats(5, 0.9)
    stats.energy = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.2])
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {name: opt.state[p]["exp_avg_sq"].clone() for name, p in sae.named_parameters()}
    _resort(sae, opt, stats)
    perm = torch.tensor([1, 3, 4, 0, 2])
    assert torch.equal(stats.energy, torch.tensor([0.5, 0.3, 0.2, 0.1, 0.0]))
    for param, dim in sae.latent_dims():
        name = next(k for k, v in sae.named_parameters() if v is param)
        assert torch.equal(param.detach(), before[name].index_select(dim, perm))
        assert torch.equal(opt.state[param]["exp_avg_sq"], moments[name].index_select(dim, perm))
    assert torch.equal(sae.b_dec.detach(), before["b_dec"])


def _toy_run(mode: str, activation: str = "relu", steps: int = 300, seed: int = 0, **kw):
    toy = ToyModel(nabeshima_spec())
    k = 2 if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(SAEConfig(d=20, n=20, activation=activation, k=k), torch.Generator().manual_seed(seed))
    config = TrainConfig(steps=steps, prefix_mode=mode, target_l0=toy.expected_l0(), sparsity_coeff=1e-3,
                         log_every=50, progress=False, seed=seed, **kw)
    return sae, train(sae, lambda rows, g: toy.sample(rows, g)[0], config)


@pytest.mark.parametrize("mode", ["vanilla", "groups", "sampled", "every"])
def test_training_reduces_the_loss(mode):
    sae, result = _toy_run(mode)
    recon = [row["recon"] for row in result.history]
    assert recon[-1] < 0.7 * recon[0]
    assert sae.prefixes is result.objective
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_other_activations_train(activation):
    _, result = _toy_run("every", activation, steps=200, dead_after=20, aux_k=4)
    assert result.history[-1]["recon"] < result.history[0]["recon"]
    if activation != "jumprelu":
        assert any(row["aux"] > 0 for row in result.history), "some latent should be dead after 20 steps"


def test_adaptive_l1_steers_towards_target_l0():
    _, result = _toy_run("sampled", steps=400)
    assert abs(result.history[-1]["l0"] - 1.12) < abs(result.history[0]["l0"] - 1.12)


def test_deterministic_callback_and_checkpoints(tmp_path):
    calls = []
    toy = ToyModel(nabeshima_spec())
    weights = []
    for run in range(2):
        sae = SparseAutoencoder(SAEConfig(d=20, n=20), torch.Generator().manual_seed(0))
        config = TrainConfig(steps=60, prefix_mode="sampled", log_every=20, checkpoint_every=30, progress=False,
                             resort_every=10, target_l0=1.0)
        train(sae, lambda rows, g: toy.sample(rows, g)[0], config,
              callback=lambda step, model, logs: calls.append(step), checkpoint_dir=tmp_path / str(run))
        weights.append(sae.W_dec.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert calls == [20, 40, 60] * 2
    assert sorted(p.name for p in (tmp_path / "0").iterdir()) == ["step_0000030", "step_0000060"]
    loaded = SparseAutoencoder.load(tmp_path / "0" / "step_0000060")
    assert torch.equal(loaded.W_dec, weights[0])


# ----------------------------------------------------------------------------- detached and balanced levels
def test_balanced_mode_weights_are_beta_powers():
    for beta in (0.0, 0.3, 2.0):
        weights = PrefixSchedule("balanced", 20, balance_beta=beta).objective.weights
        G = 4
        torch.testing.assert_close(weights, torch.tensor([beta ** (G - g) for g in range(1, G + 1)],
                                                         dtype=torch.float64))
    normed = PrefixSchedule("balanced", 20, group_widths=[4, 20], balance_beta=0.5, balance_normalise=True)
    assert normed.objective.lengths.tolist() == [4, 20]
    torch.testing.assert_close(normed.objective.weights, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_every_with_inner_levels_scaled_by_beta():
    exact = every_prefix_weights(20, 10)
    for beta in (0.0, 0.05, 1.0):
        w = PrefixSchedule("every", 20, 10, balance_beta=beta).objective.weights
        assert float(w[-1]) == 1.0 and abs(float(w[:-1].sum()) - beta) < 1e-12
        if beta > 0:  # the inner prefixes keep the exact weights' proportions
            torch.testing.assert_close(w[:-1] / beta, exact[:-1] / exact[:-1].sum())
    # today's every is the normalised form at beta = num_sampled - 1 ...
    today = PrefixSchedule("every", 20, 10, balance_beta=9, balance_normalise=True).objective.weights
    torch.testing.assert_close(today, exact, rtol=0, atol=1e-12)
    # ... and uniform weights are the normalised uniform form at beta = n - 1
    uniform = PrefixSchedule("every", 20, every_weights="uniform", balance_beta=19, balance_normalise=True)
    torch.testing.assert_close(uniform.objective.weights, torch.full((20,), 1 / 20, dtype=torch.float64))
    for bad, message in ((dict(mode="sampled", balance_beta=0.5), "^balance_beta applies to prefix modes"),
                         (dict(mode="groups", balance_beta=0.5), "^balance_beta applies to prefix modes"),
                         (dict(mode="balanced"), r"^prefix mode 'balanced' needs balance_beta \(the inner"),
                         (dict(mode="every", balance_beta=-1.0), r"^balance_beta must be finite and >= 0, got -1.0$"),
                         (dict(mode="every", balance_beta=math.inf), r"^balance_beta must be finite and >= 0, got inf$"),
                         (dict(mode="sideways"), "^prefix mode must be one of"),
                         (dict(mode="every", every_weights="flat"), "^every_weights must be one of")):
        with pytest.raises(ValueError, match=message):
            PrefixSchedule(n=20, **bad)


def test_schedule_objectives_and_defaults():
    """The objectives' weights (not only their lengths), and 10 sampled prefixes by default."""
    torch.testing.assert_close(PrefixSchedule("groups", 20).objective.weights, torch.full((4,), 0.25, dtype=torch.float64))
    uniform = PrefixSchedule("every", 20, every_weights="uniform")
    torch.testing.assert_close(uniform.objective.weights, torch.full((20,), 1 / 20, dtype=torch.float64))
    assert uniform() is uniform.objective
    assert len(PrefixSchedule("sampled", 20, generator=torch.Generator().manual_seed(0))()) == 10


def test_detach_reaches_the_loss_same_value_other_gradients():
    toy = ToyModel(nabeshima_spec())
    x = toy.sample(64, torch.Generator().manual_seed(0))[0]
    prefixes = PrefixSchedule("every", 20).objective
    outs = []
    for detach in (False, True):
        sae = SparseAutoencoder(SAEConfig(d=20, n=20), torch.Generator().manual_seed(0))
        loss = sae.reconstruction_loss(x, sae(x).acts, prefixes, detach=detach).loss
        loss.backward()
        outs.append((loss.detach(), sae.W_dec.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert not torch.allclose(outs[0][1], outs[1][1])


def test_train_config_detach_and_beta_change_training_not_the_first_loss():
    toy = ToyModel(nabeshima_spec())
    runs = {}
    for name, kw in {"plain": {}, "detach": {"detach": True}, "beta": {"balance_beta": 9.0, "balance_normalise": True},
                     "freq": {"resort_by": "frequency"}}.items():
        sae = SparseAutoencoder(SAEConfig(d=20, n=20), torch.Generator().manual_seed(0))
        config = TrainConfig(steps=20, prefix_mode="every", log_every=1, progress=False, resort_every=5, **kw)
        result = train(sae, lambda rows, g: toy.sample(rows, g)[0], config)
        runs[name] = (result.history[0]["recon"], sae.W_dec.detach().clone())
    assert runs["plain"][0] == pytest.approx(runs["detach"][0], rel=1e-6)  # same forward loss at step 1
    assert not torch.allclose(runs["plain"][1], runs["detach"][1])  # different gradients
    torch.testing.assert_close(runs["plain"][1], runs["beta"][1])  # beta 9 normalised = today's every
    assert not torch.equal(runs["plain"][1], runs["freq"][1])  # another latent order
    with pytest.raises(ValueError, match="resort_by"):
        train(SparseAutoencoder(SAEConfig(d=20, n=20)), lambda rows, g: toy.sample(rows, g)[0],
              TrainConfig(steps=1, progress=False, resort_by="size"))


def test_new_fields_join_the_checkpoint_identity_only_when_set(tmp_path):
    from matryoshka.checkpoint import CheckpointError
    from matryoshka.train import _LATER_FIELDS

    toy = ToyModel(nabeshima_spec())
    sample = lambda rows, g: toy.sample(rows, g)[0]  # noqa: E731
    base = dict(steps=10, prefix_mode="every", log_every=5, checkpoint_every=5, progress=False)
    train(SparseAutoencoder(SAEConfig(d=20, n=20)), sample, TrainConfig(**{**base, "detach": True}),
          checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="differing settings: train_config.detach: checkpoint True"):
        train(SparseAutoencoder(SAEConfig(d=20, n=20)), sample, TrainConfig(**base), checkpoint_dir=tmp_path,
              resume=True)
    result = train(SparseAutoencoder(SAEConfig(d=20, n=20)), sample, TrainConfig(**{**base, "detach": True}),
                   checkpoint_dir=tmp_path, resume=True)
    assert result.history[-1]["step"] == 10
    assert set(_LATER_FIELDS) <= set(TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), r"TrainConfig\.steps must be an integer >= 1, got 0$"),
    (dict(steps=2.5), r"TrainConfig\.steps must be an integer >= 1, got 2\.5$"),
    (dict(batch_size=0), r"TrainConfig\.batch_size must be an integer >= 1"),
    (dict(log_every=0), r"TrainConfig\.log_every must be an integer >= 1"),
    (dict(data_chunk_steps=0), r"TrainConfig\.data_chunk_steps must be an integer >= 1"),
    (dict(checkpoint_every=-5), r"TrainConfig\.checkpoint_every must be an integer >= 0 \(0: never\), got -5$"),
    (dict(keep_checkpoints=1.5), r"TrainConfig\.keep_checkpoints must be an integer >= 0 \(0: all\), got 1\.5$"),
    (dict(resort_every=True), r"TrainConfig\.resort_every must be an integer >= 0 \(0: never\), got True$"),
    (dict(lr=math.nan), r"TrainConfig\.lr must be a finite number > 0, got nan$"),
    (dict(betas=(0.9, 1.0)), r"TrainConfig\.betas must be two numbers in \[0, 1\), got \(0\.9, 1\.0\)$"),
    (dict(warmup_frac=1.5), r"TrainConfig\.warmup_frac must be a number in \[0, 1\], got 1\.5$"),
    (dict(clip_norm=0.0), r"TrainConfig\.clip_norm must be None \(no clipping\) or a finite number > 0, got 0\.0$"),
    (dict(sparsity_coeff=0.0), r"TrainConfig\.sparsity_coeff must be a finite number > 0, got 0\.0$"),
    (dict(target_l0=0), r"TrainConfig\.target_l0 must be None \(a fixed coefficient\) or a finite number > 0"),
    (dict(resort_ema=1.0), r"TrainConfig\.resort_ema must be a number in \[0, 1\), got 1\.0$"),
    (dict(aux_coeff=-1.0), r"TrainConfig\.aux_coeff must be a finite number >= 0, got -1\.0$"),
    (dict(resort_by="norm"), r"TrainConfig\.resort_by must be one of \('energy', 'frequency'\), got 'norm'$"),
])
def test_train_config_refuses_bad_settings_naming_the_field(bad, message):
    """Each of these crashed mid-run with an unrelated error (ZeroDivisionError, a reshape error,
    math.log's domain error) or trained quietly wrong (no steps, a gradient clipped to 0)."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_train_config_takes_numpy_scalars_and_the_edges_of_each_range():
    import numpy as np

    config = TrainConfig(steps=np.int64(5), lr=np.float32(1e-3), warmup_frac=0.0, cooldown_frac=1.0,
                         checkpoint_every=0, resort_every=0, clip_norm=None, betas=[0.0, 0.999], resort_ema=0.0)
    assert config.steps == 5
