"""The benchmark sweep: ``python -m benchmarks.sweep [--device cuda] [--quick] [...]``.

For every configuration (n, k, d, dtype) and every method of ``benchmarks.baselines`` it measures
forward+backward time and peak extra memory at G = 1, 5, 10 (sampled, the original recipe), 16, 64
and n prefixes, then an end-to-end TopK/BatchTopK SAE training step (``benchmarks.sae_step``).
It writes, into ``benchmarks/results/`` with the device in the name:

* ``sweep_<device>.json``  environment, settings, reference checks, raw times of every repeat,
                           medians, memory, the headline ratios against the issue's targets;
* ``sweep_<device>.csv``   one row per measurement (raw times joined by ``;``);
* ``sweep_<device>_<dtype>_d<d>.png``  time and peak memory vs G, one line per method, log axes;
* ``sweep_<device>.md``    the same results as Markdown tables (for the README).

Method: every method is first checked against ``matryoshka.reference``.  Each (method, G) cell
gets a warm-up, a peak-memory run and then timed repeats; the cells of one configuration are timed
round-robin (one call of each per round) so that load changes on a shared machine hit all cells
alike, and inputs rotate over several sets so caches do not flatter small inputs.  CUDA calls are
timed with CUDA events; CPU calls with ``time.perf_counter``.  Medians are reported with quartiles
and minimums.  Cells whose estimated cost exceeds ``--max-call-s`` or the memory budget are
recorded as skipped, with the estimate.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .baselines import METHODS, Method, methods_for
from .checks import check_methods, describe_failure
from .harness import (
    DTYPES,
    InputSet,
    calibrate,
    commit_label,
    device_slug,
    describe_error,
    environment,
    estimate,
    find_ok,
    make_input_sets,
    memory_budget,
    peak_extra_memory,
    paired_ratio,
    prefix_set,
    ratio,
    start_timer,
    read_timers,
    stop_timer,
    summarize,
    time_call,
    write_results_json,
    write_results_text,
)
from .sae_step import VARIANTS, TopKSAE, make_train_step

RESULTS = Path(__file__).resolve().parent / "results"
G_KINDS = ["1", "5", "sampled10", "16", "64", "n"]

DEFAULTS = {
    "cpu": dict(B=256, d=[256], n=[1024, 4096], k=[32], dtypes=["fp32"], max_call_s=3.0, cell_budget_s=1.0,
                min_repeats=5, max_repeats=40, e2e=dict(B=256, d=256, n=4096, k=[32])),
    # Issue 15's grid: flex-sae's published all-prefix overheads are at F = 65536, D = 2304, k = 32-128.
    # Configurations run dtype by dtype, n by n, in these orders: a --time-budget-s cut drops the last
    # ones, so bf16 (what SAEs train in) and flex-sae's n come first.
    "cuda": dict(B=4096, d=[2304], n=[65536, 36864], k=[32, 64, 128], dtypes=["bf16", "fp32"],
                 max_call_s=1.0, cell_budget_s=0.5, min_repeats=10, max_repeats=200,
                 e2e=dict(B=4096, d=2304, n=65536, k=[32, 64, 128])),
    "quick": dict(B=64, d=[32], n=[256], k=[8], dtypes=["fp32"], max_call_s=0.5, cell_budget_s=0.05,
                  min_repeats=3, max_repeats=5, e2e=dict(B=64, d=32, n=512, k=[8])),
}


# ------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One (method, prefix set) measurement within a configuration."""

    method: Method
    g_kind: str  # "1", "5", "sampled10", "16", "64", "n", or "-" for the single-prefix floors
    prefixes: object
    record: dict
    step: object = None
    times: list = field(default_factory=list)
    target_repeats: int = 0
    _pending: list = field(default_factory=list)


def _make_step(method: Method, prefixes):
    def step(s: InputSet) -> None:
        method(s.x, s.acts, s.W_dec, s.b_dec, prefixes).backward()

    return step


def _timed_call(step, s: InputSet, device: torch.device):
    """``step(s)`` timed: a ``harness.stop_timer`` result, read by ``read_timers`` after the round."""
    s.clear_grads()
    start = start_timer(device)
    step(s)
    return stop_timer(device, start)


def run_config(cfg: dict, methods: list[Method], g_kinds: list[str], device, opts, bar) -> list[dict]:
    B, n, d, k, dtype_name = cfg["B"], cfg["n"], cfg["d"], cfg["k"], cfg["dtype"]
    dtype = DTYPES[dtype_name]
    sets = make_input_sets(B, n, d, k, dtype, device, seed=opts.seed)
    budget = memory_budget(device)
    cells: list[Cell] = []
    for method in methods:
        for kind in g_kinds if method.uses_prefixes else ["-"]:
            prefixes = prefix_set("1" if kind == "-" else kind, n, seed=opts.seed)
            est_s, est_bytes = estimate(method, B, n, d, k, prefixes, dtype, device)
            rec = dict(cfg, kind="loss", method=method.name, label=method.label, g_kind=kind,
                       G=(1 if kind == "-" else len(prefixes)), input_sets=len(sets),
                       est_s=est_s, est_extra_bytes=est_bytes, status="ok", reason=None)
            if est_s > opts.max_call_s:
                rec.update(status="skipped", reason=f"estimated {est_s:.3g} s per call > --max-call-s {opts.max_call_s}")
            elif est_bytes > budget:
                rec.update(status="skipped", reason=f"estimated {est_bytes / 2**30:.3g} GiB > memory budget {budget / 2**30:.3g} GiB")
            cells.append(Cell(method, kind, prefixes, rec))

    # Warm-up, peak memory and a first timing of each runnable cell.
    for cell in cells:
        bar.set_postfix_str(f"n={n} k={k} d={d} {dtype_name} {cell.method.name} G={cell.record['G']} warm-up")
        if cell.record["status"] != "ok":
            bar.update(1)
            continue
        cell.step = _make_step(cell.method, cell.prefixes)
        try:
            if device.type == "cuda":
                for i in range(opts.warmup):
                    sets[i % len(sets)].clear_grads()
                    cell.step(sets[i % len(sets)])
            peak, how = peak_extra_memory(cell.step, sets[0], device)  # on the CPU: also a warm-up
            with torch.no_grad():
                loss = cell.method(sets[0].x, sets[0].acts, sets[0].W_dec, sets[0].b_dec, cell.prefixes)
            first = read_timers(device, [_timed_call(cell.step, sets[1 % len(sets)], device)])[0]
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            cell.record.update(status="skipped", reason=f"out of memory: {exc}".splitlines()[0])
            torch.cuda.empty_cache()
            bar.update(1)
            continue
        except Exception as exc:  # a method that cannot run here (e.g. a dtype it lacks): record it
            cell.record.update(status="error", reason=describe_error(exc))
            bar.update(1)
            continue
        cell.record.update(peak_extra_bytes=peak, memory_method=how, loss_value=float(loss), warm_call_s=first)
        cell.record["_first"] = first
        bar.update(1)

    # Every cell that is not slow gets the same number of repeats, so that all of them are timed
    # in the same rounds (paired samples: a load change on a shared machine hits them alike).
    runnable = [c for c in cells if c.record["status"] == "ok"]
    fast = [c for c in runnable if c.record["_first"] <= opts.cell_budget_s]
    fast_ids = {id(c) for c in fast}
    per_round = sum(c.record["_first"] for c in fast) or 1.0
    repeats = min(opts.max_repeats, max(opts.min_repeats, int(opts.cell_budget_s * max(1, len(fast)) / per_round)))
    for c in runnable:
        c.target_repeats = repeats if id(c) in fast_ids else 2  # slow cells: two timed repeats
        c.record.pop("_first")

    # Round-robin timing: one call of every unfinished cell per round; every call takes the next
    # input set, so no call finds its inputs left in cache by the call before it.
    round_index = 0
    calls = itertools.count()
    while True:
        active = [c for c in runnable if len(c.times) < c.target_repeats]
        if not active:
            break
        bar.set_postfix_str(f"n={n} k={k} d={d} {dtype_name} timing round {round_index + 1}, {len(active)} cells")
        for c in active:
            c._pending = [_timed_call(c.step, sets[next(calls) % len(sets)], device)
                          for _ in range(1 if device.type == "cpu" else min(5, c.target_repeats - len(c.times)))]
        for c in active:
            c.times += read_timers(device, c._pending)
            c._pending = []
        round_index += 1
    for s in sets:
        s.clear_grads()

    records = []
    for c in cells:
        if c.times:
            c.record.update(summarize(c.times), times_s=c.times)
        records.append(c.record)
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


# -------------------------------------------------------------------------------------------- e2e
def run_e2e(e2e: dict, activations: list[str], dtype_name: str, device, opts, bar) -> list[dict]:
    B, d, n, k = e2e["B"], e2e["d"], e2e["n"], e2e["k"]
    dtype = DTYPES[dtype_name]
    backend = "triton" if device.type == "cuda" else "torch"
    g = torch.Generator(device=device).manual_seed(opts.seed)
    batches = [torch.randn(B, d, device=device, generator=g).to(dtype) for _ in range(4)]
    cells = []
    for activation in activations:
        for variant in VARIANTS:
            torch.manual_seed(opts.seed)
            sae = TopKSAE(d, n, k, activation, device=device, dtype=dtype)
            step, opt = make_train_step(variant, sae, backend)
            rec = dict(kind="e2e", variant=variant, activation=activation, B=B, d=d, n=n, k=k, dtype=dtype_name,
                       fused_backend=backend if "fused" in variant else None, status="ok", reason=None)
            bar.set_postfix_str(f"e2e {activation} {variant} warm-up")
            try:
                for i in range(opts.warmup):
                    step(batches[i % len(batches)])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    step(batches[0])
                    torch.cuda.synchronize(device)
                    rec.update(peak_extra_bytes=int(torch.cuda.max_memory_allocated(device) - base),
                               memory_method="torch.cuda.max_memory_allocated - memory_allocated before the step")
                t0 = time.perf_counter()
                step(batches[1])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - t0
            except Exception as exc:  # out of memory, or a variant that cannot run here: record it
                status = "skipped" if isinstance(exc, torch.OutOfMemoryError) else "error"
                rec.update(status=status, reason=describe_error(exc))
                cells.append([rec, None, 0, []])
                del sae, step, opt
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bar.update(1)
                continue
            cells.append([rec, step, first, []])
            bar.update(1)
    # One shared repeat count (paired rounds, as in run_config); steps slower than 2x the cell budget: 2.
    fast = [c for c in cells if c[1] is not None and c[2] <= 2 * opts.cell_budget_s]
    per_round = sum(c[2] for c in fast) or 1.0
    repeats = min(opts.max_repeats, max(opts.min_repeats, int(2 * opts.cell_budget_s * max(1, len(fast)) / per_round)))
    for c in cells:
        c[2] = repeats if any(c is f for f in fast) else 2
    # Round-robin over the variants (each owns its SAE and optimiser, so their states never mix).
    round_index = 0
    while any(step is not None and len(times) < target for _, step, target, times in cells):
        bar.set_postfix_str(f"e2e timing round {round_index + 1}")
        for rec, step, target, times in cells:
            if step is None or len(times) >= target:
                continue
            x = batches[round_index % len(batches)]
            times.append(time_call(lambda: step(x), device))
        round_index += 1
    out = []
    for rec, _, _, times in cells:
        if times:
            rec.update(summarize(times), times_s=times)
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------- summaries
def _item(name: str, num, den, target: float | None = None, op: str = "<=", applies: bool = False) -> dict:
    """One headline ratio ``num / den`` (records, or ``None`` when not measured) against ``target``
    (``None``: recorded, no target); ``met`` only where the target ``applies`` on this device."""
    med = ratio(num, den)
    met = None if med is None or target is None or not applies else (med <= target if op == "<=" else med >= target)
    return dict(name=name, ratio_of_medians=med, paired_ratio=paired_ratio(num, den), ratio_of_minimums=ratio(num, den, "min_s"),
                target="record" if target is None else f"{op} {target}", target_applies=applies and target is not None,
                met=met)


def headline(records: list[dict], device_type: str) -> list[dict]:
    """The issue's target ratios per configuration, for each fused backend that was measured."""
    on_gpu = device_type == "cuda"
    out = []
    configs = sorted({(r["n"], r["k"], r["d"], r["dtype"], r["B"]) for r in records if r["kind"] == "loss"})
    for n, k, d, dtype, B in configs:
        rows = [r for r in records if r["kind"] == "loss" and (r["n"], r["k"], r["d"], r["dtype"], r["B"]) == (n, k, d, dtype, B)]
        for fused in ("fused_triton", "fused_torch"):
            f = {kind: find_ok(rows, method=fused, g_kind=kind) for kind in G_KINDS}
            if not any(f.values()):
                continue
            sparse, vanilla = find_ok(rows, method="sparse_floor"), find_ok(rows, method="vanilla_floor")
            rs5, rs64 = find_ok(rows, method="running_sum", g_kind="5"), find_ok(rows, method="running_sum", g_kind="64")
            peaks = [r["peak_extra_bytes"] for r in f.values() if r is not None and "peak_extra_bytes" in r]
            items = [
                _item("every prefix / one prefix (fused)", f["n"], f["1"], 1.1 if on_gpu else 1.5, "<=", True),
                _item("every prefix (fused) / sparse floor", f["n"], sparse, 2.0, "<=", on_gpu),
                _item("every prefix (fused) / vanilla dense floor", f["n"], vanilla, 1.0, "<=", False),
                _item("running sum / fused at G=5", rs5, f["5"], 3.0, ">=", on_gpu),
                _item("running sum / fused at G=64", rs64, f["64"], 10.0, ">=", on_gpu),
            ]
            flat = None if len(peaks) < 2 else max(peaks) / max(1, min(peaks))
            items.append(dict(name="fused peak extra memory, max/min over G", ratio_of_medians=flat,
                              paired_ratio=None, ratio_of_minimums=None,
                              target="<= 1.1 (flat in G)", target_applies=True, met=None if flat is None else flat <= 1.1))
            out.append(dict(n=n, k=k, d=d, dtype=dtype, B=B, fused=fused, items=items))
        vanilla = find_ok(rows, method="vanilla_floor")
        for fused in ("fused_dense_triton", "fused_dense_torch"):
            dense = find_ok(rows, method=fused, g_kind="n")
            if dense is None or vanilla is None:
                continue
            name = f"every prefix (dense, {'kernel' if fused.endswith('triton') else 'PyTorch scan'}) / one dense decode"
            out.append(dict(n=n, k=k, d=d, dtype=dtype, B=B, fused=fused, items=[_item(name, dense, vanilla, 1.3, "<=", on_gpu)]))
        # What "auto" should run for dense CUDA activations (it runs the PyTorch scan until the kernel
        # measures faster): the two at every G measured, recorded, not a target.
        for kind in G_KINDS:
            kernel, scan = find_ok(rows, method="fused_dense_triton", g_kind=kind), find_ok(rows, method="fused_dense_torch", g_kind=kind)
            if kernel is not None and scan is not None:
                name = f"dense kernel / dense PyTorch scan at G={kind} (< 1: auto should route dense CUDA to Triton)"
                out.append(dict(n=n, k=k, d=d, dtype=dtype, B=B, fused="dense routing", items=[_item(name, kernel, scan)]))
    e2e = [r for r in records if r["kind"] == "e2e"]
    for dtype, act, n, k in sorted({(r["dtype"], r["activation"], r["n"], r["k"]) for r in e2e}):
        match = dict(dtype=dtype, activation=act, n=n, k=k)
        van = find_ok(e2e, variant="vanilla", **match)
        vsp = find_ok(e2e, variant="vanilla_sparse", **match)
        ev = find_ok(e2e, variant="every_fused", **match)
        gf = find_ok(e2e, variant="groups_fused", **match)
        grs = find_ok(e2e, variant="groups_running_sum", **match)
        items = [
            _item("every-prefix step / vanilla step", ev, van, 1.1, "<=", on_gpu),
            _item("every-prefix step / vanilla sparse-decode step", ev, vsp, 1.1, "<=", False),
            _item("groups (fused) step / vanilla step", gf, van, 1.1, "<=", False),
            _item("groups (running sum) step / vanilla step", grs, van, 1.1, "<=", False),
        ]
        ref = ev or van or {}
        out.append(dict(e2e=True, activation=act, n=n, k=k, d=ref.get("d"), dtype=dtype, B=ref.get("B"), items=items))
    return out


# ---------------------------------------------------------------------------------------- outputs
def _fmt_ms(r):
    if r is None:
        return ""
    if r.get("status") != "ok":
        return "skip"
    return f"{r['median_s'] * 1e3:.3g}"


def _fmt_mib(r):
    if r is None or r.get("status") != "ok" or "peak_extra_bytes" not in r:
        return "" if r is None else "skip"
    return f"{r['peak_extra_bytes'] / 2**20:.3g}"


def markdown(doc: dict) -> str:
    env, records = doc["environment"], doc["records"]
    lines = [
        f"### Results on {env['device_name']} ({env['device_type']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, commit `{commit_label(env)}`, {env['timestamp_utc']}, "
        f"{env['torch_threads']} threads, load average at start {env.get('load_average_at_start')}.",
        "",
    ]
    loss = [r for r in records if r["kind"] == "loss"]
    configs = sorted({(r["n"], r["k"], r["d"], r["dtype"], r["B"]) for r in loss})
    for n, k, d, dtype, B in configs:
        rows = [r for r in loss if (r["n"], r["k"], r["d"], r["dtype"], r["B"]) == (n, k, d, dtype, B)]
        names = list(dict.fromkeys(r["method"] for r in rows))
        head = ["G=1", "G=5", "G=10 (sampled)", "G=16", "G=64", f"G=n={n}"]
        for what, fmt in (("forward+backward median time, ms", _fmt_ms), ("peak extra memory, MiB", _fmt_mib)):
            lines += [f"**B={B}, d={d}, n={n}, k={k}, {dtype}: {what}**", "",
                      "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
            for name in names:
                mrows = [r for r in rows if r["method"] == name]
                if mrows[0]["g_kind"] == "-":
                    cells = [fmt(mrows[0]) + " (any G: one prefix)"] + [""] * (len(head) - 1)
                else:
                    cells = [fmt(next((r for r in mrows if r["g_kind"] == kind), None)) for kind in G_KINDS]
                lines.append(f"| {METHODS[name].label} | " + " | ".join(cells) + " |")
            lines.append("")
    e2e_all = [r for r in records if r["kind"] == "e2e"]
    for dtype, n, k in sorted({(r["dtype"], r["n"], r["k"]) for r in e2e_all}):
        e2e = [r for r in e2e_all if (r["dtype"], r["n"], r["k"]) == (dtype, n, k)]
        r0, acts = e2e[0], sorted({r["activation"] for r in e2e})
        lines += [f"**End-to-end training step (encoder, activation, loss, backward, Adam), B={r0['B']}, d={r0['d']}, "
                  f"n={r0['n']}, k={r0['k']}, {dtype}: median ms**", "",
                  "| step | " + " | ".join(acts) + " |", "|---" * (len(acts) + 1) + "|"]
        for variant in VARIANTS:
            cells = [_fmt_ms(find_ok(e2e, variant=variant, activation=a) or {"status": "missing"}) for a in acts]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Headline ratios against the issue's targets** (ratio of medians; in brackets the median of "
              "per-round ratios, paired, and the ratio of minimums)", "",
              "| configuration | ratio | measured | target | met |", "|---|---|---|---|---|"]
    for h in doc["headline"]:
        where = (f"e2e {h['activation']} n={h['n']} k={h['k']} d={h['d']} {h['dtype']}" if h.get("e2e")
                 else f"{h['fused']} n={h['n']} k={h['k']} d={h['d']} {h['dtype']}")
        for it in h["items"]:
            med, pr, mn = it["ratio_of_medians"], it.get("paired_ratio"), it["ratio_of_minimums"]
            extra = ", ".join(f"{label} {v:.3g}" for label, v in (("paired", pr), ("min", mn)) if v is not None)
            got = "n/a" if med is None else f"{med:.3g}" + (f" [{extra}]" if extra else "")
            met = "n/a (GPU target)" if not it["target_applies"] else {True: "yes", False: "NO", None: "n/a"}[it["met"]]
            lines.append(f"| {where} | {it['name']} | {got} | {it['target']} | {met} |")
    lines.append("")
    for cfg in doc.get("not_run", []):
        lines.append("Not run: " + ", ".join(f"{key}={value}" for key, value in cfg.items()))
    return "\n".join(lines)


def plot(doc: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env, records = doc["environment"], [r for r in doc["records"] if r["kind"] == "loss"]
    paths = []
    for dtype, d in sorted({(r["dtype"], r["d"]) for r in records}):
        sub = [r for r in records if r["dtype"] == dtype and r["d"] == d]
        configs = sorted({(r["n"], r["k"], r["B"]) for r in sub})
        fig, axes = plt.subplots(len(configs), 2, figsize=(13, 4.2 * len(configs)), squeeze=False)
        for row, (n, k, B) in enumerate(configs):
            rows = [r for r in sub if (r["n"], r["k"], r["B"]) == (n, k, B)]
            for col, (key, scale, ylabel) in enumerate((("median_s", 1e3, "forward+backward time, ms (median)"),
                                                        ("peak_extra_bytes", 2.0**-20, "peak extra memory, MiB"))):
                ax = axes[row][col]
                for i, name in enumerate(dict.fromkeys(r["method"] for r in rows)):
                    color = f"C{i}"
                    mrows = [r for r in rows if r["method"] == name and r["status"] == "ok" and key in r]
                    if not mrows:
                        continue
                    if mrows[0]["g_kind"] == "-":
                        ax.axhline(mrows[0][key] * scale, color=color, ls="--", label=METHODS[name].label)
                        continue
                    fixed = sorted((r for r in mrows if r["g_kind"] != "sampled10"), key=lambda r: r["G"])
                    ax.plot([r["G"] for r in fixed], [r[key] * scale for r in fixed], "o-", color=color,
                            label=METHODS[name].label)
                    for r in mrows:
                        if r["g_kind"] == "sampled10":
                            ax.plot([r["G"]], [r[key] * scale], "o", mfc="none", color=color)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("number of prefixes G (hollow: 10 sampled prefixes)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"B={B} d={d} n={n} k={k} {dtype}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if row == 0 and col == 0:
                    ax.legend(fontsize=8)
        fig.suptitle(f"Matryoshka loss, forward+backward: {env['device_name']} ({env['device_type']}), "
                     f"torch {env['torch']}, commit {commit_label(env, 10)}",
                     fontsize=11)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_{dtype}_d{d}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_csv(records: list[dict], path: Path) -> None:
    keys = ["kind", "method", "label", "variant", "activation", "fused_backend", "g_kind", "G", "B", "d", "n", "k",
            "dtype", "status", "reason", "median_s", "q1_s", "q3_s", "min_s", "repeats", "peak_extra_bytes",
            "memory_method", "loss_value", "est_s", "est_extra_bytes", "input_sets", "times_s"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in records:
        row = dict(r)
        if "times_s" in row:
            row["times_s"] = ";".join(f"{t:.6g}" for t in row["times_s"])
        w.writerow(row)
    write_results_text(path, text.getvalue())


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole pipeline")
    p.add_argument("--B", type=int)
    p.add_argument("--d", type=int, nargs="+")
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--k", type=int, nargs="+")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--G", nargs="+", default=G_KINDS, help=f"prefix sets (default {' '.join(G_KINDS)})")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all that run on the device")
    p.add_argument("--max-call-s", type=float, help="skip cells estimated slower than this per call")
    p.add_argument("--cell-budget-s", type=float, help="timed seconds per cell (min/max repeats apply)")
    p.add_argument("--min-repeats", type=int)
    p.add_argument("--max-repeats", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step")
    p.add_argument("--e2e-only", action="store_true")
    p.add_argument("--e2e-first", action="store_true",
                   help="time the training steps before the loss grid (a --time-budget-s cut then drops loss configurations)")
    p.add_argument("--activations", nargs="+", default=["topk", "batchtopk"], choices=["topk", "batchtopk"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1 on the CPU: on a shared machine OpenMP barrier stalls inflated "
                        "2-thread timings up to 40x; pass the core count on a quiet machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--time-budget-s", type=float, help="start no configuration after this many seconds (the rest "
                                                           "are listed as not run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    base = DEFAULTS["quick" if args.quick else device.type]
    for key in ("B", "d", "n", "k", "dtypes", "max_call_s", "cell_budget_s", "min_repeats", "max_repeats"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.e2e = dict(base["e2e"])
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, device


def methods_at(methods: list[Method], k: int, ks: list[int]) -> list[Method]:
    """The methods a configuration at ``k`` times: those whose time does not depend on ``k`` (the
    dense op, on the densified ``(B, n)`` activations) only at the first ``k`` of ``ks``."""
    return [m for m in methods if m.depends_on_k or k == ks[0]]


def main(argv=None) -> dict:
    args, device = parse_args(argv)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    started = time.perf_counter()
    env = environment(device)
    methods = methods_for(device.type, args.methods)
    print(f"device: {env['device_name']} ({device.type}); torch {env['torch']}, triton {env['triton']}, "
          f"commit {commit_label(env, 40)}", flush=True)
    checks = check_methods(methods, device)
    passed = {c["method"] for c in checks if c["ok"]}
    print("reference checks passed: " + ", ".join(f"{c['method']} {c['max_rel_err']:.1e}" for c in checks if c["ok"]), flush=True)
    for c in checks:
        if not c["ok"]:
            print(f"NOT TIMED: {describe_failure(c)}", file=sys.stderr, flush=True)
    methods = [m for m in methods if m.name in passed]
    rate, per_op, bandwidth = calibrate(device, torch.float32)
    configs = [] if args.e2e_only else [
        dict(B=args.B, n=n, k=k, d=d, dtype=dt) for dt in args.dtypes for d in args.d for n in args.n for k in args.k]
    e2e_dtypes = [] if args.no_e2e else (["fp32"] if device.type == "cpu" else args.dtypes)
    e2e_configs = [(dt, dict(args.e2e, k=k)) for dt in e2e_dtypes for k in args.e2e["k"]]
    cells = sum(len(args.G) if m.uses_prefixes else 1 for cfg in configs for m in methods_at(methods, cfg["k"], args.k))
    total = cells + len(VARIANTS) * len(args.activations) * len(e2e_configs)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(calibrated_flops_per_s=rate, calibrated_s_per_op=per_op, calibrated_bytes_per_s=bandwidth,
                    prefix_sets=prefix_set.__doc__, validate=False,
                    dense_op=f"timed at k = {args.k[0]} only in each (n, dtype): its time does not depend on k",
                    inputs="x ~ N(0,1); W_dec unit-norm random rows; values ~ U(0.1, 1.1); k distinct uniform latents per row; "
                           "grads on values, W_dec, b_dec (not x)",
                    timing=("CUDA events per call after warm-up, round-robin over cells, input sets rotated"
                            if device.type == "cuda" else
                            "time.perf_counter per call after warm-up, round-robin over cells, input sets rotated"))
    records: list[dict] = []
    doc = {"environment": env, "settings": settings, "reference_checks": checks, "records": records, "not_run": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sweep_{device_slug(device)}{'_quick' if args.quick else ''}{args.tag}"
    units = [("loss", cfg) for cfg in configs] + [("e2e", cfg) for cfg in e2e_configs]
    if args.e2e_first:  # cheaper than the loss grid, and a target of their own
        units = [u for u in units if u[0] == "e2e"] + [u for u in units if u[0] == "loss"]
    with tqdm(total=total, desc="sweep", unit="cell", dynamic_ncols=True) as bar:
        for kind, cfg in units:
            # The budget is checked between configurations: a caller with a hard limit (a 10-minute
            # device call) gets the configurations done so far rather than a killed process.
            if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
                what = cfg if kind == "loss" else dict(cfg[1], dtype=cfg[0], kind="e2e")
                doc["not_run"].append(dict(what, reason=f"--time-budget-s {args.time_budget_s:g} spent"))
                continue
            if kind == "loss":
                records += run_config(cfg, methods_at(methods, cfg["k"], args.k), args.G, device, args, bar)
            else:
                records += run_e2e(cfg[1], args.activations, cfg[0], device, args, bar)
            # Rewritten after every configuration, so that a killed run still leaves its results.
            doc["headline"] = headline(records, device.type)
            doc["wall_s"] = time.perf_counter() - started
            write_results_json(stem, doc)
    doc["headline"] = headline(records, device.type)
    doc["wall_s"] = time.perf_counter() - started
    write_results_json(stem, doc)
    write_csv(records, stem.with_suffix(".csv"))
    md = markdown(doc)
    pngs = plot(doc, stem) if any(r["kind"] == "loss" for r in records) else []
    write_results_text(stem.with_suffix(".md"), md + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    print(md)
    print("wrote " + ", ".join(str(p) for p in [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md"), *pngs]))
    print(f"sweep took {doc['wall_s']:.0f} s")
    return doc


if __name__ == "__main__":
    main()
