"""The dense kernels' launch configurations (``DenseLaunch``: what ``benchmarks/tune_dense.py`` times)
all compute the scan's definition; the float32 product precision follows the user's matmul precision;
bad configurations are refused by name; the dense tuner's bookkeeping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from matryoshka import Prefixes, matryoshka_loss
from matryoshka.kernels import dense_scan
from matryoshka.kernels.dense_scan import DenseLaunch, default_launch, dense_scan_backward, dense_scan_forward

from benchmarks import tune_dense

from .conftest import DEVICE
from .helpers import record_kernel_launches
from .launches import DENSE_LAUNCHES as LAUNCHES
from .launches import DENSE_PROBLEM
from .test_dense_triton import make_dense_problem, prefix_sets

B, D, N = DENSE_PROBLEM


@pytest.fixture
def matmul_precision():
    """Set ``torch.set_float32_matmul_precision`` inside a test, restored afterwards."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _inputs(prefixes: Prefixes, seed: int = 0) -> tune_dense.DenseInputs:
    x, acts, W, b = make_dense_problem(B, D, N, torch.float64, seed=seed)
    grad = torch.randn(B, prefixes.lengths.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return tune_dense.DenseInputs(x, b, W, acts, prefixes.lengths.cpu(), grad.to(DEVICE))


def _definition(s: tune_dense.DenseInputs):
    """``norms[:, g] = ||x - b - A[:, :m_g] W[:m_g]||^2``, the residual after the longest prefix and the
    gradients of ``<grad, norms>`` in ``x``, ``A`` and ``W_dec``."""
    x, b, W, A = (t.clone().requires_grad_() for t in (s.x, s.b_dec, s.W_dec, s.acts))
    residuals = [x - b - A[:, :m] @ W[:m] for m in s.lengths.tolist()]
    norms = torch.stack([r.pow(2).sum(-1) for r in residuals], dim=1)
    dx, dA, dW = torch.autograd.grad((s.grad_norms * norms).sum(), (x, A, W))
    return norms.detach(), residuals[-1].detach(), dx, dA, dW


@pytest.mark.parametrize("kind", ["edges-and-inside", "every+empty"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
def test_every_launch_computes_the_scan(launch, kind):
    s = _inputs(prefix_sets(N, 16)[kind])
    for got, want in zip(tune_dense.run_candidate(launch, s), _definition(s)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("launch", LAUNCHES[:3], ids=str)
def test_detached_backward_does_not_depend_on_the_launch(launch):
    s = _inputs(prefix_sets(N, 16)["edges-and-inside"], seed=1)
    _, residual = dense_scan_forward(s.x, s.b_dec, s.W_dec, s.acts, s.lengths, torch.float64)
    want = dense_scan_backward(residual, s.grad_norms, s.W_dec, s.acts, s.lengths, detach=True)
    got = dense_scan_backward(residual, s.grad_norms, s.W_dec, s.acts, s.lengths, detach=True, launch=launch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_launch_reaches_both_kernels(monkeypatch):
    seen = record_kernel_launches(monkeypatch, dense_scan, ("_dense_scan_forward_kernel", "_dense_scan_backward_kernel"),
                                  ("BLOCK_B", "BLOCK_N", "BLOCK_D", "num_warps"))
    s = _inputs(Prefixes([3, 20, N]))
    tune_dense.run_candidate(DenseLaunch(16, 32, 16, 2), s)
    config = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=16, num_warps=2)
    assert seen == [((3, 4), config), ((3, 4), config)]


@pytest.mark.parametrize("setting, float32_precision", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_products_follow_the_users_matmul_precision(monkeypatch, matmul_precision, setting, float32_precision):
    """TF32 only when the user allows PyTorch's own float32 matmuls it, in both kernels, through the op;
    half and float64 operands compile one build whatever the setting."""
    matmul_precision(setting)
    seen = record_kernel_launches(monkeypatch, dense_scan, ("_dense_scan_forward_kernel", "_dense_scan_backward_kernel"),
                                  ("PRECISION", "num_warps"))
    for dtype in (torch.float32, torch.float64):
        x, acts, W, b = (t.detach().requires_grad_() for t in make_dense_problem(5, 40, 24, dtype))
        matryoshka_loss(x, acts, W, b, Prefixes([7, 24]), backend="triton").loss.backward()
    warps = 4 if float32_precision == "tf32" else 8
    assert [launch for _, launch in seen] == [dict(PRECISION=float32_precision, num_warps=warps)] * 2 + [
        dict(PRECISION="tf32x3", num_warps=4)] * 2
    assert default_launch(torch.float32, 4096, 2304).precision == float32_precision
    _, meta = dense_scan._plan(4096, 2304, *(torch.empty(1, 1, dtype=torch.bfloat16, device="meta"),) * 2,
                               torch.float32, DenseLaunch(32, 16, 64, 4, precision="tf32"))
    assert meta["PRECISION"] == "tf32x3"  # one bf16 build, not one per precision


def test_default_launch_shrinks_to_small_shapes_but_not_below_16():
    assert default_launch(torch.bfloat16, 4096, 2304) == DenseLaunch(32, 16, 64, 4)
    assert default_launch(torch.float32, 4096, 2304, "tf32x3") == DenseLaunch(16, 16, 32, 8)
    assert default_launch(torch.float32, 4096, 2304, "tf32") == DenseLaunch(16, 16, 32, 4, precision="tf32")
    assert default_launch(torch.bfloat16, 3, 20) == DenseLaunch(16, 16, 32, 4)
    assert default_launch(torch.float32, 1, 1, "tf32x3") == DenseLaunch(16, 16, 32, 8)  # float32: >= 32 columns


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows=24, latents=16, cols=16, num_warps=4), "rows must be a power of two >= 16, got 24"),
    (dict(rows=16, latents=8, cols=16, num_warps=4), "latents must be a power of two >= 16, got 8"),
    (dict(rows=16, latents=16, cols=48, num_warps=4), "cols must be a power of two >= 16, got 48"),
    (dict(rows=16, latents=16, cols=16, num_warps=3), "num_warps must be a power of two from 1 to 32, got 3"),
    (dict(rows=16, latents=16, cols=16, num_warps=4, precision="ieee"),
     "precision must be one of ('tf32x3', 'tf32'), got 'ieee'"),
])
def test_bad_launch_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DenseLaunch(**kwargs)


def test_report_builds_float32_at_both_precisions():
    report = pytest.importorskip("matryoshka.kernels.report")
    builds = report._dense_builds([torch.float32], [(4096, 2304)])
    launched = {(b.kernel, b.constexprs["PRECISION"], b.options["num_warps"]) for b in builds if b.launched}
    assert launched == {(kernel, precision, warps) for precision, warps in (("tf32x3", 8), ("tf32", 4))
                        for kernel in ("dense_forward", "dense_backward", "dense_backward_detached")}
    assert all(b.config.startswith("B,N,D=16x16x32 w=") for b in builds)
    assert {b.constexprs["PRECISION"] for b in report._dense_builds([torch.bfloat16], [(4096, 2304)])} == {"tf32x3"}


# ------------------------------------------------------------------------------------- the tuner
def test_tuner_candidates_build_once_each_with_the_default_launched():
    pytest.importorskip("matryoshka.kernels.report")
    builds = tune_dense.candidate_builds(4096, 2304, ["bf16", "fp32"])
    keys = [(b.kernel, b.dtype, repr(sorted(b.constexprs.items())), b.options["num_warps"]) for b in builds]
    assert len(keys) == len(set(keys)) and not any("detached" in b.kernel for b in builds)
    launched = [b for b in builds if b.launched]
    assert {(b.dtype, b.kernel) for b in launched} == {(dtype, kernel) for dtype in (torch.bfloat16, torch.float32)
                                                       for kernel in ("dense_forward", "dense_backward")}
    # Every tile of every phase: the tiles phase at the default precision, the tf32 phase's candidates.
    per_dtype = {"bf16": len(tune_dense.HALF_TILES),
                 "fp32": len(tune_dense.FLOAT32_TILES) * 2 + len(tune_dense.TF32_TILES)}
    assert len(builds) == 2 * sum(per_dtype.values())


def test_a_tf32_candidate_may_differ_by_tf32_rounding_only():
    expected = (torch.zeros(1, dtype=torch.float32),)
    assert tune_dense._tolerance(DenseLaunch(16, 16, 32, 4, precision="tf32"), expected) == tune_dense.TF32_TOLERANCE
    assert tune_dense._tolerance(DenseLaunch(16, 16, 32, 4), expected) == 1e-4
    assert tune_dense._tolerance(DenseLaunch(16, 16, 32, 4), (expected[0].double(),)) == 1e-9


def test_tuner_end_to_end_times_both_phases_and_both_references(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_dense, "FLOAT32_TILES", [(16, 16, 32, 8), (16, 16, 16, 4)])
    monkeypatch.setattr(tune_dense, "TF32_TILES", [(32, 16, 32, 4)])
    rc = tune_dense.main(["--device", DEVICE, "--B", "20", "--d", "40", "--n", "40", "--G", "4", "n",
                          "--dtypes", "fp32", "--rounds", "3", "--results", str(tmp_path)])
    assert rc == 0
    [json_file] = tmp_path.glob("tune_dense_*.json")
    doc = json.loads(json_file.read_text())
    records = doc["by_dtype"]["fp32"]
    phases = {(r["phase"], r["launch"]["precision"]) for r in records}
    assert phases == {("tiles", "tf32x3"), ("tf32", "tf32")}
    assert len(records) == 5  # two tiles, each again at tf32, and the tf32-only tile
    assert all(math.isfinite(r["score_s"]) and set(r["per_g"]) == {"4", "n"} for r in records)
    assert all(r["vs_decode"] > 0 and r["vs_torch_scan"] > 0 for r in records)
    assert set(doc["references"]["fp32"]) == {"4", "n"}
    assert all(ref["decode_s"] > 0 and ref["torch_scan_s"] > 0 for ref in doc["references"]["fp32"].values())
    default = [r for r in records if r["launch"] == dict(rows=16, latents=16, cols=32, num_warps=8, precision="tf32x3")]
    assert len(default) == 1 and default[0]["speedup_vs_default"] == 1.0
    text = (tmp_path / json_file.name.replace(".json", ".md")).read_text()
    header, rule = text.split("\n## fp32\n\n")[1].split("\n\n")[1].splitlines()[:2]
    assert header.count("|") == rule.count("|") and "| tiles | 16x16x32 | 8 | tf32x3 |" in text
    assert "Best: `DenseLaunch(" in text
