"""flex-sae's own kernels timed beside ours in one run: ``python -m benchmarks.flexsae_peer``.

flex-sae (github.com/corl-team/flexsae, Apache-2.0 with a CC-BY-NC-4.0 part) publishes fused Triton
kernels for the TopK SAE loss and for HierarchicalTopK, the loss of every rank-order prefix of the
TopK slots.  Its code is never part of this project: ``make peers`` clones it into the git-ignored
``peers/flexsae``, and this script loads ``<dir>/torch-ext/flex_sae`` with importlib at run time.

The four losses, forward+backward, on the same inputs ``x (B, d)``, TopK slots ``(values, indices)``
of shape ``(B, k)`` (each row sorted by value, largest first, as ``torch.topk`` returns them),
``W_dec (n, d)`` and ``b_dec (d,)``, with ``r_bt = x_b - b_dec - sum_{s <= t} v_bs W_dec[i_bs]``:

* ``flex_topk``   flex's ``triton_topk_sae_loss``:  ``(1 / (B d)) sum_b ||r_bk||^2``;
* ``flex_hier``   flex's ``triton_hierarchical_sae_loss``:
                  ``(1 / (B k d)) sum_b sum_{t=1..k} ||r_bt||^2``, the prefixes taken in slot order;
* ``ours_one``    ``matryoshka_loss`` with the one prefix ``n`` (index order), weight ``1 / d``: the
                  number ``flex_topk`` computes (our per-prefix loss is ``sum_b ||r_b||^2 / B``);
* ``ours_every``  ``matryoshka_loss`` with every rank-order prefix ``1..k`` (``order="rank"``),
                  weights ``1 / (k d)``: the number ``flex_hier`` computes, since our rank order
                  (by value, ties by latent index) is the slot order of these rows.

Folding flex's normalisation into the prefix weights makes the pairs compute the same quantity with
no extra op.  All four run on Triton kernels (ours with ``backend="triton"``, ``validate=False``).

Per configuration (k, dtype), in order:

1. **parity**: on the first input set of the timing shape (flex's kernels specialise on ``B``, ``d``
   and ``k``, so a separate small shape would compile them twice), ``flex_hier`` against
   ``ours_every`` and ``flex_topk`` against ``ours_one``: the largest relative difference
   ``max |flex - ours| / max |ours|`` of the loss and of the ``W_dec``, ``values`` and ``b_dec``
   gradients.  A difference over the dtype's tolerance fails the run at the end; timing still runs.
2. **loss timing**: one forward+backward of each loss per round (paired rounds), input sets rotated.
3. **step timing**: a TopK SAE training step (encoder GEMM, TopK, loss, backward, Adam;
   ``benchmarks.sae_step.TopKSAE``) with each of the four losses, each with its own SAE and Adam.

Ratios measured in the same run: flex hier / flex TopK and ours every / ours one (loss and step),
ours every / flex hier, and ours' every-prefix step / flex's TopK step, beside flex-sae's published
HierarchicalTopK overhead of a TopK step (1.20x, 1.26x, 1.33x at k = 32, 64, 128, F = 65536,
D = 2304; issue 15).  Writes ``flexsae_<device>.json`` and ``.md`` into ``--results``.

Exit status: 0; 1 after a parity failure or a loss or step that raised (each recorded, the rest
measured); 2 without a CUDA device; ``ABSENT_EXIT_STATUS`` (3) when flex-sae is not in
``--flexsae-dir``, which ``benchmarks.gpu_run`` records as skipped.  ``--dry-run``: tiny sizes on
the CPU in the Triton interpreter, to check the script end to end (flex's kernels run there too, at
``d`` a multiple of 256).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.scan_layout import SortedActs

from .checks import rel_err
from .harness import (DTYPES, InputSet, commit_label, describe_error, device_name, device_slug, environment, find, find_ok, git_output,
                      make_input_sets, paired_ratio, ratio, read_timers, start_timer, stop_timer, summarize,
                      write_results_json, write_results)
from .sae_step import TopKSAE, train_step_with

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FLEXSAE_DIR = REPO / "peers" / "flexsae"

# benchmarks.gpu_run records this exit status as "skipped", not "failed".
ABSENT_EXIT_STATUS = 3

LOSSES = ("flex_topk", "flex_hier", "ours_one", "ours_every")
LABELS = {"flex_topk": "flex TopK", "flex_hier": "flex HierarchicalTopK", "ours_one": "ours, one prefix",
          "ours_every": "ours, every rank prefix (G=k)"}
# flex's kernel against the op of ours that computes the same number.
PARITY_PAIRS = (("flex_hier", "ours_every"), ("flex_topk", "ours_one"))
# Both accumulate in float32; bfloat16 gradients are rounded to bfloat16 (8 bits) on both sides.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-3}

# flex-sae's published HierarchicalTopK training step over its TopK step (issue 15), at these sizes.
PUBLISHED_OVERHEAD = {32: 1.20, 64: 1.26, 128: 1.33}
PUBLISHED_SHAPE = dict(n=65536, d=2304)

# (label, numerator, denominator, part, target): "published" = below flex-sae's published overhead.
RATIOS = (
    ("flex hier / flex TopK", "flex_hier", "flex_topk", "loss", None),
    ("flex hier / flex TopK", "flex_hier", "flex_topk", "step", None),
    ("ours every / ours one", "ours_every", "ours_one", "loss", None),
    ("ours every / ours one", "ours_every", "ours_one", "step", "published"),
    ("ours every / flex hier", "ours_every", "flex_hier", "loss", None),
    ("ours every / flex hier", "ours_every", "flex_hier", "step", None),
    ("ours every / flex TopK", "ours_every", "flex_topk", "step", "published"),
)

SIZES = {
    # Issue 15: flex-sae's published F = 65536, D = 2304; B = 4096 as in the sweep.
    "full": dict(B=4096, d=2304, n=65536, ks=[32, 64, 128], dtypes=["fp32", "bf16"], warmup=1,
                 min_rounds=5, max_rounds=50, unit_budget_s=1.0),
    # The interpreter, ~25 s on one core (a call costs ~0.1 s per slot): the least flex's kernels take,
    # d % 256 == 0 (its TopK backward) and B % 16 == 0 (its hierarchical backward).
    "dry": dict(B=16, d=256, n=64, ks=[2, 4], dtypes=["fp32"], warmup=1, min_rounds=2, max_rounds=2,
                unit_budget_s=0.0),
}


# -------------------------------------------------------------------------------------- flex-sae
def flexsae_package(root: Path) -> Path:
    return Path(root) / "torch-ext" / "flex_sae"


def absent_message(root: Path) -> str:
    return (f"flexsae_peer: flex-sae not found ({flexsae_package(root) / '__init__.py'} is missing): "
            "run `make peers` (clones github.com/corl-team/flexsae into the git-ignored peers/flexsae); "
            "a device call must carry it: run(..., carry=[\"peers/flexsae\"])")


def load_flexsae(root: Path) -> ModuleType | None:
    """flex-sae's ``flex_sae`` package from ``<root>/torch-ext/flex_sae`` (no install), or ``None``.

    Registered as ``flex_sae`` in ``sys.modules`` (its ``__init__`` imports its kernels relatively);
    an earlier copy under that name is dropped first, so the package loaded is the one at ``root``.
    """
    package = flexsae_package(root)
    init = package / "__init__.py"
    if not init.is_file():
        return None
    for name in [m for m in sys.modules if m == "flex_sae" or m.startswith("flex_sae.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("flex_sae", init, submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["flex_sae"] = module
    spec.loader.exec_module(module)
    return module


def flexsae_commit(root: Path) -> str | None:
    """The clone's commit: ``git rev-parse HEAD``, else ``.git/HEAD`` read by hand (a device machine
    may lack git), else ``None``."""
    commit = git_output("rev-parse", "HEAD", cwd=root)
    if commit:
        return commit
    git = Path(root) / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def flex_shape_problems(B: int, d: int, k: int) -> dict[str, str]:
    """``{loss name: why flex-sae's kernel cannot take this shape}`` for those that cannot.

    Read from its launch code: every kernel needs ``k`` a power of two; the hierarchical kernels
    tile ``d`` by 64 (forward) and 32 (backward) and the batch by 16 (backward); the TopK backward
    tiles ``d`` by 256.  The grids are ``B // BLOCK_B`` and ``d // BLOCK_D``, so another shape
    leaves rows or columns unwritten (in the interpreter, where ``tl.static_assert`` does not stop
    it, the TopK backward at ``d = 64`` returned uninitialised ``W_dec`` gradients).
    """
    power_of_two = (k >= 1 and k & (k - 1) == 0, f"k={k} a power of two")
    needs = {"flex_hier": [power_of_two, (d % 64 == 0, f"d={d} a multiple of 64"),
                           (B % 16 == 0, f"B={B} a multiple of 16")],
             "flex_topk": [power_of_two, (d % 256 == 0, f"d={d} a multiple of 256")]}
    out = {}
    for name, conditions in needs.items():
        unmet = [what for ok, what in conditions if not ok]
        if unmet:
            out[name] = "flex-sae's kernel needs " + ", ".join(unmet)
    return out


# ---------------------------------------------------------------------------------------- losses
LossFn = Callable[[torch.Tensor, SparseActs, torch.Tensor, torch.Tensor], torch.Tensor]


def loss_functions(flex: ModuleType, n: int, d: int, k: int, backend: str = "triton") -> dict[str, LossFn]:
    """``{name: loss(x, acts, W_dec, b_dec)}`` for the four losses (module docstring); each pair
    computes the same number."""
    one = Prefixes([n], torch.tensor([1.0 / d], dtype=torch.float64))
    every = Prefixes.every(k, weights=torch.full((k,), 1.0 / (k * d), dtype=torch.float64))

    def ours(prefixes: Prefixes, order: str) -> LossFn:
        return lambda x, a, W, b: matryoshka_loss(x, a, W, b, prefixes, backend=backend, validate=False,
                                                  order=order).loss

    return {
        "flex_topk": lambda x, a, W, b: flex.triton_topk_sae_loss(a.indices, W, a.values, b, x),
        "flex_hier": lambda x, a, W, b: flex.triton_hierarchical_sae_loss(a.indices, W, a.values, b, x),
        "ours_one": ours(one, "index"),
        "ours_every": ours(every, "rank"),
    }


def ranked_input_set(s: InputSet) -> InputSet:
    """``s`` with each row's slots sorted by value, largest first, ties by latent index (our rank
    order), so that flex's slot-order prefixes are our rank-order prefixes; new leaves."""
    with torch.no_grad():
        ranked = SortedActs(s.acts, s.W_dec.shape[0]).ranked(s.W_dec.shape[0])  # what order="rank" does
    return InputSet(s.x, SparseActs(ranked.values.contiguous().requires_grad_(), ranked.indices.contiguous()),
                    s.W_dec.detach().requires_grad_(), s.b_dec.detach().requires_grad_())


def parity(losses: dict[str, LossFn], s: InputSet, tolerance: float, pairs=PARITY_PAIRS) -> list[dict]:
    """Each flex kernel against the op of ours that computes the same number, on ``s``: the largest
    relative difference of the loss and of the ``W_dec``, ``values`` and ``b_dec`` gradients."""
    out = []
    for flex_name, ours_name in pairs:
        rec = dict(flex=flex_name, ours=ours_name, tolerance=tolerance)
        try:
            got = {}
            for name in (flex_name, ours_name):
                s.clear_grads()
                loss = losses[name](s.x, s.acts, s.W_dec, s.b_dec)
                loss.backward()
                got[name] = dict(loss=loss.detach(), W_dec=s.W_dec.grad, values=s.acts.values.grad,
                                 b_dec=s.b_dec.grad)
            s.clear_grads()
            diffs = {key: rel_err(got[flex_name][key], got[ours_name][key]) for key in got[ours_name]}
            worst = max(diffs.values())
            # NaN compares false: a NaN difference is a failure, not a pass.
            rec.update(rel_diff=diffs, max_rel_diff=worst, ok=bool(worst <= tolerance),
                       loss_flex=float(got[flex_name]["loss"]), loss_ours=float(got[ours_name]["loss"]))
        except Exception as exc:  # a kernel that cannot run here: recorded, the run goes on
            s.clear_grads()
            rec.update(ok=False, error=describe_error(exc))
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------- timing
def round_robin(calls: dict[str, Callable[[], None]], device: torch.device, warmup: int, min_rounds: int,
                max_rounds: int, budget_s: float) -> tuple[dict[str, list[float]], dict[str, str]]:
    """``(times, errors)``: seconds of every call per round, one call of each per round (paired:
    a load change hits all alike), after ``warmup`` untimed calls each.  The number of rounds is
    ``budget_s`` over the first round's time, within ``[min_rounds, max_rounds]``.  A call that
    raises is recorded in ``errors`` and left out of later rounds."""
    errors: dict[str, str] = {}
    for name, call in calls.items():
        try:
            for _ in range(warmup):
                call()
        except Exception as exc:
            errors[name] = describe_error(exc)
    times = {name: [] for name in calls if name not in errors}
    rounds = min_rounds
    for round_index in itertools.count():
        if round_index >= rounds or not times:
            break
        pending = {}
        for name in list(times):
            try:
                start = start_timer(device)
                calls[name]()
                pending[name] = stop_timer(device, start)
            except Exception as exc:
                errors[name] = describe_error(exc)
                del times[name]
        for name, seconds in zip(pending, read_timers(device, list(pending.values()))):
            times[name].append(seconds)
        if round_index == 0:
            per_round = sum(t[0] for t in times.values() if t) or 1.0
            rounds = max(min_rounds, min(max_rounds, int(budget_s / per_round)))
    # Calls dropped in a later round keep no partial, unpaired times.
    return {name: t for name, t in times.items() if name not in errors}, errors


def _records(part: str, cfg: dict, names: list[str], times: dict, errors: dict, skipped: dict) -> list[dict]:
    out = []
    for name in names:
        rec = dict(cfg, part=part, loss=name, label=LABELS[name], status="ok", reason=None)
        if name in skipped:
            rec.update(status="skipped", reason=skipped[name])
        elif name in errors:
            rec.update(status="error", reason=errors[name])
        else:
            rec.update(summarize(times[name]), times_s=times[name])
        out.append(rec)
    return out


def run_loss_unit(flex, cfg: dict, device: torch.device, opts) -> tuple[list[dict], list[dict]]:
    """``(parity records, timing records)`` of the four losses at ``cfg`` (B, n, d, k, dtype)."""
    B, n, d, k, dtype = cfg["B"], cfg["n"], cfg["d"], cfg["k"], cfg["dtype"]
    sets = [ranked_input_set(s) for s in make_input_sets(B, n, d, k, DTYPES[dtype], device, seed=opts.seed)]
    losses = loss_functions(flex, n, d, k)
    skipped = flex_shape_problems(B, d, k)
    pairs = [pair for pair in PARITY_PAIRS if pair[0] not in skipped]
    checks = [dict(cfg, **rec) for rec in parity(losses, sets[0], TOLERANCE[dtype], pairs)]
    counter = itertools.count()

    def call(name: str) -> Callable[[], None]:
        def run() -> None:
            s = sets[next(counter) % len(sets)]  # every call takes the next set: none finds its inputs cached
            s.clear_grads()
            losses[name](s.x, s.acts, s.W_dec, s.b_dec).backward()

        return run

    calls = {name: call(name) for name in LOSSES if name not in skipped}
    times, errors = round_robin(calls, device, opts.warmup, opts.min_rounds, opts.max_rounds, opts.unit_budget_s)
    records = _records("loss", dict(cfg, input_sets=len(sets)), list(LOSSES), times, errors, skipped)
    sets.clear()  # the input sets freed before the next unit (the closures hold this list)
    return checks, records


def run_step_unit(flex, cfg: dict, device: torch.device, opts) -> list[dict]:
    """Timing records of the TopK SAE training step with each of the four losses at ``cfg``; every
    step owns its SAE (the same initial weights) and its Adam state."""
    B, n, d, k, dtype = cfg["B"], cfg["n"], cfg["d"], cfg["k"], DTYPES[cfg["dtype"]]
    g = torch.Generator(device=device).manual_seed(opts.seed)
    batches = [torch.randn(B, d, device=device, generator=g).to(dtype) for _ in range(4)]
    skipped = flex_shape_problems(B, d, k)
    losses = loss_functions(flex, n, d, k)
    calls, errors = {}, {}
    for name in LOSSES:
        if name in skipped:
            continue
        try:
            torch.manual_seed(opts.seed)
            sae = TopKSAE(d, n, k, "topk", device=device, dtype=dtype)
            loss = losses[name]
            step, _ = train_step_with(sae, lambda x, a, sae=sae, loss=loss: loss(x, a, sae.W_dec, sae.b_dec))
        except Exception as exc:  # out of memory for one more SAE: recorded
            errors[name] = describe_error(exc)
            continue
        counter = itertools.count()
        calls[name] = lambda step=step, counter=counter: step(batches[next(counter) % len(batches)])
    times, call_errors = round_robin(calls, device, opts.warmup, opts.min_rounds, opts.max_rounds, opts.unit_budget_s)
    return _records("step", cfg, list(LOSSES), times, {**errors, **call_errors}, skipped)


# ---------------------------------------------------------------------------------------- ratios
def ratios(records: list[dict], device_type: str) -> list[dict]:
    """Every ratio of ``RATIOS`` per configuration: ratio of medians (what ``met`` reads), the
    median of per-round ratios, flex-sae's published figure where the shape is its, and ``met``
    against the published figure where that is the target (on a GPU only)."""
    out = []
    configs = sorted({(r["k"], r["dtype"], r["B"], r["n"], r["d"]) for r in records},
                     key=lambda c: (list(DTYPES).index(c[1]), c[0], c[2:]))
    for k, dtype, B, n, d in configs:
        at = dict(k=k, dtype=dtype, B=B, n=n, d=d)
        published = PUBLISHED_OVERHEAD.get(k) if dict(n=n, d=d) == PUBLISHED_SHAPE else None
        for label, num_name, den_name, part, target in RATIOS:
            num, den = find_ok(records, part=part, loss=num_name, **at), find_ok(records, part=part, loss=den_name, **at)
            median, paired = ratio(num, den), paired_ratio(num, den)
            bar = published if target == "published" else None
            met = None if median is None or bar is None or device_type != "cuda" else bool(median < bar)
            out.append(dict(at, ratio=label, part=part, numerator=num_name, denominator=den_name,
                            ratio_of_medians=median, paired_ratio=paired, published=published,
                            target=(f"< {bar:.2f}" if bar is not None else None), met=met))
    return out


# ---------------------------------------------------------------------------------------- output
def _fmt_ms(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    return f"{r['median_s'] * 1e3:.3g} [{r['q1_s'] * 1e3:.3g}-{r['q3_s'] * 1e3:.3g}]"


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def parity_verdict(checks: list[dict]) -> str:
    if not checks:
        return "Parity: nothing checked."
    bad = [c for c in checks if not c["ok"]]
    worst = max((c["max_rel_diff"] for c in checks if "max_rel_diff" in c), default=None)
    if not bad:
        return (f"Parity: all {len(checks)} checks within tolerance "
                f"(largest relative difference {_fmt(worst, '.2e')}).")
    lines = [f"Parity FAILED: {len(bad)} of {len(checks)} checks:"]
    for c in bad:
        what = c.get("error") or (f"max relative difference {_fmt(c['max_rel_diff'], '.2e')} > {c['tolerance']:g} "
                                  f"({', '.join(f'{key} {v:.2e}' for key, v in c['rel_diff'].items())})")
        lines.append(f"- k={c['k']} {c['dtype']}: {c['flex']} vs {c['ours']}: {what}")
    return "\n".join(lines)


SUMMARY_MARKER = "**flex-sae side by side: parity and ratios"


def markdown(doc: dict) -> str:
    env, records, checks = doc["environment"], doc["records"], doc["parity"]
    s, flex = doc["settings"], doc["flexsae"]
    lines = [f"### flex-sae side by side: {env['device_name']} ({env['device_type']})", "",
             f"torch {env['torch']}, triton {env['triton']}, commit `{commit_label(env)}`, "
             f"flex-sae `{(flex['commit'] or '?')[:12]}` "
             f"({flex['dir']}), {env['timestamp_utc']}.  B={s['B']}, d={s['d']}, n={s['n']}; {s['timing']}.", "",
             "**Median ms [quartiles]: forward+backward of the loss, and the TopK SAE training step with it**", "",
             "| k | dtype | part | " + " | ".join(LABELS[name] for name in LOSSES) + " |",
             "|---" * (len(LOSSES) + 3) + "|"]
    for k, dtype, part in sorted({(r["k"], r["dtype"], r["part"]) for r in records},
                                 key=lambda c: (list(DTYPES).index(c[1]), c[0], c[2])):
        cells = [_fmt_ms(find(records, k=k, dtype=dtype, part=part, loss=name)) for name in LOSSES]
        lines.append(f"| {k} | {dtype} | {part} | " + " | ".join(cells) + " |")
    lines += ["", "**Parity** (flex-sae's kernel against our op on the same inputs; relative difference "
              "max |flex - ours| / max |ours|)", "",
              "| k | dtype | flex | ours | loss | W_dec grad | values grad | b_dec grad | tolerance | ok |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        diffs = c.get("rel_diff") or {}
        cells = [_fmt(diffs.get(key), ".2e") for key in ("loss", "W_dec", "values", "b_dec")]
        ok = "yes" if c["ok"] else ("NO: " + c["error"] if c.get("error") else "NO")
        lines.append(f"| {c['k']} | {c['dtype']} | {c['flex']} | {c['ours']} | " + " | ".join(cells)
                     + f" | {c['tolerance']:g} | {ok} |")
    lines += ["", f"{SUMMARY_MARKER}** ({env['device_name']}, B={s['B']}, d={s['d']}, n={s['n']})", "",
              parity_verdict(checks), "",
              "Ratios of medians, measured in this run [median of per-round ratios]; flex-sae's published "
              "HierarchicalTopK step / TopK step beside them (at n = 65536, d = 2304 only).", "",
              "| k | dtype | ratio | part | measured | published flex-sae | target | met |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["ratios"]:
        measured = "n/a" if r["ratio_of_medians"] is None else f"{r['ratio_of_medians']:.3f}"
        if r["paired_ratio"] is not None:
            measured += f" [{r['paired_ratio']:.3f}]"
        met = {True: "yes", False: "NO", None: "n/a" if r["target"] else ""}[r["met"]]
        lines.append(f"| {r['k']} | {r['dtype']} | {r['ratio']} | {r['part']} | {measured} | "
                     f"{_fmt(r['published'], '.2f')} | {r['target'] or ''} | {met} |")
    lines.append("")
    lines += [f"Not timed: k={r['k']} {r['dtype']} {r['part']} {r['loss']}: {r['status']}: {r['reason']}"
              for r in records if r["status"] != "ok"]
    if doc.get("flex_ran") is not None:
        lines.append(doc["flex_ran"])
    for unit in doc["not_run"]:
        lines.append("Not run: " + ", ".join(f"{key}={value}" for key, value in unit.items()))
    return "\n".join(lines) + "\n"


def flex_ran_note(records: list[dict], checks: list[dict], interpreted: bool) -> str:
    """One line on whether flex-sae's kernels ran (in the interpreter, on the CPU)."""
    flex = [r for r in records if r["loss"].startswith("flex")]
    ran = sorted({r["loss"] for r in flex if r["status"] == "ok"})
    failed = sorted({f"{r['loss']} ({r['reason']})" for r in flex if r["status"] != "ok"})
    where = "in the Triton interpreter (TRITON_INTERPRET=1)" if interpreted else "compiled"
    parts = [f"flex-sae's kernels {where}: ran {', '.join(ran) or 'none'}"]
    if failed:
        parts.append(f"did not run: {'; '.join(failed)}")
    if checks and all(c["ok"] for c in checks):
        parts.append("and agreed with our op")
    return "; ".join(parts) + "."


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flexsae_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flexsae-dir", type=Path, default=DEFAULT_FLEXSAE_DIR, help="flex-sae's clone (make peers)")
    p.add_argument("--device", help="default: cuda (cpu with --dry-run)")
    p.add_argument("--B", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--ks", type=int, nargs="+")
    p.add_argument("--dtypes", nargs="+", choices=sorted(TOLERANCE))
    p.add_argument("--warmup", type=int, help="untimed calls of each loss or step before the rounds")
    p.add_argument("--min-rounds", type=int)
    p.add_argument("--max-rounds", type=int)
    p.add_argument("--unit-budget-s", type=float,
                   help="timed seconds per (configuration, part), within the rounds' bounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tag", help="appended to the output file names (default: _dry with --dry-run)")
    p.add_argument("--time-budget-s", type=float, help="start no configuration after this many seconds")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU in the Triton interpreter: checks this script end to end")
    args = p.parse_args(argv)
    for key, value in SIZES["dry" if args.dry_run else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.tag is None:
        args.tag = "_dry" if args.dry_run else ""
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.flexsae_dir.resolve()
    if not (flexsae_package(root) / "__init__.py").is_file():
        print(absent_message(root), flush=True)
        return ABSENT_EXIT_STATUS
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"flexsae_peer: --device {args.device}: no CUDA device (torch {torch.__version__})", file=sys.stderr)
        return 2
    if device.type == "cpu":
        # Triton kernels on the CPU run only in the interpreter, which is read when a kernel is
        # defined: set before flex-sae and our kernels are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)  # a shared machine: see benchmarks.sweep --threads
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    flex = load_flexsae(root)
    started = time.perf_counter()
    env = environment(device)
    settings = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()}
    settings.update(
        interpreted=interpreted,
        losses={name: LABELS[name] for name in LOSSES},
        inputs="x ~ N(0,1); W_dec unit-norm random rows; values ~ U(0.1, 1.1) sorted per row, largest first, ties by "
               "latent index; k distinct uniform latents per row; grads on values, W_dec, b_dec (not x)",
        step="benchmarks.sae_step.TopKSAE (topk), Adam lr 1e-4, 4 rotating batches x ~ N(0,1); one SAE per loss",
        timing=("CUDA events" if device.type == "cuda" else "time.perf_counter")
        + f" per call, {args.warmup} warm-up call(s) each, paired rounds (one call of each per round), "
          "input sets rotated")
    doc = dict(environment=env, flexsae=dict(dir=str(root), commit=flexsae_commit(root),
                                              module=getattr(flex, "__file__", None)),
               settings=settings, published=dict(overhead=PUBLISHED_OVERHEAD, **PUBLISHED_SHAPE),
               parity=[], records=[], ratios=[], not_run=[], flex_ran=None)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"flexsae_{device_slug(device)}{args.tag}"
    print(f"flexsae_peer: {device_name(device)}; torch {env['torch']}, triton {env['triton']}; flex-sae "
          f"{(doc['flexsae']['commit'] or '?')[:12]} from {root}; B={args.B} d={args.d} n={args.n} k={args.ks} "
          f"{args.dtypes}{'; Triton interpreter' if interpreted else ''}", flush=True)

    units = [(part, dict(B=args.B, n=args.n, d=args.d, k=k, dtype=dtype))
             for dtype in args.dtypes for k in args.ks for part in ("loss", "step")]
    for part, cfg in units:
        # Checked between units: a caller with a hard limit gets what was measured so far.
        if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
            doc["not_run"].append(dict(cfg, part=part, reason=f"--time-budget-s {args.time_budget_s:g} spent"))
            continue
        unit_start = time.perf_counter()
        try:
            if part == "loss":
                checks, records = run_loss_unit(flex, cfg, device, args)
                doc["parity"] += checks
            else:
                records = run_step_unit(flex, cfg, device, args)
        except Exception as exc:  # the inputs themselves did not fit: every cell of the unit is recorded
            records = [dict(cfg, part=part, loss=name, label=LABELS[name], status="error", reason=describe_error(exc))
                       for name in LOSSES]
        doc["records"] += records
        if device.type == "cuda":
            torch.cuda.empty_cache()
        medians = ", ".join(f"{r['loss']} " + (f"{r['median_s'] * 1e3:.3g} ms" if r["status"] == "ok" else r["status"])
                            for r in records)
        print(f"k={cfg['k']} {cfg['dtype']} {part}: {medians} ({time.perf_counter() - unit_start:.1f} s)", flush=True)
        doc["ratios"] = ratios(doc["records"], device.type)
        doc["wall_s"] = time.perf_counter() - started
        write_results_json(stem, doc)  # a killed run keeps its units
    doc["ratios"] = ratios(doc["records"], device.type)
    doc["flex_ran"] = flex_ran_note(doc["records"], doc["parity"], interpreted)
    doc["wall_s"] = time.perf_counter() - started
    write_results(stem, doc, markdown(doc))
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}; {doc['wall_s']:.0f} s")
    failed_checks = [c for c in doc["parity"] if not c["ok"]]
    errors = [r for r in doc["records"] if r["status"] == "error"]
    if failed_checks or errors:
        print(f"flexsae_peer: FAILED: {len(failed_checks)} parity check(s), {len(errors)} cell error(s) (see above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
