"""The SAELens integration against SAELens itself (skipped without the `sae-lens` extra).

Errors are relative: ``max |fused - stock| / max |stock|`` per tensor.  Tiny sizes (d_in = 16,
d_sae = 64, batch 32) keep the file fast.
"""

import importlib
import itertools
import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import (  # noqa: E402
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    SAE,
    TrainingSAE,
    TrainingSAEConfig,
)
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, train_toy_sae  # noqa: E402

from matryoshka import Prefixes, matryoshka_loss  # noqa: E402
from matryoshka.integrations import sae_lens as integration  # noqa: E402
from matryoshka.integrations.sae_lens import (  # noqa: E402
    FusedMatryoshkaBatchTopKTrainingSAE,
    FusedMatryoshkaBatchTopKTrainingSAEConfig,
)

from .helpers import assert_core_imports_without, assert_missing_package_hint  # noqa: E402

D_IN, D_SAE, K, BATCH = 16, 64, 4, 32
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
DEAD_MASKS = {
    "none": None,
    "every_third": torch.arange(D_SAE) % 3 == 0,  # dead in every level, some levels under d_in // 2
    "last_level_only": torch.arange(D_SAE) >= 40,  # the inner levels have no dead latent
}


@pytest.fixture(autouse=True)
def _quiet_sae_lens():
    """SAELens warns when it appends d_sae to the widths; the tests do that on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _config_kwargs(**overrides):
    return {"d_in": D_IN, "d_sae": D_SAE, "k": K, "matryoshka_widths": [8, 24, D_SAE], **overrides}


def _stock(**overrides):
    return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs(**overrides)))


def _fused(**overrides):
    return FusedMatryoshkaBatchTopKTrainingSAE(FusedMatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs(**overrides)))


def _pair(device, fused_fields=None, **overrides):
    """A stock SAE (with randomised biases, so that every term is non-trivial) and a fused copy;
    ``fused_fields``: the fused config's own fields."""
    torch.manual_seed(0)
    stock = _stock(device=device, **overrides)
    with torch.no_grad():
        for p in stock.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = _fused(device=device, **overrides, **(fused_fields or {}))
    fused.load_state_dict(stock.state_dict())
    return stock, fused


def _step(sae, x, dead=None, step=0):
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False)
    out = sae.training_forward_pass(step)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


def _rel(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_stock_class_on_every_option(device, one_thread, dtype):
    """Loss, every logged loss (same names, same order), sae_out, feature_acts, the threshold update
    and every parameter gradient equal the stock class's, over the whole option grid."""
    grid = itertools.product([False, True], [False, True], DEAD_MASKS, [(8, 24, D_SAE), (8, 24)])
    for rescale, matryoshka_aux, dead, widths in grid:
        options = {"rescale_acts_by_decoder_norm": rescale, "use_matryoshka_aux_loss": matryoshka_aux}
        stock, fused = _pair(device, dtype=dtype, matryoshka_widths=list(widths), **options)
        x = torch.randn(BATCH, D_IN, dtype=getattr(torch, dtype), device=device)
        mask = None if DEAD_MASKS[dead] is None else DEAD_MASKS[dead].to(device)
        (expected, expected_grads), (actual, actual_grads) = _step(stock, x, mask), _step(fused, x, mask)
        case = f"{dtype} rescale={rescale} matryoshka_aux={matryoshka_aux} dead={dead} widths={widths}"
        assert list(actual.losses) == list(expected.losses), case
        if dead != "none":
            assert expected.losses["auxiliary_reconstruction_loss"] > 0, case
        errors = {"loss": _rel(actual.loss, expected.loss), "sae_out": _rel(actual.sae_out, expected.sae_out)}
        errors |= {f"losses/{name}": _rel(actual.losses[name], loss.detach()) for name, loss in expected.losses.items()}
        errors |= {f"grad/{name}": _rel(actual_grads[name], expected_grads[name]) for name in expected_grads}
        errors["topk_threshold"] = _rel(fused.topk_threshold, stock.topk_threshold)
        assert torch.equal(actual.feature_acts, expected.feature_acts), case
        assert actual.metrics["topk_threshold"] is fused.topk_threshold, case
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE[dtype], f"{case}: {worst} off by {errors[worst]:.2e}"


def _reference_step(fused, x, prefixes):
    """The fused SAE's loss recomputed by the reference op on its dense activations."""
    feature_acts, _ = fused.encode_with_hidden_pre(x)
    acts = feature_acts / fused.W_dec.norm(dim=-1) if fused.cfg.rescale_acts_by_decoder_norm else feature_acts
    return matryoshka_loss(x, acts, fused.W_dec, fused.b_dec, prefixes, backend="reference")


@pytest.mark.parametrize("rescale", [False, True])
def test_every_prefix_equals_reference_op(device, one_thread, rescale):
    """``matryoshka_prefixes="every"`` (with level weights) gives the reference op's loss over
    Prefixes.every(d_sae), its gradients, and logs that op's per-prefix losses at the widths."""
    weights = torch.rand(D_SAE, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    fused_fields = {"matryoshka_prefixes": "every", "matryoshka_level_weights": weights}
    _, fused = _pair(device, fused_fields, dtype="float64", rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(BATCH, D_IN, dtype=torch.float64, device=device)
    actual, actual_grads = _step(fused, x)
    fused.zero_grad()
    expected = _reference_step(fused, x, Prefixes.every(D_SAE, weights))
    expected.loss.backward()
    assert _rel(actual.loss, expected.loss) <= 1e-12
    assert _rel(actual.losses["mse_loss"], expected.per_prefix[-1]) <= 1e-12
    for width in (8, 24):
        assert _rel(actual.losses[f"inner_mse_loss_{width}"], expected.per_prefix[width - 1]) <= 1e-12
    for name, p in fused.named_parameters():
        assert _rel(actual_grads[name], p.grad) <= 1e-12, name


def test_group_level_weights_equal_reference_op(device, one_thread):
    weights = [0.5, 2.0, 1.5]
    _, fused = _pair(device, {"matryoshka_level_weights": weights}, dtype="float64")
    x = torch.randn(BATCH, D_IN, dtype=torch.float64, device=device)
    actual, _ = _step(fused, x)
    expected = _reference_step(fused, x, Prefixes.groups([8, 24, D_SAE], weights))
    assert _rel(actual.loss, expected.loss) <= 1e-12
    assert _rel(actual.losses["mse_loss"], expected.per_prefix[-1]) <= 1e-12  # logged unweighted


def test_save_load_round_trip(tmp_path, one_thread):
    """A training checkpoint reloads as the fused class with its fields, and exactly as the stock
    class reloads (state dict, dtypes: both come back with a float32 threshold); the reloaded SAE
    computes the same step; the inference save loads like the stock one, as a JumpReLU SAE."""
    fused_fields = {"matryoshka_prefixes": "every", "matryoshka_backend": "torch"}
    stock, fused = _pair("cpu", fused_fields, matryoshka_widths=[8, 24])
    x = torch.randn(BATCH, D_IN)
    saes = (stock, fused)
    for sae in saes:
        before, _ = _step(sae, x)  # moves the threshold off zero
        sae.save_model(tmp_path / type(sae).__name__)
        sae.save_inference_model(tmp_path / f"inference_{type(sae).__name__}")
    loaded_stock, loaded = (TrainingSAE.load_from_disk(tmp_path / type(sae).__name__) for sae in saes)
    assert type(loaded) is FusedMatryoshkaBatchTopKTrainingSAE
    assert (loaded.cfg.matryoshka_prefixes, loaded.cfg.matryoshka_backend) == ("every", "torch")
    assert loaded.cfg.matryoshka_widths == [8, 24, D_SAE]
    expected = loaded_stock.state_dict()
    assert list(loaded.state_dict()) == list(expected)
    for name, value in loaded.state_dict().items():
        assert value.dtype == expected[name].dtype and torch.allclose(value, expected[name], rtol=1e-6), name
    after, _ = _step(loaded, x)
    assert torch.equal(after.loss, before.loss)
    inference_stock, inference = (SAE.load_from_disk(tmp_path / f"inference_{type(s).__name__}") for s in saes)
    assert type(inference) is type(inference_stock) and type(inference).__name__ == "JumpReLUSAE"
    for name, value in inference.state_dict().items():
        assert torch.allclose(value, inference_stock.state_dict()[name], rtol=1e-6), name


def test_registered_under_architecture_name_and_reload_safe():
    cfg = FusedMatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs())
    assert cfg.architecture() == "fused_matryoshka_batchtopk"
    assert get_sae_training_class("fused_matryoshka_batchtopk") == (
        FusedMatryoshkaBatchTopKTrainingSAE,
        FusedMatryoshkaBatchTopKTrainingSAEConfig,
    )
    rebuilt = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.to_dict()).to_dict())
    assert type(rebuilt) is FusedMatryoshkaBatchTopKTrainingSAE
    names, entry = dict(integration.__dict__), get_sae_training_class("fused_matryoshka_batchtopk")
    try:
        importlib.reload(integration)  # executes the registration a second time: no error, new classes
        registered = get_sae_training_class("fused_matryoshka_batchtopk")[0]
        assert registered is integration.FusedMatryoshkaBatchTopKTrainingSAE
        assert integration.FusedMatryoshkaBatchTopKTrainingSAE is not FusedMatryoshkaBatchTopKTrainingSAE
    finally:  # the other tests hold the first classes
        integration.__dict__.update(names)
        SAE_TRAINING_CLASS_REGISTRY["fused_matryoshka_batchtopk"] = entry


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"matryoshka_prefixes": "all"}, ValueError, "matryoshka_prefixes must be one of"),
        ({"matryoshka_backend": "cuda"}, ValueError, "matryoshka_backend must be one of"),
        ({"matryoshka_level_weights": [1.0, 1.0]}, ValueError, "must have 3 entries"),
        ({"matryoshka_widths": [8, 24], "matryoshka_level_weights": [1.0, 1.0]}, ValueError, "must have 3 entries"),
        ({"matryoshka_prefixes": "every", "matryoshka_level_weights": [1.0] * 3}, ValueError, "must have 64 entries"),
        ({"matryoshka_level_weights": [1.0, -1.0, 1.0]}, ValueError, "finite and >= 0"),
        ({"matryoshka_level_weights": [1.0, float("nan"), 1.0]}, ValueError, "finite and >= 0"),
        ({"matryoshka_level_weights": ["1", 1.0, 1.0]}, TypeError, "only numbers"),
        ({"matryoshka_level_weights": 1.0}, TypeError, "list of numbers or None"),
    ],
)
def test_config_rejects_bad_fields(overrides, error, match):
    with pytest.raises(error, match=match):
        FusedMatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs(**overrides))


def test_sae_rejects_what_the_stock_class_cannot_train():
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' is not supported"):
        _fused(normalize_activations="layer_norm")
    with pytest.raises(TypeError, match="needs a FusedMatryoshkaBatchTopKTrainingSAEConfig"):
        FusedMatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs()))
    with pytest.raises(ValueError, match="must not be empty"):  # SAELens's own validation still runs
        _fused(matryoshka_widths=[])
    _, fused = _pair("cpu")
    with pytest.raises(ValueError, match=r"sae_in must be \(batch, d_in\)"):
        _step(fused, torch.randn(2, BATCH, D_IN))


def _train(sae_class, config_class, dtype):
    """120 steps of SAELens's SAETrainer (through ``train_toy_sae``) on ``sae_lens.synthetic`` data,
    from the same initial weights and the same data stream."""
    torch.manual_seed(0)
    initial = _stock(dtype=dtype).state_dict()
    sae = sae_class(config_class(**_config_kwargs(dtype=dtype)))
    sae.load_state_dict(initial)
    torch.manual_seed(1)
    features = FeatureDictionary(num_features=48, hidden_dim=D_IN, seed=0)
    generator = ActivationGenerator(num_features=48, firing_probabilities=0.08)
    train_toy_sae(sae, features, generator, training_samples=32 * 120, batch_size=32, lr=3e-3)
    return sae.state_dict()


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-12), ("float32", 1e-5)])
def test_sae_trainer_final_parameters_match_stock(one_thread, dtype, tolerance):
    """After 120 Adam steps the parameters and threshold differ from the stock run by at most
    ``tolerance`` relative (measured: 4e-16 in float64, 2e-7 in float32)."""
    expected = _train(MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, dtype)
    actual = _train(FusedMatryoshkaBatchTopKTrainingSAE, FusedMatryoshkaBatchTopKTrainingSAEConfig, dtype)
    assert list(actual) == list(expected)
    for name in expected:
        assert _rel(actual[name], expected[name]) <= tolerance, name


def test_missing_sae_lens_gives_install_hint(monkeypatch):
    assert_missing_package_hint(monkeypatch, ("sae_lens",), "matryoshka.integrations.sae_lens",
                                r"pip install matryoshka-loss\[sae-lens\]")


def test_core_package_imports_without_sae_lens():
    assert_core_imports_without("sae_lens")


@pytest.mark.parametrize("chunk", [D_SAE, 24])
def test_orthogonality_penalty_adds_gamma_times_the_penalty(one_thread, chunk):
    """With ``matryoshka_orthogonality_coeff`` γ the loss and every gradient are the plain step's
    plus γ times :func:`penalty_at_step` (the chunks of step ``n_training_steps``), which is logged."""
    from matryoshka.orthogonality import penalty_at_step

    gamma, step = 0.7, 5
    fields = {"matryoshka_orthogonality_coeff": gamma, "matryoshka_orthogonality_chunk": chunk}
    _, plain = _pair("cpu", dtype="float64")
    _, penalised = _pair("cpu", fields, dtype="float64")
    x = torch.randn(BATCH, D_IN, dtype=torch.float64)
    (without, without_grads), (with_, with_grads) = _step(plain, x, step=step), _step(penalised, x, step=step)
    penalised.zero_grad()
    penalty = penalty_at_step(penalised.W_dec, chunk, 0, step)
    (gamma * penalty).backward()
    assert _rel(with_.loss, without.loss + gamma * penalty) <= 1e-12
    assert torch.equal(with_.losses["orthogonality_loss"], penalty.detach()) and penalty > 0
    assert list(with_.losses)[:-1] == list(without.losses)  # the stock names first, then the penalty
    for name in without_grads:
        extra = penalised.get_parameter(name).grad
        expected = without_grads[name] + (extra if extra is not None else 0)
        assert _rel(with_grads[name], expected) <= 1e-12, name
    if chunk < D_SAE:  # random chunks: another step draws others, the same step the same
        assert penalty_at_step(penalised.W_dec, chunk, 0, step + 1) != penalty
        assert _step(penalised, x, step=step)[0].losses["orthogonality_loss"] == penalty


@pytest.mark.parametrize(("overrides", "match"), [
    ({"matryoshka_orthogonality_coeff": -0.1}, "matryoshka_orthogonality_coeff must be a finite number >= 0"),
    ({"matryoshka_orthogonality_coeff": float("inf")}, "matryoshka_orthogonality_coeff must be"),
    ({"matryoshka_orthogonality_chunk": 1}, "matryoshka_orthogonality_chunk must be an integer >= 2"),
    ({"matryoshka_orthogonality_chunk": 8.0}, "matryoshka_orthogonality_chunk must be an integer >= 2"),
])
def test_config_rejects_bad_orthogonality_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        FusedMatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs(**overrides))


def test_orthogonality_fields_survive_the_config_round_trip():
    cfg = FusedMatryoshkaBatchTopKTrainingSAEConfig(**_config_kwargs(matryoshka_orthogonality_coeff=0.3,
                                                                     matryoshka_orthogonality_chunk=32))
    rebuilt = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.to_dict()).to_dict())
    assert (rebuilt.cfg.matryoshka_orthogonality_coeff, rebuilt.cfg.matryoshka_orthogonality_chunk) == (0.3, 32)
