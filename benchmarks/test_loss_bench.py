"""Forward+backward of the Matryoshka loss, every method x G, at the suite's sizes (see conftest).

Benchmarks are grouped by dtype and G, so pytest-benchmark's table compares the methods directly.
"""

from __future__ import annotations

import itertools
import time

import pytest

from .baselines import METHODS, methods_for
from .checks import describe_failure
from .conftest import DEVICE, MAX_CALL_S, ROUND_BUDGET_S, SIZES, sync
from .harness import DTYPES, estimate, memory_budget, peak_extra_memory, prefix_set

G_KINDS = ["1", "5", "16", "64", "n"]


@pytest.mark.parametrize("dtype", SIZES["dtypes"])
@pytest.mark.parametrize("g_kind", G_KINDS, ids=[f"G={g}" for g in G_KINDS])
@pytest.mark.parametrize("method", [m.name for m in methods_for(DEVICE.type)])
def test_loss(benchmark, checked_methods, input_sets, method, g_kind, dtype):
    m = METHODS[method]
    assert checked_methods[method]["ok"], describe_failure(checked_methods[method])
    if not m.uses_prefixes and g_kind != "1":
        pytest.skip("single-prefix floor: benchmarked at G=1 only")
    B, n, d, k = SIZES["B"], SIZES["n"], SIZES["d"], SIZES["k"]
    prefixes = prefix_set(g_kind, n)
    est_s, est_bytes = estimate(m, B, n, d, k, prefixes, DTYPES[dtype], DEVICE)
    if est_s > MAX_CALL_S:
        pytest.skip(f"estimated {est_s:.3g} s per call > {MAX_CALL_S} s")
    if est_bytes > memory_budget(DEVICE):
        pytest.skip(f"estimated {est_bytes / 2**30:.3g} GiB > memory budget")
    sets = input_sets(dtype)

    def step(s):
        m(s.x, s.acts, s.W_dec, s.b_dec, prefixes).backward()
        sync()

    peak, how = peak_extra_memory(step, sets[0], DEVICE)  # also the first warm-up
    t0 = time.perf_counter()
    sets[1].clear_grads()
    step(sets[1])
    first = time.perf_counter() - t0
    counter = itertools.count()

    def setup():
        s = sets[next(counter) % len(sets)]
        s.clear_grads()
        return (s,), {}

    benchmark.group = f"loss {dtype} G={g_kind}"
    benchmark.extra_info.update(method=method, G=len(prefixes), B=B, n=n, d=d, k=k, dtype=dtype,
                                peak_extra_bytes=peak, memory_method=how, input_sets=len(sets))
    rounds = max(3, min(50, int(ROUND_BUDGET_S / max(first, 1e-6))))
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    for s in sets:
        s.clear_grads()
