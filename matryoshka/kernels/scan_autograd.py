"""The autograd wiring every scan op shares.

A scan op maps ``(x, b_dec, W_dec, acts, *layout)`` to ``(*norms, final residual)``; its backward op
maps ``(residual, *grad_norms, W_dec, acts, *layout, needs_dW, needs_dacts)`` to
``(dx, dacts, dW_dec)`` in the accumulation dtype.  ``layout`` (latent indices, levels, or prefix
lengths) has no gradient, and ``db_dec = -sum_b dx``.  ``needs_dW`` / ``needs_dacts`` are false
when that input needs no gradient (a frozen decoder, fixed codes): the backward op then skips that
gradient's work and returns an empty tensor in its place.  (``dx`` is always computed: the suffix
sum it is made of feeds the other two.)  The final residual is not differentiable
(``matryoshka_loss`` returns it detached, as ``MatryoshkaLossOutput.reconstruction``).
"""

from __future__ import annotations

import torch

__all__ = ["backward_fake", "register_scan_autograd"]


def backward_fake(residual: torch.Tensor, W_dec: torch.Tensor, acts: torch.Tensor, needs_dW: bool,
                  needs_dacts: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shapes a backward op returns (its ``register_fake``): ``(dx, dacts, dW_dec)``, empty
    where skipped."""
    return (
        torch.empty_like(residual),
        residual.new_empty(acts.shape if needs_dacts else (0,)),
        residual.new_empty(W_dec.shape if needs_dW else (0,)),
    )


def register_scan_autograd(scan_op, backward_op) -> None:
    """Register ``backward_op`` as the gradient of ``scan_op`` (a ``torch.library`` custom op)."""

    def setup_context(ctx, inputs, output):
        x, b_dec, W_dec, acts, *layout = inputs
        ctx.save_for_backward(output[-1], W_dec, acts, *layout)
        ctx.dtypes = (x.dtype, None if b_dec is None else b_dec.dtype, W_dec.dtype, acts.dtype)
        ctx.mark_non_differentiable(output[-1])

    def backward(ctx, *grads):
        residual, W_dec, acts, *layout = ctx.saved_tensors
        x_dtype, b_dtype, w_dtype, a_dtype = ctx.dtypes
        needs_dW, needs_dacts = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dx, dacts, dW = backward_op(residual, *grads[:-1], W_dec, acts, *layout, needs_dW, needs_dacts)
        db = None if b_dtype is None else (-dx.sum(0)).to(b_dtype)
        return (
            dx.to(x_dtype), db, dW.to(w_dtype) if needs_dW else None, dacts.to(a_dtype) if needs_dacts else None,
        ) + (None,) * len(layout)

    scan_op.register_autograd(backward, setup_context=setup_context)
