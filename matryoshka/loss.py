"""``matryoshka_loss``: the all-prefix Matryoshka reconstruction loss as one PyTorch op.

    L = sum_g w_g * mean_b || x_b - b_dec - sum_{i < m_g} a_bi W_dec[i] ||^2

Layering: validation -> backend choice -> a *scan* that returns squared residual norms (the only
part that touches ``d``) -> prefix bookkeeping on those norms (``scan_layout``).  For sparse
activations the scan yields ``k + 1`` norms per row whatever the number of prefixes; for dense ones
it yields one norm per prefix.  Rank-order prefixes only re-sort the slots; detached levels only
change which weights reach the slots' gradients (a second output of the scan with a level-local
backward): neither changes the forward.  Gradients reach ``x``, the activation values, ``W_dec`` and
``b_dec`` through the scan's own backward.

Around the scan: mixed float dtypes are promoted to one (``precision.promote``), autocast is off
(the scans accumulate in float32 or float64 whatever autocast would pick), decoder-norm rescaling
multiplies the activation values by ``1 / ||W_dec[i]||`` before the scan (autograd carries its
gradient to ``W_dec``), and the reconstruction is ``x`` minus the scan's final residual.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .precision import autocast_disabled, compute_dtype, promote
from .prefixes import Prefixes
from .reference import matryoshka_loss_reference, reconstruction_reference
from .scan_layout import (
    SortedActs,
    fold_level_weights,
    fold_prefix_weights,
    prefix_positions,
    unfold_prefix_losses,
)
from .sparse_acts import SparseActs
from .torch_scan import (
    dense_prefix_norms_detached_torch,
    dense_prefix_norms_torch,
    sparse_scan_detached_torch,
    sparse_scan_torch,
)
from .validation import check_inputs, check_sparse_indices

__all__ = ["MatryoshkaLossOutput", "matryoshka_loss", "MatryoshkaLoss", "resolve_backend"]


@dataclass(frozen=True)
class MatryoshkaLossOutput:
    """``loss``: scalar with grad, in the compute dtype (float32, or float64 when an input is float64).
    ``per_prefix``: ``(G,)`` detached unweighted batch-mean loss of each prefix, for logging.
    ``reconstruction``: ``(B, d)`` detached ``b_dec + sum_i a_i W_dec[i]`` over *every* active latent
    (not only the prefixes'), in the compute dtype, computed when read: for ``SparseActs`` ``x``
    minus the scan's final residual (no second decode), for dense ``acts`` one decode GEMM."""

    loss: torch.Tensor
    per_prefix: torch.Tensor
    _reconstruct: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    @property
    def reconstruction(self) -> torch.Tensor:
        return self._reconstruct()


# Looked up once, at import: the answer cannot change while the process runs, and torch.compile
# refuses to trace importlib.util.find_spec (Dynamo in torch 2.11, the H200 image's, raises
# "Attempted to call function marked as skipped" under fullgraph=True).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(backend: str, device: torch.device, *, dense: bool) -> str:
    """The backend to run: ``backend`` itself, checked, unless it is ``"auto"``.

    ``"auto"`` picks the fused Triton kernel only for sparse (``SparseActs``) activations on CUDA
    tensors.  Dense activations go to the PyTorch scan (``dense_prefix_norms_torch``, built on
    cuBLAS GEMMs) on every device until the dense Triton kernel is measured faster than it on a
    GPU; ``backend="triton"`` still runs the dense kernel.  Off CUDA ``"auto"`` is always the
    PyTorch scan.
    """
    if backend == "auto":
        return "triton" if device.type == "cuda" and not dense and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package; install it or use backend='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before the first call, or use backend='torch'"
            )
    return backend


def _sparse_scan(backend: str, detach: bool):
    if backend == "triton":
        from .kernels.sparse_scan_op import sparse_scan_detached_triton, sparse_scan_triton

        return sparse_scan_detached_triton if detach else sparse_scan_triton
    return sparse_scan_detached_torch if detach else sparse_scan_torch


def _dense_prefix_norms(backend: str, detach: bool):
    if backend == "triton":
        from .kernels.dense_scan_op import dense_prefix_norms_detached_triton, dense_prefix_norms_triton

        return dense_prefix_norms_detached_triton if detach else dense_prefix_norms_triton
    return dense_prefix_norms_detached_torch if detach else dense_prefix_norms_torch


def matryoshka_loss(
    x: torch.Tensor,
    acts: SparseActs | torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    prefixes: Prefixes,
    backend: str = "auto",
    validate: bool = True,
    *,
    order: str = "index",
    detach: bool = False,
    rescale_acts_by_decoder_norm: bool = False,
) -> MatryoshkaLossOutput:
    """Weighted sum of the reconstruction losses of every prefix in ``prefixes``, in one pass.

    Args:
        x: ``(B, d)`` inputs to reconstruct.
        acts: ``SparseActs`` with ``(B, k)`` values and int64 indices (``-1`` = padding; rows may
            hold different numbers of latents, as from :meth:`SparseActs.from_dense` with
            ``k=None``: the scan's cost follows the mean count), or a dense ``(B, n)`` tensor.
        W_dec: ``(n, d)`` decoder; row ``i`` is latent ``i``'s direction.
        b_dec: ``(d,)`` decoder bias, or ``None``.
        prefixes: the prefix lengths (``<= n``) and weights.
        backend: ``"auto"`` (Triton for ``SparseActs`` on CUDA; PyTorch for dense ``acts`` and
            off CUDA, see :func:`resolve_backend`), ``"triton"``, ``"torch"`` or ``"reference"``
            (the plain loop over prefixes).
        validate: check sparse indices for range and duplicates (one host sync).  With ``False``
            an out-of-range index is ignored like padding and a duplicate counts twice.
        order: ``"index"``: prefix length ``m`` is the latents ``i < m``.  ``"rank"`` (``SparseActs``
            only): it is each row's ``m`` largest activations, ties by latent index, padding last,
            so lengths must be ``<= k`` (flex-sae's HierarchicalTopK).
        detach: detached levels.  With ``m_0 = 0``, prefix ``g`` reconstructs from stop-gradient
            contributions of the latents of prefix ``g - 1`` plus live ones of its own level
            (prefix ``g`` minus prefix ``g - 1``): a latent's value and decoder row learn only from
            the prefix that adds it; ``x`` and ``b_dec`` from every prefix.  The loss value is
            unchanged.
        rescale_acts_by_decoder_norm: decode with unit rows: ``a_i W_dec[i] / ||W_dec[i]||``
            (SAELens's option of that name), differentiable through the norms.  Rank order still
            ranks the activations as given.

    Dtypes: the loss accumulates in float32, or float64 when any input is float64 (torch's
    promotion, at least float32), also under ``torch.autocast``; gradients come back in each
    input's dtype.

    Returns:
        ``MatryoshkaLossOutput(loss, per_prefix, reconstruction)``.

    Example:
        >>> import torch
        >>> from matryoshka import Prefixes, SparseActs, matryoshka_loss
        >>> x, W = torch.randn(8, 16), torch.randn(32, 16)
        >>> acts = SparseActs(torch.rand(8, 4), (torch.randint(0, 32, (8, 1)) + torch.arange(4) * 8) % 32)
        >>> out = matryoshka_loss(x, acts, W, None, Prefixes.every(32))
        >>> out.per_prefix.shape, out.reconstruction.shape
        (torch.Size([32]), torch.Size([8, 16]))
    """
    check_inputs(x, acts, W_dec, b_dec, prefixes, backend, order, detach, rescale_acts_by_decoder_norm)
    sparse = isinstance(acts, SparseActs)
    backend = resolve_backend(backend, x.device, dense=not sparse)
    with autocast_disabled(x.device.type):
        x, values, W_dec, b_dec = promote(x, acts.values if sparse else acts, W_dec, b_dec)
        acts = SparseActs(values, acts.indices) if sparse else values
        if sparse:
            sorted_acts = SortedActs(acts, W_dec.shape[0])
            if validate:
                check_sparse_indices(sorted_acts.indices, W_dec.shape[0])
        if backend == "reference":
            return _reference_loss(x, acts, W_dec, b_dec, prefixes, order, detach, rescale_acts_by_decoder_norm)
        if sparse:
            return _sparse_loss(x, sorted_acts, W_dec, b_dec, prefixes, backend, order, detach,
                                rescale_acts_by_decoder_norm)
        return _dense_loss(x, acts, W_dec, b_dec, prefixes, backend, detach, rescale_acts_by_decoder_norm)


def _inverse_row_norms(W_dec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return 1 / W_dec.to(dtype).norm(dim=1)


def _reference_loss(x, acts, W_dec, b_dec, prefixes, order, detach, rescale) -> MatryoshkaLossOutput:
    loss, per_prefix = matryoshka_loss_reference(
        x, acts, W_dec, b_dec, prefixes, order=order, detach=detach, rescale_acts_by_decoder_norm=rescale
    )
    reconstruct = functools.partial(reconstruction_reference, acts, W_dec, b_dec, rescale, loss.dtype)
    return MatryoshkaLossOutput(loss, per_prefix, reconstruct)


def _sparse_loss(x, sorted_acts, W_dec, b_dec, prefixes, backend, order, detach, rescale) -> MatryoshkaLossOutput:
    rows = max(x.shape[0], 1)
    if order == "rank":
        sorted_acts = sorted_acts.ranked(W_dec.shape[0])
    if rescale:
        sorted_acts = sorted_acts.scaled(_inverse_row_norms(W_dec, compute_dtype(x, sorted_acts.values, W_dec, b_dec)))
    scan = _sparse_scan(backend, detach)
    positions = prefix_positions(sorted_acts, prefixes)
    if detach:
        norms, level_norms, final = scan(
            x, b_dec, W_dec, sorted_acts.values, sorted_acts.indices, positions[:, 1:-1]
        )
        own = fold_level_weights(positions, prefixes, norms.dtype)
        rest = fold_prefix_weights(positions, prefixes, norms.dtype) - own
        loss = (rest * norms + own * level_norms).sum() / rows
    else:
        norms, final = scan(x, b_dec, W_dec, sorted_acts.values, sorted_acts.indices)
        loss = (fold_prefix_weights(positions, prefixes, norms.dtype) * norms).sum() / rows
    per_prefix = unfold_prefix_losses(norms, positions, len(prefixes)).to(norms.dtype)
    # x - r_k = b_dec + the decode of every active latent: the scan's own final residual, no second decode
    return MatryoshkaLossOutput(loss, per_prefix, lambda: x.detach().to(final.dtype) - final)


def _dense_loss(x, acts, W_dec, b_dec, prefixes, backend, detach, rescale) -> MatryoshkaLossOutput:
    rows = max(x.shape[0], 1)
    if rescale:
        acts = acts * _inverse_row_norms(W_dec, compute_dtype(x, acts, W_dec, b_dec))
    _, weights, _ = prefixes.on(x.device)
    # The PyTorch scans plan their blocks from host ints; the Triton op takes the lengths as a tensor.
    lengths = prefixes.lengths if backend == "triton" else prefixes.host_lengths
    norms = _dense_prefix_norms(backend, detach)(x, b_dec, W_dec, acts, lengths)
    loss = (norms * weights.to(norms.dtype)).sum() / rows
    reconstruct = functools.partial(reconstruction_reference, acts, W_dec, b_dec, False, norms.dtype)
    return MatryoshkaLossOutput(loss, norms.detach().sum(0) / rows, reconstruct)


class MatryoshkaLoss(nn.Module):
    """Module form of :func:`matryoshka_loss` with fixed prefixes and backend (``"auto"``: Triton
    for ``SparseActs`` on CUDA, the PyTorch scan for dense activations and off CUDA).

    >>> loss_fn = MatryoshkaLoss(Prefixes.groups([64, 192, 512]))
    >>> out = loss_fn(x, acts, sae.W_dec, sae.b_dec)    # doctest: +SKIP
    """

    def __init__(self, prefixes: Prefixes, backend: str = "auto", validate: bool = True, *,
                 order: str = "index", detach: bool = False, rescale_acts_by_decoder_norm: bool = False) -> None:
        super().__init__()
        if not isinstance(prefixes, Prefixes):
            raise TypeError(f"`prefixes` must be a matryoshka.Prefixes, got {type(prefixes).__name__}")
        self.prefixes = prefixes
        self.backend = backend
        self.validate = validate
        self.order = order
        self.detach = detach
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm

    def forward(
        self,
        x: torch.Tensor,
        acts: SparseActs | torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor | None = None,
    ) -> MatryoshkaLossOutput:
        return matryoshka_loss(x, acts, W_dec, b_dec, self.prefixes, self.backend, self.validate,
                               order=self.order, detach=self.detach,
                               rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)

    def extra_repr(self) -> str:
        return (f"prefixes={self.prefixes!r}, backend={self.backend!r}, order={self.order!r}, detach={self.detach}, "
                f"rescale_acts_by_decoder_norm={self.rescale_acts_by_decoder_norm}")
