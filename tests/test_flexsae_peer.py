"""``benchmarks.flexsae_peer``'s own logic, without flex-sae: its absence (the exit status
``benchmarks.gpu_run`` records as skipped), the ratio and target table from fake timings, and the
parity check against a pure-torch stand-in with flex-sae's API written here (none of its code).
The real dry run, flex-sae's kernels in the interpreter, runs only where ``make peers`` has put
flex-sae in ``peers/flexsae``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks import flexsae_peer, gpu_run
from benchmarks.flexsae_peer import PUBLISHED_OVERHEAD, flex_shape_problems, loss_functions, parity, ratios
from benchmarks.harness import make_input_set, summarize

# flex-sae's two losses as its README defines them, on slots in the given order:
# TopK  mean over (b, j) of (x - b_dec - sum_s v_s W[i_s])^2;
# hier  the same mean over every prefix t = 1..k of the slots as well.  ORDER flips the slots for a
# stand-in whose prefixes run the wrong way.
STAND_IN = textwrap.dedent('''
    """A pure-torch stand-in with flex-sae's call signature, for tests."""
    import torch

    def _residuals(indices, weight, vals, bias, target, every):
        parts = vals.float().unsqueeze(-1) * weight[indices].float()
        parts = parts.flip(1) if {flip} else parts
        decoded = parts.cumsum(1) if every else parts.sum(1, keepdim=True)
        return target.float().unsqueeze(1) - bias.float() - decoded

    def triton_topk_sae_loss(indices, weight, vals, bias, target):
        return _residuals(indices, weight, vals, bias, target, every=False).pow(2).mean()

    def triton_hierarchical_sae_loss(indices, weight, vals, bias, target):
        return _residuals(indices, weight, vals, bias, target, every=True).pow(2).mean()
''')


def _stand_in(root, flip=False):
    package = root / "torch-ext" / "flex_sae"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN.format(flip=flip))
    return root


@pytest.fixture
def cpu_main(monkeypatch, one_thread):
    """``flexsae_peer.main`` on the CPU with our op on its PyTorch scan (the interpreter's Triton
    would take minutes): the variable main sets for the interpreter is put back afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(flexsae_peer, "loss_functions",
                        lambda flex, n, d, k: loss_functions(flex, n, d, k, backend="torch"))
    return flexsae_peer.main


def test_absent_flexsae_exits_with_the_status_gpu_run_records_as_skipped(tmp_path, capsys):
    status = flexsae_peer.main(["--flexsae-dir", str(tmp_path / "nowhere"), "--results", str(tmp_path / "out")])
    assert status == flexsae_peer.ABSENT_EXIT_STATUS == gpu_run.SKIPPED_RC
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "make peers" in line and 'carry=["peers/flexsae"]' in line
    assert not (tmp_path / "out").exists()
    # gpu_run reads the summary section by this marker without importing the module (no torch there).
    assert gpu_run.PEERS_MARKER == flexsae_peer.SUMMARY_MARKER


def test_flex_shape_requirements():
    assert flex_shape_problems(4096, 2304, 32) == {}
    assert set(flex_shape_problems(16, 64, 4)) == {"flex_topk"}  # its backward tiles d by 256
    assert set(flex_shape_problems(8, 256, 4)) == {"flex_hier"}  # its backward tiles the batch by 16
    assert "k=6 a power of two" in flex_shape_problems(16, 256, 6)["flex_hier"]


def test_ranked_input_set_puts_slots_in_our_rank_order():
    s = make_input_set(3, 16, 4, 4, torch.float32, "cpu", seed=0)
    with torch.no_grad():
        s.acts.values[0] = torch.tensor([0.5, 0.9, 0.5, 0.1])
        s.acts.indices[0] = torch.tensor([7, 2, 3, 11])
    ranked = flexsae_peer.ranked_input_set(s)
    assert ranked.acts.values[0].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.1])
    assert ranked.acts.indices[0].tolist() == [2, 3, 7, 11]  # the tie by latent index
    assert (ranked.acts.values[1:].diff(dim=1) <= 0).all()
    assert ranked.acts.values.is_leaf and ranked.acts.values.requires_grad and ranked.W_dec.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_against_a_stand_in_with_flex_saes_api(tmp_path, dtype):
    flex = flexsae_peer.load_flexsae(_stand_in(tmp_path))
    s = flexsae_peer.ranked_input_set(make_input_set(8, 40, 12, 6, dtype, "cpu", seed=1))
    checks = parity(loss_functions(flex, 40, 12, 6, backend="torch"), s, flexsae_peer.TOLERANCE[
        "fp32" if dtype == torch.float32 else "bf16"])
    assert [(c["flex"], c["ours"], c["ok"]) for c in checks] == [("flex_hier", "ours_every", True),
                                                                   ("flex_topk", "ours_one", True)]
    assert all(set(c["rel_diff"]) == {"loss", "W_dec", "values", "b_dec"} for c in checks)
    assert checks[0]["loss_flex"] == pytest.approx(checks[0]["loss_ours"], rel=1e-2)
    assert s.W_dec.grad is None  # the check leaves no gradients behind


def test_parity_fails_when_the_prefixes_run_the_other_way(tmp_path):
    flex = flexsae_peer.load_flexsae(_stand_in(tmp_path, flip=True))
    s = flexsae_peer.ranked_input_set(make_input_set(8, 40, 12, 6, torch.float32, "cpu", seed=1))
    hier, topk = parity(loss_functions(flex, 40, 12, 6, backend="torch"), s, 1e-4)
    assert not hier["ok"] and hier["rel_diff"]["loss"] > 1e-3
    assert topk["ok"]  # one prefix of all slots does not depend on their order


def _record(part, loss, times, k=32, dtype="bf16", n=65536, d=2304, B=4096):
    return dict(k=k, dtype=dtype, n=n, d=d, B=B, part=part, loss=loss, status="ok", **summarize(times), times_s=times)


def _fake_records(k, every_step):
    step = dict(flex_topk=[1.0, 1.0, 1.0], flex_hier=[1.25, 1.25, 1.25], ours_one=[1.0, 1.0, 1.0], ours_every=every_step)
    loss = dict(flex_topk=[1.0, 2.0, 9.0], flex_hier=[1.0, 4.0, 9.0], ours_one=[1.0, 1.0, 1.0], ours_every=[1.0, 1.0, 1.0])
    return [_record("step", name, t, k=k) for name, t in step.items()] + [
        _record("loss", name, t, k=k) for name, t in loss.items()]


def _ratio(rows, k, label, part):
    return next(r for r in rows if r["k"] == k and r["ratio"] == label and r["part"] == part)


def test_ratios_and_targets_from_fake_timings():
    records = _fake_records(32, [1.1, 1.1, 1.1]) + _fake_records(64, [1.3, 1.3, 1.3])
    rows = ratios(records, "cuda")
    assert len(rows) == 2 * len(flexsae_peer.RATIOS)
    hier_loss = _ratio(rows, 32, "flex hier / flex TopK", "loss")
    # Ratio of medians 4 / 2; the median of per-round ratios 1, 2, 1 is 1.
    assert hier_loss["ratio_of_medians"] == pytest.approx(2.0) and hier_loss["paired_ratio"] == pytest.approx(1.0)
    assert hier_loss["target"] is None and hier_loss["met"] is None and hier_loss["published"] == 1.20
    for k, met in ((32, True), (64, False)):
        for label in ("ours every / flex TopK", "ours every / ours one"):
            row = _ratio(rows, k, label, "step")
            assert row["target"] == f"< {PUBLISHED_OVERHEAD[k]:.2f}" and row["met"] is met
    assert _ratio(rows, 64, "flex hier / flex TopK", "step")["ratio_of_medians"] == pytest.approx(1.25)
    # On a CPU nothing is met or missed; at another shape there is no published figure to compare.
    assert all(r["met"] is None for r in ratios(records, "cpu"))
    other = ratios([dict(r, n=4096) for r in records], "cuda")
    assert all(r["published"] is None and r["target"] is None and r["met"] is None for r in other)
    # A loss that did not run leaves its ratios empty, not wrong.
    missing = ratios([r for r in records if not (r["loss"] == "flex_topk" and r["k"] == 32)], "cuda")
    assert _ratio(missing, 32, "ours every / flex TopK", "step")["ratio_of_medians"] is None


def test_markdown_summary_section_is_what_gpu_run_shows(tmp_path):
    records = _fake_records(32, [1.1, 1.1, 1.1]) + _fake_records(64, [1.3, 1.3, 1.3])
    checks = [dict(k=32, dtype="bf16", flex="flex_hier", ours="ours_every", tolerance=1e-2, ok=False,
                   rel_diff=dict(loss=0.5, W_dec=0.0, values=0.0, b_dec=0.0), max_rel_diff=0.5)]
    doc = dict(environment=dict(device_name="NVIDIA H200", device_type="cuda", torch="2.11", triton="3.6",
                                git_commit="abc", git_dirty=False, timestamp_utc="t"),
               flexsae=dict(dir="peers/flexsae", commit="0f4e0ec"), parity=checks, records=records,
               ratios=ratios(records, "cuda"), not_run=[dict(k=128, dtype="bf16", part="step", reason="budget")],
               settings=dict(B=4096, d=2304, n=65536, timing="CUDA events"), flex_ran=None)
    md = flexsae_peer.markdown(doc)
    assert "| 32 | bf16 | ours every / flex TopK | step | 1.100 [1.100] | 1.20 | < 1.20 | yes |" in md
    assert "| 64 | bf16 | ours every / ours one | step | 1.300 [1.300] | 1.26 | < 1.26 | NO |" in md
    assert "Parity FAILED: 1 of 1" in md and "Not run: k=128, dtype=bf16" in md
    path = tmp_path / "flexsae_cuda-x.md"
    path.write_text(md)
    section = gpu_run.headline_section(path, gpu_run.PEERS_MARKER)
    assert section.startswith(gpu_run.PEERS_MARKER) and "Parity FAILED" in section and "< 1.33" not in section
    assert "| k | dtype | part |" not in section  # the per-loss times stay in the file


def test_main_end_to_end_on_the_stand_in(tmp_path, cpu_main, capsys):
    root = _stand_in(tmp_path / "good")
    args = ["--flexsae-dir", str(root), "--device", "cpu", "--B", "16", "--d", "256", "--n", "64", "--ks", "2",
            "--dtypes", "fp32", "--min-rounds", "2", "--max-rounds", "2", "--results", str(tmp_path / "out")]
    assert cpu_main(args) == 0
    doc = json.loads(next((tmp_path / "out").glob("flexsae_*.json")).read_text())
    assert {(r["part"], r["loss"], r["status"], r["repeats"]) for r in doc["records"]} == {
        (part, loss, "ok", 2) for part in ("loss", "step") for loss in flexsae_peer.LOSSES}
    assert [c["ok"] for c in doc["parity"]] == [True, True] and doc["not_run"] == []
    assert doc["flexsae"]["commit"] is None  # not a git clone
    # A stand-in whose prefixes run the wrong way fails the run at the end, after timing everything.
    bad = _stand_in(tmp_path / "bad", flip=True)
    assert cpu_main(args[:1] + [str(bad)] + args[2:] + ["--tag", "_bad"]) == 1
    doc = json.loads(next((tmp_path / "out").glob("flexsae_*_bad.json")).read_text())
    assert [c["ok"] for c in doc["parity"]] == [False, True] and len(doc["records"]) == 8
    # Nothing starts once the time budget is spent; the units are listed as not run.
    assert cpu_main(args + ["--time-budget-s", "0", "--tag", "_none"]) == 0
    doc = json.loads(next((tmp_path / "out").glob("flexsae_*_none.json")).read_text())
    assert doc["records"] == [] and [u["part"] for u in doc["not_run"]] == ["loss", "step"]
    assert "FAILED: 1 parity check(s)" in capsys.readouterr().err


@pytest.mark.skipif(not flexsae_peer.DEFAULT_FLEXSAE_DIR.joinpath("torch-ext", "flex_sae").is_dir(),
                    reason="flex-sae is not in peers/flexsae (make peers)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the peers stage of benchmarks.gpu_run runs it compiled")
def test_the_real_dry_run_with_flexsae_in_the_interpreter(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.flexsae_peer", "--dry-run", "--ks", "2", "--warmup", "0",
                           "--min-rounds", "1", "--max-rounds", "1", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=flexsae_peer.REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("flexsae_*_dry.json")).read_text())
    assert doc["flexsae"]["commit"] and all(c["ok"] for c in doc["parity"])
    assert all(r["status"] == "ok" for r in doc["records"]) and doc["settings"]["interpreted"]
