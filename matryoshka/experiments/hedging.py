"""``python -m matryoshka hedging``: why parent/child mixing remains under every-prefix training, and
whether scaling the inner prefixes by β removes it (feature hedging, Chanin et al. 2025,
arXiv 2505.11756).

The β objective (study mode ``every-b<β>``, ``TrainConfig(prefix_mode="every", balance_beta=β)``)::

    L_β = L_n + β Σ_{l<n} ω_l L_l              (``-norm``: the same divided by 1 + β)

``L_l``: prefix ``l``'s reconstruction loss; ``ω_l``: the exact every-prefix weights of the inner
prefixes renormalised to sum 1 (``π_l / (num_sampled - 1)``).  ``β = 0`` is a plain SAE; today's
``every`` is the normalised form at ``β = num_sampled - 1 = 9``.

The hedging prediction (derived in :func:`hedging_prediction`): a parent latent at position ``j``
whose child ``c`` sits at position ``k_c`` decodes ``p + Σ_c t_c q_c c`` with ``q_c = P(c | parent)``
and ``t_c = W(j < l <= k_c) / W(l > j)``, ``W`` summing the objective's prefix weights; its cosine
with child ``c`` is ``t_c q_c / sqrt(1 + Σ t² q²)``.  Normalising the objective rescales every
weight alike, so ``t`` (and the prediction) is the same for both forms.

Toys: Nabeshima's (children 0.2 each given the parent) and an unequal one (children 0.02, 0.15,
0.5 given the parent, otherwise the same).  Per mode: MCC, learned/20, absorption, parent→child,
child→parent and child→sibling cosines, the largest off-target |cos| within a family, dead latents,
all as mean ± 95% CI (Student t over seeds).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..toy import ToyModel, nabeshima_spec
from ..train import PrefixSchedule
from . import plots
from .common import RUN_CACHE, RunSpec, fmt, format_table, run_many, study_mode, summarize, write_outputs

__all__ = ["MODES", "BETAS", "NORM_BETAS", "REFERENCE_MODES", "DEFAULT_STEPS", "DEFAULT_SEEDS", "QUICK_STEPS",
           "unequal_spec", "TOYS", "family_toy_spec", "hedging_prediction", "run_scalars", "per_child_slot", "hedging"]

BETAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
NORM_BETAS = (0.1, 0.3, 1.0)  # the normalised form, at a few β (on the nabeshima toy)
UNEQUAL_BETAS = (0.0, 0.1, 0.3, 1.0)  # the unequal toy's β grid (coarser: compute)
# every-pp / every-uniform-pp: the same objectives with the sparsity penalty weighted like the prefixes
# (TrainConfig(sparsity_weighting="prefix"): latent i's penalty times the share of the prefix weight
# reaching it), the per-prefix normalised penalty of item 4 (the dead last latents of every).
REFERENCE_MODES = ("every", "every-pp", "every-uniform", "every-uniform-pp", "detached")
DEFAULT_STEPS = 3_000
DEFAULT_SEEDS = 5
QUICK_STEPS = 200
MODES = tuple(f"every-b{b:g}" for b in BETAS) + tuple(f"every-b{b:g}-norm" for b in NORM_BETAS) + REFERENCE_MODES
QUICK_MODES = ("every-b0", "every-b0.3", "every-b0.3-norm", "every", "every-pp", "detached")
VANISH = 0.05  # "vanishes": every off-target |cos| and the absorption rate below this, on every seed
# A pair is "rotated" when two latents each have |cos| >= this with both the parent and the child: the
# pair's plane is spanned by turned directions (e.g. (p ± c)/√2) instead of p and c
# (:func:`matryoshka.experiments.absorption_margins.rotated_margins`).  An absorbed pair has one such
# latent, a hedging parent none.
ROTATED = 0.5


def unequal_spec(child_p: tuple[float, ...] = (0.02, 0.15, 0.5), seed: int = 0) -> dict:
    """Nabeshima's toy with exclusive children of unequal probabilities given their parent."""
    spec = nabeshima_spec(seed)
    for feature in spec["features"][:3]:
        for child, p in zip(feature["children"], child_p):
            child["p"] = p
    return spec


TOYS = {"nabeshima": nabeshima_spec, "unequal": unequal_spec}
UNEQUAL_PREFIX = "unequal-q"  # unequal-q<x>: the unequal toy with its most frequent child at x


def family_toy_spec(name: str) -> dict:
    """A family toy by name: one of :data:`TOYS`, or ``unequal-q<x>``, the unequal toy with its most
    frequent child at ``P(c | parent) = x`` (0.5 in ``unequal``; the others stay 0.02 and 0.15, so
    ``0 < x <= 0.83``): where the rotated pair starts to win
    (:func:`matryoshka.experiments.absorption_margins.rotated_margins`)."""
    if name in TOYS:
        return TOYS[name]()
    if name.startswith(UNEQUAL_PREFIX):
        try:
            q = float(name[len(UNEQUAL_PREFIX):])
        except ValueError:
            q = math.nan
        if 0 < q <= 0.83:
            return unequal_spec((0.02, 0.15, q))
    raise ValueError(f"a family toy is one of {sorted(TOYS)} or {UNEQUAL_PREFIX}<x> with 0 < x <= 0.83, got {name!r}")


def beta_of(mode: str, num_sampled: int = 10) -> float | None:
    """The β a mode puts on its inner prefixes in the normalised-equivalent sense (``every`` = 9);
    a mode with a penalty or re-sorting suffix (``-pp``, ``-freq``, ``-orth<γ>``) has the β of its
    reconstruction objective; detached levels and other prefix modes have none."""
    prefix_mode, settings = study_mode(mode)
    if prefix_mode != "every" or settings.get("detach"):
        return None
    if "balance_beta" in settings:
        return settings["balance_beta"]
    if settings.get("every_weights") == "uniform":
        return 19.0  # n - 1 for n = 20: uniform weights are the -norm form at β = n - 1
    return float(num_sampled - 1)


def objective_weights(mode: str, n: int, num_sampled: int = 10) -> np.ndarray | None:
    """The every-prefix weights (lengths 1..n) a mode trains on; None for other prefix sets."""
    prefix_mode, settings = study_mode(mode)
    if prefix_mode != "every":
        return None
    schedule = PrefixSchedule("every", n, num_sampled, every_weights=settings.get("every_weights", "exact"),
                              balance_beta=settings.get("balance_beta"),
                              balance_normalise=settings.get("balance_normalise", False))
    return schedule.objective.weights.numpy()


def hedging_prediction(weights: np.ndarray, parent_pos: int, child_pos: list[int],
                       child_q: list[float], detached: bool = False) -> dict:
    """Decoder cosines of a family predicted by hedging, for every-prefix ``weights`` (lengths 1..n).

    Derivation.  Unit orthogonal directions ``p`` (parent) and ``c`` (children, exclusive, ``q_c =
    P(c | parent)``).  Take the parent's latent at position ``j`` firing with value ``a`` whenever the
    parent fires, and each child's latent (position ``k_c``) reconstructing ``c`` exactly.  Prefix
    ``l`` holds latents ``0..l-1``; it holds the parent's latent iff ``l > j`` and child ``c``'s iff
    ``l > k_c``.  On parent samples, prefix ``l`` leaves ``m_l = p + Σ_{c: k_c >= l} 1[c] c`` to the
    parent's latent, so the parent decoder row ``u`` (unit norm) minimises
    ``Σ_{l > j} w_l E||m_l - a u||²``, i.e. ``u ∝ Σ_{l>j} w_l E[m_l] = W(l > j) (p + Σ_c t_c q_c c)``
    with ``t_c = W(j < l <= k_c) / W(l > j)``.  So ``cos(u, c) = t_c q_c / sqrt(1 + Σ_c t_c² q_c²)``
    and ``cos(u, p) = 1 / sqrt(1 + Σ t² q²)``.  A child latent then reconstructs the residual
    ``p + c - u ≈ c - Σ_{c'} t_{c'} q_{c'} c'`` (parent amplitude ≈ 1), so its cosine with a sibling
    ``c'`` is ``-t_{c'} q_{c'} / sqrt((1 - t_c q_c)² + Σ_{c''≠c} t_{c''}² q_{c''}²)``.  Scaling all
    weights (the ``-norm`` form) leaves every ``t`` unchanged.  With detached levels (``detached``)
    the parent's row learns only from prefix ``j + 1``, the one that adds it: ``t_c = 1[k_c > j]``
    whatever the weights.  The model ignores the encoder (a parent amplitude that depends on the
    children) and assumes no absorption.
    """
    w = np.asarray(weights, dtype=float)
    lengths = np.arange(1, w.size + 1)
    if detached:
        w = (lengths == parent_pos + 1).astype(float)
    holds_parent = lengths > parent_pos
    total = w[holds_parent].sum()
    t = np.array([w[holds_parent & (lengths <= k)].sum() / total if total > 0 else 0.0 for k in child_pos])
    q = np.asarray(child_q, dtype=float)
    tq = t * q
    parent_child = tq / math.sqrt(1 + float((tq ** 2).sum()))
    sibling = []
    for i in range(len(q)):
        others = [j for j in range(len(q)) if j != i]
        norm = math.sqrt((1 - tq[i]) ** 2 + float((tq[others] ** 2).sum()))
        sibling += [float(-tq[j] / norm) for j in others]
    return {"t": t.tolist(), "parent_child": parent_child.tolist(), "child_sibling": sibling}


def family_cosines(metrics: dict, toy: ToyModel) -> dict:
    """Signed cosines of each family's matched latents with the other members' directions, the
    largest off-target |cos|, and whether each (parent, child) pair is rotated (:data:`ROTATED`)."""
    cos = np.asarray(metrics["cos"])
    latent = metrics["matching"]["latent"]
    pc, cp, cs, off, rotated = [], [], [], [], []
    for parent, children in toy.families():
        lp = latent[parent]
        for c in children:
            lc = latent[c]
            pc.append(cos[lp, c])
            cp.append(cos[lc, parent])
            cs += [cos[lc, s] for s in children if s != c]
            shared = (np.abs(cos[:, parent]) >= ROTATED) & (np.abs(cos[:, c]) >= ROTATED)
            rotated.append(float(shared.sum() >= 2))
        members = [parent, *children]
        off.append(max(abs(cos[latent[f], g]) for f in members for g in members if g != f))
    as_float = lambda values: [float(v) for v in values]  # noqa: E731
    return {"parent_child": as_float(pc), "child_parent": as_float(cp), "child_sibling": as_float(cs),
            "max_offtarget": float(max(off)), "rotated": rotated}


def run_scalars(result: dict, toy: ToyModel) -> dict:
    """One run's numbers: the metrics, the family cosines and the hedging prediction at its positions."""
    metrics, spec = result["metrics"], result["spec"]
    fam = family_cosines(metrics, toy)
    best = np.abs(np.asarray(metrics["cos"])).max(0)
    pairs = metrics["pairs"]
    row = {
        "mcc": metrics["mcc"], "learned": float((best >= 0.9).sum()), "absorption": metrics["absorption"],
        "max_absorption": max((p["rate"] for p in pairs if np.isfinite(p["rate"])), default=float("nan")),
        "parent_child": float(np.mean(fam["parent_child"])),
        "parent_child_abs": float(np.mean(np.abs(fam["parent_child"]))), "child_parent": float(np.mean(fam["child_parent"])),
        "child_sibling": float(np.mean(fam["child_sibling"])), "max_offtarget": fam["max_offtarget"],
        "dead": float(metrics["dead"]), "l0": metrics["l0"], "explained_variance": metrics["explained_variance"],
        "rotated": float(sum(fam["rotated"])), "rotated_by_child": fam["rotated"],
        "parent_child_by_child": fam["parent_child"], "absorption_by_child": [p["rate"] for p in pairs],
        "children_per_family": len(toy.families()[0][1]),
    }
    weights = objective_weights(spec["mode"], toy.num_features, spec["num_sampled"])
    detached = study_mode(spec["mode"])[1].get("detach", False)
    if weights is not None:
        latent = metrics["matching"]["latent"]
        qs = [[float(c["p"]) for c in f["children"]] for f in toy.spec["features"] if f.get("children")]
        preds = [hedging_prediction(weights, latent[p], [latent[c] for c in cs], q, detached)
                 for (p, cs), q in zip(toy.families(), qs)]
        row["pred_parent_child"] = float(np.mean([v for pr in preds for v in pr["parent_child"]]))
        row["pred_child_sibling"] = float(np.mean([v for pr in preds for v in pr["child_sibling"]]))
        row["pred_parent_child_by_child"] = [v for pr in preds for v in pr["parent_child"]]
        row["positions"] = [[latent[p], [latent[c] for c in cs]] for p, cs in toy.families()]
    return row


KEYS = [("mcc", "MCC", 3), ("learned", "learned/{n}", 1), ("absorption", "absorption", 3),
        ("parent_child", "parent->child", 3), ("pred_parent_child", "predicted", 3),
        ("child_parent", "child->parent", 3), ("child_sibling", "child->sibling", 3),
        ("pred_child_sibling", "predicted", 3), ("max_offtarget", "max off-target", 3), ("dead", "dead", 1)]


def _table(summary: dict, n: int) -> str:
    rows = [[mode] + [fmt(s[k], d) if k in s else "–" for k, _, d in KEYS] + [s["vanish"]]
            for mode, s in summary.items()]
    return format_table(rows, ["mode"] + [label.format(n=n) for _, label, _ in KEYS] + ["vanish (seeds)"])


def _summary(scalars: list[dict]) -> dict:
    keys = [k for k, v in scalars[0].items() if not isinstance(v, list) and k != "children_per_family"]
    out = {k: summarize([s.get(k) for s in scalars]) for k in keys}
    both = int(sum(bool(s["max_offtarget"] < VANISH and s["max_absorption"] < VANISH) for s in scalars))
    out["vanish"] = f"{both}/{len(scalars)}"
    out["vanish_count"] = both
    out["seeds"] = len(scalars)
    out["per_child"] = {"parent_child": per_child_slot(scalars, "parent_child_by_child"),
                        "absorption": per_child_slot(scalars, "absorption_by_child")}
    return out


def per_child_slot(scalars: list[dict], key: str) -> list[dict]:
    """A per-pair list ``key`` of :func:`run_scalars` by child slot: slot i of every family, mean
    over the families, then summarised over the runs (seeds)."""
    slots = scalars[0]["children_per_family"]
    return [summarize([np.nanmean(s[key][i::slots]) for s in scalars]) for i in range(slots)]


def _modes(toy_name: str, quick: bool, betas, norm_betas, unequal_betas=UNEQUAL_BETAS) -> list[str]:
    if quick:
        return list(QUICK_MODES)
    modes = [f"every-b{b:g}" for b in (betas if toy_name == "nabeshima" else unequal_betas)]
    if toy_name == "nabeshima":
        modes += [f"every-b{b:g}-norm" for b in norm_betas]
    return modes + list(REFERENCE_MODES)


def _prediction_curve(scalars_by_mode: dict[str, list[dict]], toy: ToyModel, grid: np.ndarray,
                      num_sampled: int) -> np.ndarray:
    """Mean predicted parent->child cosine over β, at the latent positions the β runs ended with."""
    positions = [s["positions"] for mode, rows in scalars_by_mode.items()
                 if (beta_of(mode) or 0) > 0 and mode.startswith("every-b") for s in rows]
    qs = [[float(c["p"]) for c in f["children"]] for f in toy.spec["features"] if f.get("children")]
    curve = []
    for beta in grid:
        weights = objective_weights(f"every-b{beta:g}", toy.num_features, num_sampled)
        vals = [v for pos in positions for (p, cs), q in zip(pos, qs)
                for v in hedging_prediction(weights, p, cs, q)["parent_child"]]
        curve.append(np.mean(vals) if vals else np.nan)
    return np.asarray(curve)


def hedging(out: Path, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
            toys: tuple[str, ...] = ("nabeshima", "unequal"), betas: tuple[float, ...] = BETAS,
            norm_betas: tuple[float, ...] = NORM_BETAS, quick: bool = False, docs: Path | None = None,
            modes: tuple[str, ...] | None = None, unequal_betas: tuple[float, ...] = UNEQUAL_BETAS) -> dict:
    """Run the study on each toy; print tables, write ``results.json``, ``results.md`` and figures.
    ``modes``: run these study modes on every toy instead of the β grid and the reference modes."""
    start = time.perf_counter()
    modes_given = modes
    print("beta objective: L_beta = L_n + beta * sum_{l<n} w_l L_l, w_l = exact every-prefix weights of the inner "
          "prefixes renormalised to sum 1 (-norm: divided by 1 + beta); today's every = the -norm form at beta 9")
    print(f"{steps} steps per run (the original recipe: 40 000), seeds 0..{seeds - 1}, {jobs} process(es); "
          f"mean ± 95% CI (Student t over {seeds} seeds)")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"study": "hedging", "steps": steps, "seeds": seeds, "jobs": jobs, "toys": {}}
    for toy_name in toys:
        toy = ToyModel(TOYS[toy_name]())
        modes = list(modes_given) if modes_given else _modes(toy_name, quick, betas, norm_betas, unequal_betas)
        specs = [RunSpec(toy.spec, mode, seed, steps) for mode in modes for seed in range(seeds)]
        results = run_many(specs, jobs, desc=f"hedging {toy_name}", cache=out / RUN_CACHE)
        payload["toys"][toy_name] = {"toy": toy.spec, "modes": modes,
                                     "runs": [{k: r[k] for k in ("spec", "metrics", "learning_order")
                                               if k in r} | {"seconds": r.get("seconds")} for r in results]}
    payload["runtime_s"] = time.perf_counter() - start
    return report(out, payload, docs, pareto_all=quick)


def report(out: Path, payload: dict, docs: Path | None = None, pareto_all: bool = False) -> dict:
    """Tables, figures, ``results.json`` and ``results.md`` from the runs in ``payload`` (also used by
    ``--replot``, which reads ``OUT/results.json``)."""
    steps, seeds = payload["steps"], payload["seeds"]
    md = [f"# Hedging study: {steps} steps per run, {seeds} seeds per mode, mean ± 95% CI (Student t)\n",
          "β objective: `L_β = L_n + β Σ_{l<n} ω_l L_l` (ω: exact every-prefix weights of the inner prefixes "
          "renormalised to sum 1); `-norm`: divided by `1 + β`; `every` = the `-norm` form at β = 9, "
          "`every-uniform` = the `-norm` form with uniform ω at β = 19; `-pp`: the same objective with latent i's "
          "sparsity penalty scaled by the share of the prefix weight on the prefixes that hold it. `vanish`: "
          "seeds on which every off-target |cos| within a family and every pair's absorption rate are < 0.05.\n"]
    figures = []
    for toy_name, entry in payload["toys"].items():
        toy = ToyModel(entry["toy"])
        n = toy.num_features
        modes = entry["modes"]
        by_mode = {m: [r for r in entry["runs"] if r["spec"]["mode"] == m] for m in modes}
        scalars = {m: [run_scalars(r, toy) for r in runs] for m, runs in by_mode.items()}
        summary = {m: _summary(rows) for m, rows in scalars.items()}
        qs = [c["p"] for c in toy.spec["features"][0]["children"]]
        table = _table(summary, n)
        print(f"\n{toy_name} toy (children P(c | parent) = {qs}):\n{table}")
        grid = np.concatenate([[0.0], np.geomspace(0.01, 20, 60)])
        curve = _prediction_curve(scalars, toy, grid, 10)
        fig_path = out / f"hedging_{toy_name}.png"
        plots.hedging_figure(summary, scalars, grid, curve, fig_path, f"{toy_name} toy, P(c|parent) {qs}, "
                             f"{steps} steps, {seeds} seeds, 95% CI", beta_of)
        figures.append(fig_path)
        if toy_name != "nabeshima" or pareto_all:
            pareto = out / f"hedging_pareto_{toy_name}.png"
            plots.pareto_plot(summary, pareto, f"{toy_name} toy: absorption vs mixing (mean, 95% CI, {seeds} seeds)")
            figures.append(pareto)
        per_child = format_table(
            [[m, *[fmt(s["per_child"]["absorption"][i]) for i in range(len(qs))],
              *[fmt(s["per_child"]["parent_child"][i]) for i in range(len(qs))]] for m, s in summary.items()],
            ["mode", *[f"absorption q={q}" for q in qs], *[f"parent->child q={q}" for q in qs]])
        md += [f"## {toy_name} toy (children P(c | parent) = {qs})\n", "```", table, "```\n",
               "Per child position in each family (mean over the 3 families; P(c | parent) = q):\n", "```",
               per_child, "```\n"]
        entry.update(summary=summary, scalars=scalars, prediction_grid=grid.tolist(), prediction_curve=curve.tolist())
    cpu = [r.get("seconds") for e in payload["toys"].values() for r in e["runs"]]
    cpu_s = float(sum(c for c in cpu if c)) if all(cpu) else None
    payload["cpu_s"] = cpu_s
    md.append(f"Total wall time {payload['runtime_s']:.0f} s with {payload.get('jobs', '?')} process(es)"
              + (f"; training CPU time {cpu_s:.0f} s over {len(cpu)} runs" if cpu_s else "") + ".\n")
    write_outputs(out, "results.json", payload, "results.md", md, figures, docs, "hedging_results.md")
    print(f"total time {payload['runtime_s']:.0f} s")
    return payload


def replot(out: Path, docs: Path | None = None) -> dict:
    """Redo the tables and figures from ``OUT/results.json`` without training."""
    payload = json.loads((out / "results.json").read_text())
    return report(out, payload, docs)
