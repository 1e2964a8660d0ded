"""The residual scan in plain PyTorch ops: the CPU backend, and a readable twin of the kernels.

Sparse (TopK-style) activations, rows sorted by latent index (see ``scan_layout``):

    r_0 = x - b_dec,   r_t = r_{t-1} - v_t W_dec[p_t],   norms[:, t] = ||r_t||^2     (t = 0..k)

Backward, given ``c_t = dL/dnorms[:, t]``, walks ``t = k..1`` recovering
``r_{t-1} = r_t + v_t W_dec[p_t]`` from the saved final residual and carrying the suffix sum
``G_t = sum_{s >= t} 2 c_s r_s``:

    dx = G_0,  db_dec = -sum_b G_0,  dv_t = -<G_t, W_dec[p_t]>,  dW_dec[p_t] += -v_t G_t.

Like the kernels, the scan steps through the k slots one at a time over a block of rows, so the
extra memory is O(B * d) and nothing depends on the number of prefixes (they only enter through
``c_t``).  Blocks of ``_BLOCK_ELEMENTS`` keep a block's residual and suffix sum in the CPU's L2
cache: measured on a 2-core AMD EPYC, 1 thread, B=1024, d=768, k=32, forward+backward took 90 ms
this way against 1560 ms for a vectorised ``(B, k + 1, d)`` cumsum stack (and 16 ms for a single
prefix through ``embedding_bag``, which computes no intermediate residual).

Dense activations (``dense_prefix_norms_torch``) use latent blocks; see its docstring.
"""

from __future__ import annotations

import torch

from .precision import compute_dtype

__all__ = ["sparse_scan_torch", "dense_prefix_norms_torch"]

_BLOCK_ELEMENTS = 1 << 15  # rows x d per block: 128 KiB of float32 residual, L2-resident
_DENSE_BLOCK = 256  # latents per block of the dense scan


def _row_blocks(num_rows: int, d: int) -> list[slice]:
    size = max(1, _BLOCK_ELEMENTS // max(d, 1))
    return [slice(s, min(s + size, num_rows)) for s in range(0, num_rows, size)]


class _SparseScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_dec, values, indices):
        dtype = compute_dtype(x, b_dec, W_dec, values)
        active = (indices >= 0) & (indices < W_dec.shape[0])
        latent = torch.where(active, indices, 0)  # inactive slots read row 0 with coefficient 0
        coeff = torch.where(active, values.to(dtype), 0.0)
        num_rows, k = values.shape
        norms = x.new_empty(num_rows, k + 1, dtype=dtype)
        final = x.new_empty(x.shape, dtype=dtype)
        for rows in _row_blocks(num_rows, x.shape[1]):
            r = x[rows].to(dtype) - (0.0 if b_dec is None else b_dec.to(dtype))
            norms[rows, 0] = torch.linalg.vecdot(r, r)
            for t in range(k):
                r.addcmul_(coeff[rows, t : t + 1], W_dec[latent[rows, t]].to(dtype), value=-1)
                norms[rows, t + 1] = torch.linalg.vecdot(r, r)
            final[rows] = r
        ctx.save_for_backward(final, W_dec, coeff, latent, active)
        ctx.dtypes = (x.dtype, None if b_dec is None else b_dec.dtype, values.dtype)
        return norms

    @staticmethod
    def backward(ctx, grad_norms):
        final, W_dec, coeff, latent, active = ctx.saved_tensors
        x_dtype, b_dtype, v_dtype = ctx.dtypes
        dtype = final.dtype
        twice_grad = 2 * grad_norms.to(dtype)
        dx = torch.empty_like(final)
        dvalues = torch.empty_like(coeff)
        dW = torch.zeros(W_dec.shape, dtype=dtype, device=W_dec.device)
        for rows in _row_blocks(final.shape[0], final.shape[1]):
            r = final[rows].clone()
            suffix = torch.zeros_like(r)
            for t in range(coeff.shape[1] - 1, -1, -1):
                suffix.addcmul_(twice_grad[rows, t + 1 : t + 2], r)
                w = W_dec[latent[rows, t]].to(dtype)
                dvalues[rows, t] = -torch.linalg.vecdot(suffix, w)
                dW.index_add_(0, latent[rows, t], suffix * -coeff[rows, t : t + 1])
                r.addcmul_(coeff[rows, t : t + 1], w)
            suffix.addcmul_(twice_grad[rows, :1], r)
            dx[rows] = suffix
        dvalues = torch.where(active, dvalues, 0.0)  # padding slots read row 0 but have no gradient
        db = None if b_dtype is None else (-dx.sum(0)).to(b_dtype)
        return dx.to(x_dtype), db, dW.to(W_dec.dtype), dvalues.to(v_dtype), None


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
