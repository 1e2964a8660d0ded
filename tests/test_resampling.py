"""Dead-latent resampling (:mod:`matryoshka.resampling`): which latents restart on which residuals,
what is reset and what is left bit for bit alone, and, in training, that it revives a latent the
dead-latent (AuxK) loss cannot reach."""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka.resampling import resample_dead_latents_
from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.train import TrainConfig, _LatentStats, train
from tests.tiny_runs import sample, tiny_config, tiny_sae


def _sae(activation: str = "relu", d: int = 5, n: int = 6, seed: int = 0) -> SparseAutoencoder:
    k = 2 if activation in ("topk", "batchtopk") else None
    return SparseAutoencoder(SAEConfig(d=d, n=n, activation=activation, k=k), torch.Generator().manual_seed(seed))


def _errors() -> torch.Tensor:
    """Four residual rows of norms 0.5, 0, 5 and 0: two usable directions, the larger one third."""
    errors = torch.zeros(4, 5)
    errors[0] = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0])
    errors[2] = torch.tensor([3.0, 0.0, 0.0, 4.0, 0.0])
    return errors


def test_dead_latents_take_the_largest_residuals_in_latent_order():
    sae = _sae()
    with torch.no_grad():  # encoder columns of norms 1..6 (not the unit ones of the start)
        sae.W_enc.mul_(torch.arange(1.0, 7.0) / sae.W_enc.norm(dim=0))
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    dead = torch.tensor([False, True, False, True, True, False])
    live_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()

    taken = resample_dead_latents_(sae, None, dead, _errors())

    # Latent 1 takes the largest residual (row 2), latent 3 the next (row 0); latent 4 finds only
    # zero rows and waits.
    assert taken.tolist() == [False, True, False, True, False, False]
    torch.testing.assert_close(sae.W_dec[1], torch.tensor([0.6, 0.0, 0.0, 0.8, 0.0]))
    torch.testing.assert_close(sae.W_dec[3], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(sae.W_enc[:, 1], live_norm * sae.W_dec[1])
    torch.testing.assert_close(sae.W_enc[:, 3], live_norm * sae.W_dec[3])
    assert sae.b_enc[1] == 0 and sae.b_enc[3] == 0
    for latent in (0, 2, 4, 5):  # live latents and the one left waiting: untouched, bit for bit
        assert torch.equal(sae.W_dec[latent], before["W_dec"][latent])
        assert torch.equal(sae.W_enc[:, latent], before["W_enc"][:, latent])
        assert torch.equal(sae.b_enc[latent], before["b_enc"][latent])
    assert torch.equal(sae.b_dec, before["b_dec"])


def test_a_restarted_latent_fires_on_the_input_it_was_drawn_from():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc[2] = -100.0  # dead: negative on every input
    x = torch.tensor([[3.0, 0.0, 0.0, 4.0, 0.0]])
    assert sae.dense_acts(x)[0, 2] == 0
    dead = torch.zeros(6, dtype=torch.bool)
    dead[2] = True
    resample_dead_latents_(sae, None, dead, x - sae(x).recon.detach())
    assert sae.dense_acts(x)[0, 2] > 0


def test_more_dead_latents_than_rows_restart_as_many_as_there_are_rows():
    sae = _sae()
    errors = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    taken = resample_dead_latents_(sae, None, torch.ones(6, dtype=torch.bool), errors)
    assert taken.tolist() == [True, True, False, False, False, False]
    by_norm = errors[errors.norm(dim=1).argsort(descending=True)]
    torch.testing.assert_close(sae.W_dec[:2], by_norm / by_norm.norm(dim=1, keepdim=True))  # each its own row
    # With nothing alive the encoder rows are the unit directions themselves.
    torch.testing.assert_close(sae.W_enc[:, :2], sae.W_dec[:2].T)


def test_one_live_latent_sets_the_encoder_scale():
    sae = _sae()
    with torch.no_grad():
        sae.W_enc[:, 5] *= 3.0
    live_norm = sae.W_enc[:, 5].norm()
    dead = torch.tensor([True, True, True, True, True, False])
    resample_dead_latents_(sae, None, dead, torch.randn(3, 5, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(sae.W_enc[:, :3], live_norm * sae.W_dec[:3].T)


def test_an_optimizer_without_state_yet_is_left_as_it_is():
    sae = _sae()
    optimizer = torch.optim.Adam(sae.parameters())
    taken = resample_dead_latents_(sae, optimizer, torch.ones(6, dtype=torch.bool), torch.ones(2, 5))
    assert taken.sum() == 2 and len(optimizer.state) == 0


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
def test_adam_moments_of_restarted_latents_are_zeroed_and_the_rest_kept(activation):
    sae = _sae(activation)
    if activation == "jumprelu":  # thresholds away from their start, so that a reset shows
        with torch.no_grad():
            sae.log_threshold.fill_(0.0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    ((out.recon - x).pow(2).sum() + out.pre.pow(2).sum()).backward()
    optimizer.step()
    for param in sae.parameters():  # nonzero moments everywhere, so that zeroing shows
        for moment in optimizer.state[param].values():
            if moment.dim() > 0:
                moment.fill_(1.0)
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in sae.parameters()}
    dead = torch.tensor([True, False, False, False, True, False])
    taken = resample_dead_latents_(sae, optimizer, dead, torch.randn(8, 5, generator=torch.Generator().manual_seed(3)))
    assert taken.tolist() == dead.tolist()
    for param, dim in sae.latent_dims():
        for key, moment in optimizer.state[param].items():
            old = before[id(param)][key]
            if moment.dim() == 0:
                assert torch.equal(moment, old), f"Adam's step counter of a {tuple(param.shape)} parameter changed"
                continue
            assert torch.all(moment.index_select(dim, taken.nonzero().flatten()) == 0), key
            kept = (~taken).nonzero().flatten()
            assert torch.equal(moment.index_select(dim, kept), old.index_select(dim, kept)), key
    if activation == "jumprelu":
        start = math.log(sae.config.jumprelu_init_threshold)
        torch.testing.assert_close(sae.log_threshold[taken], torch.full((2,), start))


@pytest.mark.parametrize("dead, errors, message", [
    (torch.zeros(5, dtype=torch.bool), torch.zeros(3, 5), r"dead must be a \(6,\) bool mask"),
    (torch.zeros(6), torch.zeros(3, 5), r"dead must be a \(6,\) bool mask"),
    (torch.zeros(6, dtype=torch.bool), torch.zeros(3, 4), r"errors must be a \(B, 5\) batch"),
    (torch.zeros(6, dtype=torch.bool), torch.zeros(0, 5), r"errors must be a \(B, 5\) batch"),
])
def test_bad_arguments_are_refused_by_name(dead, errors, message):
    with pytest.raises(ValueError, match=message):
        resample_dead_latents_(_sae(), None, dead, errors)


def test_resample_every_must_be_a_count():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="TrainConfig.resample_every must be an integer >= 0"):
            TrainConfig(resample_every=bad)


# ------------------------------------------------------------------------------------ in training
def _silenced(activation: str) -> SparseAutoencoder:
    """A tiny SAE whose latent 0 is negative on every input from the start."""
    sae = tiny_sae(activation)
    with torch.no_grad():
        sae.b_enc[0] = -1e3
    return sae


def _fires(sae: SparseAutoencoder, latent: int) -> bool:
    x = sample(512, torch.Generator().manual_seed(7))
    sae.eval()
    try:
        return bool((sae.dense_acts(x)[:, latent] > 0).any())
    finally:
        sae.train()


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_training_with_resampling_revives_a_latent_the_aux_loss_cannot(activation):
    """Without resampling latent 0 never fires (for TopK kinds the AuxK loss is on, and gives it no
    gradient: its ReLU'd pre-activations are all 0); with it, the latent is restarted and fires."""
    config = dict(steps=40, resort_every=0, dead_after=5, log_every=10, checkpoint_every=0)
    stuck = _silenced(activation)
    result = train(stuck, sample, tiny_config(activation, **config))
    assert not _fires(stuck, 0) and stuck.b_enc[0] == -1e3  # not one gradient reached it
    assert "resampled" not in result.history[-1]

    revived = _silenced(activation)
    result = train(revived, sample, tiny_config(activation, resample_every=5, **config))
    assert result.history[-1]["resampled"] >= 1
    assert _fires(revived, 0)


def test_no_restart_in_the_cool_down():
    """20 steps, cool-down over the last 4: latents are restarted up to step 16 and not after,
    though some are dead then (a strong fixed L1 keeps killing them)."""
    logs = []
    train(_silenced("relu"), sample, tiny_config("relu", steps=20, resort_every=0, dead_after=1, resample_every=1,
                                                 log_every=1, checkpoint_every=0, sparsity_coeff=10.0, target_l0=None),
          callback=lambda step, sae, row: logs.append(row))
    restarts = [b["resampled"] - a for a, b in zip([0] + [row["resampled"] for row in logs], logs)]
    assert sum(restarts[:16]) >= 1 and restarts[16:] == [0, 0, 0, 0]
    assert all(row["dead"] > 0 for row in logs[16:])



def test_restarted_latents_start_their_statistics_afresh_and_are_counted():
    stats = _LatentStats(4, 0.9)
    stats.since_fired = torch.tensor([7, 0, 9, 3])
    stats.energy = torch.tensor([0.5, 1.0, 0.25, 2.0])
    stats.frequency = torch.tensor([0.1, 0.2, 0.3, 0.4])
    stats.restart(torch.tensor([True, False, True, False]))
    stats.restart(torch.tensor([True, False, False, False]))
    assert stats.since_fired.tolist() == [0, 0, 0, 3]  # dead_after more steps before they count as dead
    assert stats.energy.tolist() == [0.0, 1.0, 0.0, 2.0]
    assert stats.frequency.tolist() == pytest.approx([0.0, 0.2, 0.0, 0.4])
    assert stats.resampled.tolist() == [2, 0, 1, 0]
    stats.permute(torch.tensor([2, 0, 3, 1]))  # the counts move with their latents when re-sorted
    assert stats.resampled.tolist() == [1, 2, 0, 0]
