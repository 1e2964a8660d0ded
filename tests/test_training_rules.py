"""The training rules, pinned to their formulas: JumpReLU / L0 pseudo-derivatives, BatchTopK's budget
and threshold EMA, the AuxK normalisation, the adaptive sparsity coefficient and dead-latent
bookkeeping.  Each test computes the expected numbers by hand from the documented rule."""

import math

import pytest
import torch

from matryoshka import Prefixes, SparseActs
from matryoshka.sae import SAEConfig, SparseAutoencoder, _JumpReLU, _Step
from matryoshka.train import TrainConfig, _LatentStats, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(acts, n: int) -> torch.Tensor:
    """``(B, n)`` from dense activations or ``SparseActs`` (index -1 = padding, ignored whatever its value)."""
    if isinstance(acts, torch.Tensor):
        return acts.detach()
    values, indices = acts.values.detach(), acts.indices
    valid = indices >= 0
    out = torch.zeros(values.shape[0], n + 1, dtype=values.dtype)
    return out.scatter_add_(1, torch.where(valid, indices, n), torch.where(valid, values, 0.0))[:, :n]


def _kernel(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """K((z - theta) / eps), K the unit rectangle on |u| < 1/2."""
    return (((z - theta) / eps).abs() < 0.5).to(z.dtype)


def _near_threshold_case(seed: int = 0):
    """z >= 0 spread around per-latent thresholds so that many entries fall inside the kernel."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8], dtype=torch.float64)
    z = (torch.rand(12, 5, generator=g, dtype=torch.float64) * 1.2)
    upstream = torch.randn(12, 5, generator=g, dtype=torch.float64)
    return z, theta, 0.3, upstream


# ------------------------------------------------------------------------- JumpReLU / L0 pseudo-gradients
def test_jumprelu_function_forward_and_pseudo_derivatives():
    z, theta, eps, upstream = _near_threshold_case()
    zl, tl = z.clone().requires_grad_(), theta.clone().requires_grad_()
    y = _JumpReLU.apply(zl, tl, eps)
    torch.testing.assert_close(y.detach(), z * (z > theta))
    y.backward(upstream)
    K = _kernel(z, theta, eps)
    assert 10 <= int(K.sum()) < K.numel(), "the case must have entries both inside and outside the kernel"
    want_theta = (-(theta / eps) * K * upstream).sum(0)
    torch.testing.assert_close(tl.grad, want_theta)
    torch.testing.assert_close(zl.grad, upstream * (z > theta))
    assert bool((want_theta != 0).all()), "every latent has a nonzero threshold gradient here"


def test_step_function_forward_and_pseudo_derivative():
    z, theta, eps, upstream = _near_threshold_case(1)
    zl, tl = z.clone().requires_grad_(), theta.clone().requires_grad_()
    y = _Step.apply(zl, tl, eps)
    torch.testing.assert_close(y.detach(), (z > theta).to(z.dtype))
    y.backward(upstream)
    K = _kernel(z, theta, eps)
    torch.testing.assert_close(tl.grad, (-(1.0 / eps) * K * upstream).sum(0))
    assert zl.grad is None or bool((zl.grad == 0).all()), "the L0 step passes no gradient to z"
    # Sign: raising a threshold lowers the L0 count, so with upstream +1 the gradient is <= 0.
    tl.grad = None
    _Step.apply(z, tl, eps).sum().backward()
    assert bool((tl.grad <= 0).all()) and bool((tl.grad < 0).any())
    torch.testing.assert_close(tl.grad, -(1.0 / eps) * K.sum(0))


def test_jumprelu_sae_log_threshold_gradient_end_to_end():
    """d/d(log theta) of recon + c * L0 penalty, by the chain rule with the two pseudo-derivatives."""
    d, n, B, eps, c = 6, 10, 32, 0.5, 0.7
    sae = SparseAutoencoder(SAEConfig(d=d, n=n, activation="jumprelu", jumprelu_bandwidth=eps,
                                      jumprelu_init_threshold=0.3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(0.15, 0.45, n).log())
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    recon = sae.reconstruction_loss(x, out.acts, Prefixes([n])).loss
    (recon + c * sae.sparsity_penalty(out)).backward()

    with torch.no_grad():
        theta = sae.log_threshold.exp()
        z = out.pre.relu()
        acts = z * (z > theta)
        recon_hand = acts @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(out.recon.detach(), recon_hand)
        torch.testing.assert_close(sae.sparsity_penalty(out).detach(), (z > theta).float().sum(1).mean())
        G = -2.0 / B * (x - recon_hand) @ sae.W_dec.T  # dL_recon / d acts
        K = _kernel(z, theta, eps)
        assert int(K.sum()) > 0
        d_theta = (-(theta / eps) * K * G).sum(0) + c * (-(1.0 / eps) * K).sum(0) / B
        want = theta * d_theta  # d theta / d log theta = theta
    torch.testing.assert_close(sae.log_threshold.grad, want, rtol=1e-4, atol=1e-6)
    assert float(want.abs().sum()) > 0


# ------------------------------------------------------------------------- BatchTopK
def _batchtopk(k: int, n: int = 10, d: int = 6) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d=d, n=n, activation="batchtopk", k=k),
                            generator=torch.Generator().manual_seed(0))
    sae.train()
    return sae


@pytest.mark.parametrize("shift", [0.0, -1.5])  # many positives (> k*B), few positives (< k*B)
def test_batchtopk_keeps_the_k_times_b_largest(shift):
    k, n, B = 3, 10, 16
    sae = _batchtopk(k, n)
    pre = torch.randn(B, n, generator=torch.Generator().manual_seed(2)) + shift
    z = pre.relu()
    positives = int((z > 0).sum())
    budget = min(k * B, positives)
    assert (positives > k * B) if shift == 0.0 else (positives < k * B)
    dense = _dense(sae.activate(pre), n)
    kept = dense > 0
    assert int(kept.sum()) == budget
    torch.testing.assert_close(dense[kept], z[kept])  # kept entries are the pre-activations themselves
    want = torch.zeros(B * n, dtype=torch.bool)
    want[z.flatten().topk(budget).indices] = True
    assert torch.equal(kept, want.view(B, n)), "the kept entries must be the largest over the batch"


def test_batchtopk_threshold_ema_and_eval_mode():
    k, n, B = 2, 10, 16
    sae = _batchtopk(k, n)
    g = torch.Generator().manual_seed(3)
    smallest = []
    for _ in range(3):
        pre = torch.randn(B, n, generator=g)
        sae.activate(pre)
        smallest.append(float(pre.relu().flatten().topk(k * B).values.min()))
        assert smallest[-1] > 0
    t1 = smallest[0]
    t2 = 0.99 * t1 + 0.01 * smallest[1]
    t3 = 0.99 * t2 + 0.01 * smallest[2]
    assert float(sae.threshold) == pytest.approx(t3, rel=1e-5)
    assert abs(t3 - (0.01 * t2 + 0.99 * smallest[2])) > 1e-3, "the case must tell the coefficients apart"
    # Step by step, from a fresh SAE: the first batch sets the threshold, the second blends 0.99 / 0.01.
    sae = _batchtopk(k, n)
    g = torch.Generator().manual_seed(3)
    sae.activate(torch.randn(B, n, generator=g))
    assert float(sae.threshold) == pytest.approx(t1, rel=1e-6)
    sae.activate(torch.randn(B, n, generator=g))
    assert float(sae.threshold) == pytest.approx(t2, rel=1e-6)
    # A batch with nothing positive leaves the threshold alone.
    sae.activate(-torch.ones(B, n))
    assert float(sae.threshold) == pytest.approx(t2, rel=1e-6)
    # Eval mode: one global threshold, a JumpReLU.
    sae.eval()
    pre = torch.randn(B, n, generator=g)
    z = pre.relu()
    torch.testing.assert_close(_dense(sae.activate(pre), n), z * (z > float(sae.threshold)))
    torch.testing.assert_close(float(sae.threshold), t2, rtol=1e-6, atol=0)  # eval does not move it


# ------------------------------------------------------------------------- AuxK
@pytest.mark.parametrize("activation, dead_idx, k_aux", [
    ("topk", [0, 2, 5, 7, 9], 3),   # k_aux < #dead
    ("batchtopk", [1, 4], 4),       # k_aux > #dead: the missing slots contribute nothing
])
def test_auxk_loss_is_the_normalised_formula(activation, dead_idx, k_aux):
    d, n, B = 6, 10, 24
    sae = SparseAutoencoder(SAEConfig(d=d, n=n, activation=activation, k=2),
                            generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, 0.3, n))
    x = 3.0 * torch.randn(B, d, generator=torch.Generator().manual_seed(5))  # error norms well above 1
    out = sae(x)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[dead_idx] = True
    loss = sae.auxk_loss(x, out, dead, k_aux)

    with torch.no_grad():
        error = x - out.recon
        acts = torch.zeros(B, n)
        dead_pre = out.pre[:, dead]
        top = dead_pre.topk(min(k_aux, int(dead.sum())), dim=1)
        cols = torch.nonzero(dead).flatten()[top.indices]
        acts.scatter_(1, cols, top.values.relu())
        assert int((acts > 0).sum()) > 0
        error_hat = acts @ sae.W_dec  # no decoder bias: it reconstructs the residual
        norm = error.pow(2).sum(1).mean()
        assert float(norm) > 2.0
        want = (error_hat - error).pow(2).sum(1).mean() / norm
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)
    # The residual is detached: gradients reach only the dead latents' weights.
    loss.backward()
    assert bool((sae.W_dec.grad[~dead] == 0).all()) and bool(sae.W_dec.grad[dead].abs().sum() > 0)


# ------------------------------------------------------------------------- adaptive sparsity coefficient
def _relu_run(target_l0: float, steps: int = 24, adapt_rate: float = 0.05, coeff: float = 1e-2):
    d, n = 8, 16
    sae = SparseAutoencoder(SAEConfig(d=d, n=n, activation="relu"), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(steps=steps, batch_size=32, prefix_mode="vanilla", sparsity_coeff=coeff,
                         target_l0=target_l0, adapt_rate=adapt_rate, log_every=1, progress=False,
                         resort_every=0, data_chunk_steps=steps)
    result = train(sae, lambda rows, g: torch.randn(rows, d, generator=g), config)
    return n, result.history


@pytest.mark.parametrize("direction", ["down", "up"])
def test_adaptive_coefficient_moves_towards_the_target(direction):
    c0, rate = 1e-2, 0.05
    n, history = _relu_run(target_l0=4 * 16 if direction == "down" else 0.05, coeff=c0, adapt_rate=rate)
    coeffs = [row["sparsity_coeff"] for row in history]
    if direction == "down":  # L0 <= n = 16 is far below the target 64: the coefficient shrinks every step
        assert all(row["l0"] <= n for row in history)
        assert all(b < a for a, b in zip([c0] + coeffs, coeffs))
        assert coeffs[-1] < c0 * math.exp(-0.5 * rate * len(history))
    else:  # L0 far above target: it grows every step
        assert all(row["l0"] > 0.1 for row in history)
        assert all(b > a for a, b in zip([c0] + coeffs, coeffs))
        assert coeffs[-1] > c0 * math.exp(0.5 * rate * len(history))


def test_adaptive_coefficient_follows_the_documented_update():
    """coeff_s = coeff_{s-1} * exp(rate * clamp((L0_s - target) / target, -1, 1)), L0_s that step's L0."""
    c0, rate, target = 1e-2, 0.05, 5.0
    _, history = _relu_run(target_l0=target, coeff=c0, adapt_rate=rate)
    previous = c0
    errors = []
    for row in history:
        error = max(-1.0, min(1.0, (row["l0"] - target) / target))
        errors.append(error)
        assert row["sparsity_coeff"] == pytest.approx(previous * math.exp(rate * error), rel=1e-4)
        previous = row["sparsity_coeff"]
    assert any(abs(e) > 0.05 for e in errors), "the case must move the coefficient"


# ------------------------------------------------------------------------- dead-latent bookkeeping
def test_latent_stats_since_fired_and_energy_dense():
    n, decay = 4, 0.9
    stats = _LatentStats(n, decay)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.5]])  # row norms 1, 2, 5, 0.5
    a1 = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0]])
    stats.update(a1, W_dec)
    assert stats.since_fired.tolist() == [0, 1, 0, 1]
    a2 = torch.tensor([[0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    stats.update(a2, W_dec)
    assert stats.since_fired.tolist() == [1, 0, 1, 2]
    stats.update(torch.zeros(2, n), W_dec)
    assert stats.since_fired.tolist() == [2, 1, 2, 3]
    stats.update(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), W_dec)
    assert stats.since_fired.tolist() == [3, 2, 3, 0]
    norms = W_dec.norm(dim=1)
    energy = torch.zeros(n)
    for a in (a1, a2, torch.zeros(2, n), torch.tensor([[0.0, 0.0, 0.0, 1.0]])):
        energy = decay * energy + (1 - decay) * (a * norms).pow(2).mean(0)
    torch.testing.assert_close(stats.energy.cpu(), energy)


def test_latent_stats_accept_sparse_acts():
    n, decay = 5, 0.8
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.5], [1.0, 1.0]])
    # Row 0: latents 3 and 0; row 1: latent 1, then a padding slot whose value must be ignored;
    # a zero-valued slot (latent 4) is selected but has not fired.
    acts = SparseActs(torch.tensor([[0.4, 0.7], [0.2, 5.0], [0.0, 0.0]]),
                      torch.tensor([[3, 0], [1, -1], [4, -1]]))
    stats, dense_stats = _LatentStats(n, decay), _LatentStats(n, decay)
    try:
        stats.update(acts, W_dec)
    except (TypeError, AttributeError, NotImplementedError) as exc:
        pytest.skip(f"_LatentStats.update does not take SparseActs yet ({type(exc).__name__})")
    dense_stats.update(_dense(acts, n), W_dec)
    assert stats.since_fired.tolist() == [0, 0, 1, 0, 1] == dense_stats.since_fired.tolist()
    torch.testing.assert_close(stats.energy.cpu(), dense_stats.energy.cpu())
    stats.update(SparseActs(torch.tensor([[0.3]]), torch.tensor([[2]])), W_dec)
    assert stats.since_fired.tolist() == [1, 1, 0, 1, 2]


@pytest.mark.parametrize("activation, k", [("topk", 2), ("relu", None)])
def test_training_reports_only_silent_latents_as_dead(activation, k):
    """Whatever fired within the last ``dead_after`` steps is alive: with TopK at least k latents fire
    every step, so at most n - k can ever be dead."""
    d, n, dead_after = 6, 8, 3
    sae = SparseAutoencoder(SAEConfig(d=d, n=n, activation=activation, k=k),
                            generator=torch.Generator().manual_seed(0))
    config = TrainConfig(steps=20, batch_size=32, prefix_mode="vanilla", sparsity_coeff=1e-3, dead_after=dead_after,
                         aux_k=2, log_every=4, progress=False, resort_every=0, data_chunk_steps=20)
    history = train(sae, lambda rows, g: torch.randn(rows, d, generator=g), config).history
    assert len(history) == 5
    assert all(row["l0"] > 0 for row in history)
    assert all(row["dead"] <= n - (k or 1) for row in history), [row["dead"] for row in history]
    if activation == "relu":  # dense ReLU on Gaussian data: every latent keeps firing
        assert all(row["dead"] == 0 for row in history), [row["dead"] for row in history]
