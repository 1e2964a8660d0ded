"""``python -m matryoshka turn-dynamics``: where training commits a frequent child's pair to the turn
(research question 1).

Started at the true dictionary, a family whose child fires on half its parent's samples (q = 1/2)
keeps its true pair; from random starts nearly every such family ends *turned*: its two latents
along ``(p + c)/√2`` and ``(p − c)/√2``, 45° from the parent ``p`` and the child ``c``
("Why a frequent child turns its parent's pair" and "Started at the truth" in the README).  The
closed form ties the two pairs at q = 1/2, so the start decides.  This study follows each family's
plane (``p``, ``c``: the parent and its most frequent child, q) through training.

**The prediction.**  Given its parent, a family's sample in that plane is ``p`` or ``p + c``, so its
second moment there (orthonormal basis along ``p`` and ``c``) is ``[[|p|², q|p||c|], [q|p||c|, q|c|²]]``.
Its leading eigenvector, the best one-latent reconstruction of the family, lies at

    θ*(q) = ½ atan2(2q|p||c|, |p|² − q|c|²)        from p towards c

(:func:`leading_angle`: 13.3° at q = 0.2, 31.7° at q = 1/2 for unit norms).  If a family's first
latent forms along it, at q = 1/2 it starts 13° from the turned pair's axis and 32° from the true
parent's: nearer the turn.

**What is measured** (:class:`TurnSpec`, :func:`run_turn`).  Every ``read_every`` steps up to
``read_until``, each family's cosines of every latent with ``p`` and ``c``, by latent identity (the
trainer re-sorts the latents every 100 steps; a latent keeps its identity by matching its decoder
row to the previous read-out's; in-plane norm ``ρ = √(cos_p² + cos_c²)``); at the end, the
family's state (:func:`end_state`): ``true`` (one latent at |cos| ≥ 0.9 with ``p``, another with
``c``), ``turned`` (two latents at |cos| ≥ 0.5 with both: ``hedging.ROTATED``) or ``other``
(absorbed, hedged or mixed).  A family's **first latent** (:func:`first_latent`) is, at the first
read-out where some latent reaches ``ρ ≥`` :data:`IN_PLANE`, that latent, and its angle ``θ₀`` from
``p`` towards ``c``; :func:`axis_angle` folds an angle onto [0°, 90°] (the pairs' axes: the true
pair at 0° and 90°, the turned pair at 45°).

Tables per q: θ*, the first latents' folded angles (median and quartiles; mean ± 95% CI), the shares
of families ending true, turned or other (with the exact binomial interval of the turned share),
and the turned share of the families whose first latent lay nearer the turned axis (22.5°–67.5°)
and of the others.  Figures: each family's first angle against q, coloured by its end state, beside
θ*(q); and the first latent's angle over the read-outs at two q.  The recipe is the rotation sweep's
(``--mode``, default ``every-b0.2-orth3``: β = 0.2 with the orthogonality penalty at γ = 3).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from ..metrics import cosine_matrix
from ..toy import ToyModel
from .common import RUN_CACHE, RunSpec, fmt, format_table, one_thread, run_many, runs_line, summarize, write_outputs
from .hedging import ROTATED, UNEQUAL_PREFIX, family_toy_spec
from .orthogonality import share_interval

__all__ = ["TurnSpec", "run_turn", "follow_identities", "leading_angle", "axis_angle", "first_latent", "end_state", "family_rows",
           "turn_dynamics", "report", "replot", "DEFAULT_QS", "DEFAULT_MODE", "END_STATES"]

DEFAULT_QS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7)
DEFAULT_MODE = "every-b0.2-orth3"
DEFAULT_STEPS = 6_000
DEFAULT_SEEDS = 10
QUICK_STEPS = 200
IN_PLANE = 0.8  # in-plane norm at which a latent counts as formed in the family's plane
THRESHOLDS = (0.7, 0.8, 0.9)  # the sensitivity table's in-plane norms
LEARNED = 0.9  # |cos| of a latent that holds a true direction (the metrics' "learned")
END_STATES = ("true", "turned", "other")


@dataclass(frozen=True)
class TurnSpec:
    """One run of the study: a family toy, a study mode and a seed on the toy recipe
    (:class:`~matryoshka.experiments.common.RunSpec`), read every ``read_every`` steps up to
    ``read_until``."""

    toy_spec: dict
    mode: str
    seed: int
    steps: int
    read_every: int = 10
    read_until: int = 1_000


def leading_angle(q: float, norm_p: float = 1.0, norm_c: float = 1.0) -> float:
    """θ*(q) in degrees: the leading eigenvector's angle from ``p`` towards ``c`` of the second
    moment of a family's samples (``p``, or ``p + c`` with probability ``q``) in their plane."""
    return 0.5 * math.degrees(math.atan2(2 * q * norm_p * norm_c, norm_p**2 - q * norm_c**2))


def axis_angle(theta: float) -> float:
    """An angle in degrees folded onto [0°, 90°]: the angle of its axis (a latent and its negative
    share one) from ``p``'s axis, or ``c``'s past 45°."""
    folded = abs(theta) % 180.0
    return min(folded, 180.0 - folded)


def run_turn(spec: TurnSpec) -> dict:
    """Train one SAE as ``spec`` says, reading each family's plane (module doc); JSON-able."""
    cpu_start = time.process_time()
    with one_thread():
        toy = ToyModel(spec.toy_spec)
        run = RunSpec(spec.toy_spec, spec.mode, spec.seed, spec.steps, log_every=spec.read_every)
        planes = toy.family_planes()
        reads = []
        tracked = {"rows": None, "ids": list(range(run.sae_config(toy).n))}

        def read(step: int, sae, logs: dict) -> None:
            if step > spec.read_until:
                return
            rows = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1)
            if tracked["rows"] is not None:
                tracked["ids"] = follow_identities(tracked["ids"], tracked["rows"], rows)
            tracked["rows"] = rows
            cos = cosine_matrix(sae.W_dec, toy.directions)
            by_id = np.argsort(tracked["ids"])  # by_id[i]: the latent that holds identity i now
            reads.append({"step": step, "families": [
                [np.round(cos[by_id, parent].numpy(), 4).tolist(), np.round(cos[by_id, child].numpy(), 4).tolist()]
                for parent, child, _ in planes]})

        sae, _ = run.train(toy, callback=read)
        cos = cosine_matrix(sae.W_dec, toy.directions)
        final = [[cos[:, parent].tolist(), cos[:, child].tolist()] for parent, child, _ in planes]
    return {"spec": asdict(spec), "reads": reads, "final": final, "qs": [q for _, _, q in planes],
            "norms": [[float(toy.directions[p].norm()), float(toy.directions[c].norm())] for p, c, _ in planes],
            "seconds": time.process_time() - cpu_start}


def follow_identities(ids: Sequence[int], before: torch.Tensor, now: torch.Tensor) -> list[int]:
    """The identities of the rows of ``now`` (unit decoder rows): each takes the identity (``ids``) of
    the row of ``before`` it matches, one to one, by the largest total |cos|.  Re-sorting permutes
    the latents every 100 steps; between two read-outs a row moves little, so a trajectory follows
    one latent."""
    rows_now, rows_before = scipy.optimize.linear_sum_assignment(-(now @ before.T).abs().cpu().numpy())
    return [ids[j] for _, j in sorted(zip(rows_now, rows_before))]


def end_state(cos_p: Sequence[float], cos_c: Sequence[float]) -> str:
    """A family's state from every latent's cosine with ``p`` and with ``c`` (module doc)."""
    cos_p, cos_c = np.abs(np.asarray(cos_p)), np.abs(np.asarray(cos_c))
    if ((cos_p >= ROTATED) & (cos_c >= ROTATED)).sum() >= 2:
        return "turned"
    holds_p, holds_c = np.flatnonzero(cos_p >= LEARNED), np.flatnonzero(cos_c >= LEARNED)
    if len(holds_p) and len(holds_c) and set(holds_p.tolist()) != set(holds_c.tolist()):
        return "true"
    return "other"


def first_latent(reads: Sequence[dict], family: int, threshold: float = IN_PLANE) -> dict | None:
    """``{"step", "latent", "theta"}`` of the family's first latent in its plane (module doc; at that
    read-out, the latent most in the plane), or ``None`` when none reaches ``threshold`` by the last
    read-out.  ``latent`` is the latent's identity across re-sorts (:func:`run_turn`)."""
    for read in reads:
        cos_p, cos_c = (np.asarray(v) for v in read["families"][family])
        in_plane = np.hypot(cos_p, cos_c)
        latent = int(in_plane.argmax())
        if in_plane[latent] >= threshold:
            return {"step": read["step"], "latent": latent,
                    "theta": math.degrees(math.atan2(cos_c[latent], cos_p[latent]))}
    return None


def family_rows(result: dict, threshold: float = IN_PLANE) -> list[dict]:
    """One row per family of a run: its q, θ*, first latent (at in-plane norm ``threshold``) and end state."""
    rows = []
    for family, ((cos_p, cos_c), (norm_p, norm_c), q) in enumerate(zip(result["final"], result["norms"],
                                                                        result["qs"])):
        q = round(q, 6)  # so that float noise in a stored q cannot split its group from the requested q
        first = first_latent(result["reads"], family, threshold)
        rows.append({"q": q, "seed": result["spec"]["seed"], "family": family,
                     "theta_star": leading_angle(q, norm_p, norm_c), "first": first,
                     "axis": None if first is None else axis_angle(first["theta"]),
                     "end": end_state(cos_p, cos_c)})
    return rows


def _trajectory(result: dict, family: int, first: dict | None) -> tuple[list[int], list[float]]:
    """The axis angle of the family's first latent (``first``: :func:`first_latent`) at every
    read-out, from the start, whether in the plane or not."""
    if first is None:
        return [], []
    steps = [read["step"] for read in result["reads"]]
    angles = [axis_angle(math.degrees(math.atan2(read["families"][family][1][first["latent"]],
                                                 read["families"][family][0][first["latent"]])))
              for read in result["reads"]]
    return steps, angles


def turn_dynamics(out: Path, qs: Sequence[float] = DEFAULT_QS, mode: str = DEFAULT_MODE, steps: int = DEFAULT_STEPS,
                  seeds: int = DEFAULT_SEEDS, jobs: int = 1, read_every: int = 10, read_until: int = 1_000,
                  docs: Path | None = None) -> dict:
    """Train ``seeds`` runs of ``mode`` on each ``unequal-q<q>`` toy, report (module doc) and write
    ``turn_results.json``/``.md`` and the figures into ``out`` (and ``docs``)."""
    if read_every < 1 or read_until < read_every:
        raise ValueError(f"read_every must be >= 1 and read_until >= read_every, got {read_every} and {read_until}")
    toys = {q: family_toy_spec(f"{UNEQUAL_PREFIX}{q:g}") for q in qs}  # refuses a q outside (0, 0.83] now
    start = time.perf_counter()
    print(f"turn dynamics: {mode} on the unequal toy with its most frequent child at q in {list(qs)}; {steps} steps, "
          f"seeds 0..{seeds - 1}, read every {read_every} steps up to {read_until}, {jobs} process(es)")
    specs = [TurnSpec(toys[q], mode, seed, steps, read_every, read_until) for q in qs for seed in range(seeds)]
    results = run_many(specs, jobs, desc="turn dynamics", worker=run_turn, cache=out / RUN_CACHE)
    payload = {"mode": mode, "qs": list(qs), "steps": steps, "seeds": seeds, "read_every": read_every,
               "read_until": read_until, "runs": results, "reused": results.reused,
               "wall_s": time.perf_counter() - start, "cpu_s": sum(r["seconds"] for r in results)}
    return report(out, payload, docs)


def _nearer_turned(row: dict) -> bool:
    return row["axis"] is not None and 22.5 < row["axis"] < 67.5


def _turned_share(rows: list[dict]) -> str:
    if not rows:
        return "–"
    turned = sum(r["end"] == "turned" for r in rows)
    low, high = share_interval(turned, len(rows))
    return f"{turned}/{len(rows)} ({low:.2f}–{high:.2f})"


def report(out: Path, payload: dict, docs: Path | None = None) -> dict:
    """Tables and figures from a results payload (:func:`turn_dynamics`, or ``--replot``)."""
    from . import plots

    per_run = [family_rows(result) for result in payload["runs"]]
    rows = [row for run_rows in per_run for row in run_rows]
    by_q = {q: [r for r in rows if r["q"] == q] for q in payload["qs"]}
    table = []
    for q, group in by_q.items():
        axes = np.asarray([r["axis"] for r in group if r["axis"] is not None], dtype=float)
        quartiles = np.percentile(axes, [25, 50, 75]) if axes.size else [math.nan] * 3
        ends = [sum(r["end"] == e for r in group) for e in END_STATES]
        nearer = [r for r in group if _nearer_turned(r)]
        farther = [r for r in group if r["axis"] is not None and not _nearer_turned(r)]
        table.append([f"{q:g}", f"{np.mean([r['theta_star'] for r in group]):.1f}",
                      f"{quartiles[1]:.1f} [{quartiles[0]:.1f}, {quartiles[2]:.1f}]", fmt(summarize(axes), 1),
                      f"{np.mean([r['first']['step'] for r in group if r['first']]):.0f}" if axes.size else "–",
                      "/".join(map(str, ends)), _turned_share(group), _turned_share(nearer), _turned_share(farther)])
    header = ["q", "θ* (°)", "first latent's axis (°): median [quartiles]", "mean ± 95% CI", "at step",
              "true/turned/other", "turned (95% CI)", "turned | first axis 22.5–67.5°", "turned | other first axis"]
    text = format_table(table, header)
    sensitivity = _sensitivity(payload)
    missing = sum(r["first"] is None for r in rows)
    lines = [
        f"# Turn dynamics: {payload['mode']}, {payload['steps']} steps, {payload['seeds']} seeds per q",
        "",
        f"Families: 3 per run ({len(rows)} in all); a family's first latent is the first latent to reach "
        f"in-plane norm {IN_PLANE} in the plane of the parent and its most frequent child (read every "
        f"{payload['read_every']} steps up to {payload['read_until']}; {missing} families had none). "
        "θ*: the leading direction of the family's samples in that plane.",
        "",
        "```", text, "```", "",
        "The first latent read at other in-plane norms: median axis (°), mean step, and the turned share "
        "of the families whose first latent lay nearer the turned axis (22.5–67.5°) | of the others:",
        "", "```", sensitivity, "```", "",
        runs_line(payload),
    ]
    print("\n" + text + "\n\nthe first latent at other in-plane norms (median axis, mean step, turned | nearer, "
          "turned | other):\n" + sensitivity)
    out.mkdir(parents=True, exist_ok=True)
    figures = [out / "turn_first_angles.png", out / "turn_trajectories.png"]
    plots.turn_first_angles(rows, payload["qs"], leading_angle, figures[0],
                            title=f"{payload['mode']}: each family's first latent in its plane")
    shown = [q for q in (min(payload["qs"]), 0.5) if q in payload["qs"]] or payload["qs"][:1]
    panels = []
    for q in dict.fromkeys(shown):
        curves = [(*_trajectory(result, row["family"], row["first"]), row["end"])
                  for result, run_rows in zip(payload["runs"], per_run) for row in run_rows if row["q"] == q]
        panels.append((f"q = {q:g} (θ* = {np.mean([r['theta_star'] for r in by_q[q]]):.1f}°)", curves))
    plots.turn_trajectories(panels, figures[1], title="the first latent's axis during training")
    write_outputs(out, "turn_results.json", payload, "turn_results.md", lines, figures, docs)
    return {"rows": rows, "table": table}


def _sensitivity(payload: dict) -> str:
    """Per q and in-plane norm of :data:`THRESHOLDS`: where the first latent forms and what follows."""
    header = ["q"] + [f"at {t:g}: axis, step, turned | nearer | other" for t in THRESHOLDS]
    table = []
    for q in payload["qs"]:
        cells = [f"{q:g}"]
        for threshold in THRESHOLDS:
            group = [r for result in payload["runs"] for r in family_rows(result, threshold) if r["q"] == q]
            formed = [r for r in group if r["first"] is not None]
            nearer = [r for r in formed if _nearer_turned(r)]
            other = [r for r in formed if not _nearer_turned(r)]
            share = lambda rs: f"{sum(r['end'] == 'turned' for r in rs)}/{len(rs)}"  # noqa: E731
            cells.append(f"{np.median([r['axis'] for r in formed]):.1f}, {np.mean([r['first']['step'] for r in formed]):.0f}, "
                         f"{share(nearer)} | {share(other)}" if formed else "–")
        table.append(cells)
    return format_table(table, header)


def replot(out: Path, docs: Path | None = None) -> dict:
    """Redo the tables and figures from ``OUT/turn_results.json`` without training."""
    return report(out, json.loads((out / "turn_results.json").read_text()), docs)
