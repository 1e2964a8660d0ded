"""Benchmarks: the Matryoshka loss computed every known way, timed side by side.

* ``baselines``  the published algorithms (prefix-from-scratch, running sum, stacked cumsum) and the
                 two floors (dense and sparse single-prefix decode), plus the package's fused op.
* ``harness``    inputs, prefix sets, timing (CUDA events / perf_counter medians), peak memory.
* ``sae_step``   a minimal TopK / BatchTopK SAE training step for the end-to-end comparison.
* ``sweep``      ``python -m benchmarks.sweep``: JSON + CSV + PNG into ``benchmarks/results/``.
* ``test_*.py``  the pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.
"""
