"""Random test problems and a comparator shared by the loss tests."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
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


def run_loss(p: Problem, prefixes: Prefixes, backend: str, dense: bool = False, validate: bool = True, **options):
    """Loss, per-prefix losses and the gradients of x, values (or dense acts), W_dec, b_dec;
    ``options`` (``detach``, ``order``, ...) go to ``matryoshka_loss``."""
    leaves = [p.x, p.values, p.W_dec] + ([] if p.b_dec is None else [p.b_dec])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x, values, W = leaves[:3]
    b = leaves[3] if p.b_dec is not None else None
    acts = SparseActs(values, p.indices)
    if dense:
        dense_acts = acts.to_dense(p.n).detach().requires_grad_()
        leaves[1] = dense_acts
        acts = dense_acts
    out = matryoshka_loss(x, acts, W, b, prefixes, backend=backend, validate=validate, **options)
    out.loss.backward()
    return [out.loss.detach(), out.per_prefix] + [t.grad for t in leaves]


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> None:
    """``got`` against ``want`` (loss, per-prefix losses, gradients), within ``RTOL[dtype]`` of each
    reference tensor's largest magnitude.  A ``None`` gradient (autograd never reached the input,
    e.g. the activations when the only prefix is empty) stands for zeros."""
    names = ["loss", "per_prefix", "dx", "dvalues", "dW_dec", "db_dec"]
    for name, a, b in zip(names, got, want):
        assert a is not None or b is not None, name
        a, b = (torch.zeros_like(b) if a is None else a), (torch.zeros_like(a) if b is None else b)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(
            a.double().cpu(), b.double().cpu(), rtol=0, atol=RTOL[dtype] * max(scale, 1e-30),
            msg=lambda m, name=name: f"{name}: {m}",
        )


def spy(monkeypatch, module, name: str, calls: list[str], replacement=None) -> None:
    """Replace ``module.name`` by a wrapper that appends ``name`` to ``calls`` and runs
    ``replacement`` (default: the original)."""
    run = getattr(module, name) if replacement is None else replacement

    def wrapper(*args, **kwargs):
        calls.append(name)
        return run(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def record_kernel_launches(monkeypatch, module, names: tuple[str, ...], keys: tuple[str, ...]) -> list:
    """Wrap the ``@triton.jit`` kernels ``module.<name>`` so that every launch ``kernel[grid](...)``
    still runs and appends ``(grid, {key: its keyword argument, None if absent})`` to the list returned."""
    seen = []

    class Recorder:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, {key: kwargs.get(key) for key in keys}))
                return self.real[grid](*args, **kwargs)

            return launch

    for name in names:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    return seen


def assert_compiled_step_matches(step, inputs: list[torch.Tensor], backend: str = "aot_eager", **tolerance) -> None:
    """``torch.compile(step, fullgraph=True)`` gives eager's loss and gradients on ``inputs``.

    ``aot_eager`` (default) traces and partitions without generating code, so it runs anywhere;
    ``inductor`` also compiles the ops around ours (GPU tests), to ``tolerance`` (assert_close's)."""
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    loss = compiled(*leaves)
    loss.backward()
    want = step(*twins)
    want.backward()
    torch.testing.assert_close(loss, want, **tolerance)
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad, b.grad, **tolerance)


# ------------------------------------------------------------------------------- half precision
# Half inputs are checked against a float64 oracle run on the *same* half-rounded inputs, so the
# only differences left are the kernels' own rounding errors, bounded relative to the oracle's
# largest magnitude (``scale``):
#
# * float32 accumulation over ``steps`` updates (the k + 1 slots of a sparse row, the L scanned
#   latents of a dense one): a running sum's rounding errors grow like sqrt(steps); the factor 8
#   covers the squared norm (twice the residual's relative error), the column and prefix sums.
#   Measured: <= 1 eps32 (sparse) and <= 16 eps32 (dense, L = 50) against 24..57 eps32 allowed; a
#   scan that keeps its residual in the half type errs by 100..1000 eps32.
# * Gradients are accumulated in float32 and rounded to the input dtype once, on return:
#   round-to-nearest costs at most eps(dtype) / 2 of each element, so eps / 2 of ``scale``
#   (measured <= 0.38 eps).  Not sqrt(k) eps: that would hide a suffix sum kept in half (0.6..7 eps).
# * The dense kernel also rounds the float32 residual and suffix sum to the half type as GEMM
#   operands (tensor cores): first order, another eps / 2 of the operands' scale (measured <= 0.54
#   eps in total).  Its inner-tile prefix norms take the rounded residual for their within-tile
#   correction, so per-prefix losses get that half-operand term too; the weighted loss stays at
#   the float32 level because the correction is a small part of each norm.
FLOAT32_SUM_FACTOR = 8


def float32_sum_bound(steps: int) -> float:
    """Relative error bound of a float32-accumulated scan of ``steps`` updates."""
    return FLOAT32_SUM_FACTOR * math.sqrt(max(steps, 1)) * torch.finfo(torch.float32).eps


def assert_half_matches(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype, steps: int,
                        gemm_operands: bool = False, w_dec_roundings: int = 1) -> None:
    """``got``: loss, per-prefix losses and gradients from half inputs; ``want``: the same from
    float64 twins of the same half-rounded inputs.  ``gemm_operands``: the dense kernel's extra
    rounding of the residual and suffix sum to ``dtype`` (see above).  ``w_dec_roundings``: how many
    half-rounded terms autograd adds up into ``W_dec``'s gradient (2 with decoder-norm rescaling:
    the scan's and the row norms')."""
    eps, fp32 = torch.finfo(dtype).eps, float32_sum_bound(steps)
    operand = eps / 2 if gemm_operands else 0.0
    bounds = {"loss": fp32, "per_prefix": fp32 + operand}
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32, (got[0].dtype, got[1].dtype)
    for name, a in zip(["dx", "dvalues", "dW_dec", "db_dec"], got[2:]):
        assert a.dtype == dtype, (name, a.dtype)
        bounds[name] = (w_dec_roundings if name == "dW_dec" else 1) * eps / 2 + operand + fp32
    for (name, bound), a, b in zip(bounds.items(), got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(
            a.double().cpu(), b.double().cpu(), rtol=0, atol=bound * max(scale, 1e-30),
            msg=lambda m, name=name, bound=bound: f"{name} ({dtype}, bound {bound:.2e} x scale): {m}",
        )


def half_and_oracle(tensors, dtype: torch.dtype):
    """``tensors`` rounded to ``dtype``, and their exact float64 twins (``None`` stays ``None``)."""
    half = [None if t is None else t.to(dtype) for t in tensors]
    return half, [None if t is None else t.double() for t in half]


def check_half_sparse(p: Problem, prefixes: Prefixes, dtype: torch.dtype) -> None:
    """The Triton sparse scan on ``p`` rounded to ``dtype``, against the float64 oracle."""
    half, oracle = half_and_oracle([p.x, p.values, p.W_dec, p.b_dec], dtype)
    fields = ["x", "values", "W_dec", "b_dec"]
    got = run_loss(replace(p, **dict(zip(fields, half))), prefixes, "triton")
    want = run_loss(replace(p, **dict(zip(fields, oracle))), prefixes, "reference")
    assert_half_matches(got, want, dtype, steps=p.values.shape[1] + 1)


# -------------------------------------------------------------------------------- optional packages
def assert_missing_package_hint(monkeypatch, blocked: tuple[str, ...], integration: str, hint: str) -> None:
    """Importing ``integration`` while the modules ``blocked`` cannot be imported fails with an
    ``ImportError`` matching ``hint``: the install command for the missing package."""
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    monkeypatch.delitem(sys.modules, integration)
    with pytest.raises(ImportError, match=hint):
        importlib.import_module(integration)


def assert_core_imports_without(package: str) -> None:
    """``matryoshka`` and ``matryoshka.integrations`` import in a fresh interpreter without ``package``."""
    code = f"import sys; sys.modules[{package!r}] = None; import matryoshka, matryoshka.integrations"
    subprocess.run([sys.executable, "-c", code], check=True)
