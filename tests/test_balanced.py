"""``Prefixes.balanced``: geometric level weights (Chanin et al.'s balanced Matryoshka SAE)."""

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

from .helpers import make_problem


def test_weights_are_powers_of_beta_innermost_highest():
    p = Prefixes.balanced([4, 8, 16, 32], 0.5)
    assert p.lengths.tolist() == [4, 8, 16, 32]
    assert p.weights.tolist() == [0.125, 0.25, 0.5, 1.0]


def test_beta_zero_is_a_plain_sae_and_beta_one_equal_groups():
    prob = make_problem(4, 8, 16, 5, torch.float64)
    acts = SparseActs(prob.values, prob.indices)

    def loss(prefixes):
        return matryoshka_loss(prob.x, acts, prob.W_dec, prob.b_dec, prefixes, backend="torch").loss

    torch.testing.assert_close(loss(Prefixes.balanced([4, 8, 16], 0.0)), loss(Prefixes([16])))
    torch.testing.assert_close(loss(Prefixes.balanced([4, 8, 16], 1.0)), loss(Prefixes.groups([4, 8, 16])))


@pytest.mark.parametrize("beta", [-0.5, float("inf"), float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="`beta` must be finite and >= 0"):
        Prefixes.balanced([4, 8], beta)
