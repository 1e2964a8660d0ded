"""Float64 is the exact oracle it claims to be: every backend, in float64, equals a float64 loop
written here from the definition (not ``matryoshka.reference``) to 1e-12 relative, loss and
gradients, on random shapes and random non-uniform prefix weights given in every accepted form.

    L = sum_g w_g * mean_b || x_b - b_dec - sum_{i < m_g} a_bi W_dec[i] ||^2
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

RTOL = 1e-12
BACKENDS = ("reference", "torch", "triton")
# The forms weights arrive in; 0.1-style decimals are not float32 numbers, so rounding through
# float32 anywhere would show up as ~1e-8 relative.
WEIGHT_FORMS = {
    "list": list,
    "tuple": tuple,
    "numpy": np.array,
    "tensor64": lambda w: torch.tensor(w, dtype=torch.float64),
}


def _loop_loss(x, dense, W_dec, b_dec, lengths, weights):
    """The definition, one prefix and one row at a time, with Python-float weights."""
    B = x.shape[0]
    total = x.new_zeros(())
    for m, w in zip(lengths, weights):
        prefix = x.new_zeros(())
        for b in range(B):
            residual = x[b] - b_dec
            for i in range(m):
                residual = residual - dense[b, i] * W_dec[i]
            prefix = prefix + residual.pow(2).sum()
        total = total + w * (prefix / B)
    return total


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, d = (int(v) for v in torch.randint(1, 6, (2,), generator=g))
    n = int(torch.randint(3, 8, (1,), generator=g))
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    f64 = dict(dtype=torch.float64, generator=g)
    x, W, b = torch.randn(B, d, **f64), torch.randn(n, d, **f64), torch.randn(d, **f64)
    values = torch.rand(B, k, **f64) * 2
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    indices[torch.rand(B, k, generator=g) < 0.2] = -1  # some padding slots
    G = int(torch.randint(1, n + 2, (1,), generator=g))
    lengths = sorted(torch.randperm(n + 1, generator=g)[:G].tolist())
    # Decimals with few digits: exactly representable in float64, never in float32.
    weights = [round(float(w), 3) + 0.1 for w in torch.rand(G, generator=g)]
    return x, values, indices, W, b, lengths, weights


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("form", WEIGHT_FORMS)
def test_every_backend_in_float64_equals_a_float64_loop(seed, form):
    x, values, indices, W, b, lengths, weights = _random_case(seed)
    prefixes = Prefixes(lengths, WEIGHT_FORMS[form](weights))
    assert prefixes.weights.tolist() == weights, "weights must reach float64 unrounded"
    n = W.shape[0]

    leaves = [t.clone().requires_grad_() for t in (x, values, W, b)]
    dense = SparseActs(leaves[1], indices).to_dense(n)
    want = _loop_loss(leaves[0], dense, leaves[2], leaves[3], lengths, weights)
    want_grads = torch.autograd.grad(want, leaves)

    for backend in BACKENDS:
        for sparse in (True, False):
            got_leaves = [t.clone().requires_grad_() for t in (x, values, W, b)]
            acts = SparseActs(got_leaves[1], indices)
            if not sparse:
                acts = acts.to_dense(n)
            got = matryoshka_loss(got_leaves[0], acts, got_leaves[2], got_leaves[3], prefixes, backend=backend).loss
            got_grads = torch.autograd.grad(got, got_leaves)
            where = f"backend={backend} sparse={sparse} form={form} seed={seed}"
            assert got.dtype == torch.float64, where
            _assert_relative(got, want, f"loss, {where}")
            for name, g_got, g_want in zip(("dx", "dvalues", "dW_dec", "db_dec"), got_grads, want_grads):
                _assert_relative(g_got, g_want, f"{name}, {where}")


def _assert_relative(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Max abs error relative to the largest magnitude of the oracle (a per-element relative error
    is meaningless for entries that cancel to ~0)."""
    scale = max(float(want.detach().abs().max()), 1e-300) if want.numel() else 1.0
    error = float((got - want).detach().abs().max()) if want.numel() else 0.0
    assert error <= RTOL * scale, f"{what}: error {error:.3e} > {RTOL:g} x {scale:.3e}"
