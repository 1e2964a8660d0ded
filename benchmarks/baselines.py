"""Every known way of computing the Matryoshka reconstruction loss, written from the published
descriptions (no code copied), plus the package's fused op, behind one calling convention.

    L = sum_g w_g * mean_b || x_b - b_dec - sum_{i < m_g} a_bi W_dec[i] ||^2

All functions take the same inputs as the fused op -- ``x (B, d)``, TopK-style ``SparseActs``
(``values (B, k)``, ``indices (B, k)``, ``-1`` = padding), ``W_dec (n, d)``, ``b_dec (d,)`` or
``None``, and ``Prefixes`` -- and return the scalar loss (or ``(loss, per_prefix)`` with
``return_per_prefix=True``).  The dense algorithms first scatter the TopK output into a dense
``(B, n)`` matrix, as TopK SAEs that decode densely do; that scatter is part of what they pay.

Baselines (issue 5):

1. ``prefix_from_scratch``: each prefix decoded from scratch, ``acts[:, :m] @ W_dec[:m]`` (an older
   SAELens release).  O(B d sum_g m_g) time, one ``B x d`` residual saved per prefix.
2. ``running_sum``: groups decoded in order, ``recon += acts[:, g] @ W_dec[g]``, one loss per group
   (Bussmann et al.'s code, dictionary_learning's Matryoshka trainer, current SAELens).
   O(B n d) + G reductions, one ``B x d`` residual saved per group.
3. ``stacked_cumsum``: every group's output stacked into a ``(G, B, d)`` tensor and cumulatively
   summed (the original Matryoshka code, which samples ~10 prefixes per step).  G x B x d memory.
4. ``vanilla_floor``: one prefix of length n, dense decode + squared error: what a plain SAE pays.
5. ``sparse_floor``: one prefix of length n by a sparse decode (``embedding_bag``) + squared error:
   the least a TopK SAE can pay for its reconstruction loss.

Half-precision inputs are decoded in their own dtype and the squared error is reduced in float32,
which is what ``torch.autocast`` does to these codebases (``pow``/``mse_loss`` run in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matryoshka import Prefixes, SparseActs, matryoshka_loss

__all__ = [
    "densify",
    "prefix_from_scratch_loss",
    "running_sum_loss",
    "stacked_cumsum_loss",
    "vanilla_floor_loss",
    "sparse_floor_loss",
    "fused_loss",
    "Method",
    "METHODS",
    "methods_for",
]


# ------------------------------------------------------------------------------------------ helpers
def densify(acts: SparseActs, n: int) -> torch.Tensor:
    """The ``(B, n)`` dense activation matrix of a TopK output (differentiable in ``values``).

    ``scatter_add`` rather than ``scatter`` so that padding slots (sent to column 0 with value 0)
    can never overwrite a real activation of latent 0.
    """
    active = acts.indices >= 0
    index = torch.where(active, acts.indices, 0)
    values = torch.where(active, acts.values, torch.zeros_like(acts.values))
    return acts.values.new_zeros(acts.values.shape[0], n).scatter_add(1, index, values)


def _squared_error(residual: torch.Tensor) -> torch.Tensor:
    """``sum ||residual||^2`` reduced in float32 (float64 stays float64)."""
    if residual.dtype in (torch.float16, torch.bfloat16):
        residual = residual.float()
    return residual.pow(2).sum()


def _finish(losses: list[torch.Tensor], weights: list[float], return_per_prefix: bool):
    loss = sum(w * l for w, l in zip(weights, losses))
    if return_per_prefix:
        return loss, torch.stack([l.detach() for l in losses])
    return loss


def _groups(prefixes: Prefixes) -> list[tuple[int, int]]:
    """``[(m_{g-1}, m_g)]`` with ``m_0 = 0``: the latents each group adds to the previous prefix."""
    lengths = prefixes.lengths.tolist()
    return list(zip([0] + lengths[:-1], lengths))


# ------------------------------------------------------------------------------------- 1. scratch
def prefix_from_scratch_loss(x, acts, W_dec, b_dec, prefixes, return_per_prefix=False):
    """Every prefix decoded on its own: ``x_hat_m = acts[:, :m] @ W_dec[:m] + b_dec``."""
    rows, n = x.shape[0], W_dec.shape[0]
    dense = densify(acts, n)
    target = x if b_dec is None else x - b_dec
    losses = []
    for m in prefixes.lengths.tolist():
        recon = dense[:, :m] @ W_dec[:m]
        losses.append(_squared_error(target - recon) / rows)
    return _finish(losses, prefixes.weights.tolist(), return_per_prefix)


# ---------------------------------------------------------------------------------- 2. running sum
def running_sum_loss(x, acts, W_dec, b_dec, prefixes, return_per_prefix=False):
    """Groups decoded in order into a running reconstruction, one loss after each group."""
    rows, n = x.shape[0], W_dec.shape[0]
    dense = densify(acts, n)
    recon = x.new_zeros(x.shape) if b_dec is None else b_dec.expand_as(x)
    losses = []
    for start, stop in _groups(prefixes):
        if stop > start:
            recon = recon + dense[:, start:stop] @ W_dec[start:stop]
        losses.append(_squared_error(x - recon) / rows)
    return _finish(losses, prefixes.weights.tolist(), return_per_prefix)


# ------------------------------------------------------------------------------- 3. stacked cumsum
def stacked_cumsum_loss(x, acts, W_dec, b_dec, prefixes, return_per_prefix=False):
    """Each group's decoded output stacked to ``(G, B, d)``, cumsummed over groups, one loss each."""
    rows, n = x.shape[0], W_dec.shape[0]
    dense = densify(acts, n)
    parts = [dense[:, start:stop] @ W_dec[start:stop] for start, stop in _groups(prefixes)]
    recon = torch.stack(parts).cumsum(0)
    if b_dec is not None:
        recon = recon + b_dec
    residual = x.unsqueeze(0) - recon
    if residual.dtype in (torch.float16, torch.bfloat16):
        residual = residual.float()
    per_prefix = residual.pow(2).sum(dim=(1, 2)) / rows
    weights = prefixes.weights.to(device=x.device, dtype=per_prefix.dtype)
    loss = (weights * per_prefix).sum()
    return (loss, per_prefix.detach()) if return_per_prefix else loss


# ------------------------------------------------------------------------------------ 4/5. floors
def dense_decode_loss(x, dense_acts, W_dec, b_dec):
    """One dense decode GEMM and the squared error, ``||x - (A W_dec + b_dec)||^2 / B``: what a
    plain SAE with dense ``(B, n)`` activations pays (cuBLAS on CUDA)."""
    recon = dense_acts @ W_dec
    if b_dec is not None:
        recon = recon + b_dec
    return _squared_error(x - recon) / x.shape[0]


def vanilla_floor_loss(x, acts, W_dec, b_dec, prefixes=None, return_per_prefix=False):
    """One prefix of length n (``prefixes`` ignored): dense decode + squared error."""
    loss = dense_decode_loss(x, densify(acts, W_dec.shape[0]), W_dec, b_dec)
    return (loss, loss.detach().reshape(1)) if return_per_prefix else loss


def sparse_floor_loss(x, acts, W_dec, b_dec, prefixes=None, return_per_prefix=False):
    """One prefix of length n (``prefixes`` ignored): sparse decode by ``embedding_bag`` + error."""
    rows = x.shape[0]
    active = acts.indices >= 0
    index = torch.where(active, acts.indices, 0)
    weights = torch.where(active, acts.values, torch.zeros_like(acts.values)).to(W_dec.dtype)
    recon = F.embedding_bag(index, W_dec, per_sample_weights=weights, mode="sum")
    if b_dec is not None:
        recon = recon + b_dec
    loss = _squared_error(x - recon) / rows
    return (loss, loss.detach().reshape(1)) if return_per_prefix else loss


# ------------------------------------------------------------------------------------- fused op
def fused_loss(x, acts, W_dec, b_dec, prefixes, backend="torch", return_per_prefix=False):
    """The package's op (``validate=False``: the index check's host sync is not what is timed)."""
    out = matryoshka_loss(x, acts, W_dec, b_dec, prefixes, backend=backend, validate=False)
    return (out.loss, out.per_prefix) if return_per_prefix else out.loss


def fused_dense_loss(x, acts, W_dec, b_dec, prefixes, backend="torch", return_per_prefix=False):
    """The package's op on the densified activations (its dense path)."""
    dense = densify(acts, W_dec.shape[0])
    out = matryoshka_loss(x, dense, W_dec, b_dec, prefixes, backend=backend, validate=False)
    return (out.loss, out.per_prefix) if return_per_prefix else out.loss


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """A way to compute the loss, with a rough cost model used to skip hopeless configurations.

    ``cost(B, n, d, k, lengths, elem)`` returns ``(flops, extra_bytes, ops)``: forward+backward
    floating-point operations, bytes held for the backward, and the number of framework ops
    launched (each costs a fixed overhead, which dominates the per-group loops at large G); a
    fourth value, where a method has one, is the bytes it streams besides (re-reads, atomics).
    ``depends_on_k``: False for the dense op, whose time is that of its ``(B, n)`` activations
    whatever ``k`` the TopK outputs were densified from (the sweep times it at one ``k``).
    """

    name: str
    label: str
    fn: Callable
    uses_prefixes: bool
    cost: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    depends_on_k: bool = True

    def __call__(self, x, acts, W_dec, b_dec, prefixes, return_per_prefix=False):
        return self.fn(x, acts, W_dec, b_dec, prefixes, return_per_prefix=return_per_prefix)


def _dense_bytes(B, n, elem):
    return 2 * B * n * elem  # the dense activations and their gradient


def _cost_scratch(B, n, d, k, lengths, elem):
    total = sum(lengths)
    return 6 * B * d * total, len(lengths) * B * d * max(elem, 4) + _dense_bytes(B, n, elem), 8 * len(lengths)


def _cost_running(B, n, d, k, lengths, elem):
    G = len(lengths)
    return 6 * B * n * d + 8 * G * B * d, G * B * d * (elem + max(elem, 4)) + _dense_bytes(B, n, elem), 10 * G


def _cost_stacked(B, n, d, k, lengths, elem):
    G = len(lengths)
    return 6 * B * n * d + 8 * G * B * d, 5 * G * B * d * max(elem, 4) + _dense_bytes(B, n, elem), 6 * G + 20


def _cost_vanilla(B, n, d, k, lengths, elem):
    return 6 * B * n * d, _dense_bytes(B, n, elem) + 3 * B * d * 4, 20


def _cost_sparse(B, n, d, k, lengths, elem):
    return 6 * B * k * d, 4 * B * d * 4 + n * d * 4, 20


def _cost_fused(B, n, d, k, lengths, elem):
    return 10 * B * (k + 1) * d, 4 * B * d * 4 + n * d * 4, 60


def _cost_fused_dense(B, n, d, k, lengths, elem):
    blocks = -(-n // 256)
    boundary_blocks = min(blocks, len(lengths))
    return 6 * B * n * d + 6 * boundary_blocks * B * 256 * d, boundary_blocks * B * (d + 256) * 4 + _dense_bytes(B, n, elem), 20 * blocks


def _cost_fused_dense_triton(B, n, d, k, lengths, elem):
    """The dense kernels' cost model (``kernels/dense_scan.py``'s docstring): every program streams its
    rows' activations and its chunk's ``W_dec`` rows, forward and backward, and the backward adds its
    shares into ``dW_dec`` (and ``dacts`` when several chunks share it) with float32 atomics, each a
    read and a write.  No L2 reuse is counted, so this errs slow."""
    from matryoshka.kernels.dense_scan import default_launch

    operand = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[elem]  # float16's tiles are bfloat16's
    tiles = default_launch(operand, B, d)
    chunks, row_blocks = -(-d // tiles.cols), -(-B // tiles.rows)
    inner = min(1.0, len(lengths) * tiles.latents / max(n, 1))  # share of tiles with boundaries inside
    flops = 2 * B * n * d * (4 + 8 * inner)
    atomics = n * d * row_blocks + (B * n * chunks if chunks > 1 and chunks * n > d else 0)
    streamed = 2 * (B * n * chunks + n * d * row_blocks) * elem + 8 * atomics
    return flops, 2 * B * d * 4 + _dense_bytes(B, n, elem), 4, streamed


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fused_triton", "fused op (Triton)", lambda *a, **kw: fused_loss(*a, backend="triton", **kw), True, _cost_fused, ("cuda",)),
        Method("fused_torch", "fused op (PyTorch scan)", lambda *a, **kw: fused_loss(*a, backend="torch", **kw), True, _cost_fused),
        Method("fused_dense_triton", "fused op, dense acts (Triton)", lambda *a, **kw: fused_dense_loss(*a, backend="triton", **kw), True, _cost_fused_dense_triton, ("cuda",), False),
        Method("fused_dense_torch", "fused op, dense acts (PyTorch)", lambda *a, **kw: fused_dense_loss(*a, backend="torch", **kw), True, _cost_fused_dense, depends_on_k=False),
        Method("running_sum", "running sum", running_sum_loss, True, _cost_running),
        Method("stacked_cumsum", "stacked cumsum", stacked_cumsum_loss, True, _cost_stacked),
        Method("prefix_from_scratch", "prefix from scratch", prefix_from_scratch_loss, True, _cost_scratch),
        Method("vanilla_floor", "vanilla floor (dense, 1 prefix)", vanilla_floor_loss, False, _cost_vanilla),
        Method("sparse_floor", "sparse floor (embedding_bag, 1 prefix)", sparse_floor_loss, False, _cost_sparse),
    ]
}


def methods_for(device_type: str, names: list[str] | None = None) -> list[Method]:
    """The registered methods that run on ``device_type`` (optionally only ``names``, in order)."""
    chosen = [METHODS[name] for name in names] if names else list(METHODS.values())
    return [m for m in chosen if device_type in m.devices]
