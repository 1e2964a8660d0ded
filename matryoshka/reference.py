"""The Matryoshka loss by its definition, as a plain loop over prefixes: the oracle for every test.

    L = sum_g w_g * mean_b || x_b - b_dec - sum_{i in prefix g} a_bi W_dec[i] ||^2

Prefix ``g`` holds the latents ``i < m_g`` (``order="index"``), or each row's ``m_g`` largest
activations, ties by latent index (``order="rank"``, sparse activations only).  With
``detach=True`` prefix ``g`` reconstructs from the stop-gradient contributions of the earlier
levels' latents plus its own level's (``m_0 = 0``):

    x_hat_g = b_dec + sum_{i in prefix g-1} sg(a_i W_dec[i]) + sum_{i in prefix g, not g-1} a_i W_dec[i]

With ``rescale_acts_by_decoder_norm=True`` every ``W_dec[i]`` above is the unit row
``W_dec[i] / ||W_dec[i]||`` (SAELens: the activations divided by their decoder row norms).

Slow (one dense decode per prefix, O(G * B * n * d)) and obviously correct.  Computes in float64
when any input is float64, else float32, whatever the input precision.
"""

from __future__ import annotations

import torch

from .precision import autocast_disabled, compute_dtype
from .prefixes import Prefixes
from .sparse_acts import SparseActs

__all__ = ["matryoshka_loss_reference", "reconstruction_reference"]


def _ranks(acts: SparseActs, n: int) -> torch.Tensor:
    """``(B, n)``: each latent's rank among its row's active slots (0 = largest value, ties by
    latent index), counted pair by pair; ``n`` for latents not in the row."""
    values, indices = acts.values.detach(), acts.indices
    active = (indices >= 0) & (indices < n)
    before = (values[:, None, :] > values[:, :, None]) | (
        (values[:, None, :] == values[:, :, None]) & (indices[:, None, :] < indices[:, :, None])
    )  # before[b, j, l]: slot l ranks ahead of slot j
    rank = (before & active[:, None, :]).sum(-1)
    out = torch.full((values.shape[0], n + 1), n, dtype=torch.int64, device=values.device)
    out.scatter_(1, torch.where(active, indices, n), torch.where(active, rank, n))
    return out[:, :n]


def _decoder(W: torch.Tensor, unit_rows: bool) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True) if unit_rows else W


def reconstruction_reference(
    acts: SparseActs | torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    rescale_acts_by_decoder_norm: bool = False,
    compute: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(B, d)``: ``b_dec + sum_i a_i W_dec[i]`` over every latent, in ``compute``, detached (also
    when read under autocast)."""
    with torch.no_grad(), autocast_disabled(W_dec.device.type):
        dense = acts.to_dense(W_dec.shape[0]) if isinstance(acts, SparseActs) else acts
        decoded = dense.to(compute) @ _decoder(W_dec.to(compute), rescale_acts_by_decoder_norm)
        return decoded if b_dec is None else decoded + b_dec.to(compute)


def matryoshka_loss_reference(
    x: torch.Tensor,
    acts: SparseActs | torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    prefixes: Prefixes,
    *,
    order: str = "index",
    detach: bool = False,
    rescale_acts_by_decoder_norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, per_prefix)``: the weighted loss and the ``(G,)`` unweighted prefix losses."""
    n = W_dec.shape[0]
    dense = acts.to_dense(n) if isinstance(acts, SparseActs) else acts
    compute = compute_dtype(x, dense, W_dec, b_dec)
    target = x.to(compute) - (0 if b_dec is None else b_dec.to(compute))
    dense, W = dense.to(compute), _decoder(W_dec.to(compute), rescale_acts_by_decoder_norm)
    if order == "rank":
        rank = _ranks(acts, n)

        def decode(lo: int, hi: int) -> torch.Tensor:  # the latents ranked lo..hi-1 in their row
            return (dense * ((rank >= lo) & (rank < hi)).to(compute)) @ W
    else:

        def decode(lo: int, hi: int) -> torch.Tensor:  # the latents lo..hi-1
            return dense[:, lo:hi] @ W[lo:hi]

    rows = max(x.shape[0], 1)
    per_prefix = []
    previous = 0
    for m in prefixes.lengths.tolist():
        if detach:
            residual = target - decode(0, previous).detach() - decode(previous, m)
        else:
            residual = target - decode(0, m)
        per_prefix.append(residual.pow(2).sum() / rows)
        previous = m
    per_prefix_t = torch.stack(per_prefix)
    loss = (per_prefix_t * prefixes.weights.to(device=x.device, dtype=compute)).sum()
    return loss, per_prefix_t.detach()
