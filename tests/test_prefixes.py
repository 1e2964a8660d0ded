"""Prefix builders and the weight fold / loss unfold bookkeeping."""

import math

import numpy as np
import pytest

import torch

from matryoshka import Prefixes, SparseActs
from matryoshka.scan_layout import SortedActs, fold_prefix_weights, prefix_positions


def test_builders():
    assert Prefixes.groups([64, 192, 512]).lengths.tolist() == [64, 192, 512]
    assert Prefixes.every(4).lengths.tolist() == [1, 2, 3, 4]
    assert Prefixes.every(3, include_empty=True).lengths.tolist() == [0, 1, 2, 3]
    assert Prefixes([2, 5]).weights.tolist() == [1.0, 1.0]


def test_sample_shape_and_weights():
    g = torch.Generator().manual_seed(0)
    p = Prefixes.sample(100, 10, generator=g)
    assert len(p) == 10 and p.max_length == 100
    assert bool((p.lengths[1:] > p.lengths[:-1]).all()) and int(p.lengths[0]) >= 1
    assert torch.allclose(p.weights, torch.full((10,), 0.1, dtype=torch.float64))
    assert Prefixes.sample(5, 1).lengths.tolist() == [5]
    assert Prefixes.sample(5, 5).lengths.tolist() == [1, 2, 3, 4, 5]


def test_sampling_probabilities_follow_the_sqrt_law():
    p = Prefixes.sampling_probabilities(64)
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-12)
    assert p[0] > p[1] > p[-1] > 0


def test_sample_prefers_short_lengths():
    """Empirical frequencies of length 1 vs length n-1 follow P(l) (single draws, num=2)."""
    g = torch.Generator().manual_seed(0)
    n, draws = 16, 4000
    counts = torch.zeros(n + 1)
    for _ in range(draws):
        counts[Prefixes.sample(n, 2, generator=g).lengths[0]] += 1
    probs = Prefixes.sampling_probabilities(n)[:-1]
    expected = probs / probs.sum() * draws
    # every length within 5 binomial standard deviations
    std = (expected * (1 - expected / draws)).sqrt()
    assert bool(((counts[1:n] - expected).abs() <= 5 * std).all())


def test_fold_puts_each_weight_on_the_residual_it_sees():
    # row: latents 2 and 5 active (unsorted), one padding slot; n = 8
    acts = SparseActs(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[5, 2, -1]]))
    sorted_acts = SortedActs(acts, 8)
    assert sorted_acts.indices.tolist() == [[2, 5, -1]]
    prefixes = Prefixes([0, 2, 3, 5, 6, 8], [1, 2, 4, 8, 16, 32])
    # residual r_0 (no latent) serves lengths 0 and 2; r_1 (after latent 2) lengths 3, 5;
    # r_2 (after latent 5) lengths 6, 8; the padding slot's residual none.
    W = fold_prefix_weights(prefix_positions(sorted_acts, prefixes), prefixes, torch.float64)
    assert W.tolist() == [[3.0, 12.0, 48.0, 0.0]]


@pytest.mark.parametrize("make", [
    lambda w: w, tuple, lambda w: np.array(w), lambda w: torch.tensor(w, dtype=torch.float64),
])
def test_float_weights_are_kept_in_float64(make):
    """0.3 is not a float32 number: lists, tuples, numpy arrays and float64 tensors keep it exactly."""
    weights = [0.3, 0.7, 1e-20]
    got = Prefixes([1, 2, 3], make(weights)).weights
    assert got.dtype == torch.float64 and got.tolist() == weights


def test_float32_weights_are_read_exactly():
    weights = torch.tensor([0.3, 0.7], dtype=torch.float32)
    assert Prefixes([1, 2], weights).weights.tolist() == weights.double().tolist()


def test_builders_keep_their_weights_and_edge_sizes():
    """Survivors of a mutation run: builders that dropped their weights, or refused n = 1."""
    assert Prefixes.groups([2, 5], [0.25, 0.75]).weights.tolist() == [0.25, 0.75]
    assert Prefixes.every(3, [0.5, 0.25, 0.125]).weights.tolist() == [0.5, 0.25, 0.125]
    assert Prefixes.every(1).lengths.tolist() == [1]
    assert Prefixes.sample(1, 1).lengths.tolist() == [1]


def test_sample_follows_its_generator_and_weights_exactly():
    draws = [Prefixes.sample(50, 7, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.manual_seed(0)  # the global RNG must not matter
    other = Prefixes.sample(50, 7, generator=torch.Generator().manual_seed(3))
    assert draws[0].lengths.tolist() == draws[1].lengths.tolist() == other.lengths.tolist()
    assert draws[0].weights.dtype == torch.float64 and draws[0].weights.tolist() == [1 / 7] * 7
    probabilities = Prefixes.sampling_probabilities(10)
    assert probabilities.dtype == torch.float64 and abs(float(probabilities.sum()) - 1.0) < 1e-15


def test_bool_lengths_are_refused():
    with pytest.raises(TypeError, match="integers"):
        Prefixes(torch.tensor([False, True]))


@pytest.mark.parametrize("build, message", [
    (lambda: Prefixes.every(2.5), "Prefixes.every: `n` must be an integer >= 1, got 2.5"),
    (lambda: Prefixes.every(0), "Prefixes.every: `n` must be an integer >= 1, got 0"),
    (lambda: Prefixes.every(True), "Prefixes.every: `n` must be an integer >= 1, got True"),
    (lambda: Prefixes.sample(10.0, 2), "Prefixes.sample: `n` must be an integer >= 1, got 10.0"),
    (lambda: Prefixes.sample(10, 2.5), "Prefixes.sample: `num` must be an integer >= 1, got 2.5"),
    (lambda: Prefixes.sample(10, 0), "Prefixes.sample: `num` must be an integer >= 1, got 0"),
    (lambda: Prefixes.sample(10, 11), r"Prefixes.sample: `num` must be in \[1, n=10\], got 11"),
])
def test_builders_refuse_counts_that_are_not_integers(build, message):
    # int() used to truncate: every(2.5) built lengths [1, 2] and sample(10, 2.5) drew 2.
    with pytest.raises(ValueError, match=message):
        build()


def test_builders_take_numpy_integers():
    assert Prefixes.every(np.int64(3)).lengths.tolist() == [1, 2, 3]
    assert Prefixes.sample(np.int32(4), np.int64(4)).lengths.tolist() == [1, 2, 3, 4]
