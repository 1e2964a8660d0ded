"""A small forward+backward of both Triton kernels, for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m benchmarks.sanitize
    TRITON_INTERPRET=1 python -m benchmarks.sanitize --device cpu --quick   # a dry run in the interpreter

The cases cover what an out-of-bounds access would hide behind: a ``d`` below one block and one just
over the largest ``BLOCK_D`` (a masked tail chunk), padding slots and a whole padding row, every
prefix and a few groups, detached levels, and float32 and bfloat16 inputs, for the sparse kernel
(``SparseActs``) and the dense one (``(B, n)`` activations).  Each case is also checked against the
reference backend, so a clean memcheck run is a run that computed the right numbers.  Then the sparse
host functions at two tuning launches the op does not use by default (``LAUNCHES``: a pipelined slot
loop, whose ``cp.async`` copies are masked like its loads, and the sorted ``dW_dec`` with its slot-row
buffer and segment sum), each against the default launch on the same inputs.  ``--quick``
keeps the smallest shape in float32 without detached levels (the interpreter is slow); on the CPU the
dense kernel's bfloat16 cases are left out, since the interpreter's bfloat16 ``tl.dot`` is wrong.

Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (``benchmarks.gpu_run`` does): PyTorch's caching
allocator carves tensors out of larger blocks, inside which memcheck sees no out-of-bounds access.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.kernels.sparse_scan import SparseLaunch
from matryoshka.scan_layout import SortedActs

from .baselines import densify
from .checks import _problem, rel_err
from .tune import Inputs, run_candidate

# (B, d, n, k): d = 96 fits one block; d = 1100 needs a second, masked chunk beyond BLOCK_D = 1024.
SHAPES = [(6, 96, 300, 8), (5, 1100, 257, 5)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Relative error against the float64 reference, scaled by the reference's largest magnitude.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
# Launches that differ from the default only in the order of float32 additions.
LAUNCHES = [SparseLaunch(256, num_warps=2, loop_stages=3), SparseLaunch(256, num_warps=2, loop_stages=3, dw_mode="sorted")]
LAUNCH_TOLERANCE = 1e-4


def _run(tensors, indices, prefixes, backend, dense, detach):
    """Per-prefix losses and the gradients of every input, on fresh leaves."""
    x, values, W, b = (t.detach().clone().requires_grad_() for t in tensors)
    if dense:
        acts = densify(SparseActs(values, indices), W.shape[0]).detach().requires_grad_()
        leaves = [x, acts, W, b]
    else:
        acts = SparseActs(values, indices)
        leaves = [x, values, W, b]
    out = matryoshka_loss(x, acts, W, b, prefixes, backend, detach=detach)
    out.loss.backward()
    return [out.per_prefix.detach()] + [t.grad for t in leaves]


def launch_cases(shapes, dtypes, device, detach_options, seed) -> tuple[int, int]:
    """``LAUNCHES`` against the default launch: ``(cases, failures)``."""
    cases = failures = 0
    for (B, d, n, k), (dtype_name, dtype), launch, detach in itertools.product(
            shapes, dtypes.items(), LAUNCHES, detach_options):
        x, values, indices, W, b = _problem(B, n, d, k, dtype, device, seed=seed + cases, pad_fraction=0.25)
        slots = SortedActs(SparseActs(values, indices), n)  # the kernels' layout, as the op hands it over
        grad = torch.rand(B, k + 1, device=device, generator=torch.Generator(device).manual_seed(cases))
        levels = (torch.arange(k, device=device) * 3 // k).expand(B, -1).contiguous() if detach else None
        inputs = Inputs(x, b, W, slots.values, slots.indices, grad, levels)
        got, want = run_candidate(launch, inputs), run_candidate(None, inputs)
        err = max(rel_err(a, w) for a, w in zip(got, want))
        ok = err <= LAUNCH_TOLERANCE and all(torch.isfinite(a).all() for a in got)
        cases += 1
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} sparse {dtype_name} B={B} d={d} n={n} k={k} {launch} detach={detach}: "
              f"max rel err against the default launch {err:.1e}", flush=True)
    return cases, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sanitize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="the smallest shape, float32, no detached levels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes, dtypes = (SHAPES[:1], {"fp32": torch.float32}) if args.quick else (SHAPES, DTYPES)
    failures = cases = 0
    for (B, d, n, k), (dtype_name, dtype), dense, detach in itertools.product(
            shapes, dtypes.items(), (False, True), (False,) if args.quick else (False, True)):
        if dense and dtype == torch.bfloat16 and device.type == "cpu":
            continue
        # Row 0 and a quarter of the slots are padding, with garbage values the kernels must ignore.
        x, values, indices, W, b = _problem(B, n, d, k, dtype, device, seed=cases, pad_fraction=0.25)
        tensors = [x, values, W, b]
        for prefixes in (Prefixes.every(n), Prefixes.groups([1, n // 3, n])):
            got = _run(tensors, indices, prefixes, "triton", dense, detach)
            want = _run([t.double() for t in tensors], indices, prefixes, "reference", dense, detach)
            err = max(rel_err(a, w) for a, w in zip(got, want))
            ok = err <= TOLERANCE[dtype] and all(torch.isfinite(a).all() for a in got)
            cases += 1
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {'dense ' if dense else 'sparse'} {dtype_name} B={B} d={d} n={n} k={k} "
                  f"G={len(prefixes)} detach={detach}: max rel err {err:.1e}", flush=True)
    more_cases, more_failures = launch_cases(shapes, dtypes, device, (False,) if args.quick else (False, True), cases)
    cases, failures = cases + more_cases, failures + more_failures
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"sanitize: {cases - failures}/{cases} cases agree with the reference (the launch cases: with the default launch)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
