"""Argument checks for ``matryoshka_loss``: clear errors that name the argument, before any kernel runs;
and the predicates the configuration classes (``SAEConfig``, ``TrainConfig``) check their fields with."""

from __future__ import annotations

import math
import numbers

import torch

from .prefixes import Prefixes
from .sparse_acts import SparseActs

__all__ = ["BACKENDS", "ORDERS", "check_inputs", "check_sparse_indices", "check_weight_values", "is_count",
           "is_finite_number"]

BACKENDS = ("auto", "torch", "triton", "reference")
ORDERS = ("index", "rank")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_count(value, least: int) -> bool:
    """``value`` is an integer (Python or NumPy, not a bool) ``>= least``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def is_finite_number(value) -> bool:
    """``value`` is a finite real number (Python or NumPy, not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_weight_values(name: str, weights) -> list[float]:
    """The entries of a user's list of prefix weights (argument ``name``) as floats: numbers (not
    bools), finite and >= 0; the integrations check the container and the length themselves."""
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise TypeError(f"{name} must hold only numbers, got {list(weights)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"{name} must be finite and >= 0, got {list(weights)}")
    return [float(w) for w in weights]


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def check_inputs(
    x: torch.Tensor,
    acts: SparseActs | torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    prefixes: Prefixes,
    backend: str,
    order: str = "index",
    detach: bool = False,
    rescale_acts_by_decoder_norm: bool = False,
) -> None:
    """Raise ``TypeError``/``ValueError`` for any malformed argument (no host sync).

    Float dtypes may mix (``matryoshka_loss`` promotes them as torch does); anything else that is
    not a float16, bfloat16, float32 or float64 tensor (integers, complex) is an error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if order not in ORDERS:
        raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}")
    for name, flag in (("detach", detach), ("rescale_acts_by_decoder_norm", rescale_acts_by_decoder_norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}")
    if not isinstance(prefixes, Prefixes):
        raise TypeError(f"`prefixes` must be a matryoshka.Prefixes, got {type(prefixes).__name__}")
    _check_float("x", x)
    _check_float("W_dec", W_dec)
    if x.dim() != 2:
        raise ValueError(f"`x` must have shape (B, d), got {tuple(x.shape)}")
    if W_dec.dim() != 2:
        raise ValueError(f"`W_dec` must have shape (n, d), got {tuple(W_dec.shape)}")
    rows, d = x.shape
    n = W_dec.shape[0]
    if W_dec.shape[1] != d:
        raise ValueError(
            f"`W_dec` must have shape (n, d={d}) to match `x` of shape {tuple(x.shape)}, "
            f"got {tuple(W_dec.shape)}"
        )
    named = {"x": x, "W_dec": W_dec}
    if b_dec is not None:
        _check_float("b_dec", b_dec)
        if tuple(b_dec.shape) != (d,):
            raise ValueError(f"`b_dec` must have shape (d,) = ({d},), got {tuple(b_dec.shape)}")
        named["b_dec"] = b_dec
    if isinstance(acts, SparseActs):
        _check_float("acts.values", acts.values)
        if not isinstance(acts.indices, torch.Tensor) or acts.indices.dtype != torch.int64:
            got = acts.indices.dtype if isinstance(acts.indices, torch.Tensor) else type(acts.indices)
            raise TypeError(f"`acts.indices` must be an int64 tensor, got {got}")
        if acts.values.dim() != 2 or acts.values.shape[0] != rows:
            raise ValueError(
                f"`acts.values` must have shape (B={rows}, k), got {tuple(acts.values.shape)}"
            )
        if acts.indices.shape != acts.values.shape:
            raise ValueError(
                f"`acts.indices` must have the shape of `acts.values` {tuple(acts.values.shape)}, "
                f"got {tuple(acts.indices.shape)}"
            )
        named["acts.values"] = acts.values
        named["acts.indices"] = acts.indices
    elif isinstance(acts, torch.Tensor):
        _check_float("acts", acts)
        if tuple(acts.shape) != (rows, n):
            raise ValueError(
                f"dense `acts` must have shape (B, n) = ({rows}, {n}), got {tuple(acts.shape)}"
            )
        named["acts"] = acts
    else:
        raise TypeError(
            f"`acts` must be a SparseActs or a dense (B, n) tensor, got {type(acts).__name__}"
        )
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "all tensors must be on one device; got "
            + ", ".join(f"{k} on {v}" for k, v in devices.items())
        )
    prefixes.check_against(n)
    if order == "rank":
        _check_rank_order(acts, prefixes)


def _check_rank_order(acts: SparseActs | torch.Tensor, prefixes: Prefixes) -> None:
    """Rank-order prefix lengths count each row's largest activations, so they need ``SparseActs``
    and must not exceed ``k``."""
    if not isinstance(acts, SparseActs):
        raise ValueError(
            "order='rank' needs `acts` as SparseActs (a row's k largest activations); dense `acts` "
            "have no ranking: pass SparseActs.from_dense(acts, k), or use order='index'"
        )
    k = acts.values.shape[1]
    if prefixes.max_length > k:
        raise ValueError(
            f"prefixes: with order='rank' lengths count a row's largest activations and must be <= k = {k} "
            f"(acts.values.shape[1]), got max length {prefixes.max_length}"
        )


def check_sparse_indices(sorted_indices: torch.Tensor, n: int) -> None:
    """Out-of-range and duplicated latent indices, with one host sync for both checks.

    ``sorted_indices`` is each row sorted ascending with padding (-1) moved to the end.
    """
    if sorted_indices.numel() == 0:
        return
    out_of_range = ((sorted_indices < -1) | (sorted_indices >= n)).any()
    active = sorted_indices[:, 1:] >= 0
    duplicated = ((sorted_indices[:, 1:] == sorted_indices[:, :-1]) & active).any()
    bad_range, bad_dup = torch.stack([out_of_range, duplicated]).tolist()
    if bad_range:
        raise ValueError(
            f"`acts.indices` must lie in [0, n) = [0, {n}) or be -1 for padding; "
            f"found {int(sorted_indices[(sorted_indices < -1) | (sorted_indices >= n)][0])}"
        )
    if bad_dup:
        raise ValueError("`acts.indices` must not repeat a latent within a row")
