"""Inputs that need no gradient: a frozen decoder, fixed codes (the activations), a fixed bias.

Every backend must give each input that asks for a gradient the reference's, give the others none,
and skip the skipped gradients' work: no buffer the size of a frozen decoder (or of frozen dense
activations) is made during the backward, and the kernels' host functions return empty tensors
in their place (the kernels then neither compute nor write them: the sm_90 builds' atomics,
tests/test_kernels_report.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.kernels import dense_scan, sparse_scan

from .conftest import DEVICE
from .helpers import RTOL, assert_compiled_step_matches, make_problem

B, D, N, K = 6, 19, 150, 5  # distinct sizes, so that a (n, d) or (B, n) buffer is recognisable; n past
# the dense PyTorch scan's widest latent block (128), whose (B, width) temporaries are not gradients
PREFIXES = {"every": Prefixes.every(N, include_empty=True), "groups": Prefixes([3, 11, N], [0.5, 1.0, 2.0])}
FROZEN = [("W_dec",), ("acts",), ("W_dec", "b_dec"), ("acts", "W_dec")]


class NewStorages(TorchDispatchMode):
    """The shapes of the tensors every op makes in fresh storage (views and in-place results aside)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return out


def _inputs(dense: bool, device: str = "cpu"):
    p = make_problem(B, D, N, K, device=device, pad_fraction=0.3, padding_rows=(2,))
    acts = SparseActs(p.values, p.indices).to_dense(N) if dense else p.values
    return dict(x=p.x, acts=acts, W_dec=p.W_dec, b_dec=p.b_dec), p.indices


def _loss(inputs, indices, dense, backend, prefixes, detach, needs):
    """The loss's value and the gradients of the inputs named in ``needs`` (the others frozen)."""
    leaves = {name: t.detach().clone().requires_grad_(name in needs) for name, t in inputs.items()}
    acts = leaves["acts"] if dense else SparseActs(leaves["acts"], indices)
    out = matryoshka_loss(leaves["x"], acts, leaves["W_dec"], leaves["b_dec"], prefixes, backend=backend,
                          detach=detach)
    with NewStorages() as made:
        out.loss.backward()
    return out.loss.detach(), {name: t.grad for name, t in leaves.items()}, made.shapes


@pytest.mark.parametrize("frozen", FROZEN, ids="+".join)
@pytest.mark.parametrize("prefixes", list(PREFIXES))
@pytest.mark.parametrize("detach", [False, True], ids=["", "detached"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_inputs_get_no_gradient_and_no_work(backend, dense, detach, prefixes, frozen):
    inputs, indices = _inputs(dense, "cpu" if backend == "torch" else DEVICE)
    needs = {"x", "acts", "W_dec", "b_dec"} - set(frozen)
    prefixes = PREFIXES[prefixes]
    want_loss, want, _ = _loss(inputs, indices, dense, "reference", prefixes, detach, set(inputs))
    loss, got, made = _loss(inputs, indices, dense, backend, prefixes, detach, needs)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=RTOL[torch.float64] * want_loss.abs().item())
    for name in inputs:
        if name in frozen:
            assert got[name] is None, name
        else:
            scale = want[name].abs().max().item()
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=RTOL[torch.float64] * scale,
                                       msg=lambda m, name=name: f"{name}: {m}")
    if "W_dec" in frozen:
        assert (N, D) not in made, "a decoder-sized buffer was made for a frozen decoder"
    if "acts" in frozen and dense:
        assert (B, N) not in made, "an activations-sized buffer was made for frozen dense activations"


def _assert_skipped(names, part, full, skip: str, exact: bool) -> None:
    """``part`` (a backward told to skip ``skip``: one of ``names[1:]`` or "both") against ``full``:
    a skipped gradient empty, every other one as the full backward's (bit for bit when ``exact``:
    the sparse kernel's outputs do not depend on one another's work)."""
    for name, a, b in zip(names, part, full):
        if skip in (name, "both") and name != "dx":
            assert a.numel() == 0, name
        elif exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * b.abs().max().item(), msg=name)


def _sparse_backward_inputs():
    p = make_problem(B, D, N, K, device=DEVICE, pad_fraction=0.3, padding_rows=(2,))
    order = p.indices.masked_fill(p.indices < 0, N).argsort(1)  # the kernels take each row sorted, padding last
    values, indices = p.values.gather(1, order), p.indices.gather(1, order)
    _, residual = sparse_scan.sparse_scan_forward(p.x, p.b_dec, p.W_dec, values, indices, torch.float64)
    grad = torch.randn(B, K + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return residual, grad, p.W_dec, values, indices


@pytest.mark.parametrize("dw_mode", ["atomic", "sorted"])
@pytest.mark.parametrize("skip", ["dW", "dvalues", "both"])
def test_sparse_host_function_returns_the_skipped_gradients_empty(skip, dw_mode):
    """Skipping one gradient leaves the others bit for bit as the full backward's."""
    residual, grad, W, values, indices = _sparse_backward_inputs()
    launch = sparse_scan.SparseLaunch(32, dw_mode=dw_mode)
    full = sparse_scan.sparse_scan_backward(residual, grad, W, values, indices, launch=launch)
    part = sparse_scan.sparse_scan_backward(residual, grad, W, values, indices, launch=launch,
                                            needs_dW=skip == "dvalues", needs_dvalues=skip == "dW")
    _assert_skipped(("dx", "dvalues", "dW"), part, full, skip, exact=True)


@pytest.mark.parametrize("detach", [False, True], ids=["", "detached"])
@pytest.mark.parametrize("skip", ["dW", "dacts", "both"])
def test_dense_host_function_returns_the_skipped_gradients_empty(skip, detach):
    inputs, _ = _inputs(dense=True, device=DEVICE)
    lengths = PREFIXES["every"].lengths  # the host functions take the lengths on the host
    x, acts, W, b = (inputs[name] for name in ("x", "acts", "W_dec", "b_dec"))
    launch = dense_scan.DenseLaunch(16, 16, 16, 1)  # several row blocks, column chunks and latent tiles
    _, residual = dense_scan.dense_scan_forward(x, b, W, acts, lengths, torch.float64, launch)
    grad = torch.randn(B, lengths.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    full = dense_scan.dense_scan_backward(residual, grad, W, acts, lengths, detach, launch)
    part = dense_scan.dense_scan_backward(residual, grad, W, acts, lengths, detach, launch,
                                          needs_dW=skip == "dacts", needs_dacts=skip == "dW")
    _assert_skipped(("dx", "dacts", "dW"), part, full, skip, exact=False)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_a_frozen_decoder_inside_torch_compile(dense):
    """A compiled step with a frozen decoder traces the backward op's skipped gradient (an empty
    output in the fake) and gives eager's loss and gradients."""
    inputs, indices = _inputs(dense, DEVICE)
    W_dec = inputs["W_dec"]  # a constant of the step: no gradient

    def step(x, acts, b_dec):
        acts = acts if dense else SparseActs(acts, indices)
        # validate=False: the index check is a host sync, which fullgraph refuses
        return matryoshka_loss(x, acts, W_dec, b_dec, PREFIXES["groups"], backend="triton", validate=False).loss

    assert_compiled_step_matches(step, [inputs["x"], inputs["acts"], inputs["b_dec"]])


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["all", "frozen-decoder", "fixed-codes", "neither"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_backward_ops_fakes_match_what_they_skip(dense, needs):
    """opcheck of the backward ops with each skip: the fakes' shapes (an empty tensor for a skipped
    gradient), what torch.compile traces, must be the real outputs'."""
    import matryoshka.kernels.dense_scan_op  # noqa: F401  (registers the ops)
    import matryoshka.kernels.sparse_scan_op  # noqa: F401

    if dense:
        inputs, _ = _inputs(dense=True, device=DEVICE)
        lengths = PREFIXES["groups"].lengths
        _, residual = dense_scan.dense_scan_forward(inputs["x"], inputs["b_dec"], inputs["W_dec"], inputs["acts"],
                                                    lengths, torch.float64)
        grad = torch.ones(B, lengths.numel(), dtype=torch.float64, device=DEVICE)
        op, args = torch.ops.matryoshka.dense_scan_backward.default, (residual, grad, inputs["W_dec"], inputs["acts"],
                                                                      lengths, *needs)
    else:
        residual, grad, W, values, indices = _sparse_backward_inputs()
        op, args = torch.ops.matryoshka.sparse_scan_backward.default, (residual, grad, W, values, indices, *needs)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
