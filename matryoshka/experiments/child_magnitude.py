"""``python -m matryoshka child-magnitude``: what happens when a child feature is much larger than
its parent?

A parent (p 0.3, magnitude 2) and a child that only fires with it (0.5 given the parent, magnitude
10), plus binary distractors.  The child carries most of the variance, so a Matryoshka SAE's early
prefixes are pushed to reconstruct it first; the study measures, for vanilla / sampled / every:
which of parent and child is learned first (|cos| >= 0.9), at which step and latent position; the
absorption of the parent into the child's latent; and the mixing of the two directions.  ``--sweep``
repeats it over child/parent magnitude ratios and draws absorption against the ratio.  ``--phase``
runs the phase diagram: magnitude ratio x P(child | parent) x study modes (heatmaps of absorption,
of which feature is learned first, and of the child latent's cosine with the parent against the
full-absorption value ``1/sqrt(1 + r^2)``), plus latents re-sorted by firing frequency at ratio 5.
Tables give mean ± 95% CI (Student t over seeds).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..toy import ToyModel, child_magnitude_spec
from . import plots
from .common import (RUN_CACHE, RunSpec, fmt, format_table, history_band, run_many, study_mode, summarize,
                     write_json, write_outputs)

__all__ = ["MODES", "DEFAULT_STEPS", "DEFAULT_SEEDS", "DEFAULT_RATIOS", "QUICK_STEPS", "learning_summary", "child_run_spec",
           "child_magnitude", "PHASE_RATIOS", "PHASE_PROBS", "PHASE_MODES", "phase"]

MODES = ("vanilla", "sampled", "every")
DEFAULT_STEPS = 5_000
DEFAULT_SEEDS = 3
DEFAULT_RATIOS = (0.5, 1.0, 2.0, 5.0, 10.0)
QUICK_STEPS = 300
PHASE_RATIOS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
PHASE_PROBS = (0.25, 0.5, 0.75)
PHASE_MODES = ("vanilla", "sampled", "every", "every-b0.3", "detached")
FREQ_MODES = ("every-freq", "sampled-freq")  # at ratio 5: latents re-sorted by firing frequency
PARENT, CHILD = 0, 1  # feature indices in child_magnitude_spec (depth-first: parent, then child)


def learning_summary(result: dict) -> dict:
    """Parent/child numbers of one run: learning step and position, which came first, final metrics."""
    order, metrics = result["learning_order"], result["metrics"]
    pair = metrics["pairs"][0]
    steps = {"parent": order["step"][PARENT], "child": order["step"][CHILD]}
    learned = {k: v for k, v in steps.items() if v is not None}
    if not learned:
        first = "neither"
    elif len(learned) == 2 and steps["parent"] == steps["child"]:
        first = "same"
    else:
        first = min(learned, key=learned.get)
    mixing = metrics["mixing"][0]
    return {
        "parent_step": steps["parent"], "child_step": steps["child"],
        "parent_position": order["position"][PARENT], "child_position": order["position"][CHILD],
        "parent_final_latent": metrics["matching"]["latent"][PARENT],
        "child_final_latent": metrics["matching"]["latent"][CHILD],
        "first": first, "absorption": pair["rate"], "child_cos_parent": pair["child_cos_parent"],
        "mix_pos": mixing["max_pos"], "mix_neg": mixing["max_neg"], "mcc": metrics["mcc"],
    }


def _step_cell(values: list) -> str:
    """Mean ± 95% CI of the learning steps, with how many seeds never got there."""
    never = sum(v is None for v in values)
    cell = fmt(summarize([np.nan if v is None else v for v in values]), 0)
    return cell + (f" ({never} never)" if never else "")


def _table(rows_by_mode: dict[str, list[dict]]) -> str:
    rows = []
    for mode, rows_ in rows_by_mode.items():
        firsts = [r["first"] for r in rows_]
        positions = lambda key: ",".join("-" if r[key] is None else str(r[key]) for r in rows_)  # noqa: E731
        rows.append([
            mode, _step_cell([r["parent_step"] for r in rows_]), positions("parent_position"),
            _step_cell([r["child_step"] for r in rows_]), positions("child_position"),
            " ".join(f"{k} {firsts.count(k)}" for k in ("parent", "child", "same", "neither") if firsts.count(k)),
            fmt(summarize([r["absorption"] for r in rows_])), fmt(summarize([r["child_cos_parent"] for r in rows_])),
            fmt(summarize([r["mix_pos"] for r in rows_])), fmt(summarize([r["mix_neg"] for r in rows_])),
        ])
    return format_table(rows, ["mode", "parent @ step", "pos", "child @ step", "pos", "first (seeds)",
                               "absorption", "cos(child lat, parent)", "mix +", "mix -"])


def child_run_spec(spec: dict, mode: str, seed: int, steps: int) -> RunSpec:
    """One run on a child-magnitude toy ``spec`` as this study trains it."""
    # The original recipe samples 10 of 20 prefixes: keep that half for this smaller dictionary, so
    # that `sampled` stays random (with num = n it would draw every prefix every step).
    num_sampled = max(2, ToyModel(spec).num_features // 2)
    # Features are learned within a few hundred steps here: read cosines every 10 steps to time it.
    return RunSpec(spec, mode, seed, steps, num_sampled=num_sampled, log_every=10)


def _runs(spec: dict, modes: tuple[str, ...], seeds: int, steps: int, jobs: int, desc: str,
          out: Path) -> dict[str, list[dict]]:
    specs = [child_run_spec(spec, mode, seed, steps) for mode in modes for seed in range(seeds)]
    results = run_many(specs, jobs, desc=desc, cache=out / RUN_CACHE)
    return {m: [r for r in results if r["spec"]["mode"] == m] for m in modes}


def child_magnitude(out: Path, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
                    modes: tuple[str, ...] = MODES, toy_params: dict | None = None,
                    sweep_ratios: tuple[float, ...] | None = None) -> dict:
    """Run the study (and the sweep when ``sweep_ratios`` is given); print, plot, write results.json."""
    start = time.perf_counter()
    params = toy_params or {}
    spec = child_magnitude_spec(**params)
    toy = ToyModel(spec)
    p = spec["features"][0]
    c = p["children"][0]
    print(f"child_magnitude toy: parent p {p['p']} magnitude {p['magnitude']}; child p {c['p']} given the "
          f"parent ({p['p'] * c['p']:.3g} overall) magnitude {c['magnitude']}; "
          f"{toy.num_features - 2} binary distractors; d = {toy.d}; true L0 = {toy.expected_l0():.2f}")
    print(f"recipe: {toy.num_features} ReLU latents, adaptive L1, sampled = {max(2, toy.num_features // 2)} "
          f"random prefixes per step, {steps} steps, seeds 0..{seeds - 1}, {jobs} process(es); "
          f"mean ± 95% CI (Student t over {seeds} seeds)")
    by_mode = _runs(spec, modes, seeds, steps, jobs, "child-magnitude", out)
    rows = {m: [learning_summary(r) for r in runs] for m, runs in by_mode.items()}
    print("\nLearning order (step at which a latent first reaches |cos| >= 0.9, and that latent's position),"
          " absorption and mixing")
    print(_table(rows))

    out.mkdir(parents=True, exist_ok=True)
    panels = []
    for mode, runs in by_mode.items():
        curves = {
            "|cos| parent": history_band(runs, lambda row: row["best_cos"][PARENT]),
            "|cos| child": history_band(runs, lambda row: row["best_cos"][CHILD]),
            "cos(child's latent, parent)": history_band(runs, lambda row: row["best_cos_with_parent"][CHILD]),
        }
        panels.append((f"{mode}: best latent cosines", curves))
    plots.band_panels(panels, out / "child_cosines.png", logx=True,  # the action is in the first few hundred steps
                      title=f"parent/child cosines over training, mean ± 95% CI over {seeds} seeds")
    payload = {"study": "child_magnitude", "toy": spec, "steps": steps, "seeds": seeds, "modes": list(modes),
               "summary": rows, "runs": [r for runs in by_mode.values() for r in runs]}
    written = [out / "child_cosines.png"]
    if sweep_ratios:
        payload["sweep"] = _sweep(out, params, sweep_ratios, modes, seeds, steps, jobs)
        written.append(out / "absorption_vs_ratio.png")
    payload["runtime_s"] = time.perf_counter() - start
    write_json(out / "results.json", payload)
    print(f"\nwrote {out / 'results.json'}, " + ", ".join(map(str, written)))
    print(f"total time {payload['runtime_s']:.0f} s")
    return payload


def _sweep(out: Path, params: dict, ratios: tuple[float, ...], modes: tuple[str, ...], seeds: int, steps: int,
           jobs: int) -> dict:
    """The study at each child/parent magnitude ratio (the parent magnitude stays fixed)."""
    parent_magnitude = params.get("parent_magnitude", 2.0)
    per_ratio = {}
    for ratio in ratios:
        spec = child_magnitude_spec(**{**params, "child_magnitude": ratio * parent_magnitude})
        by_mode = _runs(spec, modes, seeds, steps, jobs, f"sweep ratio {ratio:g}", out)
        per_ratio[ratio] = {m: [learning_summary(r) for r in runs] for m, runs in by_mode.items()}
    print(f"\nSweep over child/parent magnitude ratio (parent magnitude {parent_magnitude}):")
    rows = []
    for ratio, by_mode in per_ratio.items():
        for mode, rows_ in by_mode.items():
            firsts = [r["first"] for r in rows_]
            rows.append([f"{ratio:g}", mode, fmt(summarize([r["absorption"] for r in rows_])),
                         fmt(summarize([r["child_cos_parent"] for r in rows_])),
                         f"{firsts.count('parent')}/{len(firsts)}", f"{firsts.count('child')}/{len(firsts)}"])
    print(format_table(rows, ["ratio", "mode", "absorption", "cos(child lat, parent)", "parent first",
                              "child first"]))

    def grid(key: str) -> dict[str, np.ndarray]:
        return {m: np.asarray([[np.nan if r[key] is None else r[key] for r in per_ratio[ratio][m]]
                               for ratio in ratios], dtype=float).T for m in modes}

    plots.sweep_plot(list(ratios), [("absorption rate", grid("absorption")),
                                    ("cos(child latent, parent direction)", grid("child_cos_parent"))],
                     out / "absorption_vs_ratio.png")
    return {"ratios": list(ratios), "parent_magnitude": parent_magnitude,
            "results": {f"{r:g}": v for r, v in per_ratio.items()}}


def _phase_row(result: dict, ratio: float) -> dict:
    row = learning_summary(result)
    row["full_absorption_cos"] = 1.0 / float(np.sqrt(1.0 + ratio ** 2))
    return row


def phase(out: Path, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, jobs: int = 1,
          toy_params: dict | None = None, ratios: tuple[float, ...] = PHASE_RATIOS,
          probs: tuple[float, ...] = PHASE_PROBS, modes: tuple[str, ...] = PHASE_MODES,
          freq_modes: tuple[str, ...] = FREQ_MODES, freq_ratio: float = 5.0, docs: Path | None = None) -> dict:
    """The phase diagram (module doc): every (ratio, P(child | parent), mode) cell over ``seeds``;
    then ``freq_modes`` (latents re-sorted by firing frequency) at ``freq_ratio`` for every P."""
    start = time.perf_counter()
    params = {k: v for k, v in (toy_params or {}).items() if k not in ("child_magnitude", "child_p")}
    parent_magnitude = params.get("parent_magnitude", 2.0)
    print(f"child-magnitude phase diagram: ratios {list(ratios)} x P(child | parent) {list(probs)} x modes "
          f"{list(modes)}, {seeds} seeds, {steps} steps per run; parent p {params.get('parent_p', 0.3)} magnitude "
          f"{parent_magnitude}; plus {list(freq_modes)} at ratio {freq_ratio:g}; mean ± 95% CI (Student t)")
    cells = [(r, p, m) for r in ratios for p in probs for m in modes]
    cells += [(freq_ratio, p, m) for p in probs for m in freq_modes]
    specs, keys = [], []
    for ratio, prob, mode in cells:
        spec = child_magnitude_spec(**{**params, "child_magnitude": ratio * parent_magnitude, "child_p": prob})
        for seed in range(seeds):
            specs.append(child_run_spec(spec, mode, seed, steps))
            keys.append((ratio, prob, mode))
    results = run_many(specs, jobs, desc="phase", cache=out / RUN_CACHE)
    rows: dict[tuple, list[dict]] = {}
    for key, result in zip(keys, results):
        rows.setdefault(key, []).append(_phase_row(result, key[0]))
    table = []
    for (ratio, prob, mode), rs in rows.items():
        firsts = [r["first"] for r in rs]
        table.append([f"{ratio:g}", f"{prob:g}", mode, fmt(summarize([r["absorption"] for r in rs])),
                      f"{firsts.count('parent')}/{len(rs)}", f"{firsts.count('child')}/{len(rs)}",
                      fmt(summarize([r["child_cos_parent"] for r in rs])), f"{1 / np.sqrt(1 + ratio ** 2):.3f}",
                      fmt(summarize([r["mix_neg"] for r in rs]))])
    text = format_table(table, ["ratio", "P(c|p)", "mode", "absorption", "parent first", "child first",
                                "cos(child lat, parent)", "1/sqrt(1+r^2)", "mix -"])
    print(text)
    out.mkdir(parents=True, exist_ok=True)

    def grid(mode: str, value) -> np.ndarray:
        return np.asarray([[np.nanmean([np.nan if (v := value(r)) is None else v for r in rows[(ratio, prob, mode)]])
                            for ratio in ratios] for prob in probs], dtype=float)

    figures = []
    for name, value, label, lo, hi, cmap in (
            ("phase_absorption.png", lambda r: r["absorption"], "absorption rate", 0, 1, "viridis"),
            ("phase_child_first.png", lambda r: float(r["first"] == "child"), "share of seeds: child learned first",
             0, 1, "viridis"),
            ("phase_child_cos.png", lambda r: r["child_cos_parent"], "cos(child latent, parent direction)",
             -0.2, 1, "viridis")):
        path = out / name
        plots.phase_heatmaps([(m, grid(m, value)) for m in modes], ratios, probs, path,
                             f"{label}: mean over {seeds} seeds, {steps} steps (columns: child/parent magnitude)",
                             vmin=lo, vmax=hi, cmap=cmap)
        figures.append(path)
    elapsed = time.perf_counter() - start
    cpu_s = sum(r.get("seconds", 0.0) for r in results)
    md = [f"# Child-magnitude phase diagram: {steps} steps per run, {seeds} seeds, mean ± 95% CI (Student t)\n",
          "```", text, "```\n",
          f"Total wall time {elapsed:.0f} s with {jobs} process(es); CPU time of the {len(results)} runs {cpu_s:.0f} s.\n"]
    payload = {"study": "child_magnitude_phase", "steps": steps, "seeds": seeds, "ratios": list(ratios),
               "probs": list(probs), "modes": list(modes), "freq_modes": list(freq_modes),
               "mode_settings": {m: study_mode(m) for m in (*modes, *freq_modes)},
               "rows": {f"{r:g}|{p:g}|{m}": v for (r, p, m), v in rows.items()}, "runtime_s": elapsed,
               "cpu_s": cpu_s}
    write_outputs(out, "phase_results.json", payload, "phase_results.md", md, figures, docs)
    print(f"total time {elapsed:.0f} s")
    return payload
