"""The fused Triton dense scan against the plain-loop reference: loss and all gradients.

On a machine without CUDA the kernels run in the Triton interpreter (see conftest), so shapes stay
small; the tile shapes come from ``default_launch`` so that prefix boundaries can be put exactly on,
and strictly inside, latent tiles.
"""

import pytest
import torch

import matryoshka.loss
from matryoshka import Prefixes, SparseActs, matryoshka_loss
from matryoshka.kernels import dense_scan_op, sparse_scan_op
from matryoshka.kernels.dense_scan import default_launch
from matryoshka.loss import resolve_backend

from .conftest import DEVICE
from .helpers import assert_compiled_step_matches, assert_half_matches, assert_matches, half_and_oracle, make_problem, spy

FENCE = 256  # NaN elements on each side of every input in memory


def fenced(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` with NaN on both sides in memory: a read past either end that a
    mask should have stopped poisons the result."""
    flat = torch.full((t.numel() + 2 * FENCE,), float("nan"), dtype=t.dtype, device=t.device)
    flat[FENCE : FENCE + t.numel()] = t.reshape(-1)
    return flat[FENCE : FENCE + t.numel()].view(t.shape)


def make_dense_problem(B, d, n, dtype, bias=True, seed=0):
    """ReLU activations (about half exact zeros), plus an all-zero row and a dead latent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    acts = torch.relu(torch.randn(B, n, generator=g, dtype=torch.float64))
    acts[B // 2] = 0.0
    acts[:, n // 3] = 0.0
    tensors = [x, acts, W] + ([b] if bias else [])
    return [fenced(t.to(dtype=dtype, device=DEVICE)) for t in tensors] + ([] if bias else [None])


def run_dense(problem, prefixes, backend):
    """Loss, per-prefix losses and the gradients of x, acts, W_dec and (if any) b_dec."""
    leaves = [t.detach().requires_grad_() for t in problem if t is not None]
    x, acts, W = leaves[:3]
    b = leaves[3] if len(leaves) == 4 else None
    out = matryoshka_loss(x, acts, W, b, prefixes, backend=backend)
    out.loss.backward()
    return [out.loss.detach(), out.per_prefix] + [t.grad for t in leaves]


def prefix_sets(n: int, tile: int) -> dict[str, Prefixes]:
    """Boundaries on tile edges (0, tile, 2 tiles), strictly inside tiles, at n, and every latent."""
    g = torch.Generator().manual_seed(1)
    edges_and_inside = sorted({0, 1, tile - 1, tile, tile + 3, 2 * tile, n - 1, n} & set(range(n + 1)))
    return {
        "edges-and-inside": Prefixes(edges_and_inside, torch.rand(len(edges_and_inside), generator=g) + 0.5),
        "every+empty": Prefixes.every(n, torch.rand(n + 1, generator=g, dtype=torch.float64), include_empty=True),
        "longest-inside-a-tile": Prefixes([3, tile + 5]),
        "empty-only": Prefixes([0]),
        "full-only": Prefixes([n]),
    }


# (B, d, n): one d-chunk with B not a multiple of the row block; several d-chunks (non-power-of-two
# d and n) where every-latent prefixes overflow the deterministic buffers and add atomically.
SHAPES = [
    pytest.param(20, 24, 50, id="one-chunk"),
    pytest.param(37, 150, 80, id="several-chunks"),
]
PREFIX_SETS = ["edges-and-inside", "every+empty", "longest-inside-a-tile", "empty-only", "full-only"]


@pytest.mark.parametrize("prefix_set", PREFIX_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,d,n", SHAPES)
def test_matches_reference(B, d, n, dtype, prefix_set):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    prefixes = prefix_sets(n, default_launch(acc, B, d).latents)[prefix_set]
    problem = make_dense_problem(B, d, n, dtype)
    assert_matches(run_dense(problem, prefixes, "triton"), run_dense(problem, prefixes, "reference"), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_bias(dtype):
    # n small next to d: the activation gradient's per-chunk shares fit the deterministic buffer.
    problem = make_dense_problem(9, 300, 24, dtype, bias=False)
    prefixes = Prefixes.groups([5, 16, 24], [1.0, 0.5, 2.0])
    got, want = run_dense(problem, prefixes, "triton"), run_dense(problem, prefixes, "reference")
    assert_matches(got, want, dtype)
    assert len(got) == 5  # no b_dec gradient to compare


@pytest.mark.parametrize(
    "device_type,dense,want",
    [("cuda", True, "torch"), ("cuda", False, "triton"), ("cpu", True, "torch"), ("cpu", False, "torch")],
)
def test_auto_routing_rule(monkeypatch, device_type, dense, want):
    """``"auto"``: Triton only for sparse activations on CUDA; dense ones go to the PyTorch scan
    (cuBLAS GEMMs) until the dense kernel is measured faster.  ``"triton"`` is never overridden."""
    monkeypatch.setattr(matryoshka.loss, "_triton_available", lambda: True)
    device = torch.device(device_type)
    assert resolve_backend("auto", device, dense=dense) == want
    assert resolve_backend("torch", device, dense=dense) == "torch"
    if device_type == "cuda":
        assert resolve_backend("triton", device, dense=dense) == "triton"


@pytest.mark.parametrize("as_cuda", [False, True], ids=["device", "looks-like-cuda"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
def test_auto_runs_the_routed_scan(monkeypatch, dense, as_cuda):
    """``matryoshka_loss(backend="auto")`` tells ``resolve_backend`` whether ``acts`` are dense and runs
    the scan it picks; ``looks-like-cuda`` shows ``resolve_backend`` a CUDA device (the tensors stay
    where they are: the sparse Triton kernel runs in the interpreter without a GPU)."""
    calls: list[str] = []
    for module, name in [(matryoshka.loss, "dense_prefix_norms_torch"), (matryoshka.loss, "sparse_scan_torch"),
                         (dense_scan_op, "dense_prefix_norms_triton"), (sparse_scan_op, "sparse_scan_triton")]:
        spy(monkeypatch, module, name, calls)
    if as_cuda:
        real = resolve_backend
        monkeypatch.setattr(matryoshka.loss, "_triton_available", lambda: True)
        monkeypatch.setattr(matryoshka.loss, "resolve_backend",
                            lambda backend, device, dense: real(backend, torch.device("cuda"), dense=dense))
    p = make_problem(4, 12, 20, 3, torch.float64, DEVICE)
    acts = SparseActs(p.values, p.indices)
    acts = acts.to_dense(p.n) if dense else acts
    prefixes = Prefixes.groups([5, 20])
    got = matryoshka_loss(p.x, acts, p.W_dec, p.b_dec, prefixes, backend="auto")
    on_cuda = as_cuda or DEVICE == "cuda"
    if dense:
        assert calls == ["dense_prefix_norms_torch"]
    else:
        assert calls == ["sparse_scan_triton" if on_cuda else "sparse_scan_torch"]
    want = matryoshka_loss(p.x, acts, p.W_dec, p.b_dec, prefixes, backend="reference")
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_dense_scan(bias):
    import matryoshka.kernels.dense_scan_op  # noqa: F401  (registers the op)

    x, acts, W, *rest = make_dense_problem(5, 24, 40, torch.float64, bias=bias)
    args = (x.requires_grad_(), rest[0], W.requires_grad_(), acts.requires_grad_(), torch.tensor([0, 17, 40]))
    torch.library.opcheck(
        torch.ops.matryoshka.dense_scan.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_loss_inside_torch_compile():
    """The dense loss traces through dynamo with the op kept opaque (prefix lengths stay on the host)."""
    x, acts, W, b = make_dense_problem(6, 20, 30, torch.float32)
    prefixes = Prefixes.every(30)

    def step(x, acts, W, b):
        return matryoshka_loss(x, acts, W, b, prefixes, backend="triton").loss

    assert_compiled_step_matches(step, [x, acts, W, b])


def check_half_dense(B, d, n, dtype, prefixes):
    """The Triton dense scan on inputs rounded to ``dtype``, against the float64 oracle on the same
    rounded inputs (bounds in helpers; the kernel also rounds its GEMM operands to ``dtype``)."""
    half, oracle = half_and_oracle(make_dense_problem(B, d, n, torch.float32), dtype)
    got, want = run_dense(half, prefixes, "triton"), run_dense(oracle, prefixes, "reference")
    assert_half_matches(got, want, dtype, steps=int(prefixes.lengths[-1]), gemm_operands=True)


@pytest.mark.parametrize("every", [False, True], ids=["groups", "every"])
def test_float16_inputs_accumulate_in_float32(every):
    """Interpreter-sized float16 (bfloat16 ``tl.dot`` is wrong in the interpreter: GPU only, below)."""
    n = 50
    prefixes = Prefixes.every(n, include_empty=True) if every else Prefixes.groups([5, 16, 33, n])
    check_half_dense(20, 24, n, torch.float16, prefixes)


# ------------------------------------------------------------------------------- compiled (GPU)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("every", [False, True], ids=["groups", "every"])
def test_half_inputs_accumulate_in_float32(dtype, every):
    n = 1000
    prefixes = Prefixes.every(n, include_empty=True) if every else Prefixes.groups([64, 200, 513, n])
    check_half_dense(96, 300, n, dtype, prefixes)


@pytest.mark.gpu
@needs_gpu
def test_compiled_float32_every_prefix():
    B, d, n = 257, 777, 1031
    problem = make_dense_problem(B, d, n, torch.float32)
    prefixes = Prefixes.every(n, include_empty=True)
    got, want = run_dense(problem, prefixes, "triton"), run_dense(problem, prefixes, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


@pytest.mark.gpu
@needs_gpu
def test_memory_flat_in_number_of_prefixes():
    """Every-latent prefixes need only (B, G)-sized extras over one group: no (G, B, d) stack."""
    B, d, n = 512, 1024, 4096

    def peak(prefixes):
        problem = make_dense_problem(B, d, n, torch.float32)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_dense(problem, prefixes, "triton")
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    extra = peak(Prefixes.every(n)) - peak(Prefixes([n]))
    assert extra <= 8 * B * n * 4 + 4 * B * d * 4, extra


@pytest.mark.gpu
@needs_gpu
def test_int64_addressing():
    """W_dec with more than 2^31 elements: the last latent's row lies past a 32-bit offset."""
    B, d, n = 16, 4096, (1 << 19) + 3
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, d, device="cuda", generator=g)
    W = (torch.randn(n, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16).requires_grad_()
    acts = torch.rand(B, n, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    out = matryoshka_loss(x, acts, W, None, Prefixes([1024, n]), backend="triton")
    out.loss.backward()
    with torch.no_grad():
        residual = x - acts.float() @ W.float()  # prefix n; the only one holding latent n - 1
        want_loss = residual.pow(2).sum(1).mean()
        want_dlast = -2 * residual @ W[-1].float() / B
        want_dW_last = -2 * acts[:, -1].float() @ residual / B
    torch.testing.assert_close(out.per_prefix[-1], want_loss, rtol=1e-3, atol=0)
    for got, want in ((acts.grad[:, -1], want_dlast), (W.grad[-1], want_dW_last)):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
