"""Time the dense kernels' launch configurations on a GPU: ``python -m benchmarks.tune_dense``.

Issue 15's tuning list for the dense scan (``matryoshka.kernels.dense_scan.DenseLaunch``): tile
shapes (rows x latents x columns per program) and warps, and for float32 operands ``tf32x3`` (three
TF32 tensor-core products, close to float32; the op's default) against ``tf32`` (one product, what
the op runs when the user allows PyTorch's float32 matmuls TF32).  The design is bound by bytes and
atomics (``dense_scan``'s docstring: 66-133x a decode's bytes at the issue's sizes), so tiles move it
but cannot bring it to the issue's 1.3x of one dense decode; the record says by how much.  Beside the
candidates, on the same inputs: one dense decode forward+backward (``baselines.dense_decode_loss``,
cuBLAS) and the dense PyTorch scan (``dense_prefix_norms_torch``, forward and backward: what ``"auto"`` runs
for dense CUDA activations), so every candidate gets both ratios.

Phases, per dtype (each candidate's outputs checked against the default launch's first; a ``tf32``
candidate may differ by TF32's rounding, and its mismatch is recorded as what TF32 costs):

1. ``tiles``: every tile of ``HALF_TILES`` (half operands) or ``FLOAT32_TILES`` at the default
   precision;
2. ``tf32`` (float32 only): the two fastest tiles and ``TF32_TILES`` (larger tiles, which the
   ``tf32x3`` products' registers do not leave room for) at ``precision="tf32"``.

Prefix sets: 16 equal groups and every latent (G = n): the Gram form's cheapest and dearest cases.
Each candidate's forward and backward host calls (``dense_scan_forward``/``_backward``, allocations
included) are timed with CUDA events, round-robin over a phase's candidates, on two input sets in
turn (each larger than the L2 cache); the score is the sum over the prefix sets of the median
forward+backward.  ``--time-budget-s``: no phase or round starts past it, and what was measured is
kept.  Writes ``tune_dense_<device>.{json,md}`` into ``--results``.

``--dry-run``: tiny sizes on the CPU in the Triton interpreter (set ``TRITON_INTERPRET=1``; float32
only, as bf16 ``tl.dot`` is wrong there), two candidates a phase: it checks the plumbing and each
candidate's outputs, not the speed.  ``--compile-only``: no GPU needed; builds every candidate for
sm_90 and prints its registers and spills.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import partial

import torch

from matryoshka.kernels.dense_scan import (DenseLaunch, default_launch, dense_scan_backward, dense_scan_forward,
                                           op_launch)
from matryoshka.precision import compute_dtype
from matryoshka.torch_scan import dense_prefix_norms_torch

from .baselines import dense_decode_loss, densify
from .harness import DTYPES, make_input_set, median_time, prefix_set
from .tune import (Phases, Tunable, best_launch, compile_report, distinct_builds, fmt, rounding_tolerance, run_tuner,
                   score_cell, timing_cell, tuner_parser)

# (rows, latents, cols, num_warps); the default launch's tiles come first in each list.  Larger row
# and column tiles re-read less (``A`` d/cols times, ``W_dec`` B/rows times) but hold more registers.
# sm_90 builds (``--compile-only``, B = 4096, d = 2304) that spill nothing with Triton 3.9: both
# defaults, bf16 32x16x64 and 32x16x128 on 8 warps, float32 16x16x32 on 4 warps and 16x16x64, and at
# tf32 also 32x16x32, 32x16x64; the others spill 8-72 B and are timed all the same.  Triton 3.6 (the
# H200 image's) spills 8-48 B in some others and fails to compile the float32 tf32 backward with 64
# rows (its TritonGPUPrefetch pass aborts), so no such tile is a candidate.
HALF_TILES = [(32, 16, 64, 4), (32, 16, 64, 8), (64, 16, 64, 4), (64, 16, 64, 8), (32, 16, 128, 8), (128, 16, 64, 8)]
FLOAT32_TILES = [(16, 16, 32, 8), (16, 16, 32, 4), (16, 16, 64, 8), (16, 32, 32, 8)]
TF32_TILES = [(32, 16, 32, 8), (32, 16, 64, 8), (32, 16, 128, 8)]
# A tf32 candidate against the tf32x3 default: TF32 keeps 10 mantissa bits (~5e-4 per rounding).
TF32_TOLERANCE = 5e-2
PREFIX_KINDS = ("16", "n")
# Activations: TopK outputs densified, as the sweep's dense methods take them (the kernels read every
# entry whatever its value, so the density does not change their speed).
K_ACTIVE = 64


@dataclass
class DenseInputs:
    """One input set of the dense kernels, at one prefix set: ``lengths`` on the host (as the op hands
    them over) and an upstream gradient for the ``(B, G)`` norms."""

    x: torch.Tensor
    b_dec: torch.Tensor
    W_dec: torch.Tensor
    acts: torch.Tensor
    lengths: torch.Tensor
    grad_norms: torch.Tensor


def dense_inputs(B: int, n: int, d: int, dtype: torch.dtype, device: torch.device, prefix_kind: str,
                 sets: int = 2) -> list[DenseInputs]:
    """``sets`` input sets (each larger than the L2 cache at the issue's sizes: ``W_dec`` and ``A``
    together ~200 MB in float32 at B = 4096, n = 8192, d = 2304) at the prefix set ``prefix_kind``."""
    lengths = prefix_set(prefix_kind, n).lengths.cpu()
    out = []
    for seed in range(sets):
        s = make_input_set(B, n, d, min(K_ACTIVE, n), dtype, device, seed)
        acc = compute_dtype(s.x, s.W_dec)
        grad = torch.rand(B, lengths.numel(), device=device, dtype=acc) / (B * lengths.numel())
        out.append(DenseInputs(s.x, s.b_dec.detach(), s.W_dec.detach(), densify(s.acts, n).detach(), lengths, grad))
    return out


def _forward(launch: DenseLaunch | None, s: DenseInputs) -> tuple[torch.Tensor, torch.Tensor]:
    acc = compute_dtype(s.x, s.b_dec, s.W_dec, s.acts)
    return dense_scan_forward(s.x, s.b_dec, s.W_dec, s.acts, s.lengths, acc, launch)


def _backward(launch: DenseLaunch | None, s: DenseInputs, saved) -> tuple[torch.Tensor, ...]:
    return dense_scan_backward(saved[1], s.grad_norms, s.W_dec, s.acts, s.lengths, launch=launch)


def _op_launch(s: DenseInputs) -> DenseLaunch:
    return op_launch(*s.x.shape, s.acts, s.W_dec, compute_dtype(s.x, s.b_dec, s.W_dec, s.acts))


def _tolerance(launch: DenseLaunch, expected: tuple[torch.Tensor, ...]) -> float:
    return TF32_TOLERANCE if launch.precision == "tf32" else rounding_tolerance(launch, expected)


DENSE = Tunable(_forward, _backward, _op_launch, _tolerance)


def run_candidate(launch: DenseLaunch | None, s: DenseInputs) -> tuple[torch.Tensor, ...]:
    """Forward then backward at ``launch`` (``None``: the default): ``(norms, residual, dx, dacts, dW_dec)``."""
    return DENSE.outputs(launch, s)


def time_references(sets: list[DenseInputs], device: torch.device, rounds: int) -> dict:
    """Median forward+backward seconds, input sets rotated, of one dense decode
    (``dense_decode_loss``: the issue's "one dense decode forward+backward (cuBLAS)") and of the dense
    PyTorch scan (``dense_prefix_norms_torch``) on the same inputs."""
    leaves = [(s.x, s.acts.clone().requires_grad_(), s.W_dec.clone().requires_grad_(), s.b_dec.clone().requires_grad_(),
               s.lengths, s.grad_norms) for s in sets]

    def inputs(r: int):
        x, A, W, b, lengths, grad = leaves[r % len(leaves)]
        for t in (A, W, b):
            t.grad = None
        return x, A, W, b, lengths, grad

    def decode(r: int) -> None:
        x, A, W, b, _, _ = inputs(r)
        dense_decode_loss(x, A, W, b).backward()

    def torch_scan(r: int) -> None:
        x, A, W, b, lengths, grad = inputs(r)
        (dense_prefix_norms_torch(x, b, W, A, lengths) * grad).sum().backward()

    return {name: median_time(step, device, rounds) for name, step in (("decode_s", decode), ("torch_scan_s", torch_scan))}


def tiles_for(dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The tiles phase's candidates for inputs of ``dtype`` (float32, or a half type)."""
    return FLOAT32_TILES if dtype == torch.float32 else HALF_TILES


def tune_dtype(dtype_name: str, args, device, deadline, echo) -> tuple[list[dict], dict]:
    """``(records, {"references": ...})`` of one dtype: every candidate's times and ratios; the
    decode's and the PyTorch scan's times per prefix set."""
    dtype = DTYPES[dtype_name]
    inputs = {kind: dense_inputs(args.B, args.n, args.d, dtype, device, kind) for kind in args.G}
    phases = Phases(DENSE, inputs, dtype_name, "per_g", args, device, deadline, echo, "tune_dense", args.limit)
    phases.run("tiles", [DenseLaunch(*t) for t in tiles_for(dtype)])
    if dtype == torch.float32:
        phases.run("tf32", [replace(c, precision="tf32") for c in phases.ranked()[:2]]
                   + [DenseLaunch(*t, precision="tf32") for t in TF32_TILES])
    references = {kind: time_references(sets, device, args.rounds) for kind, sets in inputs.items()}
    decode = sum(r["decode_s"] for r in references.values())
    torch_scan = sum(r["torch_scan_s"] for r in references.values())
    records = phases.add_ratios(_op_launch(inputs[args.G[0]][0]), decode=decode, torch_scan=torch_scan)
    return records, {"references": references}


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# Dense kernel launch tuning: {env.get('device_name')}", "",
             f"`{doc['command']}`; torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('git_commit')}; "
             f"B={doc['B']}, d={doc['d']}, n={doc['n']}, prefix sets G in {doc['G']}. Time: median forward / backward "
             "per call (ms), summed over the prefix sets in the score; speed-up on the default launch; the score "
             "over one dense decode's forward+backward (cuBLAS on CUDA, same inputs; issue 15's target: at most 1.3x) and "
             "over the dense PyTorch scan's (what `auto` runs for dense CUDA activations: below 1 means the kernel "
             "should take them); mismatch: largest relative difference from the default launch's outputs.", ""]
    for dtype_name, records in doc["by_dtype"].items():
        refs = doc["references"][dtype_name]
        lines += [f"## {dtype_name}", "",
                  "References, forward+backward ms: " + "; ".join(
                      f"G={g}: one decode {r['decode_s'] * 1e3:.3f}, PyTorch scan {r['torch_scan_s'] * 1e3:.3f}"
                      for g, r in refs.items()), "",
                  "| phase | rows x latents x cols | warps | precision | "
                  + " | ".join(f"G={g} fwd / bwd ms" for g in doc["G"])
                  + " | score ms | speed-up | / one decode | / PyTorch scan | mismatch |",
                  "|" + "---|" * (9 + len(doc["G"]))]
        for r in sorted(records, key=lambda r: r["score_s"]):
            L = r["launch"]
            cells = [timing_cell(r["per_g"].get(g, {})) for g in doc["G"]]
            mismatch = max((c["mismatch"] for c in r["per_g"].values() if "mismatch" in c), default=None)
            lines.append(
                f"| {r['phase']} | {L['rows']}x{L['latents']}x{L['cols']} | {L['num_warps']} | {L['precision']} | "
                + " | ".join(cells) + f" | {score_cell(r)}"
                + f" | {fmt(r['speedup_vs_default'], '.2f', 'x')} | {fmt(r['vs_decode'], '.2f', 'x')}"
                + f" | {fmt(r['vs_torch_scan'], '.2f', 'x')} | {fmt(mismatch, '.1e')} |")
        best = best_launch(records)
        if best and best["speedup_vs_default"]:
            lines += ["", f"Best: `{DenseLaunch(**best['launch'])}`, {best['speedup_vs_default']:.2f}x the default, "
                      f"{best['vs_decode']:.2f}x one decode, {best['vs_torch_scan']:.2f}x the PyTorch scan."]
        lines.append("")
    return "\n".join(lines)


def candidate_builds(B: int, d: int, dtype_names: list[str]) -> list:
    """``report.Build`` of both dense kernels (no detached levels: the tuner does not time them) at
    every launch a phase can pick, each distinct build once; only the op's default is "launched"."""
    from matryoshka.kernels import report

    builds = []
    for name in dtype_names:
        dtype = DTYPES[name]
        default = default_launch(dtype, B, d)
        launches = [DenseLaunch(*t) for t in tiles_for(dtype)]
        if dtype == torch.float32:
            launches += [DenseLaunch(*t, precision="tf32") for t in tiles_for(dtype) + TF32_TILES]
        builds += [replace(b, launched=launch == default) for launch in launches
                   for b in report._dense_builds([dtype], [(B, d)], launch=launch)
                   if b.launched and "detached" not in b.kernel]  # the ATOMIC variant the host picks
    return distinct_builds(builds)


def main(argv=None) -> int:
    p = tuner_parser("python -m benchmarks.tune_dense", __doc__.split("\n")[0], rounds=5, budget_s=60.0,
                     rounds_per="prefix set")
    p.add_argument("--n", type=int, default=8192, help="latents (the dense kernels' time grows with n: 8192 keeps "
                                                       "a phase within seconds)")
    p.add_argument("--G", nargs="+", default=list(PREFIX_KINDS), help="prefix sets (harness.prefix_set kinds)")
    p.add_argument("--limit", type=int, help="at most this many candidates a phase")
    args = p.parse_args(argv)
    if "fp64" in args.dtypes:
        p.error("--dtypes: the dense tuner has candidates for fp32, bf16 and fp16 (float64 has one launch)")
    if args.compile_only:
        return compile_report(partial(candidate_builds, args.B, args.d, args.dtypes), args.jobs)
    if args.dry_run:
        args.device, args.B, args.d, args.n, args.dtypes, args.rounds = "cpu", 20, 40, 48, ["fp32"], 3
        args.limit = args.limit or 2
    return run_tuner(p, args, argv, "tune_dense", tune_dtype, markdown, B=args.B, d=args.d, n=args.n, G=args.G,
                     float32_matmul_precision=torch.get_float32_matmul_precision())


if __name__ == "__main__":
    sys.exit(main())
