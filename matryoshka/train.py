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
  With ``balance_beta = β`` the inner prefixes are scaled by β instead (see :class:`PrefixSchedule`):
  ``L_n + β Σ_{l<n} ω_l L_l`` with ``ω`` the inner weights renormalised to sum 1.
* ``balanced``: the fixed groups with geometric weights ``β^(G-g)`` (``Prefixes.balanced``,
  Chanin et al. 2025), ``β = balance_beta``.

``detach``: detached levels (``matryoshka_loss(..., detach=True)``): a latent's value and decoder
row learn only from the prefix that adds it; the loss value is unchanged.

``sparsity_weighting="prefix"``: latent ``i``'s sparsity penalty is scaled by the share of the
step's prefix weight that reaches it, ``c_i = Σ_{g: m_g > i} w_g / Σ_g w_g``
(:func:`prefix_penalty_weights`), so that each prefix carries ``w_g (L_g + λ · penalty of its own
latents) / Σ w``; the default ``"uniform"`` penalises every latent fully.

``resample_every > 0`` restarts latents silent for ``dead_after`` steps on the batch's
worst-reconstructed inputs every that many steps (:mod:`matryoshka.resampling`): the dead-latent
loss cannot revive a latent whose pre-activation is negative on every input.

``orthogonality_coeff = γ > 0`` adds ``γ · P(W_dec)``, the mean over latents of the largest squared
cosine with another latent's decoder row (after OrtSAE; :mod:`matryoshka.orthogonality`), within
random chunks of ``orthogonality_chunk`` latents (one exact chunk when ``n`` is smaller).

``code_spread_coeff = λ > 0`` adds ``λ`` times the batch's code-spread penalty, the mean over latents
of the squared coefficient of variation of their positive codes (:mod:`matryoshka.code_spread`: a
probe of the toys' rotated pairs, not a recipe for real data); one process only.

Every random draw (data, prefixes, initialisation) comes from seeded generators: a run is
deterministic on the CPU.  Metrics are read back every ``log_every`` steps only, so the step loop
does no per-step host work beyond Python itself.  For toy-sized models on the CPU, call
``torch.set_num_threads(1)`` first: thread hand-offs cost more than the maths (several times more on
a busy machine); the studies do this.

Checkpoints (``checkpoint_dir``, ``resume``; format in :mod:`matryoshka.checkpoint`) hold everything
a run depends on: parameters and buffers (the BatchTopK threshold), Adam's moments and step counts,
the step, the data and prefix generators' states, the adaptive coefficient, the re-sorting and
firing statistics, BatchTopK's row width and counters, the unlogged metric sums and the history.
Data is drawn in chunks of ``data_chunk_steps`` steps; a checkpoint keeps the data generator's
state at the start of the current chunk and a resumed run redraws that chunk, so checkpoints may
fall anywhere.  On the CPU a resumed run ends bit for bit where an uninterrupted one does.

Data-parallel (``torch.distributed``, one process per rank, see :mod:`matryoshka.distributed`):
every rank draws each whole data chunk from the same seeded generator and trains on its contiguous
share of every batch, so the union of the ranks' rows is exactly the one-process batch (drawing is
repeated on every rank: cheap for synthetic data, and what makes any world size see the same data).
DDP averages gradients; all ranks draw the same prefixes.  What a batch-wide quantity needs:

* the adaptive coefficient: the step's L0 is averaged over the ranks before the update;
* firing recency and re-sorting energy: summed over the ranks (one all-reduce per step), so every
  rank re-sorts with the same permutation and the parameters stay identical;
* BatchTopK: selects the ``k * B`` largest activations of the *global* batch (each rank's local top
  ``k * B`` values are all-gathered and the global cut-off taken from them), so its threshold EMA
  and row width come out the same on every rank and as in one process;
* the dead-latent loss: its normalising error is the global batch mean;
* resampling: the residuals are all-gathered, so every rank restarts the same latents identically.

Rank 0 writes the checkpoints.  They hold global state only, so any world size can resume them.

SIGINT and SIGTERM (Ctrl-C, ``kill``, a scheduler's pre-emption) stop a run at the end of the
current step (data-parallel: at the next read-out, all ranks together), write a checkpoint there and
raise :class:`TrainingInterrupted`; a second signal acts at once (:mod:`matryoshka.stop_signals`).

Bad numbers: a data chunk holding NaN/inf raises ``ValueError`` before it reaches the model; a
loss that turns NaN/inf (divergence) raises ``FloatingPointError`` at the next read-out; a
checkpoint is never written from non-finite parameters.  Nothing is skipped silently.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, check_writable, latest, load_checkpoint, prune, remove_partial, save_checkpoint
from .code_spread import code_spread_penalty
from .distributed import Ranks, data_parallel
from .host_copies import to_device
from .inclusion import every_prefix_weights, sampled_inclusion_probabilities
from .orthogonality import DEFAULT_CHUNK, penalty_at_step
from .prefixes import Prefixes
from .resampling import resample_dead_latents_
from .sae import SparseAutoencoder
from .sparse_acts import SparseActs
from .stop_signals import DeferredSignals, TrainingInterrupted
from .validation import is_count, is_finite_number

__all__ = [
    "PREFIX_MODES",
    "EVERY_WEIGHTS",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "default_group_widths",
    "sampled_inclusion_probabilities",
    "every_prefix_weights",
    "PrefixSchedule",
    "scaled_inner_weights",
    "SPARSITY_WEIGHTINGS",
    "prefix_penalty_weights",
    "lr_factor",
    "train",
]

PREFIX_MODES = ("vanilla", "groups", "sampled", "every", "balanced")
# The weights of the ``every`` objective: "exact" (inclusion probabilities / num_sampled, see
# every_prefix_weights) or "uniform" (1/n each: a different objective, weighting long prefixes far
# more than sampled does).
EVERY_WEIGHTS = ("exact", "uniform")
# How the sparsity penalty weighs each latent: "uniform" (all 1) or "prefix" (prefix_penalty_weights).
SPARSITY_WEIGHTINGS = ("uniform", "prefix")
# What latents are re-sorted by: the EMA of their mean squared activation, or of their firing rate.
RESORT_BY = ("energy", "frequency")

Callback = Callable[[int, SparseAutoencoder, dict], None]


# ----------------------------------------------------------------------------------- prefix modes
def default_group_widths(n: int, num_groups: int = 4) -> list[int]:
    """Cumulative widths that double up to ``n``, e.g. ``[3, 5, 10, 20]`` for ``n = 20``."""
    return sorted({math.ceil(n / 2 ** (num_groups - 1 - g)) for g in range(num_groups)})


class PrefixSchedule:
    """The prefixes of each training step for one prefix mode (see module doc).

    ``objective``: the fixed prefix set whose loss the mode optimises (in expectation for ``sampled``).

    ``balance_beta = β`` (modes ``every`` and ``balanced`` only; required by ``balanced``):

    * ``every``: ``L_full + β Σ_{l<n} ω_l L_l``, where ``L_l`` is prefix ``l``'s loss and ``ω_l`` are
      the ``every_weights`` of the inner prefixes ``l = 1..n-1`` renormalised to sum 1 (``exact``:
      ``ω_l = π_l / (num_sampled - 1)``, ``π_l`` the inclusion probability under ``sampled``;
      ``uniform``: ``1 / (n - 1)``).  ``β = 0`` is a plain SAE; today's unscaled ``every`` (exact)
      is ``β = num_sampled - 1`` (9 for 10 sampled prefixes) times ``1 / num_sampled``.
    * ``balanced``: ``Prefixes.balanced(group_widths, β)``, weights ``β^(G-g)`` (outer 1).

    ``balance_normalise``: divide those weights by their sum (``1 + β`` for ``every``), so that the
    objective is a weighted *mean* of prefix losses; the minimiser of the reconstruction term is the
    same, only the scale against the sparsity penalty and the gradient clipping changes.
    """

    def __init__(self, mode: str, n: int, num_sampled: int = 10, group_widths: list[int] | None = None,
                 generator: torch.Generator | None = None, every_weights: str = "exact",
                 balance_beta: float | None = None, balance_normalise: bool = False) -> None:
        if mode not in PREFIX_MODES:
            raise ValueError(f"prefix mode must be one of {PREFIX_MODES}, got {mode!r}")
        if every_weights not in EVERY_WEIGHTS:
            raise ValueError(f"every_weights must be one of {EVERY_WEIGHTS}, got {every_weights!r}")
        if balance_beta is not None:
            if mode not in ("every", "balanced"):
                raise ValueError(f"balance_beta applies to prefix modes 'every' and 'balanced', not {mode!r}")
            if not (math.isfinite(balance_beta) and balance_beta >= 0):
                raise ValueError(f"balance_beta must be finite and >= 0, got {balance_beta}")
        if mode == "balanced" and balance_beta is None:
            raise ValueError("prefix mode 'balanced' needs balance_beta (the inner levels' scale β)")
        self.mode, self.n, self.generator = mode, n, generator
        self.num_sampled = min(num_sampled, n)
        if mode == "vanilla":
            self.objective = Prefixes([n])
        elif mode == "groups":
            widths = group_widths or default_group_widths(n)
            self.objective = Prefixes.groups(widths, [1.0 / len(widths)] * len(widths))
        elif mode == "balanced":
            self.objective = Prefixes.balanced(group_widths or default_group_widths(n), balance_beta)
        elif every_weights == "uniform":  # every prefix 1/n; sampled then records this set as its objective too
            self.objective = Prefixes.every(n, torch.full((n,), 1.0 / n, dtype=torch.float64))
        else:  # sampled and every share the same expected objective
            self.objective = Prefixes.every(n, every_prefix_weights(n, self.num_sampled))
        if mode == "every" and balance_beta is not None:
            self.objective = Prefixes.every(n, scaled_inner_weights(self.objective.weights, balance_beta))
        if balance_normalise and balance_beta is not None:
            weights = self.objective.weights
            self.objective = Prefixes(self.objective.lengths, weights / weights.sum())

    def __call__(self) -> Prefixes:
        if self.mode == "sampled":
            return Prefixes.sample(self.n, self.num_sampled, generator=self.generator)
        return self.objective


def scaled_inner_weights(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """Every-prefix weights ``[β ω_1, ..., β ω_{n-1}, 1]`` with ``ω = weights[:-1] / weights[:-1].sum()``:
    the full prefix at 1 and the inner prefixes, in the proportions of ``weights``, at total ``β``."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    inner = weights[:-1]
    total = float(inner.sum())
    inner = inner / total if total > 0 else inner
    return torch.cat([beta * inner, torch.ones(1, dtype=torch.float64)])


def prefix_penalty_weights(prefixes: Prefixes, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n,)`` float64 on ``device``: ``c_i = Σ_{g: m_g > i} w_g / Σ_g w_g``, the share of the prefix
    weight on the prefixes that hold latent ``i`` (1 for latents in every prefix, 0 for latents in
    none; all 0 when every weight is 0).  Scaling latent ``i``'s sparsity penalty by ``c_i`` gives
    ``Σ_g (w_g / Σ w) · penalty of prefix g's latents``: the penalty follows the reconstruction weight.

    ``O(n + G)`` on the device, no host sync: the weights are scattered to their lengths and summed
    from the longest down."""
    prefixes.check_against(n)
    lengths, weights, _ = prefixes.on(torch.device(device))
    at_length = torch.zeros(n + 1, dtype=torch.float64, device=lengths.device).index_add_(0, lengths, weights)
    reaching = at_length.flip(0).cumsum(0).flip(0)  # reaching[m] = Σ_{g: m_g >= m} w_g
    return reaching[1:] / reaching[0].clamp(min=torch.finfo(torch.float64).tiny)


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
    ``aux_k``, ``aux_coeff``: the TopK dead-latent loss.  ``resample_every``: every that many steps
    restart the latents silent for ``dead_after`` steps or more on the batch's worst-reconstructed
    inputs (:mod:`matryoshka.resampling`; any activation; 0: never), until the learning-rate
    cool-down starts (a latent restarted later would not have the steps to settle).
    ``log_every``: steps between metric read-outs (and callback calls); ``checkpoint_every``: steps
    between saves (0: never); ``keep_checkpoints``: how many of the newest checkpoints stay in the
    folder, older ones are deleted after each save (0: all; a checkpoint holds the parameters and
    Adam's two moments).
    ``every_weights``: the ``every`` objective's weights, ``"exact"`` or ``"uniform"`` (``EVERY_WEIGHTS``).
    ``detach``: detached levels (each latent learns only from the prefix that adds it).
    ``balance_beta``, ``balance_normalise``: the inner levels' scale β of ``every`` / ``balanced``
    and whether the weights are divided by their sum (exact forms in :class:`PrefixSchedule`).
    ``resort_by``: re-sort latents by the EMA of their mean squared activation (``"energy"``) or of
    their firing frequency (``"frequency"``, the share of rows where they fire).
    ``sparsity_weighting``: ``"uniform"`` (every latent's penalty counts 1) or ``"prefix"`` (latent
    ``i``'s penalty scaled by the share of the step's prefix weight on prefixes holding it,
    :func:`prefix_penalty_weights`; ReLU/JumpReLU only: TopK kinds have no penalty).
    ``orthogonality_coeff``: the weight γ of the decoder orthogonality penalty (0: off; see
    :mod:`matryoshka.orthogonality`); ``orthogonality_chunk``: the most latents compared with each
    other per step (chunks are redrawn every step; ``n`` or more: every pair, exactly).
    ``code_spread_coeff``: the weight λ of the code-spread penalty (0: off; see
    :mod:`matryoshka.code_spread`); a per-batch statistic, so not with data-parallel training.
    ``code_spread_start``: the share of the steps before it applies (0: from the first step).
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
    resample_every: int = 0
    log_every: int = 100
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    seed: int = 0
    progress: bool = True
    data_chunk_steps: int = 100
    every_weights: str = "exact"
    detach: bool = False
    balance_beta: float | None = None
    balance_normalise: bool = False
    resort_by: str = "energy"
    sparsity_weighting: str = "uniform"
    orthogonality_coeff: float = 0.0
    orthogonality_chunk: int = DEFAULT_CHUNK
    code_spread_coeff: float = 0.0
    code_spread_start: float = 0.0

    def __post_init__(self) -> None:
        """Refuse, naming the field, a setting that would fail mid-run with an unrelated error
        (a zero ``log_every`` or ``batch_size``) or train quietly wrong (a negative ``steps``, a
        ``clip_norm`` of 0, fractions outside [0, 1])."""
        checks = (
            ("steps", is_count(self.steps, 1), "an integer >= 1"),
            ("batch_size", is_count(self.batch_size, 1), "an integer >= 1"),
            ("log_every", is_count(self.log_every, 1), "an integer >= 1"),
            ("data_chunk_steps", is_count(self.data_chunk_steps, 1), "an integer >= 1"),
            ("num_sampled", is_count(self.num_sampled, 1), "an integer >= 1"),
            ("checkpoint_every", is_count(self.checkpoint_every, 0), "an integer >= 0 (0: never)"),
            ("keep_checkpoints", is_count(self.keep_checkpoints, 0), "an integer >= 0 (0: all)"),
            ("resort_every", is_count(self.resort_every, 0), "an integer >= 0 (0: never)"),
            ("dead_after", is_count(self.dead_after, 0), "an integer >= 0"),
            ("aux_k", is_count(self.aux_k, 0), "an integer >= 0"),
            ("resample_every", is_count(self.resample_every, 0), "an integer >= 0 (0: never)"),
            ("lr", is_finite_number(self.lr) and self.lr > 0, "a finite number > 0"),
            ("betas", isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
             and all(is_finite_number(b) and 0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("warmup_frac", is_finite_number(self.warmup_frac) and 0 <= self.warmup_frac <= 1, "a number in [0, 1]"),
            ("cooldown_frac", is_finite_number(self.cooldown_frac) and 0 <= self.cooldown_frac <= 1, "a number in [0, 1]"),
            ("clip_norm", self.clip_norm is None or (is_finite_number(self.clip_norm) and self.clip_norm > 0),
             "None (no clipping) or a finite number > 0"),
            # Adapted in log space: 0 has no logarithm.  A tiny value is an almost-free penalty.
            ("sparsity_coeff", is_finite_number(self.sparsity_coeff) and self.sparsity_coeff > 0, "a finite number > 0"),
            ("target_l0", self.target_l0 is None or (is_finite_number(self.target_l0) and self.target_l0 > 0),
             "None (a fixed coefficient) or a finite number > 0"),
            ("adapt_rate", is_finite_number(self.adapt_rate) and self.adapt_rate >= 0, "a finite number >= 0"),
            ("resort_ema", is_finite_number(self.resort_ema) and 0 <= self.resort_ema < 1, "a number in [0, 1)"),
            ("aux_coeff", is_finite_number(self.aux_coeff) and self.aux_coeff >= 0, "a finite number >= 0"),
            ("resort_by", self.resort_by in RESORT_BY, f"one of {RESORT_BY}"),
            ("sparsity_weighting", self.sparsity_weighting in SPARSITY_WEIGHTINGS, f"one of {SPARSITY_WEIGHTINGS}"),
            ("orthogonality_coeff", is_finite_number(self.orthogonality_coeff) and self.orthogonality_coeff >= 0,
             "a finite number >= 0 (0: off)"),
            ("orthogonality_chunk", is_count(self.orthogonality_chunk, 2), "an integer >= 2"),
            ("code_spread_coeff", is_finite_number(self.code_spread_coeff) and self.code_spread_coeff >= 0,
             "a finite number >= 0 (0: off)"),
            ("code_spread_start", is_finite_number(self.code_spread_start) and 0 <= self.code_spread_start <= 1,
             "a number in [0, 1]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")


# Fields added after checkpoints existed: left out of a checkpoint's identity while at their default,
# so that checkpoints written before them still resume.
_LATER_FIELDS = {"detach": False, "balance_beta": None, "balance_normalise": False, "resort_by": "energy",
                 "sparsity_weighting": "uniform", "orthogonality_coeff": 0.0,
                 "orthogonality_chunk": DEFAULT_CHUNK, "resample_every": 0, "code_spread_coeff": 0.0,
                 "code_spread_start": 0.0}


@dataclass
class TrainResult:
    """``history``: one dict of window-averaged metrics per ``log_every`` steps (also passed to the
    callback).  ``objective``: the fixed prefix set the run optimised (see :class:`PrefixSchedule`).
    ``since_fired``: at the end, the steps since each latent (in the SAE's final order) last fired
    in a training batch; those at ``dead_after`` or more are the run's dead latents."""

    history: list[dict] = field(default_factory=list)
    objective: Prefixes | None = None
    since_fired: torch.Tensor | None = None


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
        self.frequency = torch.zeros(n, device=device)
        self.resampled = torch.zeros(n, dtype=torch.long, device=device)  # restarts of each latent
        self.decay = decay

    @torch.no_grad()
    def update(self, acts: SparseActs | torch.Tensor, W_dec: torch.Tensor, ranks: Ranks | None = None) -> None:
        """Fold in one batch of activations: ``SparseActs`` (read slot by slot, never densified) or
        a dense ``(B, n)`` tensor.  With ``ranks``, the batch is the union of all ranks' (equal)
        shares: firing and energy are summed over the ranks, so every rank keeps the same numbers
        and re-sorts identically."""
        n = self.energy.shape[0]
        rows = max(acts.values.shape[0] if isinstance(acts, SparseActs) else acts.shape[0], 1)
        if isinstance(acts, SparseActs):
            counts = acts.per_latent_sum(acts.active().to(self.energy.dtype), n)
            square_sum = acts.per_latent_sum(acts.values.detach().to(self.energy.dtype).pow(2), n)
        else:
            counts = (acts > 0).sum(0).to(self.energy.dtype)
            square_sum = acts.detach().to(self.energy.dtype).pow(2).sum(0)
        if ranks is not None:  # one collective for both
            both = ranks.sum_(torch.cat([counts, square_sum]))
            counts, square_sum, rows = both[:n], both[n:], rows * ranks.size
        fired = counts > 0
        self.since_fired = torch.where(fired, 0, self.since_fired + 1)
        energy = square_sum * W_dec.detach().to(self.energy.dtype).pow(2).sum(1) / rows
        self.energy.mul_(self.decay).add_(energy, alpha=1 - self.decay)
        self.frequency.mul_(self.decay).add_(counts / rows, alpha=1 - self.decay)

    def permute(self, perm: torch.Tensor) -> None:
        self.since_fired = self.since_fired[perm]
        self.energy = self.energy[perm]
        self.frequency = self.frequency[perm]
        self.resampled = self.resampled[perm]

    def restart(self, restarted: torch.Tensor) -> None:
        """Count the ``restarted`` latents (bool mask) and start their statistics afresh: they get
        ``dead_after`` steps to fire before they count as dead again."""
        self.since_fired = torch.where(restarted, 0, self.since_fired)
        self.energy = torch.where(restarted, 0.0, self.energy)
        self.frequency = torch.where(restarted, 0.0, self.frequency)
        self.resampled = self.resampled + restarted.long()


def _mean_l0(acts: SparseActs | torch.Tensor) -> torch.Tensor:
    """Batch mean of the number of positive activations per row (sparse: counted slot by slot)."""
    fired = acts.active() if isinstance(acts, SparseActs) else acts > 0
    return fired.sum(1).float().mean()


def _checked_chunk(data: torch.Tensor, rows: int, d: int, first_step: int, last_step: int) -> torch.Tensor:
    """``data`` from the sampler, refused unless it is ``(rows, d)`` floating point and finite: a NaN
    or inf would poison every parameter at the next Adam step."""
    if not isinstance(data, torch.Tensor) or data.shape != (rows, d) or not data.is_floating_point():
        got = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"sample({rows}, generator) must return a ({rows}, {d}) floating-point tensor "
                         f"(d = the SAE's input size), got {got}")
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        bad_rows = (~finite).any(1).nonzero().flatten()
        raise ValueError(f"sample() returned {int((~finite).sum())} NaN/inf values ({bad_rows.numel()} rows, "
                         f"first row {int(bad_rows[0])}) in the data of steps {first_step}..{last_step}; "
                         f"training stops before they reach the model")
    return data


@torch.no_grad()
def _resort(sae: SparseAutoencoder, optimizer: torch.optim.Adam, stats: _LatentStats, by: str = "energy") -> None:
    """Order latents by decreasing activation energy (or firing frequency), permuting Adam's moments alongside."""
    perm = torch.argsort(stats.frequency if by == "frequency" else stats.energy, descending=True, stable=True)
    sae.permute_latents_(perm)
    for moment, dim in sae.latent_moments(optimizer):
        moment.copy_(moment.index_select(dim, perm))
    stats.permute(perm)


def _orthogonality(sae: SparseAutoencoder, config: TrainConfig, step: int) -> torch.Tensor:
    """The decoder orthogonality penalty at ``step``, its chunks drawn from the run's seed and the step."""
    return penalty_at_step(sae.W_dec, config.orthogonality_chunk, config.seed, step)


@torch.no_grad()
def _global_row_stats(sae: SparseAutoencoder, ranks: Ranks | None) -> torch.Tensor:
    """BatchTopK's ``(widest row, dropped entries)`` over all ranks (a new tensor), zeros otherwise."""
    if sae.config.activation != "batchtopk":
        return torch.zeros(2, dtype=torch.long, device=sae.W_dec.device)
    stats = sae.row_stats().clone()
    if ranks is not None:
        stats = torch.stack([ranks.max_(stats[0].clone()), ranks.sum_(stats[1].clone())])
    return stats


@torch.no_grad()
def _read_out(done: int, result: TrainResult, window: torch.Tensor, log_coeff: torch.Tensor,
              stats: _LatentStats, sae: SparseAutoencoder, config: TrainConfig, ranks: Ranks | None = None) -> dict:
    """The window-averaged metrics of one logging interval (over all ranks), read back in one host
    sync.  Raises ``FloatingPointError`` when the loss went NaN/inf: the model is poisoned."""
    start = result.history[-1]["step"] if result.history else 0
    if ranks is not None:
        window = ranks.mean(window)
    dead = (stats.since_fired >= config.dead_after).sum()
    orthogonality = _orthogonality(sae, config, done) if config.orthogonality_coeff else dead.new_zeros(())
    values = torch.cat([window.double() / (done - start), log_coeff.exp().double().view(1),
                        dead.double().view(1), _global_row_stats(sae, ranks).double(),
                        orthogonality.double().view(1), stats.resampled.sum().double().view(1)]).tolist()
    loss, recon, l0, aux, coeff, dead_count, widest, dropped, orthogonality, resampled = values
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training diverged: the mean loss of steps {start}..{done - 1} is {loss}, so the parameters are "
            f"NaN/inf; no checkpoint after step {start} was written. Lower the learning rate or check the data")
    logs = {"step": done, "loss": loss, "recon": recon, "l0": l0, "aux": aux, "sparsity_coeff": coeff,
            "dead": int(dead_count)}
    if config.orthogonality_coeff:  # the decoder's penalty at the read-out (unweighted)
        logs["orthogonality"] = orthogonality
    if config.resample_every:  # restarts so far, all latents together
        logs["resampled"] = int(resampled)
    if sae.config.activation == "batchtopk":
        logs["batchtopk_dropped"] = int(dropped)
        sae.update_row_width(int(widest))
    return logs


# ----------------------------------------------------------------------------------- checkpoints
# TrainConfig fields that do not change what a run computes, so a resume may change them.
_FREE_FIELDS = ("progress", "checkpoint_every", "keep_checkpoints")


@dataclass
class _Run:
    """Everything a run depends on besides its config and sampler: exactly what a checkpoint holds.

    ``step``: steps done.  ``chunk_state``: the data generator's state where the current data chunk
    starts; a run resumed mid-chunk redraws that chunk from it, so it sees the same batches.
    """

    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    stats: _LatentStats
    log_coeff: torch.Tensor
    window: torch.Tensor  # sums since the last read-out: loss, reconstruction, L0, aux
    data_gen: torch.Generator
    chunk_state: torch.Tensor
    schedule: PrefixSchedule
    result: TrainResult
    step: int = 0

    def identity(self, config: TrainConfig) -> dict:
        """The settings a checkpoint must share with the run that resumes it."""
        train_config = {k: v for k, v in asdict(config).items()
                        if k not in _FREE_FIELDS and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        sae_config = {k: v for k, v in asdict(self.sae.config).items() if not k.startswith("prefix_")}
        return {"train_config": train_config, "sae_config": sae_config}

    def save(self, folder: Path, config: TrainConfig, ranks: Ranks | None) -> Path | None:
        """Checkpoint this run and return its folder (rank 0 writes; every rank must call, for the
        collectives; the others return ``None``)."""
        for name, param in self.sae.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise FloatingPointError(f"training diverged: parameter {name} holds NaN/inf at step {self.step}; "
                                         f"refusing to write a poisoned checkpoint to {folder}")
        window = self.window if ranks is None else ranks.mean(self.window)
        row_stats = _global_row_stats(self.sae, ranks)
        if ranks is not None and ranks.rank != 0:
            return None
        at_chunk_start = self.step % config.data_chunk_steps == 0
        tensors = {
            "log_coeff": self.log_coeff, "window": window, "row_stats": row_stats,
            "since_fired": self.stats.since_fired, "energy": self.stats.energy,
            "frequency": self.stats.frequency, "resampled": self.stats.resampled,
            "data_generator": self.data_gen.get_state() if at_chunk_start else self.chunk_state,
            "prefix_generator": self.schedule.generator.get_state(),
        }
        for name, param in self.sae.named_parameters():
            for key, value in self.optimizer.state[param].items():
                tensors[f"adam.{name}.{key}"] = value
        state = {**self.identity(config), "row_width": self.sae.row_width, "history": self.result.history,
                 "world_size": 1 if ranks is None else ranks.size}
        written = save_checkpoint(folder, self.step, self.sae.state_files(), tensors, state)
        if config.keep_checkpoints:
            prune(folder, config.keep_checkpoints)
        return written

    def restore(self, path: Path, config: TrainConfig, ranks: Ranks | None) -> None:
        """Continue from checkpoint ``path`` (written with any world size)."""
        sae_state, tensors, state = load_checkpoint(path, self.identity(config), self.sae.W_dec.device)
        device = self.sae.W_dec.device
        self.sae.load_state_dict(sae_state)
        # Rank 0 alone carries the dropped-entry count forward: the next read-out sums over ranks.
        keep_counts = ranks is None or ranks.rank == 0
        row_stats = tensors["row_stats"] if keep_counts else torch.zeros_like(tensors["row_stats"])
        self.sae.load_row_state(state["row_width"], row_stats)
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {
            i: {key: tensors[f"adam.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
            for i, (name, _) in enumerate(self.sae.named_parameters())
        }
        self.optimizer.load_state_dict(optimizer_state)  # moments go to the parameters' device
        self.stats.since_fired = tensors["since_fired"].to(device)
        self.stats.energy = tensors["energy"].to(device)
        if "frequency" in tensors:  # checkpoints written before frequency re-sorting lack it
            self.stats.frequency = tensors["frequency"].to(device)
        if "resampled" in tensors:  # checkpoints written before resampling lack it
            self.stats.resampled = tensors["resampled"].to(device)
        self.log_coeff.copy_(tensors["log_coeff"])
        self.window.copy_(tensors["window"])  # the mean over ranks: averaging again keeps it
        self.data_gen.set_state(tensors["data_generator"])  # the chunk's start: the loop redraws it
        self.schedule.generator.set_state(tensors["prefix_generator"])
        self.result.history = state["history"]
        self.step = state["step"]


def _start_from(run: _Run, checkpoint_dir: str | Path | None, resume: bool, config: TrainConfig,
                ranks: Ranks | None) -> Path | None:
    """Check the checkpoint folder and, for ``resume``, restore its latest checkpoint into ``run``."""
    if checkpoint_dir is None:
        if resume:
            raise ValueError("train(resume=True) needs checkpoint_dir: the folder to resume from")
        return None
    folder = check_writable(checkpoint_dir, "checkpoint_dir")
    leader = ranks is None or ranks.rank == 0  # writes the checkpoints, and says what it will not do once
    if not config.checkpoint_every and leader:
        warnings.warn(f"checkpoint_dir {str(folder)!r} is given but checkpoint_every is 0: no checkpoint will be "
                      f"written there (set TrainConfig.checkpoint_every, CLI --checkpoint-every)", stacklevel=3)
    if leader:
        remove_partial(folder)
    found = latest(folder)
    if found is not None and resume:
        run.restore(found, config, ranks)
    elif found is not None:
        raise CheckpointError(f"checkpoint_dir {str(folder)!r} already holds checkpoints (latest: {found.name}); "
                              f"pass resume=True (CLI: --resume) to continue that run, or use an empty folder")
    elif resume and leader:
        warnings.warn(f"resume: no checkpoint in {str(folder)!r} yet; starting at step 0", stacklevel=3)
    return folder


# ----------------------------------------------------------------------------------- the trainer
def train(
    sae: SparseAutoencoder,
    sample: Callable[[int, torch.Generator], torch.Tensor],
    config: TrainConfig,
    callback: Callback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``sae`` in place on batches from ``sample(num_rows, generator) -> (num_rows, d)``.

    ``sample`` must depend on nothing but its arguments (the generator carries all randomness), so
    that a resumed or data-parallel run draws the same data.  Its output must be finite (NaN/inf
    raises ``ValueError`` before reaching the model); a loss that turns NaN/inf raises
    ``FloatingPointError`` at the next read-out, and no checkpoint is written from a poisoned model.

    ``checkpoint_dir``: save a checkpoint there every ``config.checkpoint_every`` steps (see
    :mod:`matryoshka.checkpoint`; with ``checkpoint_every = 0`` none, and a warning says so); it must
    be empty of checkpoints unless ``resume``.  ``resume``:
    continue from its latest checkpoint (start at step 0, with a warning, when it has none).

    Data-parallel: under an initialised ``torch.distributed`` group of ``W > 1`` ranks (e.g.
    ``torchrun`` and :func:`matryoshka.distributed.init_from_env`), each rank trains on its share
    ``batch_size / W`` of every batch, gradients are averaged (DDP), and the result equals one process
    with the whole batch to float rounding; rank 0 writes the checkpoints.  See the module doc.

    SIGINT or SIGTERM during the run stops it at the end of the step (data-parallel: at the next
    read-out), with a checkpoint of that step in ``checkpoint_dir`` if given, and raises
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) naming it; a second signal acts at once.

    The SAE's default prefixes are set to the mode's objective, so ``sae.reconstruction_loss`` and a
    saved checkpoint afterwards refer to the objective that was trained.
    """
    n = sae.config.n
    device = sae.W_dec.device
    ranks = Ranks.current()
    share = slice(None) if ranks is None else ranks.shard(config.batch_size)
    # Random draws stay on the host (CPU generators): a run draws the same data and prefixes on
    # any device, and the batches move over without blocking.
    data_gen = torch.Generator().manual_seed(config.seed)
    if config.sparsity_weighting != "uniform" and sae.config.activation not in ("relu", "jumprelu"):
        raise ValueError(f"sparsity_weighting={config.sparsity_weighting!r} weighs the sparsity penalty, but "
                         f"{sae.config.activation!r} SAEs have none (TopK/BatchTopK fix L0 by k): use 'uniform'")
    if config.code_spread_coeff and ranks is not None:
        raise ValueError(f"TrainConfig.code_spread_coeff={config.code_spread_coeff} is a per-batch statistic: "
                         f"data-parallel training ({ranks.size} ranks) would compute it per rank; train in one "
                         f"process or set it to 0")
    schedule = PrefixSchedule(config.prefix_mode, n, config.num_sampled, config.group_widths,
                              torch.Generator().manual_seed(config.seed + 1), config.every_weights,
                              config.balance_beta, config.balance_normalise)
    sae.prefixes = schedule.objective
    run = _Run(sae=sae, optimizer=torch.optim.Adam(sae.parameters(), lr=config.lr, betas=config.betas),
               stats=_LatentStats(n, config.resort_ema, device),
               log_coeff=torch.tensor(math.log(config.sparsity_coeff), device=device),
               window=torch.zeros(4, device=device), data_gen=data_gen, chunk_state=data_gen.get_state(),
               schedule=schedule, result=TrainResult(objective=schedule.objective))
    # DDP averages the gradients over the ranks during backward.  It copies rank 0's parameters and
    # buffers to every rank here, before the restore (which sets rank-specific BatchTopK counters),
    # and never again: the BatchTopK threshold is computed identically on every rank.
    model = sae if ranks is None else data_parallel(sae, device)
    folder = _start_from(run, checkpoint_dir, resume, config, ranks)
    previous_parallel, sae.data_parallel = sae.data_parallel, ranks
    try:
        with DeferredSignals() as signals:
            _steps(run, model, sample, config, callback, folder, ranks, share, signals)
    except BaseException as error:
        if ranks is not None:
            # The traceback's frames would keep the DDP model alive while the caller handles the
            # error, e.g. in a `finally` that destroys the process group: a DDP model that outlives
            # its group can deadlock (distributed.data_parallel).  Their locals go with it.
            del model
            traceback.clear_frames(error.__traceback__)
        raise
    finally:
        sae.data_parallel = previous_parallel
    run.result.since_fired = run.stats.since_fired.clone()
    return run.result


def _steps(run: _Run, model: torch.nn.Module, sample: Callable[[int, torch.Generator], torch.Tensor],
           config: TrainConfig, callback: Callback | None, folder: Path | None, ranks: Ranks | None,
           share: slice, signals: DeferredSignals) -> None:
    """The training loop of :func:`train`, from ``run.step`` to ``config.steps``; raises
    :class:`TrainingInterrupted` at a step boundary after SIGINT/SIGTERM."""
    sae, optimizer, stats, log_coeff, window = run.sae, run.optimizer, run.stats, run.log_coeff, run.window
    device = sae.W_dec.device
    penalised = sae.config.activation in ("relu", "jumprelu")
    sparse_kind = sae.config.activation in ("topk", "batchtopk")
    no_aux = torch.zeros((), device=device)
    by_prefix = config.sparsity_weighting == "prefix"
    resample_until = config.steps - max(1, round(config.cooldown_frac * config.steps))  # the cool-down's start
    spread_from = round(config.code_spread_start * config.steps)
    weighted_prefixes, latent_weights = None, None
    chunk_steps = config.data_chunk_steps
    chunk = None
    bar = tqdm(range(run.step, config.steps), initial=run.step, total=config.steps, mininterval=1.0,
               disable=not config.progress or (ranks is not None and ranks.rank != 0),
               desc=f"{config.prefix_mode} seed {config.seed}", leave=False)
    for step in bar:
        if chunk is None or step % chunk_steps == 0:  # draw data in chunks: fewer small tensor ops
            # A chunk starts at a multiple of chunk_steps; a run resumed mid-chunk starts with the
            # generator at its chunk's start (_Run.restore) and redraws it.  Every rank draws the
            # whole chunk from the same generator and keeps its share of each batch: exactly the
            # one-process data, at the price of drawing W times over.
            first = step - step % chunk_steps
            run.chunk_state = run.data_gen.get_state()
            rows = chunk_steps * config.batch_size
            data = _checked_chunk(sample(rows, run.data_gen), rows, sae.config.d, first, first + chunk_steps - 1)
            chunk = to_device(data.view(chunk_steps, config.batch_size, -1)[:, share], device)
        x = chunk[step % chunk_steps]

        out = model(x)
        prefixes = run.schedule()
        recon = sae.reconstruction_loss(x, out.acts, prefixes, detach=config.detach).loss
        loss = recon
        if penalised:
            if by_prefix and prefixes is not weighted_prefixes:  # once for a fixed set, each step for sampled
                weighted_prefixes, latent_weights = prefixes, prefix_penalty_weights(prefixes, sae.config.n, device)
            loss = loss + log_coeff.exp() * sae.sparsity_penalty(out, latent_weights)
        if config.orthogonality_coeff:
            loss = loss + config.orthogonality_coeff * _orthogonality(sae, config, step)
        if config.code_spread_coeff and step >= spread_from:
            loss = loss + config.code_spread_coeff * code_spread_penalty(out.acts, sae.config.n)
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
                if ranks is not None:  # the whole batch's L0: every rank keeps the same coefficient
                    l0 = ranks.mean(l0)
                # Relative L0 error, clipped so that an early L0 far above target (dense start)
                # cannot blow the coefficient up within a few steps and kill latents for good
                # (it cannot fall below -1: L0 >= 0).
                error = ((l0 - config.target_l0) / config.target_l0).clamp(max=1.0)
                log_coeff += config.adapt_rate * error
            stats.update(out.acts, sae.W_dec, ranks)
            window += torch.stack([loss.detach(), recon.detach(), l0, aux.detach()])
            if config.resample_every and (step + 1) % config.resample_every == 0 and step + 1 <= resample_until:
                # The step's own residuals (before its update); every rank sees the whole batch's,
                # so all restart the same latents the same way.
                errors = x - out.recon
                stats.restart(resample_dead_latents_(sae, optimizer, stats.since_fired >= config.dead_after,
                                                     errors if ranks is None else ranks.gather(errors)))
        if config.resort_every and (step + 1) % config.resort_every == 0:
            _resort(sae, optimizer, stats, config.resort_by)

        run.step = done = step + 1
        read_out = done % config.log_every == 0 or done == config.steps
        if read_out:
            logs = _read_out(done, run.result, window, log_coeff, stats, sae, config, ranks)
            logs["lr"] = optimizer.param_groups[0]["lr"]
            window.zero_()
            run.result.history.append(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", l0=f"{logs['l0']:.2f}", refresh=False)
            if callback is not None:
                callback(done, sae, logs)
        stop = done < config.steps and signals.stop_now(ranks, read_out, device)
        due = config.checkpoint_every > 0 and done % config.checkpoint_every == 0
        written = run.save(folder, config, ranks) if folder is not None and (due or stop) else None
        if stop:
            bar.close()
            raise _interrupted(signals, run, config, folder, written)
    bar.close()


def _interrupted(signals: DeferredSignals, run: _Run, config: TrainConfig, folder: Path | None,
                 written: Path | None) -> TrainingInterrupted:
    """The error that ends a run stopped by a signal after ``run.step`` steps (``written``: its checkpoint)."""
    signum = signals.received
    stopped = f"training stopped by {signum.name} after step {run.step} of {config.steps}"
    if written is not None:
        where = (f"checkpoint {written}; continue with train(..., checkpoint_dir={str(folder)!r}, resume=True) "
                 f"(CLI: --resume)")
    elif folder is not None:
        where = f"rank 0 wrote its checkpoint to {folder}"
    else:
        where = f"no checkpoint_dir, so nothing was saved; the SAE holds the parameters after step {run.step}"
    return TrainingInterrupted(f"{stopped}; {where}", signum, run.step, written, run.result)
