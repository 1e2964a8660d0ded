"""Figures of the studies (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["MODE_COLORS", "mode_colors", "Band", "matched_order", "cosine_heatmaps", "band_panels", "sweep_plot", "ci95",
           "hedging_figure", "pareto_plot", "phase_heatmaps", "outcome_bars", "END_STATE_COLORS", "turn_first_angles",
           "turn_trajectories"]

MODE_COLORS = {"vanilla": "tab:gray", "groups": "tab:green", "sampled": "tab:orange", "every": "tab:blue"}

Band = tuple[Sequence[float], np.ndarray]
"""``(x, values)`` with ``values`` of shape ``(seeds, len(x))``: drawn as mean ± 95% CI over seeds."""


def mode_colors(modes: Sequence[str]) -> dict[str, str]:
    """A distinct colour per mode: the base modes' own (``MODE_COLORS``), others from the tab10 colours
    no base mode uses."""
    spare = iter(c for c in (f"tab:{name}" for name in ("purple", "red", "brown", "pink", "olive", "cyan"))
                 if c not in MODE_COLORS.values())
    return {mode: MODE_COLORS.get(mode) or next(spare, None) for mode in modes}


def ci95(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """95% confidence half-width of the mean along ``axis`` (Student t; NaNs left out; 0 for < 2 values)."""
    import scipy.stats

    values = np.asarray(values, dtype=float)
    count = np.sum(np.isfinite(values), axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.nanstd(values, axis, ddof=1) if values.shape[axis] > 1 else np.zeros(np.delete(values.shape, axis))
        half = scipy.stats.t.ppf(0.975, np.maximum(count - 1, 1)) * std / np.sqrt(np.maximum(count, 1))
    return np.where(count >= 2, np.nan_to_num(half), 0.0)


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
    """Side-by-side panels ``(ylabel, {label: Band})``: a mean line and a 95% CI band per label
    (modes get their fixed colours, other labels the default cycle)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for label, (x, values) in curves.items():
            values = np.asarray(values, dtype=float)
            mean, std = np.nanmean(values, 0), ci95(values, 0)
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


def sweep_plot(ratios: Sequence[float], panels: Sequence[tuple[str, dict[str, np.ndarray]]], path: Path,
               xlabel: str = "child magnitude / parent magnitude", columns: int | None = None,
               title: str | None = None, linear: bool = False,
               marks: Sequence[tuple[float, str]] = ()) -> None:
    """Metrics against a swept setting ``ratios`` (log axis, symmetric-log when it holds 0; ``linear``:
    a linear one): ``(ylabel, {mode: (seeds, len(ratios))})`` per panel, ``columns`` panels per row
    (default: all).  ``marks``: ``(x, label)`` dotted vertical lines on every panel (e.g. where a
    closed form says something changes)."""
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    modes = list(dict.fromkeys(mode for _, per_mode in panels for mode in per_mode))
    colors = mode_colors(modes)
    for ax, (ylabel, per_mode) in zip(axes.flat, panels):
        for mode, values in per_mode.items():
            values = np.asarray(values, dtype=float)
            ax.errorbar(ratios, np.nanmean(values, 0), yerr=ci95(values, 0), marker="o", capsize=3,
                        label=mode, color=colors[mode])
        for (x, label), style in zip(marks, (":", "--", "-.", (0, (1, 3)))):
            ax.axvline(x, color="grey", linestyle=style, linewidth=1, label=label)
        if not linear and min(ratios) > 0:
            ax.set_xscale("log")
        elif not linear:  # 0 (e.g. no penalty) on a log-like axis
            ax.set_xscale("symlog", linthresh=min(r for r in ratios if r > 0))
        ax.set_xticks(list(ratios), [f"{r:g}" for r in ratios])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def hedging_figure(summary: dict, scalars: dict, grid: np.ndarray, curve: np.ndarray, path: Path, title: str,
                   beta_of) -> None:
    """Absorption and mixing against β (symlog axis; ``every`` sits at its equivalent β = 9): the
    unnormalised and ``-norm`` forms, the reference modes as labelled points, and the hedging
    prediction of the parent->child cosine (curve: at the β runs' final latent positions)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    ax_abs, ax_mix = axes[0]
    series = {"every-b<β>": [], "every-b<β>-norm": []}
    for mode in summary:
        beta = beta_of(mode)
        if beta is not None and mode.startswith("every-b"):
            series["every-b<β>-norm" if mode.endswith("-norm") else "every-b<β>"].append((beta, mode))
    styles = {"every-b<β>": ("o", "-"), "every-b<β>-norm": ("s", "--")}
    for label, points in series.items():
        if not points:
            continue
        points.sort()
        x = [b for b, _ in points]
        marker, line = styles[label]
        for ax, key, color, name in ((ax_abs, "absorption", "tab:red", "absorption"),
                                     (ax_mix, "parent_child", "tab:blue", "parent->child cos"),
                                     (ax_mix, "child_sibling", "tab:purple", "child->sibling cos"),
                                     (ax_mix, "child_parent", "tab:brown", "child->parent cos")):
            mean = [summary[m][key]["mean"] for _, m in points]
            half = [np.nan_to_num(summary[m][key]["ci95"]) for _, m in points]
            ax.errorbar(x, mean, yerr=half, marker=marker, ls=line, capsize=3, color=color,
                        label=f"{name}, {label}", alpha=0.9 if line == "-" else 0.6)
    ax_mix.plot(grid, curve, color="black", lw=1.2, label="hedging prediction (parent->child)")
    reference_x = {"every": 9.0, "every-pp": 9.0, "every-uniform": 19.0, "every-uniform-pp": 19.0, "detached": 40.0}
    for mode, x in reference_x.items():
        if mode not in summary:
            continue
        pp = mode.endswith("-pp")  # prefix-weighted penalty: a hollow marker, nudged right of its objective's β
        x = x * 1.12 if pp else x
        for ax, key, color in ((ax_abs, "absorption", "tab:red"), (ax_mix, "parent_child", "tab:blue"),
                               (ax_mix, "child_sibling", "tab:purple")):
            ax.errorbar([x], [summary[mode][key]["mean"]], yerr=[np.nan_to_num(summary[mode][key]["ci95"])],
                        marker="P" if pp else "*", ms=8 if pp else 10, color=color, capsize=3,
                        mfc="none" if pp else color)
            if ax is ax_mix:  # -pp points sit just right of their objective's: label them "pp", below
                ax.annotate("pp" if pp else mode, (x, summary[mode][key]["mean"]), fontsize=7,
                            xytext=(3, -9) if pp else (3, 3), textcoords="offset points")
        if "pred_parent_child" in summary[mode]:
            ax_mix.plot([x], [summary[mode]["pred_parent_child"]["mean"]], marker="x", color="black")
    for ax, ylabel in ((ax_abs, "absorption rate"), (ax_mix, "cosine (matched latent, other member)")):
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlim(-0.01, 60)
        ticks = [0, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 9, 19, 40]
        ax.set_xticks(ticks, ["0", ".05", ".1", ".2", ".3", ".5", "1", "9\nevery", "19\nuniform", "detached"],
                      fontsize=7)
        ax.set_xlabel("β (total weight of the inner prefixes; the full prefix has 1)", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
    ax_mix.axhspan(-0.05, 0.05, color="green", alpha=0.08)
    ax_abs.legend(fontsize=7)
    ax_mix.legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def pareto_plot(summary: dict, path: Path, title: str) -> None:
    """Mean absorption against mean mixing (mean |cos| of a parent's latent with its children) per mode,
    with 95% CIs."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for mode, s in summary.items():
        x, y = s["absorption"], s["parent_child_abs"]
        ax.errorbar([y["mean"]], [x["mean"]], xerr=[np.nan_to_num(y["ci95"])], yerr=[np.nan_to_num(x["ci95"])],
                    marker="o", capsize=2, color=MODE_COLORS.get(mode, "tab:blue" if mode.startswith("every-b") else
                                                                  "tab:gray"))
        ax.annotate(mode, (y["mean"], x["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mixing: mean |cos(parent latent, child direction)| over the 9 pairs")
    ax.set_ylabel("absorption rate (mean over pairs)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)


def phase_heatmaps(panels: Sequence[tuple[str, np.ndarray]], ratios: Sequence[float], probs: Sequence[float],
                   path: Path, title: str, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> None:
    """One heatmap per ``(title, (len(probs), len(ratios)) values)``, each cell annotated."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.0), squeeze=False)
    image = None
    for ax, (name, values) in zip(axes[0], panels):
        values = np.asarray(values, dtype=float)
        image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios], fontsize=7)
        ax.set_yticks(range(len(probs)), [f"{p:g}" for p in probs], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("child / parent magnitude", fontsize=7)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if values[i, j] < (vmin + vmax) / 2 else "black")
    axes[0][0].set_ylabel("P(child | parent)", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def outcome_bars(panels: Sequence[tuple[str, Sequence[str], dict[str, Sequence[int]]]], path: Path,
                 title: str | None = None, ylabel: str = "seeds") -> None:
    """Stacked bars, one panel per ``(title, bar labels, {outcome: count per bar})``: how many seeds
    (or what ``ylabel`` counts) ended in each outcome (the first outcome green, the others in warm
    colours, bottom to top)."""
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, layout="constrained",
                             figsize=(max(6.0, 0.4 * max(len(labels) for _, labels, _ in panels)), 4.6 * len(panels)))
    colors = ["tab:green", "tab:red", "tab:gray", "tab:orange", "tab:purple"]
    for ax, (panel_title, labels, counts) in zip(axes[:, 0], panels):
        bottom = np.zeros(len(labels))
        for color, (name, values) in zip(colors, counts.items()):
            ax.bar(range(len(labels)), values, bottom=bottom, color=color, label=name)
            bottom += np.asarray(values, dtype=float)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, ncol=len(panels[0][2]), loc="outside lower center")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


END_STATE_COLORS = {"true": "tab:green", "turned": "tab:red", "other": "tab:gray"}


def turn_first_angles(rows: Sequence[dict], qs: Sequence[float], leading_angle, path: Path, title: str) -> None:
    """Each family's first latent's axis angle (``row["axis"]``) against its q, jittered, coloured by
    its end state (``row["end"]``), beside the leading direction ``leading_angle(q)`` and the pairs'
    axes (true 0° and 90°, turned 45°)."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    jitter = np.random.default_rng(0)
    spacing = min(np.diff(sorted(qs)), default=0.1)
    for state, color in END_STATE_COLORS.items():
        picked = [r for r in rows if r["end"] == state and r["axis"] is not None]
        if picked:
            x = np.asarray([r["q"] for r in picked]) + jitter.uniform(-0.2, 0.2, len(picked)) * spacing
            ax.scatter(x, [r["axis"] for r in picked], s=14, color=color, alpha=0.7, label=f"ends {state}")
    grid = np.linspace(min(qs) * 0.9, max(qs) * 1.05, 200)
    ax.plot(grid, [leading_angle(q) for q in grid], color="black", label="θ*(q): leading direction")
    for angle, style in ((0, ":"), (45, "--"), (90, ":")):
        ax.axhline(angle, color="black", linestyle=style, linewidth=0.8, alpha=0.6)
    ax.axhline(22.5, color="tab:purple", linewidth=0.8, alpha=0.5, label="22.5°: half-way to the turned axis")
    ax.set_xlabel("q = P(most frequent child | parent)")
    ax.set_ylabel("first latent's axis from the parent (°)")
    ax.set_ylim(-3, 93)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)


def turn_trajectories(panels: Sequence[tuple[str, Sequence[tuple[Sequence[int], Sequence[float], str]]]],
                      path: Path, title: str) -> None:
    """One panel per ``(title, [(steps, axis angles, end state), ...])``: each family's first latent's
    axis angle over training, coloured by the family's end state."""
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.2 * len(panels), 4.0), layout="constrained",
                             sharey=True)
    for ax, (panel_title, curves) in zip(axes[0], panels):
        for steps, angles, state in curves:
            ax.plot(steps, angles, color=END_STATE_COLORS[state], linewidth=0.8, alpha=0.6)
        for angle, style in ((0, ":"), (45, "--"), (90, ":")):
            ax.axhline(angle, color="black", linestyle=style, linewidth=0.8, alpha=0.6)
        ax.set_xlabel("training step")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("axis from the parent (°)")
    handles = [plt.Line2D([], [], color=c, label=f"ends {s}") for s, c in END_STATE_COLORS.items()]
    fig.legend(handles=handles, fontsize=8, ncol=3, loc="outside lower center")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
