"""``python -m matryoshka compare``: vanilla vs fixed groups vs sampled vs every-prefix Matryoshka
SAEs on Nabeshima's hierarchical toy, several seeds each; prints two tables (mean ± 95% confidence
interval over seeds, Student t)
and writes heatmaps, learning curves and ``results.json``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..toy import ToyModel, nabeshima_spec
from ..train import default_group_widths
from . import plots
from .common import RUN_CACHE, RunSpec, fmt, format_table, history_band, run_many, summarize, write_json

__all__ = ["MODES", "DEFAULT_STEPS", "DEFAULT_SEEDS", "QUICK_STEPS", "run_scalars", "compare"]

MODES = ("vanilla", "groups", "sampled", "every")
# Fits `make demo` in the 5-minute budget on 2 CPU cores with room to spare for a busy machine;
# the original recipe trains 40 000 steps (pass --steps 40000 for it).
DEFAULT_STEPS = 6_000
DEFAULT_SEEDS = 5
QUICK_STEPS = 300


def feature_roles(toy: ToyModel) -> dict[str, list[int]]:
    """Features grouped as parents (have children), children (have a parent) and independents."""
    parents = [p for p, _ in toy.families()]
    children = [f for f, p in enumerate(toy.parents) if p >= 0]
    independent = [f for f in range(toy.num_features) if f not in parents and f not in children]
    return {"parents": parents, "children": children, "independent": independent}


def run_scalars(result: dict, toy: ToyModel) -> dict[str, float]:
    """The table's numbers for one run: final metrics plus learning-order summaries by role."""
    metrics, order = result["metrics"], result["learning_order"]
    roles = feature_roles(toy)
    best = np.abs(np.asarray(metrics["cos"])).max(0)

    def mean_step(features: list[int]) -> float:
        steps = [order["step"][f] for f in features if order["step"][f] is not None]
        return float(np.mean(steps)) if steps else float("nan")

    return {
        **{k: metrics[k] for k in ("mcc", "absorption", "child_cos_parent", "mix_pos", "mix_neg", "l0",
                                   "dead", "explained_variance", "mse", "objective")},
        "learned": float((best >= order["threshold"]).sum()),
        "parent_position": float(np.mean([metrics["matching"]["latent"][f] for f in roles["parents"]])),
        "parents_learned_step": mean_step(roles["parents"]),
        "children_learned_step": mean_step(roles["children"]),
    }


def _tables(summary: dict[str, dict], num_features: int) -> str:
    s = summary
    recovery = format_table(
        [[m, fmt(v["mcc"]), fmt(v["learned"], 1), fmt(v["absorption"]), fmt(v["child_cos_parent"]),
          fmt(v["mix_pos"]), fmt(v["mix_neg"])] for m, v in s.items()],
        ["mode", "MCC", f"learned/{num_features}", "absorption", "cos(child lat, parent)", "mix +", "mix -"],
    )
    order = format_table(
        [[m, fmt(v["l0"], 2), fmt(v["dead"], 1), fmt(v["explained_variance"]), fmt(v["objective"]),
          fmt(v["parent_position"], 1), fmt(v["parents_learned_step"], 0), fmt(v["children_learned_step"], 0)]
         for m, v in s.items()],
        ["mode", "L0", "dead", "expl. var.", "M-objective", "parent latent pos", "parents @ step",
         "children @ step"],
    )
    return f"Recovery\n{recovery}\n\nReconstruction and latent order\n{order}"


def compare(out: Path, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
            modes: tuple[str, ...] = MODES) -> dict:
    """Run the study, print its tables and write ``results.json`` and the figures into ``out``."""
    start = time.perf_counter()
    toy = ToyModel(nabeshima_spec())
    n = toy.num_features
    print(f"nabeshima toy: {n} binary features in d = {toy.d}: 3 parents (p 0.15) x 3 exclusive children "
          f"(0.2 each, none 0.4) + 8 independent (p 0.05); true L0 = {toy.expected_l0():.2f}")
    print(f"recipe: {n} ReLU latents, L1 adapted to L0 {toy.expected_l0():.2f}, batch 200, Adam lr 3e-2 "
          f"betas (0.5, 0.9375), clip 1.0, warm-up 5% / cool-down 20%, latents re-sorted every 100 steps")
    print(f"modes: vanilla = prefix {n}; groups = widths {default_group_widths(n)}; sampled = 10 random "
          f"prefixes per step; every = all {n} prefixes weighted by their inclusion probability / 10")
    print(f"{steps} steps per run (the original recipe: 40 000), seeds 0..{seeds - 1}, {jobs} process(es); "
          f"tables: mean ± 95% CI (Student t over {seeds} seeds)")
    specs = [RunSpec(toy.spec, mode, seed, steps) for mode in modes for seed in range(seeds)]
    results = run_many(specs, jobs, desc="compare", cache=out / RUN_CACHE)
    by_mode = {m: [r for r in results if r["spec"]["mode"] == m] for m in modes}
    scalars = {m: [run_scalars(r, toy) for r in runs] for m, runs in by_mode.items()}
    summary = {m: {k: summarize([s[k] for s in rows]) for k in rows[0]} for m, rows in scalars.items()}

    print()
    print(_tables(summary, n))
    out.mkdir(parents=True, exist_ok=True)
    plots.cosine_heatmaps(
        [(f"{m} (seed 0): MCC {runs[0]['metrics']['mcc']:.3f}", runs[0]["metrics"]["cos"],
          runs[0]["metrics"]["matching"]["latent"]) for m, runs in by_mode.items()],
        toy.names, out / "compare_heatmap.png")
    plots.band_panels(
        [("MCC (mean matched |cos|)", {m: history_band(runs, lambda row: row["mcc"]) for m, runs in by_mode.items()}),
         (f"features with a latent at |cos| >= 0.9 (of {n})",
          {m: history_band(runs, lambda row: sum(c >= 0.9 for c in row["best_cos"])) for m, runs in by_mode.items()})],
        out / "learning_curves.png", title=f"nabeshima toy, {steps} steps, mean ± 95% CI over {seeds} seeds")
    elapsed = time.perf_counter() - start
    write_json(out / "results.json", {
        "study": "compare", "toy": toy.spec, "steps": steps, "seeds": seeds, "modes": list(modes),
        "runtime_s": elapsed, "cpu_s": sum(r.get("seconds", 0.0) for r in results), "summary": summary, "runs": results,
    })
    print(f"\nwrote {out / 'results.json'}, {out / 'compare_heatmap.png'}, {out / 'learning_curves.png'}")
    print(f"total time {elapsed:.0f} s (training CPU time {sum(r.get('seconds', 0.0) for r in results):.0f} s "
          f"over {len(results)} runs)")
    return {"summary": summary, "runs": results, "runtime_s": elapsed}
