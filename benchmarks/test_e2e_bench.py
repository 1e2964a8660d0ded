"""End-to-end TopK / BatchTopK SAE training step (encode, loss, backward, Adam) per loss variant."""

from __future__ import annotations

import itertools

import pytest
import torch

from .checks import check_train_step, describe_failure
from .conftest import DEVICE, E2E_SIZES, ROUND_BUDGET_S, sync
from .sae_step import VARIANTS, TopKSAE, make_train_step


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, checked_methods, variant, activation):
    B, d, n, k = E2E_SIZES["B"], E2E_SIZES["d"], E2E_SIZES["n"], E2E_SIZES["k"]
    fused_backend = "triton" if DEVICE.type == "cuda" else "torch"
    check = check_train_step(variant, activation, DEVICE, fused_backend)  # before anything is timed
    assert check["ok"], describe_failure(check) + f": {check['errors']}"
    torch.manual_seed(0)
    sae = TopKSAE(d, n, k, activation, device=DEVICE)
    step, _ = make_train_step(variant, sae, fused_backend)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    batches = [torch.randn(B, d, device=DEVICE, generator=g) for _ in range(4)]
    counter = itertools.count()

    def run(x):
        step(x)
        sync()

    def setup():
        return (batches[next(counter) % len(batches)],), {}

    import time

    run(batches[0])
    t0 = time.perf_counter()
    run(batches[1])
    first = time.perf_counter() - t0
    benchmark.group = f"e2e {activation}"
    benchmark.extra_info.update(variant=variant, activation=activation, B=B, d=d, n=n, k=k)
    rounds = max(3, min(30, int(2 * ROUND_BUDGET_S / max(first, 1e-6))))
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
