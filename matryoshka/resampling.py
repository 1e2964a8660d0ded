"""Dead-latent resampling: a latent that has stopped firing restarts on what the SAE misses.

Why the dead-latent loss is not enough.  A latent whose pre-activation is negative on every input
gets no gradient from the reconstruction, from an L1/L0 penalty, or from the TopK dead-latent loss
(:meth:`SparseAutoencoder.auxk_loss`, Gao et al. 2024), which reconstructs the residual from the
``k_aux`` largest *ReLU'd* pre-activations of dead latents: zero values, zero gradient.  Such a
latent stays dead for good, and on the toys every dead latent we traced is of that kind (negative
on all 20 000 evaluation inputs): under BatchTopK with the orthogonality penalty, decoders at
|cos| 0.6-0.8 with a child no other latent learned, often with the minus sign; without it, mixtures
(|cos| 0.4-0.7 with their nearest feature); under ReLU, a duplicate of a feature another latent
holds.  Feeding the loss the raw pre-activations instead
(as SAELens does) did not revive them in our toy runs either: a negative value times a decoder
pointing at minus the residual reconstructs the residual as well, and the latent still never fires.

The remedy, after the neuron resampling of Bricken et al. 2023 ("Towards Monosemanticity"; they
draw inputs with probability proportional to their squared loss and scale the encoder by 0.2; here
the largest residuals are taken in order, deterministically, at full scale): give each dead latent
the direction of one of the batch's worst-reconstructed inputs.  For dead latent
``l`` and residual row ``e = x - x_hat`` (unit ``u = e / |e|``)::

    W_dec[l] = u,    W_enc[:, l] = s * u,    b_enc[l] = 0    (JumpReLU: threshold back to its start)

``s`` is the mean encoder norm of the live latents, so that the latent fires on inputs like the
one it was drawn from about as strongly as a live latent fires on its own.  The ``i``-th dead latent
(in latent order) takes the ``i``-th largest ``|e|``; when there are more dead latents than rows with
a nonzero error, the rest wait for the next resampling.  Adam's moments of the resampled latents are
zeroed: the old moments belong to a different direction.  Everything is masked tensor work, no host
sync, so the trainer can call it on any device.
"""

from __future__ import annotations

import math

import torch

from .sae import SparseAutoencoder

__all__ = ["resample_dead_latents_"]


@torch.no_grad()
def resample_dead_latents_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None, dead: torch.Tensor,
                           errors: torch.Tensor) -> torch.Tensor:
    """Restart the ``dead`` latents (a ``(n,)`` bool mask) on the rows of ``errors`` (``(B, d)``,
    the residuals ``x - x_hat`` of a batch) with the largest norms, in place, as the module doc says.

    Returns the ``(n,)`` bool mask of the latents actually resampled (dead ones beyond the rows with
    a nonzero error are left as they are).  ``optimizer``: whose per-parameter moments of those
    latents are zeroed (``None``: no optimizer state to touch)."""
    n, d = sae.config.n, sae.config.d
    if dead.shape != (n,) or dead.dtype != torch.bool:
        raise ValueError(f"dead must be a ({n},) bool mask of latents, got {tuple(dead.shape)} {dead.dtype}")
    if errors.dim() != 2 or errors.shape[1] != d or errors.shape[0] < 1:
        raise ValueError(f"errors must be a (B, {d}) batch of residuals with B >= 1, got {tuple(errors.shape)}")
    W_enc, W_dec, b_enc = sae.W_enc, sae.W_dec, sae.b_enc
    errors = errors.to(W_dec.dtype)
    candidates = min(n, errors.shape[0])
    norms, rows = errors.norm(dim=1).topk(candidates)  # largest residuals first
    rank = dead.long().cumsum(0)  # the i-th dead latent (rank i) takes the i-th row
    order = (rank - 1).clamp(0, candidates - 1)
    norm = norms[order]
    taken = dead & (rank <= candidates) & (norm > 0)
    unit = errors[rows[order]] / norm.clamp(min=torch.finfo(W_dec.dtype).tiny).unsqueeze(1)  # (n, d)
    live = ~dead
    live_norm = (W_enc.norm(dim=0) * live).sum() / live.sum().clamp(min=1)
    scale = torch.where(live.any(), live_norm, torch.ones_like(live_norm))  # nothing alive: unit encoder rows

    W_dec.copy_(torch.where(taken.unsqueeze(1), unit, W_dec))
    W_enc.copy_(torch.where(taken.unsqueeze(0), (scale * unit).T, W_enc))
    b_enc.copy_(torch.where(taken, torch.zeros_like(b_enc), b_enc))
    if sae.config.activation == "jumprelu":
        start = torch.full_like(sae.log_threshold, math.log(sae.config.jumprelu_init_threshold))
        sae.log_threshold.copy_(torch.where(taken, start, sae.log_threshold))
    if optimizer is not None:
        for moment, dim in sae.latent_moments(optimizer):
            shape = [1] * moment.dim()
            shape[dim] = n
            moment.copy_(torch.where(taken.view(shape), torch.zeros_like(moment), moment))
    return taken
