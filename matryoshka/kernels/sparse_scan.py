"""Fused Triton kernels for the sparse residual scan, and their host functions.

One program owns one row ``b`` and one chunk of ``BLOCK_D`` columns of ``d`` (or ``ROWS`` rows side
by side: ``SparseLaunch.rows``); it walks the row's active latents in the order they arrive (sorted
by index, or by value for rank-order prefixes; padding last), keeping its residual chunk in
registers.  It stops at the row's count ``c_b`` (one past its last active slot, read from a tensor:
no host sync), so a ragged batch (BatchTopK) costs its mean count, not its widest row (with several
rows per program, the mean over programs of their longest row); the slots past ``c_b`` leave the
residual unchanged.  Nothing here knows about prefixes: they enter only through ``grad_norms`` (and,
detached, through each slot's level).

Forward (``sparse_scan_forward``), for ``t = 1..c_b`` (and ``norms[b, t] = norms[b, c_b]`` past it):

    r_0 = x_b - b_dec,   r_t = r_{t-1} - v_t W_dec[p_t],   norms[b, t] = sum over chunks of ||r_t||^2

The final residual ``r_k`` is saved: it is all the backward needs.

Backward (``sparse_scan_backward``), given ``c_t = dL/dnorms[b, t]``, walks ``t = c_b..1`` recovering
``r_{t-1} = r_t + v_t W_dec[p_t]`` and carrying the suffix sum ``G_t = sum_{s >= t} 2 c_s r_s``, which
starts as ``(sum_{s > c_b} 2 c_s) r_k`` (a scalar loop over the padded slots):

    dv_t = -<G_t, W_dec[p_t]>,   dW_dec[p_t] += -v_t G_t (atomic),   dx_b = G_0,   db_dec = -sum_b G_0

Detached levels (``DETACH``).  Each slot has a level (``levels[b, t]``, non-decreasing in ``t``:
the prefix that adds it).  The op then has two outputs with the same values, ``norms`` and
``level_norms``, and a loss ``sum_t (W_t - U_t) norms_t + U_t level_norms_t`` (``U_t``: the weight
of the prefix whose own residual is ``r_t``; see ``scan_layout.fold_level_weights``).  By
definition prefix ``h``'s reconstruction stops the gradient of every slot of an earlier level, so

* ``norms_t`` = ``||r_t||^2`` with every slot stop-gradient: only ``x`` and ``b_dec`` see ``c_t``;
* ``level_norms_t`` = ``||r_t||^2`` with only the slots ``j <= t`` of slot ``t``'s level live.

With ``c``, ``e`` their gradients, ``dr_t = 2 (c_t + e_t) r_t`` reaches ``x`` through every residual,
but slot ``j`` sees ``2 e_s r_s`` only from ``s >= j`` *in its own level*.  So the suffix sum
restarts at each level boundary, walking ``t = k..1``:

    H_t = 2 e_t r_t + [level_t == level_{t+1}] H_{t+1}        (H_{k+1} = 0)
    dv_t = -<H_t, W_dec[p_t]>,   dW_dec[p_t] += -v_t H_t,   dx_b = sum_t 2 (c_t + e_t) r_t

One more ``BLOCK_D`` register vector and one level load per step; the forward is unchanged.  The
padded slots past ``c_b`` start ``H`` at ``(sum_{s >= c_b, level_s = level_{c_b}} 2 e_{s+1}) r_k``.  Under
``matryoshka_loss`` only the last slot of each level has ``U_t != 0``, so ``H_t`` is ``2 w_h`` times
the level's final residual for every slot of level ``h``: a latent learns only from the prefix that
adds it.

Both passes are O(k * d) per row with O(d) extra memory per row, whatever the number of prefixes.
Accumulation is float32 (float64 for float64 inputs).  Every load of a decoder row is masked by
``0 <= p < n``, so no index, checked or not, reaches outside ``W_dec``.

``dW_dec`` two ways (``SparseLaunch.dw_mode``):

* ``"atomic"`` (default): each slot adds ``-v_t H_t`` into ``dW_dec[p_t]`` with a relaxed atomic;
* ``"sorted"``: each slot writes ``-v_t H_t`` to its own row of a ``(B k, d)`` buffer, and
  ``_dw_segment_sum_kernel`` sums those rows per latent, walking the slots sorted by latent (a
  stable sort: each latent's rows in slot order), so every ``dW_dec`` row is written once, with no
  atomics, the same bits every run.  It costs the buffer (``B k d`` accumulation-dtype values, 4.8 GB
  at B = 4096, k = 128, d = 2304 in float32) and its write and read, where ``embedding_bag``'s
  sorted backward reuses one gradient row per bag: here ``H_t`` differs per slot and exists only
  inside the reverse walk.

Launch configuration (``SparseLaunch``): the chunk width ``BLOCK_D``, the rows per program
(``ROWS``), the warps per program, the software-pipelining depth of the slot loop (``LOOP_STAGES``: Triton may then load slot ``t + s``'s
decoder row while slot ``t`` is reduced), the memory order of the ``dW_dec`` atomics and the
``dW_dec`` mode.  None of them changes the math, only the order of float additions; ``default_launch``
is what the op uses, and ``benchmarks/tune.py`` times the alternatives on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..scan_layout import slot_counts
from .guard import device_guard

__all__ = ["SparseLaunch", "default_launch", "sparse_scan_forward", "sparse_scan_backward"]


@triton.jit
def _program_tile(num_rows, d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's ``ROWS`` rows (int64: row offsets can pass 2^31) and its chunk of ``BLOCK_D``
    columns, with their masks: ``(rows, row_in, chunk, cols, in_d, tile_in)``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < num_rows
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    return rows, row_in, chunk, cols, in_d, row_in[:, None] & in_d[None, :]


@triton.jit
def _load_decoder_rows(w_ptr, latents, stride_w, cols, in_d, n, ACC: tl.constexpr):
    """Columns ``cols`` of ``W_dec[latents]``, one decoder row per program row, and the mask
    ``in_d & 0 <= latent < n`` (both ``(ROWS, BLOCK_D)``).

    The index is broadcast to the tile before the comparison: the interpreter turns masks of mixed
    shapes into int32, which its loads reject.  An inactive slot loads zeros and reads no memory.
    """
    latent_cols = latents[:, None] + tl.zeros_like(cols).to(tl.int64)[None, :]
    active = in_d[None, :] & (latent_cols >= 0) & (latent_cols < n)
    w = tl.load(w_ptr + latent_cols * stride_w + cols[None, :], mask=active, other=0.0).to(ACC)
    return w, active


@triton.jit
def _sparse_scan_forward_kernel(
    x_ptr, bias_ptr, w_ptr, values_ptr, indices_ptr, counts_ptr, norms_ptr, residual_ptr,
    num_rows, k, d, n,
    stride_x, stride_w, stride_values, stride_indices,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    """norms[chunk, b, t] = ||r_t[chunk]||^2 for t = 0..k; residual[b, chunk] = r_k[chunk], for the
    program's ``ROWS`` rows ``b``.  The rows walk their slots side by side up to the longest count
    among them; a row past its own count is in its padding, where its residual stays ``r_{c_b}``."""
    rows, row_in, chunk, cols, in_d, tile_in = _program_tile(num_rows, d, ROWS, BLOCK_D)
    r = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=tile_in, other=0.0).to(ACC)
    if HAS_BIAS:
        r -= tl.load(bias_ptr + cols, mask=in_d, other=0.0).to(ACC)[None, :]
    norms_rows = norms_ptr + (chunk.to(tl.int64) * num_rows + rows) * (k + 1)
    norm = tl.sum(r * r, axis=1)
    tl.store(norms_rows, norm, mask=row_in)
    counts = tl.load(counts_ptr + rows, mask=row_in, other=0)
    longest = tl.max(counts, axis=0)
    for t in tl.range(0, longest, num_stages=LOOP_STAGES):
        live = t < counts
        latents = tl.load(indices_ptr + rows * stride_indices + t, mask=live, other=-1)
        values = tl.load(values_ptr + rows * stride_values + t, mask=live, other=0.0).to(ACC)
        w, active = _load_decoder_rows(w_ptr, latents, stride_w, cols, in_d, n, ACC)
        r -= tl.where(active, values[:, None], 0.0) * w
        norm = tl.sum(r * r, axis=1)
        tl.store(norms_rows + t + 1, norm, mask=row_in)
    for t in range(longest, k):  # padding of every row: the residuals stay r_{c_b}
        tl.store(norms_rows + t + 1, norm, mask=row_in)
    tl.store(residual_ptr + rows[:, None] * d + cols[None, :], r, mask=tile_in)


@triton.jit
def _sparse_scan_backward_kernel(
    residual_ptr, grad_norms_ptr, grad_level_ptr, levels_ptr, w_ptr, values_ptr, indices_ptr, counts_ptr,
    dx_ptr, dvalues_ptr, dw_ptr,
    num_rows, k, d, n,
    stride_w, stride_values, stride_indices, stride_levels, stride_dw,
    DETACH: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    LOOP_STAGES: tl.constexpr, ATOMIC_SEM: tl.constexpr, SORTED_DW: tl.constexpr,
    NEEDS_DW: tl.constexpr, NEEDS_DVALUES: tl.constexpr,
):
    """dx[b, chunk] = G_0; dvalues[chunk, b, t] = partial -<G_t, W_dec[p_t]>; dW_dec via atomics
    (or, ``SORTED_DW``, via per-slot rows), for the program's ``ROWS`` rows ``b``.  ``NEEDS_DW`` /
    ``NEEDS_DVALUES`` off (a frozen decoder, fixed codes): that output is neither computed nor
    written, and its pointer is never read.

    ``DETACH``: the slots take the level-local suffix ``H_t`` instead of ``G_t`` (module doc);
    ``grad_level_ptr`` and ``levels_ptr`` are read only then.  ``SORTED_DW``: ``dw_ptr`` is the
    ``(B k, d)`` slot-row buffer, and slot ``t`` of row ``b`` stores its term in row ``b k + t``.
    The rows walk back from the longest count among them; a row whose slot ``t`` is past its count
    waits (its residual is still ``r_k``, its padding already in the suffix sums).
    """
    rows, row_in, chunk, cols, in_d, tile_in = _program_tile(num_rows, d, ROWS, BLOCK_D)
    r = tl.load(residual_ptr + rows[:, None] * d + cols[None, :], mask=tile_in, other=0.0)
    grad_rows = grad_norms_ptr + rows * (k + 1)
    dvalues_rows = dvalues_ptr + (chunk.to(tl.int64) * num_rows + rows) * k
    counts = tl.load(counts_ptr + rows, mask=row_in, other=0)
    # The padded slots t >= c_b all see r_k: their gradients start the suffix sums as per-row scalars.
    first_padded = tl.min(tl.where(row_in, counts, k), axis=0)
    tail = tl.zeros([ROWS], ACC)
    if DETACH:
        grad_level_rows = grad_level_ptr + rows * (k + 1)
        levels_rows = levels_ptr + rows * stride_levels
        # slot c_b's level, or -1 when there is no slot after the last live one: its level ends there
        next_level = tl.load(levels_rows + counts, mask=row_in & (counts < k), other=-1).to(tl.int64)
        level_tail = tl.zeros([ROWS], ACC)
        for t in range(first_padded, k):
            padded = row_in & (t >= counts)
            twice_level_grad = 2.0 * tl.load(grad_level_rows + t + 1, mask=padded, other=0.0).to(ACC)
            tail += 2.0 * tl.load(grad_rows + t + 1, mask=padded, other=0.0).to(ACC) + twice_level_grad
            same_level = tl.load(levels_rows + t, mask=padded, other=-1).to(tl.int64) == next_level
            level_tail += tl.where(same_level, twice_level_grad, 0.0)
        level_suffix = level_tail[:, None] * r
    else:
        for t in range(first_padded, k):
            padded = row_in & (t >= counts)
            tail += 2.0 * tl.load(grad_rows + t + 1, mask=padded, other=0.0).to(ACC)
    suffix = tail[:, None] * r
    longest = tl.max(counts, axis=0)
    for step in tl.range(0, longest, num_stages=LOOP_STAGES):
        t = longest - 1 - step  # slot t holds latent number t + 1 of the scan
        live = t < counts
        twice_grad = 2.0 * tl.load(grad_rows + t + 1, mask=live, other=0.0).to(ACC)
        if DETACH:
            twice_level_grad = 2.0 * tl.load(grad_level_rows + t + 1, mask=live, other=0.0).to(ACC)
            suffix += (twice_grad + twice_level_grad)[:, None] * r
            level = tl.load(levels_rows + t, mask=live, other=-1).to(tl.int64)
            keeps = ((level == next_level) | (t >= counts)).to(ACC)  # a waiting row keeps its suffix
            level_suffix = keeps[:, None] * level_suffix + twice_level_grad[:, None] * r
            next_level = tl.where(live, level, next_level)
            slot_suffix = level_suffix
        else:
            suffix += twice_grad[:, None] * r
            slot_suffix = suffix
        latents = tl.load(indices_ptr + rows * stride_indices + t, mask=live, other=-1)
        w, active = _load_decoder_rows(w_ptr, latents, stride_w, cols, in_d, n, ACC)
        values = tl.load(values_ptr + rows * stride_values + t, mask=live, other=0.0).to(ACC)
        values = tl.where(active, values[:, None], 0.0)
        if NEEDS_DVALUES:
            tl.store(dvalues_rows + t, -tl.sum(slot_suffix * w, axis=1), mask=live)
        if NEEDS_DW:
            if SORTED_DW:  # summed per latent by _dw_segment_sum_kernel; inactive slots are never read
                tl.store(dw_ptr + (rows[:, None] * k + t) * stride_dw + cols[None, :], -values * slot_suffix,
                         mask=live[:, None] & in_d[None, :])
            else:
                tl.atomic_add(dw_ptr + latents[:, None] * stride_dw + cols[None, :], -values * slot_suffix,
                              mask=active, sem=ATOMIC_SEM)
        r += values * w
    twice_first = 2.0 * tl.load(grad_rows, mask=row_in, other=0.0).to(ACC)
    if DETACH:
        twice_first += 2.0 * tl.load(grad_level_rows, mask=row_in, other=0.0).to(ACC)
    suffix += twice_first[:, None] * r
    tl.store(dx_ptr + rows[:, None] * d + cols[None, :], suffix, mask=tile_in)


@triton.jit
def _dw_segment_sum_kernel(slot_rows_ptr, order_ptr, starts_ptr, dw_ptr, d, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """dW_dec[l, chunk] = sum of slot_rows[order[j], chunk] for j in [starts[l], starts[l + 1]).

    ``order``: the slots sorted by latent; ``starts``: where each latent's run begins.  Every row of
    ``dW_dec`` is written, zeros for a latent no slot holds."""
    latent = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    total = tl.zeros([BLOCK_D], ACC)
    for j in range(tl.load(starts_ptr + latent), tl.load(starts_ptr + latent + 1)):
        slot = tl.load(order_ptr + j)
        total += tl.load(slot_rows_ptr + slot * d + cols, mask=in_d, other=0.0)
    tl.store(dw_ptr + latent * d + cols, total, mask=in_d)


DW_MODES = ("atomic", "sorted")


@dataclass(frozen=True)
class SparseLaunch:
    """How the sparse kernels are launched; the results do not depend on it beyond float rounding.

    ``block_d``: columns per program (a power of two, >= 16); ``rows``: batch rows per program (a
    power of two up to 64; they walk their slots side by side, so one program has ``rows`` decoder
    rows in flight per step); ``num_warps``: warps per program;
    ``loop_stages``: ``tl.range``'s ``num_stages`` for the slot loop (1: no software pipelining);
    ``atomic_sem``: memory order of the ``dW_dec`` atomics.  A sum needs no ordering, so
    ``"relaxed"``; ``"acq_rel"`` (Triton's default) is kept selectable to measure what the fences cost.
    ``dw_mode``: ``"atomic"`` or ``"sorted"`` (module doc: deterministic, ``B k d`` more memory).
    """

    block_d: int
    num_warps: int = 4
    loop_stages: int = 1
    atomic_sem: str = "relaxed"
    dw_mode: str = "atomic"
    rows: int = 1

    def __post_init__(self):
        if self.block_d < 16 or self.block_d & (self.block_d - 1):
            raise ValueError(f"block_d must be a power of two >= 16, got {self.block_d}")
        if self.rows not in (1, 2, 4, 8, 16, 32, 64):
            raise ValueError(f"rows must be a power of two from 1 to 64, got {self.rows}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two from 1 to 32, got {self.num_warps}")
        if self.loop_stages < 1:
            raise ValueError(f"loop_stages must be >= 1, got {self.loop_stages}")
        if self.atomic_sem not in ("relaxed", "acq_rel", "acquire", "release"):
            raise ValueError(f"atomic_sem must be 'relaxed', 'acq_rel', 'acquire' or 'release', got {self.atomic_sem!r}")
        if self.dw_mode not in DW_MODES:
            raise ValueError(f"dw_mode must be one of {DW_MODES}, got {self.dw_mode!r}")


def default_launch(d: int) -> SparseLaunch:
    """The launch the op uses for rows of width ``d``.

    One chunk per row up to d = 1024 keeps the scan in one program; wider rows split so that a
    chunk's residual stays in registers (4 warps x 32 lanes x 8 floats).  Not yet tuned on a GPU:
    ``python -m benchmarks.tune`` measures the alternatives.
    """
    return SparseLaunch(block_d=max(16, min(triton.next_power_of_2(d), 1024)))


def _launch_meta(d: int, acc_dtype: torch.dtype, launch: SparseLaunch | None = None) -> tuple[torch.dtype, int, dict]:
    """``(torch accumulation dtype, d-chunks, compile-time arguments)`` of a launch over rows of ``d``.

    The compile-time arguments include ``num_warps`` and the backward's ``ATOMIC_SEM`` and
    ``SORTED_DW``; the forward kernel takes every other key (``_forward_meta``).
    """
    launch = launch or default_launch(d)
    wide = acc_dtype == torch.float64
    torch_acc, tl_acc = (torch.float64, tl.float64) if wide else (torch.float32, tl.float32)
    meta = dict(ACC=tl_acc, ROWS=launch.rows, BLOCK_D=launch.block_d, LOOP_STAGES=launch.loop_stages,
                ATOMIC_SEM=launch.atomic_sem, SORTED_DW=launch.dw_mode == "sorted", num_warps=launch.num_warps)
    return torch_acc, triton.cdiv(d, launch.block_d), meta


_BACKWARD_ONLY = ("ATOMIC_SEM", "SORTED_DW")


def _forward_meta(meta: dict) -> dict:
    """``meta`` without the backward-only keys."""
    return {key: value for key, value in meta.items() if key not in _BACKWARD_ONLY}


def _segment_sum_by_latent(slot_rows: torch.Tensor, indices: torch.Tensor, dW: torch.Tensor, meta: dict) -> None:
    """``dW[l] = sum of slot_rows[j]`` over the slots ``j`` holding latent ``l``, in slot order.

    All on the device (no host sync): the slots are sorted by latent (stable), invalid ones (padding,
    out of range) last under the key ``n``, and a latent's run starts at the cumulative count."""
    n, d = dW.shape
    flat = indices.reshape(-1)
    key = torch.where((flat >= 0) & (flat < n), flat, n)
    order = torch.argsort(key, stable=True)
    starts = torch.zeros(n + 1, dtype=torch.int64, device=dW.device)
    torch.cumsum(torch.bincount(key, minlength=n + 1)[:n], 0, out=starts[1:])
    _dw_segment_sum_kernel[(n, triton.cdiv(d, meta["BLOCK_D"]))](
        slot_rows, order, starts, dW, d, ACC=meta["ACC"], BLOCK_D=meta["BLOCK_D"], num_warps=meta["num_warps"])


def _counts(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's slot count (``scan_layout.slot_counts``) as the kernels' int32 loop bound."""
    return slot_counts((indices >= 0) & (indices < n)).to(torch.int32)


def sparse_scan_forward(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    acc_dtype: torch.dtype,
    launch: SparseLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward scan.  Returns ``(norms (B, k+1), final residual (B, d))`` in ``acc_dtype``.

    ``values``/``indices`` are ``(B, k)``, sorted by index within each row with padding last.
    ``launch``: ``default_launch(d)`` unless given (tuning).
    """
    num_rows, d = x.shape
    k = values.shape[1]
    torch_acc, chunks, meta = _launch_meta(d, acc_dtype, launch)
    counts = _counts(indices, W_dec.shape[0])
    partial = x.new_empty(chunks, num_rows, k + 1, dtype=torch_acc)
    residual = x.new_empty(num_rows, d, dtype=torch_acc)
    if num_rows > 0:
        x, W_dec = x.contiguous(), W_dec.contiguous()
        with device_guard(x):
            _sparse_scan_forward_kernel[(triton.cdiv(num_rows, meta["ROWS"]), chunks)](
                x, x if b_dec is None else b_dec.contiguous(), W_dec, values, indices, counts, partial, residual,
                num_rows, k, d, W_dec.shape[0],
                x.stride(0), W_dec.stride(0), values.stride(0), indices.stride(0),
                HAS_BIAS=b_dec is not None, **_forward_meta(meta),
            )
    return partial.sum(0), residual


def sparse_scan_backward(
    residual: torch.Tensor,
    grad_norms: torch.Tensor,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    grad_level_norms: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
    launch: SparseLaunch | None = None,
    needs_dW: bool = True,
    needs_dvalues: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward scan.  Returns ``(dx, dvalues, dW_dec)`` in the accumulation dtype.

    With ``grad_level_norms`` and ``levels`` (``(B, k)`` int64, non-decreasing per row): the
    detached backward, ``grad_norms`` reaching ``x`` only and ``grad_level_norms`` also the slots
    of its own level (module doc).  ``launch``: ``default_launch(d)`` unless given (tuning).
    ``needs_dW`` / ``needs_dvalues`` off: that gradient is skipped and returned as an empty tensor.

    ``dW_dec`` is a scatter-add over rows: by default (vectorised, relaxed) atomics into a zeroed
    accumulation-dtype buffer; with ``dw_mode="sorted"`` a segmented sum of per-slot rows (module doc).
    """
    num_rows, d = residual.shape
    k = values.shape[1]
    torch_acc, chunks, meta = _launch_meta(d, residual.dtype, launch)
    dx = torch.empty_like(residual)
    dvalues_partial = residual.new_zeros(chunks, num_rows, k) if needs_dvalues else None  # padded slots stay 0
    sorted_dw = meta["SORTED_DW"] and needs_dW
    if not needs_dW:
        dW = residual.new_empty(0)
    else:  # sorted: every dW_dec row is written by the segment sum, so no zero fill
        dW = (torch.empty if sorted_dw else torch.zeros)(W_dec.shape, dtype=torch_acc, device=W_dec.device)
    dw_target = residual.new_empty(num_rows * k, d) if sorted_dw else dW
    # A skipped output's pointer is never read; the kernel gets dx (a real tensor) in its place.
    dw_arg = dw_target if needs_dW else dx
    dvalues_arg = dvalues_partial if needs_dvalues else dx
    detach = levels is not None
    grad_norms = grad_norms.to(torch_acc).contiguous()
    grad_level = grad_level_norms.to(torch_acc).contiguous() if detach else grad_norms
    levels = levels if detach else indices  # not read without DETACH
    if num_rows > 0:
        W_dec = W_dec.contiguous()
        with device_guard(residual):
            _sparse_scan_backward_kernel[(triton.cdiv(num_rows, meta["ROWS"]), chunks)](
                residual, grad_norms, grad_level, levels, W_dec, values, indices, _counts(indices, W_dec.shape[0]),
                dx, dvalues_arg, dw_arg,
                num_rows, k, d, W_dec.shape[0],
                W_dec.stride(0), values.stride(0), indices.stride(0), levels.stride(0),
                dw_arg.stride(0),
                DETACH=detach, NEEDS_DW=needs_dW, NEEDS_DVALUES=needs_dvalues, **meta,
            )
    if sorted_dw and dW.numel() > 0:
        with device_guard(residual):
            _segment_sum_by_latent(dw_target, indices, dW, meta)
    return dx, dvalues_partial.sum(0) if needs_dvalues else residual.new_empty(0), dW
