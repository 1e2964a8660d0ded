"""pytest-benchmark suite configuration: ``pytest benchmarks --benchmark-only``.

CPU: small sizes, single-threaded by default (``BENCH_THREADS=2`` to change; on a shared machine
OpenMP barrier stalls inflate multi-threaded timings).  CUDA: the issue's real sizes; every timed
call ends with ``torch.cuda.synchronize()`` so that pytest-benchmark's wall clock is the GPU time.
Every method is checked against ``matryoshka.reference`` (session fixture) before any is timed, and
the JSON that ``--benchmark-json`` writes carries the device, library versions and git commit.
"""

from __future__ import annotations

import os

import pytest
import torch

from .baselines import methods_for
from .checks import check_methods
from .harness import DTYPES, device_name, environment, make_input_sets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

SIZES = {
    "cpu": dict(B=256, d=256, n=1024, k=32, dtypes=["fp32"]),
    "cuda": dict(B=4096, d=2304, n=65536, k=32, dtypes=["fp32", "bf16"]),  # issue 15 (flex-sae's F, D)
}[DEVICE.type]
E2E_SIZES = {
    "cpu": dict(B=256, d=256, n=4096, k=32),
    "cuda": dict(B=4096, d=2304, n=65536, k=32),
}[DEVICE.type]
MAX_CALL_S = {"cpu": 2.0, "cuda": 1.0}[DEVICE.type]  # skip cells estimated slower than this
ROUND_BUDGET_S = {"cpu": 0.5, "cuda": 0.5}[DEVICE.type]  # timed seconds per benchmark


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def checked_methods() -> dict[str, dict]:
    """Every method of this device against the reference; a benchmark of a method that failed fails."""
    return {r["method"]: r for r in check_methods(methods_for(DEVICE.type), DEVICE)}


@pytest.fixture(scope="session")
def input_sets():
    """``input_sets(dtype_name)``: rotating input sets at the suite's sizes, made once per dtype."""
    cache: dict[str, list] = {}

    def get(dtype_name: str):
        if dtype_name not in cache:
            cache.clear()  # one dtype's sets at a time (GPU memory)
            s = SIZES
            cache[dtype_name] = make_input_sets(s["B"], s["n"], s["d"], s["k"], DTYPES[dtype_name], DEVICE)
        return cache[dtype_name]

    return get


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["matryoshka_device"] = device_name(DEVICE)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["matryoshka_environment"] = environment(DEVICE)
    output_json["matryoshka_sizes"] = {"loss": SIZES, "e2e": E2E_SIZES}
