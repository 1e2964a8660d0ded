"""Train a Matryoshka SAE on activations from files (``python -m matryoshka train PATH``).

The data come from an :class:`~matryoshka.activation_store.ActivationStore` (memory-mapped,
shuffled by the trainer's data generator, scaled to mean squared norm ``d``; its scale is saved in
``OUT/normalization.json`` and read back on ``--resume``).  Held-out rows at the end of the data are
never trained on: every ``log_every`` steps the fraction of variance they keep unexplained is
computed at prefix lengths 1, 2, 4, ..., n and logged (progress line, ``history.json``, and the
checkpoints' history, so a resumed run keeps its earlier read-outs).

Recipe (defaults; every one is a flag): Adam lr 2e-3, betas (0.9, 0.999), warm-up 5% / cool-down
20%, clip 1.0, no latent re-sorting (the latent order is left to the Matryoshka loss), the decoder
bias started at the data mean (SAELens's ``b_dec_init_method="mean"``), the TopK dead-latent loss
for latents silent for 200 steps; ReLU/JumpReLU adapt their sparsity coefficient to L0 = ``k``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .activation_store import ActivationStore
from .checkpoint import check_writable
from .durable_files import replace_file
from .orthogonality import DEFAULT_CHUNK
from .prefixes import Prefixes
from .sae import SAEConfig, SparseAutoencoder
from .train import TrainConfig, train

__all__ = ["eval_lengths", "heldout_fvu", "train_on_activations"]

def eval_lengths(n: int) -> list[int]:
    """Prefix lengths at which held-out variance is reported: 1, 2, 4, ... and ``n``."""
    return sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})


@torch.no_grad()
def heldout_fvu(sae: SparseAutoencoder, x: torch.Tensor, lengths: list[int], batch: int = 4096) -> list[float]:
    """Fraction of variance unexplained of ``x`` by each prefix length: ``E||x - x_hat_m||^2 /
    E||x - mean x||^2``, the per-prefix errors from the loss op itself, in eval mode."""
    was_training = sae.training
    sae.eval()
    try:
        device = sae.W_dec.device
        prefixes = Prefixes(lengths)
        error = torch.zeros(len(lengths), dtype=torch.float64)
        for part in x.split(batch):
            part = part.to(device)
            error += sae.reconstruction_loss(part, sae(part).acts, prefixes).per_prefix.double().cpu() * part.shape[0]
        total = (x - x.mean(0)).double().pow(2).sum(1).sum()
        return (error / total).tolist()
    finally:
        sae.train(was_training)


def train_on_activations(path: str | Path, out: str | Path, steps: int, kind: str = "topk", n: int | None = None,
                         k: int = 32, mode: str = "every", batch: int = 512, lr: float = 2e-3, seed: int = 0,
                         device: str = "cpu", resume: bool = False, checkpoint_every: int = 500,
                         keep_checkpoints: int = 0, log_every: int = 100, held_out: int = 8192,
                         every_weights: str = "exact", num_sampled: int = 10, dead_after: int = 200,
                         orthogonality_coeff: float = 0.0, orthogonality_chunk: int = DEFAULT_CHUNK,
                         balance_beta: float | None = None, resample_every: int = 0, aux_k: int = 16,
                         progress: bool = True) -> dict:
    """Train one SAE on the activations at ``path``; write the run into ``out`` and return a summary.

    ``out`` receives ``checkpoints/``, ``sae/`` (the final SAE), ``normalization.json`` (the input
    scale), ``history.json`` (metrics per read-out) and ``run.json`` (the settings).
    ``orthogonality_coeff``, ``orthogonality_chunk``: the decoder orthogonality penalty
    (:mod:`matryoshka.orthogonality`; 0: off).  ``balance_beta``: the inner prefixes' scale β of
    ``every`` (``L_n + β Σ_{l<n} ω_l L_l``, ``TrainConfig.balance_beta``; ``None``: today's ``every``).
    ``resample_every``: steps between restarts of latents silent for ``dead_after`` steps
    (:mod:`matryoshka.resampling`; 0: never).  ``aux_k``: dead latents the TopK/BatchTopK dead-latent
    loss decodes per row (``TrainConfig.aux_k``; 0: off).
    """
    out = check_writable(out, "--out")
    norm_file = out / "normalization.json"
    scale = None
    if resume and norm_file.exists():  # the resumed run must see exactly the same scaled data
        scale = json.loads(norm_file.read_text())["scale"]
    store = ActivationStore(path, held_out_rows=held_out, scale=scale)
    d = store.d
    n = n or 8 * d
    if not 1 <= k <= n:
        raise ValueError(f"--k must be in 1..n={n} (active latents for topk/batchtopk, target L0 for relu/jumprelu), "
                         f"got {k}")
    if steps < 1 or batch < 1:
        raise ValueError(f"--steps and --batch must be >= 1, got {steps} and {batch}")
    weights = every_weights
    config = TrainConfig(steps=steps, batch_size=batch, lr=lr, betas=(0.9, 0.999), prefix_mode=mode,
                         num_sampled=num_sampled, resort_every=0, dead_after=dead_after, log_every=log_every,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed,
                         progress=progress, every_weights=weights, orthogonality_coeff=orthogonality_coeff,
                         orthogonality_chunk=orthogonality_chunk, balance_beta=balance_beta,
                         resample_every=resample_every, aux_k=aux_k,
                         # ReLU/JumpReLU: k is the target L0 of the adaptive coefficient, from a weak start.
                         sparsity_coeff=1e-3, target_l0=None if kind in ("topk", "batchtopk") else float(k))
    sae = SparseAutoencoder(SAEConfig(d=d, n=n, activation=kind, k=k if kind in ("topk", "batchtopk") else None),
                            generator=torch.Generator().manual_seed(10_000 + seed)).to(device)
    with torch.no_grad():  # start the decoder bias at the data mean (a resume overwrites it)
        sae.b_dec.copy_(store.sample(store.scale_rows, torch.Generator().manual_seed(seed)).mean(0))
    replace_file(norm_file, json.dumps(store.describe(), indent=1).encode())  # read back by --resume
    heldout = store.held_out(8192) if store.held_out_rows else None
    lengths = eval_lengths(n)
    shown = sorted({lengths[len(lengths) // 3], lengths[2 * len(lengths) // 3], n})  # a few, for the progress line

    def read_out(step: int, model: SparseAutoencoder, logs: dict) -> None:
        # The trainer appends `logs` to its history before this call and checkpoints that history,
        # so what is added here survives a resume.
        if heldout is None:
            return
        fvu = heldout_fvu(model, heldout, lengths)
        logs["heldout_explained_variance"] = [1.0 - v for v in fvu]
        ev = "  ".join(f"m={m}: {1 - fvu[lengths.index(m)]:.3f}" for m in shown)
        tqdm.write(f"step {step}: loss {logs['loss']:.4f}  L0 {logs['l0']:.1f}  dead {logs['dead']}  "
                   f"held-out explained variance {ev}")

    settings = {"path": str(path), "kind": kind, "d": d, "n": n, "k": k, "mode": mode, "every_weights": weights,
                "orthogonality_coeff": orthogonality_coeff, "orthogonality_chunk": orthogonality_chunk,
                "balance_beta": balance_beta, "resample_every": resample_every, "aux_k": aux_k, "steps": steps,
                "batch": batch,
                "lr": lr, "seed": seed, "device": device, "held_out_rows": store.held_out_rows,
                "eval_lengths": lengths, "normalisation": store.describe()}
    replace_file(out / "run.json", json.dumps(settings, indent=1).encode())
    start = time.perf_counter()
    result = train(sae, store.sample, config, callback=read_out, checkpoint_dir=out / "checkpoints", resume=resume)
    seconds = time.perf_counter() - start
    sae.save(out / "sae")
    replace_file(out / "history.json", json.dumps(result.history, indent=1).encode())
    last = result.history[-1]
    return {"settings": settings, "last": last, "seconds": seconds}
