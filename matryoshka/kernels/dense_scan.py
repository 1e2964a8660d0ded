"""Fused Triton kernels for the dense residual scan, and their host functions.

Dense ``(B, n)`` activations (ReLU/L1, JumpReLU, ...) are scanned over latent *tiles*.  One program
owns a block of ``BLOCK_B`` rows and a chunk of ``BLOCK_D`` columns of ``d``, keeps that residual
tile in registers and walks the latents ``0..L`` (``L`` = the longest prefix) ``BLOCK_N`` at a time:

    r_0 = x - b_dec,   R <- R - A[:, tile] @ W_dec[tile, chunk]          (one decode GEMM in all)

A *position* ``p`` is "after the first ``p`` latents"; prefix ``g`` asks for ``||r_{m_g}||^2``.  A
host-built table maps each position to its prefix column (or -1).  Positions on a tile edge read
``||R||^2`` directly.  Positions inside a tile use the Gram form over the tile's rows ``d_l``:

    ||R - sum_{l <= j} a_l d_l||^2 = ||R||^2 - 2 sum_{l <= j} a_l <R, d_l>
                                     + sum_{l <= j} a_l (a_l <d_l, d_l> + 2 sum_{i < l} a_i <d_i, d_l>)

which is two extra GEMMs per tile however many boundaries the tile holds, so every-latent prefixes
cost about twice group prefixes.  Every term is a sum over columns, so each d-chunk's value is that
chunk's share of the squared norm, and the shares of all chunks add up to the full norm, exactly as
the plain ``||R||^2`` shares do.  Shares are summed through a deterministic per-chunk buffer when
that buffer is small (at most one ``(B, d)`` tensor), else added atomically into one buffer.

The backward (one reverse walk, about three GEMMs) is documented on its kernel.  Detached levels
(``DETACH``: norm ``g`` differentiates ``x``, ``b_dec`` and only the latents ``m_{g-1} <= i < m_g``)
change only the backward: with ``c_g = dL/dnorms[:, g]`` a latent ``i`` of level ``g`` sees
``2 c_g r_{m_g}`` instead of the suffix sum ``sum_{g' >= g} 2 c_{g'} r_{m_{g'}}``, so the suffix that
``dA`` and ``dW_dec`` take restarts at every prefix position (``H``), while ``dx`` keeps the full sum
(``S``); a level that ends inside a tile gets its terms from the same Gram form
(``_add_detached_grads_inside_tile``).  Same GEMM count; ``S`` moves from registers to the program's
``dx`` tile in memory, read and written once per tile that holds a prefix.  Accumulation is
float32 (float64 for float64 inputs).  GEMM operands are the half type for half activations and
decoder (tensor cores; the float32 residual and suffix sum are rounded to it for their products),
else float32 via ``tf32x3`` (``tf32`` when the user allows PyTorch's float32 matmuls TF32; see
``default_launch``) or float64.  Extra memory is the saved final residual ``(B, d)`` plus the
reduction buffers above, whatever the number of prefixes.

Cost against one plain decode GEMM ``A @ W_dec`` (B x n x d: ``2Bnd`` FLOPs, ``(Bn + nd + Bd) e``
bytes, ``e`` the operand size).  Tiles ``BB x BN x BD`` (rows, latents, columns), ``L = n``, ``T``
tiles holding inner prefix boundaries (``T <= min(G, n/BN)``; ``f = T BN / n``):

* FLOPs, forward ``2Bnd (1 + f (1 + BN/BB + BN/BD))``; backward ``2Bnd (3 + f (3 + 2 BN/BB + 3 BN/BD))``
  (recompute ``R_s``, ``dA``, ``dW``; the inner terms add ``P``, Gram, four ``BN``-wide products and
  two full ones).  Group prefixes (``f ~ 0``): 1 and 3 decodes.  Every latent a prefix (``f = 1``):
  3.5 and 9.5 decodes at the float32 tiles 16x16x32, 2.75 and 7.75 at the half tiles 32x16x64.
  Float32 operands run ``tf32x3``: three tensor-core products per product.
* Bytes: every program streams its rows' ``A`` (``BB x n``) and its chunk's ``W_dec`` (``n x BD``),
  so ``A`` is read ``d/BD`` times and ``W_dec`` ``B/BB`` times: ``(Bn d/BD + nd B/BB) e`` per pass.
* Atomics (backward, ``ATOMIC``, i.e. more than one chunk): ``B n d/BD`` into ``dA`` and
  ``n d B/BB`` into ``dW_dec``; the forward's norm shares are plain stores unless ``(d/BD) G > d``.

At B=4096, n=36864, d=2304 one decode is 0.696 TFLOP and 0.98 GB (fp32) / 0.49 GB (bf16):

* float32 (16x16x32, 18432 programs): A 43.5 GB + W 87.0 GB = 130 GB per pass, 133x the decode's
  bytes; backward 1.09e10 ``dA`` + 2.17e10 ``dW`` atomics (3.3e10 fp32 read-modify-writes, ~130 GB).
* bfloat16 (32x16x64, 4608 programs): A 10.9 GB + W 21.7 GB = 32.6 GB per pass, 66x; backward
  5.4e9 + 1.09e10 = 1.6e10 fp32 atomics.

Programs that share a column chunk run side by side (``program_id(0)`` = row block varies fastest),
so much of the ``W_dec`` re-reading hits L2; the ``A`` re-reads (once per chunk, far apart in time)
and the atomics do not.  The design is bound by bytes and atomics, not by tensor-core FLOPs: even
the ``A`` traffic alone (43.5 GB, ~9 ms at 4.8 TB/s) is far above a bf16 decode (~0.7 ms).

Redesign towards ~1.3x one decode (forward + backward against a plain decode's forward + backward,
which is 3 GEMMs; this is 4).  Walk the prefix *segments* ``[m_{g-1}, m_g)`` in order and make each
step a GEMM of its natural shape, so no reduction crosses programs:

1. Forward: one GEMM-shaped kernel, tiles 128 x 64 x 128 (bf16: 128 x 64 x 256), 8 warps, wgmma
   with the residual tile as the fp32 accumulator, pipelined (TMA) loads and grouped program order,
   so ``A`` and ``W_dec`` come mostly from L2 (~1x the decode's bytes).  A squared norm is a sum
   over ``d``, so programs that split ``d`` need no reduction before the prefix scan: at each
   boundary the epilogue row-reduces ``||R||^2`` of its chunk into a deterministic
   ``(d/BD, B, G)`` buffer (summed on the host).  Cost: 1 decode + ``G`` row reductions.
2. Backward, per segment in reverse, with two ``(B, d)`` buffers ``R`` and ``S`` (memory
   independent of ``G``): ``dA[:, seg] = -S @ W_seg^T`` (K = d: reduced inside a program),
   ``dW_seg = -A_seg^T @ S`` (K = B: reduced inside a program), then ``R += A_seg @ W_seg`` and
   ``S += 2 c_g R``.  Three decodes in all, no atomics, deterministic; one launch (or one persistent
   kernel with a segment loop) per segment, fine for group or sampled prefixes (G ~ 5-64).
3. Fine prefixes (every latent): keep segments of ``BN`` latents and add the inner boundaries by the
   Gram form.  ``||R - sum_{l<=j} a_l d_l||^2 = ||R||^2 - 2 sum a_l <R, d_l> + sum a_l a_m Gm_lm``:
   the first two terms are per-chunk shares (``P = R W_tile^T``, one extra decode), the last does not
   depend on ``R`` and uses the full-``d`` per-tile Gram ``W_tile W_tile^T`` (precomputed once:
   ``2 n BN d`` FLOPs, ``BN/B`` of a decode), added by the chunk-0 programs only.  With ``BN = 64``
   the inner products are tensor-core sized.
4. Float32: TF32 (one pass) when the user allows it, else ``tf32x3`` only on the residual-updating
   GEMM, whose errors accumulate along the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .guard import device_guard

__all__ = ["DenseLaunch", "PRECISIONS", "default_launch", "dense_scan_forward", "dense_scan_backward"]

PRECISIONS = ("tf32x3", "tf32")  # of float32 GEMM operands, most precise first


@dataclass(frozen=True)
class DenseLaunch:
    """How the dense kernels are launched; the results do not depend on it beyond float rounding.

    ``rows`` x ``latents`` x ``cols``: batch rows per program, latents per tile, columns of ``d``
    per program (``BLOCK_B``, ``BLOCK_N``, ``BLOCK_D``), each a power of two >= 16 (the least
    ``tl.dot`` dimension a GPU build takes); ``num_warps``: warps per program.  ``precision``: of
    float32 GEMM operands, ``"tf32x3"`` (three TF32 tensor-core products, close to float32) or
    ``"tf32"`` (one, ~1e-3 relative error per product, accumulated in float32 as cuBLAS's TF32
    GEMMs are); half and float64 operands ignore it.
    """

    rows: int
    latents: int
    cols: int
    num_warps: int
    precision: str = "tf32x3"

    def __post_init__(self):
        for name in ("rows", "latents", "cols"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two from 1 to 32, got {self.num_warps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


# Largest tiles per GEMM operand type.  The residual tile and, in the backward, its suffix-sum twin
# live in registers next to the inner-prefix temporaries.  These shapes come from the sm_90
# ahead-of-time report (``python -m matryoshka.kernels.report``): no half or float32 build spills.
# Float32 is the tight one: its ``tf32x3`` products split every operand into two TF32 halves, and
# its backward spills at 64x16x32 (216 B), 32x16x32 (328 B), 64x16x16 (176 B), 32x16x16 (24 B) and
# 16x16x16 (16 B), but not at 16x16x32 (222 registers).  With 4 warps Triton 3.6 (the H200 image's)
# spills 8 B in the 16x16x32 forward; with 8 warps neither 3.6 nor 3.9 spills in any float32 kernel.
# None has been timed on a GPU yet: ``python -m benchmarks.tune_dense`` times the alternatives.
_LARGEST = {
    torch.float16: DenseLaunch(rows=32, latents=16, cols=64, num_warps=4),
    torch.bfloat16: DenseLaunch(rows=32, latents=16, cols=64, num_warps=4),
    torch.float32: DenseLaunch(rows=16, latents=16, cols=32, num_warps=8),
    torch.float64: DenseLaunch(rows=32, latents=16, cols=32, num_warps=4),
}
# Float32 at "tf32": one product per operand pair instead of three frees registers, yet on 8 warps
# Triton 3.9 spills 24 B in the 16x16x32 backward (128 registers); on 4 warps neither 3.6 nor 3.9
# spills.  Untimed, like the rest: ``python -m benchmarks.tune_dense`` times larger tf32 tiles.
_LARGEST_TF32 = DenseLaunch(rows=16, latents=16, cols=32, num_warps=4, precision="tf32")
# Narrowest column chunk per operand type (else 16): the 16-wide float32 backward spills.
_MIN_COLS = {torch.float32: 32}


def default_launch(operand_dtype: torch.dtype, num_rows: int, d: int, precision: str | None = None) -> DenseLaunch:
    """The launch the op uses for GEMM operands of ``operand_dtype``: the largest tiles, shrunk to
    small ``B`` and ``d`` but never below 16.

    ``precision`` (``None``: the user's): float32 products run ``"tf32"`` when the user allows
    PyTorch's own float32 matmuls TF32 (``torch.set_float32_matmul_precision("high")`` or
    ``"medium"``, or ``torch.backends.cuda.matmul.allow_tf32 = True``, which sets ``"high"``), else
    ``"tf32x3"``, so that the kernels round their products as the PyTorch scan's cuBLAS GEMMs do.
    """
    if precision is None:
        precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    largest = _LARGEST_TF32 if operand_dtype == torch.float32 and precision == "tf32" else _LARGEST[operand_dtype]
    rows = max(16, min(triton.next_power_of_2(max(num_rows, 1)), largest.rows))
    cols = max(_MIN_COLS.get(operand_dtype, 16), min(triton.next_power_of_2(max(d, 1)), largest.cols))
    return DenseLaunch(rows=rows, latents=largest.latents, cols=cols, num_warps=largest.num_warps, precision=precision)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, acc=None):
    """``acc + a @ b``.  Accumulating into an existing tile saves the registers of a second one.

    ``PRECISION`` (``DenseLaunch.precision``) applies to float32 operands: ``"tf32x3"``, three TF32
    tensor-core products, close to IEEE float32 (IEEE itself has no tensor cores and spills
    registers heavily), or ``"tf32"``, one product at ~1e-3 relative error.  Half and float64
    operands ignore it.  An accumulator's dtype is named as the output's: Triton 3.6 (the H200
    image's) otherwise asserts a float32 output and refuses a float64 ``acc``.
    """
    if acc is None:
        out = tl.dot(a, b, input_precision=PRECISION)
    else:
        out = tl.dot(a, b, acc=acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return out


@triton.jit
def _write(ptrs, values, mask, ATOMIC: tl.constexpr):
    """Store a chunk's share of a sum into its own buffer slice, or add it into the shared one."""
    if ATOMIC:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _chunk_slice(shares_ptr, stride_chunk, ATOMIC: tl.constexpr):
    """Where this program's chunk writes its shares: its own slice, or the one shared slice."""
    if ATOMIC:
        return shares_ptr
    return shares_ptr + tl.program_id(1).to(tl.int64) * stride_chunk


@triton.jit
def _load_tile(acts_ptr, w_ptr, rows, latents, cols, row_in, col_in, scan_len, stride_acts, stride_w,
               DOT: tl.constexpr):
    """``A[rows, latents]`` and ``W_dec[latents, cols]`` as GEMM operands; latents past the longest
    prefix load as zeros, so they neither change the residual nor read memory."""
    latent_in = latents < scan_len
    a = tl.load(acts_ptr + rows[:, None] * stride_acts + latents[None, :],
                mask=row_in[:, None] & latent_in[None, :], other=0.0).to(DOT)
    w = tl.load(w_ptr + latents[:, None] * stride_w + cols[None, :],
                mask=latent_in[:, None] & col_in[None, :], other=0.0).to(DOT)
    return a, w, latent_in


@triton.jit
def _inner_columns(table_ptr, start, scan_len, BLOCK_N: tl.constexpr):
    """Prefix column of the position after each latent ``j`` of the tile, -1 where none.

    The last latent's position is the next tile's edge (or the longest prefix): handled there.
    """
    offsets = tl.arange(0, BLOCK_N)
    positions = start + 1 + offsets
    inside = (offsets < BLOCK_N - 1) & (positions < scan_len)
    return tl.load(table_ptr + positions, mask=inside, other=-1)


@triton.jit
def _edge_column(table_ptr, start, like):
    """Prefix column of position ``start`` broadcast to the shape of ``like`` (interpreter: masks
    built from a scalar comparison come out int32, which loads and stores reject)."""
    return tl.load(table_ptr + start) + tl.zeros_like(like).to(tl.int32)


@triton.jit
def _norms_inside_tile(r, a, w, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(BLOCK_B, BLOCK_N)``: this chunk's share of ``||R - sum_{l <= j} a_l d_l||^2`` for every ``j``.

    With ``P = R W^T`` and ``Gm = W W^T``: ``||R||^2 + cumsum_j a_j (sum_l a_l M_lj - 2 P_j)``, where
    ``M_lj`` is ``2 Gm_lj`` for ``l < j``, ``Gm_jj`` on the diagonal and 0 below it.
    """
    p = _dot(r.to(DOT), tl.trans(w), PRECISION)
    gram = _dot(w, tl.trans(w), PRECISION)
    l = tl.arange(0, BLOCK_N)[:, None]
    j = tl.arange(0, BLOCK_N)[None, :]
    pairs = tl.where(l < j, 2.0 * gram, tl.where(l == j, gram, 0.0))
    cross = _dot(a, pairs.to(DOT), PRECISION)
    steps = a.to(ACC) * (cross - 2.0 * p)
    return tl.sum(r * r, axis=1)[:, None] + tl.cumsum(steps, axis=1)


@triton.jit
def _dense_scan_forward_kernel(
    x_ptr, bias_ptr, w_ptr, acts_ptr, table_ptr, norms_ptr, residual_ptr,
    num_rows, d, scan_len, num_prefixes,
    stride_x, stride_w, stride_acts, stride_norms_chunk,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """norms[chunk, b, g] = this chunk's share of ||r_{m_g}||^2; residual[b, chunk] = r_L[chunk].

    For each tile ``[s, s + BLOCK_N)`` of latents below ``L``: write ``||R||^2`` if position ``s`` is
    a prefix, the Gram-form norms if positions ``s+1 .. s+BLOCK_N-1`` hold any, then
    ``R -= A[:, tile] @ W_dec[tile, chunk]``.  Position ``L`` (always the last prefix) comes last.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_in = rows < num_rows
    col_in = cols < d
    tile_in = row_in[:, None] & col_in[None, :]
    r = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=tile_in, other=0.0).to(ACC)
    if HAS_BIAS:
        r -= tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(ACC)[None, :]
    norms_rows = _chunk_slice(norms_ptr, stride_norms_chunk, ATOMIC) + rows * num_prefixes
    for start in range(0, scan_len, BLOCK_N):
        edge = _edge_column(table_ptr, start, rows)
        _write(norms_rows + edge, tl.sum(r * r, axis=1), row_in & (edge >= 0), ATOMIC)
        latents = start + tl.arange(0, BLOCK_N).to(tl.int64)
        a, w, _ = _load_tile(acts_ptr, w_ptr, rows, latents, cols, row_in, col_in, scan_len,
                             stride_acts, stride_w, DOT)
        inner = _inner_columns(table_ptr, start, scan_len, BLOCK_N)
        if tl.max(inner) >= 0:
            norms = _norms_inside_tile(r, a, w, ACC, DOT, PRECISION, BLOCK_N)
            _write(norms_rows[:, None] + inner[None, :], norms,
                   row_in[:, None] & (inner[None, :] >= 0), ATOMIC)
        r = _dot(-a, w, PRECISION, r)
    _write(norms_rows + num_prefixes - 1, tl.sum(r * r, axis=1), row_in, ATOMIC)
    tl.store(residual_ptr + rows[:, None] * d + cols[None, :], r, mask=tile_in)


@triton.jit
def _add_grads_inside_tile(da, dw, s, r_start, a, w, suffix_weights, ACC: tl.constexpr, DOT: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the terms of the prefixes *inside* a tile to ``(dA, dW_dec, S)`` and return them.

    With ``T_j = sum_{j' >= j} 2 c_{j'}`` (``c_{j'}`` the norm gradient at the position after latent
    ``j'``), the suffix sum at latent ``j`` is ``S_end + T_j R_s - sum_l a_l T_{max(j,l)} d_l``
    (``R_s`` the residual before the tile), so with ``P = R_s W^T`` and ``Gm = W W^T``:

        dA_j  += -T_j P_j + T_j sum_{l <= j} a_l Gm_lj + sum_{l > j} a_l T_l Gm_lj
        dW_l  += -sum_b a_l T_l R_s + sum_m M_lm d_m,   M_lm = sum_b a_l a_m T_{max(l,m)}
        S     += T_0 R_s - sum_l a_l T_l d_l           (the suffix sum before the tile)
    """
    p = _dot(r_start.to(DOT), tl.trans(w), PRECISION)
    gram = _dot(w, tl.trans(w), PRECISION)
    l = tl.arange(0, BLOCK_N)[:, None]
    j = tl.arange(0, BLOCK_N)[None, :]
    upper = tl.where(l <= j, gram, 0.0).to(DOT)
    lower = tl.where(l > j, gram, 0.0).to(DOT)
    t = 2.0 * tl.cumsum(suffix_weights, axis=1, reverse=True)
    at = (a.to(ACC) * t).to(DOT)
    da += t * (_dot(a, upper, PRECISION) - p) + _dot(at, lower, PRECISION)
    k = _dot(tl.trans(a), at, PRECISION)  # k_lm = sum_b a_l a_m T_m; M takes it for l <= m, its transpose below
    pair_weights = tl.where(l <= j, k, tl.trans(k)).to(DOT)
    dw = _dot(tl.trans(-at), r_start.to(DOT), PRECISION, _dot(pair_weights, w, PRECISION, dw))
    t_first = 2.0 * tl.sum(suffix_weights, axis=1)
    s = _dot(-at, w, PRECISION, s + t_first[:, None] * r_start)
    return da, dw, s


@triton.jit
def _level_ends(inner, BLOCK_N: tl.constexpr):
    """For each latent ``l`` of a tile, ``e(l)``: the first ``j >= l`` whose position ``start + 1 + j``
    ends a prefix inside the tile, or ``BLOCK_N`` if the latent's level runs past the tile."""
    j = tl.arange(0, BLOCK_N)[:, None]
    l = tl.arange(0, BLOCK_N)[None, :]
    return tl.min(tl.where((j >= l) & (inner[:, None] >= 0), j, BLOCK_N), axis=0)


@triton.jit
def _add_detached_grads_inside_tile(da, dw_ptrs, dw_mask, h, r_start, a, w, c_own, ends, ACC: tl.constexpr,
                                    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                                    NEEDS_DW: tl.constexpr):
    """Detached levels: add the terms of the levels that *end inside* a tile to ``dA`` (returned)
    and ``dW_dec`` (added atomically here: accumulated into the tile's ``dW`` registers instead, the
    float32 build spilled), and move the level suffix ``H`` to the tile's start (before the edge
    position's own term).  Returns ``(dA, H)``.

    Latent ``l`` of a level ending at position ``s + 1 + e(l)`` sees ``u_l (R_s - sum_{m <= e(l)} a_m d_m)``
    with ``u_l = 2 c`` there (``c_own``), so with ``P = R_s W^T``, ``Gm = W W^T``:

        dA_l += -u_l P_l + u_l sum_{m <= e(l)} a_m Gm_ml
        dW_l += -sum_b a_l u_l R_s + sum_{m <= e(l)} K_lm d_m,   K_lm = sum_b a_l u_l a_m

    The level suffix at the tile start is latent 0's: ``H`` if its level runs past the tile (then
    ``u_0 = 0``), else ``u_0 (R_s - sum_{m <= e(0)} a_m d_m)``, where ``u_m = u_0`` for ``m <= e(0)``.
    """
    p = _dot(r_start.to(DOT), tl.trans(w), PRECISION)
    gram = _dot(w, tl.trans(w), PRECISION)
    m = tl.arange(0, BLOCK_N)[:, None]
    l = tl.arange(0, BLOCK_N)[None, :]
    da += c_own * (_dot(a, tl.where(m <= ends[None, :], gram, 0.0).to(DOT), PRECISION) - p)
    au = (a.to(ACC) * c_own).to(DOT)
    pairs = _dot(tl.trans(au), a, PRECISION)  # pairs[l, m] = K_lm before the mask m <= e(l)
    own_pairs = tl.where(l <= ends[:, None], pairs, 0.0).to(DOT)
    if NEEDS_DW:
        dw = _dot(tl.trans(-au), r_start.to(DOT), PRECISION, _dot(own_pairs, w, PRECISION))
        tl.atomic_add(dw_ptrs, dw, mask=dw_mask, sem="relaxed")
    first_end = tl.min(ends)  # e is non-decreasing: e(0)
    u_first = tl.sum(tl.where(l == 0, c_own, 0.0), axis=1)
    first_level = tl.where(l <= first_end, -au, 0.0)
    h = _dot(first_level, w, PRECISION, (first_end >= BLOCK_N).to(ACC) * h + u_first[:, None] * r_start)
    return da, h


@triton.jit
def _add_to_full_suffix(dx_ptrs, tile_in, r_start, a, w, c_inner, c_edge, ACC: tl.constexpr, DOT: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Detached levels keep the full suffix ``S`` (for ``dx`` only) in the program's own ``dx`` tile
    in memory, not in registers: add a tile's prefixes' terms ``T_0 R_s - sum_l a_l T_l d_l`` (as
    ``_add_grads_inside_tile``) and ``2 c_s R_s`` of its edge."""
    t = 2.0 * tl.cumsum(c_inner, axis=1, reverse=True)
    t_first = 2.0 * tl.sum(c_inner, axis=1) + 2.0 * c_edge
    s = tl.load(dx_ptrs, mask=tile_in, other=0.0) + t_first[:, None] * r_start
    tl.store(dx_ptrs, _dot((-a.to(ACC) * t).to(DOT), w, PRECISION, s), mask=tile_in)


@triton.jit
def _dense_scan_backward_kernel(
    residual_ptr, grad_norms_ptr, w_ptr, acts_ptr, table_ptr, dx_ptr, dacts_ptr, dw_ptr,
    num_rows, d, n, scan_len, num_prefixes,
    stride_w, stride_acts, stride_dw, stride_dacts_chunk,
    DETACH: tl.constexpr, ATOMIC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NEEDS_DW: tl.constexpr, NEEDS_DACTS: tl.constexpr,
):
    """dx[b, chunk] = S_0; dacts[chunk, b, :L] = chunk shares of dA; dW_dec += via atomics.

    ``NEEDS_DW`` / ``NEEDS_DACTS`` off (a frozen decoder, fixed codes): that output is not written
    and its pointer never read.  The stores are guarded, and the detached branch's own ``dW_dec``
    products; the products that fed a skipped store elsewhere (``_add_grads_inside_tile`` computes
    ``dA``, ``dW_dec`` and ``S`` together) are then dead code, which the compiler removes (the sm_90
    build of a frozen-decoder backward has no ``dW_dec`` atomics and fewer matrix products:
    ``make kernels-report``, tests/test_kernels_report.py).

    Given ``c = dL/dnorms``, the suffix sum ``S_p = sum_{q >= p} 2 c_q r_q`` over positions starts
    at ``S_L = 2 c_L r_L`` and the tiles are walked in reverse, recovering the residual before each
    tile, ``R_s = R + A[:, tile] @ W_tile``.  With ``S`` the suffix sum at the tile's end:

        dA[:, tile] = -S @ W_tile^T,   dW_dec[tile] += -A[:, tile]^T @ S    (+ inner-prefix terms)

    then ``S`` takes the inner prefixes' terms and ``2 c_s R_s`` if position ``s`` is a prefix.
    ``dx = S_0``; ``db_dec = -sum_b dx`` is left to the caller.

    ``DETACH`` (detached levels: norm ``g`` differentiates only the latents ``m_{g-1} <= i < m_g``):
    ``dA`` and ``dW_dec`` take the *level* suffix ``H`` instead of ``S``: ``H = 2 c_q r_q`` for the
    position ``q`` ending the level of the tile's last latent, so it restarts (``H = 2 c_s R_s``) at
    each prefix position instead of adding up.  Latents whose level ends inside the tile take
    their terms from ``_add_detached_grads_inside_tile``.  ``S`` (for ``dx``) is unchanged but kept
    in the ``dx`` tile in memory (``_add_to_full_suffix``, only at tiles holding a prefix): with
    ``H`` in registers too, the float32 build spilled.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_in = rows < num_rows
    col_in = cols < d
    tile_in = row_in[:, None] & col_in[None, :]
    r = tl.load(residual_ptr + rows[:, None] * d + cols[None, :], mask=tile_in, other=0.0)
    grad_rows = grad_norms_ptr + rows * num_prefixes
    last = tl.load(grad_rows + num_prefixes - 1, mask=row_in, other=0.0)
    s = 2.0 * last[:, None] * r
    dx_ptrs = dx_ptr + rows[:, None] * d + cols[None, :]
    if DETACH:
        h = s  # the level suffix: the last prefix ends the scan
        tl.store(dx_ptrs, s, mask=tile_in)
    dacts_rows = _chunk_slice(dacts_ptr, stride_dacts_chunk, ATOMIC) + rows * n
    num_tiles = tl.cdiv(scan_len, BLOCK_N)
    for step in range(0, num_tiles):
        start = (num_tiles - 1 - step) * BLOCK_N
        latents = start + tl.arange(0, BLOCK_N).to(tl.int64)
        a, w, latent_in = _load_tile(acts_ptr, w_ptr, rows, latents, cols, row_in, col_in, scan_len,
                                     stride_acts, stride_w, DOT)
        r_start = _dot(a, w, PRECISION, r)
        dw_ptrs = dw_ptr + latents[:, None] * stride_dw + cols[None, :]
        dw_mask = latent_in[:, None] & col_in[None, :]
        inner = _inner_columns(table_ptr, start, scan_len, BLOCK_N)
        edge = _edge_column(table_ptr, start, rows)
        if DETACH:
            ends = _level_ends(inner, BLOCK_N)
            runs_past = (ends >= BLOCK_N)[None, :]  # the latent's level ends at or after the tile's end
            h_dot = h.to(DOT)
            da = tl.where(runs_past, -_dot(h_dot, tl.trans(w), PRECISION), 0.0)
            if NEEDS_DW:
                dw = _dot(tl.trans(-tl.where(runs_past, a, 0.0).to(DOT)), h_dot, PRECISION)
            if tl.max(inner) >= 0:
                own_column = tl.load(table_ptr + start + 1 + ends, mask=ends < BLOCK_N, other=-1)
                c_own = 2.0 * tl.load(grad_rows[:, None] + own_column[None, :],
                                      mask=row_in[:, None] & (own_column[None, :] >= 0), other=0.0)
                da, h = _add_detached_grads_inside_tile(da, dw_ptrs, dw_mask, h, r_start, a, w, c_own, ends,
                                                        ACC, DOT, PRECISION, BLOCK_N, NEEDS_DW)
            c_edge = tl.load(grad_rows + edge, mask=row_in & (edge >= 0), other=0.0)
            if tl.max(tl.maximum(inner, tl.max(edge))) >= 0:
                c_inner = tl.load(grad_rows[:, None] + inner[None, :],
                                  mask=row_in[:, None] & (inner[None, :] >= 0), other=0.0)
                _add_to_full_suffix(dx_ptrs, tile_in, r_start, a, w, c_inner, c_edge, ACC, DOT, PRECISION)
            h = tl.where((edge >= 0)[:, None], 2.0 * c_edge[:, None] * r_start, h)
        else:
            s_dot = s.to(DOT)
            da = -_dot(s_dot, tl.trans(w), PRECISION)
            dw = _dot(tl.trans(-a), s_dot, PRECISION)
            if tl.max(inner) >= 0:
                c_inner = tl.load(grad_rows[:, None] + inner[None, :],
                                  mask=row_in[:, None] & (inner[None, :] >= 0), other=0.0)
                da, dw, s = _add_grads_inside_tile(da, dw, s, r_start, a, w, c_inner, ACC, DOT, PRECISION, BLOCK_N)
            c_edge = tl.load(grad_rows + edge, mask=row_in & (edge >= 0), other=0.0)
            s += 2.0 * c_edge[:, None] * r_start
        r = r_start
        if NEEDS_DACTS:
            _write(dacts_rows[:, None] + latents[None, :], da, row_in[:, None] & latent_in[None, :], ATOMIC)
        if NEEDS_DW:
            tl.atomic_add(dw_ptrs, dw, mask=dw_mask, sem="relaxed")
    if not DETACH:
        tl.store(dx_ptrs, s, mask=tile_in)


_TL_DTYPES = {
    torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64,
}


def _operand_dtype(acts: torch.Tensor, W_dec: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """GEMM operand type: the half type when activations and decoder share it (tensor cores), else
    the accumulator type, so that no full-precision input is rounded to half."""
    if acts.dtype == W_dec.dtype and acts.dtype in (torch.float16, torch.bfloat16):
        return acts.dtype
    return acc


def op_launch(num_rows: int, d: int, acts: torch.Tensor, W_dec: torch.Tensor, acc: torch.dtype) -> DenseLaunch:
    """The launch the op picks for these inputs: ``default_launch`` of their GEMM operand type."""
    return default_launch(_operand_dtype(acts, W_dec, acc), num_rows, d)


def _plan(num_rows: int, d: int, acts: torch.Tensor, W_dec: torch.Tensor, acc: torch.dtype,
          launch: DenseLaunch | None = None):
    """``(grid, meta)``: the launch grid (row blocks, d-chunks) and the compile-time arguments of
    ``launch`` (``None``: ``op_launch``)."""
    operand = _operand_dtype(acts, W_dec, acc)
    launch = launch or default_launch(operand, num_rows, d)  # = op_launch, without a second dtype rule
    grid = (triton.cdiv(num_rows, launch.rows), triton.cdiv(d, launch.cols))
    meta = dict(
        ACC=_TL_DTYPES[acc], DOT=_TL_DTYPES[operand],
        # Only float32 operands read it: one build per other dtype, whatever the launch says.
        PRECISION=launch.precision if operand == torch.float32 else PRECISIONS[0],
        BLOCK_B=launch.rows, BLOCK_N=launch.latents, BLOCK_D=launch.cols, num_warps=launch.num_warps,
    )
    return grid, meta


def _position_table(lengths_cpu: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """int32 ``(n + 1,)``: prefix column of each position ``0..n``, -1 where no prefix ends.

    Built on the host from host-side lengths; the copy to the GPU goes through pinned memory without
    blocking, so the launch never waits on the device.
    """
    table = torch.full((n + 1,), -1, dtype=torch.int32)
    table[lengths_cpu] = torch.arange(lengths_cpu.numel(), dtype=torch.int32)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _chunk_shares(chunks: int, num_rows: int, width: int, d: int, dtype, device):
    """Buffer for the per-chunk shares of a ``(num_rows, width)`` sum, and whether to add atomically.

    A deterministic ``(chunks, num_rows, width)`` buffer when it is no bigger than one ``(B, d)``
    tensor (or there is one chunk); else one ``(1, num_rows, width)`` buffer every chunk adds into.
    Zeroed either way: entries no program writes must read as 0.
    """
    atomic = chunks > 1 and chunks * width > d
    shares = torch.zeros(1 if atomic else chunks, num_rows, width, dtype=dtype, device=device)
    return shares, atomic


def dense_scan_forward(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_dec: torch.Tensor,
    acts: torch.Tensor,
    lengths_cpu: torch.Tensor,
    acc_dtype: torch.dtype,
    launch: DenseLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward scan.  Returns ``(norms (B, G), residual after the longest prefix (B, d))``
    in ``acc_dtype`` (float32 or float64).

    ``lengths_cpu``: the strictly increasing prefix lengths, int64 on the host; ``launch``: tiles,
    warps and float32 precision (``None``: ``default_launch``).
    """
    num_rows, d = x.shape
    num_prefixes = lengths_cpu.numel()
    grid, meta = _plan(num_rows, d, acts, W_dec, acc_dtype, launch)
    shares, atomic = _chunk_shares(grid[1], num_rows, num_prefixes, d, acc_dtype, x.device)
    residual = x.new_empty(num_rows, d, dtype=acc_dtype)
    if num_rows > 0 and d > 0:
        x, W_dec, acts = x.contiguous(), W_dec.contiguous(), acts.contiguous()
        table = _position_table(lengths_cpu, W_dec.shape[0], x.device)
        with device_guard(x):
            _dense_scan_forward_kernel[grid](
                x, x if b_dec is None else b_dec.contiguous(), W_dec, acts, table, shares, residual,
                num_rows, d, int(lengths_cpu[-1]), num_prefixes,
                x.stride(0), W_dec.stride(0), acts.stride(0), shares.stride(0),
                HAS_BIAS=b_dec is not None, ATOMIC=atomic, **meta,
            )
    return shares.sum(0), residual


def dense_scan_backward(
    residual: torch.Tensor,
    grad_norms: torch.Tensor,
    W_dec: torch.Tensor,
    acts: torch.Tensor,
    lengths_cpu: torch.Tensor,
    detach: bool = False,
    launch: DenseLaunch | None = None,
    needs_dW: bool = True,
    needs_dacts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward scan.  Returns ``(dx, dacts, dW_dec)`` in the residual's (accumulation) dtype.
    ``detach``: norm ``g`` differentiates only its own level's latents (``DETACH`` on the kernel);
    ``launch``: as the forward's (the backward need not match it).  ``needs_dW`` / ``needs_dacts``
    off: that gradient is skipped and returned as an empty tensor.

    ``dW_dec`` sums over row blocks with atomics into a zeroed buffer, like the sparse scan's.
    """
    num_rows, d = residual.shape
    n = W_dec.shape[0]
    acc_dtype = residual.dtype
    grid, meta = _plan(num_rows, d, acts, W_dec, acc_dtype, launch)
    dx = torch.empty_like(residual)
    if needs_dacts:
        dacts_shares, atomic = _chunk_shares(grid[1], num_rows, n, d, acc_dtype, residual.device)
    else:  # ATOMIC then only picks how the (unwritten) shares would have been summed
        dacts_shares, atomic = dx[None], False
    dW = torch.zeros(W_dec.shape, dtype=acc_dtype, device=W_dec.device) if needs_dW else residual.new_empty(0)
    if num_rows > 0 and d > 0:
        W_dec, acts = W_dec.contiguous(), acts.contiguous()
        table = _position_table(lengths_cpu, n, residual.device)
        dw_arg = dW if needs_dW else dx  # a skipped output's pointer is never read
        with device_guard(residual):
            _dense_scan_backward_kernel[grid](
                residual, grad_norms.to(acc_dtype).contiguous(), W_dec, acts, table, dx, dacts_shares, dw_arg,
                num_rows, d, n, int(lengths_cpu[-1]), lengths_cpu.numel(),
                W_dec.stride(0), acts.stride(0), dw_arg.stride(0), dacts_shares.stride(0),
                DETACH=detach, ATOMIC=atomic, NEEDS_DW=needs_dW, NEEDS_DACTS=needs_dacts, **meta,
            )
    return dx, dacts_shares.sum(0) if needs_dacts else residual.new_empty(0), dW
