"""The Triton path is a registered torch.library op: opcheck, and use inside torch.compile."""

import pytest
import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

from .conftest import DEVICE
from .helpers import assert_compiled_step_matches, make_problem


def sorted_args(bias: bool):
    import matryoshka.kernels.sparse_scan_op  # noqa: F401  (registers the op)

    p = make_problem(3, 10, 12, 4, torch.float32, DEVICE, pad_fraction=0.25, padding_rows=(1,), bias=bias)  # ragged
    order = torch.where(p.indices < 0, 10**9, p.indices).argsort(1)
    values = p.values.gather(1, order).requires_grad_()
    return (p.x.requires_grad_(), p.b_dec, p.W_dec.requires_grad_(), values, p.indices.gather(1, order))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sparse_scan(bias):
    args = sorted_args(bias)
    torch.library.opcheck(
        torch.ops.matryoshka.sparse_scan.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_backend_resolution_calls_nothing_torch_compile_refuses(monkeypatch):
    """torch 2.11's Dynamo (the H200 image's) refuses to trace ``importlib.util.find_spec``, which made
    every ``fullgraph=True`` compile of the loss fail there: whether Triton is installed is looked up
    once, at import, not on every call."""
    import importlib.util

    from matryoshka.loss import resolve_backend

    def refuse(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec called while resolving the backend")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    assert resolve_backend("auto", torch.device("cuda"), dense=False) == "triton"
    assert resolve_backend("triton", torch.device("cuda"), dense=True) == "triton"


def test_autocast_switch_calls_nothing_torch_compile_refuses(monkeypatch):
    """The same for ``torch.amp.is_autocast_available`` (torch 2.11's Dynamo refuses it too): asked at
    import for CPU and CUDA, once for any other device type."""
    from matryoshka.precision import autocast_disabled

    def refuse(*args, **kwargs):
        raise AssertionError("torch.amp.is_autocast_available called at a loss call")

    monkeypatch.setattr(torch.amp, "is_autocast_available", refuse)
    for device_type in ("cpu", "cuda"):
        with autocast_disabled(device_type):
            assert not torch.is_autocast_enabled(device_type)


def test_loss_inside_torch_compile():
    """The whole loss (sort, fold, kernel, unfold) traces through dynamo with the op kept opaque."""
    p = make_problem(4, 16, 20, 5, torch.float32, DEVICE, pad_fraction=0.2)
    prefixes = Prefixes.every(20)

    def step(x, values, W, b):
        return matryoshka_loss(x, SparseActs(values, p.indices), W, b, prefixes, backend="triton", validate=False).loss

    assert_compiled_step_matches(step, [p.x, p.values, p.W_dec, p.b_dec])


def test_rescaled_loss_and_reconstruction_inside_torch_compile():
    """Decoder-norm rescaling and the reconstruction (the scan's final residual) trace too."""
    p = make_problem(4, 16, 20, 5, torch.float32, DEVICE, pad_fraction=0.4, padding_rows=(2,))
    prefixes = Prefixes([0, 7, 20])

    def step(x, values, W, b):
        out = matryoshka_loss(x, SparseActs(values, p.indices), W, b, prefixes, backend="triton", validate=False,
                              rescale_acts_by_decoder_norm=True)
        return out.loss + out.reconstruction.square().mean()  # a detached term: checks its value only

    assert_compiled_step_matches(step, [p.x, p.values, p.W_dec, p.b_dec])
