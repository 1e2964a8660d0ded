"""``benchmarks.gpu_run``'s plumbing without a GPU: stages that pass, fail and run out of time,
the summary and the pack the device tool brings back, and the plans' budgets.  Fake stages stand in
for the real ones (``make gpu-dry-run`` runs those on the CPU, ~2 min)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import gpu_run
from benchmarks.gpu_run import Stage

PY = sys.executable


def _stage(name, code, budget_s=20.0, **kw):
    return Stage(name, [[PY, "-c", code]], budget_s, 1.0, **kw)


def test_failures_and_timeouts_are_recorded_and_the_run_goes_on(tmp_path):
    results, pack = tmp_path / "results", tmp_path / "out" / "full"
    stages = [
        _stage("env", "print('env ok')", required=True),
        _stage("tests", "import sys; print('boom'); sys.exit(3)"),
        _stage("sanitize", "import time; print('hang', flush=True); time.sleep(60)", budget_s=1.0),
        _stage("sweep", "import sys; print(sys.argv[1:])", budget_s=None, budget_flag="--time-budget-s", margin_s=5),
    ]
    lines = []
    started = time.monotonic()
    doc = gpu_run.run(stages, "dry", results, "gpu_dry_", 120.0, pack, lines.append)
    assert time.monotonic() - started < 30  # the sleeping stage was stopped at its limit
    status = {s["name"]: (s["status"], s["rc"]) for s in doc["stages"]}
    assert status == {"env": ("ok", 0), "tests": ("failed", 3), "sanitize": ("timeout", None), "sweep": ("ok", 0)}
    assert "boom" in "\n".join(lines)  # a failed stage's log tail is shown
    # The last stage gets the rest of the run's budget, less the margin, as its own budget.
    assert "--time-budget-s" in doc["stages"][-1]["commands"][0]
    assert (results / "gpu_dry_sweep.log").read_text().count("--time-budget-s") == 2
    summary = json.loads((results / "gpu_dry_summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "failed", "timeout", "ok"]
    assert "| sanitize | timeout |" in (results / "gpu_dry_summary.md").read_text()
    packed = sorted(p.name for p in pack.iterdir())
    assert packed == ["gpu_dry_results.tar.gz", "gpu_dry_summary.json", "gpu_dry_summary.md"]
    with tarfile.open(pack / "gpu_dry_results.tar.gz") as tar:
        assert {"gpu_dry_env.log", "gpu_dry_tests.log", "gpu_dry_sanitize.log", "gpu_dry_sweep.log"} <= set(tar.getnames())


def test_the_rest_of_the_budget_leaves_the_later_stages_their_limits(tmp_path):
    """A stage without a limit of its own (the sweep) gets the run's budget less what the stages after
    it may take, so that a later stage (the dense tuning) still runs."""
    stages = [_stage("sweep", "import sys; print(sys.argv[1:])", budget_s=None, budget_flag="--time-budget-s"),
              _stage("tune-dense", "print('tuned')", budget_s=25.0)]
    doc = gpu_run.run(stages, "dry", tmp_path, "gpu_dry_", 100.0, None, lambda _: None)
    sweep, tune = doc["stages"]
    assert 70 < sweep["budget_s"] <= 75 and tune["status"] == "ok" and tune["budget_s"] == 25.0
    assert sweep["commands"][0].endswith(f"--time-budget-s {sweep['budget_s']:.0f}")


def test_a_failed_required_stage_skips_the_rest(tmp_path):
    stages = [_stage("env", "import sys; sys.exit('no CUDA device')", required=True), _stage("tests", "pass")]
    doc = gpu_run.run(stages, "full", tmp_path, "gpu_", 60.0, None, lambda _: None)
    assert [s["status"] for s in doc["stages"]] == ["failed", "skipped"]
    assert doc["stages"][1]["note"] == "stage env failed"


def test_the_summary_reads_junit_and_the_sweep_headline(tmp_path):
    (tmp_path / "gpu_tests_junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    counts = gpu_run.tests_counts(tmp_path / "gpu_tests_junit.xml")
    assert counts == dict(tests=3, failures=1, errors=0, skipped=1, failed=["tests.test_a::test_bad"])
    (tmp_path / "sweep_cuda-x.md").write_text("tables\n\n**Headline ratios against ...**\n| a | b |\n")
    assert gpu_run.newest_md(tmp_path, 0) == "sweep_cuda-x.md"
    doc = dict(mode="full", environment=dict(device_name="NVIDIA H200", torch="2.11.0"), started_utc="t",
               wall_s=1.0, budget_s=480.0, stages=[], tests=counts, sanitizer=["========= ERROR SUMMARY: 0 errors"],
               sweep_md="sweep_cuda-x.md")
    md = gpu_run.summarize(doc, tmp_path)
    assert "NVIDIA H200" in md and "- FAILED tests.test_a::test_bad" in md and "ERROR SUMMARY: 0 errors" in md
    assert "**Headline ratios" in md and "tables" not in md
    # flex-sae's section, from its marker on, before the sweep's.
    (tmp_path / "flexsae_cuda-x.md").write_text(f"times\n\n{gpu_run.PEERS_MARKER}** (H200)\n\nParity: all 12 checks\n")
    assert gpu_run.newest_md(tmp_path, 0, "flexsae_*.md") == "flexsae_cuda-x.md"
    md = gpu_run.summarize(dict(doc, peers_md="flexsae_cuda-x.md"), tmp_path)
    assert "Parity: all 12 checks" in md and "times" not in md
    assert md.index("flex-sae side by side") < md.index("**Headline ratios")
    # The tuning's verdict: each dtype's heading and best launch, not its table.
    (tmp_path / "tune_cuda-x.md").write_text("# Sparse kernel launch tuning\n\n## bf16\n\n| phase |\n|---|\n"
                                             "| pairs |\n\nBest: `SparseLaunch(block_d=512)`, 1.20x the default.\n")
    assert gpu_run.newest_md(tmp_path, 0, "tune_*.md") == "tune_cuda-x.md"
    md = gpu_run.summarize(dict(doc, tune_md="tune_cuda-x.md"), tmp_path)
    assert "## bf16\nBest: `SparseLaunch(block_d=512)`, 1.20x the default." in md and "| pairs |" not in md
    (tmp_path / "tune_dense_cuda-x.md").write_text("# Dense kernel launch tuning\n\n## fp32\n\n| tiles |\n\n"
                                                   "Best: `DenseLaunch(rows=32)`, 1.50x the default.\n")
    md = gpu_run.summarize(dict(doc, tune_dense_md="tune_dense_cuda-x.md"), tmp_path)
    assert "Dense launch tuning: `tune_dense_cuda-x.md`\n\n## fp32\nBest: `DenseLaunch(rows=32)`" in md


def test_the_run_record_keeps_what_each_stage_wrote(tmp_path):
    """Each stage's findings reach the run's record (and so the summary the device brings back) from
    the files that stage wrote: the environment, the JUnit counts, the sanitizer's lines, and the
    newest Markdown of flex-sae, the tuners and the sweep; a file from before the stage is not taken."""
    (tmp_path / "sweep_cuda-old.md").write_text("an earlier run's sweep")
    writes = {
        "env": "open('gpu_env.json', 'w').write('{\"device_name\": \"NVIDIA H200\"}')",
        "tests": "open('gpu_tests_junit.xml', 'w').write('<testsuite tests=\"2\" failures=\"0\" errors=\"0\" "
                 "skipped=\"1\"><testcase classname=\"t\" name=\"ok\"/></testsuite>')",
        # (split, so that the command line the log records does not itself read as the verdict)
        "sanitize": "print('========= ERROR' + ' SUMMARY: 0 errors'); print('sanitize: ' + '4 cases agree')",
        "peers": "open('flexsae_cuda-x.md', 'w').write('x')",
        "tune": "open('tune_cuda-x.md', 'w').write('x')",
        "sweep": "import time; time.sleep(1.1); open('sweep_cuda-new.md', 'w').write('x')",
        "tune-dense": "open('tune_dense_cuda-x.md', 'w').write('x')",
    }
    stages = [Stage(name, [[PY, "-c", f"import os; os.chdir({str(tmp_path)!r}); {code}"]], 20.0, 1.0)
              for name, code in writes.items()]
    doc = gpu_run.run(stages, "full", tmp_path, "gpu_", 120.0, None, lambda _: None)
    assert [s["status"] for s in doc["stages"]] == ["ok"] * len(writes)
    assert doc["environment"] == {"device_name": "NVIDIA H200"}
    assert doc["tests"] == dict(tests=2, failures=0, errors=0, skipped=1, failed=[])
    assert doc["sanitizer"] == ["========= ERROR SUMMARY: 0 errors", "sanitize: 4 cases agree"]
    assert (doc["peers_md"], doc["tune_md"], doc["sweep_md"], doc["tune_dense_md"]) == (
        "flexsae_cuda-x.md", "tune_cuda-x.md", "sweep_cuda-new.md", "tune_dense_cuda-x.md")
    assert json.loads((tmp_path / "gpu_summary.json").read_text())["sweep_md"] == "sweep_cuda-new.md"


def test_a_stage_that_skips_itself_is_recorded_as_skipped(tmp_path):
    """flex-sae absent: the peers stage exits with SKIPPED_RC, which only a stage with a
    skipped_note takes for "nothing to do"; for any other stage it is a failure."""
    exit_3 = [[PY, "-c", f"import sys; sys.exit({gpu_run.SKIPPED_RC})"]]
    stages = [Stage("peers", exit_3, 20.0, 1.0, skipped_note="flex-sae not in peers/flexsae"),
              Stage("sweep", exit_3, 20.0, 1.0)]
    doc = gpu_run.run(stages, "dry", tmp_path, "gpu_dry_", 60.0, None, lambda _: None)
    assert [(s["status"], s["rc"], s["note"]) for s in doc["stages"]] == [
        ("skipped", 3, "flex-sae not in peers/flexsae"), ("failed", 3, "")]
    assert "| peers | skipped |" in (tmp_path / "gpu_dry_summary.md").read_text()
    assert gpu_run.passed(doc["stages"][:1]) and not gpu_run.passed(doc["stages"])
    assert not gpu_run.passed([dict(name="sweep", status="skipped", note="the run's budget is spent")])


@pytest.mark.parametrize("mode", ["full", "quick", "dry"])
def test_plans_fit_their_budgets(tmp_path, mode):
    stages = [s for s in gpu_run.plan(mode, tmp_path, "p_", 8) if s.name in gpu_run.DEFAULT_STAGES]
    # The quick smoke run does not tune.
    assert [s.name for s in stages] == [n for n in gpu_run.DEFAULT_STAGES if mode != "quick" or "tune" not in n]
    fixed = sum(s.budget_s for s in stages if s.budget_s is not None)
    [sweep_stage] = [s for s in stages if s.name == "sweep"]
    # The sweep gets what the others leave: its estimate plus its margin when they take their
    # estimates, and still more than its margin when every one of them takes its whole limit.
    expected = sum(s.estimate_s for s in stages if s is not sweep_stage)
    assert expected + sweep_stage.estimate_s + sweep_stage.margin_s <= gpu_run.BUDGET_S[mode]
    assert fixed + sweep_stage.margin_s < gpu_run.BUDGET_S[mode]
    args = [arg for s in stages for c in s.commands for arg in c]
    assert f"--junitxml={tmp_path / 'p_tests_junit.xml'}" in args and str(tmp_path / "p_env.json") in args
    sweep = sweep_stage.commands[0]
    assert sweep[sweep.index("--out") + 1] == str(tmp_path)
    # flex-sae beside ours: results beside the rest, a time budget, a skip when it is absent.
    peers = next(s for s in stages if s.name == "peers")
    command = peers.commands[0]
    assert command[command.index("--results") + 1] == str(tmp_path)
    assert peers.budget_flag == "--time-budget-s" and peers.skipped_note and peers.margin_s < peers.budget_s
    assert {"full": "--device cuda", "quick": "--ks 32", "dry": "--dry-run"}[mode] in " ".join(command)
    # The launch tuning: results beside the rest, a time budget with room to stop, tiny in the dry run.
    for tune in (s for s in stages if s.name in ("tune", "tune-dense")):
        command = tune.commands[0]
        assert command[command.index("--results") + 1] == str(tmp_path)
        assert tune.budget_flag == "--time-budget-s" and tune.margin_s < tune.budget_s
        assert ("--dry-run" in command) == (mode == "dry")
    # Compiled kernels on the GPU (the variable removed), the interpreter in the dry run.
    assert all(s.env["TRITON_INTERPRET"] == ("1" if mode == "dry" else None) for s in stages)


def test_list_prints_the_plan():
    done = subprocess.run([PY, "-m", "benchmarks.gpu_run", "--list", "--quick"], capture_output=True, text=True,
                          timeout=60, cwd=gpu_run.REPO)
    assert done.returncode == 0, done.stderr
    assert "sweep: limit rest" in done.stdout and "--tag _gpu_quick" in done.stdout
    bad = subprocess.run([PY, "-m", "benchmarks.gpu_run", "--list", "--stages", "nope"], capture_output=True,
                         text=True, timeout=60, cwd=gpu_run.REPO)
    assert bad.returncode == 2 and "unknown stages: nope" in bad.stderr


def test_results_name_the_commit_in_a_tree_without_git(monkeypatch):
    """The device tool copies the working tree without .git: every results file's environment record
    (harness.environment, which the sweep, the tuner and flex-sae's run all write) takes
    GPU_RUN_COMMIT, and a real checkout's own commit wins over it."""
    import torch

    from benchmarks import harness

    monkeypatch.setenv("GPU_RUN_COMMIT", "abc123")
    checkout = harness.git_output("rev-parse", "HEAD")  # None in the device tool's copy
    if checkout:
        assert harness.environment(torch.device("cpu"))["git_commit"] == checkout
    monkeypatch.setattr(harness, "git_output", lambda *args, **kw: None)
    assert harness.environment(torch.device("cpu"))["git_commit"] == "abc123"
