"""The sm_90 ahead-of-time build report (``make kernels-report``): no fenced atomic, no spill outside
float64.  Compiles every kernel at every dtype at its largest tiles (``--quick``; the make target
builds the full grid) in a subprocess without ``TRITON_INTERPRET``, which would turn the kernels
into interpreter objects that cannot be compiled."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

report = pytest.importorskip("matryoshka.kernels.report")
ROOT = Path(__file__).resolve().parent.parent


def test_fence_detection():
    relaxed = "\t@%p1 atom.global.gpu.relaxed.add.f32 %r1, [ %rd1 + 0 ], %r2;\n"
    tensor_core = "\tfence.proxy.async.shared::cta;\n\twgmma.fence.sync.aligned;\n"
    assert report.atomics_and_fences(relaxed + tensor_core) == (1, False)
    assert report.atomics_and_fences(relaxed.replace("relaxed", "acq_rel")) == (1, True)
    assert report.atomics_and_fences("\tred.global.release.gpu.add.f32 [%rd1], %r2;\n") == (1, True)
    assert report.atomics_and_fences(relaxed + "\tmembar.gl;\n") == (1, True)
    assert report.atomics_and_fences(relaxed + "\tfence.acq_rel.gpu;\n") == (1, True)
    assert report.atomics_and_fences("\tmembar.gl;\n") == (0, False)  # no atomic to fence


def _compile_for_sm90(module: str, *args: str) -> str:
    """``python -m module args`` without ``TRITON_INTERPRET``, from the repository root: its output,
    after checking that it exited 0 (skipped where Triton cannot compile ahead of time)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"ahead-of-time compilation unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_sm90_builds_have_no_fenced_atomics_and_no_spills():
    assert " builds, 0 failing" in _compile_for_sm90("matryoshka.kernels.report", "--quick")


def test_the_launch_tests_float64_builds_compile_for_sm90():
    """The launch tests run these launches in float64 on a GPU: each of their builds compiles for
    sm_90 (CI runs this with this machine's Triton and with the H200 image's)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the launch tests compile these builds themselves")
    from tests import launches

    assert f"{len(launches.float64_builds())} builds, 0 failing" in _compile_for_sm90("tests.launches")


def test_a_frozen_decoder_build_must_drop_its_dw_work():
    """The frozen-decoder check pairs each twin with its training build: fewer atomics, and fewer
    products where the training build has any."""
    def result(kernel, atomics, products, dtype=torch.float32):
        build = report.Build(kernel, dtype, "cfg", fn=None, pointers={}, constexprs={})
        return report.Result(build, 64, 0, 0, atomics, False, products)

    training = [result("dense_backward", 2, 33), result("sparse_backward", 2, 0)]
    dropped = [result("dense_backward_frozen_decoder", 1, 21), result("sparse_backward_frozen_decoder", 0, 0)]
    assert report.frozen_decoder_failures(training + dropped) == []
    kept_products = [result("dense_backward_frozen_decoder", 1, 33), result("sparse_backward_frozen_decoder", 0, 0)]
    [failure] = report.frozen_decoder_failures(training + kept_products)
    assert "33 matrix products" in failure
    kept_atomics = [result("dense_backward_frozen_decoder", 1, 21), result("sparse_backward_frozen_decoder", 2, 0)]
    [failure] = report.frozen_decoder_failures(training + kept_atomics)
    assert failure.startswith("sparse_backward_frozen_decoder") and "2 atomics" in failure
