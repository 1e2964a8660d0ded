"""gradcheck of the PyTorch scan, and a hypothesis property test of the Triton kernels."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matryoshka import Prefixes, SparseActs
from matryoshka.torch_scan import dense_prefix_norms_torch, sparse_scan_torch

from .helpers import assert_matches, make_problem, run_loss


def _sparse_scan_triton(*args):
    from matryoshka.kernels.sparse_scan_op import sparse_scan_triton

    return sparse_scan_triton(*args)


@pytest.mark.parametrize("sparse_scan", [sparse_scan_torch, _sparse_scan_triton], ids=["torch", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_sparse_scan(sparse_scan, bias):
    """The scan as an op of its own: arbitrary gradients on every residual norm, padding included."""
    from .conftest import DEVICE

    device = DEVICE if sparse_scan is _sparse_scan_triton else "cpu"
    p = make_problem(3, 7, 9, 4, torch.float64, device, pad_fraction=0.25, bias=bias, seed=2)
    order = torch.where(p.indices < 0, 10**9, p.indices).argsort(1)
    idx = p.indices.gather(1, order)
    inputs = [t.detach().clone().requires_grad_() for t in (p.x, p.W_dec, p.values.gather(1, order))]
    b = p.b_dec.detach().clone().requires_grad_() if bias else None

    def scan(x, W, v, *maybe_b):
        norms, _final = sparse_scan(x, maybe_b[0] if maybe_b else None, W, v, idx)
        return norms

    # Every interpreted Triton launch is slow: fast mode checks random directions of the Jacobian
    # (a few launches) instead of every column; the torch scan gets the full check.
    fast = sparse_scan is _sparse_scan_triton
    assert torch.autograd.gradcheck(scan, inputs + ([b] if bias else []), fast_mode=fast)


def test_gradcheck_dense_torch_scan():
    p = make_problem(3, 6, 300, 5, torch.float64, seed=4)  # n > one 256-latent block
    acts = SparseActs(p.values, p.indices).to_dense(300).detach().requires_grad_()
    lengths = torch.tensor([0, 7, 255, 256, 257, 300])
    inputs = [t.detach().clone().requires_grad_() for t in (p.x, p.b_dec, p.W_dec)]
    # 2 700 input elements: fast mode (random Jacobian directions) keeps this a second, not minutes.
    assert torch.autograd.gradcheck(
        lambda x, b, W, a: dense_prefix_norms_torch(x, b, W, a, lengths), inputs + [acts], fast_mode=True
    )


@st.composite
def problems(draw):
    B = draw(st.integers(1, 5))
    d = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, n))
    lengths = sorted(draw(st.sets(st.integers(0, n), min_size=1, max_size=n + 1)))
    # Weights are folded through float64 cumulative sums (scan_layout): a weight below ~1e-16 of
    # the total is lost to rounding by design, so the strategy draws zeros or sensible weights.
    weight = st.one_of(st.just(0.0), st.floats(1e-3, 4))
    weights = draw(st.lists(weight, min_size=len(lengths), max_size=len(lengths)))
    pad = draw(st.sampled_from([0.0, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return (B, d, n, k, pad, seed, Prefixes(lengths, weights))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_triton_matches_reference_on_random_problems(case):
    from .conftest import DEVICE

    B, d, n, k, pad, seed, prefixes = case
    p = make_problem(B, d, n, k, torch.float64, DEVICE, pad_fraction=pad, seed=seed, bias=seed % 2 == 0)
    assert_matches(run_loss(p, prefixes, "triton"), run_loss(p, prefixes, "reference"), torch.float64)


def test_dense_torch_matches_reference_every_prefix():
    p = make_problem(4, 12, 520, 30, torch.float64, seed=5)
    for prefixes in (Prefixes.every(520, include_empty=True), Prefixes.groups([64, 256, 300, 520])):
        assert_matches(
            run_loss(p, prefixes, "torch", dense=True), run_loss(p, prefixes, "reference", dense=True), torch.float64
        )
