"""The residual scan in plain PyTorch ops: the CPU backend, and a readable twin of the kernels.

Sparse (TopK-style) activations, rows sorted by latent index (see ``scan_layout``):

    r_0 = x - b_dec,   r_t = r_{t-1} - v_t W_dec[p_t],   norms[:, t] = ||r_t||^2     (t = 0..k)

Backward, given ``c_t = dL/dnorms[:, t]``, walks ``t = k..1`` recovering
``r_{t-1} = r_t + v_t W_dec[p_t]`` from the saved final residual and carrying the suffix sum
``G_t = sum_{s >= t} 2 c_s r_s``:

    dx = G_0,  db_dec = -sum_b G_0,  dv_t = -<G_t, W_dec[p_t]>,  dW_dec[p_t] += -v_t G_t.

Detached levels (``sparse_scan_detached_torch``): the same forward, and a backward whose suffix sum
restarts at each level boundary (derivation in ``kernels/sparse_scan.py``).

Like the kernels, the scan steps through the k slots one at a time over a block of rows, so the
extra memory is O(B * d) and nothing depends on the number of prefixes (they only enter through
``c_t``).  Rows may hold different numbers of slots (BatchTopK): a row's slots past its count (its
last active slot) are padding, so the rows are sorted by count and step ``t`` updates only the
block's rows that still have a slot ``t``: the cost follows the mean count, not the widest row.  Blocks of ``_BLOCK_ELEMENTS`` keep a block's residual and suffix sum in the CPU's L2
cache: measured on a 2-core AMD EPYC, 1 thread, B=1024, d=768, n=8192, k=32, forward+backward took
61 ms this way against 1560 ms for a vectorised ``(B, k + 1, d)`` cumsum stack (and 15 ms for a
single prefix through ``embedding_bag``, which computes no intermediate residual).

Dense activations (``dense_prefix_norms_torch``) use latent blocks; see its docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .host_copies import to_device
from .precision import autocast_disabled, compute_dtype
from .scan_layout import slot_counts

__all__ = [
    "sparse_scan_torch", "sparse_scan_detached_torch", "dense_prefix_norms_torch", "dense_prefix_norms_detached_torch",
]

_BLOCK_ELEMENTS = 1 << 15  # rows x d per block: 128 KiB of float32 residual, L2-resident
# The dense scan's latent blocks (``_dense_blocks``): at most ``_DENSE_BLOCK`` latents wide, and a
# length ``_DENSE_GAP`` or more latents past the one before starts a block of its own.  A block
# pays Gram-form products over its whole width, a block of its own one norm and a few small ops.
# Chosen by ``python -m benchmarks.dense_blocks --B 256 1024 --d 256 768`` on the 2-core Intel Xeon
# development CPU (1 thread, fp32, n = 4096, lengths 1..64 latents apart; results in
# benchmarks/results/dense_blocks_cpu-*.md): within 4% of the best of 9 plans (widths 64, 128, 256 x
# gaps 16, 32, none) in 18 of 20 cells, 12% and 10% off in two (lengths 16 apart; the 10% is noise:
# an identical plan under another name).  The previous plan (256 wide, no gap) took 1.02-2.24x as
# long, but for 0.94 and 0.98x in two cells at B = 1024, d = 768 (every latent: 75.8 -> 61.7 ms at
# B = d = 256; lengths 64 apart: 47.3 -> 21.3 ms).
_DENSE_BLOCK = 128
_DENSE_GAP = 32


def _without_autocast(backward):
    """Run a backward in the accumulation dtype even when ``loss.backward()`` is called under autocast."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with autocast_disabled(grads[0].device.type):
            return backward(ctx, *grads)

    return run


def _row_blocks(num_rows: int, d: int) -> list[slice]:
    size = max(1, _BLOCK_ELEMENTS // max(d, 1))
    return [slice(s, min(s + size, num_rows)) for s in range(0, num_rows, size)]


def _live_rows(counts: list[int], rows: slice) -> list[int]:
    """``live[t]``: how many rows of the block ``rows`` have a slot ``t`` (``counts`` sorted descending,
    so they are the block's first ``live[t]`` rows)."""
    block = counts[rows]
    live, j = [], len(block)
    for t in range(block[0] if block else 0):
        while block[j - 1] <= t:
            j -= 1
        live.append(j)
    return live


def _scan_forward(ctx, x, b_dec, W_dec, values, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward scan; saves what either backward needs on ``ctx``.

    Returns ``(norms (B, k + 1), final residual (B, d))``.  Rows are scanned sorted by their slot
    count (one host sync), so that at step ``t`` the rows still live are a prefix of their block.
    """
    dtype = compute_dtype(x, b_dec, W_dec, values)
    active = (indices >= 0) & (indices < W_dec.shape[0])
    counts = slot_counts(active)
    perm = counts.argsort(descending=True, stable=True)
    counts_p = counts.index_select(0, perm)
    ctx.counts = counts_p.tolist()
    latent = torch.where(active, indices, 0).index_select(0, perm)  # inactive slots read row 0 with coefficient 0
    coeff = torch.where(active, values.to(dtype), 0.0).index_select(0, perm)
    num_rows, k = values.shape
    norms_by_slot = x.new_empty(k + 1, num_rows, dtype=dtype)  # by sorted row, written in place a block at a time
    final = x.new_empty(x.shape, dtype=dtype)
    for rows in _row_blocks(num_rows, x.shape[1]):
        r = x.index_select(0, perm[rows]).to(dtype) - (0.0 if b_dec is None else b_dec.to(dtype))
        torch.linalg.vecdot(r, r, out=norms_by_slot[0, rows])
        for t, live in enumerate(_live_rows(ctx.counts, rows)):
            part, r_live = slice(rows.start, rows.start + live), r[:live]
            r_live.addcmul_(coeff[part, t : t + 1], W_dec.index_select(0, latent[part, t]).to(dtype), value=-1)
            torch.linalg.vecdot(r_live, r_live, out=norms_by_slot[t + 1, part])
        final.index_copy_(0, perm[rows], r)
    # A slot past its row's count leaves the residual as it was: it repeats the row's last norm.
    last = torch.minimum(torch.arange(k + 1, device=counts.device), counts_p[:, None])
    norms = torch.empty_like(norms_by_slot.T).index_copy_(0, perm, norms_by_slot.T.gather(1, last))
    ctx.save_for_backward(final, W_dec, coeff, latent, active, perm, counts_p)
    ctx.dtypes = (x.dtype, None if b_dec is None else b_dec.dtype, values.dtype)
    return norms, final


def _needed_grads(ctx) -> tuple[bool, bool]:
    """Whether the backward must compute ``(dW_dec, dacts)``: an input that needs no gradient (a
    frozen decoder, fixed codes) costs no work.  The scans' inputs are ``(x, b_dec, W_dec, acts, ...)``."""
    return ctx.needs_input_grad[2], ctx.needs_input_grad[3]


def _cast_grads(ctx, dx, dW, dvalues, active, w_dtype):
    """``(dx, db_dec, dW_dec, dvalues)`` in the inputs' dtypes (``None`` for a gradient not
    computed); padding slots get no gradient."""
    x_dtype, b_dtype, v_dtype = ctx.dtypes
    if dvalues is not None:
        dvalues = torch.where(active, dvalues, 0.0).to(v_dtype)  # padding slots read row 0 but have no gradient
    db = None if b_dtype is None else (-dx.sum(0)).to(b_dtype)
    return dx.to(x_dtype), db, None if dW is None else dW.to(w_dtype), dvalues


def _unsort_rows(perm: torch.Tensor, sorted_rows: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(sorted_rows).index_copy_(0, perm, sorted_rows)


class _SparseScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_dec, values, indices):
        norms, final = _scan_forward(ctx, x, b_dec, W_dec, values, indices)
        ctx.mark_non_differentiable(final)
        return norms, final

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_norms, _grad_final):
        final, W_dec, coeff, latent, active, perm, counts = ctx.saved_tensors
        dtype = final.dtype
        twice_grad = 2 * grad_norms.to(dtype).index_select(0, perm)
        # Slots past a row's count repeat its final residual: their gradients start the suffix sum.
        tail = (twice_grad * (torch.arange(coeff.shape[1] + 1, device=perm.device) > counts[:, None])).sum(1)
        needs_dW, needs_dvalues = _needed_grads(ctx)
        dx = torch.empty_like(final)
        dvalues_by_slot = coeff.new_zeros(coeff.T.shape) if needs_dvalues else None  # -dvalues by sorted row
        neg_coeff = -coeff
        dW = torch.zeros(W_dec.shape, dtype=dtype, device=W_dec.device) if needs_dW else None
        for rows in _row_blocks(final.shape[0], final.shape[1]):
            r = final.index_select(0, perm[rows])
            suffix = tail[rows, None] * r
            live_rows = _live_rows(ctx.counts, rows)
            for t in range(len(live_rows) - 1, -1, -1):
                live = live_rows[t]
                part, r_live, s_live = slice(rows.start, rows.start + live), r[:live], suffix[:live]
                s_live.addcmul_(twice_grad[part, t + 1 : t + 2], r_live)
                w = W_dec.index_select(0, latent[part, t]).to(dtype)
                if needs_dvalues:
                    torch.linalg.vecdot(s_live, w, out=dvalues_by_slot[t, part])
                if needs_dW:
                    dW.index_add_(0, latent[part, t], s_live * neg_coeff[part, t : t + 1])
                r_live.addcmul_(coeff[part, t : t + 1], w)
            suffix.addcmul_(twice_grad[rows, :1], r)
            dx.index_copy_(0, perm[rows], suffix)
        dvalues = _unsort_rows(perm, -dvalues_by_slot.T) if needs_dvalues else None
        dx, db, dW, dvalues = _cast_grads(ctx, dx, dW, dvalues, active, W_dec.dtype)
        return dx, db, dW, dvalues, None


class _DetachedSparseScanTorch(torch.autograd.Function):
    """``(norms, level_norms, final)``: equal norms, different gradients (see
    ``sparse_scan_detached_torch``).

    Backward, with ``c`` and ``e`` the gradients of the two outputs: the level-local suffix sum
    ``H_t = 2 e_t r_t + [level_t == level_{t+1}] H_{t+1}`` gives ``dv_t = -<H_t, W_dec[p_t]>`` and
    ``dW_dec[p_t] += -v_t H_t``.  ``dx = sum_t 2 (c_t + e_t) r_t`` needs no per-step work: with
    ``r_t = r_k + sum_{j > t} v_j W_dec[p_j]`` and ``gamma = 2 (c + e)`` it is
    ``(sum_t gamma_t) r_k + sum_j v_j (sum_{t < j} gamma_t) W_dec[p_j]``, one ``embedding_bag``.
    Slots past a row's count all see its final residual: ``H`` enters the last live slot as
    ``sum_{t >= count, level_t == level_count} 2 e_{t+1} r_k``.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_dec, values, indices, levels):
        norms, final = _scan_forward(ctx, x, b_dec, W_dec, values, indices)
        ctx.levels = levels
        ctx.mark_non_differentiable(final)
        return norms, norms.clone(), final

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_norms, grad_level_norms, _grad_final):
        final, W_dec, coeff, latent, active, perm, counts = ctx.saved_tensors
        dtype = final.dtype
        num_rows, k = coeff.shape
        levels = ctx.levels.index_select(0, perm)
        twice_level = 2 * grad_level_norms.to(dtype).index_select(0, perm)
        gamma = 2 * grad_norms.to(dtype).index_select(0, perm) + twice_level
        continues = torch.cat([levels[:, :-1] == levels[:, 1:], levels.new_zeros(num_rows, 1, dtype=torch.bool)], 1)
        continues = continues.to(dtype)
        first_past = levels.gather(1, counts.clamp(max=max(k - 1, 0))[:, None]) if k else levels
        past = (torch.arange(k, device=perm.device) >= counts[:, None]) & (levels == first_past)
        level_tail = (twice_level[:, 1:] * past).sum(1)
        needs_dW, needs_dvalues = _needed_grads(ctx)
        dvalues_by_slot = coeff.new_zeros(coeff.T.shape) if needs_dvalues else None  # -dvalues by sorted row
        neg_coeff = -coeff
        dW = torch.zeros(W_dec.shape, dtype=dtype, device=W_dec.device) if needs_dW else None
        final_sorted = final.index_select(0, perm)
        # The level suffix H feeds only dvalues and dW_dec: with neither needed, dx alone remains.
        for rows in _row_blocks(num_rows, final.shape[1]) if needs_dW or needs_dvalues else ():
            r = final_sorted[rows].clone()
            level_suffix = level_tail[rows, None] * r
            live_rows = _live_rows(ctx.counts, rows)
            for t in range(len(live_rows) - 1, -1, -1):
                live = live_rows[t]
                part, r_live, h_live = slice(rows.start, rows.start + live), r[:live], level_suffix[:live]
                h_live.mul_(continues[part, t : t + 1]).addcmul_(twice_level[part, t + 1 : t + 2], r_live)
                w = W_dec.index_select(0, latent[part, t]).to(dtype)
                if needs_dvalues:
                    torch.linalg.vecdot(h_live, w, out=dvalues_by_slot[t, part])
                if needs_dW:
                    dW.index_add_(0, latent[part, t], h_live * neg_coeff[part, t : t + 1])
                r_live.addcmul_(coeff[part, t : t + 1], w)
        before = gamma.cumsum(1)[:, :k]  # sum_{t < j} gamma_t for slot j
        dx = gamma.sum(1, keepdim=True) * final_sorted
        if k > 0:
            dx = dx + F.embedding_bag(latent, W_dec.to(dtype), per_sample_weights=coeff * before, mode="sum")
        dx = _unsort_rows(perm, dx)
        dvalues = _unsort_rows(perm, -dvalues_by_slot.T) if needs_dvalues else None
        dx, db, dW, dvalues = _cast_grads(ctx, dx, dW, dvalues, active, W_dec.dtype)
        return dx, db, dW, dvalues, None, None


def sparse_scan_torch(x, b_dec, W_dec, values, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, final)``: the ``(B, k + 1)`` squared residual norms of the sorted scan
    (differentiable) and the ``(B, d)`` final residual ``r_k`` (not differentiable)."""
    return _SparseScanTorch.apply(x, b_dec, W_dec, values, indices)


def sparse_scan_detached_torch(x, b_dec, W_dec, values, indices, levels):
    """``(norms, level_norms, final)``: both the ``(B, k + 1)`` squared residual norms of the sorted
    scan, and the ``(B, d)`` final residual ``r_k`` (not differentiable).

    ``levels`` (``(B, k)`` int64, non-decreasing along each row) is each slot's level.  ``norms``
    differentiates ``x`` and ``b_dec`` only (every slot stop-gradient); ``level_norms[:, t]``
    also differentiates the slots ``j <= t`` of slot ``t``'s level (``levels[:, j] ==
    levels[:, t]``), the others stop-gradient; ``level_norms[:, 0]`` is like ``norms[:, 0]``.
    """
    return _DetachedSparseScanTorch.apply(x, b_dec, W_dec, values, indices, levels)


def _host_lengths(lengths: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    """Prefix lengths as host ints (a host tensor's ``tolist`` does not sync; the loss passes
    ``Prefixes.host_lengths``, which torch.compile sees as constants)."""
    return tuple(lengths.tolist()) if isinstance(lengths, torch.Tensor) else tuple(int(m) for m in lengths)


def _lengths_on(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The lengths as an int64 tensor on ``device``, to index with: a constant inside torch.compile,
    else copied without blocking the host (``to_device``)."""
    if torch.compiler.is_compiling():
        return torch.tensor(lengths, dtype=torch.int64, device=device)
    return to_device(torch.tensor(lengths, dtype=torch.int64, device="cpu"), device)


def _dense_blocks(lengths: tuple[int, ...]) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """The prefix lengths (ascending) grouped into blocks that start at a length and hold the next
    lengths while each is less than ``_DENSE_GAP`` latents past the one before and less than
    ``_DENSE_BLOCK`` past the start: ``(block start, index of its first length, its lengths as
    latents past the start)``.  A length far from the one before is a block of its own, read
    straight from the residual (no Gram form); only close lengths share one."""
    blocks: list[tuple[int, int, list[int]]] = []
    for g, length in enumerate(lengths):
        if blocks:
            start, _, offsets = blocks[-1]
            if length - start < _DENSE_BLOCK and length - (start + offsets[-1]) < _DENSE_GAP:
                offsets.append(length - start)
                continue
        blocks.append((length, g, [0]))
    return tuple((start, first, tuple(offsets)) for start, first, offsets in blocks)


def _dense_inputs(ctx, x, b_dec, W_dec, acts):
    """The target residual ``x - b_dec`` in the accumulation dtype, and the dtypes the gradients go back in."""
    dtype = compute_dtype(x, b_dec, W_dec, acts)
    ctx.dtypes = (x.dtype, None if b_dec is None else b_dec.dtype, W_dec.dtype, acts.dtype)
    return dtype, x.to(dtype) - (0.0 if b_dec is None else b_dec.to(dtype))


def _dense_grads(ctx, dx, dW, dA):
    """``(dx, db_dec, dW_dec, dacts)`` in the inputs' dtypes (``None`` for a gradient not computed)."""
    x_dtype, b_dtype, w_dtype, a_dtype = ctx.dtypes
    db = None if b_dtype is None else (-dx.sum(0)).to(b_dtype)
    return dx.to(x_dtype), db, None if dW is None else dW.to(w_dtype), None if dA is None else dA.to(a_dtype)


def _dense_grad_buffers(ctx, acts, W_dec, dtype):
    """Zeroed ``(dA, dW_dec)`` accumulators, ``None`` for an input that needs no gradient."""
    needs_dW, needs_dA = _needed_grads(ctx)
    dA = torch.zeros(acts.shape, dtype=dtype, device=acts.device) if needs_dA else None
    dW = torch.zeros(W_dec.shape, dtype=dtype, device=W_dec.device) if needs_dW else None
    return dA, dW


class _DenseScanTorch(torch.autograd.Function):
    """The dense latent-block scan (``dense_prefix_norms_torch``) with a backward that keeps one
    residual, so its memory does not grow with the number of prefixes.

    Backward.  With ``c_g = dL/dnorms[:, g]``, a latent ``i`` sees the suffix sum
    ``S_{i+1} = sum_{g: m_g > i} 2 c_g r_{m_g}``: ``dA[:, i] = -<S_{i+1}, d_i>``,
    ``dW_dec[i] = -sum_b A[b, i] S_{i+1}[b]``, ``dx = S_0``.  The blocks are walked in reverse from
    the saved residual ``R`` at the last block's start, each block's ``R_s`` recovered by adding its
    latents back (``R_s = R_next + A[:, s:next] @ W[s:next]``; float rounding as the sparse scans).
    Latents between blocks see one ``S`` (plain GEMMs).  Inside a block of width ``w`` (latents
    ``a = A[:, s:s+w]``, rows ``W_b``, ``P = R_s W_b^T``, ``Gm = W_b W_b^T``), with ``C_g = 2 c_g``
    for its boundaries ``o_g`` and ``U_i = sum_{g: o_g > i} C_g``, ``r_{m_g} = R_s - sum_{l < o_g} a_l d_l``
    gives, with ``S`` the suffix sum after the block:

        dA_blk = -(S W_b^T + U P - U (a triu(Gm)) - (a U) tril(Gm, -1))
        dW_blk = -(a^T S + (a U)^T R_s) + (tril((a U)^T a) + triu(a^T (a U), 1)) W_b
        S     <- S + (sum_g C_g) R_s - (a U) W_b

    Cost: the forward's GEMMs, and in the backward per latent three decode-sized products (``R``
    recovered, ``dA``, ``dW_dec``) plus, for blocks with boundaries, ``P``, ``(a U)^T R_s`` and
    ``(a U) W_b`` and ``w x w`` terms.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_dec, acts, lengths):
        dtype, R = _dense_inputs(ctx, x, b_dec, W_dec, acts)
        blocks = _dense_blocks(lengths)
        on_device = _lengths_on(lengths, x.device)
        out: list[torch.Tensor] = []
        done = 0  # latents already subtracted from R
        for start, first, offsets in blocks:
            if start > done:
                R = R - acts[:, done:start].to(dtype) @ W_dec[done:start].to(dtype)
                done = start
            before = R.pow(2).sum(-1, keepdim=True)
            width = offsets[-1]
            if width == 0:  # a block of one length, its start
                out.append(before)
                continue
            a, W_blk = acts[:, start : start + width].to(dtype), W_dec[start : start + width].to(dtype)
            gram = W_blk @ W_blk.T
            cross = a @ (2 * torch.triu(gram, diagonal=1) + torch.diag(torch.diagonal(gram)))
            after = before - 2 * (a * (R @ W_blk.T)).cumsum(1) + (a * cross).cumsum(1)
            columns = on_device[first : first + len(offsets)] - start
            out.append(torch.cat([before, after], dim=1).index_select(1, columns))
        ctx.blocks = blocks
        ctx.save_for_backward(R, W_dec, acts, on_device)
        return torch.cat(out, dim=1)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_norms):
        R, W_dec, acts, on_device = ctx.saved_tensors
        dtype = R.dtype
        dA, dW = _dense_grad_buffers(ctx, acts, W_dec, dtype)
        S = torch.zeros_like(R)
        following = None  # the start of the block walked before this one
        for start, first, offsets in reversed(ctx.blocks):
            width = offsets[-1]
            if following is not None:
                R = R + acts[:, start:following].to(dtype) @ W_dec[start:following].to(dtype)
                _grads_seeing_one_sum(dA, dW, acts, W_dec, S, start + width, following)
            C = 2 * grad_norms[:, first : first + len(offsets)].to(dtype)
            if width > 0:
                blk = slice(start, start + width)
                a, W_blk = acts[:, blk].to(dtype), W_dec[blk].to(dtype)
                columns = on_device[first : first + len(offsets)] - start
                marks = C.new_zeros(C.shape[0], width + 1).index_copy_(1, columns, C)
                U = marks.flip(1).cumsum(1).flip(1)[:, 1:]  # U[:, i] = sum of C_g over boundaries past latent i
                aU = a * U
                if dA is not None:
                    gram = W_blk @ W_blk.T
                    dA[:, blk] = -(S @ W_blk.T + U * (R @ W_blk.T) - U * (a @ torch.triu(gram)) - aU @ torch.tril(gram, -1))
                if dW is not None:
                    mixed = torch.tril(aU.T @ a) + torch.triu(a.T @ aU, 1)
                    dW[blk] = mixed @ W_blk - a.T @ S - aU.T @ R
                S = S + C.sum(1, keepdim=True) * R - aU @ W_blk
            else:
                S = S + C.sum(1, keepdim=True) * R
            following = start
        _grads_seeing_one_sum(dA, dW, acts, W_dec, S, 0, following)
        return (*_dense_grads(ctx, S, dW, dA), None)


def _grads_seeing_one_sum(dA, dW, acts, W_dec, S, start: int, stop: int) -> None:
    """Latents ``start..stop`` all see the same ``S`` (the suffix sum, where no prefix boundary lies
    among them; a detached level's own ``H_g``): ``dA = -S W^T``, ``dW_dec = -A^T S`` (each skipped
    where its buffer is ``None``)."""
    if stop > start:  # (written in place: no (B, n) or (n, d) temporary)
        if dA is not None:
            dA[:, start:stop].addmm_(S, W_dec[start:stop].to(S.dtype).T, beta=0, alpha=-1)
        if dW is not None:
            dW[start:stop].addmm_(acts[:, start:stop].to(S.dtype).T, S, beta=0, alpha=-1)


class _DetachedDenseScanTorch(torch.autograd.Function):
    """Detached levels (``dense_prefix_norms_detached_torch``): norm ``g`` differentiates ``x``,
    ``b_dec`` and only its own level's latents.  With ``H_g = 2 c_g r_{m_g}``: ``dA[:, level] =
    -H_g W_level^T``, ``dW_level = -A_level^T H_g``, ``dx = sum_g H_g``; the levels are walked in
    reverse from the final residual, each ``r_{m_{g-1}} = r_{m_g} + A_level W_level`` recovered."""

    @staticmethod
    def forward(ctx, x, b_dec, W_dec, acts, lengths):
        dtype, R = _dense_inputs(ctx, x, b_dec, W_dec, acts)
        out: list[torch.Tensor] = []
        start = 0
        for end in lengths:
            R = R - acts[:, start:end].to(dtype) @ W_dec[start:end].to(dtype)
            out.append(R.pow(2).sum(-1, keepdim=True))
            start = end
        ctx.lengths = lengths
        ctx.save_for_backward(R, W_dec, acts)
        return torch.cat(out, dim=1)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_norms):
        R, W_dec, acts = ctx.saved_tensors
        dtype = R.dtype
        dA, dW = _dense_grad_buffers(ctx, acts, W_dec, dtype)
        dx = torch.zeros_like(R)
        starts = [0] + list(ctx.lengths[:-1])
        for g in range(len(ctx.lengths) - 1, -1, -1):
            level = slice(starts[g], ctx.lengths[g])
            H = 2 * grad_norms[:, g : g + 1].to(dtype) * R
            dx += H
            if level.stop > level.start:
                _grads_seeing_one_sum(dA, dW, acts, W_dec, H, level.start, level.stop)
                R = R + acts[:, level].to(dtype) @ W_dec[level].to(dtype)
        return (*_dense_grads(ctx, dx, dW, dA), None)


def dense_prefix_norms_torch(x, b_dec, W_dec, acts, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``(B, G)`` squared residual norms after each prefix length, for dense ``(B, n)`` activations.

    Prefix lengths are grouped into blocks that start at a length and hold the close lengths after
    it (``_dense_blocks``).  From one block's start to the next the residual
    advances with one decode GEMM, ``R <- R - A[:, gap] @ W_dec[gap]``, so a handful of groups costs
    one dense decode and reads each norm straight from ``R``.  Inside a block that holds further
    lengths, with ``a = A[:, blk]``, ``S = R @ W_blk^T`` and ``Gm = W_blk W_blk^T``:

        ||R - sum_{l <= j} a_l d_l||^2 = ||R||^2 - 2 sum_{l <= j} a_l S_l
                                         + sum_{l <= j} a_l (a_l Gm_ll + 2 sum_{i < l} a_i Gm_il)

    gives the loss after every latent of the block from two small GEMMs, however many boundaries
    it holds: every-latent prefixes cost a few decodes, not G.  Latents past the longest prefix are
    never touched.  The backward (``_DenseScanTorch``) keeps one ``(B, d)`` residual and one suffix
    sum whatever the number of prefixes, recovering each block's residual on the way back.  (Block
    width and gap: measured on CPU, beside ``_DENSE_BLOCK``.)
    """
    return _DenseScanTorch.apply(x, b_dec, W_dec, acts, _host_lengths(lengths))


def dense_prefix_norms_detached_torch(x, b_dec, W_dec, acts, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``(B, G)`` squared residual norms after each prefix length with detached levels: norm ``g``
    differentiates ``x``, ``b_dec`` and only its own level's latents ``m_{g-1} <= i < m_g``
    (``m_0 = 0``); the earlier latents enter through a stop-gradient running decode.

    One GEMM per level, ``A[:, level] @ W_dec[level]``, so the GEMMs add up to one dense decode
    whatever ``G``; every-latent prefixes make them ``G`` matrix-vector products.  The backward
    (``_DetachedDenseScanTorch``) keeps one ``(B, d)`` residual whatever ``G``.
    """
    return _DetachedDenseScanTorch.apply(x, b_dec, W_dec, acts, _host_lengths(lengths))
