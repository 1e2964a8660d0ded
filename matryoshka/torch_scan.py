"""The residual scan in plain PyTorch ops: the CPU backend, and a readable twin of the kernels.

Sparse (TopK-style) activations, rows sorted by latent index (see ``scan_layout``):

    r_0 = x - b_dec,   r_t = r_{t-1} - v_t W_dec[p_t],   norms[:, t] = ||r_t||^2     (t = 0..k)

Backward, given ``c_t = dL/dnorms[:, t]``: ``G_j = sum_{t >= j} 2 c_t r_t`` (a reverse cumsum), and

    dx = G_0,  db_dec = -sum_b G_0,  dv_j = -<G_j, W_dec[p_j]>,  dW_dec[p_j] += -v_j G_j.

Rows are processed in chunks so that the ``(rows, k + 1, d)`` residual stack stays bounded; the
backward recomputes the stack from ``x`` instead of saving it.  Nothing depends on the number of
prefixes: they only enter through ``c_t``.

Dense activations (``dense_prefix_norms_torch``) use latent blocks; see its docstring.
"""

from __future__ import annotations

import torch

from .precision import compute_dtype

__all__ = ["sparse_scan_torch", "dense_prefix_norms_torch"]

_CHUNK_ELEMENTS = 1 << 24  # residual-stack elements per row chunk (64 MiB in float32)
_DENSE_BLOCK = 256  # latents per block of the dense scan


def _residual_stack(x, b_dec, W_dec, values, indices, dtype):
    """``(R, rows, active)``: ``R[:, t] = r_t`` for ``t = 0..k``, the gathered decoder rows, the mask."""
    n = W_dec.shape[0]
    active = (indices >= 0) & (indices < n)
    rows = W_dec[torch.where(active, indices, 0)].to(dtype)  # (B, k, d)
    coeff = torch.where(active, values.to(dtype), 0.0)
    r0 = x.to(dtype) - (0.0 if b_dec is None else b_dec.to(dtype))
    steps = torch.cat([r0.unsqueeze(1), -coeff.unsqueeze(-1) * rows], dim=1)
    return steps.cumsum(dim=1), rows, active


def _row_chunks(num_rows: int, k: int, d: int) -> list[slice]:
    size = max(1, _CHUNK_ELEMENTS // max(1, (k + 1) * d))
    return [slice(s, min(s + size, num_rows)) for s in range(0, num_rows, size)]


class _SparseScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_dec, values, indices):
        dtype = compute_dtype(x, b_dec, W_dec, values)
        num_rows, k = values.shape
        norms = x.new_empty(num_rows, k + 1, dtype=dtype)
        for rows in _row_chunks(num_rows, k, x.shape[1]):
            R, _, _ = _residual_stack(x[rows], b_dec, W_dec, values[rows], indices[rows], dtype)
            norms[rows] = R.pow(2).sum(-1)
        ctx.save_for_backward(x, b_dec, W_dec, values, indices)
        ctx.has_bias = b_dec is not None
        return norms

    @staticmethod
    def backward(ctx, grad_norms):
        x, b_dec, W_dec, values, indices = ctx.saved_tensors
        b_dec = b_dec if ctx.has_bias else None
        dtype = grad_norms.dtype
        dx = torch.empty_like(x, dtype=dtype)
        dvalues = torch.empty_like(values, dtype=dtype)
        dW = torch.zeros_like(W_dec, dtype=dtype)
        num_rows, k = values.shape
        for rows in _row_chunks(num_rows, k, x.shape[1]):
            R, dec_rows, active = _residual_stack(x[rows], b_dec, W_dec, values[rows], indices[rows], dtype)
            G = (2 * grad_norms[rows].unsqueeze(-1) * R).flip(1).cumsum(1).flip(1)
            dx[rows] = G[:, 0]
            dvalues[rows] = torch.where(active, -(G[:, 1:] * dec_rows).sum(-1), 0.0)
            coeff = torch.where(active, values[rows].to(dtype), 0.0)
            dW.index_add_(
                0,
                torch.where(active, indices[rows], 0).reshape(-1),
                (-coeff.unsqueeze(-1) * G[:, 1:]).reshape(-1, x.shape[1]),
            )
        db = None if b_dec is None else -dx.sum(0).to(b_dec.dtype)
        return dx.to(x.dtype), db, dW.to(W_dec.dtype), dvalues.to(values.dtype), None


def sparse_scan_torch(x, b_dec, W_dec, values, indices) -> torch.Tensor:
    """``(B, k + 1)`` squared residual norms of the index-sorted scan (differentiable)."""
    return _SparseScanTorch.apply(x, b_dec, W_dec, values, indices)


def dense_prefix_norms_torch(x, b_dec, W_dec, acts, lengths: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` squared residual norms after each prefix length, for dense ``(B, n)`` activations.

    Latents are taken in blocks of ``_DENSE_BLOCK``.  A block with no prefix boundary only updates
    the residual, ``R <- R - A[:, blk] @ W_dec[blk]`` (one decode GEMM).  A block with boundaries
    also needs the loss after some of its latents; with ``a = A[:, blk]``, ``S = R @ W_blk^T`` and the
    block's Gram matrix ``Gm = W_blk W_blk^T``:

        ||R - sum_{l <= j} a_l d_l||^2 = ||R||^2 - 2 sum_{l <= j} a_l S_l
                                         + sum_{l <= j} a_l (a_l Gm_ll + 2 sum_{i < l} a_i Gm_il)

    i.e. two GEMMs per block however many boundaries it holds, so every-latent prefixes cost about
    twice one prefix rather than G times.  On CPU this beats both a Python loop over prefixes and a
    running sum with a reduction per group for large G, and matches the running sum for small G
    (where boundary blocks are few).  Autograd differentiates it; it saves ``R`` per boundary block.
    """
    dtype = compute_dtype(x, b_dec, W_dec, acts)
    n = W_dec.shape[0]
    W = W_dec.to(dtype)
    A = acts.to(dtype)
    R = x.to(dtype) - (0.0 if b_dec is None else b_dec.to(dtype))
    lengths_list = lengths.tolist()  # prefixes live on the host: no device sync
    out: list[torch.Tensor] = []
    g = 0
    for start in range(0, n, _DENSE_BLOCK):
        stop = min(start + _DENSE_BLOCK, n)
        inside = []
        while g < len(lengths_list) and lengths_list[g] < stop:
            inside.append(lengths_list[g] - start)  # offset 0 means "before this block's latents"
            g += 1
        a, W_blk = A[:, start:stop], W[start:stop]
        if inside:
            S = R @ W_blk.T
            gram = W_blk @ W_blk.T
            cross = a @ (2 * torch.triu(gram, diagonal=1) + torch.diag(torch.diagonal(gram)))
            after = (R.pow(2).sum(-1, keepdim=True) - 2 * (a * S).cumsum(1) + (a * cross).cumsum(1))
            before_and_after = torch.cat([R.pow(2).sum(-1, keepdim=True), after], dim=1)
            out.append(before_and_after[:, inside])
        R = R - a @ W_blk
    if g < len(lengths_list):  # the only length left is n itself
        out.append(R.pow(2).sum(-1, keepdim=True))
    return torch.cat(out, dim=1)
