"""The sparse scan kernels as ``torch.library`` custom ops, so the op composes with autograd and
lives inside ``torch.compile``d training steps without graph breaks in the surrounding code."""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .sparse_scan import sparse_scan_backward, sparse_scan_forward

__all__ = ["sparse_scan_triton"]


@torch.library.custom_op("matryoshka::sparse_scan", mutates_args=())
def _sparse_scan(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_scan_forward(x, b_dec, W_dec, values, indices, compute_dtype(x, b_dec, W_dec, values))


@_sparse_scan.register_fake
def _(x, b_dec, W_dec, values, indices):
    acc = compute_dtype(x, b_dec, W_dec, values)
    return x.new_empty(x.shape[0], values.shape[1] + 1, dtype=acc), x.new_empty(x.shape, dtype=acc)


@torch.library.custom_op("matryoshka::sparse_scan_backward", mutates_args=())
def _sparse_scan_backward(
    residual: torch.Tensor,
    grad_norms: torch.Tensor,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sparse_scan_backward(residual, grad_norms, W_dec, values, indices)


@_sparse_scan_backward.register_fake
def _(residual, grad_norms, W_dec, values, indices):
    return (
        torch.empty_like(residual),
        residual.new_empty(values.shape),
        residual.new_empty(W_dec.shape),
    )


def _setup_context(ctx, inputs, output):
    x, b_dec, W_dec, values, indices = inputs
    ctx.save_for_backward(output[1], W_dec, values, indices)
    ctx.dtypes = (x.dtype, None if b_dec is None else b_dec.dtype, W_dec.dtype, values.dtype)


def _backward(ctx, grad_norms, grad_residual):
    # The final residual is an internal by-product saved for the backward; no caller differentiates it.
    residual, W_dec, values, indices = ctx.saved_tensors
    x_dtype, b_dtype, w_dtype, v_dtype = ctx.dtypes
    dx, dvalues, dW = _sparse_scan_backward(residual, grad_norms, W_dec, values, indices)
    db = None if b_dtype is None else (-dx.sum(0)).to(b_dtype)
    return dx.to(x_dtype), db, dW.to(w_dtype), dvalues.to(v_dtype), None


_sparse_scan.register_autograd(_backward, setup_context=_setup_context)


def sparse_scan_triton(x, b_dec, W_dec, values, indices) -> torch.Tensor:
    """``(B, k + 1)`` squared residual norms of the index-sorted scan, by the fused kernels."""
    norms, _ = _sparse_scan(x, b_dec, W_dec, values.contiguous(), indices.contiguous())
    return norms
