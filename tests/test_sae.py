"""The thin SAE: activations, losses, decoder constraint, latent permutation, save/load."""

import math
from pathlib import Path

import pytest
import torch

from matryoshka import Prefixes, SparseActs, durable_files, matryoshka_loss
from matryoshka.sae import SAEConfig, SparseAutoencoder

D, N, B = 6, 10, 32


def make(activation: str, k: int | None = None, seed: int = 0, **kw) -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(d=D, n=N, activation=activation, k=k, **kw),
                             generator=torch.Generator().manual_seed(seed))


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def test_topk_returns_k_sparse_acts():
    sae = make("topk", k=3)
    out = sae(batch())
    assert isinstance(out.acts, SparseActs) and out.acts.shape == (B, 3)
    dense = out.acts.to_dense(N)
    torch.testing.assert_close(out.recon, dense @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(dense, sae.dense_acts(batch()))


def test_batchtopk_keeps_k_per_row_on_average_and_sets_threshold():
    sae = make("batchtopk", k=2)
    out = sae(batch())
    dense = out.acts.to_dense(N)
    assert int((dense > 0).sum()) <= 2 * B
    assert bool((out.acts.indices == -1).any()), "rows differ in size, so some slots are padding"
    assert float(sae.threshold) > 0
    sae.eval()
    eval_dense = sae.dense_acts(batch())
    assert bool((eval_dense[eval_dense > 0] > sae.threshold).all())


@pytest.mark.parametrize("k, kept", [(1.15, 37), (0.01, 1), (2, 64)])
def test_batchtopk_keeps_round_k_times_b_for_a_fractional_k(k, kept):
    """k is an average over the batch: k = 1.15 on 32 rows keeps round(36.8) = 37 activations, a
    tiny k still keeps one; rows are at least ceil(k) wide."""
    sae = make("batchtopk", k=k)
    x = batch() + 3.0 * torch.randn(N, D, generator=torch.Generator().manual_seed(7))[:1]  # enough positives
    out = sae(x)
    assert int((out.acts.to_dense(N) > 0).sum()) == kept
    assert sae.row_width >= math.ceil(k)


def test_relu_penalty_and_dense_acts():
    sae = make("relu")
    out = sae(batch())
    assert isinstance(out.acts, torch.Tensor) and bool((out.acts >= 0).all())
    torch.testing.assert_close(sae.sparsity_penalty(out), out.acts.sum(1).mean())


def test_jumprelu_threshold_gets_gradients():
    sae = make("jumprelu", jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.5)
    x = batch()
    out = sae(x)
    dense = out.acts
    assert bool(((dense == 0) | (dense > 0.3 - 1e-6)).all())
    (sae.reconstruction_loss(x, out.acts).loss + sae.sparsity_penalty(out)).backward()
    assert sae.log_threshold.grad is not None and bool(sae.log_threshold.grad.abs().sum() > 0)


def test_reconstruction_loss_is_the_matryoshka_op():
    sae = make("topk", k=3, prefix_lengths=[2, 5, 10], prefix_weights=[0.2, 0.3, 0.5])
    x = batch()
    out = sae(x)
    want = matryoshka_loss(x, out.acts, sae.W_dec, sae.b_dec, Prefixes([2, 5, 10], [0.2, 0.3, 0.5]))
    torch.testing.assert_close(sae.reconstruction_loss(x, out.acts).loss, want.loss)
    full = sae.reconstruction_loss(x, out.acts, Prefixes([N])).loss
    torch.testing.assert_close(full, (x - out.recon).pow(2).sum(1).mean())


def test_decoder_constraint():
    sae = make("relu")
    x = batch()
    sae.reconstruction_loss(x, sae(x).acts).loss.backward()
    sae.remove_parallel_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(N), atol=1e-6, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("activation, k", [("relu", None), ("topk", 3), ("jumprelu", None)])
def test_permute_latents_permutes_activations(activation, k):
    sae = make(activation, k=k, jumprelu_init_threshold=0.1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.1, 0.1, N))
        if activation == "jumprelu":
            sae.log_threshold.copy_(torch.linspace(-3, -1, N))
    x = batch()
    before, recon = sae.dense_acts(x), sae(x).recon
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    sae.permute_latents_(perm)
    torch.testing.assert_close(sae.dense_acts(x), before[:, perm])
    torch.testing.assert_close(sae(x).recon, recon)


def test_auxk_loss_only_for_dead_latents():
    sae = make("topk", k=2)
    x = batch()
    out = sae(x)
    assert float(sae.auxk_loss(x, out, torch.zeros(N, dtype=torch.bool), 4).detach()) == 0.0
    dead = torch.zeros(N, dtype=torch.bool)
    dead[:3] = True
    loss = sae.auxk_loss(x, out, dead, 4)
    loss.backward()
    assert float(loss.detach()) > 0
    assert bool((sae.W_dec.grad[3:] == 0).all()) and bool(sae.W_dec.grad[:3].abs().sum() > 0)


@pytest.mark.parametrize("activation, k", [("relu", None), ("batchtopk", 2), ("jumprelu", None)])
def test_save_load_roundtrip(tmp_path, activation, k):
    sae = make(activation, k=k, prefix_lengths=[3, 10], prefix_weights=[0.5, 0.5])
    sae(batch())  # sets the BatchTopK threshold buffer
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.config == sae.config
    assert loaded.prefixes.lengths.tolist() == [3, 10]
    sae.eval(), loaded.eval()
    torch.testing.assert_close(loaded(batch(2)).recon, sae(batch(2)).recon)


@pytest.mark.parametrize("bad, message", [
    (dict(activation="gelu"), r"^activation must be one of \('topk', 'batchtopk', 'relu', 'jumprelu'\), got 'gelu'$"),
    (dict(activation="topk"), r"^activation 'topk' needs an integer 1 <= k <= n=2, got k=None$"),
    (dict(activation="batchtopk", k=3), r"^activation 'batchtopk' needs a number 0 < k <= n=2 \(latents per row on "
                                        r"average\), got k=3$"),
    (dict(activation="batchtopk", k=0.0), r"^activation 'batchtopk' needs a number 0 < k <= n=2 .*got k=0\.0$"),
    (dict(activation="batchtopk", k=float("nan")), r"^activation 'batchtopk' needs a number 0 < k <= n=2 .*got k=nan$"),
    (dict(activation="batchtopk", k=True), r"^activation 'batchtopk' needs a number 0 < k <= n=2 .*got k=True$"),
    (dict(activation="topk", k=1.5), r"^activation 'topk' needs an integer 1 <= k <= n=2, got k=1\.5$"),
    (dict(d=0), r"^SAEConfig\.d must be an integer >= 1, got 0$"),
    (dict(n=2.0), r"^SAEConfig\.n must be an integer >= 1, got 2\.0$"),
    (dict(activation="jumprelu", jumprelu_init_threshold=0.0),
     r"^SAEConfig\.jumprelu_init_threshold must be a finite number > 0, got 0\.0$"),
    (dict(jumprelu_bandwidth=float("inf")), r"^SAEConfig\.jumprelu_bandwidth must be a finite number > 0, got inf$"),
])
def test_config_validation(bad, message):
    """d = 0 used to build an empty SAE, a float n failed inside torch.randn, a zero JumpReLU
    threshold started its log-space parameter at -inf, and k = 1.5 passed."""
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"d": 2, "n": 2, **bad})


def _with_random_biases(sae: SparseAutoencoder) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(N, generator=g))
        sae.b_dec.copy_(torch.randn(D, generator=g))
    return sae


@pytest.mark.parametrize("activation, k", [("relu", None), ("topk", 3)])
def test_biases_enter_encoder_decoder_and_loss(activation, k):
    """pre = (x - b_dec) W_enc + b_enc, recon = a W_dec + b_dec, and the loss sees b_dec: with
    non-zero biases, a sign flip or a dropped bias anywhere changes these."""
    sae = _with_random_biases(make(activation, k=k))
    x = batch()
    out = sae(x)
    torch.testing.assert_close(out.pre, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    dense = out.acts.to_dense(N) if isinstance(out.acts, SparseActs) else out.acts
    torch.testing.assert_close(out.recon, dense @ sae.W_dec + sae.b_dec)
    full = sae.reconstruction_loss(x, out.acts, Prefixes([N])).loss
    torch.testing.assert_close(full, (x - out.recon).pow(2).sum(1).mean())


def test_reconstruction_loss_skips_the_index_check_unless_asked(monkeypatch):
    """The SAE's own activations are valid by construction: no host-syncing index check per step."""
    import matryoshka.loss

    def refuse(*args, **kwargs):
        raise AssertionError("index check ran")

    monkeypatch.setattr(matryoshka.loss, "check_sparse_indices", refuse)
    sae = make("topk", k=3)
    x = batch()
    acts = sae(x).acts
    sae.reconstruction_loss(x, acts)
    with pytest.raises(AssertionError, match="index check ran"):
        sae.reconstruction_loss(x, acts, validate=True)


def test_initialisation_follows_the_generator_only():
    torch.manual_seed(1)
    a = make("relu", seed=5)
    torch.manual_seed(2)  # the global RNG must not matter
    b = make("relu", seed=5)
    c = make("relu", seed=6)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_auxk_normalisation_with_a_small_error():
    """The AuxK loss divides by the mean squared error norm even when that is far below 1."""
    sae = make("topk", k=2)
    x = 0.01 * batch()
    out = sae(x)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[4:] = True
    error = (x - out.recon).detach()
    values, indices = torch.where(dead, out.pre, float("-inf")).topk(3, dim=1)
    error_hat = torch.zeros(B, N).scatter(1, indices, values.relu()) @ sae.W_dec
    want = (error_hat - error).pow(2).sum(1).mean() / error.pow(2).sum(1).mean()
    assert float(error.pow(2).sum(1).mean()) < 0.5
    torch.testing.assert_close(sae.auxk_loss(x, out, dead, 3), want)


def test_save_into_new_nested_folder_and_overwrite(tmp_path):
    sae = make("batchtopk", k=2)
    sae(batch())
    target = tmp_path / "a" / "b" / "sae"
    sae.save(target)
    sae.save(target)  # saving again over the same folder is fine
    assert "_row_stats" not in sae.state_dict(), "run-time counters are not part of the saved model"
    torch.testing.assert_close(SparseAutoencoder.load(target).W_dec, sae.W_dec)


def test_a_save_stopped_midway_leaves_the_saved_sae_whole(tmp_path, monkeypatch):
    """Saving again over a saved SAE (a resumed run that was already done does) and killed before a
    file is in place: the old files stay whole, not a half-written ``sae.safetensors``."""
    old, new = make("relu"), make("relu")
    with torch.no_grad():
        new.W_dec.add_(1.0)
    old.save(tmp_path)

    renames = []

    def killed(source, target):
        renames.append((Path(source), Path(target)))
        raise KeyboardInterrupt
    monkeypatch.setattr(durable_files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    monkeypatch.undo()
    # Written beside its target (a rename is atomic within one file system), under a hidden name.
    [(source, target)] = renames
    assert source.parent == tmp_path and source.name.startswith(f".{target.name}.tmp-")
    assert torch.equal(SparseAutoencoder.load(tmp_path).W_dec, old.W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "sae.safetensors"]


def test_batchtopk_inference_with_nothing_above_the_threshold():
    """Rows with no slots at all decode to b_dec (a zero-width SparseActs used to crash decode)."""
    sae = make("batchtopk", k=2)
    sae(batch())
    sae.eval()
    x = batch(3)
    with torch.no_grad():
        sae.threshold.fill_(1e9)
    out = sae(x)
    assert out.acts.shape == (B, 0)
    torch.testing.assert_close(out.recon, sae.b_dec.expand(B, D))
    torch.testing.assert_close(sae.reconstruction_loss(x, out.acts, Prefixes([N])).loss,
                               (x - sae.b_dec).pow(2).sum(1).mean())
