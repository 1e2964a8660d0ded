"""Detached levels and rank-order prefixes against the plain scan (see ``benchmarks.semantics``),
at the suite's sizes: one pytest-benchmark group per comparison."""

from __future__ import annotations

import itertools

import pytest

from .conftest import DEVICE, ROUND_BUDGET_S, SIZES, sync
from .semantics import check_variants, variants

BACKEND = "triton" if DEVICE.type == "cuda" else "torch"
VARIANTS = {v.name: v for v in variants(SIZES["n"], SIZES["k"])}


@pytest.fixture(scope="module")
def checked():
    return check_variants(BACKEND, DEVICE)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_semantics(benchmark, checked, input_sets, name):
    v = VARIANTS[name]
    sets = input_sets("fp32")
    counter = itertools.count()

    def step(s):
        v.loss(s.x, s.acts, s.W_dec, s.b_dec, BACKEND).loss.backward()
        sync()

    def setup():
        s = sets[next(counter) % len(sets)]
        s.clear_grads()
        return (s,), {}

    benchmark.group = f"semantics vs {v.baseline or v.name}"
    benchmark.extra_info.update(variant=name, G=len(v.prefixes), order=v.order, detach=v.detach,
                                max_rel_err=checked[name], **SIZES)
    benchmark.pedantic(step, setup=setup, rounds=max(5, int(20 * ROUND_BUDGET_S)), warmup_rounds=1, iterations=1)
    for s in sets:
        s.clear_grads()
