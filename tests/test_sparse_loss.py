"""The sparse scan backends (torch, Triton) against the plain-loop reference: loss and all gradients."""

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

from .helpers import RTOL, assert_matches, check_half_sparse, make_problem, run_loss

# (B, d, n, k, pad_fraction, padding_rows): non-power-of-two d, k = 1, k = n, padding slots,
# all-padding rows, d wider than one Triton chunk (1024 columns), one row.
SHAPES = [
    pytest.param(6, 37, 50, 5, 0.2, (1,), id="odd-d-padding"),
    pytest.param(5, 24, 30, 1, 0.0, (), id="k=1"),
    pytest.param(4, 16, 12, 12, 0.0, (), id="k=n"),
    pytest.param(4, 16, 12, 12, 0.3, (0, 3), id="k=n-padded"),
    pytest.param(3, 1100, 20, 3, 0.0, (), id="d>chunk"),
    pytest.param(1, 5, 9, 4, 0.0, (), id="one-row"),
    pytest.param(3, 8, 10, 4, 1.0, (), id="all-padding"),
]


def prefix_sets(n: int) -> dict[str, Prefixes]:
    g = torch.Generator().manual_seed(1)
    return {
        "every+empty": Prefixes.every(n, include_empty=True),
        "every-weighted": Prefixes.every(n, weights=torch.rand(n, generator=g, dtype=torch.float64)),
        "groups": Prefixes.groups([max(1, n // 4), max(2, n // 2), n], [1.0, 0.5, 2.0]),
        "sampled": Prefixes.sample(n, min(n, 10), generator=g),
        "empty-only": Prefixes([0]),
        "full-only": Prefixes([n]),
        "zero-weight": Prefixes([0, n // 2, n], [0.0, 1.0, 0.0]),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,d,n,k,pad,pad_rows", SHAPES)
def test_matches_reference(backend, dtype, B, d, n, k, pad, pad_rows, device):
    if backend == "torch":
        device = "cpu"
    problem = make_problem(B, d, n, k, dtype, device, pad, pad_rows, bias=(d % 2 == 1))
    for name, prefixes in prefix_sets(n).items():
        want = run_loss(problem, prefixes, "reference")
        got = run_loss(problem, prefixes, backend)
        try:
            assert_matches(got, want, dtype)
        except AssertionError as e:
            raise AssertionError(f"prefixes={name}: {e}") from None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_prefix_at_every_latent_equals_groups_sum(backend, device):
    """Prefixes at every latent and the same prefixes split into two calls add up."""
    device = "cpu" if backend == "torch" else device
    p = make_problem(4, 20, 16, 6, torch.float64, device)
    every = run_loss(p, Prefixes.every(16, include_empty=True), backend)
    evens = run_loss(p, Prefixes(list(range(0, 17, 2))), backend)
    odds = run_loss(p, Prefixes(list(range(1, 17, 2))), backend)
    torch.testing.assert_close(every[0], evens[0] + odds[0])
    torch.testing.assert_close(every[1][::2], evens[1])
    for a, b, c in zip(every[2:], evens[2:], odds[2:]):
        torch.testing.assert_close(a, b + c)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_order_within_row_does_not_matter(backend, device):
    device = "cpu" if backend == "torch" else device
    p = make_problem(5, 12, 24, 6, torch.float64, device, pad_fraction=0.3)
    prefixes = Prefixes.every(24)
    want = run_loss(p, prefixes, backend)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3)).to(p.indices.device)
    p.values, p.indices = p.values[:, perm], p.indices[:, perm]
    got = run_loss(p, prefixes, backend)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[3], want[3][:, perm])


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_empty_batch_gives_zero_loss(backend, device):
    device = "cpu" if backend != "triton" else device
    p = make_problem(0, 8, 10, 3, torch.float32, device)
    got = run_loss(p, Prefixes.groups([5, 10]), backend)
    assert got[0].item() == 0.0
    assert torch.equal(got[1], torch.zeros(2))
    assert got[2].shape == (0, 8) and got[4].abs().sum() == 0


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_nan_propagates(backend, device):
    device = "cpu" if backend != "triton" else device
    p = make_problem(3, 8, 10, 3, torch.float32, device)
    p.x[1, 2] = float("nan")
    out = matryoshka_loss(p.x, SparseActs(p.values, p.indices), p.W_dec, p.b_dec, Prefixes([10]), backend=backend)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_out_of_range_index_is_ignored_not_read(backend, device):
    """With validate=False an index outside [0, n) must not be dereferenced: it acts as padding."""
    device = "cpu" if backend == "torch" else device
    p = make_problem(3, 8, 10, 3, torch.float64, device)
    bad = p.indices.clone()
    bad[0, 0], bad[2, 1] = 10**12, -7
    padded = bad.masked_fill((bad < 0) | (bad >= 10), -1)
    prefixes = Prefixes.every(10)
    p.indices = bad
    got = run_loss(p, prefixes, backend, validate=False)
    p.indices = padded
    want = run_loss(p, prefixes, "reference")
    assert_matches(got, want, torch.float64)  # loss, per-prefix losses, dx, dvalues, dW_dec, db_dec
    assert got[3][0, 0] == 0 and got[3][2, 1] == 0  # the out-of-range slots' values get no gradient


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype, device):
    """Half inputs: a float32 loss and gradients in ``dtype``, within bounds derived from a float64
    oracle on the same rounded inputs (see helpers).  Interpreter-sized; test_gpu has a larger twin."""
    p = make_problem(4, 64, 48, 24, torch.float32, device, pad_fraction=0.1)
    check_half_sparse(p, Prefixes.every(48, include_empty=True), dtype)


def test_mixed_half_and_float32_inputs():
    """bfloat16 activations with a float32 decoder (autocast style) accumulate in float32."""
    p = make_problem(4, 16, 20, 4, torch.float32)
    prefixes = Prefixes.every(20)
    acts = SparseActs(p.values.bfloat16(), p.indices)
    out = matryoshka_loss(p.x, acts, p.W_dec, p.b_dec, prefixes, backend="torch")
    want = matryoshka_loss(p.x, SparseActs(p.values.bfloat16().float(), p.indices), p.W_dec, p.b_dec, prefixes, "reference")
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want.loss, rtol=RTOL[torch.float32], atol=0)


def test_per_prefix_is_consistent_with_loss(device):
    p = make_problem(8, 16, 40, 6, torch.float64, device, pad_fraction=0.2)
    prefixes = Prefixes.sample(40, 10, generator=torch.Generator().manual_seed(0))
    out = matryoshka_loss(p.x, SparseActs(p.values, p.indices), p.W_dec, p.b_dec, prefixes)
    torch.testing.assert_close(out.loss.detach(), (out.per_prefix * prefixes.weights.to(device)).sum())
    assert not out.per_prefix.requires_grad
