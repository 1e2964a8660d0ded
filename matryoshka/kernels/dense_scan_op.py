"""The dense scan kernels as ``torch.library`` custom ops, so the op composes with autograd and
lives inside ``torch.compile``d training steps without graph breaks in the surrounding code.

Two ops with the same forward: ``matryoshka::dense_scan`` (norm ``g`` differentiates every latent
below ``m_g``) and ``matryoshka::dense_scan_detached`` (only its own level's latents,
``m_{g-1} <= i < m_g``).  The prefix lengths travel as a host (CPU) int64 tensor: the host functions
plan from them without touching the device.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .dense_scan import dense_scan_backward, dense_scan_forward
from .scan_autograd import backward_fake, register_scan_autograd

__all__ = ["dense_prefix_norms_triton", "dense_prefix_norms_detached_triton"]


def _define_dense_scan(name: str, detach: bool):
    """Define and register ``matryoshka::<name>`` and its backward op; return the forward op."""

    @torch.library.custom_op(f"matryoshka::{name}", mutates_args=())
    def scan(
        x: torch.Tensor,
        b_dec: torch.Tensor | None,
        W_dec: torch.Tensor,
        acts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dense_scan_forward(x, b_dec, W_dec, acts, lengths, compute_dtype(x, b_dec, W_dec, acts))

    @scan.register_fake
    def _(x, b_dec, W_dec, acts, lengths):
        acc = compute_dtype(x, b_dec, W_dec, acts)
        return x.new_empty(x.shape[0], lengths.shape[0], dtype=acc), x.new_empty(x.shape, dtype=acc)

    @torch.library.custom_op(f"matryoshka::{name}_backward", mutates_args=())
    def scan_backward(
        residual: torch.Tensor,
        grad_norms: torch.Tensor,
        W_dec: torch.Tensor,
        acts: torch.Tensor,
        lengths: torch.Tensor,
        needs_dW: bool,
        needs_dacts: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return dense_scan_backward(residual, grad_norms, W_dec, acts, lengths, detach,
                                   needs_dW=needs_dW, needs_dacts=needs_dacts)

    @scan_backward.register_fake
    def _(residual, grad_norms, W_dec, acts, lengths, needs_dW, needs_dacts):
        return backward_fake(residual, W_dec, acts, needs_dW, needs_dacts)

    register_scan_autograd(scan, scan_backward)
    return scan


_dense_scan = _define_dense_scan("dense_scan", detach=False)
_dense_scan_detached = _define_dense_scan("dense_scan_detached", detach=True)


def dense_prefix_norms_triton(x, b_dec, W_dec, acts, lengths_cpu: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` squared residual norms after each prefix length, for dense ``(B, n)`` activations,
    by the fused kernels.  ``lengths_cpu``: strictly increasing int64 lengths on the host."""
    norms, _ = _dense_scan(x, b_dec, W_dec, acts, lengths_cpu.to(device="cpu", dtype=torch.int64))
    return norms


def dense_prefix_norms_detached_triton(x, b_dec, W_dec, acts, lengths_cpu: torch.Tensor) -> torch.Tensor:
    """Like :func:`dense_prefix_norms_triton`, with detached levels: norm ``g`` differentiates ``x``,
    ``b_dec`` and only the latents ``m_{g-1} <= i < m_g`` (``m_0 = 0``)."""
    norms, _ = _dense_scan_detached(x, b_dec, W_dec, acts, lengths_cpu.to(device="cpu", dtype=torch.int64))
    return norms
