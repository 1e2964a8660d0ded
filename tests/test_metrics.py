"""Metrics on hand-built SAEs whose answers are known."""

import math

import pytest
import torch

from matryoshka.metrics import (
    LearningOrder,
    absorption,
    cosine_matrix,
    evaluate,
    family_mixing,
    match_latents,
    reconstruction_stats,
)
from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.toy import ToyModel, child_magnitude_spec, nabeshima_spec


def ideal_sae(toy: ToyModel, perm: torch.Tensor | None = None) -> SparseAutoencoder:
    """Decoder = the true directions (unit rows), encoder reads each feature off exactly."""
    F = toy.num_features
    sae = SparseAutoencoder(SAEConfig(d=toy.d, n=F, activation="relu"))
    dirs = toy.directions
    perm = torch.arange(F) if perm is None else perm
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(dirs, dim=1)[perm])
        sae.W_enc.copy_((dirs / dirs.norm(dim=1, keepdim=True) ** 2 * dirs.norm(dim=1, keepdim=True))[perm].T)
        sae.b_enc.fill_(-1e-4)  # keeps float round-off (~1e-8 on inactive features) from counting in L0
        sae.b_dec.zero_()
    return sae


def test_true_directions_give_mcc_one_and_no_absorption():
    toy = ToyModel(nabeshima_spec())
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    m = evaluate(ideal_sae(toy, perm), toy, num_samples=5000)
    assert m["mcc"] == pytest.approx(1.0, abs=1e-5)
    assert m["matching"]["latent"] == torch.argsort(perm).tolist()
    assert m["absorption"] == 0.0
    assert m["child_cos_parent"] == pytest.approx(0.0, abs=1e-5)
    assert m["mix_pos"] == pytest.approx(0.0, abs=1e-5) and m["mix_neg"] == pytest.approx(0.0, abs=1e-5)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5) and m["mse"] < 1e-6
    assert m["dead"] == 0 and m["l0"] == pytest.approx(toy.expected_l0(), rel=0.05)


def merged_sae(toy: ToyModel) -> SparseAutoencoder:
    """The parent latent reads ``parent - child`` (silent when both fire); the child latent reads the
    child and decodes ``parent + child``: the parent is fully absorbed into the child."""
    sae = ideal_sae(toy)
    d_p, d_c = toy.directions[0], toy.directions[1]
    with torch.no_grad():
        sae.W_enc[:, 0] = d_p - d_c
        sae.W_dec[1] = (d_p + d_c) / math.sqrt(2)
    return sae


def test_merged_parent_gives_absorption_one():
    toy = ToyModel(child_magnitude_spec(parent_magnitude=1.0, child_magnitude=1.0))
    m = evaluate(merged_sae(toy), toy, num_samples=5000)
    assert m["matching"]["latent"][:2] == [0, 1]
    assert m["absorption"] == 1.0
    assert m["child_cos_parent"] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert m["mix_pos"] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert m["pairs"][0]["both"] > 0


def test_absorption_counts_only_silent_parent_latents():
    # 4 samples with parent and child both on; the parent latent is at its usual 1.0, at 0.05 (silent:
    # below 10%), at 0.2 (not silent) and at 0 while the child latent is also silent (not absorbed).
    true = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    acts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.05, 1.0], [0.2, 1.0], [0.0, 0.0]])
    cos = torch.eye(2)
    pairs = absorption(acts, true, cos, match_latents(cos), [(0, [1])])
    assert pairs[0]["rate"] == pytest.approx(1 / 4) and pairs[0]["both"] == 4


def test_mixing_signs():
    cos = torch.tensor([[1.0, -0.3, 0.0], [0.4, 0.9, 0.0], [0.0, -0.2, 0.95]])
    match = match_latents(cos)
    assert match.latent == [0, 1, 2]
    mixing = family_mixing(cos, match, [(0, [1, 2])])
    assert mixing[0]["max_pos"] == pytest.approx(0.4) and mixing[0]["max_neg"] == pytest.approx(-0.3)


def test_cosine_matrix_and_matching_with_extra_latents():
    dirs = torch.eye(3, 5)
    W = torch.cat([dirs[[2, 0]] * 3.0, torch.ones(2, 5), dirs[[1]]])
    cos = cosine_matrix(W, dirs)
    assert cos.shape == (5, 3)
    match = match_latents(cos)
    assert match.latent == [1, 4, 0] and match.mcc == pytest.approx(1.0)


def test_learning_order_records_first_step_and_position():
    order = LearningOrder(2, threshold=0.9)
    order.update(10, torch.tensor([[0.5, 0.1], [0.95, 0.2]]))
    order.update(20, torch.tensor([[0.99, -0.92], [0.1, 0.2]]))
    assert order.step == [10, 20] and order.position == [1, 0]


def test_reconstruction_stats():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    acts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    stats = reconstruction_stats(x, acts, x * 0.5)
    assert stats["l0"] == 1.0 and stats["dead"] == 1
    assert stats["explained_variance"] == pytest.approx(1 - 0.5 / 1.0)
