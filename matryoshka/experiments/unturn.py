"""``python -m matryoshka unturn``: pick a turned pair's basis after training, and see whether
training keeps it (research question 1).

From ``q = P(child | parent) = 1/2`` on, the objective likes the turned pair at least as well as the
true one, and random starts turn nearly every such family ("Why a frequent child turns its
parent's pair", "Where training commits to the turn").  Started at the truth, training keeps it
while the sparsity term is weak ("Started at the truth").  So the truth is a basin that training
does not find but can stay in.  This study puts trained SAEs there by a rule outside the loss
(:func:`matryoshka.unturn.unturn`: a parent's code should not vary with its children) and
trains on.

Per run (:class:`UnturnSpec`, :func:`run_unturn`): train the recipe (``--mode``, default
``every-b0.2-orth3``) on an ``unequal-q<q>`` toy; re-base its nested latents on fresh samples; train the
re-based SAE again with the same recipe for ``retrain_steps`` (a fresh schedule: warm-up, the adaptive
sparsity coefficient from its start, cool-down; new data); and, as the control, train the SAE as it
was before the re-basing for the same steps.  ``order`` (``--order``, :data:`ORDERS`): the
latents' order once re-based: re-sorted by energy (the default, ``unturn``'s), ``kept`` (each child
in the place of the turned latent it replaced: ``unturn(..., resort=False)``), or ``children-last``
(re-sorted, then only the re-based children's latents moved to the end: the children's place
changed alone).  ``retrain="fixed"`` (``--retrain fixed``) trains on
with the sparsity coefficient held at the recipe's start (1e-3) instead of adapted to the toy's L0:
whether the adaptive coefficient's climb is what turns the truth again.  ``retrain_warmup`` and
``retrain_resort_every`` (``--retrain-warmup``, ``--retrain-resort-every``; ``None``: the recipe's
5% and 100 steps) set the schedule of both stages trained on: a child out of its place is pulled on
until the trainer's first re-sort puts it back, and that pull acts during the learning-rate warm-up,
so the two are varied apart.  ``retrain_beta`` (``--retrain-beta``; ``None``: the mode's) scales the
inner prefixes of both stages trained on (``TrainConfig.balance_beta``): the objective's pull on a
child out of its place comes from the prefixes between it and its parent, and at β = 0 there are
none.  ``retrain_budget`` (``--retrain-budget``; a BatchTopK mode only) multiplies the share of the
batch BatchTopK keeps (its ``k``) while training on: whether the batch's cut of the smallest true
codes is what takes BatchTopK out of the basin.  ``parent_std`` (``--parent-std``): each family parent's magnitude
drawn from a normal law of mean 1 and that standard deviation instead of fixed at 1
(:func:`with_parent_std`); ``parent_scale`` (``--parent-scale``): each family parent's magnitude
multiplied by it where its most frequent child fires (:func:`with_parent_scale`: a parent whose
magnitude depends on which child fires, against the rule's assumption); ``parent_rule`` (``--parent-rule``): how the re-basing picks the
parent's direction (:data:`matryoshka.unturn.PARENT_RULES`); ``min_correlation``
(``--min-correlation``): the re-basing's detection threshold (a varying parent's own spread dilutes
a turned latent's correlation).  At each :data:`STAGES`, each family's state in the
plane of its parent and most frequent child (:func:`~.turn_dynamics.end_state`: true, turned or
other), whether its sibling is entangled (:func:`_entangled`), and the SAE's metrics (MCC, L0,
explained variance); for the two stages trained on, the sparsity coefficient's largest and last
values over the training on.

Tables per q: the families' states and the metrics (mean ± 95% CI over seeds) at each stage; each
family's path from its re-based state to its state after training on; and the share the re-basing
made true among the families whose sibling was entangled in the trained SAE and among the others.
Figure: the families' states per stage, stacked bars.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..metrics import cosine_matrix, evaluate
from ..toy import ToyModel
from ..train import train
from ..unturn import PARENT_RULES, Rebasing, check_settings, reorder, unturn
from .common import (RUN_CACHE, RunSpec, fmt, format_table, one_thread, run_many, runs_line, study_activation,
                     study_mode, summarize, write_outputs)
from .hedging import UNEQUAL_PREFIX, family_toy_spec
from .orthogonality import share_interval
from .turn_dynamics import END_STATES, end_state

__all__ = ["UnturnSpec", "run_unturn", "children_last", "with_parent_std", "with_parent_scale", "ORDERS", "PARENT_RULES", "unturn_study", "report", "replot", "STAGES", "RETRAINS", "DEFAULT_QS"]

DEFAULT_QS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_MODE = "every-b0.2-orth3"
DEFAULT_STEPS = 6_000
DEFAULT_RETRAIN_STEPS = 2_000
DEFAULT_SEEDS = 10
QUICK_STEPS = 200
STAGES = ("trained", "re-based", "re-based, trained on", "control: trained on")
TRAINED_ON = STAGES[2:]
ORDERS = ("re-sorted", "kept", "children-last")  # the latents' order once re-based (module doc)
RETRAINS = ("recipe", "fixed")  # how the stages trained on set the sparsity coefficient (module doc)
_RETRAIN_TEXT = {"recipe": "the recipe's adaptive sparsity coefficient",
                 "fixed": "the sparsity coefficient held at its start"}
ENTANGLED = 0.3  # |cos| of a latent along the sibling and along the parent or the child


@dataclass(frozen=True)
class UnturnSpec:
    """One run: a family toy, a study mode and a seed on the toy recipe, ``steps`` of training, the
    re-basing from ``samples`` fresh inputs, then ``retrain_steps`` more (module doc)."""

    toy_spec: dict
    mode: str
    seed: int
    steps: int
    retrain_steps: int = DEFAULT_RETRAIN_STEPS
    samples: int = 20_000
    retrain: str = RETRAINS[0]
    order: str = ORDERS[0]
    retrain_warmup: float | None = None
    retrain_resort_every: int | None = None
    retrain_beta: float | None = None
    retrain_budget: float = 1.0
    parent_rule: str = PARENT_RULES[0]
    min_correlation: float = 0.5

    def retrain_overrides(self) -> dict:
        """The :class:`~matryoshka.train.TrainConfig` fields this run sets for training on, beyond the
        recipe's: the warm-up's share, the re-sort period and the inner prefixes' scale, where given."""
        given = {"warmup_frac": self.retrain_warmup, "resort_every": self.retrain_resort_every,
                 "balance_beta": self.retrain_beta}
        return {key: value for key, value in given.items() if value is not None}


def run_unturn(spec: UnturnSpec) -> dict:
    """One run of the study (module doc); JSON-able."""
    cpu_start = time.process_time()
    with one_thread():
        toy = ToyModel(spec.toy_spec)
        sae, config = RunSpec(spec.toy_spec, spec.mode, spec.seed, spec.steps).train(toy)
        stages = {"trained": _measure(sae, toy)}
        control = copy.deepcopy(sae)
        inputs = toy.sample(spec.samples, torch.Generator().manual_seed(20_000 + spec.seed))[0]
        moved = unturn(sae, inputs, resort=spec.order != "kept", parent_rule=spec.parent_rule,
                       min_correlation=spec.min_correlation)
        if spec.order == "children-last":
            moved = children_last(sae, moved)
        stages["re-based"] = _measure(sae, toy)
        # The recipe again from the SAE it is given: new data, a fresh schedule; "fixed": the
        # coefficient held at its start (no target L0 to adapt it to).
        again = dataclasses.replace(config, steps=spec.retrain_steps, seed=config.seed + 1,
                                    target_l0=config.target_l0 if spec.retrain == "recipe" else None,
                                    **spec.retrain_overrides())
        for name, model in zip(TRAINED_ON, (sae, control)):
            if spec.retrain_budget != 1:  # a BatchTopK SAE (the study checks): keep more of each batch
                model.config.k *= spec.retrain_budget
            history = train(model, lambda rows, g: toy.sample(rows, g)[0], again).history
            coefficients = [row["sparsity_coeff"] for row in history]
            stages[name] = {**_measure(model, toy), "coeff_max": max(coefficients), "coeff_end": coefficients[-1]}
    return {"spec": asdict(spec), "stages": stages, "moved": [asdict(m) for m in moved],
            "qs": [q for _, _, q in toy.family_planes()], "seconds": time.process_time() - cpu_start}


def children_last(sae, moved: list[Rebasing]) -> list[Rebasing]:
    """Move the re-based children's latents to the end of ``sae``'s order, in place, the rest keeping
    theirs; ``moved`` with its indices in the new order."""
    children = [c for m in moved for c in m.children]
    return reorder(sae, moved, [i for i in range(sae.config.n) if i not in children] + children)


def with_parent_std(toy_spec: dict, std: float) -> dict:
    """``toy_spec`` with each family parent's magnitude normal of mean 1 and standard deviation
    ``std`` (clipped at 0 by the toy), its children's left fixed; ``std = 0``: ``toy_spec`` itself."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"parent_std must be a finite number >= 0, got {std}")
    if std == 0:
        return toy_spec
    spec = copy.deepcopy(toy_spec)
    for feature in spec["features"]:
        if feature.get("children"):
            feature["magnitude"] = {"mean": 1.0, "std": std}
    return spec


def with_parent_scale(toy_spec: dict, scale: float) -> dict:
    """``toy_spec`` with each family parent's magnitude multiplied by ``scale`` on the samples where its
    most frequent child fires (the toy's ``parent_scale``), so that the parent's magnitude depends on
    which child fires; ``scale = 1``: ``toy_spec`` itself.  Such inputs are also those of a parent of
    fixed magnitude whose child leans towards it, by ``atan(scale − 1)`` for directions of equal norm
    (the toy's module doc)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"parent_scale must be a finite number > 0, got {scale}")
    if scale == 1:
        return toy_spec
    spec = copy.deepcopy(toy_spec)
    for feature in spec["features"]:
        if feature.get("children"):
            max(feature["children"], key=lambda child: float(child["p"]))["parent_scale"] = scale
    return spec


def _measure(sae, toy: ToyModel) -> dict:
    """Each family's state in its plane and whether its sibling is entangled (:func:`_entangled`),
    and the SAE's MCC, L0 and explained variance."""
    cos = cosine_matrix(sae.W_dec, toy.directions)
    metrics = evaluate(sae, toy)
    return {"families": [end_state(cos[:, p].tolist(), cos[:, c].tolist()) for p, c, _ in toy.family_planes()],
            "entangled": _entangled(cos, toy), **{key: metrics[key] for key in ("mcc", "l0", "explained_variance")}}


def _entangled(cos: torch.Tensor, toy: ToyModel) -> list[bool]:
    """Per family: does a latent lie along its *sibling* (the most frequent child but one) and along
    its parent or its most frequent child (|cos| ≥ :data:`ENTANGLED` with both)?  Then three
    latents share three features: a three-way turn, which the re-basing undoes only with both of its
    child directions (:data:`matryoshka.unturn.MAX_CHILDREN`)."""
    frequency = toy.marginal_probabilities()
    children = dict(toy.families())
    out = []
    for parent, child, _ in toy.family_planes():
        others = [f for f in children[parent] if f != child]
        if not others:
            out.append(False)
            continue
        sibling = max(others, key=lambda f: float(frequency[f]))
        along = (cos[:, parent].abs() >= ENTANGLED) | (cos[:, child].abs() >= ENTANGLED)
        out.append(bool((along & (cos[:, sibling].abs() >= ENTANGLED)).any()))
    return out


def unturn_study(out: Path, qs: Sequence[float] = DEFAULT_QS, mode: str = DEFAULT_MODE, steps: int = DEFAULT_STEPS,
                 retrain_steps: int = DEFAULT_RETRAIN_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
                 retrain: str = RETRAINS[0], order: str = ORDERS[0], retrain_warmup: float | None = None,
                 retrain_resort_every: int | None = None, retrain_beta: float | None = None, retrain_budget: float = 1.0,
                 parent_std: float = 0.0, parent_scale: float = 1.0,
                 parent_rule: str = PARENT_RULES[0], min_correlation: float = 0.5, docs: Path | None = None) -> dict:
    """Run ``seeds`` runs on each ``unequal-q<q>`` toy, report (module doc) and write
    ``unturn_results.json``/``.md`` and the figure into ``out`` (and ``docs``)."""
    if steps < 1 or retrain_steps < 1:
        raise ValueError(f"steps and retrain_steps must be >= 1, got {steps} and {retrain_steps}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if retrain not in RETRAINS:
        raise ValueError(f"retrain must be one of {RETRAINS}, got {retrain!r}")
    if retrain_warmup is not None and not 0 <= retrain_warmup <= 1:
        raise ValueError(f"retrain_warmup must be a share of the steps in [0, 1] (or None: the recipe's), got {retrain_warmup}")
    if retrain_resort_every is not None and (isinstance(retrain_resort_every, bool) or not isinstance(retrain_resort_every, int)
                                             or retrain_resort_every < 0):
        raise ValueError(f"retrain_resort_every must be an integer >= 0 (0: never; None: the recipe's), got {retrain_resort_every!r}")
    if retrain_beta is not None and (study_mode(mode)[0] != "every" or not (math.isfinite(retrain_beta) and retrain_beta >= 0)):
        raise ValueError(f"retrain_beta must be a finite number >= 0 (the inner prefixes' scale) with an 'every' mode, "
                         f"got {retrain_beta} with mode {mode!r}")
    if retrain_budget != 1 and (study_activation(mode) != "batchtopk" or not (math.isfinite(retrain_budget) and retrain_budget > 0)):
        raise ValueError(f"retrain_budget must be a finite number > 0 (a multiple of BatchTopK's k) with a BatchTopK mode, "
                         f"got {retrain_budget} with mode {mode!r}")
    check_settings(min_correlation=min_correlation, parent_rule=parent_rule)
    # refuses a q outside (0, 0.83], a bad parent_std or parent_scale now
    toys = {q: with_parent_scale(with_parent_std(family_toy_spec(f"{UNEQUAL_PREFIX}{q:g}"), parent_std), parent_scale)
            for q in qs}
    start = time.perf_counter()
    settings = {"mode": mode, "qs": list(qs), "steps": steps, "retrain_steps": retrain_steps, "retrain": retrain,
                "order": order, "retrain_warmup": retrain_warmup, "retrain_resort_every": retrain_resort_every,
                "retrain_beta": retrain_beta, "retrain_budget": retrain_budget, "parent_std": parent_std,
                "parent_scale": parent_scale, "parent_rule": parent_rule, "min_correlation": min_correlation, "seeds": seeds}
    print(f"unturn: {_settings_text(settings)}, q in {list(qs)} (and the control, trained on without the "
          f"re-basing); {jobs} process(es)")
    specs = [UnturnSpec(toys[q], mode, seed, steps, retrain_steps, retrain=retrain, order=order,
                        retrain_warmup=retrain_warmup, retrain_resort_every=retrain_resort_every, retrain_beta=retrain_beta,
                        retrain_budget=retrain_budget, parent_rule=parent_rule,
                        min_correlation=min_correlation)
             for q in qs for seed in range(seeds)]
    results = run_many(specs, jobs, desc="unturn", worker=run_unturn, cache=out / RUN_CACHE)
    payload = {**settings, "runs": results, "reused": results.reused, "wall_s": time.perf_counter() - start, "cpu_s": sum(r["seconds"] for r in results)}
    return report(out, payload, docs)


def report(out: Path, payload: dict, docs: Path | None = None) -> dict:
    """Tables and the figure from a results payload (:func:`unturn_study`, or ``--replot``)."""
    from . import plots

    header = ["q", "stage", "true/turned/other", "true (95% CI)", "MCC", "L0", "explained variance",
              "coefficient: largest", "last"]
    table, counts, labels, kept = [], {state: [] for state in END_STATES}, [], []
    for q in payload["qs"]:
        runs = [r for r in payload["runs"] if math.isclose(max(r["qs"]), q, abs_tol=1e-3)]
        states = {stage: [s for r in runs for s in r["stages"][stage]["families"]] for stage in STAGES}
        for stage in STAGES:
            tally = [states[stage].count(state) for state in END_STATES]
            low, high = share_interval(tally[0], len(states[stage])) if states[stage] else (math.nan, math.nan)
            metric = {key: summarize([r["stages"][stage][key] for r in runs]) for key in ("mcc", "l0", "explained_variance")}
            table.append([f"{q:g}", stage, "/".join(map(str, tally)),
                          f"{tally[0]}/{len(states[stage])} ({low:.2f}–{high:.2f})", fmt(metric["mcc"]),
                          fmt(metric["l0"]), fmt(metric["explained_variance"], 4), *_coefficients(runs, stage)])
            labels.append(f"q={q:g}: {stage}")
            for state, count in zip(END_STATES, tally):
                counts[state].append(count)
        # What training on does with each family the re-basing left true, and with the others.
        pairs = list(zip(states["re-based"], states["re-based, trained on"]))
        entangled = [e for r in runs for e in r["stages"]["trained"]["entangled"]]
        made_true = [state == "true" for state in states["re-based"]]
        kept.append([f"{q:g}"] + [_transitions([after for before, after in pairs if (before == "true") == wanted])
                                  for wanted in (True, False)]
                    + [f"{sum(t for t, e in zip(made_true, entangled) if e == wanted)}/{entangled.count(wanted)}"
                       for wanted in (True, False)])
    text = format_table(table, header)
    kept_text = format_table(kept, ["q", "re-based true → trained on: true/turned/other",
                                    "re-based other → trained on: true/turned/other",
                                    "made true | sibling entangled", "made true | sibling apart"])
    moved = [m["angle"] for r in payload["runs"] for m in r["moved"]]
    first_quartile, median, third_quartile = np.percentile(moved, [25, 50, 75]) if moved else [math.nan] * 3
    lines = [
        f"# Un-turning: {_settings_text(payload)}",
        "",
        "Each family (3 per run), in the plane of the parent and that child: "
        "true, turned or other (turn_dynamics.end_state). Stages: the trained SAE; re-based "
        "(matryoshka.unturn.unturn); re-based, then trained on with the recipe; the control, trained on "
        "without the re-basing. MCC, L0 and explained variance: mean ± 95% CI over seeds.",
        "",
        "```", text, "```", "",
        "Each family's path through the re-basing and the training on, by its state when re-based; and "
        "the share the re-basing made true among the families whose trained SAE had a latent along the "
        f"sibling (the most frequent child but one) and along the parent or the child (|cos| >= {ENTANGLED}), "
        "and among the others:", "",
        "```", kept_text, "```", "",
        f"Containers re-based: {len(moved)} ({len(moved) / max(1, len(payload['runs'])):.1f} per run); the parent "
        f"latent's row moved by a median {median:.1f}° (quartiles {first_quartile:.1f}–{third_quartile:.1f}°).",
        "",
        runs_line(payload),
    ]
    print("\n" + text + "\n\n" + kept_text)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "unturn_states.png"
    plots.outcome_bars([(f"{payload['mode']}: each family's parent and most frequent child", labels, counts)], figure,
                       ylabel="families")
    write_outputs(out, "unturn_results.json", payload, "unturn_results.md", lines, [figure], docs)
    return {"table": table}


def _coefficients(runs: list[dict], stage: str) -> list[str]:
    """The sparsity coefficient's largest and last values over a stage's training on (mean ± 95% CI),
    "–" for a stage not trained on (or a payload from before they were recorded)."""
    if not all("coeff_max" in r["stages"][stage] for r in runs):
        return ["–", "–"]
    return [fmt(summarize([r["stages"][stage][key] for r in runs]), 4) for key in ("coeff_max", "coeff_end")]


def _settings_text(settings: dict) -> str:
    """A study's settings in words (:func:`unturn_study`'s print and the results' title); a payload
    from before a setting existed reads as that setting's value then."""
    warmup, resort_every = settings.get("retrain_warmup"), settings.get("retrain_resort_every")
    # before "order", a payload said "resort" (True: re-sorted); before that, the order was kept
    order = settings.get("order", "re-sorted" if settings.get("resort") else "kept")
    warm = "the recipe's warm-up" if warmup is None else f"warm-up {warmup:g} of the steps"
    resort = ("the recipe's re-sort" if resort_every is None
              else "never re-sorted" if resort_every == 0 else f"re-sorted every {resort_every} steps")
    beta = settings.get("retrain_beta")
    budget = settings.get("retrain_budget", 1)
    inner = ("" if beta is None else f"; inner prefixes ×{beta:g}") + ("" if budget == 1 else f"; BatchTopK's k ×{budget:g}")
    return (f"{settings['mode']}, {settings['steps']} steps, re-based (order: {order}), then "
            f"{settings['retrain_steps']} more ({_RETRAIN_TEXT[settings.get('retrain', 'recipe')]}; {warm}, {resort}{inner}); "
            f"parents' magnitude std {settings.get('parent_std', 0):g}{_scale_text(settings.get('parent_scale', 1))}, parent rule "
            f"{settings.get('parent_rule', PARENT_RULES[0])}, min correlation {settings.get('min_correlation', 0.5):g}; "
            f"{settings['seeds']} seeds per q")


def _scale_text(scale: float) -> str:
    """The parents' child-dependent magnitude in words ("" for none, as before it existed)."""
    return "" if scale == 1 else f", ×{scale:g} where the most frequent child fires"


def _transitions(states: list[str]) -> str:
    """``true/turned/other`` counts of ``states`` ("–" for none)."""
    return "/".join(str(states.count(state)) for state in END_STATES) if states else "–"


def replot(out: Path, docs: Path | None = None) -> dict:
    """Redo the table and figure from ``OUT/unturn_results.json`` without training."""
    return report(out, json.loads((out / "unturn_results.json").read_text()), docs)
