"""The op features SAELens needs, on every backend against the reference: ragged rows
(``SparseActs.from_dense(acts)``, scans that stop at each row's count), decoder-norm rescaling, the
returned reconstruction, float32 accumulation under autocast, and float dtype promotion."""

import contextlib
import functools

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.kernels.sparse_scan_op import sparse_scan_detached_triton, sparse_scan_triton
from matryoshka.reference import reconstruction_reference
from matryoshka.torch_scan import sparse_scan_detached_torch, sparse_scan_torch

from .conftest import DEVICE
from .helpers import RTOL, assert_matches, make_problem

# (B, d, n, k, pad_fraction, padding_rows): odd d with ragged rows and an empty row; k = 1.
SHAPES = [
    pytest.param(6, 13, 20, 6, 0.4, (2,), id="ragged-odd-d"),
    pytest.param(3, 8, 9, 1, 0.3, (), id="k=1"),
]
BACKEND_DTYPES = [("torch", torch.float64), ("triton", torch.float64), ("triton", torch.float32)]


def run(p, acts_of, prefixes, backend, context=contextlib.nullcontext, **options):
    """Loss, per-prefix losses, reconstruction and the gradients of x, the activation leaf, W_dec, b_dec.

    ``acts_of(leaf)`` builds ``acts`` from the activation leaf (``p.values`` or a dense tensor); the
    forward runs in ``context()``, the backward outside it (as autocast recommends)."""
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, acts_of(None), p.W_dec)]
    b = None if p.b_dec is None else p.b_dec.detach().clone().requires_grad_()
    with context():
        out = matryoshka_loss(leaves[0], acts_of(leaves[1]), leaves[2], b, prefixes, backend=backend, **options)
    out.loss.backward()
    assert not out.reconstruction.requires_grad
    return [out.loss.detach(), out.per_prefix, out.reconstruction] + [t.grad for t in leaves + ([] if b is None else [b])]


def check(got, want, dtype):
    """``assert_matches`` on loss, per-prefix and gradients, and the reconstruction alike."""
    assert_matches(got[:2] + got[3:], want[:2] + want[3:], dtype)
    scale = want[2].abs().max().item()
    torch.testing.assert_close(got[2].double().cpu(), want[2].double().cpu(), rtol=0, atol=RTOL[dtype] * scale)


def sparse_of(p):
    return lambda leaf: p.values if leaf is None else SparseActs(leaf, p.indices)


def dense_of(p):
    return lambda leaf: SparseActs(p.values, p.indices).to_dense(p.n) if leaf is None else leaf


OPTIONS = {
    "index+rescale": (dict(rescale_acts_by_decoder_norm=True), lambda n, k: Prefixes([0, 1, n // 2, n], [1.0, 0.5, 2.0, 1.0])),
    "index+detach+rescale": (dict(detach=True, rescale_acts_by_decoder_norm=True),
                             lambda n, k: Prefixes.every(n, include_empty=True)),
    "rank+detach": (dict(order="rank", detach=True), lambda n, k: Prefixes.every(k, include_empty=True)),
    "rank+rescale": (dict(order="rank", rescale_acts_by_decoder_norm=True), lambda n, k: Prefixes([k])),
}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("B,d,n,k,pad,pad_rows", SHAPES)
def test_sparse_features_match_reference(backend, dtype, B, d, n, k, pad, pad_rows):
    """Ragged rows x (rescaling, detached levels, rank order), prefix lengths 0 and n: loss,
    per-prefix losses, reconstruction and every gradient equal the reference's."""
    device = "cpu" if backend == "torch" else DEVICE
    p = make_problem(B, d, n, k, dtype, device, pad, pad_rows, bias=d % 2 == 1, seed=5)
    for name, (options, prefixes_of) in OPTIONS.items():
        prefixes = prefixes_of(n, k)
        want = run(p, sparse_of(p), prefixes, "reference", **options)
        try:
            check(run(p, sparse_of(p), prefixes, backend, **options), want, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("detach", [False, True])
def test_dense_rescale_and_reconstruction_match_reference(backend, dtype, detach):
    """n = 40 spans three 16-latent tiles of the dense kernel; the longest prefix stops short of n,
    so the reconstruction needs latents no prefix holds."""
    device = "cpu" if backend == "torch" else DEVICE
    p = make_problem(5, 11, 40, 12, dtype, device, pad_fraction=0.2, seed=6)
    prefixes = Prefixes([0, 7, 16, 33], [1.0, 0.5, 2.0, 1.0])
    options = dict(detach=detach, rescale_acts_by_decoder_norm=True)
    check(run(p, dense_of(p), prefixes, backend, **options), run(p, dense_of(p), prefixes, "reference", **options), dtype)


def test_reconstruction_is_the_full_decode():
    """Every active latent, also past the longest prefix; sparse and dense alike."""
    p = make_problem(4, 10, 16, 5, torch.float64, pad_fraction=0.2, seed=7)
    acts = SparseActs(p.values, p.indices)
    want = acts.decode(p.W_dec) + p.b_dec
    for a in (acts, acts.to_dense(p.n)):
        out = matryoshka_loss(p.x, a, p.W_dec, p.b_dec, Prefixes([3]), backend="torch")
        torch.testing.assert_close(out.reconstruction, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(reconstruction_reference(acts, p.W_dec, None, compute=torch.float64), want - p.b_dec)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_reconstruction_of_half_inputs_is_float32(backend):
    """The reconstruction comes in the compute dtype (float32 for half inputs), sparse and dense,
    with and without rescaling, and equals the float64 decode of the same half-rounded inputs."""
    p = make_problem(4, 10, 16, 5, torch.float64, pad_fraction=0.2, seed=8)
    half = [t.to(torch.bfloat16) for t in (p.x, p.values, p.W_dec, p.b_dec)]
    acts = SparseActs(half[1], p.indices)
    for rescale in (False, True):
        W = half[2].double() / (half[2].double().norm(dim=1, keepdim=True) if rescale else 1.0)
        want = SparseActs(half[1].double(), p.indices).decode(W) + half[3].double()
        for a in (acts, acts.to_dense(p.n)):
            out = matryoshka_loss(half[0], a, half[2], half[3], Prefixes([3]), backend=backend,
                                  rescale_acts_by_decoder_norm=rescale)
            assert out.reconstruction.dtype == torch.float32, (backend, rescale, a.__class__)
            torch.testing.assert_close(out.reconstruction.double(), want, rtol=1e-5, atol=1e-5)


def test_from_dense_keeps_every_nonzero_entry():
    acts = torch.tensor([[0.0, 2.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    sparse = SparseActs.from_dense(acts)
    assert sparse.indices.tolist() == [[1, 3], [-1, -1], [0, -1]]
    assert sparse.values.tolist() == [[2.0, -3.0], [0.0, 0.0], [1.0, 0.0]]
    torch.testing.assert_close(sparse.to_dense(4), acts.detach())
    sparse.values.sum().backward()
    assert acts.grad.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0] * 4, [1.0, 0.0, 0.0, 0.0]]
    keep = torch.tensor([[True, True, False, False], [False] * 4, [False] * 4])
    assert SparseActs.from_mask(acts, keep).indices.tolist() == [[0, 1], [-1, -1], [-1, -1]]
    assert SparseActs.from_dense(torch.zeros(2, 5)).values.shape == (2, 0)


SCANS = {"torch": (sparse_scan_torch, sparse_scan_detached_torch), "triton": (sparse_scan_triton, sparse_scan_detached_triton)}


def test_ragged_scans_agree_on_padded_slots():
    """The scans as ops of their own, with arbitrary gradients on the norms of padded slots (which
    repeat the row's final norm) and levels that run on into the padding: Triton equals PyTorch,
    whose gradients ``test_gradcheck_and_properties`` checks numerically."""
    p = make_problem(5, 9, 12, 4, torch.float64, DEVICE, pad_fraction=0.5, padding_rows=(3,), seed=8)
    order = torch.where(p.indices < 0, 10**9, p.indices).argsort(1)
    indices, values = p.indices.gather(1, order), p.values.gather(1, order)
    levels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0], [1, 1, 3, 3]], device=DEVICE)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, 5, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    results = {}
    for name, (scan, detached) in SCANS.items():
        leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.b_dec, p.W_dec, values)]
        norms, final = scan(*leaves, indices)
        d_norms, d_level, d_final = detached(*leaves, indices, levels)
        total = (grads[0] * norms).sum() + (grads[1] * d_norms).sum() + (grads[0] * d_level).sum()
        results[name] = [norms, final, d_final, *torch.autograd.grad(total, leaves)]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    last = torch.where(indices >= 0, 1, 0).sum(1)
    norms = results["torch"][0]
    assert torch.equal(norms, norms.gather(1, torch.minimum(torch.arange(5, device=DEVICE), last[:, None])))


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_float32_accumulation_under_cpu_autocast(dense, one_thread):
    """A forward under ``torch.autocast("cpu", bfloat16)`` on the torch backend gives the float32
    result to float32 rounding (it erred by 1.8e-4 when its scan ran in bfloat16)."""
    p = make_problem(16, 64, 96, 8, torch.float32, pad_fraction=0.2, seed=9)
    of = dense_of(p) if dense else sparse_of(p)
    prefixes = Prefixes([8, 48, 96])
    want = run(p, of, prefixes, "torch")
    got = run(p, of, prefixes, "torch", context=functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16))
    for name, a, b in zip(["loss", "per_prefix", "reconstruction", "dx", "dacts", "dW_dec", "db_dec"], got, want):
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_float_dtypes_promote_as_torch_does(backend):
    """float64 decoder with float32 inputs computes in float64 (the float64 result on the same
    values), each gradient in its input's dtype; float16 with bfloat16 computes in float32."""
    device = "cpu" if backend == "torch" else DEVICE
    p = make_problem(4, 10, 12, 3, torch.float64, device, pad_fraction=0.2, seed=10)
    x, values, b = p.x.float(), p.values.float(), p.b_dec.float()
    leaves = [t.clone().requires_grad_() for t in (x, values, p.W_dec, b)]
    out = matryoshka_loss(leaves[0], SparseActs(leaves[1], p.indices), leaves[2], leaves[3], Prefixes([4, 12]),
                          backend=backend)
    out.loss.backward()
    twins = [t.detach().double().requires_grad_() for t in leaves]
    want = matryoshka_loss(twins[0], SparseActs(twins[1], p.indices), twins[2], twins[3], Prefixes([4, 12]),
                           backend="reference")
    want.loss.backward()
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=0)
    for leaf, twin in zip(leaves, twins):
        assert leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad, twin.grad.to(leaf.dtype))
    half = matryoshka_loss(x.half(), SparseActs(values.bfloat16(), p.indices), p.W_dec.half(), None, Prefixes([12]),
                           backend=backend)
    assert half.loss.dtype == torch.float32
