"""Detached levels (``detach=True``): every backend against the reference written from the definition
with ``.detach()``, loss and all gradients; gradcheck of the PyTorch scans; the custom ops' opcheck
and a ``torch.compile`` round trip."""

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.torch_scan import dense_prefix_norms_detached_torch, sparse_scan_detached_torch

from .conftest import DEVICE
from .helpers import assert_compiled_step_matches, assert_matches, make_problem, run_loss


def detached_run(p, prefixes, backend, dense=False):
    """``run_loss`` with ``detach=True``."""
    return run_loss(p, prefixes, backend, dense, detach=True)


def prefix_sets(n: int) -> dict[str, Prefixes]:
    g = torch.Generator().manual_seed(3)
    return {
        "every+empty": Prefixes.every(n, weights=torch.rand(n + 1, generator=g, dtype=torch.float64),
                                      include_empty=True),
        "groups-zero-weight": Prefixes([0, n // 3, n // 3 + 1, n], [2.0, 0.0, 1.0, 0.5]),
        "inner-only": Prefixes([n // 2]),
    }


# The PyTorch scans compute float32 with the float64 code: the Triton kernels get both dtypes.
BACKEND_DTYPES = [("torch", torch.float64), ("triton", torch.float64), ("triton", torch.float32)]

# (B, d, n, k, pad_fraction, padding_rows): odd d with padded slots and a padded row, k = 1.
SPARSE_SHAPES = [
    pytest.param(5, 13, 20, 6, 0.3, (2,), id="odd-d-padding"),
    pytest.param(3, 8, 9, 1, 0.0, (), id="k=1"),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("B,d,n,k,pad,pad_rows", SPARSE_SHAPES)
def test_sparse_detach_matches_reference(backend, dtype, B, d, n, k, pad, pad_rows):
    device = "cpu" if backend == "torch" else DEVICE
    p = make_problem(B, d, n, k, dtype, device, pad, pad_rows, bias=d % 2 == 1)
    for name, prefixes in prefix_sets(n).items():
        try:
            assert_matches(detached_run(p, prefixes, backend), detached_run(p, prefixes, "reference"), dtype)
        except AssertionError as e:
            raise AssertionError(f"prefixes={name}: {e}") from None


# Dense: n = 40 spans three 16-latent tiles of the Triton kernel, with prefixes inside tiles, on
# a tile edge (16, 32) and at 0.
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_dense_detach_matches_reference(backend, dtype):
    device = "cpu" if backend == "torch" else DEVICE
    p = make_problem(17, 21, 40, 12, dtype, device, pad_fraction=0.2)
    for name, prefixes in {
        "every+empty": Prefixes.every(40, include_empty=True),
        "groups": Prefixes([0, 3, 7, 16, 17, 32, 40], [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 3.0]),
        "inner-only": Prefixes([21]),
    }.items():
        want = detached_run(p, prefixes, "reference", dense=True)
        try:
            assert_matches(detached_run(p, prefixes, backend, dense=True), want, dtype)
        except AssertionError as e:
            raise AssertionError(f"prefixes={name}: {e}") from None


def test_detach_changes_only_latent_gradients():
    """Same loss, per-prefix losses, dx and db_dec; different latent gradients; one level: no change."""
    p = make_problem(4, 10, 16, 6, torch.float64, pad_fraction=0.2)
    groups = Prefixes([4, 9, 16], [1.0, 0.5, 2.0])
    plain, detached = run_loss(p, groups, "torch"), detached_run(p, groups, "torch")
    for name, i in [("loss", 0), ("per_prefix", 1), ("dx", 2), ("db_dec", 5)]:
        torch.testing.assert_close(detached[i], plain[i], msg=name)
    assert not torch.allclose(detached[3], plain[3]) and not torch.allclose(detached[4], plain[4])
    one_level = Prefixes([16])
    assert_matches(detached_run(p, one_level, "torch"), run_loss(p, one_level, "torch"), torch.float64)


# A stop-gradient is invisible to finite differences, so gradcheck perturbs only what is live:
# ``x`` and ``b_dec`` under gradients on every entry of both outputs, and the slots of one level
# under a gradient on the ``level_norms`` entry at that level's end (where ``matryoshka_loss`` puts it).
@pytest.mark.parametrize("level", [1, 2])
def test_gradcheck_sparse_detached_torch_scan(level):
    p = make_problem(3, 7, 9, 4, torch.float64, pad_fraction=0.25, seed=2)
    order = torch.where(p.indices < 0, 10**9, p.indices).argsort(1)
    indices, values = p.indices.gather(1, order), p.values.gather(1, order)
    levels = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 3], [0, 2, 2, 2]])
    live = levels == level
    g = torch.Generator().manual_seed(0)
    grad_norms = torch.randn(3, 5, generator=g, dtype=torch.float64)
    grad_level = torch.zeros(3, 5, dtype=torch.float64)
    for row in range(3):
        slots = live[row].nonzero()
        if len(slots):
            grad_level[row, int(slots[-1]) + 1] = 1.5 + row  # norm index = slot + 1

    def through_x(x, b):
        norms, level_norms, _final = sparse_scan_detached_torch(x, b, p.W_dec, values, indices, levels)
        return (grad_norms * norms).sum() + (grad_norms * level_norms).sum()

    def through_level(x, b, live_values):
        v = values.masked_scatter(live, live_values)
        _, level_norms, _final = sparse_scan_detached_torch(x, b, p.W_dec, v, indices, levels)
        return (grad_level * level_norms).sum()

    inputs = [t.detach().clone().requires_grad_() for t in (p.x, p.b_dec, values[live])]
    assert torch.autograd.gradcheck(through_x, inputs[:2])
    assert torch.autograd.gradcheck(through_level, inputs)


@pytest.mark.parametrize("level", [1, 3])
def test_gradcheck_dense_detached_torch_scan(level):
    """Norm ``g`` perturbed in ``x``, ``b_dec`` and its own level's activations and decoder rows."""
    p = make_problem(3, 6, 12, 5, torch.float64, seed=4)
    acts = SparseActs(p.values, p.indices).to_dense(12)
    lengths = torch.tensor([0, 3, 4, 12])
    lo, hi = int(lengths[level - 1]), int(lengths[level])

    def norm(x, b, own_acts, own_W):
        a = torch.cat([acts[:, :lo], own_acts, acts[:, hi:]], dim=1)
        W = torch.cat([p.W_dec[:lo], own_W, p.W_dec[hi:]])
        return dense_prefix_norms_detached_torch(x, b, W, a, lengths)[:, level]

    inputs = [t.detach().clone().requires_grad_() for t in (p.x, p.b_dec, acts[:, lo:hi], p.W_dec[lo:hi])]
    assert torch.autograd.gradcheck(norm, inputs)


def test_opcheck_detached_ops():
    import matryoshka.kernels.dense_scan_op  # noqa: F401  (registers the ops)
    import matryoshka.kernels.sparse_scan_op  # noqa: F401

    p = make_problem(3, 10, 12, 4, torch.float32, DEVICE, pad_fraction=0.25)
    order = torch.where(p.indices < 0, 10**9, p.indices).argsort(1)
    indices = p.indices.gather(1, order)
    levels = torch.searchsorted(torch.tensor([3, 8, 12], device=DEVICE), indices.clamp(min=0), right=True)
    values = p.values.gather(1, order).requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.matryoshka.sparse_scan_detached.default,
        (p.x.requires_grad_(), p.b_dec, p.W_dec.requires_grad_(), values, indices, levels), test_utils=tests,
    )
    dense = SparseActs(p.values, p.indices).to_dense(12).detach().requires_grad_()
    torch.library.opcheck(
        torch.ops.matryoshka.dense_scan_detached.default,
        (p.x, p.b_dec, p.W_dec, dense, torch.tensor([0, 5, 12])), test_utils=tests,
    )


def test_detached_rank_order_loss_inside_torch_compile():
    """Both new arguments at once: the rank sort, the level weights and the detached op trace through
    dynamo with the op kept opaque."""
    p = make_problem(4, 16, 20, 5, torch.float32, DEVICE, pad_fraction=0.2)
    prefixes = Prefixes([1, 3, 5], [1.0, 0.5, 2.0])

    def step(x, values, W, b):
        acts = SparseActs(values, p.indices)
        return matryoshka_loss(x, acts, W, b, prefixes, backend="triton", validate=False, order="rank",
                               detach=True).loss

    assert_compiled_step_matches(step, [p.x, p.values, p.W_dec, p.b_dec])
