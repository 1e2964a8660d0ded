"""The sparse scan kernels as ``torch.library`` custom ops, so the op composes with autograd and
lives inside ``torch.compile``d training steps without graph breaks in the surrounding code."""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .scan_autograd import backward_fake, register_scan_autograd
from .sparse_scan import sparse_scan_backward, sparse_scan_forward

__all__ = ["sparse_scan_triton", "sparse_scan_detached_triton"]


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
    needs_dW: bool,
    needs_dvalues: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sparse_scan_backward(residual, grad_norms, W_dec, values, indices,
                                needs_dW=needs_dW, needs_dvalues=needs_dvalues)


@_sparse_scan_backward.register_fake
def _(residual, grad_norms, W_dec, values, indices, needs_dW, needs_dvalues):
    return backward_fake(residual, W_dec, values, needs_dW, needs_dvalues)


register_scan_autograd(_sparse_scan, _sparse_scan_backward)


@torch.library.custom_op("matryoshka::sparse_scan_detached", mutates_args=())
def _sparse_scan_detached(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    levels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    norms, residual = sparse_scan_forward(x, b_dec, W_dec, values, indices, compute_dtype(x, b_dec, W_dec, values))
    return norms, norms.clone(), residual


@_sparse_scan_detached.register_fake
def _(x, b_dec, W_dec, values, indices, levels):
    acc = compute_dtype(x, b_dec, W_dec, values)
    norms = x.new_empty(x.shape[0], values.shape[1] + 1, dtype=acc)
    return norms, torch.empty_like(norms), x.new_empty(x.shape, dtype=acc)


@torch.library.custom_op("matryoshka::sparse_scan_detached_backward", mutates_args=())
def _sparse_scan_detached_backward(
    residual: torch.Tensor,
    grad_norms: torch.Tensor,
    grad_level_norms: torch.Tensor,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    levels: torch.Tensor,
    needs_dW: bool,
    needs_dvalues: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sparse_scan_backward(residual, grad_norms, W_dec, values, indices, grad_level_norms, levels,
                                needs_dW=needs_dW, needs_dvalues=needs_dvalues)


@_sparse_scan_detached_backward.register_fake
def _(residual, grad_norms, grad_level_norms, W_dec, values, indices, levels, needs_dW, needs_dvalues):
    return backward_fake(residual, W_dec, values, needs_dW, needs_dvalues)


register_scan_autograd(_sparse_scan_detached, _sparse_scan_detached_backward)


def sparse_scan_triton(x, b_dec, W_dec, values, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, final)``: the ``(B, k + 1)`` squared residual norms of the sorted scan and the
    ``(B, d)`` final residual (not differentiable), by the fused kernels."""
    return _sparse_scan(x, b_dec, W_dec, values.contiguous(), indices.contiguous())


def sparse_scan_detached_triton(x, b_dec, W_dec, values, indices, levels):
    """``(norms, level_norms, final)`` of the sorted scan with per-slot ``levels``, by the fused
    kernels (the gradients of each: ``torch_scan.sparse_scan_detached_torch``)."""
    return _sparse_scan_detached(x, b_dec, W_dec, values.contiguous(), indices.contiguous(), levels.contiguous())
