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
cache: measured on a 2-core AMD EPYC, 1 thread, B=1024, d=768, n=8192, k=32, forward+backward took
61 ms this way against 1560 ms for a vectorised ``(B, k + 1, d)`` cumsum stack (and 15 ms for a
single prefix through ``embedding_bag``, which computes no intermediate residual).

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
                r.addcmul_(coeff[rows, t : t + 1], W_dec.index_select(0, latent[rows, t]).to(dtype), value=-1)
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
                w = W_dec.index_select(0, latent[rows, t]).to(dtype)
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

    Prefix lengths are grouped by the block of ``_DENSE_BLOCK`` latents they fall in.  Between
    such blocks the residual advances with one decode GEMM over the whole gap,
    ``R <- R - A[:, gap] @ W_dec[gap]``, so a handful of groups costs one dense decode.  Inside a
    block with boundaries, with ``a = A[:, blk]``, ``S = R @ W_blk^T`` and ``Gm = W_blk W_blk^T``:

        ||R - sum_{l <= j} a_l d_l||^2 = ||R||^2 - 2 sum_{l <= j} a_l S_l
                                         + sum_{l <= j} a_l (a_l Gm_ll + 2 sum_{i < l} a_i Gm_il)

    gives the loss after every latent of the block from two small GEMMs, however many boundaries
    it holds: every-latent prefixes cost a few decodes, not G.  Latents past the longest prefix are
    never touched.  Autograd differentiates it, saving ``R`` once per boundary block.  (On CPU,
    with B = 256..1024 and n = 4096, blocks of 256 were fastest among 32..256.)
    """
    dtype = compute_dtype(x, b_dec, W_dec, acts)
    W = W_dec.to(dtype)
    A = acts.to(dtype)
    R = x.to(dtype) - (0.0 if b_dec is None else b_dec.to(dtype))
    lengths_list = lengths.tolist()  # prefixes live on the host: no device sync
    out: list[torch.Tensor] = []
    done = 0  # latents already subtracted from R
    g = 0
    while g < len(lengths_list):
        start = lengths_list[g] // _DENSE_BLOCK * _DENSE_BLOCK
        offsets = []  # boundaries in this block, as latents past its start
        while g < len(lengths_list) and lengths_list[g] < start + _DENSE_BLOCK:
            offsets.append(lengths_list[g] - start)
            g += 1
        if start > done:
            R = R - A[:, done:start] @ W[done:start]
            done = start
        before = R.pow(2).sum(-1, keepdim=True)
        width = offsets[-1]
        if width == 0:  # the only boundary sits on the block's start
            out.append(before)
            continue
        a, W_blk = A[:, start : start + width], W[start : start + width]
        gram = W_blk @ W_blk.T
        cross = a @ (2 * torch.triu(gram, diagonal=1) + torch.diag(torch.diagonal(gram)))
        after = before - 2 * (a * (R @ W_blk.T)).cumsum(1) + (a * cross).cumsum(1)
        out.append(torch.cat([before, after], dim=1)[:, offsets])
    return torch.cat(out, dim=1)
