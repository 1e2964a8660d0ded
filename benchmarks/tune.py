"""Time the sparse kernels' launch configurations on a GPU: ``python -m benchmarks.tune``.

Issue 15's tuning list, for the sparse scan (``matryoshka.kernels.sparse_scan.SparseLaunch``): the
chunk width ``BLOCK_D`` against the warps per program, software pipelining of the slot loop
(``tl.range(..., num_stages=S)``: Triton then loads the next slots' decoder rows with ``cp.async``
while the current one is reduced), ``sem="acq_rel"`` atomics against the ``"relaxed"`` ones the
kernel uses, and ``dW_dec`` by atomics against a sort-by-latent segmented sum (``dw_mode="sorted"``:
per-slot rows written out, then summed per latent; deterministic, ``B k d`` more memory).  Decoder
rows are already loaded in their own dtype (bf16/fp16 loads, fp32 math) and the ``dW_dec`` atomics
are already vectorised (``red.global.v4.f32``; see the sm_90 report).

Phases, per dtype (every phase checks each candidate's outputs against the default launch's first):

1. every ``(block_d, num_warps)`` pair at ``loop_stages = 1``;
2. several rows per program (``ROWS``: 2 to 16 rows side by side, at the fastest pair's tile area);
3. ``loop_stages`` 2, 3 and 4 on the two fastest so far;
4. ``atomic_sem="acq_rel"`` on the fastest configuration so far;
5. ``dw_mode="sorted"`` on the fastest configuration so far.

Each candidate's forward and backward host calls (``sparse_scan_forward``/``_backward``: what the op
launches, allocations included) are timed with CUDA events, round-robin over the candidates of a
phase, on rotated input sets, at every ``k``; the score is the sum over ``k`` of the median
forward+backward time.  ``--time-budget-s``: no phase or round starts past it, and what was measured
is kept.  Writes ``tune_<device>.{json,md}`` into ``--results``: every candidate's times, its speed-up
on the default, its score over the sparse floor's on the same inputs (the issue's target: at most
2x), and the best launch per dtype as the line to put into ``default_launch``.

``--dry-run``: tiny sizes on the CPU in the Triton interpreter (set ``TRITON_INTERPRET=1``), which
checks the plumbing and each candidate's outputs, not the speed.  ``--compile-only``: no GPU needed;
builds every launch any phase can pick for sm_90 (``matryoshka.kernels.report``) and prints its
registers and spills, so that a GPU session meets no candidate that fails to compile.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from matryoshka import SparseActs
from matryoshka.kernels.sparse_scan import SparseLaunch, default_launch, sparse_scan_backward, sparse_scan_forward
from matryoshka.precision import compute_dtype
from matryoshka.scan_layout import SortedActs

from .baselines import sparse_floor_loss
from .checks import rel_err
from .harness import (DTYPES, describe_error, device_slug, environment, make_input_sets, median_time, read_timers,
                      start_timer, stop_timer, write_results)

# (block_d, num_warps) pairs from 1 to 8 elements per thread, the default (1024, 4) first.
PAIRS = [(1024, 4), (1024, 8), (512, 2), (512, 4), (512, 8), (256, 1), (256, 2), (256, 4)]
LOOP_STAGES = (2, 3, 4)
# Rows per program, each at the pair's tile area (block_d / rows columns): flex-sae's backward runs
# 16 rows x 32 columns.
ROWS = (2, 4, 8, 16)


@dataclass
class Inputs:
    """One input set in the kernels' layout (``SortedActs``: indices sorted within each row, padding
    last) and an upstream gradient; with ``levels``, the detached backward, the same gradient reaching
    both of its outputs."""

    x: torch.Tensor
    b_dec: torch.Tensor | None
    W_dec: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    grad_norms: torch.Tensor
    levels: torch.Tensor | None = None


def kernel_inputs(B: int, n: int, d: int, k: int, dtype: torch.dtype, device: torch.device) -> list[Inputs]:
    """``harness.make_input_sets`` (rotated against the L2) laid out as the op hands them to the kernels."""
    out = []
    for s in make_input_sets(B, n, d, k, dtype, device):
        slots = SortedActs(s.acts, n)
        grad = torch.rand(B, k + 1, device=device, dtype=torch.float32) / (B * (k + 1))
        out.append(Inputs(s.x, s.b_dec.detach(), s.W_dec.detach(), slots.values.detach(), slots.indices, grad))
    return out


@dataclass(frozen=True)
class Tunable:
    """A kernel pair as the timing phases see it (the sparse one here, the dense one in ``tune_dense``).

    ``forward(launch, s)`` makes the forward host call and returns its outputs, which
    ``backward(launch, s, saved)`` takes and whose outputs it returns; ``default(s)``: the launch the
    op uses on ``s``; ``tolerance(launch, expected)``: the largest ``rel_err`` from the default
    launch's outputs that a candidate may show.
    """

    forward: Callable
    backward: Callable
    default: Callable
    tolerance: Callable

    def outputs(self, launch, s) -> tuple[torch.Tensor, ...]:
        """Forward then backward at ``launch`` (``None``: the default): every output of both, which a
        candidate must reproduce."""
        saved = self.forward(launch, s)
        return (*saved, *self.backward(launch, s, saved))


def _sparse_forward(launch: SparseLaunch | None, s: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    acc = compute_dtype(s.x, s.b_dec, s.W_dec, s.values)
    return sparse_scan_forward(s.x, s.b_dec, s.W_dec, s.values, s.indices, acc, launch)


def _sparse_backward(launch: SparseLaunch | None, s: Inputs, saved) -> tuple[torch.Tensor, ...]:
    detached = (s.grad_norms, s.levels) if s.levels is not None else (None, None)
    return sparse_scan_backward(saved[1], s.grad_norms, s.W_dec, s.values, s.indices, *detached, launch=launch)


def rounding_tolerance(launch, expected: tuple[torch.Tensor, ...]) -> float:
    """Launches that differ only in the order of float additions (chunk partial sums, atomics) agree
    to rounding: ~1e-6 in float32 accumulation, ~1e-15 in float64."""
    return 1e-9 if expected[0].dtype == torch.float64 else 1e-4


SPARSE = Tunable(_sparse_forward, _sparse_backward, lambda s: default_launch(s.x.shape[1]), rounding_tolerance)


def run_candidate(launch: SparseLaunch | None, s: Inputs) -> tuple[torch.Tensor, ...]:
    """Forward then backward at ``launch`` (``None``: the default): ``(norms, residual, dx, dvalues, dW_dec)``."""
    return SPARSE.outputs(launch, s)


def time_round(kernel: Tunable, candidates: list, s, device: torch.device) -> list[tuple[float, float]]:
    """One call of each candidate on ``s``: ``[(forward seconds, backward seconds)]``."""
    pending = []
    for launch in candidates:
        start = start_timer(device)
        saved = kernel.forward(launch, s)
        forward = stop_timer(device, start)
        start = start_timer(device)
        kernel.backward(launch, s, saved)
        pending += [forward, stop_timer(device, start)]
    seconds = read_timers(device, pending)
    return list(zip(seconds[::2], seconds[1::2]))


def time_floor(sets: list[Inputs], device: torch.device, rounds: int) -> float:
    """Median seconds of the sparse floor on ``sets``: one ``embedding_bag`` decode and squared error,
    forward+backward (``baselines.sparse_floor_loss``), what the issue's "every prefix within 2x the
    sparse floor" compares against; input sets rotated."""
    leaves = [(s.x, SparseActs(s.values.clone().requires_grad_(), s.indices), s.W_dec.clone().requires_grad_(),
               s.b_dec.clone().requires_grad_()) for s in sets]

    def step(r: int) -> None:
        x, acts, W, b = leaves[r % len(leaves)]
        for t in (acts.values, W, b):
            t.grad = None
        sparse_floor_loss(x, acts, W, b).backward()

    return median_time(step, device, rounds)


def time_phase(kernel: Tunable, candidates: list, inputs_by_key: dict, device, rounds, deadline) -> dict:
    """``{launch: {key: {"forward_s", "backward_s", "mismatch"}}}`` over the input sets of each key
    (the sparse tuner's ``k``, the dense one's prefix set); candidates whose outputs are off (or that
    fail to compile or run) get an ``error`` instead and are not timed."""
    results = {launch: {} for launch in candidates}
    for key, sets in inputs_by_key.items():
        expected = kernel.outputs(kernel.default(sets[0]), sets[0])
        live = []
        for launch in candidates:
            try:
                off = max(rel_err(got, want) for got, want in zip(kernel.outputs(launch, sets[0]), expected))
            except Exception as e:  # a launch that does not compile or run is a result, not a crash
                results[launch][key] = dict(error=describe_error(e))
                continue
            if not off <= kernel.tolerance(launch, expected):
                results[launch][key] = dict(error=f"outputs differ from the default launch's by {off:.2e}")
                continue
            results[launch][key] = dict(mismatch=off)
            live.append(launch)
        time_round(kernel, live, sets[-1], device)  # warm-up: compiles and first touches, not timed
        samples = {launch: [] for launch in live}
        for r in range(rounds):
            if time.time() > deadline and r >= 2:
                break
            for launch, times in zip(live, time_round(kernel, live, sets[r % len(sets)], device)):
                samples[launch].append(times)
        for launch, times in samples.items():
            results[launch][key].update(
                forward_s=statistics.median(t[0] for t in times),
                backward_s=statistics.median(t[1] for t in times),
                repeats=len(times),
            )
    return results


def score(per_k: dict) -> float:
    """Sum over ``k`` of forward + backward median seconds; infinite when a ``k`` failed."""
    if not per_k or any("error" in r or "forward_s" not in r for r in per_k.values()):
        return math.inf
    return sum(r["forward_s"] + r["backward_s"] for r in per_k.values())


def candidate_pairs(d: int) -> list[tuple[int, int]]:
    """``PAIRS`` without chunks wider than ``d`` needs (the default's own is always kept)."""
    widest = default_launch(d).block_d
    return [(b, w) for b, w in PAIRS if b <= widest] or [(widest, 4)]


class Phases:
    """The timing phases of one dtype: each ``run`` times those of its candidates not measured yet
    (``time_phase``) and records them as ``dict(dtype, phase, launch, <per_key>, score_s)``."""

    def __init__(self, kernel: Tunable, inputs_by_key: dict, dtype_name: str, per_key: str, args, device, deadline,
                 echo, tool: str, limit: int | None = None):
        self.kernel, self.inputs_by_key, self.dtype_name, self.per_key = kernel, inputs_by_key, dtype_name, per_key
        self.args, self.device, self.deadline, self.echo, self.tool, self.limit = args, device, deadline, echo, tool, limit
        self.measured: dict = {}
        self.records: list[dict] = []

    def run(self, name: str, candidates: list) -> None:
        candidates = [c for c in dict.fromkeys(candidates) if c not in self.measured][: self.limit]
        if not candidates:
            return
        if time.time() > self.deadline:
            self.echo(f"[{self.tool}] {self.dtype_name} {name}: skipped (time budget spent)")
            return
        self.echo(f"[{self.tool}] {self.dtype_name} {name}: {len(candidates)} candidates")
        timed = time_phase(self.kernel, candidates, self.inputs_by_key, self.device, self.args.rounds, self.deadline)
        for launch, per_key in timed.items():
            self.measured[launch] = per_key
            self.records.append({"dtype": self.dtype_name, "phase": name, "launch": asdict(launch),
                                 self.per_key: {str(k): v for k, v in per_key.items()}, "score_s": score(per_key)})

    def ranked(self) -> list:
        """The measured candidates that ran, fastest first."""
        finite = (c for c in self.measured if math.isfinite(score(self.measured[c])))
        return sorted(finite, key=lambda c: score(self.measured[c]))

    def add_ratios(self, default, **references: float) -> list[dict]:
        """The records, each with its speed-up on ``default`` and its score over each reference's
        (``vs_<name>``: seconds summed over the same keys); ``None`` where a side did not run."""
        base = score(self.measured.get(default, {}))
        for r in self.records:
            finite = math.isfinite(r["score_s"])
            r["speedup_vs_default"] = base / r["score_s"] if math.isfinite(base) and finite else None
            for name, seconds in references.items():
                r[f"vs_{name}"] = r["score_s"] / seconds if finite else None
        return self.records


def tune_dtype(dtype_name: str, args, device, deadline, echo) -> list[dict]:
    dtype = DTYPES[dtype_name]
    inputs_by_k = {k: kernel_inputs(args.B, args.n, args.d, k, dtype, device) for k in args.ks}
    default = default_launch(args.d)
    phases = Phases(SPARSE, inputs_by_k, dtype_name, "per_k", args, device, deadline, echo, "tune")
    phases.run("pairs", [default] + [SparseLaunch(b, w) for b, w in candidate_pairs(args.d)])
    phases.run("rows", [v for c in phases.ranked()[:1] for v in rows_variants(c)])
    phases.run("stages", [replace(c, loop_stages=s) for c in phases.ranked()[:2] for s in LOOP_STAGES])
    if phases.ranked():
        best = phases.ranked()[0]
        phases.run("atomics", [replace(best, atomic_sem="acq_rel")])
        phases.run("dw", [replace(best, dw_mode="sorted")])
    floor = sum(time_floor(inputs_by_k[k], device, args.rounds) for k in args.ks)
    return phases.add_ratios(default, sparse_floor=floor)


def best_launch(records: list[dict]) -> dict | None:
    finite = [r for r in records if math.isfinite(r["score_s"])]
    return min(finite, key=lambda r: r["score_s"]) if finite else None


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: ``value`` formatted, ``-`` where nothing was measured."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def timing_cell(c: dict) -> str:
    """A candidate's cell at one input key: why it was not timed, or its median forward / backward ms."""
    if "error" in c:
        return c["error"]
    return f"{c['forward_s'] * 1e3:.3f} / {c['backward_s'] * 1e3:.3f}" if "forward_s" in c else "-"


def score_cell(r: dict) -> str:
    """A candidate's score (ms), ``-`` where a key failed."""
    return fmt(r["score_s"] * 1e3 if math.isfinite(r["score_s"]) else None, ".3f")


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# Sparse kernel launch tuning: {env.get('device_name')}", "",
             f"`{doc['command']}`; torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('git_commit')}; "
             f"B={doc['B']}, d={doc['d']}, n={doc['n']}, k in {doc['ks']}. Time: median forward / backward "
             f"per call (ms), summed over k in the score; speed-up on the default launch "
             f"`{doc['default_launch']}`; the score over the sparse floor's (one embedding_bag decode and "
             f"squared error, forward+backward, same inputs; issue 15's target: at most 2x).", ""]
    for dtype_name, records in doc["by_dtype"].items():
        lines += [f"## {dtype_name}", "", "| phase | rows | block_d | warps | loop stages | atomics | dW_dec | "
                  + " | ".join(f"k={k} fwd / bwd ms" for k in doc["ks"]) + " | score ms | speed-up | / sparse floor |",
                  "|" + "---|" * (10 + len(doc["ks"]))]
        for r in sorted(records, key=lambda r: r["score_s"]):
            L = r["launch"]
            cells = [timing_cell(r["per_k"].get(str(k), {})) for k in doc["ks"]]
            lines.append(f"| {r['phase']} | {L['rows']} | {L['block_d']} | {L['num_warps']} | {L['loop_stages']} | {L['atomic_sem']} | "
                         f"{L['dw_mode']} | " + " | ".join(cells) + f" | {score_cell(r)} | "
                         f"{fmt(r['speedup_vs_default'], '.2f', 'x')} | {fmt(r.get('vs_sparse_floor'), '.2f', 'x')} |")
        best = best_launch(records)
        if best:
            lines += ["", f"Best: `{SparseLaunch(**best['launch'])}`, {best['speedup_vs_default']:.2f}x the default."
                      if best["speedup_vs_default"] else ""]
        lines.append("")
    return "\n".join(lines)


def rows_variants(launch: SparseLaunch) -> list[SparseLaunch]:
    """``launch`` with ``ROWS`` rows per program at the same tile area (at least 16 columns)."""
    return [replace(launch, rows=r, block_d=launch.block_d // r) for r in ROWS if launch.block_d // r >= 16]


def every_candidate(d: int) -> list[SparseLaunch]:
    """The launches the phases time at width ``d``: every pair at every depth, each also with
    ``acq_rel`` atomics and with the sorted ``dW_dec``, and every pair's rows variants (pipelined
    only for the default pair's, which the phases meet first; a candidate that fails to compile on
    the GPU is recorded there, not fatal)."""
    out = [replace(SparseLaunch(b, w), loop_stages=s) for b, w in candidate_pairs(d) for s in (1, *LOOP_STAGES)]
    rows = [v for b, w in candidate_pairs(d) for v in rows_variants(SparseLaunch(b, w))]
    rows += [replace(v, loop_stages=s) for v in rows_variants(default_launch(d)) for s in LOOP_STAGES]
    return ([default_launch(d)] + out + [replace(c, atomic_sem="acq_rel") for c in out]
            + [replace(c, dw_mode="sorted") for c in out] + rows)


def candidate_builds(B: int, d: int, dtype_names: list[str]) -> list:
    """``report.Build`` of every kernel that ``every_candidate(d)`` launches, each distinct build once."""
    from matryoshka.kernels import report

    # Only the default launch's builds are what the op launches ("not picked" in the table otherwise);
    # of identical builds the default launch's, which comes first, is kept.
    return distinct_builds([replace(b, launched=launch == default_launch(d)) for launch in every_candidate(d)
                            for b in report._sparse_builds([DTYPES[name] for name in dtype_names], [(B, d)], launch)])


def distinct_builds(builds: list) -> list:
    """The first of each set of identical ``report.Build``s (same kernel, dtype, constants and
    options: one compile), in order."""
    distinct = {}
    for b in builds:
        distinct.setdefault((b.kernel, b.dtype, repr(sorted(b.constexprs.items())), repr(sorted(b.options.items()))), b)
    return list(distinct.values())


def _compile_nth(make_builds: Callable[[], list], index: int):
    """Worker: compile ``make_builds()[index]`` (JIT functions do not pickle; a partial of a module
    function and an index do)."""
    from matryoshka.kernels import report

    try:
        return report.compile_build(make_builds()[index]).stats
    except Exception as e:  # noqa: BLE001 - a failing candidate is the finding
        return describe_error(e)


def compile_report(make_builds: Callable[[], list], jobs: int, fenced_by_design: Callable = lambda build: False,
                   note: str = "") -> int:
    """Build ``make_builds()`` for sm_90 in ``jobs`` processes and print the report; 1 if a build fails
    to compile or fences its atomics (unless ``fenced_by_design``).  A spilling candidate is listed
    but does not fail: it is a finding the timing will weigh, while the launch the op uses is held to
    no spill by ``matryoshka.kernels.report``."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from matryoshka.kernels import report

    builds = make_builds()
    with ProcessPoolExecutor(jobs) as pool:
        outcomes = list(pool.map(partial(_compile_nth, make_builds), range(len(builds))))
    results = [report.Result(b, *o) for b, o in zip(builds, outcomes) if not isinstance(o, str)]
    failed = 0
    for build, outcome in zip(builds, outcomes):
        if isinstance(outcome, str):
            failed += 1
            print(f"FAIL {build.kernel} {build.config}: {outcome}")
    print(report.format_table(results))
    failed += sum(r.fenced and not fenced_by_design(r.build) for r in results)
    spilling = [r for r in results if r.spill_bytes]
    if note:
        print(note)
    print(f"{len(spilling)} build(s) spill, up to {max((r.spill_bytes for r in spilling), default=0)} B "
          "(listed, not failing)")
    print(f"{len(builds)} builds, {failed} failing")
    return 1 if failed else 0


def acq_rel_by_design(build) -> bool:
    """A sparse build at ``atomic_sem="acq_rel"`` is fenced by construction: it is there to measure
    what the fences cost (``compile_report``'s ``fenced_by_design``)."""
    return "acq_rel" in build.config


def compile_only(args) -> int:
    """``compile_report`` of every kernel ``every_candidate`` launches at ``args.dtypes``."""
    from functools import partial

    return compile_report(partial(candidate_builds, args.B, args.d, args.dtypes), args.jobs, acq_rel_by_design,
                          "(an acq_rel candidate's \"fenced atomic\" is by design: it measures what the fences cost)")


def tuner_parser(prog: str, description: str, rounds: int, budget_s: float, rounds_per: str) -> argparse.ArgumentParser:
    """The options both tuners take; each adds its own sizes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--device", default="cuda")
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=rounds, help=f"timed calls per candidate and {rounds_per} (at least 3)")
    p.add_argument("--time-budget-s", type=float, default=budget_s)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (run under TRITON_INTERPRET=1)")
    p.add_argument("--compile-only", action="store_true", help="build every candidate for sm_90 (no GPU) and report")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes (--compile-only)")
    return p


def run_tuner(p: argparse.ArgumentParser, args, argv, name: str, tune_one: Callable, markdown: Callable, **fields) -> int:
    """Both tuners' run: every dtype of ``args.dtypes`` through ``tune_one(dtype_name, args, device,
    deadline, echo) -> (records, extras)`` until ``--time-budget-s`` is spent, then
    ``<name>_<device>.{json,md}`` (``extras[key]`` goes to the document's ``key`` under the dtype;
    ``fields`` to its top level).  Exit status 1 if a candidate failed or no dtype ran."""
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the tuning needs a GPU (--dry-run checks it on the CPU)", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.time_budget_s

    def echo(text: str) -> None:
        print(f"{text} ({time.time() - start:.0f} s)", flush=True)

    doc = dict(command=f"python -m benchmarks.{name} " + " ".join(argv if argv is not None else sys.argv[1:]),
               environment=environment(device), **fields, by_dtype={})
    for dtype_name in args.dtypes:
        if time.time() > deadline:
            echo(f"[{name}] {dtype_name}: skipped (time budget spent)")
            continue
        doc["by_dtype"][dtype_name], extras = tune_one(dtype_name, args, device, deadline, echo)
        for key, value in extras.items():
            doc.setdefault(key, {})[dtype_name] = value
    doc["wall_s"] = time.time() - start
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"{name}_{'dry_' if args.dry_run else ''}{device_slug(device)}"
    write_results(stem, doc, markdown(doc))
    failed = [r for records in doc["by_dtype"].values() for r in records if not math.isfinite(r["score_s"])]
    return 1 if failed or not doc["by_dtype"] else 0


def main(argv=None) -> int:
    p = tuner_parser("python -m benchmarks.tune", __doc__.split("\n")[0], rounds=20, budget_s=120.0, rounds_per="k")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--ks", type=int, nargs="+", default=[32, 128])
    args = p.parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    if args.dry_run:
        args.device, args.B, args.d, args.n, args.ks, args.dtypes, args.rounds = "cpu", 6, 300, 64, [1, 4], ["fp32"], 3
    return run_tuner(p, args, argv, "tune", lambda *a: (tune_dtype(*a), {}), markdown, B=args.B, d=args.d, n=args.n,
                     ks=args.ks, default_launch=str(default_launch(args.d)))


if __name__ == "__main__":
    sys.exit(main())
