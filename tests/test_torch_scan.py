"""The PyTorch scans' own bookkeeping, against the reference: row blocks and the dense latent blocks
shrunk so that small problems cross many block edges, half-precision inputs against a float64
oracle, and padding at ``n = 1``.

The other loss tests run these scans at sizes that fit one row block (``_BLOCK_ELEMENTS`` elements)
and one dense block (``_DENSE_BLOCK`` latents), where a wrong block edge cannot show.
"""

from dataclasses import replace

import pytest
import torch

from matryoshka import Prefixes, matryoshka_loss, SparseActs
from matryoshka import torch_scan

from .helpers import assert_compiled_step_matches, assert_half_matches, assert_matches, half_and_oracle, make_problem, run_loss

DETACH = [pytest.param(False, id="plain"), pytest.param(True, id="detached")]


def sparse_prefix_sets(n: int) -> dict[str, Prefixes]:
    g = torch.Generator().manual_seed(5)
    return {
        "every+empty": Prefixes.every(n, torch.rand(n + 1, generator=g, dtype=torch.float64), include_empty=True),
        "groups": Prefixes([2, 5, n], [1.0, 0.5, 2.0]),
    }


@pytest.mark.parametrize("detach", DETACH)
def test_sparse_scan_across_row_blocks(monkeypatch, detach):
    """Blocks of 3 rows over 11 rows (the last one short), rows sorted by their number of active
    slots so that every block has its own live rows per slot, padded rows included."""
    d = 5
    monkeypatch.setattr(torch_scan, "_BLOCK_ELEMENTS", 3 * d)
    assert [(s.start, s.stop) for s in torch_scan._row_blocks(11, d)] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    p = make_problem(11, d, 9, 4, torch.float64, pad_fraction=0.4, padding_rows=(2, 7), seed=3)
    for name, prefixes in sparse_prefix_sets(p.n).items():
        got = run_loss(p, prefixes, "torch", detach=detach)
        want = run_loss(p, prefixes, "reference", detach=detach)
        try:
            assert_matches(got, want, torch.float64)
        except AssertionError as e:
            raise AssertionError(f"prefixes={name}: {e}") from None
    acts = SparseActs(p.values, p.indices)
    rec = matryoshka_loss(p.x, acts, p.W_dec, p.b_dec, Prefixes([p.n]), backend="torch", detach=detach).reconstruction
    torch.testing.assert_close(rec, acts.decode(p.W_dec) + p.b_dec, rtol=0, atol=1e-12)


def dense_prefix_sets(n: int, block: int) -> dict[str, Prefixes]:
    """Lengths a block apart (each a block of its own: 0, block, 2 blocks, 3 blocks), two close
    lengths sharing a block (past an edge, inside one block, and 3 blocks with n), every latent, and
    (with ``_DENSE_GAP`` 3) uneven gaps: three close lengths, then a pair, then a length that joins
    the one before."""
    g = torch.Generator().manual_seed(7)
    return {
        "every+empty": Prefixes.every(n, torch.rand(n + 1, generator=g, dtype=torch.float64), include_empty=True),
        "block-edges": Prefixes([0, block, 2 * block, 3 * block, n], [1.0, 0.5, 2.0, 1.5, 1.0]),
        "past-an-edge": Prefixes([block + 1, n], [1.0, 2.0]),
        "inside-one-block": Prefixes([block + 1, block + 3]),
        "edge-only": Prefixes([2 * block]),
        "empty-only": Prefixes([0]),
        "uneven-gaps": Prefixes([1, 2, 3, 6, 7, 11, 13], [1.0, 0.5, 2.0, 1.5, 1.0, 0.7, 1.2]),
    }


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("detach", DETACH)
def test_dense_scan_across_latent_blocks(monkeypatch, detach, bias):
    """Blocks of 4 latents over n = 13 (the last one short), a length 3 past the one before in a
    block of its own, with and without ``b_dec``."""
    monkeypatch.setattr(torch_scan, "_DENSE_BLOCK", 4)
    monkeypatch.setattr(torch_scan, "_DENSE_GAP", 3)
    assert torch_scan._dense_blocks((1, 2, 3, 6, 7, 11, 13)) == ((1, 0, (0, 1, 2)), (6, 3, (0, 1)), (11, 5, (0, 2)))
    p = make_problem(6, 7, 13, 9, torch.float64, pad_fraction=0.2, bias=bias, seed=4)
    for name, prefixes in dense_prefix_sets(p.n, 4).items():
        got = run_loss(p, prefixes, "torch", dense=True, detach=detach)
        want = run_loss(p, prefixes, "reference", dense=True, detach=detach)
        try:
            assert_matches(got, want, torch.float64)
        except AssertionError as e:
            raise AssertionError(f"prefixes={name}: {e}") from None


def test_dense_block_plan(monkeypatch):
    """A block takes the next lengths while each is less than ``_DENSE_GAP`` past the one before and
    less than ``_DENSE_BLOCK`` past the block's start; ``(start, index of its first length, offsets)``."""
    monkeypatch.setattr(torch_scan, "_DENSE_BLOCK", 128)
    monkeypatch.setattr(torch_scan, "_DENSE_GAP", 32)
    assert torch_scan._dense_blocks((0, 1, 2, 33, 65, 72, 73, 200, 327, 328, 400)) == (
        (0, 0, (0, 1, 2, 33)), (65, 4, (0, 7, 8)), (200, 7, (0,)), (327, 8, (0, 1)), (400, 10, (0,)))
    every = torch_scan._dense_blocks(tuple(range(301)))
    assert [(start, first, offsets[-1]) for start, first, offsets in every] == [(0, 0, 127), (128, 128, 127), (256, 256, 44)]
    assert torch_scan._dense_blocks((5, 36, 67, 98, 129, 133)) == ((5, 0, (0, 31, 62, 93, 124)), (133, 5, (0,)))


@pytest.mark.parametrize("rescale", [False, True], ids=["", "rescaled"])
@pytest.mark.parametrize("detach", DETACH)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype, dense, detach, rescale):
    """Half inputs: the loss in float32 and each gradient in its input's dtype, within the bounds of a
    float32-accumulated scan of the same half-rounded inputs (``tests/helpers.py``); decoder-norm
    rescaling computes its norms in float32 too."""
    p = make_problem(9, 12, 20, 5, torch.float64, pad_fraction=0.2, seed=6)
    half, oracle = half_and_oracle([p.x, p.values, p.W_dec, p.b_dec], dtype)
    fields = ["x", "values", "W_dec", "b_dec"]
    prefixes = Prefixes.every(p.n, include_empty=True)
    options = dict(dense=dense, detach=detach, rescale_acts_by_decoder_norm=rescale)
    got = run_loss(replace(p, **dict(zip(fields, half))), prefixes, "torch", **options)
    want = run_loss(replace(p, **dict(zip(fields, oracle))), prefixes, "reference", **options)
    assert_half_matches(got, want, dtype, steps=p.n if dense else p.values.shape[1] + 1,
                        w_dec_roundings=2 if rescale else 1)


@pytest.mark.parametrize("detach", DETACH)
def test_one_latent_with_padding_and_an_unchecked_out_of_range_index(detach):
    """``n = 1``: padded slots must not read a row that does not exist, and with ``validate=False``
    an index equal to ``n`` is inactive like padding (loss and every gradient)."""
    p = make_problem(4, 6, 1, 1, torch.float64, padding_rows=(1, 3), seed=8)
    prefixes = Prefixes([0, 1], [1.0, 2.0])
    want = run_loss(p, prefixes, "reference", detach=detach)
    assert_matches(run_loss(p, prefixes, "torch", detach=detach), want, torch.float64)
    out_of_range = replace(p, indices=p.indices.masked_fill(p.indices < 0, p.n))
    assert_matches(run_loss(out_of_range, prefixes, "torch", validate=False, detach=detach), want, torch.float64)


def _saved_for_backward_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``'s output."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("detach", DETACH)
def test_dense_scan_keeps_one_residual_whatever_the_number_of_prefixes(monkeypatch, detach):
    """The dense scans save the inputs, one ``(B, d)`` residual and the lengths for their backward,
    however many prefixes there are: every latent a prefix saves what one prefix does (under plain
    autograd the scan kept a residual per latent block, the detached one a residual per level)."""
    monkeypatch.setattr(torch_scan, "_DENSE_BLOCK", 4)
    B, d, n = 16, 24, 40
    g = torch.Generator().manual_seed(9)
    x, W, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((B, d), (n, d), (d,)))
    acts = torch.rand(B, n, generator=g, dtype=torch.float64).requires_grad_()
    scan = torch_scan.dense_prefix_norms_detached_torch if detach else torch_scan.dense_prefix_norms_torch
    kept = (n * d + B * n + B * d) * 8  # W_dec, acts (the inputs themselves) and one residual
    for G in (1, 5, n):
        saved = _saved_for_backward_bytes(lambda: scan(x, b, W, acts, torch.linspace(0, n, G + 1).long()[1:]))
        assert saved == kept + (0 if detach else 8 * G), G  # (the plain scan also keeps the lengths, to index with)


@pytest.mark.parametrize("detach", DETACH)
def test_dense_torch_loss_inside_torch_compile(detach):
    """The dense loss on the PyTorch scan traces whole (``fullgraph``): its block plan comes from
    ``Prefixes.host_lengths``, constants to dynamo, not from a tensor's values."""
    g = torch.Generator().manual_seed(10)
    x, W, b = torch.randn(6, 20, generator=g), torch.randn(30, 20, generator=g), torch.randn(20, generator=g)
    acts = torch.relu(torch.randn(6, 30, generator=g))
    for prefixes in (Prefixes.every(30), Prefixes([3, 17, 30])):
        def step(x, acts, W, b):
            return matryoshka_loss(x, acts, W, b, prefixes, backend="torch", detach=detach).loss

        assert_compiled_step_matches(step, [x, acts, W, b])
