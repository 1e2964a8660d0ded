"""The Matryoshka loss by its definition, as a plain loop over prefixes: the oracle for every test.

    L = sum_g w_g * mean_b || x_b - b_dec - sum_{i < m_g} a_bi W_dec[i] ||^2

Slow (one dense decode per prefix, O(G * B * n * d)) and obviously correct.  Computes in float64
when any input is float64, else float32, whatever the input precision.
"""

from __future__ import annotations

import torch

from .precision import compute_dtype
from .prefixes import Prefixes
from .sparse_acts import SparseActs

__all__ = ["matryoshka_loss_reference"]


def matryoshka_loss_reference(
    x: torch.Tensor,
    acts: SparseActs | torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    prefixes: Prefixes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, per_prefix)``: the weighted loss and the ``(G,)`` unweighted prefix losses."""
    n = W_dec.shape[0]
    dense = acts.to_dense(n) if isinstance(acts, SparseActs) else acts
    compute = compute_dtype(x, dense, W_dec, b_dec)
    target = x.to(compute) - (0 if b_dec is None else b_dec.to(compute))
    dense, W = dense.to(compute), W_dec.to(compute)
    rows = max(x.shape[0], 1)
    per_prefix = []
    for m in prefixes.lengths.tolist():
        residual = target - dense[:, :m] @ W[:m]
        per_prefix.append(residual.pow(2).sum() / rows)
    per_prefix_t = torch.stack(per_prefix)
    loss = (per_prefix_t * prefixes.weights.to(device=x.device, dtype=compute)).sum()
    return loss, per_prefix_t.detach()
