"""What each step of the training loop does, read back from its logs, its callback and its
parameters: the terms of the logged loss, the learning-rate schedule, gradient clipping, when
latents are re-sorted and when they count as dead, and the small rules these rest on."""

from __future__ import annotations

import pytest
import torch

import matryoshka.train
from matryoshka import SparseActs
from matryoshka.sae import SparseAutoencoder
from matryoshka.train import TrainConfig, _mean_l0, lr_factor, scaled_inner_weights, train
from tests.tiny_runs import sample, tiny_config, tiny_sae


def logged_run(activation: str, **overrides):
    """A tiny run logging every step: (sae, history, callback calls)."""
    sae = tiny_sae(activation)
    calls = []
    result = train(sae, sample, tiny_config(activation, log_every=1, **overrides),
                   callback=lambda done, model, logs: calls.append((done, model, logs)))
    return sae, result.history, calls


def test_jumprelu_loss_is_reconstruction_plus_the_l0_penalty():
    """Fixed coefficient (no target L0): each step's loss is recon + coeff * L0."""
    _, history, _ = logged_run("jumprelu", target_l0=None, sparsity_coeff=0.05)
    assert any(logs["l0"] > 0 for logs in history)
    for logs in history:
        assert logs["sparsity_coeff"] == pytest.approx(0.05)
        assert logs["loss"] == pytest.approx(logs["recon"] + 0.05 * logs["l0"], rel=1e-5), logs["step"]


def test_topk_loss_is_reconstruction_plus_the_weighted_aux_loss():
    _, history, _ = logged_run("topk", aux_coeff=0.25)
    assert any(logs["aux"] > 0 for logs in history)  # dead latents appear (dead_after = 3)
    for logs in history:
        assert logs["loss"] == pytest.approx(logs["recon"] + 0.25 * logs["aux"], rel=1e-5), logs["step"]


def test_learning_rate_follows_the_schedule_and_the_callback_gets_sae_and_logs():
    config = dict(warmup_frac=0.25, cooldown_frac=0.25, lr=3e-3)
    sae, history, calls = logged_run("relu", **config)
    want = [3e-3 * lr_factor(done - 1, tiny_config("relu", **config)) for done in range(1, 17)]
    assert [logs["lr"] for logs in history] == pytest.approx(want, rel=1e-12)
    assert len(set(want)) > 3  # warm-up, plateau and cool-down all show
    assert [done for done, _, _ in calls] == list(range(1, 17))
    assert all(model is sae for _, model, _ in calls)
    assert [logs for _, _, logs in calls] == history


def test_gradient_clipping_is_applied():
    """Gradients clipped to a norm of 1e-30 leave Adam's steps at lr * 1e-22 (its eps dominates):
    the encoder does not move; unclipped, it does (no re-sorting, which permutes the encoder)."""
    start = tiny_sae("relu").W_enc.detach().clone()
    clipped, _, _ = logged_run("relu", clip_norm=1e-30, resort_every=0)
    torch.testing.assert_close(clipped.W_enc.detach(), start, rtol=0, atol=1e-12)
    free, _, _ = logged_run("relu", clip_norm=None, resort_every=0)
    assert (free.W_enc.detach() - start).abs().max() > 1e-4


def test_latents_are_resorted_after_every_resort_every_steps(monkeypatch):
    events = []
    resort = matryoshka.train._resort

    def spy(*args, **kwargs):
        events.append("resort")
        return resort(*args, **kwargs)

    monkeypatch.setattr(matryoshka.train, "_resort", spy)
    sae = tiny_sae("relu")
    train(sae, sample, tiny_config("relu", log_every=1, resort_every=5),
          callback=lambda done, model, logs: events.append(done))
    resorted_after = [events[i - 1] for i, e in enumerate(events) if e == "resort"]
    assert resorted_after == [4, 9, 14]  # i.e. during steps 5, 10 and 15


def test_a_latent_is_dead_once_silent_for_dead_after_steps(monkeypatch):
    """A TopK latent that can never win (encoder bias -1e4) is silent from step 0, so it is dead,
    in the AuxK loss's mask, from step ``dead_after`` on (0-based), not one step later; the logged
    dead count after a step is the count the next step's mask holds."""
    masks = []
    auxk = SparseAutoencoder.auxk_loss

    def spy(self, x, out, dead, k_aux):
        masks.append(dead.clone())
        return auxk(self, x, out, dead, k_aux)

    monkeypatch.setattr(SparseAutoencoder, "auxk_loss", spy)
    sae = tiny_sae("topk")
    with torch.no_grad():
        sae.b_enc[5] = -1e4
    result = train(sae, sample, tiny_config("topk", resort_every=0, dead_after=3, steps=6, log_every=1))
    history = result.history
    assert [bool(m[5]) for m in masks] == [False, False, False, True, True, True]
    assert [logs["dead"] for logs in history[:-1]] == [int(m.sum()) for m in masks[1:]]
    # The final firing recency: latent 5 never fired in the 6 steps, and it counts the final dead.
    assert result.since_fired[5] == 6 and 0 <= int(result.since_fired.min()) and int(result.since_fired.max()) <= 6
    assert int((result.since_fired >= 3).sum()) == history[-1]["dead"]


def test_mean_l0_counts_every_positive_activation():
    dense = torch.tensor([[0.5, 0.0, 0.2, 3.0], [0.0, 0.0, 0.0, 0.0]])
    assert float(_mean_l0(dense)) == 1.5
    assert float(_mean_l0(SparseActs.from_dense(dense))) == 1.5


def test_lr_factor_with_one_step_of_warm_up_and_cool_down():
    config = TrainConfig(steps=10, warmup_frac=0.1, cooldown_frac=0.1)
    assert [lr_factor(s, config) for s in range(10)] == [1.0] * 10
    short = TrainConfig(steps=10, warmup_frac=0.0, cooldown_frac=0.0)  # rounds to 0: one step each
    assert lr_factor(0, short) == lr_factor(9, short) == 1.0


def test_scaled_inner_weights_with_no_inner_weight():
    torch.testing.assert_close(scaled_inner_weights([0.0, 0.0, 1.0], 0.5), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(scaled_inner_weights([1.0, 3.0, 1.0], 2.0), torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64))


def test_train_builds_its_schedule_and_optimizer_from_the_config(monkeypatch):
    """``group_widths``, ``balance_beta`` and ``betas`` reach the prefix schedule and Adam (the
    learning rate is set every step)."""
    from matryoshka.train import PrefixSchedule

    result = train(tiny_sae("relu"), sample, tiny_config("relu", steps=1, prefix_mode="groups", group_widths=[2, 6, 12]))
    assert result.objective.lengths.tolist() == [2, 6, 12]
    result = train(tiny_sae("relu"), sample, tiny_config("relu", steps=1, prefix_mode="every", balance_beta=0.5))
    want = PrefixSchedule("every", 12, 4, balance_beta=0.5).objective
    torch.testing.assert_close(result.objective.weights, want.weights)
    built = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            built.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    train(tiny_sae("relu"), sample, tiny_config("relu", steps=1, betas=(0.25, 0.75)))
    assert built[0]["betas"] == (0.25, 0.75)


def test_each_step_scores_the_schedules_prefixes(monkeypatch):
    """``sampled``: every step's loss is over that step's draw of ``num_sampled`` prefixes, not the
    SAE's fixed objective."""
    seen = []
    reconstruction_loss = SparseAutoencoder.reconstruction_loss

    def spy(self, x, acts, prefixes=None, **kwargs):
        seen.append(prefixes)
        return reconstruction_loss(self, x, acts, prefixes, **kwargs)

    monkeypatch.setattr(SparseAutoencoder, "reconstruction_loss", spy)
    train(tiny_sae("relu"), sample, tiny_config("relu", steps=6, num_sampled=4))
    assert len(seen) == 6 and all(p is not None and len(p) == 4 for p in seen)
    assert len({tuple(p.lengths.tolist()) for p in seen}) > 1


def test_prefix_weighted_penalty_trains_jumprelu():
    """``sparsity_weighting="prefix"`` is for every penalised kind: JumpReLU (L0) as well as ReLU."""
    history = train(tiny_sae("jumprelu"), sample, tiny_config("jumprelu", steps=3, sparsity_weighting="prefix")).history
    assert history[-1]["step"] == 3
