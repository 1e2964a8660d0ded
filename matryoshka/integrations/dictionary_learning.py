"""dictionary_learning's Matryoshka BatchTopK trainer with its losses computed by the fused op.

    from matryoshka.integrations.dictionary_learning import FusedMatryoshkaBatchTopKTrainer
    trainer = FusedMatryoshkaBatchTopKTrainer(steps=..., activation_dim=..., dict_size=..., k=...,
                                              layer=..., lm_name=..., group_fractions=[...])

Tested against ``dictionary-learning==0.1.0`` (PyPI), whose
``dictionary_learning.trainers.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer`` decodes its groups
one after another: a running sum of dense ``(B, group_size) @ (group_size, d)`` products and one
``(B, d)`` residual per group.  :class:`FusedMatryoshkaBatchTopKTrainer` subclasses it and replaces
only :meth:`loss` (and the dead-latent :meth:`get_auxiliary_loss` it calls) with calls of
:func:`matryoshka.matryoshka_loss` on the BatchTopK activations as ragged ``SparseActs`` (each row
scanned to its own count): every group's loss in one pass, whatever the number of groups, and
``matryoshka_prefixes="every"`` scores every prefix ``1..dict_size``.  Everything else is the stock
trainer's: constructor, ``update`` (geometric-median ``b_dec`` at step 0, decoder-gradient
projection, clipping, Adam, schedule, unit-norm decoder), encoder, BatchTopK selection, threshold,
dead-latent bookkeeping, and the ``MatryoshkaBatchTopKSAE`` it trains (saved and loaded as usual).

Conventions (dictionary_learning's).  With group ends ``e_1 < ... < e_G = dict_size``, the
``A = ae.active_groups`` active groups and ``w = group_weights`` (default ``1/G`` each)::

    L_g     = mean_b sum_d (x_b - b_dec - sum_{i < e_g} f_bi W_dec[i])^2    # summed over d, mean over batch
    l2_loss = (1/A) sum_{g <= A} w_g L_g                                    # a mean of the weighted losses
    loss    = l2_loss + auxk_alpha * auxk_loss

so with the default weights the reconstruction term is ``(1/G^2) sum_g L_g``.  The op computes it as
``Prefixes.groups(e[:A], weights=w[:A] / A)``.  Logged (``logging=True``): ``l2_loss``,
``auxk_loss``, ``loss``, and ``min_l2_loss`` / ``max_l2_loss``, the smallest and largest *weighted*
loss ``w_g L_g``, all under the stock names.  ``matryoshka_prefixes="every"`` applies the same rule
to the prefixes ``1..e_A``: ``l2_loss = (1/e_A) sum_{m <= e_A} w_m L_m`` with
``w = matryoshka_level_weights`` (``dict_size`` weights, default ``1/dict_size`` each, the stock
default rule with one "group" per latent; the reconstruction term is then about ``G/dict_size`` times
the ``G``-group one, which Adam does not see but the relative weight of the auxiliary loss and the
gradient clipping do: pass weights to rescale).

The dead-latent auxiliary loss (latents that have not fired for ``dead_feature_threshold`` tokens):
the ``min(activation_dim // 2, #dead)`` dead latents with the largest ReLU pre-activations
reconstruct the detached residual ``x - x_hat`` without ``b_dec``, in float32 (as the stock trainer:
its ``.float()`` casts), divided by the residual's variance summed over ``d``; here the
reconstruction is one op call on those latents instead of a dense ``(B, dict_size)`` decode.

``dictionary_learning/__init__.py`` imports ``nnsight`` (for its ``ActivationBuffer``), which this
module does not need.  When ``nnsight`` is missing, the package is registered without running its
``__init__`` (its submodules, the trainers and ``dictionary_learning.dictionary``, import as usual;
the names ``__init__`` would define raise an ``AttributeError`` that says so).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections import namedtuple
from collections.abc import Sequence

import torch

from ..loss import matryoshka_loss
from ..orthogonality import DEFAULT_CHUNK, check_settings, penalty_at_step
from ..prefixes import Prefixes
from ..sparse_acts import SparseActs
from ..validation import BACKENDS, check_weight_values

__all__ = ["FusedMatryoshkaBatchTopKTrainer"]

INSTALL = "pip install \"matryoshka-loss[dictionary-learning]\" && pip install --no-deps dictionary-learning==0.1.0"
PREFIX_MODES = ("groups", "every")
_TRAINER_MODULE = "dictionary_learning.trainers.matryoshka_batch_top_k"


def _package_without_init():
    """``dictionary_learning`` as a bare package (its ``__path__``, not its ``__init__``), so that its
    submodules import without the ``nnsight`` that only ``__init__`` needs."""
    spec = importlib.util.find_spec("dictionary_learning")
    package = importlib.util.module_from_spec(spec)  # sets __path__; runs nothing
    package.__version__ = importlib.metadata.version("dictionary-learning")

    def __getattr__(name: str):
        submodule = sys.modules.get(f"dictionary_learning.{name}")  # imported by the failed __init__
        if submodule is not None:
            return submodule
        raise AttributeError(
            f"dictionary_learning.{name}: the package was loaded by matryoshka.integrations.dictionary_learning "
            "without its __init__, which needs nnsight (not installed); import its submodules, e.g. "
            "dictionary_learning.dictionary or dictionary_learning.trainers, or install nnsight"
        )

    package.__getattr__ = __getattr__
    sys.modules["dictionary_learning"] = package
    return package


def _import_trainer_module():
    try:
        return importlib.import_module(_TRAINER_MODULE)
    except ModuleNotFoundError as error:
        if error.name == "dictionary_learning" or importlib.util.find_spec("dictionary_learning") is None:
            raise ImportError(
                f"matryoshka.integrations.dictionary_learning needs dictionary-learning; install it with `{INSTALL}`"
            ) from error
    # Its __init__ needs something its trainers may not (nnsight): load them without that __init__.
    _package_without_init()
    try:
        return importlib.import_module(_TRAINER_MODULE)
    except ModuleNotFoundError as error:
        sys.modules.pop("dictionary_learning", None)
        raise ImportError(f"dictionary_learning's trainers need {error.name!r}; install them with `{INSTALL}`") from error


_stock = _import_trainer_module()
MatryoshkaBatchTopKTrainer = _stock.MatryoshkaBatchTopKTrainer
LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])  # the stock trainer's logging record


def _check_weights(name: str, weights, expected: int) -> list[float]:
    if hasattr(weights, "tolist"):  # a tensor or an array
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a list of numbers or None, got {weights!r}")
    values = check_weight_values(name, weights)
    if len(values) != expected:
        raise ValueError(f"{name} must have {expected} entries, got {len(values)}")
    return values


class FusedMatryoshkaBatchTopKTrainer(MatryoshkaBatchTopKTrainer):
    """dictionary_learning's ``MatryoshkaBatchTopKTrainer`` whose losses come from the fused op.

    Takes the stock constructor's arguments, plus (keyword only):

    Args:
        matryoshka_prefixes: ``"groups"`` (default, the stock behaviour): the group boundaries, with
            the stock ``group_weights``.  ``"every"``: every prefix ``1..dict_size``.
        matryoshka_level_weights: with ``"every"`` only: ``dict_size`` non-negative weights, one per
            prefix; ``None`` (default) gives ``1/dict_size`` each.  With ``"groups"`` the weights are
            the stock ``group_weights``, and passing this is an error.
        matryoshka_backend: the op's backend: ``"auto"`` (default: the Triton kernel on CUDA, the
            PyTorch scan elsewhere), ``"torch"``, ``"triton"`` or ``"reference"``.
        matryoshka_orthogonality_coeff: the weight γ of the decoder orthogonality penalty
            (:mod:`matryoshka.orthogonality`), added to the loss and logged as
            ``orthogonality_loss``; 0 (default) leaves it out.
        matryoshka_orthogonality_chunk: the most latents whose decoder rows are compared with each
            other per step (default 8192); with more, random chunks drawn from the trainer's
            ``seed`` and the step, the same for a resumed run.

    With the defaults, :meth:`loss` and :meth:`update` give what the stock trainer gives (loss,
    logged losses under the same names, threshold update, dead-latent counters and auxiliary loss,
    gradients and so parameters) up to rounding.  ``x_hat`` in the logging record is the op's
    reconstruction, detached, in the op's compute dtype (float32 also under autocast).  Negative
    ``group_weights`` (which the stock trainer accepts) are refused.
    """

    def __init__(
        self,
        *args,
        matryoshka_prefixes: str = "groups",
        matryoshka_level_weights: Sequence[float] | torch.Tensor | None = None,
        matryoshka_backend: str = "auto",
        matryoshka_orthogonality_coeff: float = 0.0,
        matryoshka_orthogonality_chunk: int = DEFAULT_CHUNK,
        **kwargs,
    ):
        check_settings(matryoshka_orthogonality_coeff, matryoshka_orthogonality_chunk,
                       "matryoshka_orthogonality_coeff", "matryoshka_orthogonality_chunk")
        if matryoshka_prefixes not in PREFIX_MODES:
            raise ValueError(f"matryoshka_prefixes must be one of {PREFIX_MODES}, got {matryoshka_prefixes!r}")
        if matryoshka_backend not in BACKENDS:
            raise ValueError(f"matryoshka_backend must be one of {BACKENDS}, got {matryoshka_backend!r}")
        if matryoshka_prefixes == "groups" and matryoshka_level_weights is not None:
            raise ValueError(
                "matryoshka_level_weights is only for matryoshka_prefixes='every'; with 'groups' pass the "
                "trainer's own group_weights"
            )
        super().__init__(*args, **kwargs)
        self.matryoshka_prefixes = matryoshka_prefixes
        self.matryoshka_backend = matryoshka_backend
        self.matryoshka_orthogonality_coeff = float(matryoshka_orthogonality_coeff)
        self.matryoshka_orthogonality_chunk = matryoshka_orthogonality_chunk
        self._group_weights = _check_weights("group_weights", self.group_weights, len(self.group_sizes))
        if matryoshka_prefixes == "every":
            size = self.ae.dict_size
            self.matryoshka_level_weights = (
                [1.0 / size] * size if matryoshka_level_weights is None
                else _check_weights("matryoshka_level_weights", matryoshka_level_weights, size)
            )
        else:
            self.matryoshka_level_weights = None
        self._aux_prefixes = Prefixes.groups([self.ae.dict_size])
        self._prefix_cache: dict[int, tuple[Prefixes, torch.Tensor]] = {}
        self._scored(self.ae.active_groups)

    def _scored(self, active_groups: int) -> tuple[Prefixes, torch.Tensor]:
        """The op's prefixes for ``active_groups`` active groups (each weight divided by the number
        of scored prefixes: the stock loss is a mean of weighted losses) and the float64 weights
        the logged min/max multiply the unweighted per-prefix losses by."""
        if active_groups not in self._prefix_cache:
            ends = torch.tensor(self.group_sizes).cumsum(0)[:active_groups].tolist()
            if self.matryoshka_prefixes == "every":
                lengths, weights = list(range(1, ends[-1] + 1)), self.matryoshka_level_weights[: ends[-1]]
            else:
                lengths, weights = ends, self._group_weights[:active_groups]
            prefixes = Prefixes(lengths, [w / len(lengths) for w in weights])
            self._prefix_cache[active_groups] = (prefixes, torch.tensor(weights, dtype=torch.float64))
        return self._prefix_cache[active_groups]

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        """The stock trainer's loss (encode, BatchTopK, threshold update, every group's loss, the
        dead-latent bookkeeping and auxiliary loss), each reconstruction loss from one op call."""
        f, fired, post_relu = self.ae.encode(x, return_active=True, use_threshold=False)
        if step > self.threshold_start_step:  # as the stock trainer (which needs a step)
            self.update_threshold(f)
        prefixes, weights = self._scored(self.ae.active_groups)
        out = matryoshka_loss(
            x, SparseActs.from_dense(f), self.ae.W_dec, self.ae.b_dec, prefixes,
            backend=self.matryoshka_backend, validate=False,
        )
        x_hat = out.reconstruction
        self.effective_l0 = self.k
        self.num_tokens_since_fired += x.shape[0]
        self.num_tokens_since_fired[fired] = 0
        auxk_loss = self.get_auxiliary_loss((x - x_hat).detach(), post_relu)
        loss = out.loss + self.auxk_alpha * auxk_loss
        penalty = None
        if self.matryoshka_orthogonality_coeff:
            penalty = penalty_at_step(self.ae.W_dec, self.matryoshka_orthogonality_chunk, self.seed or 0, step)
            loss = loss + self.matryoshka_orthogonality_coeff * penalty
        if not logging:
            return loss
        weighted = out.per_prefix * weights.to(out.per_prefix.device, out.per_prefix.dtype)
        min_l2, max_l2 = torch.stack([weighted.min(), weighted.max()]).tolist()
        losses = {
            "l2_loss": out.loss.item(),
            "auxk_loss": auxk_loss.item(),
            "loss": loss.item(),
            "min_l2_loss": min_l2,
            "max_l2_loss": max_l2,
        }
        if penalty is not None:
            losses["orthogonality_loss"] = penalty.item()
        return LossLog(x, x_hat, f, losses)

    def get_auxiliary_loss(self, residual_BD: torch.Tensor, post_relu_acts_BF: torch.Tensor) -> torch.Tensor:
        """The stock dead-latent auxiliary loss (same value, same ``dead_features`` and
        ``pre_norm_auxk_loss`` attributes), its reconstruction from one op call on the selected
        dead latents rather than a dense ``(B, dict_size)`` decode."""
        dead = self.num_tokens_since_fired >= self.dead_feature_threshold
        self.dead_features = int(dead.sum())
        if self.dead_features == 0:
            self.pre_norm_auxk_loss = -1
            return torch.zeros((), dtype=residual_BD.dtype, device=residual_BD.device)
        candidates = torch.where(dead, post_relu_acts_BF, -torch.inf)
        values, indices = candidates.topk(min(self.top_k_aux, self.dead_features), dim=-1, sorted=False)
        residual = residual_BD.float()
        out = matryoshka_loss(
            residual, SparseActs(values.float(), indices), self.ae.W_dec.float(), None, self._aux_prefixes,
            backend=self.matryoshka_backend, validate=False,
        )
        self.pre_norm_auxk_loss = out.loss
        variance = (residual - residual_BD.mean(0).float()).pow(2).sum(-1).mean()
        return (out.loss / variance).nan_to_num(0.0)

    @property
    def config(self) -> dict:
        return {
            **super().config,
            "trainer_class": "FusedMatryoshkaBatchTopKTrainer",
            "matryoshka_prefixes": self.matryoshka_prefixes,
            "matryoshka_level_weights": self.matryoshka_level_weights,
            "matryoshka_backend": self.matryoshka_backend,
            "matryoshka_orthogonality_coeff": self.matryoshka_orthogonality_coeff,
            "matryoshka_orthogonality_chunk": self.matryoshka_orthogonality_chunk,
        }
