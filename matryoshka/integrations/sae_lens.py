"""SAELens's Matryoshka BatchTopK training SAE with its losses computed by the fused op.

    from matryoshka.integrations.sae_lens import FusedMatryoshkaBatchTopKTrainingSAEConfig
    cfg = FusedMatryoshkaBatchTopKTrainingSAEConfig(d_in=..., d_sae=..., k=..., matryoshka_widths=[...])

Importing this module registers the architecture ``"fused_matryoshka_batchtopk"`` with SAELens's
training-class registry, so SAELens's runners, ``TrainingSAE.from_dict`` and ``load_from_disk``
build :class:`FusedMatryoshkaBatchTopKTrainingSAE` from such a config.

The stock ``MatryoshkaBatchTopKTrainingSAE`` decodes its levels one after another (a running sum
of dense ``(B, width) @ (width, d)`` products), so its step grows with the number of levels.  This
class replaces that with one call of :func:`matryoshka.matryoshka_loss` over the BatchTopK
activations as ragged ``SparseActs`` (each row scanned to its own count), with the op's decoder-norm
rescaling, its reconstruction as ``sae_out`` (no second decode), its dtype promotion and its float32
accumulation under autocast: every level's loss in one pass, whatever the number of levels, and
``matryoshka_prefixes="every"`` scores every prefix ``1..d_sae``.  Its auxiliary losses (the TopK
one and ``use_matryoshka_aux_loss``) go through the op as well.  Everything else (encoder,
BatchTopK selection, threshold, saving as JumpReLU, folding) is the stock class's.

Conventions (SAELens's): each level's loss is the squared error summed over ``d_in`` and averaged
over the batch, and the training loss is the sum over levels (weighted by
``matryoshka_level_weights``) plus the auxiliary loss.  ``mse_loss`` is the full width's loss and
``inner_mse_loss_{w}`` the loss of the first ``w`` latents, for each ``w`` in
``matryoshka_widths[:-1]``; logged losses are unweighted and detached.  With
``matryoshka_orthogonality_coeff`` γ > 0 the loss also carries γ times the decoder orthogonality
penalty, logged unweighted as ``orthogonality_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
    from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "matryoshka.integrations.sae_lens needs SAELens; install it with "
        "`pip install matryoshka-loss[sae-lens]`"
    ) from error

from ..loss import matryoshka_loss
from ..orthogonality import DEFAULT_CHUNK, check_settings, penalty_at_step
from ..prefixes import Prefixes
from ..sparse_acts import PADDING_INDEX, SparseActs
from ..validation import BACKENDS, check_weight_values

__all__ = ["FusedMatryoshkaBatchTopKTrainingSAEConfig", "FusedMatryoshkaBatchTopKTrainingSAE"]

ARCHITECTURE = "fused_matryoshka_batchtopk"
PREFIX_MODES = ("groups", "every")
# These two undo a per-row input normalisation after each decode and keep the statistics for only
# one call: the stock class decodes twice per step and fails on its first training step with them.
_UNSUPPORTED_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


@dataclass
class FusedMatryoshkaBatchTopKTrainingSAEConfig(MatryoshkaBatchTopKTrainingSAEConfig):
    """SAELens's ``MatryoshkaBatchTopKTrainingSAEConfig`` (same fields, defaults and validation) plus:

    Args:
        matryoshka_prefixes: which prefixes the reconstruction loss scores.  ``"groups"`` (default,
            SAELens's behaviour): the ``matryoshka_widths``.  ``"every"``: every prefix
            ``1..d_sae``; ``matryoshka_widths`` then only choose the logged ``inner_mse_loss_{w}``
            and the levels of the Matryoshka auxiliary loss.
        matryoshka_level_weights: one non-negative weight per scored prefix: per level of
            ``matryoshka_widths`` including the final ``d_sae`` level (which SAELens appends when
            it is missing) for ``"groups"``, ``d_sae`` weights for ``"every"``.  ``None`` (default,
            SAELens's behaviour) weighs every level 1.
        matryoshka_backend: the op's backend: ``"auto"`` (default: the Triton kernel on CUDA, the
            PyTorch scan elsewhere), ``"torch"``, ``"triton"`` or ``"reference"``.
        matryoshka_orthogonality_coeff: the weight γ of the decoder orthogonality penalty
            (:mod:`matryoshka.orthogonality`: each latent's largest squared cosine with another
            decoder row, averaged), added to the loss and logged as ``orthogonality_loss``; 0
            (default) leaves it out.
        matryoshka_orthogonality_chunk: the most latents whose rows are compared with each other
            per step (default 8192): with more, the latents are split into random chunks drawn
            from the step number (``n_training_steps``), the same for a resumed run.
    """

    matryoshka_prefixes: str = "groups"
    matryoshka_level_weights: list[float] | None = None
    matryoshka_backend: str = "auto"
    matryoshka_orthogonality_coeff: float = 0.0
    matryoshka_orthogonality_chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.matryoshka_prefixes not in PREFIX_MODES:
            raise ValueError(f"matryoshka_prefixes must be one of {PREFIX_MODES}, got {self.matryoshka_prefixes!r}")
        if self.matryoshka_backend not in BACKENDS:
            raise ValueError(f"matryoshka_backend must be one of {BACKENDS}, got {self.matryoshka_backend!r}")
        if self.matryoshka_level_weights is not None:
            self._check_level_weights()
        check_settings(self.matryoshka_orthogonality_coeff, self.matryoshka_orthogonality_chunk,
                       "matryoshka_orthogonality_coeff", "matryoshka_orthogonality_chunk")

    def _check_level_weights(self) -> None:
        weights = self.matryoshka_level_weights
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise TypeError(f"matryoshka_level_weights must be a list of numbers or None, got {weights!r}")
        check_weight_values("matryoshka_level_weights", weights)
        if self.matryoshka_prefixes == "every":
            expected, what = self.d_sae, "one per prefix 1..d_sae with matryoshka_prefixes='every'"
        else:
            widths = list(self.matryoshka_widths)
            expected = len(widths) + (1 if widths and widths[-1] != self.d_sae else 0)
            what = "one per level of matryoshka_widths, counting the final d_sae level"
        if len(weights) != expected:
            raise ValueError(f"matryoshka_level_weights must have {expected} entries ({what}), got {len(weights)}")

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class FusedMatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAE):
    """SAELens's ``MatryoshkaBatchTopKTrainingSAE`` whose training losses come from the fused op.

    With the default config fields, :meth:`training_forward_pass` returns what the stock class
    returns (loss, logged losses under the same names, ``sae_out``, threshold update, gradients)
    up to rounding.  Not supported: ``normalize_activations`` ``"constant_norm_rescale"`` and
    ``"layer_norm"`` (the stock class fails with them too), and hooks on ``hook_sae_recons`` do
    not change the loss (they see ``sae_out``, which the loss is not computed from).  ``sae_out`` is
    the op's reconstruction, detached (SAELens's trainer reads it only for metrics), in the op's
    compute dtype (float32 also under autocast).
    """

    cfg: FusedMatryoshkaBatchTopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: FusedMatryoshkaBatchTopKTrainingSAEConfig, use_error_term: bool = False):
        if not isinstance(cfg, FusedMatryoshkaBatchTopKTrainingSAEConfig):
            raise TypeError(
                f"{type(self).__name__} needs a FusedMatryoshkaBatchTopKTrainingSAEConfig, got {type(cfg).__name__}"
            )
        if cfg.normalize_activations in _UNSUPPORTED_NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={cfg.normalize_activations!r} is not supported (SAELens's "
                "MatryoshkaBatchTopKTrainingSAE cannot train with it either); use 'none', "
                "'expected_average_only_in' or 'covariance_whitening'"
            )
        super().__init__(cfg, use_error_term)  # SAELens's checks; appends d_sae to the widths if missing
        widths, weights = cfg.matryoshka_widths, cfg.matryoshka_level_weights
        if cfg.matryoshka_prefixes == "every":
            self.prefixes = Prefixes.every(cfg.d_sae, weights)
            self._logged_positions = [w - 1 for w in widths[:-1]]
        else:
            self.prefixes = Prefixes.groups(widths, weights)
            self._logged_positions = list(range(len(widths) - 1))
        self._aux_prefixes = Prefixes.groups([cfg.d_sae])

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step's forward: encode, all-prefix loss through the op, aux loss, threshold."""
        if step_input.sae_in.dim() != 2:
            raise ValueError(f"sae_in must be (batch, d_in), got shape {tuple(step_input.sae_in.shape)}")
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.sae_in)
        acts = SparseActs.from_dense(feature_acts)  # BatchTopK rows of different lengths: one host sync
        out = self._loss(step_input.sae_in, acts, self.b_dec, self.prefixes)
        sae_out = self.hook_sae_recons(out.reconstruction)
        aux_loss = self._aux_loss(step_input, acts, hidden_pre, out.reconstruction)
        losses = {"mse_loss": out.per_prefix[-1], "auxiliary_reconstruction_loss": aux_loss.detach()}
        for width, position in zip(self.cfg.matryoshka_widths[:-1], self._logged_positions):
            losses[f"inner_mse_loss_{width}"] = out.per_prefix[position]
        loss = out.loss + aux_loss
        if self.cfg.matryoshka_orthogonality_coeff:
            penalty = penalty_at_step(self.W_dec, self.cfg.matryoshka_orthogonality_chunk, 0,
                                      step_input.n_training_steps)
            loss = loss + self.cfg.matryoshka_orthogonality_coeff * penalty
            losses["orthogonality_loss"] = penalty.detach()
        self.update_topk_threshold(feature_acts)
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses=losses,
            metrics={"topk_threshold": self.topk_threshold},
        )

    def _loss(self, x: torch.Tensor, acts: SparseActs, b_dec: torch.Tensor | None, prefixes: Prefixes):
        """The op on this SAE's decoder, with its backend and ``rescale_acts_by_decoder_norm``."""
        return matryoshka_loss(
            x, acts, self.W_dec, b_dec, prefixes, backend=self.cfg.matryoshka_backend, validate=False,
            rescale_acts_by_decoder_norm=self.cfg.rescale_acts_by_decoder_norm,
        )

    def _aux_loss(
        self, step_input: TrainStepInput, acts: SparseActs, hidden_pre: torch.Tensor, reconstruction: torch.Tensor
    ) -> torch.Tensor:
        """SAELens's dead-latent auxiliary loss, through the op.

        Per level ``[start, end)`` with dead latents (one level ``[0, d_sae)`` for the TopK aux
        loss, the Matryoshka levels with ``use_matryoshka_aux_loss``): the ``min(d_in // 2, dead)``
        dead latents with the largest pre-activations reconstruct the detached residual of the
        prefix ending at ``end``; the loss is scaled by ``min(dead / (d_in // 2), 1)``.  All levels
        go through one op call, stacked along the batch (each level's rows and activations
        multiplied by the square root of its scale).
        """
        dead = step_input.dead_neuron_mask
        sae_in = step_input.sae_in
        zero = reconstruction.new_zeros(())
        if dead is None:
            return zero
        ends = self.cfg.matryoshka_widths if self.cfg.use_matryoshka_aux_loss else [self.cfg.d_sae]
        dead_below = dead.cumsum(0)[torch.tensor(ends, device=dead.device) - 1]
        dead_per_level = torch.diff(dead_below, prepend=dead_below.new_zeros(1)).tolist()  # one host sync
        if not any(dead_per_level):
            return zero
        with torch.no_grad():
            if self.cfg.use_matryoshka_aux_loss:
                W_dec = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True) if self.cfg.rescale_acts_by_decoder_norm else self.W_dec
                residuals = sae_in.unsqueeze(1) - self.b_dec - _level_decodes(acts, W_dec, ends)
            else:
                residuals = (sae_in - reconstruction).unsqueeze(1)
        k_aux = self.cfg.d_in // 2
        targets, level_acts = [], []
        for level, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            num_dead = dead_per_level[level]
            if num_dead == 0:
                continue
            root_scale = math.sqrt(min(num_dead / k_aux, 1.0))
            masked = torch.where(dead[start:end], hidden_pre[:, start:end], -torch.inf)
            values, indices = masked.topk(min(k_aux, num_dead), dim=-1, sorted=False)
            level_acts.append(SparseActs(values * root_scale, indices + start))
            targets.append(residuals[:, level] * root_scale)
        width = max(a.values.shape[1] for a in level_acts)
        stacked = SparseActs(
            torch.cat([F.pad(a.values, (0, width - a.values.shape[1])) for a in level_acts]),
            torch.cat([F.pad(a.indices, (0, width - a.indices.shape[1]), value=PADDING_INDEX) for a in level_acts]),
        )
        out = self._loss(torch.cat(targets), stacked, None, self._aux_prefixes)
        return self.cfg.aux_loss_coefficient * len(targets) * out.loss


def _level_decodes(acts: SparseActs, W_dec: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """``(B, L, d)``: ``sum_{i < ends[l]} a_bi W_dec[i]`` for each level end, from one
    ``embedding_bag`` with one bag per (row, level) and a cumulative sum over levels."""
    rows, n, levels = acts.indices.shape[0], W_dec.shape[0], len(ends)
    indices, order = torch.where(acts.indices >= 0, acts.indices, n).sort(dim=1)  # padding last
    values = acts.values.gather(1, order)
    level = torch.searchsorted(torch.tensor(ends, device=indices.device), indices, right=True)  # padding: levels
    bag = (torch.arange(rows, device=indices.device).unsqueeze(1) * (levels + 1) + level).flatten()
    offsets = torch.searchsorted(bag, torch.arange(rows * (levels + 1), device=bag.device))
    sums = F.embedding_bag(
        indices.clamp(max=n - 1).flatten(),
        W_dec,
        offsets,
        mode="sum",
        per_sample_weights=torch.where(level < levels, values, 0.0).flatten().to(W_dec.dtype),
    )
    return sums.view(rows, levels + 1, -1)[:, :levels].cumsum(1)


def _register() -> None:
    """Register the architecture; a re-executed module (``importlib.reload``) replaces its own entry."""
    registered = SAE_TRAINING_CLASS_REGISTRY.get(ARCHITECTURE)
    if registered is None:
        register_sae_training_class(
            ARCHITECTURE, FusedMatryoshkaBatchTopKTrainingSAE, FusedMatryoshkaBatchTopKTrainingSAEConfig
        )
    elif registered[0].__module__ == __name__ and registered[0].__qualname__ == "FusedMatryoshkaBatchTopKTrainingSAE":
        SAE_TRAINING_CLASS_REGISTRY[ARCHITECTURE] = (
            FusedMatryoshkaBatchTopKTrainingSAE,
            FusedMatryoshkaBatchTopKTrainingSAEConfig,
        )
    else:
        raise RuntimeError(f"SAELens architecture {ARCHITECTURE!r} is already registered to {registered[0]!r}")


_register()
