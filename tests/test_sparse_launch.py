"""The sparse kernels' launch configurations (``SparseLaunch``: what ``benchmarks/tune.py`` times) all
compute the scan's definition; bad configurations are refused by name; the tuner's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka import SparseActs
from matryoshka.kernels.sparse_scan import SparseLaunch, default_launch, sparse_scan_backward, sparse_scan_forward
from matryoshka.scan_layout import SortedActs

from benchmarks import tune

from .conftest import DEVICE
from .helpers import make_problem, record_kernel_launches
from .launches import SPARSE_LAUNCHES as LAUNCHES
from .launches import SPARSE_PROBLEM


def _problem(B=SPARSE_PROBLEM[0], d=SPARSE_PROBLEM[1], n=30, k=4, seed=0):
    """float64 inputs in the kernels' layout (``SortedActs``: indices sorted per row, padding last) with
    ragged rows: a third of the slots padding (garbage values), row 3 all padding."""
    p = make_problem(B, d, n, k, torch.float64, DEVICE, pad_fraction=0.3, padding_rows=(3,), seed=seed)
    slots = SortedActs(SparseActs(p.values, p.indices), n)
    counts = (slots.indices >= 0).sum(1)
    assert len(set(counts.tolist())) > 2, "the launches with several rows per program need ragged rows"
    grad = torch.randn(B, k + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    return p.x, p.b_dec, p.W_dec, slots.values, slots.indices, grad


def _definition(x, b, W, values, indices, grad):
    """``norms[:, t] = ||x - b - sum_{s<=t} v_s W[p_s]||^2`` and the gradients of ``<grad, norms>``."""
    x, b, W, values = (t.clone().requires_grad_() for t in (x, b, W, values))
    live = indices >= 0
    rows = W[indices.clamp(min=0)] * (values * live).unsqueeze(-1)
    residuals = (x - b).unsqueeze(1) - torch.cat([torch.zeros_like(rows[:, :1]), rows.cumsum(1)], dim=1)
    norms = residuals.pow(2).sum(-1)
    dx, dv, dW = torch.autograd.grad((grad * norms).sum(), (x, values, W))
    return norms.detach(), residuals[:, -1].detach(), dx, dv, dW


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
def test_every_launch_computes_the_scan(launch):
    x, b, W, values, indices, grad = _problem()
    got_all = tune.run_candidate(launch, tune.Inputs(x, b, W, values, indices, grad))
    for got, want in zip(got_all, _definition(x, b, W, values, indices, grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("launch", LAUNCHES[1:3] + LAUNCHES[4:5] + LAUNCHES[6:], ids=str)
def test_detached_backward_does_not_depend_on_the_launch(launch):
    x, b, W, values, indices, grad = _problem(k=5, seed=1)
    levels = torch.tensor([0, 0, 1, 1, 2], device=DEVICE).expand(x.shape[0], -1).contiguous()
    grad_level = torch.randn_like(grad)
    _, residual = sparse_scan_forward(x, b, W, values, indices, torch.float64)
    want = sparse_scan_backward(residual, grad, W, values, indices, grad_level, levels)
    got = sparse_scan_backward(residual, grad, W, values, indices, grad_level, levels, launch=launch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_launch_reaches_both_kernels(monkeypatch):
    from matryoshka.kernels import sparse_scan

    seen = record_kernel_launches(monkeypatch, sparse_scan, ("_sparse_scan_forward_kernel", "_sparse_scan_backward_kernel"),
                                  ("BLOCK_D", "LOOP_STAGES", "num_warps", "ATOMIC_SEM"))
    x, b, W, values, indices, grad = _problem()
    launch = SparseLaunch(32, num_warps=2, loop_stages=3, atomic_sem="acq_rel")
    _, residual = sparse_scan_forward(x, b, W, values, indices, torch.float64, launch)
    sparse_scan_backward(residual, grad, W, values, indices, launch=launch)
    sparse_scan_forward(x, b, W, values, indices, torch.float64)
    config = dict(BLOCK_D=32, LOOP_STAGES=3, num_warps=2)
    assert seen == [((5, 4), dict(config, ATOMIC_SEM=None)), ((5, 4), dict(config, ATOMIC_SEM="acq_rel")),
                    ((5, 1), dict(BLOCK_D=128, LOOP_STAGES=1, num_warps=4, ATOMIC_SEM=None))]


def test_sorted_dw_is_the_same_bits_every_run_and_zero_for_unused_latents():
    """No atomics: each dW_dec row is one program's sum in slot order (on a GPU the atomic mode's
    order varies from run to run; in the interpreter both are fixed, so this pins the zeros)."""
    x, b, W, values, indices, grad = _problem(n=300)
    inputs = tune.Inputs(x, b, W, values, indices, grad)
    first, second = (tune.run_candidate(SparseLaunch(32, dw_mode="sorted"), inputs)[4] for _ in range(2))
    assert torch.equal(first, second)
    unused = torch.ones(300, dtype=torch.bool, device=DEVICE)
    unused[indices[indices >= 0]] = False
    assert unused.sum() > 250 and (first[unused] == 0).all() and (first[~unused] != 0).any(dim=1).all()


def test_sorted_dw_with_no_rows_is_all_zeros():
    x, b, W, values, indices, grad = (t[:0] if t.dim() == 2 and t.shape[0] == 5 else t for t in _problem())
    dW = tune.run_candidate(SparseLaunch(32, dw_mode="sorted"), tune.Inputs(x, b, W, values, indices, grad))[4]
    assert dW.shape == W.shape and (dW == 0).all()


def test_default_launch_is_one_chunk_up_to_1024_columns():
    assert default_launch(1).block_d == 16
    assert default_launch(100).block_d == 128
    assert default_launch(1024).block_d == 1024
    assert default_launch(2304) == SparseLaunch(1024, num_warps=4, rows=1, loop_stages=1, atomic_sem="relaxed",
                                                dw_mode="atomic")


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_d=96), "block_d must be a power of two >= 16, got 96"),
    (dict(block_d=8), "block_d must be a power of two >= 16, got 8"),
    (dict(block_d=64, num_warps=3), "num_warps must be a power of two from 1 to 32, got 3"),
    (dict(block_d=64, rows=3), "rows must be a power of two from 1 to 64, got 3"),
    (dict(block_d=64, rows=128), "rows must be a power of two from 1 to 64, got 128"),
    (dict(block_d=64, loop_stages=0), "loop_stages must be >= 1, got 0"),
    (dict(block_d=64, atomic_sem="seq_cst"), "atomic_sem must be 'relaxed', 'acq_rel', 'acquire' or 'release'"),
    (dict(block_d=64, dw_mode="segmented"), "dw_mode must be one of ('atomic', 'sorted'), got 'segmented'"),
])
def test_bad_launch_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SparseLaunch(**kwargs)


def test_report_builds_a_launch_with_its_warps_as_an_option():
    report = pytest.importorskip("matryoshka.kernels.report")
    forward, backward, _ = report._sparse_builds([torch.bfloat16], [(4096, 2304)], SparseLaunch(256, 2, 3, "acq_rel"))
    assert forward.options == backward.options == dict(num_warps=2)
    assert "ATOMIC_SEM" not in forward.constexprs and "num_warps" not in forward.constexprs
    assert backward.constexprs["ATOMIC_SEM"] == "acq_rel" and backward.constexprs["LOOP_STAGES"] == 3
    assert backward.constexprs["BLOCK_D"] == 256 and "R=1 w=2 s=3 acq_rel" in backward.config
    assert backward.constexprs["SORTED_DW"] is False
    *_, segment_sum = report._sparse_builds([torch.float32], [(4096, 2304)], SparseLaunch(256, dw_mode="sorted"))
    assert segment_sum.kernel == "sparse_dw_segment_sum" and segment_sum.constexprs["BLOCK_D"] == 256


# ------------------------------------------------------------------------------------- the tuner
def test_tuner_keeps_only_chunks_that_d_needs():
    assert tune.candidate_pairs(2304) == tune.PAIRS
    assert tune.candidate_pairs(300) == [(512, 2), (512, 4), (512, 8), (256, 1), (256, 2), (256, 4)]
    assert tune.candidate_pairs(40) == [(64, 4)]
    assert default_launch(2304) in tune.every_candidate(2304)


def test_rows_variants_keep_the_tile_area():
    assert tune.rows_variants(SparseLaunch(1024, num_warps=8, loop_stages=2)) == [
        SparseLaunch(1024 // r, num_warps=8, loop_stages=2, rows=r) for r in (2, 4, 8, 16)]
    assert tune.rows_variants(SparseLaunch(64)) == [SparseLaunch(32, rows=2), SparseLaunch(16, rows=4)]


def test_score_is_infinite_when_any_k_failed():
    ok = {"forward_s": 1e-3, "backward_s": 2e-3}
    assert tune.score({32: ok, 128: ok}) == pytest.approx(6e-3)
    assert math.isinf(tune.score({32: ok, 128: {"error": "outputs differ"}}))
    assert math.isinf(tune.score({32: {"mismatch": 0.0}}))  # checked but never timed
    assert math.isinf(tune.score({}))


def test_tuner_end_to_end_picks_the_fastest_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "PAIRS", [(64, 4), (32, 2)])
    monkeypatch.setattr(tune, "LOOP_STAGES", (2,))
    monkeypatch.setattr(tune, "ROWS", (2,))
    rc = tune.main(["--device", DEVICE, "--B", "3", "--d", "40", "--n", "16", "--ks", "2", "--dtypes", "fp32",
                    "--rounds", "3", "--results", str(tmp_path)])
    assert rc == 0
    [json_file] = tmp_path.glob("tune_*.json")
    doc = __import__("json").loads(json_file.read_text())
    records = doc["by_dtype"]["fp32"]
    assert {r["phase"] for r in records} == {"pairs", "rows", "stages", "atomics", "dw"}
    assert all(math.isfinite(r["score_s"]) and r["per_k"]["2"]["mismatch"] < 1e-4 for r in records)
    # The sparse floor timed on the same inputs: one ratio per candidate, in the table's last column.
    assert all(r["vs_sparse_floor"] > 0 for r in records)
    best = tune.best_launch(records)
    assert best["score_s"] == min(r["score_s"] for r in records)
    text = (tmp_path / json_file.name.replace(".json", ".md")).read_text()
    assert "| pairs | 1 | 64 | 4 | 1 | relaxed | atomic |" in text and "Best: `SparseLaunch(" in text
    header, rule = text.split("\n## fp32\n\n")[1].splitlines()[:2]
    assert header.count("|") == rule.count("|")
