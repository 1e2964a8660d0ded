"""Measurement machinery shared by the sweep and the pytest-benchmark suite.

* ``environment()``: device name, library versions, git commit (+ dirty flag): every results file
  embeds it, so nothing in a results file is typed by hand.
* ``make_input_sets()``: several independent input sets to rotate among, so that a repeat never
  finds the previous repeat's inputs hot in the last-level cache (L2 on a GPU, L3 on a CPU).
* ``prefix_set()``: the prefix sets of the sweep (G = 1, 5, 16, 64, n, and the original recipe's 10
  sampled prefixes).
* ``summarize()``: median, quartiles and minimum of the raw per-call times (the sweep times calls
  with CUDA events on a GPU and ``time.perf_counter`` on the CPU, see ``benchmarks.sweep``).
* ``peak_extra_memory()``: the peak memory a forward+backward allocates beyond its inputs.
  CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before.  CPU: there is no
  allocator statistic, so a ``TorchDispatchMode`` tracks every tensor storage that an op creates
  (outputs that do not alias an input) until its last reference dies; the peak of the live total
  is reported.  It counts the forward's saved tensors, the backward's temporaries and the
  gradients; it does not count memory that kernels allocate outside PyTorch tensors (BLAS or
  oneDNN scratch), which is small and independent of the method.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from matryoshka import Prefixes, SparseActs
from matryoshka.durable_files import replace_file

REPO = Path(__file__).resolve().parent.parent

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---------------------------------------------------------------------------------- results files
def write_results_json(stem: Path, doc: dict) -> Path:
    """Write the results document ``doc`` to ``stem``.json (what JSON cannot hold, as its ``str``),
    atomically: a sweep rewrites it after every configuration, and a kill mid-write must leave the
    last whole file.  Not the studies' ``matryoshka.experiments.common.write_json``: that one
    refuses such values and writes NaN as null."""
    path = stem.with_suffix(".json")
    replace_file(path, json.dumps(doc, indent=1, default=str).encode())
    return path


def write_results_text(path: Path, text: str) -> None:
    """Write a results text file (markdown, CSV) atomically."""
    replace_file(path, text.encode())


def write_results(stem: Path, doc: dict, text: str) -> None:
    """Write ``doc`` to ``stem``.json and its markdown ``text`` to ``stem``.md, and print the text."""
    write_results_json(stem, doc)
    write_results_text(stem.with_suffix(".md"), text)
    print(text)


# ------------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def commit_label(env: dict, digits: int = 12) -> str:
    """The commit an ``environment()`` was recorded at, shortened, with " (dirty)" when the work tree
    had changes: how every results file names its code."""
    return f"{(env.get('git_commit') or '?')[:digits]}{' (dirty)' if env.get('git_dirty') else ''}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """A filename-safe device label, e.g. ``cpu-amd-epyc`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    name = device_name(device).lower()
    slug = "".join(c if c.isalnum() else "-" for c in name)
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{device.type}-{slug.strip('-')}"


def git_output(*args: str, cwd: Path = REPO) -> str | None:
    """``git args`` run in ``cwd`` (this repository by default): its output, or ``None`` on failure."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None  # keep porcelain's leading spaces


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # Dirty: a modified tracked file anywhere, or an untracked file in the code that was measured.
    status = git_output("status", "--porcelain", "--", ".", ":!benchmarks/results")
    changed = [] if status is None else [
        line[3:] for line in status.splitlines()
        if not line.startswith("??") or line[3:].startswith(("matryoshka/", "benchmarks/"))
    ]
    env = {
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        # The device tool copies the working tree without .git: GPU_RUN_COMMIT names the commit instead.
        "git_commit": git_output("rev-parse", "HEAD") or os.environ.get("GPU_RUN_COMMIT"),
        "git_dirty": None if status is None else bool(changed),
        "git_dirty_paths": changed[:50],
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
    return env


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class InputSet:
    x: torch.Tensor
    acts: SparseActs
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.acts.values, self.W_dec, self.b_dec]

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def nbytes(self) -> int:
        ts = [self.x, self.acts.values, self.acts.indices, self.W_dec, self.b_dec]
        return sum(t.numel() * t.element_size() for t in ts)


def add_sae_step_arguments(parser, repeats: int) -> None:
    """The command-line sizes shared by the integration benchmarks (one SAE training step of a
    d -> n TopK-family SAE on a batch), with their defaults."""
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=repeats)


def random_topk_indices(B: int, n: int, k: int, device, generator: torch.Generator) -> torch.Tensor:
    """``(B, k)`` distinct uniformly random latents per row, made in row chunks (bounded memory)."""
    out = torch.empty(B, k, dtype=torch.int64, device=device)
    chunk = max(1, (1 << 26) // n)
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        keys = torch.rand(e - s, n, device=device, generator=generator)
        out[s:e] = keys.topk(k, dim=1).indices
    return out


def make_input_set(B, n, d, k, dtype, device, seed) -> InputSet:
    """Random TopK-SAE-like inputs: unit-norm decoder rows, positive activations, grads on the
    activation values, ``W_dec`` and ``b_dec`` (``x`` is data: no grad), as in SAE training."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, d, device=device, generator=g).to(dtype)
    W = torch.randn(n, d, device=device, generator=g)
    W = (W / W.norm(dim=1, keepdim=True)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(d, device=device, generator=g)).to(dtype).requires_grad_()
    values = (torch.rand(B, k, device=device, generator=g) + 0.1).to(dtype).requires_grad_()
    indices = random_topk_indices(B, n, k, device, g)
    return InputSet(x, SparseActs(values, indices), W, b)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation has to defeat (GPU L2; CPU: 32 MiB if unknown)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(l2) or 50 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) << 10 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


def make_input_sets(B, n, d, k, dtype, device, seed=0, max_sets=64, min_sets=2) -> list[InputSet]:
    """Enough independent input sets that together they are >= 3x the last-level cache (so one
    call's inputs are evicted before they come round again), at least ``min_sets``.  Callers give
    every call the next set (a call counter, not a round counter)."""
    device = torch.device(device)
    first = make_input_set(B, n, d, k, dtype, device, seed)
    want = max(min_sets, min(max_sets, math.ceil(3 * cache_bytes(device) / max(1, first.nbytes()))))
    return [first] + [make_input_set(B, n, d, k, dtype, device, seed + 1000 * i) for i in range(1, want)]


# ---------------------------------------------------------------------------------------- prefixes
def prefix_set(kind: str, n: int, seed: int = 0) -> Prefixes:
    """The sweep's prefix sets, all weighted 1/G (G = number of prefixes):

    * ``"1"``: the single prefix n (what a plain SAE scores);
    * ``"5"``: doubling groups n/16, n/8, n/4, n/2, n (Bussmann-style, as in the issue's
      end-to-end groups [2304, ..., 36864]);
    * ``"16"``, ``"64"``, any other integer G < n: G equal-width groups (m_g = round(g n / G));
    * ``"n"`` or G = n: every prefix 1..n;
    * ``"sampled10"``: the original recipe's 10 random prefixes (``Prefixes.sample``).
    """
    if kind == "sampled10":
        return Prefixes.sample(n, min(10, n), generator=torch.Generator().manual_seed(seed))
    G = n if kind == "n" else int(kind)
    if G >= n:
        return Prefixes.every(n, weights=torch.full((n,), 1.0 / n, dtype=torch.float64))
    if G == 5 and n % 16 == 0:
        lengths = [n // 16, n // 8, n // 4, n // 2, n]
    else:
        lengths = sorted({max(1, round(g * n / G)) for g in range(1, G + 1)})
    return Prefixes(lengths, torch.full((len(lengths),), 1.0 / len(lengths), dtype=torch.float64))


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_timer(device: torch.device):
    """A timer's start: a recorded CUDA event, or ``time.perf_counter()`` on the CPU."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start
    return time.perf_counter()


def stop_timer(device: torch.device, start):
    """CPU: the seconds since ``start``.  CUDA: the ``(start, end)`` event pair, for
    :func:`timer_seconds` after a synchronisation (one per round of calls, not one per call)."""
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return start, end
    return time.perf_counter() - start


def timer_seconds(device: torch.device, timer) -> float:
    """The seconds a :func:`stop_timer` result measured (CUDA: once the device is synchronised)."""
    return timer[0].elapsed_time(timer[1]) / 1e3 if device.type == "cuda" else timer


def read_timers(device: torch.device, timers: list) -> list[float]:
    """The seconds of a round's :func:`stop_timer` results, after one synchronisation."""
    sync(device)
    return [timer_seconds(device, timer) for timer in timers]


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, its work finished: CUDA events around it and a
    synchronisation on CUDA, ``time.perf_counter`` on the CPU."""
    start = start_timer(device)
    fn()
    timer = stop_timer(device, start)
    sync(device)
    return timer_seconds(device, timer)


def median_time(step: Callable[[int], object], device: torch.device, rounds: int) -> float:
    """Median seconds of ``step(r)`` (``r``: the call's number, to rotate input sets) over ``rounds``
    calls after one warm-up call."""
    time_call(lambda: step(0), device)  # warm-up: compiles and first touches, not timed
    return statistics.median(time_call(lambda: step(r), device) for r in range(1, rounds + 1))


def summarize(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "q1_s": q[0],
        "q3_s": q[2],
        "min_s": min(times),
        "repeats": len(times),
    }


# ----------------------------------------------------------------------------------------- records
def describe_error(exc: BaseException) -> str:
    """An exception in one line, for a results record (a cell that failed is a result, not a crash)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def find(records: list[dict], **match) -> dict | None:
    """The first record with every ``key == value`` of ``match``, whatever its status."""
    return next((r for r in records if all(r.get(key) == value for key, value in match.items())), None)


def find_ok(records: list[dict], **match) -> dict | None:
    """The first record with every ``key == value`` of ``match`` that was measured (status ``ok``)."""
    return find(records, status="ok", **match)


def ratio(a: dict | None, b: dict | None, stat: str = "median_s") -> float | None:
    """``a[stat] / b[stat]`` of two timing records, ``None`` when either was not measured."""
    return None if a is None or b is None else a[stat] / b[stat]


def paired_ratio(a: dict | None, b: dict | None) -> float | None:
    """Median over rounds of the per-round time ratio (records timed in the same rounds)."""
    if a is None or b is None or "times_s" not in a or "times_s" not in b:
        return None
    pairs = list(zip(a["times_s"], b["times_s"]))
    return statistics.median(x / y for x, y in pairs) if pairs else None


# ------------------------------------------------------------------------------------------ memory
class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still referenced.

    Every op's outputs whose storage is not one of its inputs' storages are new allocations; a
    weak reference on each storage removes it from the live total when it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self.live:
                continue
            nbytes = st.nbytes()
            self.live[key] = nbytes
            self._refs[key] = weakref.ref(st, lambda _, key=key: self._freed(key))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def peak_extra_memory(step: Callable[[InputSet], None], inputs: InputSet, device: torch.device) -> tuple[int, str]:
    """``(bytes, how)``: the peak memory one forward+backward allocates beyond its inputs."""
    device = torch.device(device)
    inputs.clear_grads()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(inputs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        how = "torch.cuda.max_memory_allocated - memory_allocated before the call"
    else:
        tracker = LiveTensorTracker()
        with tracker:
            step(inputs)
        peak = tracker.peak
        how = "peak live bytes of tensor storages created by aten ops (TorchDispatchMode tracker)"
    inputs.clear_grads()
    return int(peak), how


# --------------------------------------------------------------------------------- cost / skipping
_RATE_CACHE: dict[tuple, tuple[float, float]] = {}


def calibrate(device: torch.device, dtype: torch.dtype) -> tuple[float, float, float]:
    """``(flops_per_s, seconds_per_op, bytes_per_s)`` of this device, each timed once and cached:
    a mid-sized GEMM, a chain of tiny ops run forward and backward through autograd (the fixed
    cost of one op in the per-group Python loops, backward included) and a large copy."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _RATE_CACHE:
        size = 1024 if device.type == "cpu" else 4096
        a = torch.randn(size, size, device=device).to(dtype)
        for _ in range(2):
            a @ a
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        sync(device)
        rate = 3 * 2 * size**3 / (time.perf_counter() - t0)
        leaf = torch.randn(16, 16, device=device, requires_grad=True)
        chain = 100
        for repeat in range(2):
            t0 = time.perf_counter()
            y = leaf
            for _ in range(chain):
                y = y * 1.0001 + leaf
            y.sum().backward()
            sync(device)
            per_op = (time.perf_counter() - t0) / (2 * chain)
        src, dst = torch.ones(1 << 24, device=device), torch.zeros(1 << 24, device=device)
        dst.copy_(src)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        sync(device)
        bandwidth = 3 * 2 * src.numel() * 4 / (time.perf_counter() - t0)
        _RATE_CACHE[key] = (rate, per_op, bandwidth)
    return _RATE_CACHE[key]


def estimate(method, B, n, d, k, prefixes, dtype, device) -> tuple[float, int]:
    """``(seconds, extra bytes)`` a forward+backward of ``method`` is expected to take."""
    elem = torch.empty(0, dtype=dtype).element_size()
    flops, extra, ops, *streamed = method.cost(B, n, d, k, prefixes.lengths.tolist(), elem)
    rate, per_op, bandwidth = calibrate(device, dtype)
    # Every byte held for the backward is written once and read about twice more.
    return flops / rate + ops * per_op + (3 * extra + sum(streamed)) / bandwidth, int(extra)


def memory_budget(device: torch.device) -> int:
    """Bytes one measurement may use: 60% of free GPU memory; on the CPU 25% of the available host
    memory, at most 3 GiB (a G x B x d stack of that size takes tens of seconds to page in)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return min(3 << 30, int(line.split()[1]) * 1024 // 4)
    except OSError:
        pass
    return 2 << 30
