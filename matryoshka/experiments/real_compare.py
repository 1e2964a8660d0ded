"""The prefix modes on a real model's activations: does every-prefix training pay off off the toy?

Data: residual-stream activations of all-MiniLM-L6-v2 after encoder block 3 (d = 384) over the
prose of the Python 3.11 documentation (:mod:`matryoshka.realdata`), cached once into ``--acts``
(cached there first when absent), scaled to mean squared norm d.  The last ``HELD_OUT`` tokens
are held out: no run trains on them, every metric below is measured on them.

SAEs: TopK, n = 4096, k = 32, batch 512, Adam lr 2e-3 betas (0.9, 0.999), warm-up 5% / cool-down
20%, clip 1.0, decoder bias started at the data mean, dead-latent loss after 200 silent steps, and
no latent re-sorting, so the order is what each prefix mode's loss makes of it (vanilla: no order,
the control).  Modes: vanilla (one prefix n), groups (widths 512, 1024, 2048, 4096, equal weights),
sampled (10 prefixes a step), every (all 4096 prefixes, ``every_weights``: exact by default), or any
other study mode (:func:`matryoshka.experiments.common.study_mode`) with its trainer settings, e.g.
``every-b0.2-orth3`` (the β objective and the decoder orthogonality penalty of the toy studies) or
``every-resample``; ``-batchtopk`` trains a BatchTopK SAE with the same k.  Each run is single-threaded, ``jobs``
at a time; its seconds per step are measured in the same study, under the same load (a run reused
from the study's run cache, ``OUT/run_cache``, keeps the seconds of the study that ran it).

Measured per run, on the held-out tokens:

* FVU per prefix length m: ``E||x - x_hat_m||^2 / E||x - mean x||^2``, x_hat_m decoding latents
  0..m-1 only; dead latents (never fire on the held-out tokens, and, as the trainer counts them at
  the end, silent for its last ``dead_after`` = 200 steps); with a ``-resample`` mode, how many
  restarts it made in all; L0.
* Ordering: Spearman's rank correlation, over live latents, of a latent's position with its firing
  frequency and with its typical magnitude (mean activation when it fires; decoder rows have unit
  norm).  Matryoshka training should put frequent latents first (rho(position, frequency) < 0); a
  large-magnitude rare latent early in the order, the real-data face of the large-child concern,
  would show as rho(position, magnitude) < 0 with the frequency correlation weak.  Frequency and
  magnitude go together on real data, so each is also given with the other held fixed: the mean
  Spearman correlation within deciles of the other (:func:`ordering_correlations`), e.g.
  rho(position, magnitude | frequency) < 0 when, among latents that fire about as often, the larger
  ones sit earlier.  Energy is a latent's mean squared activation per token, frequency x
  E[a^2 | fires]: with unit decoder rows, the squared norm it adds to the reconstruction, roughly
  what a prefix gains by holding it; latents placed by energy alone show rho ~ 0 given the energy.
* Nesting: for each later latent j that fires at least ``MIN_FIRES`` times, its early partner
  i < j maximising P(i fires | j fires), kept as a co-firing pair when that probability is >= 0.5
  and at least 5x i's base rate (not a merely dense latent).  Reported: pairs per 1000 eligible
  latents, the share fully nested (i silent on <= 5% of j's firings), the mean rate at which i is
  silent when j fires (absorption-like gaps) and the mean decoder cosine of the pair.

Tables give mean ± 95% CI over seeds (Student t).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.stats
import torch

from ..activation_store import ActivationStore
from ..realdata import cache_activations
from ..sae import SAEConfig, SparseAutoencoder
from ..sparse_acts import SparseActs
from ..train import TrainConfig, train
from ..train_files import eval_lengths, heldout_fvu
from .common import (RUN_CACHE, ci95_half_width, format_table, run_many, study_activation, study_init, study_mode,
                     write_outputs)
from .plots import _save, mode_colors, plt

MODES = ("vanilla", "groups", "sampled", "every")
DEFAULT_STEPS = 300
QUICK_STEPS = 20
DEFAULT_SEEDS = 3
DEFAULT_TOKENS = 1_000_000
HELD_OUT = 32_768
MIN_FIRES = 20
DEAD_AFTER = 200  # silent training steps before the trainer counts a latent dead (and the dead-latent loss reaches it)
DUPLICATE_COSINE = 0.9  # a decoder row this close to a live latent's (|cosine|) counts as a duplicate
FULL = {"n": 4096, "k": 32, "batch": 512, "held_out": HELD_OUT}
QUICK = {"n": 512, "k": 32, "batch": 128, "held_out": 2048}
QUICK_TOKENS = 24_000
# The ordering probe's correlations (:func:`ordering_correlations`): key and table column, plain then partial.
ORDERING_PLAIN = {"rho_position_frequency": "position, frequency", "rho_position_magnitude": "position, magnitude",
                  "rho_position_energy": "position, energy", "rho_frequency_magnitude": "frequency, magnitude"}
# (| x: within the deciles of x, :func:`spearman_within_strata`)
ORDERING_PARTIAL = {"rho_position_frequency_given_magnitude": "position, frequency | magnitude",
                    "rho_position_magnitude_given_frequency": "position, magnitude | frequency",
                    "rho_position_frequency_given_energy": "position, frequency | energy",
                    "rho_position_magnitude_given_energy": "position, magnitude | energy"}
ORDERING = (*ORDERING_PLAIN, *ORDERING_PARTIAL)
STRATA = 10  # quantile bins of the quantity held fixed


def ci95(values) -> dict:
    """Mean and 95% confidence half-width over seeds (Student t; half-width NaN for one seed)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    return {"mean": float(x.mean()), "ci95": ci95_half_width(x), "n": int(x.size)}


def _cell(stat: dict, digits: int = 3) -> str:
    if stat["n"] == 0:
        return "–"
    if not np.isfinite(stat["ci95"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"


def spearman_within_strata(x, y, z, strata: int = STRATA) -> float:
    """Spearman correlation of ``x`` and ``y`` with ``z`` held (nearly) fixed: within each of
    ``strata`` quantile bins of ``z`` (tied values of ``z`` share a bin), weighted by the bins' sizes.
    Bins with fewer than four points, or where ``x`` or ``y`` is constant, are left out; NaN if no
    bin is left.  Unlike the linear partial correlation of ranks, this assumes nothing about how
    ``x`` and ``y`` depend on ``z`` (energy and magnitude, say, are far from linear in each other's
    ranks)."""
    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    strata_of = np.searchsorted(np.quantile(z, np.linspace(0, 1, strata + 1))[1:-1], z, side="right")
    total = weight = 0.0
    for stratum in np.unique(strata_of):
        inside = strata_of == stratum
        if inside.sum() >= 4 and np.ptp(x[inside]) > 0 and np.ptp(y[inside]) > 0:
            total += inside.sum() * scipy.stats.spearmanr(x[inside], y[inside]).statistic
            weight += inside.sum()
    return float(total / weight) if weight else float("nan")


def ordering_correlations(frequency, magnitude, energy) -> dict:
    """Spearman correlations over the live latents (frequency > 0) of their position with their firing
    frequency, magnitude and energy, and of frequency with magnitude (:data:`ORDERING_PLAIN`); then
    of position with frequency and with magnitude, with the other or the energy held fixed
    (:data:`ORDERING_PARTIAL`, :func:`spearman_within_strata`).  If latents were placed by energy
    alone, both correlations given the energy would be 0.  All NaN for fewer than four live latents."""
    frequency, magnitude, energy = (np.asarray(v, dtype=float) for v in (frequency, magnitude, energy))
    alive = frequency > 0
    if alive.sum() < 4:
        return dict.fromkeys(ORDERING, float("nan"))
    position, frequency, magnitude, energy = np.nonzero(alive)[0], frequency[alive], magnitude[alive], energy[alive]
    plain = scipy.stats.spearmanr(np.column_stack([position, frequency, magnitude, energy])).statistic
    partial = [spearman_within_strata(position, y, z) for y, z in
               ((frequency, magnitude), (magnitude, frequency), (frequency, energy), (magnitude, energy))]
    return dict(zip(ORDERING, [float(plain[0, 1]), float(plain[0, 2]), float(plain[0, 3]), float(plain[1, 2]),
                               *partial]))


@torch.no_grad()
def latent_probes(sae: SparseAutoencoder, x: torch.Tensor, batch: int = 4096) -> dict:
    """Per latent on rows ``x``: firing frequency, magnitude and energy (the ordering probe's data,
    :func:`ordering_correlations`); dead latents, L0 and the nesting pairs.  For the dead-latent
    probe, per latent: its largest pre-activation (``max_pre``; the dead-latent loss sees only
    positive ones), its largest margin over what it needed to fire (``max_margin``: pre-activation
    minus the token's k-th largest for TopK, minus the threshold for BatchTopK; > 0 where it fired)
    and the largest |cosine| of its decoder row with a live latent's (:func:`nearest_live_cosine`)."""
    n = sae.config.n
    sae.eval()
    counts = torch.zeros(n, dtype=torch.float64)
    sums = torch.zeros(n, dtype=torch.float64)
    squares = torch.zeros(n, dtype=torch.float64)
    max_pre = torch.full((n,), -torch.inf, dtype=torch.float64)
    max_margin = torch.full((n,), -torch.inf, dtype=torch.float64)
    rows, cols, l0 = [], [], 0.0
    for start, part in zip(range(0, x.shape[0], batch), x.split(batch)):
        out = sae(part)
        acts, pre = out.acts, out.pre.double()
        assert isinstance(acts, SparseActs)
        max_pre = torch.maximum(max_pre, pre.max(0).values)
        max_margin = torch.maximum(max_margin, (pre - _firing_bar(sae, pre)).max(0).values)
        active = acts.active()
        token, slot = active.nonzero(as_tuple=True)
        latent = acts.indices[token, slot]
        counts += torch.bincount(latent, minlength=n).double()
        value = acts.values[token, slot].double()
        sums += torch.bincount(latent, weights=value, minlength=n)
        squares += torch.bincount(latent, weights=value ** 2, minlength=n)
        rows.append((token + start).numpy())
        cols.append(latent.numpy())
        l0 += float(active.sum())
    tokens = x.shape[0]
    freq = (counts / tokens).numpy()
    magnitude = (sums / counts.clamp(min=1)).numpy()
    energy = (squares / tokens).numpy()
    alive = counts.numpy() > 0
    position = np.arange(n)

    # Co-firing counts C[i, j] = #tokens where both fire, from the sparse (tokens, n) firing matrix.
    r, c = np.concatenate(rows), np.concatenate(cols)
    fired = scipy.sparse.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(tokens, n))
    both = (fired.T @ fired).toarray()
    own = np.diag(both).copy()
    given = both / np.maximum(own, 1)[None, :]  # given[i, j] = P(i fires | j fires)
    eligible = own >= MIN_FIRES
    candidate = np.triu(np.ones((n, n), dtype=bool), k=1) & (given >= 5 * freq[:, None]) & eligible[None, :]
    scores = np.where(candidate, given, -1.0)
    partner = scores.argmax(0)
    best = scores[partner, position]
    pairs = np.nonzero(eligible & (best >= 0.5))[0]
    W = sae.W_dec.detach().double()
    W = (W / W.norm(dim=1, keepdim=True)).numpy()
    cosine = np.einsum("pd,pd->p", W[partner[pairs]], W[pairs]) if pairs.size else np.zeros(0)
    silent = 1.0 - best[pairs]
    sae.train()
    return {
        "dead": int((~alive).sum()), "l0": l0 / tokens,
        "frequency": freq.tolist(), "magnitude": magnitude.tolist(), "energy": energy.tolist(),
        "max_pre": max_pre.tolist(), "max_margin": max_margin.tolist(),
        "nearest_live_cosine": nearest_live_cosine(W, alive).tolist(),
        "nesting": {
            "eligible": int(eligible.sum()),
            "pairs_per_1000": 1000.0 * pairs.size / max(1, int(eligible.sum())),
            "fully_nested_share": float((silent <= 0.05).mean()) if pairs.size else float("nan"),
            "silent_rate": float(silent.mean()) if pairs.size else float("nan"),
            "decoder_cosine": float(cosine.mean()) if pairs.size else float("nan"),
            "pairs": [[int(partner[j]), int(j), float(best[j])] for j in pairs[:200]],
        },
    }


def _firing_bar(sae: SparseAutoencoder, pre: torch.Tensor) -> torch.Tensor:
    """What a pre-activation must exceed to fire, per row of ``pre`` (``(B, 1)``) or for all (a
    scalar): the row's k-th largest pre-activation (TopK; at least 0) or BatchTopK's inference
    threshold."""
    if sae.config.activation == "topk":
        return pre.topk(int(sae.config.k), dim=1).values[:, -1:].clamp(min=0)
    if sae.config.activation == "batchtopk":
        return sae.threshold.double().clamp(min=0)
    raise ValueError(f"the dead-latent probe knows TopK and BatchTopK SAEs, not {sae.config.activation!r}")


def nearest_live_cosine(W_dec: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """For each latent, the largest |cosine| between its decoder row and another live latent's
    (``alive``: bool per latent); NaN with no other live latent.  Near 1 for a duplicate."""
    unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    cosine = np.abs(unit @ unit[alive].T)
    cosine[np.nonzero(alive)[0], np.arange(int(alive.sum()))] = -np.inf  # a latent is not its own neighbour
    nearest = cosine.max(1, initial=-np.inf)
    return np.where(np.isfinite(nearest), nearest, np.nan)


def _activation(mode: str) -> str:
    """The SAE activation of a study mode here: TopK, or BatchTopK with a ``-batchtopk`` suffix (both
    with the study's k); ValueError for a mode that asks for another activation or for a start at the
    true features (a toy's; real activations have none)."""
    if study_init(mode) != "random":
        raise ValueError(f"mode {mode!r}: -fromtruth and -startangle start an SAE at a toy's true features; real "
                         f"activations have none")
    activation = study_activation(mode)
    if activation not in ("relu", "batchtopk"):  # ("relu": no activation suffix, the toy studies' default)
        raise ValueError(f"real-compare trains TopK SAEs (BatchTopK with -batchtopk); mode {mode!r} asks for "
                         f"{activation}")
    return "topk" if activation == "relu" else activation


def _kinds(modes) -> str:
    """The SAE kinds the modes train, for titles: "TopK", "BatchTopK" or "BatchTopK/TopK"."""
    return "/".join(sorted({"BatchTopK" if _activation(mode) == "batchtopk" else "TopK" for mode in modes}))


def train_study_sae(spec: dict):
    """Train one SAE of a real-data study by the recipe of the module doc, on one thread (a worker
    process) from the store the spec names.  Returns ``(sae, store, result, seconds)``, ``result`` the
    trainer's :class:`matryoshka.train.TrainResult`."""
    torch.set_num_threads(1)
    store = ActivationStore(spec["acts"], held_out_rows=spec["held_out"], scale=spec["scale"])
    n, seed = spec["n"], spec["seed"]
    prefix_mode, mode_settings = study_mode(spec["mode"])
    sae = SparseAutoencoder(SAEConfig(d=store.d, n=n, activation=_activation(spec["mode"]), k=spec["k"]),
                            generator=torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        sae.b_dec.copy_(store.sample(8192, torch.Generator().manual_seed(seed)).mean(0))
    recipe = dict(steps=spec["steps"], batch_size=spec["batch"], lr=2e-3, betas=(0.9, 0.999),
                  prefix_mode=prefix_mode, group_widths=[n // 8, n // 4, n // 2, n], resort_every=0,
                  dead_after=DEAD_AFTER, log_every=max(1, spec["steps"] // 5), seed=seed, progress=False,
                  every_weights=spec["every_weights"])
    config = TrainConfig(**{**recipe, **mode_settings})
    start = time.perf_counter()
    result = train(sae, store.sample, config)
    return sae, store, result, time.perf_counter() - start


def run_one(spec: dict) -> dict:
    """Train and measure one SAE (a worker process: one thread, the store opened here)."""
    sae, store, result, seconds = train_study_sae(spec)
    n = sae.config.n
    x = store.held_out()
    lengths = eval_lengths(n)
    return {"mode": spec["mode"], "activation": sae.config.activation, "settings": study_mode(spec["mode"])[1],
            "seed": spec["seed"],
            "seconds": seconds, "seconds_per_step": seconds / spec["steps"],
            "lengths": lengths, "fvu": heldout_fvu(sae, x, lengths), "history": result.history,
            "last_fired": (spec["steps"] - result.since_fired).tolist(),
            **latent_probes(sae, x)}


def _tables(summary: dict, lengths: list[int]) -> str:
    modes = list(summary)
    shown = [m for m in lengths if m >= 16]
    fvu = format_table([[str(m)] + [_cell(summary[mode]["fvu"][lengths.index(m)]) for mode in modes] for m in shown],
                       ["prefix length"] + modes)
    restarts = [("restarts", "restarts", 1)] if any(summary[mode]["restarts"]["n"] for mode in modes) else []
    keys = [("dead", "dead (held-out)", 1), ("dead_training", "dead (training)", 1), *restarts, ("l0", "L0", 2),
            ("seconds_per_step", "s / step", 3)]
    basics = format_table([[mode] + [_cell(summary[mode][k], d) for k, _, d in keys] for mode in modes],
                          ["mode"] + [label for _, label, _ in keys])
    plain, partial = (format_table([[mode] + [_cell(summary[mode][k]) for k in columns] for mode in modes],
                                   ["mode", *columns.values()]) for columns in (ORDERING_PLAIN, ORDERING_PARTIAL))
    nest_keys = [("pairs_per_1000", "pairs / 1000 latents", 1), ("fully_nested_share", "fully nested", 3),
                 ("silent_rate", "early silent when later fires", 3), ("decoder_cosine", "decoder cosine", 3)]
    nesting = format_table([[mode] + [_cell(summary[mode]["nesting"][k], d) for k, _, d in nest_keys] for mode in modes],
                           ["mode"] + [label for _, label, _ in nest_keys])
    dead = format_table([[mode] + [_cell(summary[mode]["dead_probe"][k]) for k in DEAD_PROBE] for mode in modes],
                        ["mode", *DEAD_PROBE.values()])
    return (f"Held-out fraction of variance unexplained by prefix length\n{fvu}\n\n"
            f"Dead latents, L0, training time\n{basics}\n\n"
            f"Ordering: Spearman rank correlation over live latents\n{plain}\n\n"
            f"Ordering with one quantity held fixed (| x: mean Spearman within deciles of x)\n{partial}\n\n"
            f"Nesting: co-firing pairs (early i < later j, P(i | j) >= 0.5 and >= 5x P(i))\n{nesting}\n\n"
            f"Dead latents (training count): shares of them, held-out pre-activations, training steps, decoders\n{dead}")


def _figures(by_mode: dict[str, list[dict]], summary: dict, lengths: list[int], title: str, folder: Path) -> list[Path]:
    fvu_path, order_path, plane_path, dead_path = (folder / name for name in (
        "real_fvu.png", "real_ordering.png", "real_frequency_magnitude.png", "real_dead.png"))
    # One colour per mode in every panel: a study mode (e.g. "every-cool0") has no colour of its own,
    # and matplotlib's colour cycle would give its lines in one panel different colours.
    colors = mode_colors(list(by_mode))
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in by_mode:
        mean = np.array([s["mean"] for s in summary[mode]["fvu"]])
        half = np.nan_to_num(np.array([s["ci95"] for s in summary[mode]["fvu"]]))
        ax.plot(lengths, mean, marker="o", ms=3, label=mode, color=colors[mode])
        ax.fill_between(lengths, mean - half, mean + half, alpha=0.2, color=colors[mode])
    ax.set(xscale="log", yscale="log", xlabel="prefix length m (latents 0..m-1)",
           ylabel="held-out FVU", title=title)
    ax.legend()
    _save(fig, fvu_path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, runs in by_mode.items():
        freq = np.array([r["frequency"] for r in runs])
        window = max(1, freq.shape[1] // 64)
        box = np.ones(window)
        # A dead latent's frequency is 0, its magnitude undefined: left out of the magnitude's average.
        live = (freq > 0).sum(0)
        mag = np.where(freq > 0, np.array([r["magnitude"] for r in runs]), 0.0).sum(0)
        with np.errstate(invalid="ignore"):
            smooth_mag = np.convolve(mag, box, mode="valid") / np.convolve(live, box, mode="valid")
        x = np.arange(len(smooth_mag)) + window // 2
        axes[0].plot(x, np.convolve(freq.mean(0), box / window, mode="valid"), label=mode, color=colors[mode])
        axes[1].plot(x, smooth_mag, label=mode, color=colors[mode])
    axes[0].set(yscale="log", xlabel="latent position", ylabel="firing frequency (held-out)")
    axes[1].set(xlabel="latent position", ylabel="mean activation when firing (live latents)")
    axes[0].legend()
    fig.suptitle(f"latent order: moving average over {window} positions, mean over seeds")
    _save(fig, order_path)

    # Frequency and magnitude go together; where each latent sits in that plane shows which of the two
    # the order follows (the partial correlations in the table, as a picture).
    fig, axes = plt.subplots(1, len(by_mode), figsize=(3.6 * len(by_mode), 3.6), squeeze=False, sharey=True)
    for ax, (mode, runs) in zip(axes[0], by_mode.items()):
        freq, mag = np.array(runs[0]["frequency"]), np.array(runs[0]["magnitude"])
        alive = freq > 0
        points = ax.scatter(freq[alive], mag[alive], c=np.arange(len(freq))[alive], cmap="viridis", s=3,
                            vmin=0, vmax=len(freq) - 1, rasterized=True)
        ax.set(xscale="log", xlabel="firing frequency (held-out)", title=f"{mode}, seed {runs[0]['seed']}")
    axes[0][0].set_ylabel("mean activation when firing")
    fig.colorbar(points, ax=axes[0].tolist(), label="latent position")
    _save(fig, plane_path)
    _dead_figure(by_mode, colors, dead_path)
    return [fvu_path, order_path, plane_path, dead_path]


def _dead_figure(by_mode: dict[str, list[dict]], colors: dict[str, str], path: Path) -> None:
    """The dead-latent probe as pictures: when the latents dead at the end last fired, where they sit
    in the order, and how close their decoders are to a live latent's (beside the live latents')."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for mode, runs in by_mode.items():
        color = colors[mode]
        steps = runs[0]["history"][-1]["step"]
        last = np.array([r["last_fired"] for r in runs])
        dead = last <= steps - DEAD_AFTER
        grid = np.linspace(0, steps, 201)
        # Dead at the end and silent since step s: a latent that died and came back is not counted.
        curve = np.array([[(last[i][dead[i]] <= s).sum() for s in grid] for i in range(len(runs))])
        axes[0].plot(grid, curve.mean(0), color=color, label=mode)
        n = last.shape[1]
        width = max(1, n // 32)
        share = [dead[:, start:start + width].mean() for start in range(0, n, width)]
        axes[1].step(np.arange(0, n, width), share, where="post", color=color, label=mode)
        nearest = np.array([r["nearest_live_cosine"] for r in runs], dtype=float)
        alive = np.array([r["frequency"] for r in runs]) > 0
        for values, style in ((nearest[dead], "-"), (nearest[alive], ":")):
            values = np.sort(values[np.isfinite(values)])
            if values.size:
                axes[2].plot(values, np.arange(1, values.size + 1) / values.size, style, color=color)
    axes[0].set(xlabel="training step s", ylabel="dead latents silent since step s",
                title="when the latents dead at the end last fired")
    axes[1].set(xlabel=f"latent position (bins of {width})", ylabel="share dead (training count)",
                title="where the dead latents sit")
    axes[2].set(xlabel="largest |cosine| of the decoder row with a live latent's", ylabel="cumulative share",
                title="dead (solid) and live (dotted) latents")
    axes[0].legend()
    fig.suptitle("dead latents (training count): left and middle mean over seeds, right pooled over seeds", y=1.03)
    _save(fig, path)


def real_compare(out: Path, acts: Path = Path("runs/real/acts"), steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS,
                 jobs: int = 2, modes: tuple[str, ...] = MODES, tokens: int = DEFAULT_TOKENS, quick: bool = False,
                 docs: Path | None = None, every_weights: str = "exact") -> dict:
    """Run the study, then :func:`report` it."""
    start = time.perf_counter()
    for mode in modes:
        _activation(mode)
    sizes = QUICK if quick else FULL
    cached = {}
    if not (acts.exists() and any(acts.glob("*.npy"))):
        print(f"no activations at {acts}: caching {QUICK_TOKENS if quick else tokens} tokens first")
        cached = cache_activations(acts, tokens=QUICK_TOKENS if quick else tokens)
    meta_file = acts / "meta.json"
    meta = cached or (json.loads(meta_file.read_text()) if meta_file.exists() else {})
    store = ActivationStore(acts, held_out_rows=sizes["held_out"])
    n = sizes["n"]
    # The data's row count and scale (from its own sample) stand for its identity in the run cache.
    specs = [{"acts": str(acts), "rows": store.rows, "scale": store.scale, "mode": mode, "seed": seed, "steps": steps,
              "every_weights": every_weights, **sizes} for mode in modes for seed in range(seeds)]
    print(f"data: {store.rows} tokens x d={store.d} from {acts} ({meta.get('model', 'unknown model')}, "
          f"layer {meta.get('layer', '?')}); {store.train_rows} train / {store.held_out_rows} held out; "
          f"scale {store.scale:.5g} (mean squared norm d)")
    print(f"{_kinds(modes)} n={n} k={sizes['k']}, batch {sizes['batch']}, {steps} steps = {steps * sizes['batch']} tokens per run, "
          f"modes {', '.join(modes)} (every: {every_weights} weights), seeds 0..{seeds - 1}, {jobs} process(es)")
    results = run_many(specs, jobs, desc="real-compare", worker=run_one, cache=out / RUN_CACHE)
    payload = {"study": "real-compare", "data": {**store.describe(), **meta}, "sizes": sizes, "steps": steps,
               "seeds": seeds, "modes": list(modes), "every_weights": every_weights, "jobs": jobs,
               "runtime_s": time.perf_counter() - start, "runs": results}
    return report(out, payload, docs)


# The dead-latent probe (:func:`dead_latent_probe`): key and table column.
DEAD_PROBE = {"never_positive": "no positive pre-act.", "fire_held_out": "fire held-out",
              "last_fired": "last fired (of steps)", "never_fired": "never fired",
              "position": "position (of n)", "duplicates": f"duplicates (|cos| >= {DUPLICATE_COSINE})",
              "nearest_cosine": "nearest live |cos|", "live_nearest_cosine": "live: nearest live |cos|"}


def dead_latent_probe(run: dict) -> dict:
    """What one run's dead latents (as the trainer counts them at the end: silent in training for
    ``DEAD_AFTER`` steps) look like, from :func:`latent_probes` on the held-out tokens and the
    training's ``last_fired``: the share with no positive pre-activation on any held-out token (out
    of the dead-latent loss's reach: it decodes ReLU'd pre-activations) and the share that fire
    there after all; the median step they last fired, as a share of the steps, and the share that
    never fired; their mean position as a share of n (0.5: spread evenly); the share whose decoder
    row duplicates a live latent's, and the median of their largest |cosine| with a live latent,
    beside the live latents' own.  NaN where the run has no dead latent."""
    steps = run["history"][-1]["step"]
    last_fired = np.asarray(run["last_fired"])
    n = last_fired.size
    dead = last_fired <= steps - DEAD_AFTER
    nearest = np.asarray(run["nearest_live_cosine"], dtype=float)
    live_nearest = float(np.nanmedian(nearest[np.asarray(run["frequency"]) > 0]))
    if not dead.any():
        return {**dict.fromkeys(DEAD_PROBE, float("nan")), "live_nearest_cosine": live_nearest}
    return {"never_positive": float((np.asarray(run["max_pre"])[dead] <= 0).mean()),
            "fire_held_out": float((np.asarray(run["max_margin"])[dead] > 0).mean()),
            "last_fired": float(np.median(last_fired[dead]) / steps), "never_fired": float((last_fired[dead] == 0).mean()),
            "position": float(np.nonzero(dead)[0].mean() / max(1, n - 1)),
            "duplicates": float((nearest[dead] >= DUPLICATE_COSINE).mean()),
            "nearest_cosine": float(np.nanmedian(nearest[dead])), "live_nearest_cosine": live_nearest}


def _mode_summary(runs: list[dict], lengths: int) -> dict:
    """Mean ± 95% CI over one mode's runs of every measured quantity (the ordering probe's from each
    run's per-latent lists)."""
    ordering = [ordering_correlations(r["frequency"], r["magnitude"], r["energy"]) for r in runs]
    dead = [dead_latent_probe(r) for r in runs]
    return {
        "fvu": [ci95([r["fvu"][i] for r in runs]) for i in range(lengths)],
        **{k: ci95([r[k] for r in runs]) for k in ("dead", "l0", "seconds_per_step")},
        "dead_training": ci95([r["history"][-1]["dead"] for r in runs]),
        "restarts": ci95([r["history"][-1].get("resampled") for r in runs]),  # (a -resample mode's, in all)
        **{k: ci95([o[k] for o in ordering]) for k in ORDERING},
        "nesting": {k: ci95([r["nesting"][k] for r in runs])
                    for k in ("pairs_per_1000", "fully_nested_share", "silent_rate", "decoder_cosine")},
        "dead_probe": {k: ci95([d[k] for d in dead]) for k in DEAD_PROBE},
    }


def report(out: Path, payload: dict, docs: Path | None = None) -> dict:
    """Summarise the runs of a results payload (mean ± 95% CI per mode), print the tables, and write
    ``results.json``, ``results.md`` and the figures into ``out`` (the figures and ``real_compare.md``
    into ``docs`` when given)."""
    results, modes, sizes, data = payload["runs"], payload["modes"], payload["sizes"], payload["data"]
    by_mode = {m: [r for r in results if r["mode"] == m] for m in modes}
    lengths = results[0]["lengths"]
    summary = {m: _mode_summary(runs, len(lengths)) for m, runs in by_mode.items()}
    tables = _tables(summary, lengths)
    print()
    print(tables)
    title = f"{_kinds(modes)} n={sizes['n']} k={sizes['k']}, {payload['steps']} steps, {payload['seeds']} seed(s)"
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(by_mode, summary, lengths, title, out)
    processes = f" ({payload['jobs']} processes)" if "jobs" in payload else ""  # (older results files lack it)
    header = (f"# real-compare: {title}\n\nData: {data['rows']} tokens of {data.get('model', data['path'])}, "
              f"{data.get('site', '')}; {data['held_out_rows']} held-out tokens. Every-prefix weights: "
              f"{payload['every_weights']}. Mean ± 95% CI over seeds. Total time {payload['runtime_s']:.0f} s"
              f"{processes}.\n\n")
    markdown = header + "```\n" + tables + "\n```\n"
    write_outputs(out, "results.json", {**payload, "summary": summary}, "results.md", [markdown], figures, docs,
                  "real_compare.md")
    print(f"total time {payload['runtime_s']:.0f} s")
    return {"summary": summary, "runs": results, "runtime_s": payload["runtime_s"]}


def replot(out: Path, docs: Path | None = None) -> dict:
    """Redo the summary, tables and figures from ``OUT/results.json`` without training."""
    return report(out, json.loads((out / "results.json").read_text()), docs)
