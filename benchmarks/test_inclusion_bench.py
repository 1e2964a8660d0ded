"""``sampled_inclusion_probabilities`` at flex-sae's n = 65536 and the original's 10 sampled prefixes:
the CPU cost of the ``every``-prefix weights, computed once per (n, num) and cached.  Its test
(tests/test_inclusion.py) checks the values at this size; the time lives here, not in a unit test."""

from __future__ import annotations

from matryoshka import inclusion


def test_inclusion_probabilities_at_65536_latents(benchmark):
    def uncached():
        inclusion._inclusion_cached.cache_clear()
        return (65536, 10), {}

    benchmark.group = "every-prefix weights"
    benchmark.extra_info.update(n=65536, num=10)
    pi = benchmark.pedantic(inclusion.sampled_inclusion_probabilities, setup=uncached, rounds=3, iterations=1)
    assert abs(float(pi.sum()) - 10.0) < 1e-8  # what was timed is the right answer
