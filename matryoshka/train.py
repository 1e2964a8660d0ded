"""Train a :class:`~matryoshka.sae.SparseAutoencoder` with the Matryoshka loss.

One step: encode a batch, ``matryoshka_loss`` over this step's prefixes, plus the sparsity penalty
(ReLU: L1, JumpReLU: L0) times an optionally adaptive coefficient, plus the dead-latent loss for
TopK kinds; then gradient clipping, Adam with a warm-up / constant / cool-down learning rate, and the
unit-norm decoder constraint.  Prefix modes (``TrainConfig.prefix_mode``):

* ``vanilla``: one prefix, all ``n`` latents (an ordinary SAE).
* ``groups``: fixed cumulative widths, equal weights (Bussmann et al.).
* ``sampled``: a fresh ``Prefixes.sample(n, num_sampled)`` every step (Nabeshima's recipe).
* ``every``: all ``n`` prefixes every step, prefix ``l`` weighted by its *inclusion probability*
  under ``sampled`` divided by ``num_sampled``; so ``every`` is exactly the expectation of the
  ``sampled`` loss, without the sampling noise (see :func:`sampled_inclusion_probabilities`).

Every random draw (data, prefixes, initialisation) comes from seeded generators: a run is
deterministic on the CPU.  Metrics are read back every ``log_every`` steps only, so the step loop
does no per-step host work beyond Python itself.  For toy-sized models on the CPU, call
``torch.set_num_threads(1)`` first: thread hand-offs cost more than the maths (several times more on
a busy machine); the studies do this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import quad_vec
from tqdm.auto import tqdm

from .prefixes import Prefixes
from .sae import SparseAutoencoder
from .sparse_acts import SparseActs

__all__ = [
    "PREFIX_MODES",
    "TrainConfig",
    "TrainResult",
    "default_group_widths",
    "sampled_inclusion_probabilities",
    "every_prefix_weights",
    "PrefixSchedule",
    "lr_factor",
    "train",
]

PREFIX_MODES = ("vanilla", "groups", "sampled", "every")

Callback = Callable[[int, SparseAutoencoder, dict], None]


# ----------------------------------------------------------------------------------- prefix modes
def default_group_widths(n: int, num_groups: int = 4) -> list[int]:
    """Cumulative widths that double up to ``n``, e.g. ``[3, 5, 10, 20]`` for ``n = 20``."""
    return sorted({max(1, math.ceil(n / 2 ** (num_groups - 1 - g))) for g in range(num_groups)})


@lru_cache(maxsize=None)
def _inclusion_cached(n: int, num: int) -> tuple[float, ...]:
    rates = Prefixes.sampling_probabilities(n)[:-1].numpy()  # lengths 1..n-1
    m, draws = rates.size, num - 1
    not_self = 1.0 - np.eye(m)

    def integrand(t: float) -> np.ndarray:
        rung = -np.expm1(-rates * t)  # P(clock j has rung by time t)
        # count[i, c] = P(exactly c clocks other than i have rung), for c < draws (more is dropped)
        count = np.zeros((m, draws))
        count[:, 0] = 1.0
        for j in range(m):
            p = rung[j] * not_self[:, j : j + 1]
            count = count * (1 - p) + np.pad(count[:, :-1], ((0, 0), (1, 0))) * p
        return rates * np.exp(-rates * t) * count.sum(1)

    inside, _ = quad_vec(integrand, 0.0, np.inf, epsabs=1e-13, epsrel=1e-11)
    return tuple(inside.tolist()) + (1.0,)


def sampled_inclusion_probabilities(n: int, num: int) -> torch.Tensor:
    """``P(length l is drawn)`` for ``l = 1..n`` under ``Prefixes.sample(n, num)``; float64, exact.

    ``Prefixes.sample`` draws ``num - 1`` lengths from ``1..n-1`` without replacement in proportion
    to ``P(l)`` (``torch.multinomial``, i.e. successive sampling) and always adds ``n``.  Successive
    sampling equals taking the first ``num - 1`` of independent exponential clocks with rates
    ``P(l)``, so length ``i`` is drawn iff fewer than ``num - 1`` other clocks ring before its own:

        pi_i = integral_0^inf  P_i e^{-P_i t} * P(#{j != i : T_j < t} < num - 1) dt

    The count is Poisson-binomial (a small dynamic programme) and the integral is computed by
    adaptive quadrature (``scipy.integrate.quad_vec``) to ~1e-11: exact for all practical purposes,
    no Monte Carlo.  The probabilities sum to ``num``.  Cost O(n^2 * num) per quadrature node:
    instant for the toy sizes here; for thousands of latents prefer the fixed group modes.
    """
    n, num = int(n), int(num)
    if not 1 <= num <= n:
        raise ValueError(f"num must be in [1, n={n}], got {num}")
    if num == 1:
        return torch.cat([torch.zeros(n - 1, dtype=torch.float64, device="cpu"),
                          torch.ones(1, dtype=torch.float64, device="cpu")])
    return torch.tensor(_inclusion_cached(n, num), dtype=torch.float64, device="cpu")


def every_prefix_weights(n: int, num: int) -> torch.Tensor:
    """Weights of all ``n`` prefixes whose loss is the expectation of ``Prefixes.sample(n, num)``'s.

    A sampled set gives each drawn length weight ``1 / num``, so ``E[loss] = sum_l pi_l / num * L_l``.
    """
    return sampled_inclusion_probabilities(n, num) / num


class PrefixSchedule:
    """The prefixes of each training step for one prefix mode (see module doc).

    ``objective``: the fixed prefix set whose loss the mode optimises (in expectation for ``sampled``).
    """

    def __init__(self, mode: str, n: int, num_sampled: int = 10, group_widths: list[int] | None = None,
                 generator: torch.Generator | None = None) -> None:
        if mode not in PREFIX_MODES:
            raise ValueError(f"prefix mode must be one of {PREFIX_MODES}, got {mode!r}")
        self.mode, self.n, self.generator = mode, n, generator
        self.num_sampled = min(num_sampled, n)
        if mode == "vanilla":
            self.objective = Prefixes([n])
        elif mode == "groups":
            widths = group_widths or default_group_widths(n)
            self.objective = Prefixes.groups(widths, [1.0 / len(widths)] * len(widths))
        else:  # sampled and every share the same expected objective
            self.objective = Prefixes.every(n, every_prefix_weights(n, self.num_sampled))

    def __call__(self) -> Prefixes:
        if self.mode == "sampled":
            return Prefixes.sample(self.n, self.num_sampled, generator=self.generator)
        return self.objective


# ----------------------------------------------------------------------------------- the trainer
@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.  The defaults follow Nabeshima's toy recipe (Adam lr 3e-2,
    betas (0.5, 0.9375), clip 1.0, batch 200, 10 sampled prefixes, re-sorting); set ``target_l0``
    for its adaptive L1, ideally with a small start ``sparsity_coeff`` (a large one kills ReLU
    latents before the coefficient settles, and dead ReLU latents never recover).

    ``sparsity_coeff``: the L1 (ReLU) / L0 (JumpReLU) coefficient, or its start value when
    ``target_l0`` is set: it is then multiplied by ``exp(adapt_rate * (L0 - target) / target)``
    each step.  ``resort_every``: every that many steps reorder latents by an EMA (``resort_ema``)
    of their mean squared decoder-scaled activation, largest first (0: never).  ``dead_after``,
    ``aux_k``, ``aux_coeff``: the TopK dead-latent loss.  ``log_every``: steps between metric
    read-outs (and callback calls); ``checkpoint_every``: steps between saves (0: never).
    """

    steps: int = 40_000
    batch_size: int = 200
    lr: float = 3e-2
    betas: tuple[float, float] = (0.5, 0.9375)
    warmup_frac: float = 0.05
    cooldown_frac: float = 0.2
    clip_norm: float | None = 1.0
    prefix_mode: str = "sampled"
    num_sampled: int = 10
    group_widths: list[int] | None = None
    sparsity_coeff: float = 0.1
    target_l0: float | None = None
    adapt_rate: float = 0.01
    resort_every: int = 100
    resort_ema: float = 0.99
    dead_after: int = 1000
    aux_k: int = 16
    aux_coeff: float = 1.0 / 32
    log_every: int = 100
    checkpoint_every: int = 0
    seed: int = 0
    progress: bool = True
    data_chunk_steps: int = 100


@dataclass
class TrainResult:
    """``history``: one dict of window-averaged metrics per ``log_every`` steps (also passed to the
    callback).  ``objective``: the fixed prefix set the run optimised (see :class:`PrefixSchedule`)."""

    history: list[dict] = field(default_factory=list)
    objective: Prefixes | None = None


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0, constant, then linear cool-down to 0 over the last ``cooldown_frac``."""
    warm = max(1, round(config.warmup_frac * config.steps))
    cool = max(1, round(config.cooldown_frac * config.steps))
    return min(1.0, (step + 1) / warm, (config.steps - step) / cool)


class _LatentStats:
    """Per-latent running statistics kept as tensors on the SAE's device (no host sync): firing
    recency and the EMA of the mean squared decoder-scaled activation used for re-sorting."""

    def __init__(self, n: int, decay: float, device: torch.device | str = "cpu") -> None:
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)
        self.energy = torch.zeros(n, device=device)
        self.decay = decay

    @torch.no_grad()
    def update(self, acts: SparseActs | torch.Tensor, W_dec: torch.Tensor) -> None:
        """Fold in one batch of activations: ``SparseActs`` (read slot by slot, never densified) or
        a dense ``(B, n)`` tensor."""
        n = self.energy.shape[0]
        rows = max(acts.values.shape[0] if isinstance(acts, SparseActs) else acts.shape[0], 1)
        if isinstance(acts, SparseActs):
            fired = acts.per_latent_sum(acts.active().to(self.energy.dtype), n) > 0
            square_sum = acts.per_latent_sum(acts.values.detach().to(self.energy.dtype).pow(2), n)
        else:
            fired = (acts > 0).any(0)
            square_sum = acts.detach().to(self.energy.dtype).pow(2).sum(0)
        self.since_fired = torch.where(fired, 0, self.since_fired + 1)
        energy = square_sum * W_dec.detach().to(self.energy.dtype).pow(2).sum(1) / rows
        self.energy.mul_(self.decay).add_(energy, alpha=1 - self.decay)

    def permute(self, perm: torch.Tensor) -> None:
        self.since_fired = self.since_fired[perm]
        self.energy = self.energy[perm]


def _mean_l0(acts: SparseActs | torch.Tensor) -> torch.Tensor:
    """Batch mean of the number of positive activations per row (sparse: counted slot by slot)."""
    fired = acts.active() if isinstance(acts, SparseActs) else acts > 0
    return fired.sum(1).float().mean()


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host batch to ``device``; to a GPU through pinned memory without blocking the host."""
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


@torch.no_grad()
def _resort(sae: SparseAutoencoder, optimizer: torch.optim.Adam, stats: _LatentStats) -> None:
    """Order latents by decreasing activation energy, permuting Adam's moments alongside."""
    perm = torch.argsort(stats.energy, descending=True, stable=True)
    sae.permute_latents_(perm)
    for param, dim in sae.latent_dims():
        for moment in optimizer.state.get(param, {}).values():
            if moment.dim() > 0:  # skip the scalar step counter
                moment.copy_(moment.index_select(dim, perm))
    stats.permute(perm)


@torch.no_grad()
def _read_out(done: int, result: TrainResult, window: torch.Tensor, log_coeff: torch.Tensor,
              stats: _LatentStats, sae: SparseAutoencoder, config: TrainConfig) -> dict:
    """The window-averaged metrics of one logging interval, read back in one host sync."""
    count = done - (result.history[-1]["step"] if result.history else 0)
    dead = (stats.since_fired >= config.dead_after).sum()
    row_stats = sae.row_stats() if sae.config.activation == "batchtopk" else dead.new_zeros(2)
    values = torch.cat([window.double() / count, log_coeff.exp().double().view(1),
                        dead.double().view(1), row_stats.double()]).tolist()
    loss, recon, l0, aux, coeff, dead_count, widest, dropped = values
    logs = {"step": done, "loss": loss, "recon": recon, "l0": l0, "aux": aux, "sparsity_coeff": coeff,
            "dead": int(dead_count)}
    if sae.config.activation == "batchtopk":
        logs["batchtopk_dropped"] = int(dropped)
        sae.update_row_width(int(widest))
    return logs


def train(
    sae: SparseAutoencoder,
    sample: Callable[[int, torch.Generator], torch.Tensor],
    config: TrainConfig,
    callback: Callback | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``sae`` in place on batches from ``sample(num_rows, generator) -> (num_rows, d)``.

    The SAE's default prefixes are set to the mode's objective, so ``sae.reconstruction_loss`` and a
    saved checkpoint afterwards refer to the objective that was trained.
    """
    n = sae.config.n
    device = sae.W_dec.device
    # Random draws stay on the host (CPU generators): a run draws the same data and prefixes on
    # any device, and the batches move over without blocking.
    data_gen = torch.Generator().manual_seed(config.seed)
    schedule = PrefixSchedule(config.prefix_mode, n, config.num_sampled, config.group_widths,
                              torch.Generator().manual_seed(config.seed + 1))
    sae.prefixes = schedule.objective
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=config.betas)
    stats = _LatentStats(n, config.resort_ema, device)
    penalised = sae.config.activation in ("relu", "jumprelu")
    sparse_kind = sae.config.activation in ("topk", "batchtopk")
    batchtopk = sae.config.activation == "batchtopk"
    log_coeff = torch.tensor(math.log(config.sparsity_coeff), device=device)
    window = torch.zeros(4, device=device)  # sums since the last read-out: loss, reconstruction, L0, aux
    no_aux = torch.zeros((), device=device)
    result = TrainResult(objective=schedule.objective)
    chunk = None
    bar = tqdm(range(config.steps), disable=not config.progress, mininterval=1.0,
               desc=f"{config.prefix_mode} seed {config.seed}", leave=False)
    for step in bar:
        if step % config.data_chunk_steps == 0:  # draw data in chunks: fewer small tensor ops
            rows = config.data_chunk_steps * config.batch_size
            chunk = _to_device(sample(rows, data_gen), device).view(config.data_chunk_steps, config.batch_size, -1)
        x = chunk[step % config.data_chunk_steps]

        out = sae(x)
        recon = sae.reconstruction_loss(x, out.acts, schedule()).loss
        loss = recon
        if penalised:
            loss = loss + log_coeff.exp() * sae.sparsity_penalty(out)
        aux = no_aux
        if sparse_kind:
            aux = sae.auxk_loss(x, out, stats.since_fired >= config.dead_after, config.aux_k)
            loss = loss + config.aux_coeff * aux

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad_()
        if config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), config.clip_norm)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        optimizer.step()
        sae.normalize_decoder_()

        with torch.no_grad():
            l0 = _mean_l0(out.acts)
            if penalised and config.target_l0:
                # Relative L0 error, clipped so that an early L0 far above target (dense start)
                # cannot blow the coefficient up within a few steps and kill latents for good.
                error = ((l0 - config.target_l0) / config.target_l0).clamp(-1.0, 1.0)
                log_coeff += config.adapt_rate * error
            stats.update(out.acts, sae.W_dec)
            window += torch.stack([loss.detach(), recon.detach(), l0, aux.detach()])
        if config.resort_every and (step + 1) % config.resort_every == 0:
            _resort(sae, optimizer, stats)

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            logs = _read_out(done, result, window, log_coeff, stats, sae, config)
            logs["lr"] = optimizer.param_groups[0]["lr"]
            window.zero_()
            result.history.append(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", l0=f"{logs['l0']:.2f}", refresh=False)
            if callback is not None:
                callback(done, sae, logs)
        if checkpoint_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            sae.save(Path(checkpoint_dir) / f"step_{done:07d}")
    bar.close()
    return result
