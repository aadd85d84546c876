"""Every figure olmo-iv draws, on matplotlib's object API: no pyplot state, no backend switch.

Each function takes the data an analysis returned and gives back a `matplotlib.figure.Figure`; `save_figure`
writes it as PNG (200 dpi) and PDF, each atomically. Run folders get their figures through the run store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from olmo_iv.io import atomic_write

DPI = 200
FORMATS = ("png", "pdf")


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Write `fig` beside `path` as PNG and PDF (the suffix of `path` is replaced); returns the files."""
    path = Path(path)
    written = []
    for fmt in FORMATS:
        target = path.with_suffix(f".{fmt}")
        atomic_write(target, lambda tmp, fmt=fmt: fig.savefig(tmp, dpi=DPI, format=fmt))
        written.append(target)
    return written


def _short(task: str) -> str:
    return task.rsplit("/", 1)[-1]


# ------------------------------------------------------------------------------------------------ patching


def pair_heatmaps(panels: dict[tuple[str, str], np.ndarray], *, title: str, label: str) -> Figure:
    """A grid of L x L heatmaps, models as rows and tasks as columns (paper Figures 2, 6-11).

    Entry [i][j] is the mean over samples for the pair (i, j), the diagonal the single layers, blank below it.
    One colour scale across every panel, centred on zero so that harmful patches show as well as helpful ones
    (the authors' figures clip negatives to the bottom colour).
    """
    models = list(dict.fromkeys(m for m, _ in panels))
    tasks = list(dict.fromkeys(t for _, t in panels))
    finite = [np.abs(v[np.isfinite(v)]).max() for v in panels.values() if np.isfinite(v).any()]
    vmax = max(finite, default=1.0) or 1.0
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    fig = Figure(figsize=(3.4 * len(tasks) + 1, 3.2 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(tasks), squeeze=False)
    image = None
    for r, model in enumerate(models):
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            grid = panels.get((model, task))
            if grid is None:
                ax.axis("off")
                continue
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-vmax, vmax=vmax, origin="upper")
            n = grid.shape[0]
            step = max(1, math.ceil(n / 8))
            ax.set_xticks(range(0, n, step))
            ax.set_yticks(range(0, n, step))
            ax.set_title(task.split("/")[-1] if len(models) > 1 else task, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{Path(model).name}\nlayer i", fontsize=9)
            if r == len(models) - 1:
                ax.set_xlabel("layer j", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=label)
    fig.suptitle(title, fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ probes and LDA


def probe_accuracy(results: dict[str, list], *, title: str = "Linear probe: task of a rephrased instruction") -> Figure:
    """Held-out accuracy by layer, one line per model, Wilson band, chance level dashed."""
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, rows in results.items():
        x = [r.layer for r in rows]
        line = ax.plot(x, [r.accuracy for r in rows], marker="o", ms=3, label=name)[0]
        ax.fill_between(x, [r.ci_lo for r in rows], [r.ci_hi for r in rows], color=line.get_color(), alpha=0.2)
    chance = next(iter(results.values()))[0].chance
    ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set(xlabel="layer (resid_post at T_inst)", ylabel="held-out accuracy", ylim=(0, 1.02), title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig


def lda_scatter(results: dict[str, object], *, layer: int) -> Figure:
    """LD1 vs LD2 per model (paper Figure 13): training points as dots, held-out points as crosses."""
    fig = Figure(figsize=(4.2 * len(results) + 1.5, 4), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)
    tasks = list(dict.fromkeys(next(iter(results.values())).labels))
    tab10 = matplotlib.colormaps["tab10"]
    colors = {t: tab10(i % 10) for i, t in enumerate(tasks)}
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        for t in tasks:
            for test, marker, size in ((False, "o", 8), (True, "x", 18)):
                sel = (res.labels == t) & (res.is_test == test)
                ax.scatter(res.coords[sel, 0], res.coords[sel, 1], s=size, marker=marker, color=colors[t],
                           alpha=0.9 if test else 0.5, linewidths=0.8 if test else 0,
                           label=_short(t) if not test else None)
        evr = res.explained_variance_ratio
        ax.set(title=f"{name}, layer {layer} (LDA test acc {res.test_accuracy:.2f})",
               xlabel=f"LD1 ({evr[0]:.0%})", ylabel=f"LD2 ({evr[1]:.0%})")
    axes[0][-1].legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1, 0.5),
                       title="o train, x test", title_fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------- path tracing


def kept_per_token(mean_kept: np.ndarray, labels: Sequence[str], *, title: str,
                   highlight: Sequence[int] = ()) -> Figure:
    """Figure 4: bars of mean kept paths per source position, log y-axis, T_inst ticks in blue."""
    n = len(mean_kept)
    fig = Figure(figsize=(max(6.0, 0.32 * n + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(n), mean_kept, color="#7b3294")
    if np.any(mean_kept > 0):
        ax.set_yscale("log")
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{i} {labels[i]!r}" if i < len(labels) else str(i) for i in range(n)], rotation=90,
                       fontsize=7)
    for i in highlight:
        if 0 <= i < n:
            ax.get_xticklabels()[i].set_color("blue")
    ax.set_xlabel("source token position (tokens of the first sample)")
    ax.set_ylabel("mean kept paths per sample")
    ax.set_title(title, fontsize=9)
    return fig


def head_activity(activity: np.ndarray, *, title: str) -> Figure:
    """Figure 5: [L, H] heatmap of the fraction of kept paths whose layer-l edge includes head h (0..1)."""
    L, H = activity.shape
    fig = Figure(figsize=(max(6.0, 0.28 * H + 2.5), 0.24 * L + 1.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(activity, cmap="RdPu", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, H // 16)))
    ax.set_yticks(range(0, L, max(1, L // 16)))
    fig.colorbar(im, ax=ax, label="fraction of kept paths")
    ax.set_title(title, fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------- task inference


def inference_scores(summary: Sequence[dict], *, title: str = "") -> Figure:
    """Figure 12: EM and IA per task (x) in two panels, one bar per model within each task group."""
    models = list(dict.fromkeys(r["model"] for r in summary))
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    by = {(r["model"], r["task"]): r for r in summary}
    x = np.arange(len(tasks))
    width = 0.8 / max(len(models), 1)
    fig = Figure(figsize=(max(5.0, 1.6 * len(tasks) + 2), 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, label in zip(axes, ("em", "ia"), ("exact-match accuracy (%)", "instructional accuracy (%)"),
                              strict=True):
        for i, m in enumerate(models):
            vals = [by.get((m, t), {}).get(key) for t in tasks]
            vals = [np.nan if v is None else float(v) for v in vals]
            bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=Path(m).name or m)
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in vals], fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(x, [_short(t) for t in tasks])
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 100
    if title:
        axes[0].set_title(title, fontsize=10)
    return fig
