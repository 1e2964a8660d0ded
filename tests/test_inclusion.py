"""``matryoshka.inclusion``: the O(n * num)-per-node inclusion probabilities against the former
O(n^2 * num) dynamic programme (kept here as the oracle), and at n = 65536."""

import numpy as np
import pytest
import torch
from scipy.integrate import quad_vec

from matryoshka import Prefixes
from matryoshka.inclusion import every_prefix_weights, sampled_inclusion_probabilities


def former_inclusion(n: int, num: int) -> np.ndarray:
    """The former implementation: a Poisson-binomial programme per clock, O(n^2 num) per node."""
    rates = Prefixes.sampling_probabilities(n)[:-1].numpy()
    m, draws = rates.size, num - 1
    not_self = 1.0 - np.eye(m)

    def integrand(t: float) -> np.ndarray:
        rung = -np.expm1(-rates * t)
        count = np.zeros((m, draws))
        count[:, 0] = 1.0
        for j in range(m):
            p = rung[j] * not_self[:, j : j + 1]
            count = count * (1 - p) + np.pad(count[:, :-1], ((0, 0), (1, 0))) * p
        return rates * np.exp(-rates * t) * count.sum(1)

    inside, _ = quad_vec(integrand, 0.0, np.inf, epsabs=1e-13, epsrel=1e-11)
    return np.append(inside, 1.0)


@pytest.mark.parametrize("n, num", [(2, 2), (4, 3), (7, 6), (12, 3), (20, 10), (33, 10), (40, 5)])
def test_matches_the_former_programme(n, num):
    got = sampled_inclusion_probabilities(n, num).numpy()
    want = former_inclusion(n, num)
    assert np.max(np.abs(got - want) / want) <= 1e-9


def test_edge_cases():
    assert sampled_inclusion_probabilities(5, 1).tolist() == [0, 0, 0, 0, 1]
    assert sampled_inclusion_probabilities(5, 5).tolist() == [1.0] * 5
    with pytest.raises(ValueError):
        sampled_inclusion_probabilities(5, 6)
    torch.testing.assert_close(every_prefix_weights(20, 10), sampled_inclusion_probabilities(20, 10) / 10)


def test_every_prefix_weights_at_65536_latents():
    pi = sampled_inclusion_probabilities(65536, 10)  # ~0.6 s on the 2-core machine; no timing asserted
    assert float(pi.sum()) == pytest.approx(10.0, abs=1e-8)
    assert bool((pi[1:-1] <= pi[:-2]).all()) and bool((pi > 0).all()) and float(pi[-1]) == 1.0
