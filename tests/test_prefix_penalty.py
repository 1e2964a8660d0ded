"""The per-prefix normalised sparsity penalty: ``TrainConfig(sparsity_weighting="prefix")``."""

import pytest
import torch

from matryoshka.prefixes import Prefixes
from matryoshka.sae import SAEConfig, SparseAutoencoder, _Step
from matryoshka.toy import ToyModel, nabeshima_spec
from matryoshka.train import PrefixSchedule, TrainConfig, prefix_penalty_weights, train


def _loop_weights(prefixes: Prefixes, n: int) -> torch.Tensor:
    """c_i by the definition: the prefixes holding latent i, their weights summed, over all weights."""
    lengths, weights = prefixes.lengths.tolist(), prefixes.weights.tolist()
    total = sum(weights)
    return torch.tensor([sum(w for m, w in zip(lengths, weights) if m > i) / total for i in range(n)],
                        dtype=torch.float64)


@pytest.mark.parametrize("prefixes", [
    Prefixes([2, 3, 7], [0.5, 0.25, 2.0]),
    Prefixes([0, 4, 7], [1.0, 3.0, 0.5]),  # a length-0 prefix holds no latent but counts in the total
    Prefixes([5], [0.3]),  # shorter than n: the last latents are in no prefix
    Prefixes.every(7, torch.arange(1, 8, dtype=torch.float64)),
    Prefixes.sample(7, 3, generator=torch.Generator().manual_seed(1)),
])
def test_weights_match_their_definition(prefixes):
    c = prefix_penalty_weights(prefixes, 7)
    assert c.dtype == torch.float64 and c.shape == (7,)
    torch.testing.assert_close(c, _loop_weights(prefixes, 7), rtol=1e-12, atol=1e-15)


def test_weights_edge_cases():
    assert prefix_penalty_weights(Prefixes([4]), 4).tolist() == [1.0] * 4  # vanilla: every latent fully
    assert prefix_penalty_weights(Prefixes([2, 4], [0.0, 0.0]), 4).tolist() == [0.0] * 4  # no weight, no NaN
    with pytest.raises(ValueError, match="<= n"):
        prefix_penalty_weights(Prefixes([2, 6]), 4)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_penalty_equals_an_explicit_per_prefix_loop(activation):
    sae = SparseAutoencoder(SAEConfig(d=5, n=7, activation=activation, jumprelu_init_threshold=0.1,
                                      jumprelu_bandwidth=0.5),  # wide: many pre-acts near the threshold
                            generator=torch.Generator().manual_seed(3))
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))
    out = sae(x)
    prefixes = Prefixes([1, 3, 4, 7], [0.4, 0.1, 0.3, 0.2])
    weighted = sae.sparsity_penalty(out, prefix_penalty_weights(prefixes, 7))
    # Σ_g (w_g / Σ w) · batch mean of prefix g's own penalty (L1 or L0 of its first m_g latents)
    if activation == "relu":
        per_latent = out.acts
    else:
        per_latent = _Step.apply(out.pre.relu(), sae.log_threshold.exp(), sae.config.jumprelu_bandwidth)
    total = float(prefixes.weights.sum())
    loop = sum(w / total * per_latent[:, :m].sum(1).mean()
               for m, w in zip(prefixes.lengths.tolist(), prefixes.weights.tolist()))
    assert float(per_latent[:, 4:].detach().sum()) > 0  # the example has activity beyond the short prefixes
    torch.testing.assert_close(weighted, loop, rtol=1e-6, atol=1e-7)
    assert float(weighted.detach()) < float(sae.sparsity_penalty(out).detach())
    # and the same gradients (ReLU: the encoder; JumpReLU: the thresholds, through the L0's kernel)
    param = sae.W_enc if activation == "relu" else sae.log_threshold
    grad_weighted, = torch.autograd.grad(weighted, param, retain_graph=True)
    grad_loop, = torch.autograd.grad(loop, param)
    assert grad_loop.abs().sum() > 0
    torch.testing.assert_close(grad_weighted, grad_loop, rtol=1e-5, atol=1e-7)


def test_default_penalty_is_unchanged():
    sae = SparseAutoencoder(SAEConfig(d=5, n=7), generator=torch.Generator().manual_seed(3))
    out = sae(torch.randn(11, 5, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(sae.sparsity_penalty(out), out.acts.sum(1).mean())


def _sample(toy):
    return lambda rows, g: toy.sample(rows, g)[0]


def _train(steps=30, **overrides):
    toy = ToyModel(nabeshima_spec())
    sae = SparseAutoencoder(SAEConfig(d=toy.d, n=20), generator=torch.Generator().manual_seed(7))
    config = TrainConfig(steps=steps, log_every=10, progress=False, sparsity_coeff=0.05, **overrides)
    train(sae, _sample(toy), config)
    return sae


def test_prefix_weighting_is_a_no_op_for_one_prefix_and_changes_every():
    # vanilla: c_i = 1 for all latents, so the run is bit for bit the uniform one
    plain, weighted = _train(prefix_mode="vanilla"), _train(prefix_mode="vanilla", sparsity_weighting="prefix")
    assert torch.equal(plain.W_dec, weighted.W_dec) and torch.equal(plain.W_enc, weighted.W_enc)
    # the default is "uniform"
    default, uniform = _train(prefix_mode="every"), _train(prefix_mode="every", sparsity_weighting="uniform")
    assert torch.equal(default.W_dec, uniform.W_dec)
    # every prefix: the last latents get a smaller penalty, so the run differs
    assert not torch.equal(default.W_enc, _train(prefix_mode="every", sparsity_weighting="prefix").W_enc)


def test_the_penalty_follows_each_steps_sampled_prefixes(monkeypatch):
    seen_prefixes, seen_weights = [], []
    call = PrefixSchedule.__call__

    def recording_call(self):
        prefixes = call(self)
        seen_prefixes.append(prefixes)
        return prefixes

    penalty = SparseAutoencoder.sparsity_penalty

    def recording_penalty(self, out, latent_weights=None):
        seen_weights.append(latent_weights)
        return penalty(self, out, latent_weights)

    monkeypatch.setattr(PrefixSchedule, "__call__", recording_call)
    monkeypatch.setattr(SparseAutoencoder, "sparsity_penalty", recording_penalty)
    _train(steps=6, prefix_mode="sampled", sparsity_weighting="prefix")
    assert len(seen_prefixes) == len(seen_weights) == 6
    for prefixes, weights in zip(seen_prefixes, seen_weights):
        torch.testing.assert_close(weights, _loop_weights(prefixes, 20), rtol=1e-12, atol=1e-15)
    assert len({tuple(p.lengths.tolist()) for p in seen_prefixes}) > 1  # the prefixes did change
    seen_weights.clear()
    _train(steps=3, prefix_mode="sampled")
    assert seen_weights == [None] * 3  # the default passes no weights


def test_bad_settings_are_refused():
    toy = ToyModel(nabeshima_spec())
    with pytest.raises(ValueError, match="sparsity_weighting must be one of"):
        train(SparseAutoencoder(SAEConfig(d=toy.d, n=20)), _sample(toy),
              TrainConfig(steps=1, progress=False, sparsity_weighting="per-prefix"))
    for kind in ("topk", "batchtopk"):
        with pytest.raises(ValueError, match="have none"):
            train(SparseAutoencoder(SAEConfig(d=toy.d, n=20, activation=kind, k=3)), _sample(toy),
                  TrainConfig(steps=1, progress=False, sparsity_weighting="prefix"))
