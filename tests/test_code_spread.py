"""The code-spread penalty (``matryoshka/code_spread.py``): its value on hand-made codes, sparse codes
against dense ones, the rotated pair's closed form on codes solved from the directions, its gradient,
and its place in the trainer."""

import math

import pytest
import torch

from matryoshka import SparseActs
from matryoshka.code_spread import FLOOR, code_spread_penalty, rotated_pair_spread
from matryoshka.experiments.common import study_mode
from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.train import TrainConfig, train

from .tiny_runs import D, N, sample


def test_hand_made_codes():
    """Latent 0 fires at one magnitude (0), latent 1 at 1 and 3 (2·10/16 − 1 = 0.25), latent 2 once
    and latent 3 never (both left out of the mean)."""
    acts = torch.tensor([[2.0, 1.0, 0.0, 0.0],
                         [2.0, 0.0, 5.0, 0.0],
                         [2.0, 3.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert code_spread_penalty(acts).item() == pytest.approx(0.125, abs=1e-15)
    assert code_spread_penalty(acts[:, :1]).item() == 0.0


def test_faint_codes_below_the_floor_are_not_counted():
    """A code at or below ``FLOOR`` times the latent's largest in the batch is not a firing: no spread,
    and no gradient on it; just above the floor it counts."""
    faint = torch.tensor([[1.0], [1.0], [0.05], [0.0]], dtype=torch.float64, requires_grad=True)
    penalty = code_spread_penalty(faint)
    penalty.backward()
    assert penalty.item() == 0.0 and faint.grad[2].item() == 0.0
    above = torch.tensor([[1.0], [1.0], [1.01 * FLOOR]], dtype=torch.float64)
    assert code_spread_penalty(above).item() > 0.1


def test_no_latent_fires_twice_gives_zero_and_finite_gradients():
    acts = torch.tensor([[0.0, 1.5], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    penalty = code_spread_penalty(acts)
    penalty.backward()
    assert penalty.item() == 0.0 and torch.isfinite(acts.grad).all() and not acts.grad.any()


def test_sparse_codes_match_dense_ones():
    """TopK-style codes with padding slots (index −1), a zero value (not fired) and faint values
    (below the floor), against their dense matrix: value and gradient."""
    g = torch.Generator().manual_seed(0)
    B, n, k = 9, 7, 3
    values = torch.rand(B, k, generator=g, dtype=torch.float64) + 0.1
    values[2, 1] = 0.0
    values[3, 0] = values[5, 2] = 1e-3  # faint: below the floor
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    indices[4, 2] = indices[6, 0] = -1
    sparse_values = values.clone().requires_grad_()
    got = code_spread_penalty(SparseActs(sparse_values, indices), n)
    dense_values = values.clone().requires_grad_()
    want = code_spread_penalty(SparseActs(dense_values, indices).to_dense(n))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(sparse_values.grad, dense_values.grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="n, the number of latents"):
        code_spread_penalty(SparseActs(values, indices))


@pytest.mark.parametrize("q,r", [(0.5, 1.0), (0.3, 2.0), (0.75, 0.5)])
def test_rotated_pair_closed_form_on_codes_solved_from_the_directions(q, r):
    """Samples ``a p`` (parent alone) and ``a (p + r c)`` (with the child), in the proportions
    ``1 − q`` and ``q``; the codes of a pair of unit directions are the exact coordinates of each
    sample in that pair.  The true pair (``p``, ``c``) fires each latent at one magnitude (0); the
    rotated pair (``u = (p + r c)/√(1+r²)`` and the unit vector orthogonal to it in the plane) gives
    its first latent the closed form's spread, and its second fires on parent-alone samples only."""
    p, c = torch.eye(2, dtype=torch.float64)
    a = 1.7
    alone, together = round(1000 * (1 - q)), round(1000 * q)
    x = torch.cat([(a * p).expand(alone, 2), (a * (p + r * c)).expand(together, 2)])
    u = (p + r * c) / math.sqrt(1 + r * r)
    v = (r * p - c) / math.sqrt(1 + r * r)  # orthogonal to u; positive on the parent-alone samples
    true_codes = x @ torch.stack([p, c]).T
    coordinates = x @ torch.stack([u, v]).T
    rotated_codes = torch.where(coordinates > 1e-12, coordinates, 0.0)  # ReLU: v reads 0 with the child (to rounding)
    torch.testing.assert_close(rotated_codes @ torch.stack([u, v]), x, rtol=0, atol=1e-12)  # exact
    assert code_spread_penalty(true_codes).item() == pytest.approx(0.0, abs=1e-12)
    assert code_spread_penalty(rotated_codes[:, :1]).item() == pytest.approx(rotated_pair_spread(q, r), rel=1e-9)
    assert code_spread_penalty(rotated_codes[:, 1:]).item() == pytest.approx(0.0, abs=1e-12)
    assert rotated_pair_spread(0.5, 1.0) == pytest.approx(1 / 9)


def test_gradient_against_finite_differences():
    g = torch.Generator().manual_seed(1)
    acts = (torch.rand(6, 4, generator=g, dtype=torch.float64) + 0.2) * (torch.rand(6, 4, generator=g) > 0.3)
    mask = acts > 0
    codes = acts[mask].clone().requires_grad_()

    def penalty(values):
        return code_spread_penalty(torch.zeros_like(acts).masked_scatter(mask, values))

    assert torch.autograd.gradcheck(penalty, (codes,))


def _tiny_run(**settings) -> torch.Tensor:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d=D, n=N, activation="relu"))
    config = TrainConfig(steps=30, batch_size=16, prefix_mode="every", target_l0=2.0, log_every=10, progress=False,
                         **settings)
    train(sae, sample, config)
    return sae.W_dec.detach().clone()


def test_trainer_adds_the_penalty_from_its_start_and_checks_its_settings():
    """The weight and start are checked; the penalty reaches the loss (a run with it ends elsewhere
    than one without, from the same seed), from its start on (start 1: never, the plain run bit for
    bit; start 0.5: elsewhere again); the study-mode suffixes set both."""
    with pytest.raises(ValueError, match="TrainConfig.code_spread_coeff must be a finite number >= 0"):
        TrainConfig(code_spread_coeff=-1.0)
    with pytest.raises(ValueError, match=r"TrainConfig.code_spread_start must be a number in \[0, 1\]"):
        TrainConfig(code_spread_start=1.5)
    torch.set_num_threads(1)
    plain, always, never, later = (_tiny_run(), _tiny_run(code_spread_coeff=1.0),
                                   _tiny_run(code_spread_coeff=1.0, code_spread_start=1.0),
                                   _tiny_run(code_spread_coeff=1.0, code_spread_start=0.5))
    assert torch.equal(plain, never)
    assert not torch.equal(plain, always) and not torch.equal(plain, later) and not torch.equal(always, later)
    assert study_mode("every-b0.2-cv1-cvfrom0.5-orth3") == ("every", {
        "balance_beta": 0.2, "balance_normalise": False, "code_spread_coeff": 1.0, "code_spread_start": 0.5,
        "orthogonality_coeff": 3.0})
    with pytest.raises(ValueError, match="-cvfrom<f>: f is the share of the steps before the code-spread penalty"):
        study_mode("every-cv1-cvfrom1.5")
    with pytest.raises(ValueError, match="-cool<f>: f is the share of the steps in the learning-rate cool-down"):
        study_mode("every-cool2")
