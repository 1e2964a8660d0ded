"""Random test problems and a comparator shared by the loss tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

# Relative tolerance per compute dtype, measured against the largest magnitude of the reference
# tensor: float32 scans accumulate k + 1 rank-1 updates, float64 agrees to round-off.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@dataclass
class Problem:
    x: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.W_dec.shape[0]


def make_problem(
    B: int,
    d: int,
    n: int,
    k: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    pad_fraction: float = 0.0,
    padding_rows: tuple[int, ...] = (),
    bias: bool = True,
    seed: int = 0,
) -> Problem:
    """Unsorted distinct indices per row; some slots (and whole rows) padded with -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]) if B else torch.empty(0, k, dtype=torch.int64)
    values = torch.rand(B, k, generator=g, dtype=torch.float64) * 2
    pad = torch.rand(B, k, generator=g) < pad_fraction
    for row in padding_rows:
        pad[row] = True
    indices = indices.masked_fill(pad, -1)
    values = values.masked_fill(pad, 123.0)  # garbage in padding slots must be ignored
    to = dict(dtype=dtype, device=device)
    return Problem(x.to(**to), values.to(**to), indices.to(device), W.to(**to), None if b is None else b.to(**to))


def run_loss(p: Problem, prefixes: Prefixes, backend: str, dense: bool = False):
    """Loss, per-prefix losses and the gradients of x, values (or dense acts), W_dec, b_dec."""
    leaves = [p.x, p.values, p.W_dec] + ([] if p.b_dec is None else [p.b_dec])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x, values, W = leaves[:3]
    b = leaves[3] if p.b_dec is not None else None
    acts = SparseActs(values, p.indices)
    if dense:
        dense_acts = acts.to_dense(p.n).detach().requires_grad_()
        leaves[1] = dense_acts
        acts = dense_acts
    out = matryoshka_loss(x, acts, W, b, prefixes, backend=backend)
    out.loss.backward()
    return [out.loss.detach(), out.per_prefix] + [t.grad for t in leaves]


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> None:
    names = ["loss", "per_prefix", "dx", "dvalues", "dW_dec", "db_dec"]
    for name, a, b in zip(names, got, want):
        assert a is not None and b is not None, name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(
            a.double().cpu(), b.double().cpu(), rtol=0, atol=RTOL[dtype] * max(scale, 1e-30),
            msg=lambda m, name=name: f"{name}: {m}",
        )


def assert_compiled_step_matches(step, inputs: list[torch.Tensor]) -> None:
    """``torch.compile(step, fullgraph=True)`` gives eager's loss and gradients on ``inputs``."""
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    loss = compiled(*leaves)
    loss.backward()
    want = step(*twins)
    want.backward()
    torch.testing.assert_close(loss, want)
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad, b.grad)
