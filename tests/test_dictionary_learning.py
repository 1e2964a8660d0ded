"""The dictionary_learning integration against dictionary_learning itself (skipped without it).

Errors are relative: ``max |fused - stock| / max |stock|`` per tensor.  Tiny sizes (activation_dim 16,
dict_size 64 in groups of 8, 16 and 40, k = 2, batch 16: at most 32 latents fire, so forced dead
latents stay dead) keep the file fast.
"""

import importlib

import pytest
import torch

pytest.importorskip("einops")
if importlib.util.find_spec("dictionary_learning") is None:
    pytest.skip("dictionary-learning is not installed", allow_module_level=True)

from matryoshka import Prefixes, matryoshka_loss  # noqa: E402
from matryoshka.integrations.dictionary_learning import FusedMatryoshkaBatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer  # noqa: E402

from .helpers import assert_core_imports_without, assert_missing_package_hint  # noqa: E402

D, F, K, BATCH = 16, 64, 2, 16
FRACTIONS = [0.125, 0.25, 0.625]  # groups of 8, 16 and 40 latents
STEP = 5  # past threshold_start_step: every loss call updates the threshold
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# The auxiliary loss runs in float32 in both trainers (the stock one casts with .float()), so with dead
# latents float64 runs agree only to float32 rounding.
AUX_TOLERANCE = 1e-5
LOGGED = ["l2_loss", "auxk_loss", "loss", "min_l2_loss", "max_l2_loss"]


def _trainer(cls, dtype, **kwargs):
    options = {"warmup_steps": 2, "threshold_start_step": 2, "device": "cpu", **kwargs}
    trainer = cls(steps=200, activation_dim=D, dict_size=F, k=K, layer=0, lm_name="toy",
                  group_fractions=FRACTIONS, **options)
    trainer.ae.to(dtype)
    return trainer


def _pair(dtype, fused_kwargs=None, dead=None, active_groups=None, **kwargs):
    """A stock trainer (biases randomised, so that every term is non-trivial) and a fused copy, with
    the latents of ``dead`` past the dead-feature threshold."""
    torch.manual_seed(0)
    stock = _trainer(MatryoshkaBatchTopKTrainer, dtype, **kwargs)
    with torch.no_grad():
        for p in stock.ae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = _trainer(FusedMatryoshkaBatchTopKTrainer, dtype, **kwargs, **(fused_kwargs or {}))
    fused.ae.load_state_dict(stock.ae.state_dict())
    for trainer in (stock, fused):
        if dead is not None:
            trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold
        if active_groups is not None:
            trainer.ae.active_groups = active_groups
    return stock, fused


def _rel(actual, expected):
    actual = actual.detach() if isinstance(actual, torch.Tensor) else actual
    expected = expected.detach() if isinstance(expected, torch.Tensor) else expected
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def _grads(trainer, x):
    loss = trainer.loss(x, step=STEP)
    loss.backward()
    return loss, {name: p.grad.clone() for name, p in trainer.ae.named_parameters()}


CASES = {
    "default": {},
    "dead": {"dead": torch.arange(F) % 3 == 0},  # 22 dead latents: more than top_k_aux = 8
    "few_dead": {"dead": torch.arange(F) == 50},  # k_aux = 1
    "group_weights": {"group_weights": [0.5, 2.0, 1.5]},
    "two_active_groups": {"active_groups": 2, "dead": torch.arange(F) % 3 == 0},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_stock_trainer(one_thread, dtype, case):
    """Loss, every logged loss (same names, same order), the threshold update, the dead-latent
    counters and every parameter gradient equal the stock trainer's."""
    x = torch.randn(BATCH, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    stock, fused = _pair(dtype, **CASES[case])
    (expected, expected_grads), (actual, actual_grads) = _grads(stock, x), _grads(fused, x)
    errors = {"loss": _rel(actual.detach(), expected.detach())}
    errors |= {f"grad/{name}": _rel(actual_grads[name], expected_grads[name]) for name in expected_grads}
    errors["threshold"] = _rel(fused.ae.threshold, stock.ae.threshold)
    assert torch.equal(fused.num_tokens_since_fired, stock.num_tokens_since_fired)
    assert (fused.dead_features, fused.effective_l0) == (stock.dead_features, stock.effective_l0)
    if "dead" in CASES[case]:
        assert stock.dead_features > 0 and stock.pre_norm_auxk_loss > 0
        errors["pre_norm_auxk_loss"] = _rel(fused.pre_norm_auxk_loss.detach(), stock.pre_norm_auxk_loss.detach())
    else:
        assert fused.pre_norm_auxk_loss == stock.pre_norm_auxk_loss == -1
    stock, fused = _pair(dtype, **CASES[case])  # the logging call, from the same state
    expected_log, actual_log = stock.loss(x, step=STEP, logging=True), fused.loss(x, step=STEP, logging=True)
    assert list(actual_log.losses) == list(expected_log.losses) == LOGGED
    errors |= {f"losses/{name}": _rel(actual_log.losses[name], value) for name, value in expected_log.losses.items()}
    errors["x_hat"] = _rel(actual_log.x_hat, expected_log.x_hat.detach())
    assert torch.equal(actual_log.f, expected_log.f) and actual_log.x is x
    tolerance = AUX_TOLERANCE if "dead" in CASES[case] else TOLERANCE[dtype]
    worst = max(errors, key=errors.get)
    print(f"{case} {dtype}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= tolerance, f"{case} {dtype}: {worst} off by {errors[worst]:.2e}"
    if "dead" in CASES[case]:  # the terms without the auxiliary loss still agree to rounding
        assert _rel(actual_log.losses["l2_loss"], expected_log.losses["l2_loss"]) <= TOLERANCE[dtype]


def _data(dtype, steps):
    """A fixed stream of sparse combinations of 48 random directions plus noise."""
    generator = torch.Generator().manual_seed(2)
    features = torch.nn.functional.normalize(torch.randn(48, D, generator=generator, dtype=torch.float64), dim=1)
    for _ in range(steps):
        codes = torch.rand(BATCH, 48, generator=generator, dtype=torch.float64)
        codes = codes * (torch.rand(BATCH, 48, generator=generator) < 0.08)
        yield (codes @ features + 0.01 * torch.randn(BATCH, D, generator=generator, dtype=torch.float64)).to(dtype)


def _train(cls, dtype, steps, dead_after):
    torch.manual_seed(0)
    initial = _trainer(MatryoshkaBatchTopKTrainer, dtype).ae.state_dict()
    trainer = _trainer(cls, dtype, threshold_start_step=20, warmup_steps=10)
    trainer.ae.load_state_dict(initial)
    trainer.dead_feature_threshold = dead_after
    losses, dead = [], []
    for step, x in enumerate(_data(dtype, steps)):
        losses.append(trainer.update(step, x))
        dead.append(trainer.dead_features)
    return trainer, losses, dead


# Adam turns rounding into parameter differences: a gradient entry that is a sum with cancellation
# carries a large relative rounding error, and Adam's first steps move each parameter by about the
# learning rate whatever its gradient's size.  Measured fused vs stock after 120 steps: 5.8e-13 in
# float64; 2.4e-5 in float32, where the stock float32 run is itself 4e-4 away from the stock float64
# run; 8e-9 in float64 with dead latents (the auxiliary loss is float32 in both trainers).
@pytest.mark.parametrize(
    ("dtype", "dead_after", "tolerance"),
    [(torch.float64, 10**7, 1e-11), (torch.float32, 10**7, 1e-4), (torch.float64, 4 * BATCH, 1e-6),
     (torch.float32, 4 * BATCH, 1e-4)],
    ids=["float64", "float32", "float64-dead-latents", "float32-dead-latents"],
)
def test_training_matches_stock(one_thread, dtype, dead_after, tolerance):
    """120 ``update`` steps (geometric-median init, warmup, threshold from step 21, Adam, clipping,
    unit-norm decoder) from the same weights on the same data end at the stock trainer's parameters,
    threshold and dead-latent counters, with the same loss at every step.  ``dead_after = 4 * BATCH``
    tokens: latents that miss 4 batches are dead, so the auxiliary loss takes part."""
    stock, expected_losses, expected_dead = _train(MatryoshkaBatchTopKTrainer, dtype, 120, dead_after)
    fused, actual_losses, actual_dead = _train(FusedMatryoshkaBatchTopKTrainer, dtype, 120, dead_after)
    assert actual_dead == expected_dead
    assert sum(d > 0 for d in expected_dead) > (100 if dead_after < 10**7 else -1)
    assert torch.equal(fused.num_tokens_since_fired, stock.num_tokens_since_fired)
    errors = {"losses": _rel(actual_losses, expected_losses)}
    expected = stock.ae.state_dict()
    errors |= {name: _rel(value, expected[name]) for name, value in fused.ae.state_dict().items()}
    worst = max(errors, key=errors.get)
    print(f"{dtype} dead_after={dead_after}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= tolerance, f"{worst} off by {errors[worst]:.2e}"


def _reference(trainer, x, prefixes):
    f = trainer.ae.encode(x, use_threshold=False)
    return matryoshka_loss(x, f, trainer.ae.W_dec, trainer.ae.b_dec, prefixes, backend="reference")


def test_every_prefix_equals_reference_op(one_thread):
    """``matryoshka_prefixes="every"`` with level weights: the loss is the reference op's mean of the
    weighted losses of the prefixes 1..dict_size, with its gradients; the logged min/max are over
    those weighted losses."""
    weights = torch.rand(F, generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()
    _, fused = _pair(torch.float64, {"matryoshka_prefixes": "every", "matryoshka_level_weights": weights})
    x = torch.randn(BATCH, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = fused.ae.state_dict()
    actual, actual_grads = _grads(fused, x)
    fused.ae.zero_grad()
    fused.ae.load_state_dict(state)  # the threshold as before the call
    expected = _reference(fused, x, Prefixes.every(F, [w / F for w in weights]))
    expected.loss.backward()
    assert _rel(actual.detach(), expected.loss) <= 1e-12
    for name, p in fused.ae.named_parameters():
        assert _rel(actual_grads[name], p.grad) <= 1e-12, name
    fused.ae.load_state_dict(state)
    log = fused.loss(x, step=STEP, logging=True)
    weighted = _reference(fused, x, Prefixes.every(F)).per_prefix * torch.tensor(weights, dtype=torch.float64)
    assert _rel(log.losses["l2_loss"], weighted.mean()) <= 1e-12
    assert _rel(log.losses["min_l2_loss"], weighted.min()) <= 1e-12
    assert _rel(log.losses["max_l2_loss"], weighted.max()) <= 1e-12


def test_every_prefix_default_weights_and_active_groups(one_thread):
    """Default weights 1/dict_size; with fewer active groups only the prefixes up to their end count."""
    x = torch.randn(BATCH, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for active_groups, end in [(None, F), (2, 24)]:
        _, fused = _pair(torch.float64, {"matryoshka_prefixes": "every"}, active_groups=active_groups)
        state = fused.ae.state_dict()
        actual = fused.loss(x, step=STEP)
        fused.ae.load_state_dict(state)
        per_prefix = _reference(fused, x, Prefixes.every(end)).per_prefix
        assert _rel(actual.detach(), per_prefix.mean() / F) <= 1e-12, active_groups


def test_config_names_the_fused_trainer():
    _, fused = _pair(torch.float32, {"matryoshka_prefixes": "every", "matryoshka_backend": "torch"})
    config = fused.config
    assert config["trainer_class"] == "FusedMatryoshkaBatchTopKTrainer"
    assert config["dict_class"] == "MatryoshkaBatchTopKSAE"  # dictionary_learning.utils loads it as usual
    assert (config["matryoshka_prefixes"], config["matryoshka_backend"]) == ("every", "torch")
    assert config["matryoshka_level_weights"] == [1 / F] * F


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"matryoshka_prefixes": "all"}, ValueError, "matryoshka_prefixes must be one of"),
        ({"matryoshka_backend": "cuda"}, ValueError, "matryoshka_backend must be one of"),
        ({"matryoshka_level_weights": [1.0] * F}, ValueError, "only for matryoshka_prefixes='every'"),
        ({"matryoshka_prefixes": "every", "matryoshka_level_weights": [1.0] * 3}, ValueError, "must have 64 entries"),
        ({"matryoshka_prefixes": "every", "matryoshka_level_weights": [-1.0] * F}, ValueError, "finite and >= 0"),
        ({"matryoshka_prefixes": "every", "matryoshka_level_weights": [float("nan")] * F}, ValueError, "finite"),
        ({"matryoshka_prefixes": "every", "matryoshka_level_weights": ["1"] * F}, TypeError, "only numbers"),
        ({"matryoshka_prefixes": "every", "matryoshka_level_weights": 1.0}, TypeError, "list of numbers"),
        ({"group_weights": [1.0, -1.0, 1.0]}, ValueError, "group_weights must be finite and >= 0"),
    ],
)
def test_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        _trainer(FusedMatryoshkaBatchTopKTrainer, torch.float32, **kwargs)


def test_package_without_nnsight_explains_missing_names():
    if importlib.util.find_spec("nnsight") is not None:
        pytest.skip("nnsight is installed: dictionary_learning imported with its __init__")
    import dictionary_learning

    assert dictionary_learning.dictionary.Dictionary is not None  # loaded before __init__ failed
    assert dictionary_learning.trainers.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer is MatryoshkaBatchTopKTrainer
    with pytest.raises(AttributeError, match="without its __init__, which needs nnsight"):
        dictionary_learning.ActivationBuffer  # noqa: B018


def test_missing_dictionary_learning_gives_install_hint(monkeypatch):
    assert_missing_package_hint(monkeypatch, ("dictionary_learning", "dictionary_learning.trainers.matryoshka_batch_top_k"),
                                "matryoshka.integrations.dictionary_learning",
                                r"pip install --no-deps dictionary-learning==0\.1\.0")


def test_core_package_imports_without_dictionary_learning():
    assert_core_imports_without("dictionary_learning")


@pytest.mark.parametrize("chunk", [F, 24])
def test_orthogonality_penalty_adds_gamma_times_the_penalty(one_thread, chunk):
    """With ``matryoshka_orthogonality_coeff`` γ the loss and every gradient are the plain trainer's
    plus γ times :func:`penalty_at_step` (the trainer's seed, the step's chunks), which is logged."""
    from matryoshka.orthogonality import penalty_at_step

    gamma, seed = 0.7, 11
    fields = {"matryoshka_orthogonality_coeff": gamma, "matryoshka_orthogonality_chunk": chunk}
    x = torch.randn(BATCH, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, plain = _pair(torch.float64, seed=seed)
    _, penalised = _pair(torch.float64, fields, seed=seed)
    state = penalised.ae.state_dict()
    (without, without_grads), (with_, with_grads) = _grads(plain, x), _grads(penalised, x)
    penalised.ae.zero_grad()
    penalty = penalty_at_step(penalised.ae.W_dec, chunk, seed, STEP)
    (gamma * penalty).backward()
    assert _rel(with_.detach(), without.detach() + gamma * penalty.detach()) <= 1e-12 and penalty > 0
    for name in without_grads:
        extra = penalised.ae.get_parameter(name).grad
        expected = without_grads[name] + (extra if extra is not None else 0)
        assert _rel(with_grads[name], expected) <= 1e-12, name
    penalised.ae.load_state_dict(state)
    log = penalised.loss(x, step=STEP, logging=True)
    assert list(log.losses) == [*LOGGED, "orthogonality_loss"]
    assert _rel(log.losses["orthogonality_loss"], penalty.detach()) <= 1e-12
    config = penalised.config
    assert (config["matryoshka_orthogonality_coeff"], config["matryoshka_orthogonality_chunk"]) == (gamma, chunk)
    if chunk < F:  # random chunks: the seed and the step choose them
        assert penalty_at_step(penalised.ae.W_dec, chunk, seed, STEP + 1) != penalty


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"matryoshka_orthogonality_coeff": -1.0}, "matryoshka_orthogonality_coeff must be a finite number >= 0"),
    ({"matryoshka_orthogonality_coeff": float("nan")}, "matryoshka_orthogonality_coeff must be"),
    ({"matryoshka_orthogonality_chunk": 1}, "matryoshka_orthogonality_chunk must be an integer >= 2"),
])
def test_rejects_bad_orthogonality_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(FusedMatryoshkaBatchTopKTrainer, torch.float32, **kwargs)
