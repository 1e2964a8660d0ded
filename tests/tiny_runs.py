"""Tiny deterministic training runs shared by the checkpoint, fault and data-parallel tests: small
enough for a few seconds on one thread, busy enough that every piece of trainer state changes
(sampled prefixes, re-sorting, dead latents and the AuxK loss, the adaptive coefficient)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.train import TrainConfig

D, N, K = 8, 12, 2
_BASIS = torch.randn(N, D, generator=torch.Generator().manual_seed(0))


def sample(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Sparse non-negative codes on a fixed random basis: a pure function of its arguments."""
    return torch.rand(rows, N, generator=generator).pow(4) @ _BASIS


def on_second_chunk(act: Callable[[torch.Tensor], None]):
    """``sample`` that calls ``act(data)`` on the second data chunk it draws (the steps from
    ``data_chunk_steps`` on), after a clean first chunk."""
    draws = []

    def sampler(rows, generator):
        data = sample(rows, generator)
        draws.append(rows)
        if len(draws) == 2:
            act(data)
        return data
    return sampler


def poisoned_sample(row: int, value: float):
    """``sample`` with one bad value in row ``row`` of the second data chunk: training stops there."""
    def poison(data):
        data[row, 0] = value
    return on_second_chunk(poison)


def tiny_sae(activation: str, seed: int = 0) -> SparseAutoencoder:
    k = K if activation in ("topk", "batchtopk") else None
    return SparseAutoencoder(SAEConfig(d=D, n=N, activation=activation, k=k), torch.Generator().manual_seed(seed))


def tiny_config(activation: str, **overrides) -> TrainConfig:
    """16 steps; checkpoints every 5 fall mid data chunk (4) and mid logging window (3)."""
    settings = dict(steps=16, batch_size=16, log_every=3, checkpoint_every=5, data_chunk_steps=4, resort_every=4,
                    dead_after=3, aux_k=2, prefix_mode="sampled", num_sampled=4, sparsity_coeff=1e-2,
                    target_l0=2.0 if activation in ("relu", "jumprelu") else None, progress=False)
    return TrainConfig(**{**settings, **overrides})


def final_state(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """Parameters and buffers (the BatchTopK threshold and row counters included)."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    state["row_stats"] = sae.row_stats().clone()
    return state
