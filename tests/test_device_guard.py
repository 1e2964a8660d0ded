"""Every kernel launch runs under its input's device: a tensor on ``cuda:1`` must not launch on the
current device.  On the CPU the guard is checked by recording it around tiny interpreter launches;
on a machine with two GPUs the loss runs on ``cuda:1`` against the reference backend."""

import contextlib
import types

import pytest
import torch

from matryoshka import Prefixes
from matryoshka.kernels import dense_scan, guard, sparse_scan

from .conftest import DEVICE
from .helpers import assert_matches, make_problem, run_loss


def test_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(guard.torch.cuda, "device", fake_cuda_device)
    with guard.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):
        assert entered == [torch.device("cuda", 1)]
    with guard.device_guard(torch.zeros(1)):  # a CPU tensor (the interpreter): nothing to enter
        pass
    assert entered == [torch.device("cuda", 1)]


class _Recorder:
    """Stands in for ``device_guard`` and for the kernels: records the guard's device and whether
    each launch happens inside it."""

    def __init__(self):
        self.active = []  # devices of the guards entered and not yet left
        self.launches = []  # (kernel name, device of the innermost guard at launch, or None)

    @contextlib.contextmanager
    def guard(self, tensor):
        self.active.append(tensor.device)
        with guard.device_guard(tensor):
            yield
        self.active.pop()

    def kernel(self, name, real):
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((name, recorder.active[-1] if recorder.active else None))
                    return real[grid](*args, **kwargs)

                return launch

        return Launcher()


@pytest.mark.skipif(DEVICE != "cpu", reason="records interpreter launches")
def test_every_launch_runs_under_its_inputs_device(monkeypatch, one_thread):
    recorder = _Recorder()
    for module in (sparse_scan, dense_scan):
        monkeypatch.setattr(module, "device_guard", recorder.guard)
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, recorder.kernel(name, getattr(module, name)))
    g = torch.Generator().manual_seed(0)
    B, d, n, k = 2, 16, 16, 2
    x, W = torch.randn(B, d, generator=g), torch.randn(n, d, generator=g)
    values, indices = torch.rand(B, k, generator=g), torch.tensor([[1, 5], [0, 9]])
    norms, residual = sparse_scan.sparse_scan_forward(x, None, W, values, indices, torch.float32)
    sparse_scan.sparse_scan_backward(residual, torch.ones_like(norms), W, values, indices)
    acts, lengths = torch.rand(B, n, generator=g), torch.tensor([4, n])
    norms, residual = dense_scan.dense_scan_forward(x, None, W, acts, lengths, torch.float32)
    dense_scan.dense_scan_backward(residual, torch.ones_like(norms), W, acts, lengths)
    cpu = torch.device("cpu")
    assert recorder.launches == [
        ("_sparse_scan_forward_kernel", cpu), ("_sparse_scan_backward_kernel", cpu),
        ("_dense_scan_forward_kernel", cpu), ("_dense_scan_backward_kernel", cpu),
    ]
    assert recorder.active == []


@pytest.mark.gpu
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_loss_on_the_second_gpu(dense):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    torch.cuda.set_device(0)
    p = make_problem(B=32, d=64, n=128, k=8, dtype=torch.float32, device="cuda:1", pad_fraction=0.2)
    prefixes = Prefixes([8, 40, 128])
    got = run_loss(p, prefixes, "triton", dense=dense)
    assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda", 1) for t in got)
    want = run_loss(p, prefixes, "reference", dense=dense)
    assert_matches(got, want, torch.float32)
