"""The toy sampler against its spec: frequencies, exclusivity, magnitudes, directions."""

import json

import pytest
import torch

from matryoshka.toy import ToyModel, child_magnitude_spec, nabeshima_spec

N = 100_000


def _within(empirical: torch.Tensor, p: torch.Tensor, count: int, sigmas: float = 5.0) -> None:
    """Binomial frequencies within ``sigmas`` standard errors of ``p``."""
    se = (p * (1 - p) / count).sqrt().clamp(min=1e-9)
    z = ((empirical.double() - p) / se).abs()
    assert bool((z < sigmas).all()), z


@pytest.fixture(scope="module")
def nabeshima():
    toy = ToyModel(nabeshima_spec())
    x, acts = toy.sample(N, torch.Generator().manual_seed(0))
    return toy, x, acts


def test_nabeshima_structure(nabeshima):
    toy, _, _ = nabeshima
    assert toy.num_features == 20 and toy.d == 20
    assert toy.families() == [(0, [1, 2, 3]), (4, [5, 6, 7]), (8, [9, 10, 11])]
    assert toy.expected_l0() == pytest.approx(3 * 0.15 * 1.6 + 8 * 0.05)


def test_marginal_frequencies_match_spec(nabeshima):
    toy, _, acts = nabeshima
    _within((acts > 0).float().mean(0), toy.marginal_probabilities(), N)


def test_exclusive_children_given_parent(nabeshima):
    toy, _, acts = nabeshima
    on = acts > 0
    for parent, children in toy.families():
        assert not bool((on[:, children].any(1) & ~on[:, parent]).any()), "a child fired without its parent"
        assert int(on[:, children].sum(1).max()) <= 1, "exclusive children fired together"
        given = on[on[:, parent]]
        _within(given[:, children].float().mean(0), torch.full((3,), 0.2, dtype=torch.float64), given.shape[0])
        none = (~given[:, children].any(1)).float().mean()
        _within(none.reshape(1), torch.tensor([0.4], dtype=torch.float64), given.shape[0])


def test_binary_magnitudes_and_inputs(nabeshima):
    toy, x, acts = nabeshima
    assert set(acts.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(x, acts @ toy.directions)


def test_directions_orthogonal_with_jittered_norms(nabeshima):
    toy, _, _ = nabeshima
    unit = torch.nn.functional.normalize(toy.directions.double(), dim=1)
    torch.testing.assert_close(unit @ unit.T, torch.eye(20, dtype=torch.float64), atol=1e-6, rtol=0)
    norms = toy.directions.norm(dim=1)
    assert 0.01 < float(norms.std()) < 0.1 and abs(float(norms.mean()) - 1) < 0.05


def test_child_magnitude_preset():
    toy = ToyModel(child_magnitude_spec())
    x, acts = toy.sample(N, torch.Generator().manual_seed(1))
    assert toy.names[:2] == ["parent", "child"] and toy.parents[:2] == [-1, 0]
    _within((acts > 0).float().mean(0)[:2], torch.tensor([0.3, 0.15], dtype=torch.float64), N)
    assert set(acts[:, 0].unique().tolist()) == {0.0, 2.0}
    assert set(acts[:, 1].unique().tolist()) == {0.0, 10.0}
    torch.testing.assert_close(toy.directions.norm(dim=1), torch.ones(toy.num_features))


def test_gaussian_magnitudes_and_independent_children():
    spec = {"d": 4, "features": [{"name": "p", "p": 0.5, "magnitude": {"mean": 3.0, "std": 0.5},
                                  "children": [{"name": "a", "p": 0.5}, {"name": "b", "p": 0.5}]}]}
    toy = ToyModel(spec)
    _, acts = toy.sample(N, torch.Generator().manual_seed(2))
    on = acts > 0
    values = acts[on[:, 0], 0]
    assert abs(float(values.mean()) - 3.0) < 0.02 and abs(float(values.std()) - 0.5) < 0.02
    given = on[on[:, 0]]
    # independent children: both fire together about 0.25 of the time given the parent
    _within((given[:, 1] & given[:, 2]).float().mean().reshape(1), torch.tensor([0.25], dtype=torch.float64),
            given.shape[0])


def test_a_parent_scale_multiplies_the_parents_magnitude_where_that_child_fires():
    """The same draws with and without ``parent_scale``: only the parent's code moves, to ``s`` times
    its own where the child fires; and the inputs are those of a fixed parent whose child's
    direction leans towards it, ``c + (s − 1)·p`` (the module doc's equivalence)."""
    spec = {"d": 6, "norm_jitter": 0.05, "features": [
        {"name": "p", "p": 0.5, "magnitude": {"mean": 1.0, "std": 0.2}, "exclusive": True,
         "children": [{"name": "a", "p": 0.5}, {"name": "b", "p": 0.3}]}, {"name": "i", "p": 0.2}]}
    plain = ToyModel(spec)
    spec["features"][0]["children"][0]["parent_scale"] = 1.5
    scaled = ToyModel(spec)
    x1, acts1 = plain.sample(N, torch.Generator().manual_seed(4))
    xs, acts_s = scaled.sample(N, torch.Generator().manual_seed(4))
    child = acts1[:, 1] > 0
    assert 0.2 < float(child.float().mean()) < 0.3  # the child fires, and not always
    torch.testing.assert_close(acts_s[:, 0], torch.where(child, 1.5, 1.0) * acts1[:, 0])
    torch.testing.assert_close(acts_s[:, 1:], acts1[:, 1:])
    leaning = x1 + (1.5 - 1) * (acts1[:, :1] * child[:, None]) * plain.directions[0]
    torch.testing.assert_close(xs, leaning, atol=1e-5, rtol=0)


def test_seeded_and_json_roundtrip():
    spec = json.loads(json.dumps(nabeshima_spec(seed=3)))
    a, b = ToyModel(spec), ToyModel(nabeshima_spec(seed=3))
    torch.testing.assert_close(a.directions, b.directions)
    xa, _ = a.sample(100, torch.Generator().manual_seed(5))
    xb, _ = b.sample(100, torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb)


@pytest.mark.parametrize("spec, message", [
    ({"d": 2, "features": [{"p": 0.1}] * 3}, "orthogonal"),
    ({"d": 4, "features": [{"p": 0.5, "exclusive": True, "children": [{"p": 0.6}, {"p": 0.6}]}]}, "sum"),
    ({"d": 4, "features": [{"p": 1.5}]}, "outside"),
    ({"d": 4, "features": [{"p": 0.5, "children": [{"p": 0.5, "parent_scale": 0.0}]}]}, "parent_scale=0.0; expected"),
    ({"d": 4, "features": [{"p": 0.5, "children": [{"p": 0.5, "parent_scale": float("nan")}]}]}, "parent_scale=nan"),
    ({"d": 4, "features": [{"p": 0.5, "parent_scale": 2.0}]}, "a parent_scale but no parent"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        ToyModel(spec)
