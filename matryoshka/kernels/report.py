"""Ahead-of-time sm_90 build report of every Triton kernel: registers, spills, shared memory, fences.

No GPU is needed: Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``) with its bundled
``ptxas``, and the bundled ``cuobjdump`` reads the register count and stack frame off the cubin.
Every kernel (sparse and dense, forward and backward) is built at every supported dtype (float64,
float32, float16, bfloat16) and at the block configurations the host functions pick for small and
large shapes, through the host functions' own planning code (``sparse_scan._launch_meta``,
``dense_scan._plan``), so the report builds what launches.  Dense kernels are built in both their
``ATOMIC`` variants (per-chunk buffer, or atomics into one), float32 ones at both precisions
(``tf32x3``, and ``tf32``, which runs when the user allows PyTorch's matmuls TF32), and both backward
kernels in both ``DETACH`` variants (detached levels or not), each launched backward also as its
frozen-decoder twin (``NEEDS_DW`` off: what runs when ``W_dec`` needs no gradient).  Launches other than the host's default (the sparse
tuner's candidates, among them the sorted-``dW_dec`` segment sum, which only ``dw_mode="sorted"``
launches) are built by ``python -m benchmarks.tune --compile-only`` through ``_sparse_builds``.

Checks (exit status 1 if any fails):

* no atomic is fenced: no ``membar``/``fence.{sc,acq_rel,acquire,release}`` in a kernel with atomics,
  and no ``.acquire``/``.release``/``.acq_rel`` on an ``atom``/``red``.  A sum needs no ordering
  (the kernels pass ``sem="relaxed"``); the ``fence.proxy.async``/``wgmma.fence`` of tensor-core
  products are not memory fences and are not counted.
* a frozen-decoder build has fewer atomics than its training twin and, where that has matrix
  products (``dots``: ``tt.dot`` in the TTGIR, a ``tf32x3`` product counting three), fewer of them:
  the ``dW_dec`` work is gone, not only its stores.
* no spill (a non-empty stack frame: Triton kernels keep no local arrays, so stack is spill) in a
  float32, float16 or bfloat16 build.  Float64 spills are reported but do not fail, and neither does
  a variant the host does not launch at that shape (shown as "not picked: ...") nor a frozen-decoder
  build.  (The detached dense backward spills for a frozen decoder at the training tiles, though it
  does less work: 32 B in float32 ``tf32x3`` with Triton 3.9, 8 B and, in float16/bfloat16, 64 B
  with 3.6; 16-column float32 tiles do not spill but read the activations twice as often, so the
  frozen build keeps the training launch.)

Run ``python -m matryoshka.kernels.report`` (``--quick``: each kernel at its largest configuration
only).  Under ``TRITON_INTERPRET=1`` the ``@triton.jit`` functions are interpreter objects that
cannot be compiled, so the report then re-runs itself in a subprocess without that variable.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "Build", "Result", "builds", "atomics_and_fences", "compile_build", "compile_all", "format_table", "main",
]

TARGET = ("cuda", 90, 32)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# (rows, d) of the small shape (the smallest tiles the host picks) and the large one (the largest).
SMALL, LARGE = (1, 16), (4096, 2304)
N_LATENTS = 36864
FROZEN_DECODER = "_frozen_decoder"  # kernel-name suffix of a backward built for a frozen decoder
_PTR_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
              torch.int64: "i64", torch.int32: "i32"}

_ATOMIC_LINE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)\.", re.M)
_ORDERED_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)\.\S*\.(?:acq_rel|acquire|release)\b", re.M)
_MEMORY_FENCE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:membar\.|fence\.(?:sc|acq_rel|acquire|release)\b)", re.M)
# A matrix product in the TTGIR (Triton's last IR before LLVM): how many products a build does per tile,
# a tf32x3 product counting three.  Not the PTX's mma instructions: their count follows the layout
# the compiler picks (warps per tile), which changes when other products go.
_DOT = re.compile(r"=\s*(?:tt\.dot|ttng\.warp_group_dot)\s")


@dataclass(frozen=True)
class Build:
    """One kernel specialisation: the ``@triton.jit`` function, its argument types and constants."""

    kernel: str
    dtype: torch.dtype
    config: str
    fn: object
    pointers: dict  # pointer argument name -> torch dtype of what it points to
    constexprs: dict
    options: dict = field(default_factory=dict)
    launched: bool = True  # whether the host functions pick this variant for this shape

    def signature(self) -> tuple[dict, dict]:
        """``(signature, attrs)`` for ``ASTSource``: pointers typed, other runtime arguments i32;
        pointers, ``d``, ``n`` and strides marked 16-divisible, as a launch on aligned tensors does."""
        signature, attrs = {}, {}
        for index, name in enumerate(self.fn.arg_names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                continue
            signature[name] = "*" + _PTR_TYPES[self.pointers[name]] if name.endswith("_ptr") else "i32"
            if name.endswith("_ptr") or name in ("d", "n") or name.startswith("stride"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        return signature, attrs


@dataclass(frozen=True)
class Result:
    build: Build
    registers: int
    spill_bytes: int
    shared_bytes: int
    atomics: int
    fenced: bool
    products: int = 0  # matrix products in the TTGIR (``_DOT``)

    @property
    def stats(self) -> tuple:
        """Everything but the build, as a worker process sends it back (``Result(build, *stats)``)."""
        return self.registers, self.spill_bytes, self.shared_bytes, self.atomics, self.fenced, self.products

    @property
    def failures(self) -> list[str]:
        out = []
        if self.fenced:
            out.append("fenced atomic")
        if self.spill_bytes and self.build.dtype != torch.float64 and not self.build.kernel.endswith(FROZEN_DECODER):
            out.append(f"{self.spill_bytes} B spilled")
        return out


def _sparse_builds(dtypes, shapes, launch=None) -> list[Build]:
    """The sparse kernels at ``launch`` (``None``: the host's ``default_launch`` for each shape)."""
    from . import sparse_scan

    out = []
    for dtype in dtypes:
        for _, d in shapes:
            acc, _, meta = sparse_scan._launch_meta(d, dtype, launch)
            meta = dict(meta)
            options = dict(num_warps=meta.pop("num_warps"))
            config = f"BLOCK_D={meta['BLOCK_D']} (d={d})"
            if launch is not None:
                config += f" R={meta['ROWS']} w={options['num_warps']} s={meta['LOOP_STAGES']} {meta['ATOMIC_SEM']}"
                config += " sorted" * meta["SORTED_DW"]
            out.append(Build(
                "sparse_forward", dtype, config, sparse_scan._sparse_scan_forward_kernel,
                dict(x_ptr=dtype, bias_ptr=dtype, w_ptr=dtype, values_ptr=dtype, indices_ptr=torch.int64,
                     counts_ptr=torch.int32, norms_ptr=acc, residual_ptr=acc),
                dict(HAS_BIAS=True, **sparse_scan._forward_meta(meta)), options))
            for detach in (False, True):
                out.append(Build(
                    "sparse_backward" + "_detached" * detach, dtype, config, sparse_scan._sparse_scan_backward_kernel,
                    dict(residual_ptr=acc, grad_norms_ptr=acc, grad_level_ptr=acc, levels_ptr=torch.int64,
                         w_ptr=dtype, values_ptr=dtype, indices_ptr=torch.int64, counts_ptr=torch.int32,
                         dx_ptr=acc, dvalues_ptr=acc, dw_ptr=acc),
                    dict(DETACH=detach, NEEDS_DW=True, NEEDS_DVALUES=True, **meta), options))
            if meta["SORTED_DW"]:
                out.append(Build(
                    "sparse_dw_segment_sum", dtype, config, sparse_scan._dw_segment_sum_kernel,
                    dict(slot_rows_ptr=acc, order_ptr=torch.int64, starts_ptr=torch.int64, dw_ptr=acc),
                    dict(ACC=meta["ACC"], BLOCK_D=meta["BLOCK_D"]), options))
    return out


def _dense_builds(dtypes, shapes, num_prefixes: int = 8, launch=None) -> list[Build]:
    """The dense kernels at ``launch`` (``None``: the host's ``default_launch`` for each shape, for
    float32 operands at both precisions: which one runs follows the user's matmul precision)."""
    from . import dense_scan

    out = []
    for dtype in dtypes:
        for num_rows, d in shapes:
            if launch is not None:
                launches = [launch]
            else:
                precisions = dense_scan.PRECISIONS if dtype == torch.float32 else dense_scan.PRECISIONS[:1]
                launches = [dense_scan.default_launch(dtype, num_rows, d, p) for p in precisions]
            for each in launches:
                out += _dense_builds_at(each, dtype, num_rows, d, num_prefixes)
    return out


def _dense_builds_at(launch, dtype, num_rows, d, num_prefixes) -> list[Build]:
    """Both dense kernels at one launch on ``dtype`` inputs, in both ``ATOMIC`` variants (the backward
    also in both ``DETACH`` ones), each marked launched when the host picks that variant at this shape."""
    from ..precision import compute_dtype
    from . import dense_scan

    acts = torch.empty(num_rows, N_LATENTS, dtype=dtype, device="meta")
    W_dec = torch.empty(N_LATENTS, d, dtype=dtype, device="meta")
    acc = compute_dtype(acts, W_dec)
    grid, meta = dense_scan._plan(num_rows, d, acts, W_dec, acc, launch)
    meta = dict(meta)
    options = dict(num_warps=meta.pop("num_warps"))
    picked = {
        "forward": dense_scan._chunk_shares(grid[1], num_rows, num_prefixes, d, acc, "meta")[1],
        "backward": dense_scan._chunk_shares(grid[1], num_rows, N_LATENTS, d, acc, "meta")[1],
    }
    tiles = f"{meta['BLOCK_B']}x{meta['BLOCK_N']}x{meta['BLOCK_D']} w={options['num_warps']}"
    if dtype == torch.float32:
        tiles += f" {meta['PRECISION']}"
    out = []
    for atomic in (False, True):
        config = f"B,N,D={tiles} ATOMIC={int(atomic)} (B={num_rows}, d={d})"
        out.append(Build(
            "dense_forward", dtype, config, dense_scan._dense_scan_forward_kernel,
            dict(x_ptr=dtype, bias_ptr=dtype, w_ptr=dtype, acts_ptr=dtype, table_ptr=torch.int32,
                 norms_ptr=acc, residual_ptr=acc),
            dict(HAS_BIAS=True, ATOMIC=atomic, **meta), options, picked["forward"] == atomic))
        for detach in (False, True):
            out.append(Build(
                "dense_backward" + "_detached" * detach, dtype, config, dense_scan._dense_scan_backward_kernel,
                dict(residual_ptr=acc, grad_norms_ptr=acc, w_ptr=dtype, acts_ptr=dtype,
                     table_ptr=torch.int32, dx_ptr=acc, dacts_ptr=acc, dw_ptr=acc),
                dict(DETACH=detach, ATOMIC=atomic, NEEDS_DW=True, NEEDS_DACTS=True, **meta), options,
                picked["backward"] == atomic))
    return out


def _frozen_decoder_twins(training: list[Build]) -> list[Build]:
    """Each launched backward build again with ``NEEDS_DW`` off: what runs when ``W_dec`` needs no
    gradient."""
    return [replace(b, kernel=b.kernel + FROZEN_DECODER, constexprs={**b.constexprs, "NEEDS_DW": False})
            for b in training if b.launched and b.constexprs.get("NEEDS_DW")]


def builds(quick: bool = False) -> list[Build]:
    """Every kernel at every dtype, small and large shapes, both ``ATOMIC`` variants, and the
    frozen-decoder twin of every launched backward; ``quick``: each kernel and dtype once, at the
    large shape (the largest tiles) in the variant that launches."""
    if quick:
        training = [b for b in _sparse_builds(DTYPES, (LARGE,)) + _dense_builds(DTYPES, (LARGE,)) if b.launched]
    else:
        training = _sparse_builds(DTYPES, (SMALL, LARGE)) + _dense_builds(DTYPES, (SMALL, LARGE))
    return training + _frozen_decoder_twins(training)


def frozen_decoder_failures(results: list[Result]) -> list[str]:
    """A frozen-decoder build must drop its ``dW_dec`` work: fewer atomics than its training twin,
    and, where the twin has tensor-core products, fewer of those (the ``dW_dec`` products are dead
    code once their atomics are gone)."""
    training = {(r.build.kernel, r.build.dtype, r.build.config): r for r in results}
    out = []
    for r in results:
        if not r.build.kernel.endswith(FROZEN_DECODER):
            continue
        twin = training[(r.build.kernel.removesuffix(FROZEN_DECODER), r.build.dtype, r.build.config)]
        name = f"{r.build.kernel} {_PTR_TYPES[r.build.dtype]} {r.build.config}"
        if r.atomics >= twin.atomics:
            out.append(f"{name}: {r.atomics} atomics, the training build {twin.atomics}")
        if twin.products and r.products >= twin.products:
            out.append(f"{name}: {r.products} matrix products, the training build {twin.products}")
    return out


def _compile_nth(quick: bool, index: int) -> tuple:
    """Worker: compile ``builds(quick)[index]`` (JIT functions do not pickle; indices do)."""
    return compile_build(builds(quick)[index]).stats


def compile_all(quick: bool = False, jobs: int = 1) -> list[Result]:
    """``compile_build`` over ``builds(quick)``, in ``jobs`` processes."""
    todo = builds(quick)
    if jobs <= 1:
        return [compile_build(b) for b in todo]
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(jobs) as pool:
        stats = list(pool.map(partial(_compile_nth, quick), range(len(todo))))
    return [Result(b, *s) for b, s in zip(todo, stats)]


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of the cubin's one function, read by the bundled ``cuobjdump``."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.check_output([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], text=True)
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    return int(usage.group(1)), int(usage.group(2))


def atomics_and_fences(ptx: str) -> tuple[int, bool]:
    """``(atomic instructions, whether any is fenced)`` in PTX: an ordered ``atom``/``red``, or a
    memory fence in a kernel that has atomics (tensor-core ``fence.proxy``/``wgmma.fence`` aside)."""
    atomics = len(_ATOMIC_LINE.findall(ptx))
    return atomics, bool(_ORDERED_ATOMIC.search(ptx)) or (atomics > 0 and bool(_MEMORY_FENCE.search(ptx)))


def compile_build(build: Build) -> Result:
    """Compile ``build`` for sm_90 and read its resources and fences."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, attrs = build.signature()
    source = triton.compiler.ASTSource(fn=build.fn, signature=signature, constexprs=build.constexprs,
                                       attrs=attrs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        compiled = triton.compile(source, target=GPUTarget(*TARGET), options=build.options)
    registers, stack = _resource_usage(compiled.asm["cubin"])
    return Result(build, registers, stack, compiled.metadata.shared, *atomics_and_fences(compiled.asm["ptx"]),
                  len(_DOT.findall(compiled.asm["ttgir"])))


def format_table(results: list[Result]) -> str:
    header = ("kernel", "dtype", "config", "regs", "spill B", "smem B", "atomics", "dots", "fenced", "status")
    rows = [header]
    for r in results:
        b = r.build
        status = "ok" if b.launched else "ok (not picked)"
        if r.failures:
            status = ("FAIL: " if b.launched else "not picked: ") + ", ".join(r.failures)
        rows.append((b.kernel, _PTR_TYPES[b.dtype], b.config, str(r.registers), str(r.spill_bytes),
                     str(r.shared_bytes), str(r.atomics), str(r.products), "yes" if r.fenced else "no", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matryoshka.kernels.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="each kernel and dtype at its largest tiles only")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    args = parser.parse_args(argv)
    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "matryoshka.kernels.report", f"--jobs={args.jobs}",
                   *(["--quick"] if args.quick else [])]
        return subprocess.run(command, env=env).returncode
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:  # pragma: no cover - an old or partial Triton
        print(f"ahead-of-time compilation unavailable: {e}", file=sys.stderr)
        return 2
    results = compile_all(args.quick, args.jobs)
    print(f"sm_{TARGET[1]} ahead-of-time builds (spill B: stack frame bytes; smem B: dynamic shared memory)")
    print(format_table(results))
    # A variant the host never launches for that shape (a one-chunk ATOMIC build) is shown, not failed.
    failed = [r for r in results if r.failures and r.build.launched]
    frozen = frozen_decoder_failures(results)
    for line in frozen:
        print(f"FAIL frozen decoder: {line}")
    fp64_spills = [r for r in results if r.spill_bytes and r.build.dtype == torch.float64]
    if fp64_spills:
        print(f"note: {len(fp64_spills)} float64 build(s) spill (reported, not a failure)")
    frozen_spills = [r for r in results if r.spill_bytes and r.build.kernel.endswith(FROZEN_DECODER)
                     and r.build.dtype != torch.float64]
    if frozen_spills:
        print(f"note: {len(frozen_spills)} frozen-decoder build(s) spill (reported, not a failure)")
    print(f"{len(results)} builds, {len(failed) + len(frozen)} failing")
    return 1 if failed or frozen else 0


if __name__ == "__main__":
    sys.exit(main())
