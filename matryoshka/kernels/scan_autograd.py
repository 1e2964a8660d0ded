"""The autograd wiring every scan op shares.

A scan op maps ``(x, b_dec, W_dec, acts, *layout)`` to ``(*norms, final residual)``; its backward op
maps ``(residual, *grad_norms, W_dec, acts, *layout)`` to ``(dx, dacts, dW_dec)`` in the
accumulation dtype.  ``layout`` (latent indices, levels, or prefix lengths) has no gradient, and
``db_dec = -sum_b dx``.  The final residual is not differentiable (``matryoshka_loss`` returns it
detached, as ``MatryoshkaLossOutput.reconstruction``).
"""

from __future__ import annotations

__all__ = ["register_scan_autograd"]


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
        dx, dacts, dW = backward_op(residual, *grads[:-1], W_dec, acts, *layout)
        db = None if b_dtype is None else (-dx.sum(0)).to(b_dtype)
        return (dx.to(x_dtype), db, dW.to(w_dtype), dacts.to(a_dtype)) + (None,) * len(layout)

    scan_op.register_autograd(backward, setup_context=setup_context)
