"""The benchmark baselines (``benchmarks/baselines.py``) against ``matryoshka.reference``: loss,
per-prefix losses and every gradient, in float64 on small random inputs (with padding)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import (
    METHODS,
    densify,
    prefix_from_scratch_loss,
    running_sum_loss,
    stacked_cumsum_loss,
    methods_for,
)
from benchmarks.checks import check_method
from benchmarks.harness import LiveTensorTracker, prefix_set
from benchmarks.sae_step import VARIANTS, TopKSAE, batch_topk, groups_for, make_train_step
from matryoshka import Prefixes, SparseActs, matryoshka_loss_reference

MULTI = [prefix_from_scratch_loss, running_sum_loss, stacked_cumsum_loss]


def _problem(B=10, n=48, d=12, k=5, seed=0, bias=True, pad_fraction=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    idx[1, 0] = 0  # latent 0 active next to padding: padding must not overwrite it
    vals = torch.rand(B, k, generator=g, dtype=torch.float64) + 0.1
    pad = torch.rand(B, k, generator=g) < pad_fraction
    pad[1, 0] = False
    pad[2] = True  # an empty row
    return x, vals.masked_fill(pad, 5.0), idx.masked_fill(pad, -1), W, b


def _grads(fn, x, vals, idx, W, b, prefixes):
    leaves = [t.clone().requires_grad_() for t in (x, vals, W) + (() if b is None else (b,))]
    loss, per_prefix = fn(leaves[0], SparseActs(leaves[1], idx), leaves[2], leaves[3] if b is not None else None, prefixes)
    loss.backward()
    return loss.detach(), per_prefix.detach(), [t.grad for t in leaves]


PREFIXES = {
    "single": lambda n: Prefixes([n]),
    "groups": lambda n: Prefixes([n // 8, n // 4, n // 2, n], [1.0, 0.5, 2.0, 1.0]),
    "empty+partial": lambda n: Prefixes([0, 5, n // 2 + 1], [0.3, 1.0, 0.7]),
    "every": lambda n: Prefixes.every(n, include_empty=True),
    "sampled": lambda n: Prefixes.sample(n, 10, generator=torch.Generator().manual_seed(3)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(PREFIXES))
@pytest.mark.parametrize("fn", MULTI, ids=lambda f: f.__name__)
def test_multi_prefix_baselines_match_reference(fn, kind, bias):
    x, vals, idx, W, b = _problem(bias=bias)
    prefixes = PREFIXES[kind](W.shape[0])
    got = _grads(lambda *a: fn(*a, return_per_prefix=True), x, vals, idx, W, b, prefixes)
    want = _grads(matryoshka_loss_reference, x, vals, idx, W, b, prefixes)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vanilla_floor", "sparse_floor"])
def test_floors_match_reference_single_prefix(name):
    x, vals, idx, W, b = _problem()
    prefixes = Prefixes([W.shape[0]])
    got = _grads(lambda *a: METHODS[name](*a, return_per_prefix=True), x, vals, idx, W, b, prefixes)
    want = _grads(matryoshka_loss_reference, x, vals, idx, W, b, prefixes)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [m.name for m in methods_for("cpu")])
def test_check_method_passes(name):
    """The gate the sweep and the suite apply before timing (also covers the fused op wrappers)."""
    assert check_method(METHODS[name])["ok"]


def test_densify_keeps_latent_zero_next_to_padding():
    acts = SparseActs(torch.tensor([[2.0, 9.0, 3.0]]), torch.tensor([[0, -1, 4]]))
    assert densify(acts, 6).tolist() == [[2.0, 0.0, 0.0, 0.0, 3.0, 0.0]]


def test_prefix_sets():
    assert prefix_set("1", 64).lengths.tolist() == [64]
    assert prefix_set("5", 64).lengths.tolist() == [4, 8, 16, 32, 64]
    assert len(prefix_set("16", 64)) == 16 and prefix_set("16", 64).max_length == 64
    assert len(prefix_set("n", 64)) == 64
    sampled = prefix_set("sampled10", 64)
    assert len(sampled) == 10 and sampled.max_length == 64
    assert abs(float(prefix_set("64", 1024).weights.sum()) - 1.0) < 1e-12


def test_batch_topk_keeps_the_batch_top_entries():
    pre = torch.rand(6, 40, generator=torch.Generator().manual_seed(0))
    acts = batch_topk(pre, 3)
    dense = densify(acts, 40)
    assert int((acts.indices >= 0).sum()) == 18
    threshold = pre.flatten().topk(18).values.min()
    torch.testing.assert_close(dense, torch.where(pre >= threshold, pre, 0.0))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_train_step_variants_agree_on_the_first_loss(activation):
    """Same SAE, same batch: the running-sum and fused group losses agree; every step trains."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    losses = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        sae = TopKSAE(8, 64, 4, activation)
        step, _ = make_train_step(variant, sae, "torch")
        before = sae.W_dec.detach().clone()
        losses[variant] = float(step(x))
        assert not torch.equal(before, sae.W_dec.detach())
    assert losses["groups_fused"] == pytest.approx(losses["groups_running_sum"], rel=1e-5)
    assert losses["vanilla"] == pytest.approx(losses["vanilla_sparse"], rel=1e-5)
    assert groups_for(64).lengths.tolist() == [4, 8, 16, 32, 64]


def test_live_tensor_tracker_counts_saved_tensors_and_frees():
    a = torch.randn(256, 256, requires_grad=True)
    with LiveTensorTracker() as tracker:
        loss = (a * 2).pow(2).sum()  # saves a*2 (256 KiB) for pow's backward
        loss.backward()
        del loss
    assert tracker.peak >= 2 * 256 * 256 * 4  # a*2 and the gradient alive together
    assert tracker.current == a.grad.numel() * 4  # only the gradient is left


def test_dense_kernel_cost_model_is_its_docstrings_arithmetic():
    """At B = 4096, n = 36864, d = 2304 in float32 ``kernels/dense_scan.py`` counts A 43.5 GB + W_dec
    87.0 GB streamed per pass and 1.09e10 + 2.17e10 float32 atomics in the backward."""
    flops, held, ops, streamed = METHODS["fused_dense_triton"].cost(4096, 36864, 2304, 32, list(range(1, 36865)), 4)
    per_pass, atomics = (43.49e9 + 86.97e9), (1.087e10 + 2.174e10)
    assert streamed == pytest.approx(2 * per_pass + 8 * atomics, rel=1e-3)
    decode = 2 * 4096 * 36864 * 2304
    assert 11 * decode < flops < 14 * decode  # every latent a prefix: the docstring's 3.5 + 9.5 decodes
    # Group prefixes: about four decodes (forward, and the backward's three).
    assert METHODS["fused_dense_triton"].cost(4096, 36864, 2304, 32, [36864], 4)[0] < 2 * 4096 * 36864 * 2304 * 4.01


def test_the_dense_op_is_timed_at_one_k():
    from benchmarks.sweep import methods_at

    chosen = [METHODS[m] for m in ("fused_triton", "fused_dense_triton", "fused_dense_torch", "vanilla_floor")]
    assert [m.name for m in methods_at(chosen, 32, [32, 64])] == [m.name for m in chosen]
    assert [m.name for m in methods_at(chosen, 64, [32, 64])] == ["fused_triton", "vanilla_floor"]
