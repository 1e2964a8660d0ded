"""Prefix sets: which latent prefixes a Matryoshka loss scores, and with what weight.

A prefix of length ``m`` is the first ``m`` latents; its loss is the squared error of reconstructing
``x`` from those latents alone.  ``Prefixes`` holds the strictly increasing lengths
``0 <= m_1 < ... < m_G`` and non-negative weights ``w_g``, plus the one derived table every backend
needs: the cumulative weight ``F(m) = sum_{g : m_g <= m} w_g`` looked up at any latent index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .host_copies import to_device

__all__ = ["Prefixes"]


def _check_count(where: str, name: str, value) -> None:
    # int() would quietly truncate 2.5 to 2, and a bool is no count.
    from .validation import is_count  # here, not at the top: validation imports Prefixes

    if not is_count(value, 1):
        raise ValueError(f"{where}: `{name}` must be an integer >= 1, got {value!r}")


def _as_lengths(lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(lengths, device=lengths.device if isinstance(lengths, torch.Tensor) else "cpu")
    if t.numel() == 0:
        raise ValueError("Prefixes: `lengths` must hold at least one prefix length")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"Prefixes: `lengths` must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"Prefixes: `lengths` must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.int64)
    if bool((t < 0).any()):
        raise ValueError(f"Prefixes: `lengths` must be >= 0, got min {int(t.min())}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError("Prefixes: `lengths` must be strictly increasing")
    return t


def _as_weights(weights: Sequence[float] | torch.Tensor | None, num: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(num, dtype=torch.float64, device="cpu")
    w = torch.as_tensor(weights, device=weights.device if isinstance(weights, torch.Tensor) else "cpu")
    if not (w.dtype.is_floating_point or w.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"Prefixes: `weights` must be real numbers, got dtype {w.dtype}")
    if w.dim() != 1 or w.numel() != num:
        raise ValueError(
            f"Prefixes: `weights` must have shape ({num},) to match `lengths`, got {tuple(w.shape)}"
        )
    if not isinstance(weights, torch.Tensor):
        # Python floats read straight into float64: torch.as_tensor would round them to float32.
        w = torch.from_numpy(np.asarray(weights, dtype=np.float64)).reshape(w.shape)
    w = w.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("Prefixes: `weights` must be finite")
    if bool((w < 0).any()):
        raise ValueError("Prefixes: `weights` must be >= 0")
    return w


class Prefixes:
    """Strictly increasing prefix lengths ``m_g`` in ``[0, n]`` with weights ``w_g >= 0``.

    The loss is ``sum_g w_g * mean_b ||x_b - b_dec - sum_{i < m_g} a_bi W_dec[i]||^2``.

    Args:
        lengths: strictly increasing non-negative ints.  Checked against ``n`` when the loss is called.
        weights: one non-negative finite weight per length; default 1.0 each.

    Use the builders for the common cases: :meth:`groups`, :meth:`balanced`, :meth:`every`, :meth:`sample`.
    ``lengths`` and ``weights`` are tensors; ``host_lengths`` holds the lengths as Python ints and
    ``max_length`` the last of them.
    """

    __slots__ = ("lengths", "weights", "host_lengths", "max_length", "_cumulative", "_device_cache")

    def __init__(
        self,
        lengths: Sequence[int] | torch.Tensor,
        weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        self.lengths: torch.Tensor = _as_lengths(lengths)
        self.weights: torch.Tensor = _as_weights(weights, self.lengths.numel())
        # Plain ints, so that checks against n and the dense scans' block plan stay host-side (constants
        # to torch.compile).
        self.host_lengths: tuple[int, ...] = tuple(self.lengths.tolist())
        self.max_length: int = self.host_lengths[-1]
        # F[g] = w_1 + ... + w_g with F[0] = 0, kept in float64 so that differences F(b) - F(a)
        # of long cumulative sums (G = n) do not lose the small weights to cancellation.
        self._cumulative = torch.cat([torch.zeros(1, dtype=torch.float64, device="cpu"), self.weights.cumsum(0)])
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def groups(cls, widths: Sequence[int], weights: Sequence[float] | None = None) -> Prefixes:
        """Fixed nested groups given by their cumulative widths, e.g. ``[64, 192, 512]``.

        This is the SAELens ``matryoshka_widths`` convention: the last width is usually ``n``.
        """
        return cls(widths, weights)

    @classmethod
    def balanced(cls, widths: Sequence[int], beta: float) -> Prefixes:
        """Nested groups ``widths`` with geometric weights ``w_g = beta^(G - g)``, ``g = 1..G``:
        innermost ``beta^(G-1)``, ..., next-to-outer ``beta``, outer ``1`` (the "balanced"
        Matryoshka SAE of Chanin et al., 2025, arXiv 2505.11756).

        * ``beta = 0``: only the outer prefix is scored: a plain SAE over ``widths[-1]`` latents.
        * ``beta = 1``: equal weights, ``Prefixes.groups(widths)``.
        * ``beta -> inf``: a latent of level ``h`` (``widths[h-2] <= i < widths[h-1]``) is reached
          by prefixes ``g >= h`` only, with weights ``beta^(G-g)``, so its gradient is
          ``beta^(G-h) (grad of prefix h's loss + O(1/beta))``: each level learns from its own prefix,
          like ``matryoshka_loss(..., detach=True)``, but scaled by ``beta^(G-h)``, and ``x``,
          ``b_dec`` and the loss value are dominated by the innermost prefix.  It is not the detached
          loss: there, every level's reconstruction keeps its own weight and latents of level ``h``
          see no gradient from outer prefixes at all, whatever the weights.
        """
        beta = float(beta)
        if not (beta >= 0 and np.isfinite(beta)):
            raise ValueError(f"Prefixes.balanced: `beta` must be finite and >= 0, got {beta}")
        count = len(widths)
        return cls(widths, [beta ** (count - 1 - g) for g in range(count)])

    @classmethod
    def every(
        cls,
        n: int,
        weights: Sequence[float] | torch.Tensor | None = None,
        include_empty: bool = False,
    ) -> Prefixes:
        """Every prefix length ``1..n`` (``0..n`` with ``include_empty=True``)."""
        _check_count("Prefixes.every", "n", n)
        start = 0 if include_empty else 1
        return cls(torch.arange(start, int(n) + 1, device="cpu"), weights)

    @classmethod
    def sample(cls, n: int, num: int, generator: torch.Generator | None = None) -> Prefixes:
        """The original Matryoshka recipe's random prefix set (Nabeshima, 2024).

        Draws ``num - 1`` distinct lengths from ``1..n-1`` without replacement with
        ``P(l) ∝ sqrt(l/n) - sqrt((l-1)/n)`` (short prefixes are likelier), adds ``n``, and gives
        every length weight ``1/num``.
        """
        _check_count("Prefixes.sample", "n", n)
        _check_count("Prefixes.sample", "num", num)
        n, num = int(n), int(num)
        if num > n:
            raise ValueError(f"Prefixes.sample: `num` must be in [1, n={n}], got {num}")
        drawn = torch.empty(0, dtype=torch.int64, device="cpu")
        if num > 1:
            probs = cls.sampling_probabilities(n)[:-1]  # lengths 1..n-1; n is always included
            drawn = torch.multinomial(probs, num - 1, replacement=False, generator=generator) + 1
        lengths = torch.cat([drawn.sort().values, torch.tensor([n], device="cpu")])
        return cls(lengths, torch.full((num,), 1.0 / num, dtype=torch.float64, device="cpu"))

    @staticmethod
    def sampling_probabilities(n: int) -> torch.Tensor:
        """``P(l) = sqrt(l/n) - sqrt((l-1)/n)`` for ``l = 1..n`` (float64, sums to 1)."""
        l = torch.arange(1, n + 1, dtype=torch.float64, device="cpu")
        return torch.sqrt(l / n) - torch.sqrt((l - 1) / n)

    # ----------------------------------------------------------------------------------- helpers
    def __len__(self) -> int:
        return self.lengths.numel()

    def __repr__(self) -> str:
        g = len(self)
        if g <= 8:
            return f"Prefixes(lengths={self.lengths.tolist()}, weights={self.weights.tolist()})"
        return f"Prefixes(G={g}, lengths=[{int(self.lengths[0])}, ..., {self.max_length}])"

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lengths int64, weights float64, cumulative float64)`` on ``device``, copied once per
        device.  A GPU copy goes through pinned memory without blocking the host, so even a fresh
        prefix set every step (``sample``) costs no host sync."""
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = tuple(to_device(t, device) for t in (self.lengths, self.weights,
                                                                              self._cumulative))
        return self._device_cache[device]

    def check_against(self, n: int) -> None:
        if self.max_length > n:
            raise ValueError(
                f"prefixes: lengths must be <= n = {n} (the number of latents, W_dec.shape[0]), "
                f"got max length {self.max_length}"
            )


