"""Every malformed argument gets a TypeError/ValueError that names it."""

import pytest
import torch

from matryoshka import MatryoshkaLoss, Prefixes, SparseActs, matryoshka_loss


def good(B=3, d=8, n=10, k=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(n, d, generator=g)
    b = torch.randn(d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    return dict(x=x, acts=SparseActs(torch.rand(B, k, generator=g), idx), W_dec=W, b_dec=b, prefixes=Prefixes([5, 10]))


def call(**overrides):
    kw = good()
    kw.update(overrides)
    return matryoshka_loss(kw.pop("x"), kw.pop("acts"), kw.pop("W_dec"), kw.pop("b_dec"), kw.pop("prefixes"), **kw)


def acts_with(values=None, indices=None):
    a = good()["acts"]
    return SparseActs(a.values if values is None else values, a.indices if indices is None else indices)


CASES = [
    (dict(x=torch.randn(3, 8, 1)), ValueError, "`x`"),
    (dict(x=torch.randn(4, 8)), ValueError, "acts.values"),
    (dict(x=torch.randn(3, 9)), ValueError, "`W_dec`"),
    (dict(W_dec=torch.randn(10)), ValueError, "`W_dec`"),
    (dict(b_dec=torch.randn(9)), ValueError, "`b_dec`"),
    (dict(b_dec=torch.randn(1, 8)), ValueError, "`b_dec`"),
    (dict(x=torch.randint(0, 3, (3, 8))), TypeError, "`x`"),
    (dict(W_dec=torch.randn(10, 8).long()), TypeError, "`W_dec`"),
    (dict(b_dec=torch.zeros(8, dtype=torch.int32)), TypeError, "`b_dec`"),
    (dict(acts=acts_with(values=torch.ones(3, 3, dtype=torch.int64))), TypeError, "acts.values"),
    (dict(acts=acts_with(indices=torch.zeros(3, 3, dtype=torch.int32))), TypeError, "acts.indices"),
    (dict(acts=acts_with(indices=torch.zeros(3, 4, dtype=torch.int64))), ValueError, "acts.indices"),
    (dict(acts=acts_with(values=torch.rand(3))), ValueError, "acts.values"),
    (dict(acts=acts_with(indices=torch.tensor([[0, 1, 10], [0, 1, 2], [0, 1, 2]]))), ValueError, "acts.indices"),
    (dict(acts=acts_with(indices=torch.tensor([[0, 1, -2], [0, 1, 2], [0, 1, 2]]))), ValueError, "acts.indices"),
    (dict(acts=acts_with(indices=torch.tensor([[4, 1, 4], [0, 1, 2], [0, 1, 2]]))), ValueError, "repeat"),
    (dict(acts=torch.rand(3, 9)), ValueError, "dense `acts`"),
    (dict(acts=[1, 2]), TypeError, "`acts`"),
    (dict(W_dec=torch.randn(10, 8, dtype=torch.complex64)), TypeError, "`W_dec`"),
    (dict(rescale_acts_by_decoder_norm=1), TypeError, "rescale_acts_by_decoder_norm"),
    (dict(prefixes=Prefixes([5, 11])), ValueError, "n = 10"),
    (dict(prefixes=[5, 10]), TypeError, "`prefixes`"),
    (dict(backend="cuda"), ValueError, "`backend`"),
    (dict(x=torch.randn(3, 8, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("overrides,error,needle", CASES)
def test_bad_input_is_named(overrides, error, needle):
    with pytest.raises(error, match=needle.replace("(", r"\(").replace("`", "`")):
        call(**overrides)


@pytest.mark.parametrize(
    "args,error,needle",
    [
        (dict(lengths=[3, 3]), ValueError, "strictly increasing"),
        (dict(lengths=[4, 2]), ValueError, "strictly increasing"),
        (dict(lengths=[-1, 2]), ValueError, ">= 0"),
        (dict(lengths=[]), ValueError, "at least one"),
        (dict(lengths=[[1, 2]]), ValueError, "1-D"),
        (dict(lengths=[1.0, 2.0]), TypeError, "integers"),
        (dict(lengths=[1, 2], weights=[1.0]), ValueError, "shape"),
        (dict(lengths=[1, 2], weights=[1.0, -1.0]), ValueError, ">= 0"),
        (dict(lengths=[1, 2], weights=[1.0, float("inf")]), ValueError, "finite"),
        (dict(lengths=[1, 2], weights=[1.0, float("nan")]), ValueError, "finite"),
    ],
)
def test_bad_prefixes_are_named(args, error, needle):
    with pytest.raises(error, match=needle):
        Prefixes(**args)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_validate_false_skips_index_checks(backend):
    """A repeated index raises with validate=True; with validate=False it is not checked and both
    slots count, as if their values were added: the loss of the summed dense activations."""
    kw = good()
    x, W, b, prefixes = kw["x"].double(), kw["W_dec"].double(), kw["b_dec"].double(), kw["prefixes"]
    acts = acts_with(indices=torch.tensor([[4, 1, 4], [0, 1, 2], [0, 1, 2]]))
    acts = SparseActs(acts.values.double(), acts.indices)
    with pytest.raises(ValueError, match="repeat"):
        matryoshka_loss(x, acts, W, b, prefixes, backend=backend, validate=True)
    got = matryoshka_loss(x, acts, W, b, prefixes, backend=backend, validate=False)
    dense = torch.zeros(3, 10, dtype=torch.float64).index_put_(
        (torch.arange(3).repeat_interleave(3), acts.indices.flatten()), acts.values.flatten(), accumulate=True
    )
    assert dense[0, 4] == acts.values[0, 0] + acts.values[0, 2]
    per_prefix = torch.stack([((x - b - dense[:, :m] @ W[:m]) ** 2).sum(1).mean() for m in prefixes.lengths.tolist()])
    torch.testing.assert_close(got.per_prefix, per_prefix)
    torch.testing.assert_close(got.loss, (per_prefix * prefixes.weights.double()).sum())


def test_triton_on_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call(backend="triton")


def test_module_checks_prefixes():
    with pytest.raises(TypeError, match="`prefixes` must be a matryoshka.Prefixes, got list"):
        MatryoshkaLoss([1, 2])
