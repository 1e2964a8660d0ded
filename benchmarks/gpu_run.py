"""One command for a CUDA machine: ``python -m benchmarks.gpu_run [--quick] [--results DIR] [--pack DIR]``
(``make gpu`` / ``make gpu-quick``).  For a machine that already has torch and triton and no network:
it installs nothing and runs from the repository root with the interpreter that runs it.

Stages, each a subprocess with its own time limit and log file; a stage that fails or runs out of
time is recorded and the next one still runs (only a failed ``env`` stops the run: no GPU, nothing
to measure):

* ``env``       device, driver, torch/triton/CUDA versions, git commit (``<prefix>env.json``), nvidia-smi;
* ``tests``     the whole suite on compiled kernels (no ``TRITON_INTERPRET``), ``gpu``-marked tests
                included; JUnit XML; pytest-xdist workers when the machine has it;
* ``sanitize``  ``compute-sanitizer --tool memcheck`` on ``benchmarks.sanitize`` (both kernels, small
                forward+backward, checked against the reference; two tuning launches of the sparse
                one, pipelined and sorted ``dW_dec``, against its default launch);
* ``peers``     ``benchmarks.flexsae_peer``: flex-sae's own TopK and HierarchicalTopK kernels beside our
                op at one prefix and at every rank-order prefix, loss and TopK training step, B = 4096,
                d = 2304, n = 65536, k in {32, 64, 128}, fp32 and bf16, parity first; it needs flex-sae
                in the git-ignored ``peers/flexsae`` (``make peers``; a device call carries it), and
                without it the stage is recorded as skipped;
* ``tune``      ``benchmarks.tune``: the sparse kernels' launch candidates (chunk width x warps, rows per program, slot-loop
                pipelining, ``acq_rel`` atomics) at B = 4096, d = 2304, n = 65536, k in {32, 128}, bf16
                then fp32, each checked against the default launch; not in the quick run;
* ``sweep``     ``benchmarks.sweep`` at issue 15's sizes (B = 4096, d = 2304, n in {65536, 36864},
                k in {32, 64, 128}, G in {1, 5, 16, 64, n}, bf16 and fp32, in that order, the TopK
                training step at n = 65536 first), with whatever time the earlier and later stages
                leave; it starts no configuration past its budget and keeps what it measured;
* ``tune-dense`` ``benchmarks.tune_dense``: the dense kernels' tile shapes and warps, and float32's
                ``tf32`` products against ``tf32x3``, at B = 4096, d = 2304, n = 4096, every prefix,
                bf16 then fp32, beside one dense decode and the dense PyTorch scan; after the sweep,
                which matters more, with its limit held back from the sweep's; not in the quick run.
* ``bench``     the pytest-benchmark suite; not in the default plan (time), ask with ``--stages``.

Every file goes into ``--results`` (names start with ``gpu_``, ``gpu_quick_`` or ``gpu_dry_``),
with ``<prefix>summary.json``/``.md`` (each stage's status, time, budget and estimate; test counts;
the sanitizer's verdict; flex-sae's parity and ratios; the best launch per dtype; the sweep's
headline ratios) and
``<prefix>run.log``.  ``--pack DIR`` also keeps four files in DIR up to date after every stage
(summary JSON and Markdown, the log, and a tarball of every file this run wrote), because the device
tool returns at most 8 files.

``--quick``: a smoke run (the ``gpu``-marked tests, the sanitizer on the smallest case, flex-sae at
k = 32, one sweep point per kernel).  ``--dry-run``: the same stages on the CPU at tiny sizes with
``TRITON_INTERPRET=1``, to check this script end to end without a GPU.  ``--list`` prints the plan
(and whether flex-sae is there) and exits.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# Total seconds per mode.  The full run fits a 10-minute device call with room for the machine's
# start and the transfers, and leaves a 15-minute session enough to start a second, quick call.
BUDGET_S = {"full": 500.0, "quick": 150.0, "dry": 360.0}

# The methods: the fused op (sparse and dense kernels), the floors and the two loops.
SWEEP_METHODS = ["fused_triton", "fused_dense_triton", "sparse_floor", "vanilla_floor", "running_sum", "stacked_cumsum"]
# Few warm-ups and repeats: CUDA-event timings vary little, and the device minutes are scarce.
# Cells slower than --cell-budget-s (the fp32 dense GEMMs, ~0.1 s) get two timed repeats.
SWEEP_TIMING = ["--warmup", "1", "--cell-budget-s", "0.05", "--min-repeats", "10", "--max-repeats", "100"]
# The sweep starts no configuration after its --time-budget-s, so its budget is the stage's limit
# less one configuration (~20 s at the full sizes) and the writing of its outputs and plots.
SWEEP_MARGIN_S = {"full": 45.0, "quick": 15.0, "dry": 20.0}
# The peers stage likewise starts no (k, dtype, part) unit after its budget: its margin is the
# longest unit (an fp32 loss or step unit, ~5 s with its compiles; ~8 s in the interpreter),
# torch's import and the writing of its outputs.
PEERS_MARGIN_S = {"full": 12.0, "quick": 12.0, "dry": 11.0}
# The tune stage starts no phase or timing round after its budget: its margin is one phase's
# compiles and output checks (~8 candidates x ~0.5 s on the GPU; ~10 s in the interpreter) and the
# writing of its outputs.
TUNE_MARGIN_S = {"full": 10.0, "dry": 15.0}
# The same for the dense tuner: one phase's compiles (~1-2 s per dense kernel) and the writing.
TUNE_DENSE_MARGIN_S = {"full": 8.0, "dry": 15.0}
# A stage's exit status for "nothing to do here" (flex-sae absent): recorded as skipped, not failed.
SKIPPED_RC = 3
# Where benchmarks.flexsae_peer finds flex-sae, and where its summary section starts in its Markdown
# (its SUMMARY_MARKER; this module imports no torch, so the string is repeated, and a test compares).
FLEXSAE_INIT = REPO / "peers" / "flexsae" / "torch-ext" / "flex_sae" / "__init__.py"
PEERS_MARKER = "**flex-sae side by side: parity and ratios"

# The environment record (harness.environment: GPU_RUN_COMMIT names the commit in a tree without .git).
ENV_CODE = """
import json, shutil, sys, torch
from benchmarks.harness import device_slug, environment
device = torch.device(sys.argv[1])
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: torch " + torch.__version__ + " sees none")
env = environment(device)
env.update(device_slug=device_slug(device), python_executable=sys.executable,
           compute_sanitizer=sys.argv[3] or None, nvidia_smi=shutil.which("nvidia-smi"))
open(sys.argv[2], "w").write(json.dumps(env, indent=1))
print(json.dumps(env, indent=1))
"""


@dataclass
class Stage:
    """One step of the run: commands run in order under one time limit, with one log."""

    name: str
    commands: list[list[str]]
    budget_s: float | None  # None: whatever the run's budget leaves after the later stages' limits
    estimate_s: float  # what the stage is expected to take (stated up front, compared afterwards)
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    required: bool = False  # a failure skips every later stage
    budget_flag: str | None = None  # passes the stage's remaining seconds, less margin_s, to the last command
    margin_s: float = 0.0
    note: str = ""
    skipped_note: str | None = None  # with it, exit status SKIPPED_RC records the stage as skipped with this note


# -------------------------------------------------------------------------------------------- plan
def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else where CUDA toolkits put it."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for pattern in ("/usr/local/cuda*/bin/compute-sanitizer", "/usr/local/cuda*/compute-sanitizer/compute-sanitizer",
                    "/opt/nvidia/*/compute-sanitizer/compute-sanitizer"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def plan(mode: str, results: Path, prefix: str, workers: int) -> list[Stage]:
    """The stages of ``mode`` ("full", "quick" or "dry"); files are written under ``results``."""
    gpu = mode != "dry"
    device = "cuda" if gpu else "cpu"
    # The interpreter would turn the compiled kernels into Python: off on the GPU, on for the dry run.
    interp = {"TRITON_INTERPRET": None if gpu else "1", "PYTHONUNBUFFERED": "1"}
    sanitizer = find_sanitizer() if gpu else None
    stages = [Stage("env", [[PY, "-c", ENV_CODE, device, str(results / f"{prefix}env.json"), sanitizer or ""]],
                    30.0, 8.0, interp, required=True)]  # a fresh machine's first torch import is slow
    if gpu and shutil.which("nvidia-smi"):
        stages[0].commands.append(["nvidia-smi"])

    xdist = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
    # A hung test (a kernel that never ends) fails alone instead of taking the stage's whole budget.
    per_test = ["--timeout", "300"] if importlib.util.find_spec("pytest_timeout") else []
    selection = {"full": [], "quick": ["-m", "gpu"], "dry": ["tests/test_gpu.py", "tests/test_prefixes.py"]}[mode]
    # -v: a log cut short at the time limit still names every test that passed or failed.
    pytest = [PY, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "--durations=25",
              f"--junitxml={results / f'{prefix}tests_junit.xml'}", *xdist, *per_test, *selection]
    stages.append(Stage("tests", [pytest], {"full": 150.0, "quick": 45.0, "dry": 60.0}[mode],
                        {"full": 110.0, "quick": 35.0, "dry": 10.0}[mode], interp))

    sanitize = [PY, "-m", "benchmarks.sanitize", "--device", device] + ([] if mode == "full" else ["--quick"])
    if sanitizer:
        sanitize = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *sanitize]
        note = ""
    else:
        note = "compute-sanitizer not found: the cases ran without it" if gpu else "dry run: no compute-sanitizer"
    # Without the caching allocator every tensor is its own allocation, whose bounds memcheck knows.
    stages.append(Stage("sanitize", [sanitize], {"full": 90.0, "quick": 30.0, "dry": 90.0}[mode],
                        {"full": 70.0, "quick": 25.0, "dry": 35.0}[mode],
                        dict(interp, PYTORCH_NO_CUDA_MEMORY_CACHING="1"), note=note))

    # flex-sae beside our op (benchmarks/README.md, "flex-sae side by side").  Cost at the full sizes,
    # per (k, dtype): flex's six kernels compile anew (they specialise on B, d and k; 0.1-0.6 s each
    # for sm_90, built ahead of time on the CPU), ~1 s of paired loss rounds and ~1-2 s of training
    # steps (fp32 ~80 ms a step: the encoder GEMMs), ~5 s; six configurations and the start ~40 s.
    # What does not fit the budget is listed as not run, bf16 k = 128 first.
    peers = [PY, "-m", "benchmarks.flexsae_peer", "--device", device, "--results", str(results)]
    peers += {"full": [], "quick": ["--ks", "32"], "dry": ["--dry-run"]}[mode]
    stages.append(Stage("peers", [peers], {"full": 60.0, "quick": 25.0, "dry": 45.0}[mode],
                        {"full": 40.0, "quick": 15.0, "dry": 25.0}[mode], interp,
                        budget_flag="--time-budget-s", margin_s=PEERS_MARGIN_S[mode],
                        note="" if FLEXSAE_INIT.exists() else "flex-sae absent now: run `make peers` first",
                        skipped_note="flex-sae not in peers/flexsae: `make peers`; a device call carries peers/flexsae"))

    # The sparse kernels' launch candidates (benchmarks/tune.py): per dtype ~20 candidates, each two
    # compiles (~0.5 s) and 20 paired rounds at k = 32 and 128 (~2 ms a call), ~20 s; bf16 then fp32.
    # Not in the quick smoke run.  Its findings change default_launch, which a later run then times.
    if mode != "quick":
        tune = [PY, "-m", "benchmarks.tune", "--device", device, "--results", str(results)]
        tune += ["--dry-run"] if mode == "dry" else []
        stages.append(Stage("tune", [tune], {"full": 50.0, "dry": 45.0}[mode], {"full": 40.0, "dry": 30.0}[mode],
                            interp, budget_flag="--time-budget-s", margin_s=TUNE_MARGIN_S[mode]))

    sweep = [PY, "-m", "benchmarks.sweep", "--device", device, "--out", str(results)]
    if mode == "full":
        # The training steps first: ~20 s next to the loss grid, and what a budget cut must not drop.
        sweep += ["--G", "1", "5", "16", "64", "n", "--methods", *SWEEP_METHODS, "--activations", "topk", "--e2e-first",
                  *SWEEP_TIMING]
    elif mode == "quick":
        # With both dense backends: the headline's routing record (what "auto" runs for dense CUDA acts).
        sweep += ["--n", "36864", "--k", "32", "--dtypes", "fp32", "--G", "1", "n", "--methods", "fused_triton",
                  "fused_dense_triton", "fused_dense_torch", "sparse_floor", "vanilla_floor", "--no-e2e",
                  "--tag", "_gpu_quick", *SWEEP_TIMING]
    else:
        sweep += ["--quick", "--activations", "topk", "--tag", "_dry"]
    stages.append(Stage("sweep", [sweep], None, {"full": 160.0, "quick": 30.0, "dry": 25.0}[mode], interp,
                        budget_flag="--time-budget-s", margin_s=SWEEP_MARGIN_S[mode]))

    # The dense kernels' launch candidates (benchmarks/tune_dense.py) at every prefix only (the
    # Gram form's dearest case, and where the kernel might beat the PyTorch scan), n = 4096: 6 bf16
    # and up to 9 float32 candidates, each two compiles (~1-2 s) and 5 calls of ~20-80 ms; ~25 s.
    if mode != "quick":
        tune_dense = [PY, "-m", "benchmarks.tune_dense", "--device", device, "--results", str(results)]
        tune_dense += ["--dry-run"] if mode == "dry" else ["--n", "4096", "--G", "n", "--rounds", "3"]
        stages.append(Stage("tune-dense", [tune_dense], {"full": 40.0, "dry": 45.0}[mode],
                            {"full": 25.0, "dry": 25.0}[mode], interp, budget_flag="--time-budget-s",
                            margin_s=TUNE_DENSE_MARGIN_S[mode]))

    bench_json = results / f"{prefix}pytest-benchmark.json"
    stages.append(Stage("bench", [[PY, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                                   f"--benchmark-json={bench_json}"]], None, 240.0, interp))
    return stages


DEFAULT_STAGES = ["env", "tests", "sanitize", "peers", "tune", "sweep", "tune-dense"]


# --------------------------------------------------------------------------------------------- run
def _default_sigint() -> None:
    """In the child, before exec: take SIGINT by default.  A shell's background job starts with
    SIGINT ignored, and Python keeps an ignored SIGINT ignored, so `_kill`'s first signal would
    otherwise be lost and every timed-out stage would wait out the SIGINT grace period."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill(proc: subprocess.Popen) -> None:
    """Stop the command and everything it started (its own process group).  SIGINT first: pytest
    then still writes its JUnit XML and failure report, and the sweep has saved every finished
    configuration; SIGTERM and SIGKILL for a process stuck where Python cannot take the signal."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, log_path: Path, limit_s: float) -> dict:
    """Run ``stage``'s commands in order until one fails or ``limit_s`` is spent; the record."""
    env = dict(os.environ)
    for key, value in stage.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    rec = dict(name=stage.name, status="ok", rc=0, budget_s=round(limit_s, 1), estimate_s=stage.estimate_s,
               log=log_path.name, note=stage.note, commands=[])
    start = time.monotonic()
    with log_path.open("w") as log:
        for i, command in enumerate(stage.commands):
            left = limit_s - (time.monotonic() - start)
            if stage.budget_flag and i == len(stage.commands) - 1:
                command = command + [stage.budget_flag, f"{max(1.0, left - stage.margin_s):.0f}"]
            rec["commands"].append(shlex.join(command))
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_default_sigint)
            except OSError as exc:
                rec.update(status="failed", rc=None, note=f"{rec['note']}; {exc}".strip("; "))
                break
            try:
                rc = proc.wait(timeout=max(0.1, left))
            except subprocess.TimeoutExpired:
                _kill(proc)
                rec.update(status="timeout", rc=None)
                log.write(f"\n[gpu_run] stopped after {limit_s:.0f} s (the stage's limit)\n")
                break
            if rc == SKIPPED_RC and stage.skipped_note:
                rec.update(status="skipped", rc=rc, note=stage.skipped_note)
                break
            if rc != 0:
                rec.update(status="failed", rc=rc)
                break
    rec["wall_s"] = round(time.monotonic() - start, 1)
    return rec


# ------------------------------------------------------------------------------------------ report
def tests_counts(xml_path: Path) -> dict | None:
    """Totals and the failing tests' ids from pytest's JUnit XML."""
    if not xml_path.exists():
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def sanitizer_verdict(log_path: Path) -> list[str]:
    """The sanitizer's summary line and the script's own (cases that agree with the reference)."""
    if not log_path.exists():
        return []
    return [line.strip() for line in log_path.read_text(errors="replace").splitlines()
            if "ERROR SUMMARY" in line or line.startswith(("sanitize:", "FAIL"))]


def newest_md(results: Path, since: float, pattern: str = "sweep_*.md") -> str | None:
    """The name of the newest sweep (or ``pattern``) Markdown written since ``since`` (epoch seconds)."""
    mds = [p for p in results.glob(pattern) if p.stat().st_mtime >= since]
    return max(mds, key=lambda p: p.stat().st_mtime).name if mds else None


def headline_section(md: Path, marker: str = "**Headline ratios") -> str:
    """A sweep Markdown's headline ratios (or another results Markdown's section from ``marker`` on), or nothing."""
    text = md.read_text() if md.exists() else ""
    at = text.find(marker)
    return text[at:] if at >= 0 else ""


def tune_verdict(md: Path) -> list[str]:
    """A tuning Markdown's dtype headings and its "Best: ..." lines."""
    text = md.read_text() if md.exists() else ""
    return [line for line in text.splitlines() if line.startswith(("## ", "Best: "))]


def _environment(results: Path, prefix: str, log: Path, since: float) -> dict | None:
    path = results / f"{prefix}env.json"
    return json.loads(path.read_text()) if path.exists() else None


# What the summary keeps of each stage: its key in the run's record, and how it is read from the
# stage's files (results folder, file prefix, the stage's log, and the stage's start in epoch seconds).
STAGE_FINDINGS = {
    "env": ("environment", _environment),
    "tests": ("tests", lambda results, prefix, log, since: tests_counts(results / f"{prefix}tests_junit.xml")),
    "sanitize": ("sanitizer", lambda results, prefix, log, since: sanitizer_verdict(log)),
    "peers": ("peers_md", lambda results, prefix, log, since: newest_md(results, since, "flexsae_*.md")),
    "tune": ("tune_md", lambda results, prefix, log, since: newest_md(results, since, "tune_*.md")),
    "sweep": ("sweep_md", lambda results, prefix, log, since: newest_md(results, since)),
    "tune-dense": ("tune_dense_md", lambda results, prefix, log, since: newest_md(results, since, "tune_dense_*.md")),
}


def summarize(doc: dict, results: Path) -> str:
    env = doc.get("environment") or {}
    lines = [f"## GPU run ({doc['mode']}): {env.get('device_name', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, python {env.get('python')}, "
             f"commit `{(env.get('git_commit') or '?')[:12]}`{' (dirty)' if env.get('git_dirty') else ''}, "
             f"{doc['started_utc']}; {doc['wall_s']:.0f} s of a {doc['budget_s']:.0f} s budget.", "",
             "| stage | status | wall s | limit s | estimate s | log | note |", "|---|---|---|---|---|---|---|"]
    for s in doc["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('wall_s', '')} | {s.get('budget_s', '')} | "
                     f"{s.get('estimate_s', '')} | {s.get('log', '')} | {s.get('note', '')} |")
    t = doc.get("tests")
    if t:
        lines += ["", f"Tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped."]
        lines += [f"- FAILED {name}" for name in t["failed"][:40]]
    if doc.get("sanitizer"):
        lines += ["", "Sanitizer: " + "; ".join(doc["sanitizer"][:20])]
    if doc.get("peers_md"):
        lines += ["", f"flex-sae side by side: `{doc['peers_md']}`", "",
                  headline_section(results / doc["peers_md"], PEERS_MARKER).rstrip()]
    if doc.get("tune_md"):
        lines += ["", f"Sparse launch tuning: `{doc['tune_md']}`", ""] + tune_verdict(results / doc["tune_md"])
    if doc.get("sweep_md"):
        lines += ["", f"Sweep: `{doc['sweep_md']}`", "", headline_section(results / doc["sweep_md"])]
    if doc.get("tune_dense_md"):
        lines += ["", f"Dense launch tuning: `{doc['tune_dense_md']}`", ""] + tune_verdict(results / doc["tune_dense_md"])
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, results: Path, prefix: str, pack: Path | None) -> None:
    """Summary JSON and Markdown; with ``pack``, those, the log and a tarball of this run's files
    (files older than the run, such as committed CPU results in the same folder, stay out)."""
    (results / f"{prefix}summary.json").write_text(json.dumps(doc, indent=1))
    (results / f"{prefix}summary.md").write_text(summarize(doc, results))
    if pack is None:
        return
    pack.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md", "run.log"):
        if (results / f"{prefix}{name}").exists():
            shutil.copyfile(results / f"{prefix}{name}", pack / f"{prefix}{name}")
    tarball = pack / f"{prefix}results.tar.gz"
    mine = sorted(p for p in results.iterdir()
                  if p.is_file() and p.stat().st_mtime >= doc["started_epoch"] and p.resolve() != tarball.resolve())
    with tarfile.open(tarball, "w:gz") as tar:
        for p in mine:
            tar.add(p, arcname=p.name)


def run(stages: list[Stage], mode: str, results: Path, prefix: str, budget_s: float, pack: Path | None,
        echo=print) -> dict:
    """Run ``stages`` within ``budget_s``, writing the summary (and the pack) after each one."""
    results.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + budget_s
    # started_epoch tells this run's files by their mtimes (1 s of slack for coarse file-system clocks).
    doc = dict(mode=mode, budget_s=budget_s, started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               started_epoch=time.time() - 1,
               results=str(results), stages=[], wall_s=0.0, **{key: None for key, _ in STAGE_FINDINGS.values()})
    stop_reason = None
    for i, stage in enumerate(stages):
        left = deadline - time.monotonic()
        later = sum(s.budget_s for s in stages[i + 1:] if s.budget_s is not None)
        limit = left - later if stage.budget_s is None else min(stage.budget_s, left)
        if stop_reason or limit < 1:
            doc["stages"].append(dict(name=stage.name, status="skipped", estimate_s=stage.estimate_s,
                                      note=stop_reason or "the run's budget is spent"))
            echo(f"[gpu_run] {stage.name}: skipped ({doc['stages'][-1]['note']})")
            continue
        echo(f"[gpu_run] {stage.name}: up to {limit:.0f} s (estimate {stage.estimate_s:.0f} s), log {prefix}{stage.name}.log")
        stage_start = time.time()
        rec = run_stage(stage, results / f"{prefix}{stage.name}.log", limit)
        doc["stages"].append(rec)
        echo(f"[gpu_run] {stage.name}: {rec['status']} in {rec['wall_s']:.0f} s")
        if rec["status"] != "ok":
            tail = (results / rec["log"]).read_text(errors="replace").splitlines()[-15:]
            echo("\n".join("    " + line for line in tail))
            if stage.required:
                stop_reason = f"stage {stage.name} {rec['status']}"
        if stage.name in STAGE_FINDINGS:
            key, read = STAGE_FINDINGS[stage.name]
            doc[key] = read(results, prefix, results / rec["log"], stage_start - 1)
        doc["wall_s"] = round(time.monotonic() - start, 1)
        write_outputs(doc, results, prefix, pack)
    doc["wall_s"] = round(time.monotonic() - start, 1)
    return doc


def passed(stages: list[dict]) -> bool:
    """Every stage ok, or skipped by itself (rc SKIPPED_RC: an optional peer is absent); a stage
    skipped for want of time (no rc) is a failure of the run."""
    return all(s["status"] == "ok" or (s["status"] == "skipped" and s.get("rc") == SKIPPED_RC) for s in stages)


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: gpu tests, smallest sanitizer case, one sweep point")
    p.add_argument("--dry-run", action="store_true", help="the stages on the CPU at tiny sizes, TRITON_INTERPRET=1")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="where every file goes")
    p.add_argument("--pack", type=Path, help="also keep summary, log and a tarball of this run's files here")
    p.add_argument("--budget-s", type=float, help=f"the whole run's seconds (default {BUDGET_S})")
    p.add_argument("--stages", help=f"comma-separated subset, in plan order (default {','.join(DEFAULT_STAGES)}; "
                                    "env always runs first; also: bench)")
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for the tests, if installed (1: none)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    prefix = {"full": "gpu_", "quick": "gpu_quick_", "dry": "gpu_dry_"}[mode]
    results = args.results.resolve()
    budget = args.budget_s or BUDGET_S[mode]
    planned = plan(mode, results, prefix, args.workers)
    # The default stages that this mode plans (the quick run has no tune), or exactly those asked for.
    wanted = {"env", *(args.stages.split(",") if args.stages else
                       [s.name for s in planned if s.name in DEFAULT_STAGES])}
    stages = [s for s in planned if s.name in wanted]
    unknown = wanted - {s.name for s in stages}
    if unknown:
        p.error(f"unknown stages: {', '.join(sorted(unknown))}")
    if args.list:
        for i, s in enumerate(stages):
            later = sum(t.budget_s for t in stages[i + 1:] if t.budget_s is not None)
            limit = f"{s.budget_s:.0f} s" if s.budget_s is not None else f"rest less {later:.0f} s" if later else "rest"
            print(f"{s.name}: limit {limit}, estimate {s.estimate_s:.0f} s{'; ' + s.note if s.note else ''}")
            for command in s.commands:
                print("    " + shlex.join(command)[:300])
        print(f"budget {budget:.0f} s, estimate {sum(s.estimate_s for s in stages):.0f} s, results {results}")
        return 0
    log_path = results / f"{prefix}run.log"
    results.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        def echo(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        doc = run(stages, mode, results, prefix, budget, args.pack, echo)
        echo(summarize(doc, results))
    write_outputs(doc, results, prefix, args.pack)  # after the log's last lines
    return 0 if passed(doc["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
