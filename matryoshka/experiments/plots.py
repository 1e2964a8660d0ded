"""Figures of the studies (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["MODE_COLORS", "Band", "matched_order", "cosine_heatmaps", "band_panels", "sweep_plot"]

MODE_COLORS = {"vanilla": "tab:gray", "groups": "tab:green", "sampled": "tab:orange", "every": "tab:blue"}

Band = tuple[Sequence[float], np.ndarray]
"""``(x, values)`` with ``values`` of shape ``(seeds, len(x))``: drawn as mean ± std over seeds."""


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def matched_order(latent_for_feature: Sequence[int], n: int) -> list[int]:
    """Latents in feature order (the matched latent of feature 0, 1, ...), then unmatched ones."""
    matched = [l for l in latent_for_feature if l >= 0]
    return matched + [l for l in range(n) if l not in matched]


def cosine_heatmaps(panels: Sequence[tuple[str, np.ndarray, Sequence[int]]], feature_names: Sequence[str],
                    path: Path) -> None:
    """One heatmap per ``(title, cos (n, F), matched latent per feature)``: signed decoder-truth
    cosines, latents (rows, labelled with their index = position in the Matryoshka order) matched
    and ordered as the features (columns), so a clean dictionary is a red diagonal."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    image = None
    for ax, (title, cos, latent) in zip(axes[0], panels):
        cos = np.asarray(cos)
        order = matched_order(latent, cos.shape[0])
        image = ax.imshow(cos[order], cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(feature_names)), feature_names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), [str(l) for l in order], fontsize=6)
        ax.set_xlabel("true feature")
    axes[0][0].set_ylabel("latent (index = position in the latent order)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cos(decoder row, true direction)")
    _save(fig, path)


def band_panels(panels: Sequence[tuple[str, dict[str, Band]]], path: Path, xlabel: str = "training step",
                title: str | None = None, logx: bool = False) -> None:
    """Side-by-side panels ``(ylabel, {label: Band})``: a mean line and a ±std band per label
    (modes get their fixed colours, other labels the default cycle)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for label, (x, values) in curves.items():
            values = np.asarray(values, dtype=float)
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            (line,) = ax.plot(x, mean, label=label, color=MODE_COLORS.get(label))
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def sweep_plot(ratios: Sequence[float], panels: Sequence[tuple[str, dict[str, np.ndarray]]], path: Path) -> None:
    """Metrics against the child/parent magnitude ratio: ``(ylabel, {mode: (seeds, ratios)})``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, per_mode) in zip(axes[0], panels):
        for mode, values in per_mode.items():
            values = np.asarray(values, dtype=float)
            ax.errorbar(ratios, np.nanmean(values, 0), yerr=np.nanstd(values, 0), marker="o", capsize=3,
                        label=mode, color=MODE_COLORS.get(mode))
        ax.set_xscale("log")
        ax.set_xticks(list(ratios), [f"{r:g}" for r in ratios])
        ax.set_xlabel("child magnitude / parent magnitude")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
