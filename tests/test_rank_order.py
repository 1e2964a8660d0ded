"""Rank-order prefixes (``order="rank"``): every backend against the reference, flex-sae's
HierarchicalTopK loss on a hand-computed example, the slot ordering, and the argument errors."""

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.scan_layout import SortedActs

from .conftest import DEVICE
from .helpers import assert_matches, make_problem


def ranked_run(p, prefixes, backend, detach=False):
    leaves = [p.x, p.values, p.W_dec] + ([] if p.b_dec is None else [p.b_dec])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    b = leaves[3] if p.b_dec is not None else None
    acts = SparseActs(leaves[1], p.indices)
    out = matryoshka_loss(leaves[0], acts, leaves[2], b, prefixes, backend=backend, order="rank", detach=detach)
    out.loss.backward()
    return [out.loss.detach(), out.per_prefix] + [t.grad for t in leaves]


def with_ties(p):
    """Round values so that rows hold equal activations: ties are broken by latent index."""
    p.values = (p.values * 2).round() / 2 + 0.5
    return p


# (B, d, n, k, pad_fraction, padding_rows): padded slots and a padded row, k = 1, odd k.
SHAPES = [
    pytest.param(5, 13, 30, 7, 0.3, (1,), id="odd-k-padding"),
    pytest.param(3, 8, 9, 1, 0.0, (), id="k=1"),
]


@pytest.mark.parametrize("detach", [False, True], ids=["plain", "detach"])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("B,d,n,k,pad,pad_rows", SHAPES)
def test_rank_order_matches_reference(backend, dtype, detach, B, d, n, k, pad, pad_rows):
    device = "cpu" if backend == "torch" else DEVICE
    p = with_ties(make_problem(B, d, n, k, dtype, device, pad, pad_rows, bias=d % 2 == 1))
    g = torch.Generator().manual_seed(5)
    for name, prefixes in {
        "every+empty": Prefixes.every(k, weights=torch.rand(k + 1, generator=g, dtype=torch.float64),
                                      include_empty=True),
        "zero-weight": Prefixes([0, (k + 1) // 2, k], [1.0, 0.0, 2.0]) if k > 1 else Prefixes([0, 1], [0.0, 1.0]),
    }.items():
        want = ranked_run(p, prefixes, "reference", detach)
        try:
            assert_matches(ranked_run(p, prefixes, backend, detach), want, dtype)
        except AssertionError as e:
            raise AssertionError(f"prefixes={name}: {e}") from None


def test_ranked_slots_by_value_ties_by_index_padding_last():
    values = torch.tensor([[0.5, 2.0, 0.5, 9.0, 1.0]])
    indices = torch.tensor([[7, 3, 2, -1, 5]])
    ranked = SortedActs(SparseActs(values, indices), 10).ranked(10)
    assert ranked.indices.tolist() == [[3, 5, 2, 7, -1]]
    assert ranked.values.tolist() == [[2.0, 1.0, 0.5, 0.5, 9.0]]
    assert ranked.key.tolist() == [[0, 1, 2, 3, 5]]


def test_equals_flex_sae_hierarchical_topk_loss_by_hand():
    """flex-sae's loss: sum over j = 1..K of the squared error of each row's top-j reconstruction,
    divided by B * K * D.  Ours with weights 1 / (K * D) on every rank-order length 1..K."""
    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0]],
                     dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    x = torch.tensor([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 2.0], [3.0, 1.0]], dtype=torch.float64)
    indices = torch.tensor([[4, 1], [0, 3]])
    B, K, D = 2, 2, 3
    # Row 0, top-1 is latent 1 (2.0): x_hat = b + 2 W[1] = [0.5, 1, 0]; top-2 adds 0.5 W[4] = [1.5, 1, 0].
    # Row 1, top-1 is latent 0 (3.0): x_hat = b + 3 W[0] = [3.5, -1, 6]; top-2 adds 1 W[3] = [3.5, -1, 9].
    errors = [
        (3 - 0.5) ** 2 + (1 - 1) ** 2 + (4 - 0) ** 2, (3 - 1.5) ** 2 + 0 + 4**2,
        (1 - 3.5) ** 2 + (5 + 1) ** 2 + (9 - 6) ** 2, (1 - 3.5) ** 2 + 6**2 + 0,
    ]
    flex = sum(errors) / (B * K * D)
    prefixes = Prefixes.every(K, weights=[1.0 / (K * D)] * K)
    for backend in ("reference", "torch"):
        out = matryoshka_loss(x, SparseActs(values, indices), W, b, prefixes, backend=backend, order="rank")
        assert float(out.loss) == pytest.approx(flex, rel=1e-14)


def test_rank_order_argument_errors():
    p = make_problem(2, 4, 8, 3, torch.float64)
    acts = SparseActs(p.values, p.indices)
    with pytest.raises(ValueError, match="order='rank' needs `acts` as SparseActs"):
        matryoshka_loss(p.x, acts.to_dense(8), p.W_dec, None, Prefixes([1, 2]), order="rank")
    with pytest.raises(ValueError, match="must be <= k = 3"):
        matryoshka_loss(p.x, acts, p.W_dec, None, Prefixes([2, 4]), order="rank")
    with pytest.raises(ValueError, match="`order` must be one of"):
        matryoshka_loss(p.x, acts, p.W_dec, None, Prefixes([2]), order="value")
    with pytest.raises(TypeError, match="`detach` must be a bool"):
        matryoshka_loss(p.x, acts, p.W_dec, None, Prefixes([2]), detach=1)
