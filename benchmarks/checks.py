"""Every method checked against ``matryoshka.reference`` before anything is timed.

``check_methods`` builds small random problems (padding included), computes the loss, the
per-prefix losses and the gradients of ``x``, the activation values, ``W_dec`` and ``b_dec`` with
each method and with the reference, and returns the worst relative error per method.  The sweep and
the pytest-benchmark suite refuse to time a method that disagrees (or raises).
"""

from __future__ import annotations

import copy

import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss_reference

from .baselines import Method
from .harness import describe_error

# float64 on the CPU agrees to round-off; float32 (CUDA checks) accumulates in float32.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _problem(B, n, d, k, dtype, device, seed, pad_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(d, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    values = torch.rand(B, k, generator=g, dtype=torch.float64) + 0.1
    pad = torch.rand(B, k, generator=g) < pad_fraction
    pad[0] = True  # one row with nothing active
    indices = indices.masked_fill(pad, -1)
    values = values.masked_fill(pad, 7.0)  # garbage in padding slots must be ignored
    to = dict(dtype=dtype, device=device)
    return x.to(**to), values.to(**to), indices.to(device), W.to(**to), b.to(**to)


def _prefix_sets(n: int) -> dict[str, Prefixes]:
    return {
        "single n": Prefixes([n]),
        "groups": Prefixes([n // 8, n // 4, n // 2, n], [1.0, 0.5, 2.0, 1.0]),
        "with empty and partial": Prefixes([0, 3, n // 2 + 1], [0.3, 1.0, 0.7]),
        "every": Prefixes.every(n, include_empty=True),
        "sampled10": Prefixes.sample(n, 10, generator=torch.Generator().manual_seed(1)),
    }


def _run(fn, x, values, indices, W, b, prefixes):
    leaves = [t.detach().clone().requires_grad_() for t in (x, values, W, b)]
    xl, vl, Wl, bl = leaves
    loss, per_prefix = fn(xl, SparseActs(vl, indices), Wl, bl, prefixes)
    loss.backward()
    return [loss.detach(), per_prefix.detach()] + [t.grad for t in leaves]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float64 on the tensors' device (the scale floored at 1e-30): how far
    a result is from its reference, relative to the reference's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_method(method: Method, device="cpu", dtype=torch.float64, seed=0) -> dict:
    """``{"method", "max_rel_err", "tolerance", "ok", "cases"}`` against the reference."""
    n, names = 64, ["loss", "per_prefix", "grad_x", "grad_values", "grad_W_dec", "grad_b_dec"]
    x, values, indices, W, b = _problem(B=12, n=n, d=16, k=6, dtype=dtype, device=device, seed=seed)
    cases = []
    for label, prefixes in _prefix_sets(n).items():
        if not method.uses_prefixes:
            prefixes = Prefixes([n])
        got = _run(lambda *a: method(*a, return_per_prefix=True), x, values, indices, W, b, prefixes)
        want = _run(matryoshka_loss_reference, x, values, indices, W, b, prefixes)
        errors = {name: rel_err(g, w) for name, g, w in zip(names, got, want)}
        cases.append({"prefixes": label, "errors": errors})
        if not method.uses_prefixes:
            break
    worst = max(max(c["errors"].values()) for c in cases)
    tol = TOLERANCE[dtype]
    return {"method": method.name, "dtype": str(dtype), "max_rel_err": worst, "tolerance": tol, "ok": worst <= tol, "cases": cases}


def check_methods(methods: list[Method], device="cpu") -> list[dict]:
    """Check every method (float64 on the CPU; float32 on CUDA, where float64 kernels may not exist).

    A method that raises is reported with ``ok=False`` and its error, like one that disagrees;
    callers time only the methods with ``ok=True``."""
    device = torch.device(device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    results = []
    for m in methods:
        try:
            results.append(check_method(m, device, dtype))
        except Exception as exc:  # e.g. a kernel that does not exist on this device or build
            results.append({"method": m.name, "dtype": str(dtype), "max_rel_err": None, "tolerance": TOLERANCE[dtype],
                            "ok": False, "error": describe_error(exc), "cases": []})
    return results


def check_train_step(variant: str, activation: str, device, fused_backend: str, seed: int = 0,
                     B: int = 16, d: int = 32, n: int = 64, k: int = 4) -> dict:
    """An end-to-end ``variant`` against ``matryoshka_loss_reference`` on one batch and one SAE state.

    A small TopK / BatchTopK SAE (float64 on the CPU, float32 on CUDA) encodes one batch; each side
    runs on its own deep copy of it, so both see the same state and the same activations.  Compared:
    the loss and the gradients of all four parameters (``W_dec``, ``b_dec``, and through the encoder's
    top-k values ``W_enc``, ``b_enc``) after ``loss.backward()`` -- what the optimizer step would use.
    Returns ``{"method", "max_rel_err", "tolerance", "ok", "errors"}``.
    """
    from .sae_step import TopKSAE, make_loss_fn, variant_prefixes

    device = torch.device(device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k, activation, device=device, dtype=dtype)
    with torch.no_grad():  # a trained-looking state: nonzero biases, decoder off the encoder's transpose
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)
    prefixes = variant_prefixes(variant, n)

    def run(loss_of):
        model = copy.deepcopy(sae)
        loss = loss_of(model, x, model.encode(x))
        loss.backward()
        return {"loss": loss.detach(), **{f"grad_{name}": p.grad for name, p in model.named_parameters()}}

    got = run(lambda m, x, acts: make_loss_fn(variant, m, fused_backend)(x, acts))
    want = run(lambda m, x, acts: matryoshka_loss_reference(x, acts, m.W_dec, m.b_dec, prefixes)[0])
    errors = {name: rel_err(got[name], want[name]) for name in want}
    worst, tol = max(errors.values()), TOLERANCE[dtype]
    return {"method": f"{variant} ({activation})", "max_rel_err": worst, "tolerance": tol, "ok": worst <= tol,
            "errors": errors}


def describe_failure(result: dict) -> str:
    if result.get("error"):
        return f"{result['method']} raised {result['error']}"
    return f"{result['method']} disagrees with matryoshka.reference (max rel err {result['max_rel_err']:.2e} > {result['tolerance']:.0e})"
