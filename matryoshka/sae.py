"""A thin sparse autoencoder whose training loss is :func:`matryoshka.matryoshka_loss`.

    pre = (x - b_dec) @ W_enc + b_enc,     a = act(pre),     x_hat = a @ W_dec + b_dec

``W_dec`` is ``(n, d)``: row ``i`` is latent ``i``'s direction, as the loss op expects.

Activations:

* ``"topk"``: the ``k`` largest ReLU'd pre-activations per row, returned as ``SparseActs``.
* ``"batchtopk"``: the ``round(k * B)`` largest over the whole batch (rows keep different numbers,
  padded with ``-1``); ``k`` is an average, so it need not be an integer.  In eval mode it is a
  JumpReLU with one threshold: an EMA of the smallest activation kept during training (Bussmann et
  al., 2024).
* ``"relu"``: dense ReLU; the sparsity penalty is the L1 norm of the activations.
* ``"jumprelu"``: dense ``pre * H(pre - theta)`` with a learned per-latent threshold; the penalty is
  the L0 norm, both trained with straight-through rectangle-kernel pseudo-derivatives
  (Rajamanoharan et al., 2024).

Decoder norm: rows of ``W_dec`` are kept at unit norm.  The trainer calls
:meth:`remove_parallel_grad_` before each optimiser step (so the step moves along the sphere) and
:meth:`normalize_decoder_` after it.  With unit rows the plain L1 penalty equals the
decoder-norm-scaled one, so a latent cannot dodge the penalty by growing its decoder row.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from .distributed import Ranks
from .durable_files import replace_file
from .loss import MatryoshkaLossOutput, matryoshka_loss
from .prefixes import Prefixes
from .sparse_acts import PADDING_INDEX, SparseActs
from .validation import is_count, is_finite_number

__all__ = ["SAEConfig", "SAEOutput", "SparseAutoencoder", "ACTIVATIONS"]

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")


@dataclass
class SAEConfig:
    """Shape and activation of a :class:`SparseAutoencoder` (saved as JSON next to the weights).

    ``prefix_lengths`` / ``prefix_weights``: the SAE's default :class:`Prefixes` (``None``: the
    single prefix ``n``, a vanilla SAE).  ``k``: active latents per row for TopK (an integer) and
    on average over the batch for BatchTopK (any number ``0 < k <= n``, e.g. a toy's expected L0).
    ``jumprelu_bandwidth`` / ``jumprelu_init_threshold``: the JumpReLU kernel width and start.
    """

    d: int
    n: int
    activation: str = "relu"
    k: int | float | None = None
    prefix_lengths: list[int] | None = None
    prefix_weights: list[float] | None = None
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05

    def __post_init__(self) -> None:
        for name in ("d", "n"):
            if not is_count(getattr(self, name), 1):
                raise ValueError(f"SAEConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk" and not (is_count(self.k, 1) and self.k <= self.n):
            raise ValueError(f"activation 'topk' needs an integer 1 <= k <= n={self.n}, got k={self.k!r}")
        if self.activation == "batchtopk" and not (is_finite_number(self.k) and 0 < self.k <= self.n):
            raise ValueError(f"activation 'batchtopk' needs a number 0 < k <= n={self.n} (latents per row on "
                             f"average), got k={self.k!r}")
        # Both enter as a divisor and a logarithm (the threshold is learned in log space).
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value > 0):
                raise ValueError(f"SAEConfig.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class SAEOutput:
    """``acts``: ``SparseActs`` (TopK/BatchTopK) or dense ``(B, n)``; ``recon``: ``(B, d)``;
    ``pre``: the ``(B, n)`` pre-activations (the dead-latent loss and JumpReLU penalty need them)."""

    acts: SparseActs | torch.Tensor
    recon: torch.Tensor
    pre: torch.Tensor


class _JumpReLU(torch.autograd.Function):
    """``z * H(z - theta)``; d/dtheta = ``-(theta / eps) * K((z - theta) / eps)``, K the unit rectangle."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        near = ((z - theta).abs() < ctx.eps / 2).to(grad.dtype)
        d_theta = (-(theta / ctx.eps) * near * grad).sum(0)
        return grad * (z > theta), d_theta, None


class _Step(torch.autograd.Function):
    """``H(z - theta)`` (the L0 count); d/dtheta = ``-(1 / eps) * K((z - theta) / eps)``, none for z."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        near = ((z - theta).abs() < ctx.eps / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.eps) * near * grad).sum(0), None


def _sparse_rows(acts: torch.Tensor, keep: torch.Tensor, width: int) -> SparseActs:
    """The entries of ``acts`` where ``keep`` holds, as ``SparseActs`` with ``width`` slots per row.

    A row with fewer kept entries is padded; a row with more keeps its ``width`` largest.
    """
    masked = torch.where(keep, acts, -1.0)  # kept values are >= 0, so they sort first
    values, indices = masked.topk(min(max(width, 1), acts.shape[1]), dim=1)
    kept = values >= 0
    return SparseActs(torch.where(kept, values, 0.0), torch.where(kept, indices, PADDING_INDEX))


class SparseAutoencoder(nn.Module):
    """An SAE with a choice of activation (see module doc) and a default Matryoshka prefix set."""

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        d, n = config.d, config.n
        # Tied initialisation: unit decoder rows, encoder = decoder transpose, zero biases.
        W = torch.randn(n, d, generator=generator)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if config.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), float(config.jumprelu_init_threshold)).log())
        # BatchTopK inference threshold; negative until the first training batch sets it.
        self.register_buffer("threshold", torch.tensor(-1.0))
        # BatchTopK training rows have a fixed number of slots, ``row_width`` (a host int, so that a
        # step needs no host sync), sized from the widest row seen: see :meth:`update_row_width`.
        self.row_width: int | None = None
        self.register_buffer("_row_stats", torch.zeros(2, dtype=torch.long), persistent=False)
        # Set by the trainer for data-parallel training: BatchTopK then selects over the union of
        # all ranks' batches and the dead-latent loss normalises by the global error.
        self.data_parallel: Ranks | None = None
        if config.prefix_lengths is None:
            self.prefixes = Prefixes([n])
        else:
            self.prefixes = Prefixes(config.prefix_lengths, config.prefix_weights)

    # ------------------------------------------------------------------------------ forward
    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> SparseActs | torch.Tensor:
        """The activations for pre-activations ``pre`` (sparse for TopK/BatchTopK, else dense)."""
        kind = self.config.activation
        z = pre.relu()
        if kind == "relu":
            return z
        if kind == "jumprelu":
            return _JumpReLU.apply(z, self.log_threshold.exp(), self.config.jumprelu_bandwidth)
        if kind == "topk":
            return SparseActs.from_dense(z, int(self.config.k))
        if not self.training:  # batchtopk at inference: one global threshold
            return SparseActs.from_mask(z, z > self.threshold.clamp(min=0))  # one host sync: widest row
        ranks = self.data_parallel
        if ranks is None:
            flat = z.flatten()
            kept_values, kept = flat.topk(min(self.batch_budget(z.shape[0]), flat.numel()))
            keep = torch.zeros_like(flat, dtype=torch.bool).scatter(0, kept, True).view_as(z)
        else:
            kept_values, keep = self._global_batch_topk(z, self.batch_budget(z.shape[0] * ranks.size), ranks)
        keep = keep & (z > 0)
        with torch.no_grad():
            smallest = torch.where(kept_values > 0, kept_values, float("inf")).min()
            ema = torch.where(self.threshold < 0, smallest, 0.99 * self.threshold + 0.01 * smallest)
            # A batch with nothing active says nothing about the threshold (and costs no host sync).
            self.threshold.copy_(torch.where(torch.isfinite(smallest), ema, self.threshold))
            counts = keep.sum(1)
            if self.row_width is None:  # the first training batch sizes the rows: one host sync
                widest = counts.max()
                self.update_row_width(int(widest if ranks is None else ranks.max_(widest)))
            widest = torch.maximum(self._row_stats[0], counts.max())
            dropped = self._row_stats[1] + (counts - self.row_width).clamp(min=0).sum()
            self._row_stats.copy_(torch.stack([widest, dropped]))
        return _sparse_rows(z, keep, self.row_width)

    def batch_budget(self, rows: int) -> int:
        """How many activations BatchTopK keeps in a batch of ``rows`` rows: ``round(k * rows)``,
        at least 1 (``k`` may be fractional)."""
        return max(1, round(self.config.k * rows))

    @staticmethod
    @torch.no_grad()
    def _global_batch_topk(z: torch.Tensor, budget: int, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK over the union of all ranks' batches: the ``budget`` (``k * B``) largest values
        of the global batch (``B`` = all ranks' rows) and this rank's mask of the entries among them.

        The global top ``budget`` restricted to one rank lies within that rank's own top ``budget``,
        so gathering each rank's local top ``budget`` values (``W * budget`` numbers) finds the exact
        global cut-off; every rank then keeps its entries at or above it.  Same selection as one
        process with the whole batch, except for exact ties at the cut-off (all are kept).
        """
        flat = z.flatten()
        local = flat.topk(min(budget, flat.numel())).values
        everyone = ranks.gather(local)
        kept_values = everyone.topk(min(budget, everyone.numel())).values
        return kept_values, z >= kept_values[-1]

    def update_row_width(self, widest: int) -> None:
        """Size BatchTopK training rows for ``widest`` kept latents (host int) and restart the counts.

        A row has ``ceil(1.5 * widest)`` slots (at least ``ceil(k)``, at most ``n``).  Should a later
        row keep more, its smallest entries beyond the width are dropped from that step and counted in
        ``row_stats()[1]``; the trainer reads both counters once per logging interval (its only host
        sync) and calls this with the widest row seen, so the width catches up at the next read-out.
        """
        k, n = math.ceil(self.config.k), self.config.n
        width = min(n, max(k, -(-3 * int(widest) // 2)))
        self.row_width = max(width, self.row_width or 0)
        self._row_stats.zero_()

    def row_stats(self) -> torch.Tensor:
        """``(2,)`` int64 on the SAE's device: the widest BatchTopK training row since the last
        :meth:`update_row_width`, and how many kept entries were dropped for lack of slots."""
        return self._row_stats

    def load_row_state(self, row_width: int | None, row_stats: torch.Tensor) -> None:
        """Restore :attr:`row_width` and the :meth:`row_stats` counters (resuming a checkpoint)."""
        self.row_width = row_width
        self._row_stats.copy_(row_stats)

    def decode(self, acts: SparseActs | torch.Tensor) -> torch.Tensor:
        """``acts @ W_dec + b_dec``; sparse activations are decoded without a ``(B, n)`` tensor."""
        if isinstance(acts, SparseActs):
            return acts.decode(self.W_dec) + self.b_dec
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.encode_pre(x)
        acts = self.activate(pre)
        return SAEOutput(acts, self.decode(acts), pre)

    def dense_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` activations, dense whatever the activation kind (for metrics)."""
        acts = self.activate(self.encode_pre(x))
        return acts.to_dense(self.config.n) if isinstance(acts, SparseActs) else acts

    # ------------------------------------------------------------------------------ losses
    def reconstruction_loss(
        self,
        x: torch.Tensor,
        acts: SparseActs | torch.Tensor,
        prefixes: Prefixes | None = None,
        validate: bool = False,
        detach: bool = False,
    ) -> MatryoshkaLossOutput:
        """The Matryoshka loss of ``acts`` on ``x`` over ``prefixes`` (default: the SAE's own).

        ``validate=False`` skips the loss op's index check (a host sync): the SAE's own sparse
        activations have in-range, distinct indices by construction.  Pass ``True`` for others.
        ``detach=True``: detached levels (see :func:`matryoshka.matryoshka_loss`); same loss value.
        """
        prefixes = self.prefixes if prefixes is None else prefixes
        return matryoshka_loss(x, acts, self.W_dec, self.b_dec, prefixes, validate=validate, detach=detach)

    def sparsity_penalty(self, out: SAEOutput, latent_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Batch mean of the L1 (ReLU) or L0 (JumpReLU) norm of the activations; 0 for TopK kinds.

        Decoder rows have unit norm, so this equals the decoder-norm-scaled penalty.
        ``latent_weights``: an ``(n,)`` tensor scaling latent ``i``'s term (e.g. the share of the
        prefix weight that reaches it, :func:`matryoshka.train.prefix_penalty_weights`); ``None``:
        every latent counts 1 (the plain norm, computed exactly as without the argument).
        """
        kind = self.config.activation
        if kind == "relu":
            per_latent = out.acts
        elif kind == "jumprelu":
            theta = self.log_threshold.exp()
            per_latent = _Step.apply(out.pre.relu(), theta, self.config.jumprelu_bandwidth)
        else:
            return out.pre.new_zeros(())
        if latent_weights is not None:
            per_latent = per_latent * latent_weights.to(per_latent.dtype)
        return per_latent.sum(1).mean()

    def auxk_loss(self, x: torch.Tensor, out: SAEOutput, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        """Dead-latent auxiliary loss (Gao et al., 2024): the ``k_aux`` largest pre-activations among
        ``dead`` latents reconstruct the residual error, normalised by the error's own size.

        Returns 0 when nothing is dead.  Gradients reach only the dead latents' weights.
        """
        error = (x - out.recon).detach()
        masked = torch.where(dead, out.pre, float("-inf"))
        values, indices = masked.topk(min(k_aux, self.config.n), dim=1)
        values = torch.where(torch.isfinite(values), values.relu(), 0.0)
        error_hat = SparseActs(values, indices).decode(self.W_dec)
        scale = error.pow(2).sum(1).mean()
        if self.data_parallel is not None:  # a ratio of batch means: the denominator must be global
            scale = self.data_parallel.mean(scale)
        loss = (error_hat - error).pow(2).sum(1).mean() / scale.clamp(min=1e-12)
        return torch.where(dead.any(), loss, 0.0)

    # ------------------------------------------------------------------------------ constraints
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each (unit) decoder row: it would only change the norm."""
        if self.W_dec.grad is not None:
            W = self.W_dec
            W.grad.sub_((W.grad * W).sum(1, keepdim=True) * W)

    @torch.no_grad()
    def permute_latents_(self, perm: torch.Tensor) -> None:
        """Reorder latents in place: new latent ``i`` is old latent ``perm[i]``.

        The same ``nn.Parameter`` objects are kept, so optimiser state keyed on them stays valid
        (the trainer permutes that state alongside, see :func:`latent_dims`).
        """
        for param, dim in self.latent_dims():
            param.copy_(param.index_select(dim, perm))

    def latent_dims(self) -> list[tuple[nn.Parameter, int]]:
        """Every parameter with a latent axis, and that axis."""
        dims = [(self.W_enc, 1), (self.b_enc, 0), (self.W_dec, 0)]
        if self.config.activation == "jumprelu":
            dims.append((self.log_threshold, 0))
        return dims

    def latent_moments(self, optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, int]]:
        """``optimizer``'s state tensors of the parameters with a latent axis (Adam's two moments),
        each with that axis: what must move or reset with the latents.  Scalar state (Adam's step
        count) and parameters without state yet are left out."""
        return [(moment, dim) for param, dim in self.latent_dims()
                for moment in optimizer.state.get(param, {}).values() if moment.dim() > 0]

    # ------------------------------------------------------------------------------ save / load
    def state_files(self) -> dict[str, bytes]:
        """The files :meth:`save` writes, as bytes: ``config.json`` (the config, with the current
        default prefixes) and ``sae.safetensors`` (parameters and persistent buffers)."""
        config = asdict(self.config)
        config["prefix_lengths"] = self.prefixes.lengths.tolist()
        config["prefix_weights"] = self.prefixes.weights.tolist()
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        return {"config.json": json.dumps(config, indent=2).encode(), "sae.safetensors": save(tensors)}

    def save(self, directory: str | Path) -> None:
        """``sae.safetensors`` (weights and buffers) and ``config.json`` in ``directory``, each
        replaced atomically: a kill mid-save leaves a whole file, the old one or the new."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.state_files().items():
            replace_file(directory / name, data)

    @classmethod
    def load(cls, directory: str | Path) -> SparseAutoencoder:
        directory = Path(directory)
        config = SAEConfig(**json.loads((directory / "config.json").read_text()))
        sae = cls(config)
        sae.load_state_dict(load_file(str(directory / "sae.safetensors")))
        return sae
