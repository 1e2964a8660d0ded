"""Compiled-kernel tests that need a CUDA GPU: half precision at large shapes, and large shapes.
Skipped without one (the half-precision tests also run, small, in the interpreter)."""

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

from .helpers import assert_compiled_step_matches, check_half_sparse, make_problem

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    """GPU-sized twin of test_sparse_loss's interpreter test: compiled kernels, d = 300, k = 32."""
    p = make_problem(64, 300, 1000, 32, torch.float32, "cuda", pad_fraction=0.1)
    check_half_sparse(p, Prefixes.every(1000, include_empty=True), dtype)


def test_large_d_n_k():
    """d = 16384 (16 chunks), n = 2^20 (int64 addressing of W_dec), k = 512."""
    B, d, n, k = 8, 16384, 1 << 20, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, d, device="cuda", generator=g)
    W = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.stack([torch.randperm(n, device="cuda", generator=g)[:k] for _ in range(B)])
    idx[:, 0] = n - 1  # the last row of W_dec: byte offset beyond 2^31
    v = torch.rand(B, k, device="cuda", generator=g)
    prefixes = Prefixes.groups([1024, 65536, n])
    out = matryoshka_loss(x, SparseActs(v, idx), W, None, prefixes, "triton")
    rows = W[idx].float()  # (B, k, d): the gathered decoder rows, small where W_dec[:m] is not
    want = torch.stack([
        ((x - ((v * (idx < m)).unsqueeze(-1) * rows).sum(1)) ** 2).sum(1).mean()
        for m in prefixes.lengths.tolist()
    ])
    torch.testing.assert_close(out.per_prefix, want, rtol=1e-3, atol=0)


def test_compiled_kernels_match_reference_every_prefix():
    p = make_problem(33, 777, 513, 17, torch.float32, "cuda", pad_fraction=0.2, padding_rows=(3,))
    prefixes = Prefixes.every(513, include_empty=True)
    outs = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.values, p.W_dec, p.b_dec)]
        out = matryoshka_loss(leaves[0], SparseActs(leaves[1], p.indices), leaves[2], leaves[3], prefixes, backend)
        out.loss.backward()
        outs.append([out.loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("launch_kwargs", [dict(loop_stages=3), dict(dw_mode="sorted")], ids=["pipelined", "sorted-dW"])
def test_tuning_launches_at_large_n_and_slot_counts(launch_kwargs):
    """The tuner's launches (a pipelined slot loop; the sorted dW_dec) against the default launch with
    offsets past 2^31 bytes: W_dec rows up to n = 2^20 at d = 2304 (bf16), and the sorted mode's
    (B k, d) float32 slot-row buffer at B = k = 512 (2.4 GB).  About 25 GB of GPU memory."""
    from benchmarks.tune import Inputs, run_candidate
    from matryoshka.kernels.sparse_scan import SparseLaunch, default_launch

    B, d, n, k = 512, 2304, 1 << 20, 512
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(B, d, device="cuda", generator=g)
    W = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.stack([torch.randperm(n, device="cuda", generator=g)[:k] for _ in range(B)]).sort(dim=1).values
    idx[:, -1] = n - 1  # the last row of W_dec
    idx[1, k // 2:] = -1  # padding slots, last
    v = torch.rand(B, k, device="cuda", generator=g)
    grad = torch.rand(B, k + 1, device="cuda", generator=g)
    inputs = Inputs(x, None, W, v, idx, grad)
    want = run_candidate(None, inputs)
    got = run_candidate(SparseLaunch(default_launch(d).block_d, **launch_kwargs), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("setting", ["highest", "high"])
def test_dense_float32_products_follow_the_users_matmul_precision(setting):
    """Compiled dense kernels on float32 inputs against the float64 reference: ``tf32x3`` (PyTorch's
    default "highest") to float32 rounding; ``tf32`` ("high": TF32 allowed) to TF32's ~1e-3, and
    visibly coarser, which shows that the one-product TF32 path really ran."""
    before = torch.get_float32_matmul_precision()
    g = torch.Generator(device="cuda").manual_seed(3)
    B, d, n = 96, 300, 1000
    x, b = torch.randn(B, d, device="cuda", generator=g), torch.randn(d, device="cuda", generator=g)
    W = torch.randn(n, d, device="cuda", generator=g) / d**0.5
    acts = torch.randn(B, n, device="cuda", generator=g).relu()
    prefixes = Prefixes([0, 1, 15, 16, 17, 333, n])
    outs = []
    try:
        torch.set_float32_matmul_precision(setting)
        for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (x, acts, W, b)]
            out = matryoshka_loss(leaves[0], leaves[1], leaves[2], leaves[3], prefixes, backend)
            out.loss.backward()
            outs.append([out.per_prefix.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_float32_matmul_precision(before)
    err = max(((a.double() - w).abs().max() / w.abs().max()).item() for a, w in zip(*outs))
    if setting == "highest":
        assert err < 1e-4
    else:
        assert 1e-5 < err < 2e-2


def test_inductor_compiled_topk_training_step():
    """A TopK SAE step (encoder GEMM, TopK, every-prefix loss through the custom op) under the default
    ``torch.compile`` backend: Inductor generates Triton code for everything around our op, which
    stays opaque; loss and every gradient match eager's to float32 GEMM rounding (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(2)
    B, d, n, k = 256, 384, 2048, 32
    x, W_enc = torch.randn(B, d, device="cuda", generator=g), torch.randn(d, n, device="cuda", generator=g) / d**0.5
    W_dec, b_enc, b_dec = W_enc.T.contiguous(), torch.zeros(n, device="cuda"), torch.zeros(d, device="cuda")
    prefixes = Prefixes.every(n)

    def step(W_enc, b_enc, W_dec, b_dec):
        values, indices = ((x - b_dec) @ W_enc + b_enc).relu().topk(k, dim=1)
        return matryoshka_loss(x, SparseActs(values, indices), W_dec, b_dec, prefixes, "triton", validate=False).loss

    assert_compiled_step_matches(step, [W_enc, b_enc, W_dec, b_dec], backend="inductor", rtol=1e-4, atol=1e-5)
