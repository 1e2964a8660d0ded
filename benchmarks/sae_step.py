"""A minimal TopK / BatchTopK SAE training step, self-contained, for the end-to-end benchmark.

    pre  = (x - b_dec) @ W_enc + b_enc
    acts = TopK(ReLU(pre)) per row, or BatchTopK: the B*k largest of ReLU(pre) over the whole batch
    loss = one of the reconstruction losses below;  loss.backward();  Adam step

Variants (issue 5):

* ``vanilla``: one prefix (n), dense decode -- what a plain TopK SAE step pays (SAELens style);
* ``vanilla_sparse``: one prefix, sparse decode (``embedding_bag``) -- the cheapest plain step;
* ``groups_running_sum``: Matryoshka groups [n/16, n/8, n/4, n/2, n] by the running-sum loop;
* ``groups_fused``: the same groups through the package's fused op;
* ``every_fused``: every prefix 1..n through the fused op.

BatchTopK rows keep different numbers of latents: they are padded with index -1 to the longest row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from matryoshka import Prefixes, SparseActs

from .baselines import fused_loss, running_sum_loss, sparse_floor_loss, vanilla_floor_loss

__all__ = ["TopKSAE", "VARIANTS", "groups_for", "variant_prefixes", "make_loss_fn", "make_train_step", "train_step_with"]

VARIANTS = ("vanilla", "vanilla_sparse", "groups_running_sum", "groups_fused", "every_fused")


class TopKSAE(nn.Module):
    def __init__(self, d: int, n: int, k: int, activation: str = "topk", device=None, dtype=torch.float32):
        super().__init__()
        if activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation must be 'topk' or 'batchtopk', got {activation!r}")
        self.k, self.activation = k, activation
        W_dec = torch.randn(n, d, device=device, dtype=torch.float32)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))

    def encode(self, x: torch.Tensor) -> SparseActs:
        pre = ((x - self.b_dec) @ self.W_enc + self.b_enc).relu()
        if self.activation == "topk":
            values, indices = pre.topk(self.k, dim=1)
            return SparseActs(values, indices)
        return batch_topk(pre, self.k)


def batch_topk(pre: torch.Tensor, k: int) -> SparseActs:
    """The ``B * k`` largest entries of the whole batch, as ``SparseActs`` padded with ``-1``."""
    B, n = pre.shape
    values, flat = pre.flatten().topk(B * k, sorted=False)
    order = flat.argsort()  # by row, then by latent
    values, flat = values[order], flat[order]
    rows, cols = flat // n, flat % n
    counts = torch.bincount(rows, minlength=B)
    width = max(1, int(counts.max()))  # one host sync, as in any BatchTopK implementation
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=pre.device) - starts[rows]
    out_values = pre.new_zeros(B, width).index_put((rows, slot), values)
    out_indices = torch.full((B, width), -1, dtype=torch.int64, device=pre.device)
    out_indices[rows, slot] = cols
    return SparseActs(out_values, out_indices)


def groups_for(n: int) -> Prefixes:
    """The issue's Matryoshka groups, scaled: [n/16, n/8, n/4, n/2, n] (= [2304, ..., 36864] at n=36864)."""
    return Prefixes.groups([n // 16, n // 8, n // 4, n // 2, n])


def variant_prefixes(variant: str, n: int) -> Prefixes:
    """The prefixes whose loss ``variant`` computes: what ``matryoshka_loss_reference`` checks it against."""
    if variant in ("vanilla", "vanilla_sparse"):
        return Prefixes([n])
    if variant in ("groups_running_sum", "groups_fused"):
        return groups_for(n)
    if variant == "every_fused":
        return Prefixes.every(n, weights=torch.full((n,), 1.0 / n, dtype=torch.float64))
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def make_loss_fn(variant: str, sae: TopKSAE, fused_backend: str) -> Callable[[torch.Tensor, SparseActs], torch.Tensor]:
    """``loss_fn(x, acts)``: ``variant``'s reconstruction loss with ``sae``'s decoder."""
    prefixes = variant_prefixes(variant, sae.W_dec.shape[0])
    losses = {
        "vanilla": lambda x, a: vanilla_floor_loss(x, a, sae.W_dec, sae.b_dec),
        "vanilla_sparse": lambda x, a: sparse_floor_loss(x, a, sae.W_dec, sae.b_dec),
        "groups_running_sum": lambda x, a: running_sum_loss(x, a, sae.W_dec, sae.b_dec, prefixes),
        "groups_fused": lambda x, a: fused_loss(x, a, sae.W_dec, sae.b_dec, prefixes, backend=fused_backend),
        "every_fused": lambda x, a: fused_loss(x, a, sae.W_dec, sae.b_dec, prefixes, backend=fused_backend),
    }
    return losses[variant]


def make_train_step(variant: str, sae: TopKSAE, fused_backend: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.optim.Optimizer]:
    """``(step, optimizer)``; ``step(x)`` runs encode, ``variant``'s loss, backward and one Adam update."""
    return train_step_with(sae, make_loss_fn(variant, sae, fused_backend))


def train_step_with(sae: TopKSAE, loss_fn: Callable[[torch.Tensor, SparseActs], torch.Tensor]
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.optim.Optimizer]:
    """``(step, optimizer)`` with any ``loss_fn(x, acts)``: encode, loss, backward, one Adam update."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> torch.Tensor:
        acts = sae.encode(x)
        loss = loss_fn(x, acts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, opt
