"""The launches the launch tests run besides the defaults (tests/test_sparse_launch.py and
tests/test_dense_launch.py), in a module free of the suite's conftest, so that a process without
``TRITON_INTERPRET`` can build them for sm_90: ``python -m tests.launches`` compiles every float64
build those tests launch on a GPU and fails if one does not compile.  tests/test_kernels_report.py runs
it; CI runs the suite with this machine's Triton and with the H200 image's, so a GPU session meets no
launch test its compiler refuses."""

from __future__ import annotations

import sys

import torch

from matryoshka.kernels.dense_scan import DenseLaunch
from matryoshka.kernels.sparse_scan import SparseLaunch

SPARSE_LAUNCHES = [
    SparseLaunch(16, num_warps=1),  # many chunks, the last one masked
    SparseLaunch(32, num_warps=2, loop_stages=3),
    SparseLaunch(64, num_warps=8, loop_stages=2, atomic_sem="acq_rel"),
    SparseLaunch(128, num_warps=4, loop_stages=4),  # one chunk wider than d
    SparseLaunch(32, dw_mode="sorted"),  # dW_dec by a segmented sum over the slots sorted by latent
    SparseLaunch(128, num_warps=2, loop_stages=2, dw_mode="sorted"),
    # Several rows per program, side by side: ragged counts (random padding, row 3 all padding)
    # inside one program, and a last program with rows past B.
    SparseLaunch(32, rows=2),
    SparseLaunch(16, rows=4, loop_stages=2, dw_mode="sorted"),
    SparseLaunch(64, num_warps=2, rows=8),
]
SPARSE_PROBLEM = (5, 100)  # B, d of the sparse launch tests' problems

DENSE_LAUNCHES = [
    DenseLaunch(16, 16, 16, 1),  # several row blocks and column chunks, the last of each masked
    DenseLaunch(32, 16, 32, 2),
    DenseLaunch(16, 32, 16, 4),  # 32-latent tiles: other boundaries fall inside them
    DenseLaunch(64, 16, 64, 8),  # one block taller than B and wider than d
    DenseLaunch(16, 16, 32, 4, precision="tf32"),  # float64 operands ignore the precision
]
DENSE_PROBLEM = (37, 50, 70)  # B, d, n of the dense launch tests' problems


def float64_builds() -> list:
    """``report.Build`` of every kernel the launches above run on float64 inputs, each distinct build
    once (both ``ATOMIC`` variants of the dense kernels, whichever these shapes pick)."""
    from benchmarks.tune import distinct_builds
    from matryoshka.kernels import report

    sparse = [b for launch in SPARSE_LAUNCHES for b in report._sparse_builds([torch.float64], [SPARSE_PROBLEM], launch)]
    dense = [b for launch in DENSE_LAUNCHES
             for b in report._dense_builds([torch.float64], [DENSE_PROBLEM[:2]], launch=launch)]
    return distinct_builds(sparse + dense)


if __name__ == "__main__":
    from benchmarks.tune import acq_rel_by_design, compile_report

    sys.exit(compile_report(float64_builds, jobs=2, fenced_by_design=acq_rel_by_design))
