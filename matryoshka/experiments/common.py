"""Shared machinery of the studies: the training recipe, study modes, one tracked run, many runs in
parallel, mean ± 95% confidence-interval summaries (Student t over seeds) and plain-text tables.

Study modes (``--modes``; :func:`study_mode` parses them into a prefix mode and trainer settings):

* ``vanilla``, ``groups``, ``sampled``, ``every``: the trainer's prefix modes as they are.
* ``every-uniform``: ``every`` with uniform weights ``1/n``.
* ``every-b<β>`` (e.g. ``every-b0.3``): ``every`` with the inner prefixes scaled by β,
  ``L_n + β Σ_{l<n} ω_l L_l`` (``ω``: the exact every-prefix weights of the inner prefixes,
  renormalised to sum 1); ``every-uniform-b<β>``: the same with uniform ``ω``; a ``-norm`` suffix
  divides the objective by ``1 + β``.
* ``balanced-b<β>``: the fixed groups with weights ``β^(G-g)`` (``Prefixes.balanced``); ``-norm``
  divides by their sum.
* ``detached``: ``every`` (exact weights) with detached levels; ``detached-uniform``: with uniform
  weights; ``groups-detached``: the fixed groups with detached levels.
* any of these with a ``-pp`` suffix (e.g. ``every-pp``, ``every-uniform-pp``): the sparsity
  penalty of latent ``i`` scaled by the share of the prefix weight on prefixes holding it
  (``TrainConfig(sparsity_weighting="prefix")``, a per-prefix normalised penalty).
* any of these with a ``-freq`` suffix: latents re-sorted by firing frequency instead of mean
  squared activation.
* any of these with a suffix ``-orth<γ>`` (e.g. ``every-orth1``, ``vanilla-freq-orth0.1``): the
  decoder orthogonality penalty with weight γ (``TrainConfig(orthogonality_coeff=γ)``).
* any of these with a suffix ``-cv<λ>`` (e.g. ``every-b0.2-cv1``): the code-spread penalty with weight
  λ (``TrainConfig(code_spread_coeff=λ)``, :mod:`matryoshka.code_spread`); ``-cvfrom<f>`` (e.g.
  ``every-b0.2-cv0.3-cvfrom0.5``): only from the share ``f`` of the steps on
  (``TrainConfig(code_spread_start=f)``).
* any of these with a ``-jumprelu`` suffix (e.g. ``every-b0.2-jumprelu``, ``every-jumprelu-orth3``):
  a JumpReLU SAE instead of a ReLU one, its L0 penalty adapted to the toy's true L0 as the L1 is
  (:func:`study_activation`): an L0 instead of an L1 sparsity term, the rest of the recipe unchanged.
  With ``-batchtopk``: a BatchTopK SAE keeping the toy's true L0 per row on average (``k``, a
  fractional one), so no sparsity term at all.
* any of these with a ``-fromtruth`` suffix (e.g. ``every-b0.2-fromtruth-orth3``): the SAE starts at
  the toy's true dictionary (decoder rows the true directions, encoder their transpose, zero
  biases; :meth:`RunSpec.build_sae`) instead of a random one: does training keep what it did not find?
  With ``-startangle<α>`` (e.g. ``every-b0.2-orth3-startangle10``; 0 ≤ α ≤ 90) only one latent per
  family starts placed: in the plane of the family's parent and most frequent child, α degrees from
  the parent; the rest are random.  Does where a family's first latent forms decide its pair?
* any of these with a ``-resample`` suffix (e.g. ``every-b0.2-batchtopk-resample-orth3``): latents
  silent for ``dead_after`` steps restarted on the worst-reconstructed inputs, checked every
  :data:`RESAMPLE_EVERY` steps (``TrainConfig(resample_every=...)``, :mod:`matryoshka.resampling`);
  ``-dead<N>`` (e.g. ``every-b0.2-resample-dead300``): a latent counts as dead after ``N`` silent
  steps instead of the trainer's 1 000 (``TrainConfig(dead_after=N)``: resampling and the AuxK loss).
* any of these with a suffix ``-auxk<N>`` (e.g. ``every-auxk192``): the TopK/BatchTopK dead-latent
  loss decodes the ``N`` largest dead pre-activations per row instead of the trainer's 16
  (``TrainConfig(aux_k=N)``).
* any of these with a suffix ``-coeff<c>`` (e.g. ``every-b0.2-fromtruth-coeff0.3``): the adaptive
  sparsity coefficient starts at ``c`` instead of the recipe's 1e-3 (``TrainConfig(sparsity_coeff=c)``).
* any of these with a suffix ``-cool<f>`` (e.g. ``every-cool0``): the last share ``f`` of the steps
  in the learning-rate cool-down instead of the trainer's 0.2 (``TrainConfig(cooldown_frac=f)``;
  0: a constant rate to the end).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from tqdm.auto import tqdm

from ..durable_files import replace_file
from ..stop_signals import Interrupted, TerminateAsInterrupt
from ..metrics import LearningOrder, cosine_matrix, evaluate, match_latents
from ..prefixes import Prefixes
from ..sae import SAEConfig, SparseAutoencoder
from ..toy import ToyModel
from ..train import TrainConfig, every_prefix_weights, train
from .run_cache import RunCache

__all__ = [
    "study_mode", "study_activation", "study_init", "check_study_mode", "BASE_MODES", "RESAMPLE_EVERY",
    "RunSpec", "one_thread", "run_one", "run_many", "default_jobs", "history_band", "ci95_half_width", "summarize", "fmt",
    "format_table", "write_json", "RUN_CACHE",
    "write_outputs",
]


BASE_MODES = ("vanilla", "groups", "sampled", "every")
RUN_CACHE = "run_cache"  # the studies' folder of finished runs in their output folder (run_many's cache)
_NUMBER = r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)"
_MODE = re.compile(rf"^(every|every-uniform|balanced)-b{_NUMBER}(-norm)?$")
RESAMPLE_EVERY = 100  # the -resample suffix: steps between checks for dead latents (as often as re-sorting)


def _fraction(suffix: str, meaning: str) -> Callable[[str], float]:
    """The number of a ``-<suffix><f>`` study-mode suffix, refused unless in [0, 1]."""
    def convert(text: str) -> float:
        value = float(text)
        if value > 1:
            raise ValueError(f"study-mode suffix -{suffix}<f>: f is {meaning}, a number in [0, 1], got {text}")
        return value
    return convert


# Study-mode suffixes that set one trainer setting, to the number they end with ...
_NUMBER_SUFFIXES = (
    (re.compile(rf"^(.+)-orth{_NUMBER}$"), "orthogonality_coeff", float),  # the decoder orthogonality penalty γ
    (re.compile(rf"^(.+)-cv{_NUMBER}$"), "code_spread_coeff", float),  # the code-spread penalty λ
    (re.compile(rf"^(.+)-cvfrom{_NUMBER}$"), "code_spread_start",
     _fraction("cvfrom", "the share of the steps before the code-spread penalty applies")),
    (re.compile(rf"^(.+)-coeff{_NUMBER}$"), "sparsity_coeff", float),  # where the adaptive sparsity coefficient starts
    (re.compile(r"^(.+)-dead([0-9]+)$"), "dead_after", int),  # silent steps before a latent counts as dead
    (re.compile(r"^(.+)-auxk([0-9]+)$"), "aux_k", int),  # dead latents decoded per row by the TopK dead-latent loss
    (re.compile(rf"^(.+)-cool{_NUMBER}$"), "cooldown_frac",
     _fraction("cool", "the share of the steps in the learning-rate cool-down")),
)
# ... or to a fixed value,
_SETTING_SUFFIXES = {
    "-freq": ("resort_by", "frequency"),  # re-sort latents by firing frequency, not mean squared activation
    "-resample": ("resample_every", RESAMPLE_EVERY),  # dead latents restarted on the worst-reconstructed inputs
    "-pp": ("sparsity_weighting", "prefix"),  # the sparsity penalty weighted like the prefixes
}
# and the suffixes that set up the SAE, no trainer setting: its activation (ReLU without one) and
# its start (random without one).
_SAE_SUFFIXES = {"-jumprelu": ("activation", "jumprelu"), "-batchtopk": ("activation", "batchtopk"),
                 "-fromtruth": ("init", "truth")}
# -startangle<α>: one latent per family starts in the plane of its parent and most frequent child,
# α degrees from the parent (RunSpec.build_sae); the others start random.
_START_ANGLE = re.compile(rf"^(.+)-startangle{_NUMBER}$")


def study_mode(name: str) -> tuple[str, dict]:
    """``(prefix_mode, TrainConfig overrides)`` of a study mode name (see the module doc)."""
    prefix_mode, overrides, _ = _parse_study_mode(name)
    return prefix_mode, overrides


def study_activation(name: str) -> str:
    """The SAE activation of a study mode: ``"jumprelu"`` / ``"batchtopk"`` with a ``-jumprelu`` /
    ``-batchtopk`` suffix (anywhere in the chain of suffixes), else ``"relu"``."""
    return _parse_study_mode(name)[2].get("activation", "relu")


def study_init(name: str) -> str:
    """Where a study mode's SAE starts: ``"truth"`` with a ``-fromtruth`` suffix (the toy's true
    directions, :meth:`RunSpec.build_sae`), ``"angle<α>"`` with ``-startangle<α>`` (one latent per
    family at α degrees from its parent), else ``"random"``."""
    return _parse_study_mode(name)[2].get("init", "random")


def _parse_study_mode(name: str) -> tuple[str, dict, dict]:
    """``(prefix_mode, TrainConfig overrides, SAE settings)``: the suffixes peeled off one by one,
    then the base mode (:func:`_base_mode`)."""
    for pattern, key, convert in _NUMBER_SUFFIXES:
        match = pattern.match(name)
        if match is not None:
            prefix_mode, overrides, sae = _parse_study_mode(match.group(1))
            return prefix_mode, {**overrides, key: convert(match.group(2))}, sae
    for suffix, (key, value) in _SETTING_SUFFIXES.items():
        if name.endswith(suffix):
            prefix_mode, overrides, sae = _parse_study_mode(name[: -len(suffix)])
            return prefix_mode, {**overrides, key: value}, sae
    for suffix, (key, value) in _SAE_SUFFIXES.items():
        if name.endswith(suffix):
            prefix_mode, overrides, sae = _parse_study_mode(name[: -len(suffix)])
            return prefix_mode, overrides, _with_sae_setting(sae, key, value, name)
    match = _START_ANGLE.match(name)
    if match is not None:
        angle = float(match.group(2))
        if angle > 90:
            raise ValueError(f"study-mode suffix -startangle<a>: a is an angle from the parent towards its child, "
                             f"0 to 90 degrees, got {match.group(2)}")
        prefix_mode, overrides, sae = _parse_study_mode(match.group(1))
        return prefix_mode, overrides, _with_sae_setting(sae, "init", f"angle{angle:g}", name)
    return (*_base_mode(name), {})


def _with_sae_setting(sae: dict, key: str, value, name: str) -> dict:
    """``sae`` with ``key`` set, refused when another suffix of ``name`` set it already (two starts)."""
    if key in sae:
        raise ValueError(f"study mode {name!r} sets the SAE's {key} twice ({sae[key]!r} and {value!r})")
    return {**sae, key: value}


def _base_mode(name: str) -> tuple[str, dict]:
    """``(prefix_mode, TrainConfig overrides)`` of a study mode without suffixes."""
    if name in BASE_MODES:
        return name, {}
    if name == "every-uniform":
        return "every", {"every_weights": "uniform"}
    if name == "detached":
        return "every", {"detach": True}
    if name == "detached-uniform":
        return "every", {"detach": True, "every_weights": "uniform"}
    if name == "groups-detached":
        return "groups", {"detach": True}
    match = _MODE.match(name)
    if match is None:
        raise ValueError(f"unknown study mode {name!r}: use one of {', '.join(BASE_MODES)}, every-uniform, "
                         f"detached, detached-uniform, groups-detached, every-b<beta>, every-uniform-b<beta>, "
                         f"balanced-b<beta> (optionally with -norm), e.g. every-b0.3 or every-b0.3-norm; "
                         f"suffixes -pp (prefix-weighted penalty), -freq (frequency re-sorting), -jumprelu or "
                         f"-batchtopk (a JumpReLU or BatchTopK SAE), -fromtruth (start at the true features), "
                         f"-startangle<a> (one latent per family starts a degrees from its parent), "
                         f"-resample (dead latents restarted), -dead<N> (dead after N silent steps), -auxk<N> "
                         f"(N dead latents in the dead-latent loss), -cool<f> (share of the steps in the "
                         f"learning-rate cool-down), -cv<lambda> (code-spread penalty), -cvfrom<f> (share of the "
                         f"steps before it applies), -coeff<c> (the sparsity coefficient's start) and "
                         f"-orth<gamma> (decoder orthogonality penalty), e.g. every-orth1")
    kind, beta, norm = match.groups()
    overrides = {"balance_beta": float(beta), "balance_normalise": norm is not None}
    if kind == "every-uniform":
        overrides["every_weights"] = "uniform"
    return ("balanced" if kind == "balanced" else "every"), overrides


def check_study_mode(name: str) -> str:
    """``argparse`` type of ``--modes``: the name if :func:`study_mode` accepts it."""
    import argparse

    try:
        study_mode(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


@dataclass(frozen=True)
class RunSpec:
    """One training run: a toy model, a prefix mode and a seed, on the toy recipe.

    The recipe (Nabeshima's, with the step count as a knob): as many latents as features, ReLU with
    an L1 coefficient adapted to the toy's true L0 (a ``-jumprelu`` mode: JumpReLU with its L0
    coefficient adapted alike; ``-batchtopk``: BatchTopK keeping that L0), Adam lr 3e-2 with betas
    (0.5, 0.9375), clipping at 1.0, batch 200, latents re-sorted every 100 steps, ``num_sampled``
    prefixes per step.
    ``mode`` is a study mode (:func:`study_mode`); ``train_overrides`` replaces any other
    :class:`TrainConfig` field.
    """

    toy_spec: dict
    mode: str
    seed: int
    steps: int
    num_sampled: int = 10
    log_every: int = 100
    eval_samples: int = 20_000
    train_overrides: dict = field(default_factory=dict)

    def sae_config(self, toy: ToyModel) -> SAEConfig:
        activation = study_activation(self.mode)
        return SAEConfig(d=toy.d, n=toy.num_features, activation=activation,
                         k=toy.expected_l0() if activation == "batchtopk" else None)

    def build_sae(self, toy: ToyModel) -> SparseAutoencoder:
        """The SAE this run trains: seeded random; or (a ``-fromtruth`` mode) the toy's true
        dictionary: unit decoder rows along the true directions, the encoder their transpose, zero
        biases (the directions being orthogonal, a ReLU or JumpReLU SAE there encodes and decodes every
        sample exactly); or (``-startangle<α>``) seeded random but for latent ``i``, which starts,
        decoder and encoder alike, at ``cos α p̂ + sin α ĉ`` in family ``i``'s plane (its parent ``p``,
        its most frequent child ``c``: :meth:`ToyModel.family_planes`)."""
        sae = SparseAutoencoder(self.sae_config(toy), generator=torch.Generator().manual_seed(10_000 + self.seed))
        init = study_init(self.mode)
        if init == "random":
            return sae
        unit = toy.directions / toy.directions.norm(dim=1, keepdim=True)
        with torch.no_grad():
            if init == "truth":
                sae.W_dec.copy_(unit)
                sae.W_enc.copy_(sae.W_dec.T)
            elif init.startswith("angle"):
                # Latent i starts in family i's plane, at the angle from the parent towards its most
                # frequent child (the others as drawn): where a first latent forms decides the turn?
                angle = math.radians(float(init.removeprefix("angle")))
                planes = toy.family_planes()
                if not planes:
                    raise ValueError(f"mode {self.mode!r}: -startangle needs a toy with parent/child families")
                for latent, (parent, child, _) in enumerate(planes):
                    sae.W_dec[latent] = math.cos(angle) * unit[parent] + math.sin(angle) * unit[child]
                    sae.W_enc[:, latent] = sae.W_dec[latent]
        return sae

    def train_config(self, toy: ToyModel) -> TrainConfig:
        prefix_mode, mode_settings = study_mode(self.mode)
        recipe = dict(
            steps=self.steps, batch_size=200, lr=3e-2, betas=(0.5, 0.9375), clip_norm=1.0,
            prefix_mode=prefix_mode, num_sampled=self.num_sampled, target_l0=toy.expected_l0(),
            # Start with a weak L1 and let the adaptive rule raise it: a strong start kills
            # latents before the coefficient settles, and dead ReLU latents never recover.
            sparsity_coeff=1e-3, resort_every=100, log_every=self.log_every, seed=self.seed,
            progress=False,
        )
        return TrainConfig(**{**recipe, **mode_settings, **self.train_overrides})

    def train(self, toy: ToyModel, callback=None) -> tuple[SparseAutoencoder, TrainConfig]:
        """Build this run's SAE and train it on ``toy``'s samples (``callback`` at every read-out);
        returns the trained SAE and its config."""
        sae, config = self.build_sae(toy), self.train_config(toy)
        train(sae, lambda rows, g: toy.sample(rows, g)[0], config, callback=callback)
        return sae, config


class _Tracker:
    """Training callback: decoder-truth cosines every ``log_every`` steps, summarised per step."""

    def __init__(self, toy: ToyModel) -> None:
        self.toy = toy
        self.order = LearningOrder(toy.num_features)
        self.rows: list[dict] = []

    def __call__(self, step: int, sae: SparseAutoencoder, logs: dict) -> None:
        cos = cosine_matrix(sae.W_dec, self.toy.directions)
        self.order.update(step, cos)
        best, latent = cos.abs().max(0)
        # For a feature with a parent: the cosine of its best latent with the parent's direction,
        # the decoder-side trace of absorption as it develops.
        with_parent = [float(cos[latent[f], p]) if p >= 0 else None for f, p in enumerate(self.toy.parents)]
        self.rows.append({
            "step": step, "loss": logs["loss"], "recon": logs["recon"], "l0": logs["l0"],
            "sparsity_coeff": logs["sparsity_coeff"], "mcc": match_latents(cos).mcc,
            "best_cos": best.tolist(), "best_latent": latent.tolist(), "best_cos_with_parent": with_parent,
        })


@contextlib.contextmanager
def one_thread():
    """Run a toy study's run on one thread (tiny matrices: threads only add overhead, and one keeps
    runs bit-identical), giving the caller its thread count back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_one(spec: RunSpec) -> dict:
    """Train one SAE as ``spec`` says; return its config, tracked history and final metrics (JSON-able)."""
    cpu_start = time.process_time()
    with one_thread():
        toy = ToyModel(spec.toy_spec)
        n = toy.num_features
        tracker = _Tracker(toy)
        sae, config = spec.train(toy, callback=tracker)
        # One common yardstick for every mode: the expected loss of the sampled recipe.
        objective = Prefixes.every(n, every_prefix_weights(n, min(spec.num_sampled, n)))
        metrics = evaluate(sae, toy, objective, num_samples=spec.eval_samples)
    return {
        "spec": asdict(spec),
        "sae_config": asdict(sae.config),
        "train_config": asdict(config),
        "metrics": metrics,
        "learning_order": tracker.order.as_dict(),
        "history": tracker.rows,
        "seconds": time.process_time() - cpu_start,  # this run's CPU time (training and evaluation)
    }


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class Runs(list):
    """:func:`run_many`'s results, in the order of the specs; ``reused``: how many came from the run
    cache (their training is not in the study's wall time)."""

    reused: int = 0


def runs_line(payload: dict) -> str:
    """A study's closing line: its runs, how many were reused from the run cache, its wall time and
    its runs' training CPU (``payload``'s ``runs``, ``reused``, ``wall_s`` and ``cpu_s``)."""
    reused = payload.get("reused", 0)
    note = f" ({reused} reused from {RUN_CACHE}: their training is not in the wall time)" if reused else ""
    return f"{len(payload['runs'])} runs{note}, {payload['wall_s']:.0f} s wall, {payload['cpu_s']:.0f} s training CPU"


def run_many(specs: Sequence, jobs: int, desc: str = "runs", worker: Callable[[Any], dict] = run_one,
             cache: Path | None = None) -> Runs:
    """Run ``worker`` (default :func:`run_one`, a module-level function) on every spec, ``jobs``
    processes at a time; results in the order of ``specs``.

    Runs are independent and single-threaded, so processes are how 2 cores give 2x; each result
    depends only on its spec, whatever ``jobs`` is.  ``spawn`` (not fork) because forking a process
    that has started torch's thread pools can deadlock.

    ``cache``: a folder where each finished run is stored as it ends and from which runs of the same
    spec under the same code are reused (:mod:`.run_cache`): a study stopped half-way and started
    again does only the runs it had not finished; the result's ``reused`` counts them.  Ctrl-C or SIGTERM raise :class:`Interrupted` (a
    ``KeyboardInterrupt``) with the signal, saying how many runs are kept.
    """
    store = RunCache(cache, worker) if cache is not None else None
    results = [store.get(spec) if store else None for spec in specs]
    todo = [i for i, result in enumerate(results) if result is None]
    if store and len(todo) < len(specs):
        print(f"{desc}: {len(specs) - len(todo)} of {len(specs)} runs reused from {cache}")

    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=desc, unit="run", leave=False)

    def finished(i: int, result: dict) -> None:
        results[i] = store.put(specs[i], result) if store else result
        bar.update()

    try:
        # kill (SIGTERM) stops the study as Ctrl-C does: the runs under way end and are kept.
        with TerminateAsInterrupt():
            if jobs <= 1:
                for i in todo:
                    finished(i, worker(specs[i]))
            elif todo:
                _run_in_processes(worker, specs, todo, jobs, finished)
    except BaseException as error:
        if store is None:
            raise
        done = sum(result is not None for result in results)
        kept = (f"{desc}: stopped with {done} of {len(specs)} runs finished, kept in {cache}; the same command "
                f"continues from there")
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C or kill: this says more than a worker's TrainingInterrupted
            raise Interrupted(kept, getattr(error, "signal", signal.SIGINT)) from error
        tqdm.write(kept)
        raise
    finally:
        bar.close()
    runs = Runs(results)
    runs.reused = len(specs) - len(todo)
    return runs


def _run_in_processes(worker: Callable[[Any], dict], specs: Sequence, todo: list[int], jobs: int,
                      finished: Callable[[int, dict], None]) -> None:
    """``finished(i, worker(specs[i]))`` for every ``i`` in ``todo``, in ``jobs`` spawned processes.

    The pool holds only the ``jobs`` runs under way (it would start any run handed to it, even
    after a failure or Ctrl-C), so on a failed run, Ctrl-C or SIGTERM no further run starts; the runs
    under way end and those that succeed are still handed to ``finished``.  Ctrl-C reaches the
    workers too and stops their runs at the next step; a SIGTERM sent to the parent alone lets them
    finish (a second one ends the parent at once).
    """
    context = multiprocessing.get_context("spawn")
    waiting = iter(todo)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running = {pool.submit(worker, specs[i]): i for i in itertools.islice(waiting, jobs)}
        try:
            while running:
                for future in wait(running, return_when=FIRST_COMPLETED).done:
                    finished(running.pop(future), future.result())
                    for i in itertools.islice(waiting, 1):
                        running[pool.submit(worker, specs[i])] = i
        except BaseException:
            for future in wait(running).done:
                if future.exception() is None:
                    finished(running[future], future.result())
            raise


def history_band(runs: Sequence[dict], value: Callable[[dict], float | None]) -> tuple[list[int], np.ndarray]:
    """``(steps, (runs, steps) array)`` of ``value(history row)`` across runs (same steps in each);
    ``None`` becomes NaN."""
    steps = [row["step"] for row in runs[0]["history"]]
    table = [[np.nan if (v := value(row)) is None else v for row in run["history"]] for run in runs]
    return steps, np.asarray(table, dtype=float)


def ci95_half_width(values: np.ndarray) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t, ``n - 1`` degrees of
    freedom, sample std); NaN for fewer than 2 values, 0 when they are all equal."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float("nan")
    return float(scipy.stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std", "ci95", "n"}`` over seeds (NaNs, e.g. never-learned steps, are left out);
    ``std`` is the population std (ddof 0), ``ci95`` the t-interval half-width (:func:`ci95_half_width`)."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "ci95": ci95_half_width(finite),
            "n": int(finite.size)}


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned first column, right-aligned others, widths fitted to the content."""
    table = [header, *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]
        return "  ".join(cells)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def fmt(stat: dict, digits: int = 3) -> str:
    """``mean ± 95% CI half-width`` over seeds; just the mean for one seed, ``–`` when no seed has a value."""
    if stat["n"] == 0:
        return "–"
    if stat["n"] < 2 or not np.isfinite(stat.get("ci95", float("nan"))):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"


def _strict(value):
    """NaN/inf become ``null``: strict JSON has no spelling for them; numpy scalars become Python ones."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_outputs(out: Path, json_name: str, payload: dict, md_name: str, md: list[str], figures: list[Path],
                  docs: Path | None = None, docs_md_name: str | None = None) -> None:
    """Write ``payload`` as JSON and ``md`` (lines) as markdown into ``out``; with ``docs``, copy the
    figures and the markdown (as ``docs_md_name``) there too; print what was written."""
    write_json(out / json_name, payload)
    (out / md_name).write_text("\n".join(md))
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in figures:
            (docs / f.name).write_bytes(f.read_bytes())
        (docs / (docs_md_name or md_name)).write_text("\n".join(md))
    print(f"\nwrote {out / json_name}, {out / md_name}, " + ", ".join(map(str, figures)))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(_strict(payload), indent=1).encode())
