"""``python -m matryoshka orthogonality``: does a decoder orthogonality penalty remove the parent/child
mixing that every-prefix training leaves (research question 1), or the large-child absorption
(question 2)?

The penalty (``TrainConfig(orthogonality_coeff=γ)``, study-mode suffix ``-orth<γ>``, after OrtSAE,
Korznikov et al. 2025; :mod:`matryoshka.orthogonality`) adds ``γ · (1/n) Σ_i max_{j≠i} cos(W_i, W_j)²``
over the decoder rows.  An absorbing child latent decodes "parent + child" and a hedging parent
latent "parent + Σ q·child", so both keep a cosine with another latent that the penalty charges for.

Each base mode (``--bases``: ``vanilla``, ``every``, ``every-b0.5``, the best β of the hedging study)
runs at every γ of ``--gammas`` (γ = 0: the base mode itself) on

* Nabeshima's toy and the unequal toy (children 0.02, 0.15, 0.5 given their parent), with the
  hedging study's metrics (:func:`matryoshka.experiments.hedging.run_scalars`);
* the child-magnitude toy (parent p 0.3, magnitude 2; child 0.5 given the parent, magnitude
  ``r`` × 2) at each ratio of ``--ratios`` (default 5: magnitude 10, the research question's
  setting), with the child-magnitude study's learning summary.

Tables: mean ± 95% CI (Student t over seeds); one figure of each metric against γ.  On the family
toys also the outcome of each seed (:func:`outcome`: clean, absorbed, dead latent or mixed; the clean
share with its exact binomial interval) and what keeping the seed with the lowest final training
loss gives (:func:`best_of_k_clean`), each with a figure, each child slot's absorption and
rotated share, and the training objective at the end (final loss, its reconstruction term, the
adaptive sparsity coefficient and L0: runs ending at different coefficients optimised different
objectives).  ``--toys`` picks the family toys, ``unequal-q<x>`` among them (the unequal toy with
its most frequent child at x); with two or more unequal toys, a table and a figure set that child's
rotated share and absorption against x, beside the closed form's thresholds
(:func:`matryoshka.experiments.absorption_margins.rotated_margins`).  An empty ``--child-bases``
skips the child-magnitude toy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.stats

from ..toy import ToyModel, child_magnitude_spec
from . import plots
from .child_magnitude import child_run_spec, learning_summary
from .common import RUN_CACHE, RunSpec, fmt, format_table, run_many, summarize, write_outputs
from .hedging import ROTATED, UNEQUAL_PREFIX, VANISH, family_toy_spec, per_child_slot, run_scalars

__all__ = ["FAMILY_TOYS", "BASES", "GAMMAS", "RATIOS", "DEFAULT_STEPS", "DEFAULT_SEEDS", "QUICK_STEPS", "OUTCOMES",
           "outcome", "outcome_counts", "share_interval", "best_of_k_clean", "mode_name", "orthogonality", "report", "replot"]

FAMILY_TOYS = ("nabeshima", "unequal")  # the toys with parent/child families (hedging.family_toy_spec)
BASES = ("vanilla", "every", "every-b0.5")
GAMMAS = (0.0, 0.3, 1.0, 3.0, 10.0)
RATIOS = (5.0,)
CHILD_BASES = ("vanilla", "every")  # β = 0.5 absorbs from ratio 1 on (the phase diagram): not repeated here
DEFAULT_STEPS = 6_000
DEFAULT_SEEDS = 5
QUICK_STEPS = 200

# (key, column label, decimals) of the family toys' table
FAMILY_KEYS = [("mcc", "MCC", 3), ("learned", "learned/{n}", 1), ("absorption", "absorption", 3),
               ("parent_child", "parent->child", 3), ("child_parent", "child->parent", 3),
               ("child_sibling", "child->sibling", 3), ("max_offtarget", "max off-target", 3), ("dead", "dead", 1)]


# What became of one seed on a family toy, in this order of precedence (see :func:`outcome`).
OUTCOMES = ("clean", "absorbed", "dead latent", "mixed")


def outcome(row: dict) -> str:
    """One family-toy seed's outcome: ``clean`` (every off-target |cos| within a family and every
    pair's absorption below ``VANISH``); otherwise ``absorbed`` (some pair's absorption at least
    ``VANISH``), ``dead latent`` (none absorbed, but a latent never fires) or ``mixed`` (neither, yet
    some off-target |cos| at least ``VANISH``)."""
    if row["max_offtarget"] < VANISH and row["max_absorption"] < VANISH:
        return "clean"
    if row["max_absorption"] >= VANISH:
        return "absorbed"
    return "dead latent" if row["dead"] > 0 else "mixed"


def outcome_counts(seeds: list[dict]) -> list[int]:
    """How many of ``seeds`` (per-seed rows) ended in each of :data:`OUTCOMES`, in that order."""
    ended = [outcome(r) for r in seeds]
    return [ended.count(o) for o in OUTCOMES]


def share_interval(count: int, total: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval of a share ``count / total`` (exact binomial: seeds are few)."""
    interval = scipy.stats.binomtest(count, total).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


def mode_name(base: str, gamma: float) -> str:
    """The study mode of ``base`` with the penalty at weight ``gamma`` (the base itself at 0)."""
    return base if gamma == 0 else f"{base}-orth{gamma:g}"


def _family_scalars(result: dict, toy: ToyModel) -> dict:
    row = run_scalars(result, toy)
    row["clean"] = float(outcome(row) == "clean")
    # What a user sees without the true features: the mean training loss of the last read-out
    # interval (reconstruction, sparsity and orthogonality terms, as the run optimised them).
    last = result["history"][-1]
    row["final_loss"] = last["loss"]
    # Its parts: the prefixes' reconstruction term, and the adaptive sparsity coefficient it ended at
    # (runs that end at different coefficients optimised different objectives).
    row["final_recon"], row["final_sparsity_coeff"] = last["recon"], last["sparsity_coeff"]
    return row


def best_of_k_clean(losses: Sequence[float], clean: Sequence[bool], k: int) -> float:
    """The chance that, of ``k`` seeds drawn at random without replacement from these, the one with
    the lowest final loss is clean: exactly, over all ``C(N, k)`` draws.  The seed of loss rank ``j``
    (0: lowest) is the draw's lowest when the other ``k - 1`` come from the ``N - 1 - j`` above it."""
    total = math.comb(len(losses), k)
    ranked = sorted(range(len(losses)), key=lambda i: losses[i])
    return sum(math.comb(len(losses) - 1 - j, k - 1) for j, i in enumerate(ranked) if clean[i]) / total


def _child_scalars(result: dict) -> dict:
    row = learning_summary(result)
    row["child_first"] = float(row["first"] == "child")
    row["dead"] = float(result["metrics"]["dead"])
    return row


def orthogonality(out: Path, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
                  bases: tuple[str, ...] = BASES, gammas: tuple[float, ...] = GAMMAS,
                  ratios: tuple[float, ...] = RATIOS, child_bases: tuple[str, ...] = CHILD_BASES,
                  family_toys: tuple[str, ...] = FAMILY_TOYS, docs: Path | None = None) -> dict:
    """Run the grid (module doc); print the tables; write ``orthogonality_results.json``/``.md`` and
    ``orthogonality.png`` into ``out`` (and ``docs``).  ``family_toys``: which of :data:`FAMILY_TOYS`
    (or ``unequal-q<x>``: :func:`~matryoshka.experiments.hedging.family_toy_spec`) the ``bases`` run on; no ``child_bases`` (or no ``ratios``): no child-magnitude runs."""
    for name in family_toys:  # a clear error now, not after the other toys' runs
        try:
            family_toy_spec(name)
        except ValueError as error:
            raise ValueError(f"family_toys: {error}") from None
    if not (family_toys and bases) and not (child_bases and ratios):
        raise ValueError("nothing to train: give family_toys with bases, or child_bases with ratios")
    start = time.perf_counter()
    gammas = tuple(sorted(set(gammas)))
    print(f"decoder orthogonality penalty gamma * mean_i max_j cos(W_i, W_j)^2, gamma in {list(gammas)}; "
          f"bases {list(bases)} on the {' and '.join(family_toys) or 'no'} family toy(s), {list(child_bases)} on the "
          f"child-magnitude toy at ratios {list(ratios)}; {steps} steps, seeds 0..{seeds - 1}, {jobs} process(es); "
          f"mean ± 95% CI (Student t over {seeds} seeds)")
    toys = {name: ToyModel(family_toy_spec(name)) for name in (family_toys if bases else ())}
    if child_bases:
        toys |= {f"child r={r:g}": ToyModel(child_magnitude_spec(child_magnitude=2.0 * r)) for r in ratios}
    cells = []  # (toy name, base, gamma)
    for name in toys:
        for base in (child_bases if name.startswith("child") else bases):
            cells += [(name, base, gamma) for gamma in gammas]
    specs, keys = [], []
    for name, base, gamma in cells:
        # The child toy as its own study trains it; the family toys on the common recipe.
        make = child_run_spec if name.startswith("child") else RunSpec
        for seed in range(seeds):
            specs.append(make(toys[name].spec, mode_name(base, gamma), seed, steps))
            keys.append((name, base, gamma))
    results = run_many(specs, jobs, desc="orthogonality", cache=out / RUN_CACHE)

    rows: dict[str, list[dict]] = {}
    for (name, base, gamma), result in zip(keys, results):
        rows.setdefault(_key(name, base, gamma), []).append(
            _child_scalars(result) if name.startswith("child") else _family_scalars(result, toys[name]))
    cpu_s = sum(r.get("seconds", 0.0) for r in results)
    payload = {"study": "orthogonality", "steps": steps, "seeds": seeds, "jobs": jobs, "bases": list(bases),
               "child_bases": list(child_bases), "gammas": list(gammas), "ratios": list(ratios),
               "toys": list(toys), "rows": rows, "runtime_s": time.perf_counter() - start, "cpu_s": cpu_s,
               "runs": len(results)}
    return report(out, payload, docs)


def _key(name: str, base: str, gamma: float) -> str:
    return f"{name}|{base}|{gamma:g}"


def report(out: Path, payload: dict, docs: Path | None = None) -> dict:
    """Tables, figure, ``orthogonality_results.json`` and ``.md`` from the per-seed numbers in
    ``payload`` (also used by ``--replot``, which reads ``OUT/orthogonality_results.json``)."""
    steps, seeds, gammas, rows = payload["steps"], payload["seeds"], payload["gammas"], payload["rows"]
    md = [f"# Decoder orthogonality penalty: {steps} steps per run, {seeds} seeds, mean ± 95% CI (Student t)\n",
          "Mode `<base>-orth<γ>`: the base mode plus γ · mean over latents of the largest squared cosine with "
          "another latent's decoder row. `clean`: seeds on which every off-target |cos| within a family and "
          f"every pair's absorption rate are < {VANISH}.\n"]
    tables = {}

    def bases_of(name: str) -> list[str]:
        return payload["child_bases"] if name.startswith("child") else payload["bases"]

    def cell(name: str, base: str, gamma: float, key: str, decimals: int = 3) -> str:
        return fmt(summarize([r[key] for r in rows[_key(name, base, gamma)]]), decimals)

    def seeds_where(name: str, base: str, gamma: float, key: str) -> str:
        return f"{int(sum(r[key] for r in rows[_key(name, base, gamma)]))}/{seeds}"

    for name in payload["toys"]:
        toy_cells = [(b, g) for b in bases_of(name) for g in gammas]
        if name.startswith("child"):
            ratio = float(name.split("=")[1])
            table = format_table(
                [[b, f"{g:g}", cell(name, b, g, "absorption"), cell(name, b, g, "child_cos_parent"),
                  f"{1 / np.sqrt(1 + ratio ** 2):.3f}", seeds_where(name, b, g, "child_first"), cell(name, b, g, "mcc"),
                  cell(name, b, g, "dead", 1)] for b, g in toy_cells],
                ["base", "gamma", "absorption", "cos(child lat, parent)", "1/sqrt(1+r^2)", "child first", "MCC", "dead"])
            title = f"child-magnitude toy, child/parent magnitude ratio {ratio:g}, P(child | parent) 0.5"
        else:
            spec = family_toy_spec(name)
            table = format_table(
                [[b, f"{g:g}", *[cell(name, b, g, k, d) for k, _, d in FAMILY_KEYS], seeds_where(name, b, g, "clean")]
                 for b, g in toy_cells],
                ["base", "gamma", *[label.format(n=ToyModel(spec).num_features) for _, label, _ in FAMILY_KEYS],
                 "clean (seeds)"])
            title = f"{name} toy (children P(c | parent) = {[c['p'] for c in spec['features'][0]['children']]})"
        tables[name] = table
        print(f"\n{title}\n{table}")
        md += [f"## {title}\n", "```", table, "```\n"]
        if not name.startswith("child"):
            cells = [(b, g, rows[_key(name, b, g)]) for b, g in toy_cells]
            tables[f"{name} outcomes"] = outcomes = _outcome_table(cells)
            print(f"\n{name} toy, outcome of each seed\n{outcomes}")
            md += [f"### {name} toy, outcome of each seed\n", _OUTCOME_NOTE, "```", outcomes, "```\n"]
            if all("rotated_by_child" in r for _, _, seeds_ in cells for r in seeds_):  # (older code lacks it)
                qs = [c["p"] for c in spec["features"][0]["children"]]
                tables[f"{name} per child"] = per_child = _per_child_table(cells, qs)
                print(f"\n{name} toy, per child: absorbed and rotated pairs\n{per_child}")
                md += [f"### {name} toy, per child: absorbed and rotated pairs\n", _PER_CHILD_NOTE, "```", per_child,
                       "```\n"]
            if all("final_loss" in r for _, _, seeds_ in cells for r in seeds_):  # (results of older code lack it)
                tables[f"{name} selection"] = selection = _selection_table(cells)
                print(f"\n{name} toy, keeping the seed with the lowest final training loss\n{selection}")
                md += [f"### {name} toy, keeping the seed with the lowest final training loss\n", _SELECTION_NOTE,
                       "```", selection, "```\n"]
            if all("final_recon" in r for _, _, seeds_ in cells for r in seeds_):  # (results of older code lack it)
                tables[f"{name} objective"] = objective = _objective_table(cells)
                print(f"\n{name} toy, the training objective at the end\n{objective}")
                md += [f"### {name} toy, the training objective at the end\n", _OBJECTIVE_NOTE, "```", objective,
                       "```\n"]

    def per_base(name: str, key: str) -> dict[str, np.ndarray]:  # {base: (seeds, gammas)} for the figure
        return {b: np.array([[r[key] for r in rows[_key(name, b, g)]] for g in gammas], dtype=float).T
                for b in bases_of(name)}

    panels = []
    for name in payload["toys"]:  # nabeshima's toy shows its MCC, the others their absorption
        if name.startswith("child"):
            panels += [(f"{name}: absorption", per_base(name, "absorption")),
                       (f"{name}: cos(child latent, parent)", per_base(name, "child_cos_parent"))]
        else:
            first = ("mcc", "MCC") if name == "nabeshima" else ("absorption", "absorption")
            panels += [(f"{name}: {label}", per_base(name, key)) for key, label in (
                first, ("parent_child", "parent->child cos"), ("max_offtarget", "max off-target |cos|"))]
    figure = out / "orthogonality.png"
    plots.sweep_plot(list(gammas), panels, figure, xlabel="orthogonality penalty weight gamma", columns=3,
                     title=f"decoder orthogonality penalty: mean ± 95% CI over {seeds} seeds, {steps} steps")
    figures = [figure]
    family = [name for name in payload["toys"] if not name.startswith("child")]
    if family:
        figures.append(out / "orthogonality_outcomes.png")
        plots.outcome_bars(
            [(f"{name} toy", [f"{b}, gamma {g:g}" for b in payload["bases"] for g in gammas],
              dict(zip(OUTCOMES, zip(*[outcome_counts(rows[_key(name, b, g)])
                                       for b in payload["bases"] for g in gammas])))) for name in family],
            figures[-1], title=f"outcome of each seed ({seeds} seeds, {steps} steps); clean: every off-target "
                               f"|cos| and absorption < {VANISH}")
    most_frequent = _most_frequent_child(payload)
    if most_frequent:
        table, figure = most_frequent
        tables["most frequent child"] = table
        print(f"\n{_MOST_FREQUENT_TITLE}\n{table}")
        md += [f"## {_MOST_FREQUENT_TITLE}\n", _MOST_FREQUENT_NOTE, "```", table, "```\n"]
        figures.append(out / "orthogonality_rotation.png")
        plots.sweep_plot(figure[0], figure[1], figures[-1], xlabel="P(most frequent child | parent)", linear=True,
                         marks=[(1 / 3, "rotated wins the one-latent prefix"), (math.sqrt(2) - 1, "... and L1"),
                                (0.5, "... and ties L0")],
                         title=f"the most frequent child's pair in each family: mean ± 95% CI over {seeds} seeds, "
                               f"{steps} steps")
    md.append(f"Total wall time {payload['runtime_s']:.0f} s with {payload['jobs']} process(es); CPU time of the "
              f"{payload['runs']} runs {payload['cpu_s']:.0f} s.\n")
    payload["tables"] = tables
    ks = list(range(1, seeds + 1))
    selection_panels = [  # one panel per penalty weight (none without it), a curve per base mode
        (f"{name}, gamma {g:g}: P(kept seed is clean)",
         {b: (ks, np.array([[best_of_k_clean(*_losses_and_clean(rows[_key(name, b, g)]), k) for k in ks]]))
          for b in payload["bases"]})
        for name in family if f"{name} selection" in tables for g in gammas if g > 0]
    if selection_panels:
        figures.append(out / "orthogonality_selection.png")
        plots.band_panels(selection_panels, figures[-1], xlabel="seeds trained (k)",
                          title=f"train k seeds, keep the one with the lowest final training loss: the chance "
                                f"it is clean (exact over all draws of k of {seeds} seeds)")
    write_outputs(out, "orthogonality_results.json", payload, "orthogonality_results.md", md, figures, docs)
    print(f"total time {payload['runtime_s']:.0f} s")
    return payload


_OUTCOME_NOTE = (f"`clean`: every off-target |cos| within a family and every pair's absorption < {VANISH}; otherwise "
                 f"`absorbed` (some pair's absorption >= {VANISH}), `dead latent` (none absorbed, a latent never "
                 f"fires) or `mixed` (neither). Share: 95% Clopper-Pearson interval. The last three columns are "
                 f"the clean seeds' means: the hedge that remains within the {VANISH} bar, and its prediction.\n")


def _outcome_table(cells: list[tuple[str, float, list[dict]]]) -> str:
    """Per ``(base, gamma, per-seed rows)``: how many seeds ended in each of :data:`OUTCOMES`, the
    clean share with its interval, and the clean seeds' parent->child cosine (and its prediction)
    and largest off-target |cos|."""
    table = []
    for base, gamma, seeds in cells:
        counts = outcome_counts(seeds)
        low, high = share_interval(counts[0], len(seeds))
        clean = [r for r in seeds if outcome(r) == "clean"]
        mean = lambda key: f"{np.mean([r[key] for r in clean]):.3f}" if clean and key in clean[0] else "–"  # noqa: E731
        table.append([base, f"{gamma:g}", *map(str, counts), f"{counts[0] / len(seeds):.2f} [{low:.2f}, {high:.2f}]",
                      mean("parent_child"), mean("pred_parent_child"), mean("max_offtarget")])
    return format_table(table, ["base", "gamma", *OUTCOMES, "clean share", "parent->child", "predicted",
                                "max off-target"])


_PER_CHILD_NOTE = ("Child slot i of each family (P(c | parent) = q), mean over the families, then mean ± 95% CI over "
                   f"seeds. `rotated`: the share of pairs whose parent and child both have |cos| >= {ROTATED} with "
                   "two latents (the pair's plane turned, e.g. (p ± c)/√2, rather than one latent absorbing).\n")


def _per_child_table(cells: list[tuple[str, float, list[dict]]], qs: list[float]) -> str:
    """Per ``(base, gamma, per-seed rows)``: each child slot's absorption rate and rotated share."""
    table = [[base, f"{gamma:g}", *[fmt(s) for key in ("absorption_by_child", "rotated_by_child")
                                    for s in per_child_slot(seeds, key)]] for base, gamma, seeds in cells]
    return format_table(table, ["base", "gamma", *[f"{what} q={q:g}" for what in ("absorption", "rotated") for q in qs]])


_MOST_FREQUENT_TITLE = "the unequal toys' most frequent child: rotated, absorbed, clean"
_MOST_FREQUENT_NOTE = ("The unequal toy (children 0.02, 0.15 and q given the parent) at each q of the run: the most "
                       "frequent child's pairs, mean over the 3 families, then mean ± 95% CI over seeds. `rotated`: "
                       f"parent and child each share |cos| >= {ROTATED} with two latents. The closed form "
                       "(`python -m matryoshka child-magnitude --margins`) has the rotated pair at least as good as "
                       "the true one on the one-latent prefix from q = 1/3, on the L1 norm from q = √2 − 1 and on "
                       "the L0 count from q = 1/2, and the orthogonality penalty blind to it.\n")


def _most_frequent_child(payload: dict) -> tuple[str, tuple[list[float], list]] | None:
    """With two or more unequal toys in the run (``unequal``, ``unequal-q<x>``): a table of the most
    frequent child's rotated share and absorption and the clean seeds, and the figure's
    ``(xs, panels)`` of the first two, against its probability given the parent; None otherwise."""
    rows, gammas = payload["rows"], payload["gammas"]
    by_q = {family_toy_spec(t)["features"][0]["children"][-1]["p"]: t for t in payload["toys"]
            if t == "unequal" or t.startswith(UNEQUAL_PREFIX)}
    cells = [(b, g) for b in payload["bases"] for g in gammas]
    if len(by_q) < 2 or not all("rotated_by_child" in r for t in by_q.values() for b, g in cells
                                for r in rows[_key(t, b, g)]):
        return None
    qs = sorted(by_q)

    def last_slot(seeds: list[dict], key: str) -> list[float]:  # per seed: mean over families of the last child
        return [float(np.nanmean(r[key][r["children_per_family"] - 1::r["children_per_family"]])) for r in seeds]

    table = []
    for q in qs:
        for b, g in cells:
            seeds = rows[_key(by_q[q], b, g)]
            table.append([f"{q:g}", b, f"{g:g}", fmt(summarize(last_slot(seeds, "rotated_by_child"))),
                          fmt(summarize(last_slot(seeds, "absorption_by_child"))),
                          f"{outcome_counts(seeds)[0]}/{len(seeds)}"])
    table = format_table(table, ["q", "base", "gamma", "rotated", "absorption", "clean seeds"])
    # (The clean share is the table's: a Student-t band on a 0/1 outcome would leave [0, 1].)
    panels = [(label, {mode_name(b, g): np.array([last_slot(rows[_key(by_q[q], b, g)], key) for q in qs]).T
                       for b, g in cells})
              for label, key in (("rotated share", "rotated_by_child"), ("absorption", "absorption_by_child"))]
    return table, (qs, panels)


_SELECTION_NOTE = ("Train k seeds and keep the one with the lowest final training loss (the mean loss of the last "
                   "read-out interval: no true feature needed). `best of k`: the chance that the kept seed is clean, "
                   "exactly over all draws of k of the seeds (`best of 1` is the clean share). `AUC`: the chance "
                   "that a clean seed's final loss is below an unclean one's (ties count half; – without both "
                   "kinds).\n")


_OBJECTIVE_NOTE = ("The last read-out interval's mean training loss, its reconstruction term (the prefixes' weighted "
                   "loss), the adaptive sparsity coefficient it ended at, and the L0 it ended at (the coefficient "
                   "adapts until L0 meets the toy's): mean ± 95% CI over seeds.\n")


def _objective_table(cells: list[tuple[str, float, list[dict]]]) -> str:
    """Per ``(base, gamma, per-seed rows)``: the final training loss, its reconstruction term, the
    sparsity coefficient and the L0 (mean ± 95% CI over seeds)."""
    keys = ("final_loss", "final_recon", "final_sparsity_coeff", "l0")
    table = [[base, f"{gamma:g}", *[fmt(summarize([r[key] for r in seeds]), 4) for key in keys]]
             for base, gamma, seeds in cells]
    return format_table(table, ["base", "gamma", "final loss", "reconstruction", "sparsity coeff", "L0"])


def _losses_and_clean(seeds: list[dict]) -> tuple[list[float], list[bool]]:
    return [r["final_loss"] for r in seeds], [outcome(r) == "clean" for r in seeds]


def _selection_table(cells: list[tuple[str, float, list[dict]]]) -> str:
    """Per ``(base, gamma, per-seed rows)``: the chance that the lowest-loss seed of k is clean
    (:func:`best_of_k_clean`), and how well the final loss separates clean seeds from the rest."""
    total = len(cells[0][2])
    ks = sorted({k for k in (1, 3, 5, total) if k <= total})
    table = []
    for base, gamma, seeds in cells:
        losses, clean = _losses_and_clean(seeds)
        good = [loss for loss, c in zip(losses, clean) if c]
        bad = [loss for loss, c in zip(losses, clean) if not c]
        # Mann-Whitney U of the unclean losses over the clean ones, as a share of all pairs:
        # P(a clean seed's loss < an unclean one's), ties counting half.
        auc = (scipy.stats.mannwhitneyu(bad, good).statistic / (len(good) * len(bad)) if good and bad else None)
        table.append([base, f"{gamma:g}", f"{sum(clean)}/{len(clean)}",
                      *[f"{best_of_k_clean(losses, clean, k):.2f}" for k in ks],
                      "–" if auc is None else f"{auc:.2f}"])
    return format_table(table, ["base", "gamma", "clean", *[f"best of {k}" for k in ks], "AUC"])


def replot(out: Path, docs: Path | None = None) -> dict:
    """Redo the tables and the figure from ``OUT/orthogonality_results.json`` without training."""
    return report(out, json.loads((out / "orthogonality_results.json").read_text()), docs)
