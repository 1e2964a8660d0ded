"""Which scan ``matryoshka_loss`` runs for each backend, activation kind and ``detach``, and the
``MatryoshkaLoss`` module's defaults.

Every backend gives the reference's numbers, so only a spy tells the scans apart: the Triton scans
are replaced by the PyTorch ones (same signatures and outputs), so this runs without the
interpreter.
"""

import pytest
import torch

import matryoshka.loss
from matryoshka import MatryoshkaLoss, Prefixes, SparseActs, matryoshka_loss
from matryoshka import torch_scan
from matryoshka.kernels import dense_scan_op, sparse_scan_op

from .helpers import assert_matches, make_problem, run_loss, spy

# backend, dense, detach -> the scan that must run (the only one)
EXPECTED = {
    ("torch", False, False): "sparse_scan_torch",
    ("torch", False, True): "sparse_scan_detached_torch",
    ("torch", True, False): "dense_prefix_norms_torch",
    ("torch", True, True): "dense_prefix_norms_detached_torch",
    ("triton", False, False): "sparse_scan_triton",
    ("triton", False, True): "sparse_scan_detached_triton",
    ("triton", True, False): "dense_prefix_norms_triton",
    ("triton", True, True): "dense_prefix_norms_detached_triton",
    ("auto", False, False): "sparse_scan_torch",  # off CUDA
    ("auto", True, True): "dense_prefix_norms_detached_torch",
    ("reference", False, False): "matryoshka_loss_reference",
    ("reference", True, True): "matryoshka_loss_reference",
}


def spy_on_every_scan(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ["sparse_scan_torch", "sparse_scan_detached_torch", "dense_prefix_norms_torch",
                 "dense_prefix_norms_detached_torch", "matryoshka_loss_reference"]:
        spy(monkeypatch, matryoshka.loss, name, calls)
    for module, name in [(sparse_scan_op, "sparse_scan_triton"), (sparse_scan_op, "sparse_scan_detached_triton"),
                         (dense_scan_op, "dense_prefix_norms_triton"),
                         (dense_scan_op, "dense_prefix_norms_detached_triton")]:
        spy(monkeypatch, module, name, calls, replacement=getattr(torch_scan, name.replace("triton", "torch")))
    return calls


@pytest.mark.parametrize("backend,dense,detach", list(EXPECTED), ids=lambda v: str(v))
def test_each_backend_runs_its_own_scan(monkeypatch, backend, dense, detach):
    p = make_problem(5, 6, 10, 3, torch.float64, pad_fraction=0.2)
    prefixes = Prefixes([0, 4, 10], [1.0, 2.0, 0.5])
    want = run_loss(p, prefixes, "reference", dense=dense, detach=detach)
    calls = spy_on_every_scan(monkeypatch)
    got = run_loss(p, prefixes, backend, dense=dense, detach=detach)
    assert calls == [EXPECTED[backend, dense, detach]]
    assert_matches(got, want, torch.float64)


def test_module_defaults_are_the_functions():
    """``MatryoshkaLoss(prefixes)`` is ``matryoshka_loss`` with its defaults: backend ``"auto"``,
    index order, live levels, no rescaling (decoder rows here are not unit norm, so rescaling would
    change the loss), and validation on."""
    prefixes = Prefixes([2, 5, 10], [1.0, 0.5, 2.0])
    module = MatryoshkaLoss(prefixes)
    assert (module.backend, module.validate, module.order, module.detach, module.rescale_acts_by_decoder_norm) == (
        "auto", True, "index", False, False)
    p = make_problem(6, 5, 10, 4, torch.float64, pad_fraction=0.2)
    assert not torch.allclose(p.W_dec.norm(dim=1), torch.ones(p.n, dtype=torch.float64))

    def loss_and_grads(loss_fn):
        leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.values, p.W_dec, p.b_dec)]
        out = loss_fn(leaves[0], SparseActs(leaves[1], p.indices), leaves[2], leaves[3])
        out.loss.backward()
        return [out.loss.detach(), out.per_prefix] + [t.grad for t in leaves]

    want = loss_and_grads(lambda x, acts, W, b: matryoshka_loss(x, acts, W, b, prefixes))
    assert_matches(loss_and_grads(module), want, torch.float64)
    bad = SparseActs(p.values, p.indices.masked_fill(p.indices == p.indices[0, 0], p.n))
    with pytest.raises(ValueError, match="indices"):
        module(p.x, bad, p.W_dec, p.b_dec)


def test_module_passes_every_option_on():
    """``MatryoshkaLoss(prefixes, validate=False, order="rank", detach=True, rescale_acts_by_decoder_norm=True)``
    computes what ``matryoshka_loss`` does with those options (each one changes the loss or a
    gradient here), and ``validate=False`` lets a repeated index through, counted twice."""
    prefixes = Prefixes([1, 3, 4], [1.0, 0.5, 2.0])
    options = dict(order="rank", detach=True, rescale_acts_by_decoder_norm=True)
    module = MatryoshkaLoss(prefixes, "torch", False, **options)
    p = make_problem(6, 5, 10, 4, torch.float64, pad_fraction=0.2)
    repeated = p.indices.clone()
    repeated[0, 1] = repeated[0, 0] = 3

    def loss_and_grads(loss_fn):
        leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.values, p.W_dec, p.b_dec)]
        out = loss_fn(leaves[0], SparseActs(leaves[1], repeated), leaves[2], leaves[3])
        out.loss.backward()
        return [out.loss.detach(), out.per_prefix] + [t.grad for t in leaves]

    want = loss_and_grads(lambda x, acts, W, b: matryoshka_loss(x, acts, W, b, prefixes, "torch", False, **options))
    assert_matches(loss_and_grads(module), want, torch.float64)
    for name in options:  # each option on its own makes a difference on this problem
        other = dict(options, **{name: {"order": "index"}.get(name, False)})
        changed = loss_and_grads(lambda x, acts, W, b: matryoshka_loss(x, acts, W, b, prefixes, "torch", False, **other))
        assert any(not torch.allclose(a, b) for a, b in zip(changed, want)), name
