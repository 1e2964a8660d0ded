"""The decoder orthogonality penalty: each latent's largest squared cosine with another latent.

After OrtSAE (Korznikov et al., 2025, "OrtSAE: Orthogonal Sparse Autoencoders Uncover Atomic
Features"), which penalises high pairwise cosine similarity between decoder rows to fight feature
absorption and composition; this form is written from the paper's description, not its code.
With ``u_i = W_i / ‖W_i‖`` the unit decoder rows:

    P(W) = (1/n) Σ_i max_{j ≠ i, j ∈ C(i)} (u_i · u_j)²

``C(i)``: the chunk holding latent ``i``.  With ``chunk_size >= n`` there is one chunk, every pair
counts and ``P`` is exact and deterministic.  With ``chunk_size < n`` the latents are split at random
into ``⌈n / chunk_size⌉`` chunks of near-equal size (a fresh permutation per call, from
``generator``): the cost is ``n · chunk_size · d`` instead of ``n² · d``, linear in ``n``, and over
many steps every pair meets.  A latent alone in its chunk contributes 0.

The gradient is the max's (sub)gradient: only each latent's closest partner pulls on it.  The
cosine matrix is built without autograd and only the ``n`` chosen pairs are recomputed with it, so
backward stores ``O(n · d)``, never a ``chunk_size²`` matrix per chunk.  The chunks are drawn on the
host (the same chunks on any device) and reach a GPU through pinned memory: no host sync.

Why it targets absorption: an absorbing latent decodes "parent + child" and so keeps a cosine with
the parent's latent (0.71 on Nabeshima's toy, ``1/√(1 + r²)`` for a child ``r`` times the parent's
magnitude), and a hedging parent latent keeps cosines with its children's latents; both are
off-diagonal cosines this penalty pushes towards 0.  It presumes features that *can* be orthogonal:
with more latents than dimensions some overlap is unavoidable (the Welch bound), so keep its
coefficient small there.
"""

from __future__ import annotations

import math

import torch

from .host_copies import to_device
from .validation import is_count, is_finite_number

__all__ = ["orthogonality_penalty", "penalty_at_step", "chunk_partition", "check_settings", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 8192  # latents compared with each other per step by default (TrainConfig, the CLI)


def chunk_partition(n: int, chunk_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """The latents ``0..n-1`` in chunks of at most ``chunk_size``: one chunk (in order) when
    ``chunk_size >= n``, else a random permutation from ``generator`` cut into ``⌈n / chunk_size⌉``
    near-equal parts."""
    if not is_count(chunk_size, 2):
        raise ValueError(f"chunk_size must be an integer >= 2 (pairs need two latents), got {chunk_size!r}")
    if chunk_size >= n:
        return [torch.arange(n)]
    if generator is None:
        raise ValueError(f"generator is needed to split n={n} latents into chunks of chunk_size={chunk_size}")
    return list(torch.randperm(n, generator=generator).tensor_split(math.ceil(n / chunk_size)))


def orthogonality_penalty(W_dec: torch.Tensor, chunk_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``P(W_dec)`` of the module doc: the mean over latents of the largest squared cosine between
    its decoder row and another's in its chunk; a 0-d tensor in ``W_dec``'s dtype, differentiable."""
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be (n, d), got shape {tuple(W_dec.shape)}")
    n = W_dec.shape[0]
    # Zero rows (a fresh or dead latent may have one) have no direction: they count as orthogonal.
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).tiny)
    chunks = chunk_partition(n, chunk_size, generator)
    total = W_dec.new_zeros(())
    for members in chunks:
        if len(members) < 2:
            continue
        rows = unit if len(chunks) == 1 else unit[to_device(members, W_dec.device)]  # one chunk: all, in order
        with torch.no_grad():
            squared = (rows @ rows.T).square_()
            squared.diagonal().fill_(-1.0)  # a latent is not its own partner
            partner = squared.argmax(1)
        total = total + (rows * rows[partner]).sum(1).square().sum()
    return total / max(n, 1)


def penalty_at_step(W_dec: torch.Tensor, chunk_size: int, seed: int, step: int) -> torch.Tensor:
    """:func:`orthogonality_penalty` with the random chunks of training step ``step`` of a run seeded
    by ``seed``: a generator seeded by the two, so that a resumed run and every data-parallel rank
    draw the same chunks with no generator state to keep (none is needed with one chunk)."""
    generator = None
    if chunk_size < W_dec.shape[0]:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    return orthogonality_penalty(W_dec, chunk_size, generator)


def check_settings(coeff, chunk_size, coeff_name: str, chunk_name: str) -> None:
    """A user's penalty weight (finite, >= 0) and chunk size (an integer >= 2), each error naming
    the argument (``coeff_name``, ``chunk_name``) as the caller spells it."""
    if not (is_finite_number(coeff) and coeff >= 0):
        raise ValueError(f"{coeff_name} must be a finite number >= 0, got {coeff!r}")
    if not is_count(chunk_size, 2):
        raise ValueError(f"{chunk_name} must be an integer >= 2, got {chunk_size!r}")
