"""The trainer and SAE keep every tensor on the SAE's device, and a sparse step decodes and counts
without a dense ``(B, n)`` tensor.

On the CPU, "off the SAE's device" is caught by making ``meta`` the default device: a tensor the
trainer, the SAE or the loss creates without naming its device lands on ``meta``, and the dispatch
mode below records it (mixing it with the SAE's CPU tensors would also raise).  Host-side
bookkeeping (prefix sets, random draws) names ``device="cpu"`` on purpose.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import matryoshka.sae as sae_module
import matryoshka.train as train_module
from matryoshka.sae import SAEConfig, SparseAutoencoder
from matryoshka.sparse_acts import SparseActs
from matryoshka.toy import ToyModel, nabeshima_spec
from matryoshka.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class _RecordOutputs(TorchDispatchMode):
    """Records ``(op, device, shape)`` of every tensor every aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.device, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.extend((str(func), t.device, tuple(t.shape)) for t in _outputs(out))
        return out


def _toy_sampler():
    toy = ToyModel(nabeshima_spec())

    def sample(rows: int, generator: torch.Generator) -> torch.Tensor:
        with torch.device("cpu"):  # the user's data pipeline lives on the host
            return toy.sample(rows, generator)[0]

    return toy, sample


@pytest.mark.parametrize("activation, mode", [
    ("topk", "sampled"), ("batchtopk", "every"), ("relu", "groups"), ("jumprelu", "sampled"),
])
def test_no_state_is_created_off_the_sae_device(monkeypatch, activation, mode):
    toy, sample = _toy_sampler()
    k = 2 if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(SAEConfig(d=toy.d, n=12, activation=activation, k=k),
                            torch.Generator().manual_seed(0))
    # Adam's own scalar step counter is torch's business, not ours: let it use the real default.
    adam_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **kw: _on_cpu(adam_step, self, *a, **kw))
    config = TrainConfig(steps=12, batch_size=16, log_every=5, resort_every=4, dead_after=3, aux_k=2,
                         data_chunk_steps=4, target_l0=1.0, progress=False, prefix_mode=mode)
    recorder = _RecordOutputs()
    with torch.device("meta"), recorder:
        result = train(sae, sample, config)
    off_device = sorted({op for op, device, _ in recorder.seen if device != torch.device("cpu")})
    assert not off_device, f"tensors created off the SAE's device by: {off_device}"
    assert len(result.history) == 3 and len(recorder.seen) > 0


def _on_cpu(fn, *args, **kwargs):
    with torch.device("cpu"):
        return fn(*args, **kwargs)


B, N, D, K = 24, 40, 7, 3  # B * N is larger than any tensor a sparse decode or statistic needs


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_step_decodes_and_counts_without_a_dense_matrix(monkeypatch, activation):
    """Selection (pre-activations, TopK, BatchTopK, the AuxK choice) may touch ``(B, n)``; the
    decodes, the loss, L0 and the firing statistics of a sparse step must not."""
    watched: dict[str, int] = {}

    def watch(name, fn):
        def wrapper(*args, **kwargs):
            recorder = _RecordOutputs()
            with recorder:
                out = fn(*args, **kwargs)
            watched[name] = watched.get(name, 0) + 1
            dense = [(op, shape) for op, _, shape in recorder.seen if B * N <= _numel(shape)]
            assert not dense, f"{name} built a (B, n)-sized tensor: {dense}"
            return out
        return wrapper

    monkeypatch.setattr(SparseActs, "decode", watch("SparseActs.decode", SparseActs.decode))
    monkeypatch.setattr(sae_module, "matryoshka_loss", watch("matryoshka_loss", sae_module.matryoshka_loss))
    monkeypatch.setattr(train_module, "_mean_l0", watch("L0", train_module._mean_l0))
    monkeypatch.setattr(train_module._LatentStats, "update",
                        watch("latent statistics", train_module._LatentStats.update))
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(N, D, generator=g)

    def sample(rows, generator):
        return torch.rand(rows, N, generator=generator).pow(8) @ basis

    sae = SparseAutoencoder(SAEConfig(d=D, n=N, activation=activation, k=K), torch.Generator().manual_seed(1))
    config = TrainConfig(steps=6, batch_size=B, log_every=3, dead_after=2, aux_k=4, data_chunk_steps=3,
                         progress=False, prefix_mode="every")
    result = train(sae, sample, config)
    assert result.history[-1]["dead"] >= 0
    assert set(watched) == {"SparseActs.decode", "matryoshka_loss", "L0", "latent statistics"}
    assert watched["SparseActs.decode"] >= 2 * config.steps, "the SAE output and the AuxK loss decode sparsely"


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def test_sparse_decode_equals_dense_decode():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[3, 0, -1, 7], [1, 2, 3, 4], [-1, -1, -1, -1], [9, 8, 7, 6], [5, -1, 2, -1]])
    W = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    acts = SparseActs(values, indices)
    got = acts.decode(W)
    want = acts.to_dense(10) @ W
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    grads = torch.autograd.grad(got.sin().sum(), (values, W))
    wants = torch.autograd.grad(want.sin().sum(), (values, W))
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    assert float(grads[0][indices < 0].abs().sum()) == 0.0, "padding slots get no gradient"


def test_batchtopk_rows_grow_at_read_out_and_count_what_they_dropped():
    sae = SparseAutoencoder(SAEConfig(d=D, n=N, activation="batchtopk", k=2), torch.Generator().manual_seed(0))
    pre = torch.zeros(4, N)
    pre[0, :3] = torch.tensor([3.0, 2.0, 1.0])  # widest row: 3 kept, sizes rows at ceil(1.5 * 3) = 5
    pre[1, 5] = 0.5
    sae.activate(pre)
    assert sae.row_width == 5
    crowded = torch.zeros(4, N)
    crowded[0, :8] = torch.arange(8, 0, -1).float()  # 8 = k * B kept in one row: 3 do not fit
    acts = sae.activate(crowded)
    assert acts.shape == (4, 5)
    assert acts.values[0].tolist() == [8.0, 7.0, 6.0, 5.0, 4.0], "a crowded row keeps its largest"
    assert sae.row_stats().tolist() == [8, 3]
    sae.activate(pre)  # a narrower batch after the crowded one: the widest row seen stays 8
    assert sae.row_stats().tolist() == [8, 3]
    sae.update_row_width(8)
    assert sae.row_width == 12 and sae.row_stats().tolist() == [0, 0]
    assert sae.activate(crowded).shape == (4, 12)


def test_training_logs_batchtopk_drops():
    _, sample = _toy_sampler()
    sae = SparseAutoencoder(SAEConfig(d=20, n=20, activation="batchtopk", k=2), torch.Generator().manual_seed(0))
    result = train(sae, sample, TrainConfig(steps=20, batch_size=32, log_every=10, progress=False))
    assert all(row["batchtopk_dropped"] >= 0 for row in result.history)
    assert sae.row_width is not None and 2 <= sae.row_width <= 20


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [{}, {"orthogonality_coeff": 0.5, "orthogonality_chunk": 8},
                                      {"resample_every": 5, "dead_after": 5}],
                         ids=["plain", "orthogonality_chunks", "resampling"])
def test_cuda_training_follows_the_cpu_run(settings):
    """100 steps on CUDA and on the CPU from the same initialisation and the same (host-drawn) data:
    the logged losses agree to 5% relative (float32 rounding and TF32-free kernels differ only in
    summation order; 5% leaves room for the divergence that compounds over 100 Adam steps).  Between
    read-outs the step must not synchronise with the host (CUDA sync debug mode counts it), also
    with the decoder orthogonality penalty in host-drawn random chunks (20 latents, chunks of <= 8)
    and with dead latents restarted (4 restarts in the CPU run)."""
    toy, sample = _toy_sampler()
    histories = {}
    for device in ("cpu", "cuda"):
        sae = SparseAutoencoder(SAEConfig(d=toy.d, n=20, activation="topk", k=2), torch.Generator().manual_seed(0))
        sae.to(device)
        config = TrainConfig(steps=100, log_every=10, progress=False, prefix_mode="sampled", **settings)
        sync_warnings = contextlib.nullcontext()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            sync_warnings = warnings.catch_warnings(record=True)
        try:
            with sync_warnings as caught:
                histories[device] = train(sae, sample, config).history
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for tensor in list(sae.parameters()) + list(sae.buffers()):
            assert tensor.device.type == device
        if device == "cuda":
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= len(histories[device]), f"{len(syncs)} host syncs in 10 read-outs"
    for cpu_row, gpu_row in zip(histories["cpu"], histories["cuda"]):
        assert gpu_row["loss"] == pytest.approx(cpu_row["loss"], rel=5e-2), (cpu_row, gpu_row)
    if settings.get("resample_every"):
        assert histories["cpu"][-1]["resampled"] >= 1 and histories["cuda"][-1]["resampled"] >= 1
