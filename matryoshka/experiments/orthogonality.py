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

Tables: mean ± 95% CI (Student t over seeds); one figure of each metric against γ.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..toy import ToyModel, child_magnitude_spec
from . import plots
from .child_magnitude import learning_summary
from .common import RUN_CACHE, RunSpec, fmt, format_table, run_many, summarize, write_outputs
from .hedging import TOYS, VANISH, run_scalars

__all__ = ["BASES", "GAMMAS", "RATIOS", "DEFAULT_STEPS", "DEFAULT_SEEDS", "QUICK_STEPS", "mode_name",
           "orthogonality"]

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


def mode_name(base: str, gamma: float) -> str:
    """The study mode of ``base`` with the penalty at weight ``gamma`` (the base itself at 0)."""
    return base if gamma == 0 else f"{base}-orth{gamma:g}"


def _family_scalars(result: dict, toy: ToyModel) -> dict:
    row = run_scalars(result, toy)
    row["clean"] = float(row["max_offtarget"] < VANISH and row["max_absorption"] < VANISH)
    return row


def _child_scalars(result: dict) -> dict:
    row = learning_summary(result)
    row["child_first"] = float(row["first"] == "child")
    row["dead"] = float(result["metrics"]["dead"])
    return row


def orthogonality(out: Path, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
                  bases: tuple[str, ...] = BASES, gammas: tuple[float, ...] = GAMMAS,
                  ratios: tuple[float, ...] = RATIOS, child_bases: tuple[str, ...] = CHILD_BASES,
                  docs: Path | None = None) -> dict:
    """Run the grid (module doc); print the tables; write ``orthogonality_results.json``/``.md`` and
    ``orthogonality.png`` into ``out`` (and ``docs``)."""
    start = time.perf_counter()
    gammas = tuple(sorted(set(gammas)))
    print(f"decoder orthogonality penalty gamma * mean_i max_j cos(W_i, W_j)^2, gamma in {list(gammas)}; "
          f"bases {list(bases)} on the nabeshima and unequal toys, {list(child_bases)} on the child-magnitude toy "
          f"at ratios {list(ratios)}; {steps} steps, seeds 0..{seeds - 1}, {jobs} process(es); "
          f"mean ± 95% CI (Student t over {seeds} seeds)")
    toys = {name: ToyModel(TOYS[name]()) for name in ("nabeshima", "unequal")}
    toys |= {f"child r={r:g}": ToyModel(child_magnitude_spec(child_magnitude=2.0 * r)) for r in ratios}
    cells = []  # (toy name, base, gamma)
    for name in toys:
        for base in (child_bases if name.startswith("child") else bases):
            cells += [(name, base, gamma) for gamma in gammas]
    specs, keys = [], []
    for name, base, gamma in cells:
        toy = toys[name]
        # The child toy as its own study runs it: half its prefixes sampled, cosines read every 10 steps.
        extra = dict(num_sampled=max(2, toy.num_features // 2), log_every=10) if name.startswith("child") else {}
        for seed in range(seeds):
            specs.append(RunSpec(toy.spec, mode_name(base, gamma), seed, steps, **extra))
            keys.append((name, base, gamma))
    results = run_many(specs, jobs, desc="orthogonality", cache=out / RUN_CACHE)

    rows: dict[tuple, list[dict]] = {}
    for key, result in zip(keys, results):
        name = key[0]
        rows.setdefault(key, []).append(
            _child_scalars(result) if name.startswith("child") else _family_scalars(result, toys[name]))
    md = [f"# Decoder orthogonality penalty: {steps} steps per run, {seeds} seeds, mean ± 95% CI (Student t)\n",
          "Mode `<base>-orth<γ>`: the base mode plus γ · mean over latents of the largest squared cosine with "
          "another latent's decoder row. `clean`: seeds on which every off-target |cos| within a family and "
          f"every pair's absorption rate are < {VANISH}.\n"]
    tables = {}
    for name in toys:
        toy_cells = [(b, g) for (t, b, g) in cells if t == name]
        if name.startswith("child"):
            ratio = float(name.split("=")[1])
            table = format_table(
                [[b, f"{g:g}", fmt(summarize([r["absorption"] for r in rows[(name, b, g)]])),
                  fmt(summarize([r["child_cos_parent"] for r in rows[(name, b, g)]])), f"{1 / np.sqrt(1 + ratio ** 2):.3f}",
                  f"{int(sum(r['child_first'] for r in rows[(name, b, g)]))}/{seeds}",
                  fmt(summarize([r["mcc"] for r in rows[(name, b, g)]])),
                  fmt(summarize([r["dead"] for r in rows[(name, b, g)]]), 1)] for b, g in toy_cells],
                ["base", "gamma", "absorption", "cos(child lat, parent)", "1/sqrt(1+r^2)", "child first", "MCC", "dead"])
            title = f"child-magnitude toy, child/parent magnitude ratio {ratio:g}, P(child | parent) 0.5"
        else:
            n = toys[name].num_features
            table = format_table(
                [[b, f"{g:g}", *[fmt(summarize([r[k] for r in rows[(name, b, g)]]), d) for k, _, d in FAMILY_KEYS],
                  f"{int(sum(r['clean'] for r in rows[(name, b, g)]))}/{seeds}"] for b, g in toy_cells],
                ["base", "gamma", *[label.format(n=n) for _, label, _ in FAMILY_KEYS], "clean (seeds)"])
            qs = [c["p"] for c in toys[name].spec["features"][0]["children"]]
            title = f"{name} toy (children P(c | parent) = {qs})"
        tables[name] = table
        print(f"\n{title}\n{table}")
        md += [f"## {title}\n", "```", table, "```\n"]

    def per_base(name: str, key: str) -> dict[str, np.ndarray]:  # {base: (seeds, gammas)} for the figure
        toy_bases = child_bases if name.startswith("child") else bases
        return {b: np.array([[r[key] for r in rows[(name, b, g)]] for g in gammas], dtype=float).T for b in toy_bases}

    panels = [("nabeshima: MCC", per_base("nabeshima", "mcc")),
              ("nabeshima: parent->child cos", per_base("nabeshima", "parent_child")),
              ("nabeshima: max off-target |cos|", per_base("nabeshima", "max_offtarget")),
              ("unequal: absorption", per_base("unequal", "absorption")),
              ("unequal: parent->child cos", per_base("unequal", "parent_child")),
              ("unequal: max off-target |cos|", per_base("unequal", "max_offtarget"))]
    for ratio in ratios:
        panels += [(f"child r={ratio:g}: absorption", per_base(f"child r={ratio:g}", "absorption")),
                   (f"child r={ratio:g}: cos(child latent, parent)", per_base(f"child r={ratio:g}", "child_cos_parent"))]
    figure = out / "orthogonality.png"
    plots.sweep_plot(list(gammas), panels, figure, xlabel="orthogonality penalty weight gamma", columns=3,
                     title=f"decoder orthogonality penalty: mean ± 95% CI over {seeds} seeds, {steps} steps")
    elapsed = time.perf_counter() - start
    cpu_s = sum(r.get("seconds", 0.0) for r in results)
    md.append(f"Total wall time {elapsed:.0f} s with {jobs} process(es); CPU time of the {len(results)} runs "
              f"{cpu_s:.0f} s.\n")
    payload = {"study": "orthogonality", "steps": steps, "seeds": seeds, "jobs": jobs, "bases": list(bases),
               "child_bases": list(child_bases), "gammas": list(gammas), "ratios": list(ratios),
               "rows": {f"{t}|{b}|{g:g}": v for (t, b, g), v in rows.items()}, "tables": tables,
               "runtime_s": elapsed, "cpu_s": cpu_s}
    write_outputs(out, "orthogonality_results.json", payload, "orthogonality_results.md", md, [figure], docs)
    print(f"total time {elapsed:.0f} s")
    return payload
