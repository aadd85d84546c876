"""Every figure olmo-iv draws, on matplotlib's object API: no pyplot state, no backend switch.

Each function takes the data an analysis returned and gives back a `matplotlib.figure.Figure`; `save_figure`
writes it as PNG (200 dpi) and PDF, each atomically. Run folders get their figures through the run store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.patches
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
        # the layout was solved for the first file; the second keeps it instead of solving it again
        fig.set_layout_engine("none")
    return written


# ------------------------------------------------------------------------------------------------ patching


def display_task(task: str) -> str:
    """The one name a task has on every figure: its subtask ('adjectives/adj_comp' -> 'adj_comp')."""
    return task.rsplit("/", 1)[-1]


def display_model(model: str) -> str:
    return Path(str(model).rstrip("/")).name or str(model)


def pair_heatmaps(panels: dict[tuple[str, str], np.ndarray], *, title: str, label: str, shared_scale: bool = False,
                  values: bool = False) -> Figure:
    """L x L heatmaps, one panel per (model, task) (paper Figures 2, 6-11).

    Cell [i][j] (i < j) is the mean over samples for the pair (i, j); the diagonal (outlined) holds the single
    layers. Cells that were not computed are grey and hatched, so they never look like a zero. Each panel has its
    own colour scale, centred on zero (shared_scale=True: one scale for all, and the figure says so). values=True
    writes each cell's mean in it (off by default: it costs as much time as the rest of the figure).
    """
    models = list(dict.fromkeys(m for m, _ in panels))
    tasks = list(dict.fromkeys(t for _, t in panels))
    finite = [np.abs(v[np.isfinite(v)]).max() for v in panels.values() if np.isfinite(v).any()]
    shared = (max(finite, default=1.0) or 1.0) if shared_scale else None
    cmap = matplotlib.colormaps["RdBu_r"]
    fig = Figure(figsize=(3.6 * len(tasks) + 0.6, 3.4 * len(models) + 0.7), layout="constrained")
    axes = fig.subplots(len(models), len(tasks), squeeze=False)
    image = None
    for r, model in enumerate(models):
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            grid = panels.get((model, task))
            if grid is None:
                ax.axis("off")
                continue
            n = grid.shape[0]
            vmax = shared or (float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0) or 1.0
            ax.set_facecolor("#e0e0e0")
            ax.add_patch(matplotlib.patches.Rectangle((-0.5, -0.5), n, n, hatch="////", fill=False, lw=0,
                                                      edgecolor="#b0b0b0", zorder=0))
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-vmax, vmax=vmax, origin="upper", zorder=1)
            for k in range(n):
                if np.isfinite(grid[k, k]):
                    ax.add_patch(matplotlib.patches.Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, lw=0.8,
                                                              edgecolor="black", zorder=2))
            if values:
                for (i, j), v in np.ndenumerate(grid):
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=5.5, zorder=3,
                                color="white" if abs(v) > 0.6 * vmax else "black")
            step = max(1, math.ceil(n / 8))
            ax.set_xticks(range(0, n, step))
            ax.set_yticks(range(0, n, step))
            ax.set_title(f"{display_model(model)} · {display_task(task)}", fontsize=9)
            ax.set_ylabel("layer i", fontsize=8)
            ax.set_xlabel("layer j", fontsize=8)
            if not shared:
                fig.colorbar(image, ax=ax, shrink=0.75).ax.tick_params(labelsize=7)
    if shared and image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"{label} (one scale for all panels)")
    fig.suptitle(f"{title}\n{label}; outlined diagonal = single layers; grey hatched = not computed", fontsize=9)
    return fig


def layer_profile(means: dict[tuple[str, str], dict[int, float]], *, title: str, label: str) -> Figure:
    """Single-layer patching (--layers 1): the mean per layer, one line per (model, task)."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for (model, task), by_layer in means.items():
        layers = sorted(by_layer)
        ax.plot(layers, [by_layer[k] for k in layers], marker="o", ms=3, label=f"{display_model(model)} · {display_task(task)}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="patched layer", ylabel=label, title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return fig


def top_sets(best: dict[tuple[str, str], list[tuple[str, float]]], *, title: str, label: str) -> Figure:
    """Triples or explicit sets (no square picture): the best layer sets per (model, task) as horizontal bars."""
    keys = list(best)
    fig = Figure(figsize=(3.6 * len(keys) + 0.6, 0.28 * max(len(v) for v in best.values()) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        rows = best[key][::-1]
        ax.barh(range(len(rows)), [v for _, v in rows], color=["#b2182b" if v > 0 else "#2166ac" for _, v in rows])
        ax.set_yticks(range(len(rows)), [k for k, _ in rows], fontsize=7)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_title(f"{display_model(key[0])} · {display_task(key[1])}", fontsize=9)
        ax.set_xlabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
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
                           label=display_task(t) if not test else None)
        evr = res.explained_variance_ratio
        ax.set(title=f"{name}, layer {layer} (LDA test acc {res.test_accuracy:.2f})",
               xlabel=f"LD1 ({evr[0]:.0%})", ylabel=f"LD2 ({evr[1]:.0%})")
    axes[0][-1].legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1, 0.5),
                       title="o train, x test", title_fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------- path tracing

MAX_WIDTH = 12.0
"""Inches: a long prompt thins its tick labels instead of widening the figure."""


def kept_per_token(mean_kept: np.ndarray, labels: Sequence[str], *, title: str, highlight: Sequence[int] = (),
                   n_samples: int | None = None) -> Figure:
    """Figure 4: mean kept paths per source position (symmetric-log axis, so that zero bars stay at zero and
    stay visible as such). `labels[t]` is the token shared by every sample at t, or '' where samples differ."""
    n = len(mean_kept)
    fig = Figure(figsize=(min(MAX_WIDTH, max(6.0, 0.32 * n + 2)), 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(n), mean_kept, color="#7b3294")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    step = max(1, math.ceil(n / 48))
    ticks = sorted(set(range(0, n, step)) | {i for i in highlight if 0 <= i < n})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{i} {labels[i]!r}" if i < len(labels) and labels[i] else str(i) for i in ticks],
                       rotation=90, fontsize=7)
    for label in ax.get_xticklabels():
        if int(label.get_text().split()[0]) in set(highlight):
            label.set_color("tab:blue")
            label.set_fontweight("bold")
    if highlight:
        ax.plot([], [], ls="", marker="s", color="tab:blue", label="T_inst (last instruction token)")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("source token position (token shown where every sample has the same one)")
    ax.set_ylabel("mean kept paths per sample" + (f" (n={n_samples})" if n_samples else ""))
    ax.set_title(title, fontsize=9)
    return fig


def head_activity(activity: np.ndarray, *, title: str, n_samples: int | None = None) -> Figure:
    """Figure 5: [L, H] heatmap, per head, of the fraction of kept paths whose layer-l edge uses that head,
    averaged over the samples (0..1)."""
    L, H = activity.shape
    fig = Figure(figsize=(min(MAX_WIDTH, max(6.0, 0.28 * H + 2.5)), 0.24 * L + 1.9), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(activity, cmap="RdPu", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, H // 16)))
    ax.set_yticks(range(0, L, max(1, L // 16)))
    fig.colorbar(im, ax=ax, label="fraction of kept paths\nthrough the head")
    ax.set_title(title + (f"\nmean over {n_samples} samples" if n_samples else ""), fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------- task inference


def inference_scores(summary: Sequence[dict], *, title: str = "", confidence: float = 0.95) -> Figure:
    """Figure 12: EM and IA per task (x) in two panels, one bar per model, with Wilson intervals and n."""
    from scipy.stats import binomtest

    models = list(dict.fromkeys(r["model"] for r in summary))
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    by = {(r["model"], r["task"]): r for r in summary}
    x = np.arange(len(tasks))
    width = 0.8 / max(len(models), 1)
    fig = Figure(figsize=(max(5.0, 1.6 * len(tasks) + 2.5), 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, label in zip(axes, ("em", "ia"), ("exact-match accuracy (%)", "instructional accuracy (%)"),
                              strict=True):
        for i, m in enumerate(models):
            vals, lo, hi = [], [], []
            for t in tasks:
                row = by.get((m, t), {})
                v, n = row.get(key), row.get("n")
                if v is None or not n:
                    vals.append(np.nan)
                    lo.append(0.0)
                    hi.append(0.0)
                    continue
                ci = binomtest(round(float(v) * n / 100), n).proportion_ci(confidence, method="wilson")
                vals.append(float(v))
                lo.append(float(v) - 100 * ci.low)
                hi.append(100 * ci.high - float(v))
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, vals, width, yerr=[lo, hi], capsize=2, error_kw={"lw": 0.8},
                          label=display_model(m))
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in vals], fontsize=7,
                         padding=2)
        ax.set_ylim(0, 112)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    n_of = {t: sorted({by[(m, t)]["n"] for m in models if (m, t) in by}) for t in tasks}
    axes[1].set_xticks(x, [f"{display_task(t)}\nn={'/'.join(map(str, n_of[t]))}" for t in tasks])
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    head = f"{title}; " if title else ""
    axes[0].set_title(f"{head}bars: {round(100 * confidence)}% Wilson intervals; empty: not measured", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------------- IFEval

STRICT_COLOR, LOOSE_COLOR = "#1f5f99", "#8fbce6"


def ifeval_accuracy(summary: dict) -> Figure:
    """Strict and loose accuracy side by side: overall and per category (left), per instruction id (right), each
    bar labelled with its n."""
    strict, loose = summary["strict"], summary["loose"]
    left = [(f"prompt level (n={strict['prompt_level']['n']})", "prompt_level", None),
            (f"instruction level (n={strict['instruction_level']['n']})", "instruction_level", None)]
    left += [(f"{c} (n={v['n']})", "by_category", c) for c, v in strict["by_category"].items()]
    right = [(f"{i.split(':')[1]} (n={v['n']})", "by_instruction", i) for i, v in strict["by_instruction"].items()]
    # where a new category starts in the per-instruction panel (ids are sorted, so categories are contiguous)
    categories = [i.split(":")[0] for i in strict["by_instruction"]]
    starts = [k for k in range(len(categories)) if k == 0 or categories[k] != categories[k - 1]]

    def value(mode: dict, kind: str, name: str | None) -> float:
        entry = mode[kind] if name is None else mode[kind][name]
        return 100 * (entry["accuracy"] or 0.0)

    fig = Figure(figsize=(12, 0.28 * max(len(right), len(left)) + 1.6))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15], "wspace": 0.75})
    for ax, items, title in ((axes[0], left, "overall and per category"), (axes[1], right, "per instruction")):
        ys = range(len(items))
        height = 0.38
        s = [value(strict, k, n) for _, k, n in items]
        lo = [value(loose, k, n) for _, k, n in items]
        ax.barh([y - height / 2 for y in ys], s, height, color=STRICT_COLOR, label="strict")
        ax.barh([y + height / 2 for y in ys], lo, height, color=LOOSE_COLOR, label="loose")
        for y, a, b in zip(ys, s, lo):
            ax.text(a + 1, y - height / 2, f"{a:.0f}", va="center", fontsize=6)
            ax.text(b + 1, y + height / 2, f"{b:.0f}", va="center", fontsize=6)
        ax.set_yticks(list(ys), [label for label, _, _ in items], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 108)
        ax.set_xlabel("accuracy (%)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for start, end in zip(starts, starts[1:] + [len(categories)]):  # a rule between categories, names outside
        if start:
            axes[1].axhline(start - 0.5, color="0.6", linewidth=0.6)
        axes[1].text(110, (start + end - 1) / 2, categories[start], fontsize=7, color="0.3", ha="left",
                     va="center", style="italic", clip_on=False)
    axes[0].legend(fontsize=7, loc="lower right", frameon=False)
    name = Path(str(summary.get("settings", {}).get("responses", "responses"))).name
    fig.suptitle(f"IFEval: {name} ({summary['n_prompts']} prompts, {summary['n_instructions']} instructions)",
                 fontsize=10)
    fig.subplots_adjust(left=0.17, right=0.87, top=0.92, bottom=0.45 / (0.28 * len(right) + 1.6) + 0.03)
    return fig


# --------------------------------------------------------------------------------------------------- steering


def steering_conditions(summary: dict, *, metric: str = "strict", confidence: float = 0.95) -> Figure:
    """Accuracy per instruction under the four conditions (no instruction, + steering, instruction, + steering),
    with Wilson intervals and n."""
    from scipy.stats import binomtest

    ids = list(summary["by_instruction"]) + ["overall"]
    entries = [summary["by_instruction"][i] for i in ids[:-1]] + [summary["overall"]]
    conditions = list(entries[0])
    colors = ["#bdbdbd", "#4393c3", "#636363", "#d6604d"]
    fig = Figure(figsize=(max(6.0, 0.9 * len(ids) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(conditions)
    for k, (cond, color) in enumerate(zip(conditions, colors, strict=False)):
        vals, lo, hi = [], [], []
        for e in entries:
            n, v = e[cond]["n"], e[cond][metric]
            ci = binomtest(round(v * n), n).proportion_ci(confidence, method="wilson") if n else None
            vals.append(100 * v)
            lo.append(100 * (v - ci.low) if ci else 0)
            hi.append(100 * (ci.high - v) if ci else 0)
        ax.bar(np.arange(len(ids)) - 0.4 + width * (k + 0.5), vals, width, yerr=[lo, hi], capsize=1.5,
               error_kw={"lw": 0.6}, color=color, label=cond.replace("_", " ").replace("+", " + "))
    n_of = [entries[j][conditions[0]]["n"] for j in range(len(ids))]
    ax.set_xticks(range(len(ids)), [f"{i.split(':')[-1]}\nn={n}" for i, n in zip(ids, n_of, strict=True)],
                  fontsize=7, rotation=45, ha="right")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"Format steering: IFEval {metric} accuracy, {round(100 * confidence)}% Wilson intervals", fontsize=9)
    return fig


def composition(summary: dict, *, confidence: float = 0.95) -> Figure:
    """The composition experiment, all rows pooled: per condition, format (IFEval loose), length (at most N
    sentences) and both accuracy, with Wilson intervals and n; beside it, the mean words and sentences."""
    from scipy.stats import binomtest

    conds = list(summary["overall"])
    entries = [summary["overall"][c] for c in conds]
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 1])
    metrics = [("format_loose", "format (loose)", "#4393c3"), ("length", "length", "#d6604d"),
               ("both", "both", "#636363")]
    width = 0.8 / len(metrics)
    for k, (key, label, color) in enumerate(metrics):
        vals, lo, hi = [], [], []
        for e in entries:
            n, v = e["n"], e[key]
            ci = binomtest(round(v * n), n).proportion_ci(confidence, method="wilson") if n else None
            vals.append(100 * v)
            lo.append(100 * (v - ci.low) if ci else 0)
            hi.append(100 * (ci.high - v) if ci else 0)
        ax.bar(np.arange(len(conds)) - 0.4 + width * (k + 0.5), vals, width, yerr=[lo, hi], capsize=1.5,
               error_kw={"lw": 0.6}, color=color, label=label)
    labels = [c.replace("no_instruction", "no instr.").replace("instruction", "instr.").replace("+", "\n+ ")
              for c in conds]
    ax.set_xticks(range(len(conds)), labels, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    words = [e["mean_words"] for e in entries]
    ax2.barh(range(len(conds)), words, color="#bdbdbd")
    for i, e in enumerate(entries):  # the sentence count beside each bar
        ax2.text(words[i], i, f" {e['mean_sentences']:.2f} sent.", va="center", fontsize=6)
    ax2.set_yticks(range(len(conds)), [c.replace("+", " + ") for c in conds], fontsize=6)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1.35 * max(words + [1.0]))
    ax2.set_xlabel("mean words (sentences)")
    n = entries[0]["n"] if entries else 0
    fig.suptitle(f"Composition of format and length steering (n={n} per condition; "
                 f"{round(100 * confidence)}% Wilson intervals)", fontsize=9)
    return fig


def layer_sweep(rows: list[dict]) -> Figure:
    """The layer search: per instruction, loose accuracy of steering without the instruction by layer (solid:
    after the degeneration filter; dashed: before; "none": no steering), averaged over folds, and, where scored,
    the unsteered model's mean token NLL of the responses (a second degeneration measure)."""
    has_nll = any(r.get("mean_nll") not in (None, "") for r in rows)
    fig = Figure(figsize=(9.6 if has_nll else 6.4, 4), layout="constrained")
    axes = fig.subplots(1, 2 if has_nll else 1, squeeze=False)[0]
    by: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["instruction_id"], {}).setdefault(int(r["layer"]), []).append(r)
    for iid, per_layer in by.items():
        layers = sorted(per_layer)
        acc = [100 * float(np.mean([float(x["loose"]) for x in per_layer[lyr]])) for lyr in layers]
        kept = [100 * float(np.mean([float(x["kept_loose"]) for x in per_layer[lyr]])) for lyr in layers]
        line = axes[0].plot(layers, kept, marker="o", ms=3, label=iid.split(":")[-1])[0]
        axes[0].plot(layers, acc, ls="--", lw=0.8, color=line.get_color())
        if has_nll:
            nll = [np.mean([float(x["mean_nll"]) for x in per_layer[lyr] if x.get("mean_nll") not in (None, "")]
                           or [np.nan]) for lyr in layers]
            axes[1].plot(layers, nll, marker="o", ms=3, color=line.get_color())
    ticks = sorted({int(r["layer"]) for r in rows})
    for ax in axes:
        ax.set_xticks(ticks, ["none" if t == -1 else str(t) for t in ticks])
        ax.set_xlabel("steered layer")
    axes[0].set(ylabel="loose accuracy without instruction (%)", ylim=(0, 105))
    axes[0].set_title("solid: after the degeneration filter; dashed: before", fontsize=8)
    if has_nll:
        axes[1].set(ylabel="mean token NLL under the unsteered model")
        axes[1].set_title("the responses' NLL (low: repetitive)", fontsize=8)
    fig.suptitle("Layer selection: the validation rows steered without their instruction", fontsize=9)
    fig.legend(fontsize=6, loc="outside right upper")  # outside: lines reach every corner
    return fig


def length_levels(summary: dict) -> Figure:
    """Stolfo's length experiment: per 'at most N sentences' prompt, the mean sentence count (left) and the strict
    accuracy (right) with the instruction alone (black, dashed) and with each level vector added."""
    n_max = summary["settings"]["max_sentences"]
    ns = list(range(1, n_max + 1))
    fig = Figure(figsize=(8.4, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    colors = ["#2166ac", "#67a9cf", "#1b9e77", "#ef8a62", "#b2182b"]  # concise blue, moderate green, verbose red
    for cond, entry in summary["by_vector"].items():
        level = entry["level"]
        style = {"color": "black", "ls": "--"} if level is None else {"color": colors[level]}
        label = "instruction only" if level is None else f"+ level {level} ({cond.split('+', 1)[1].replace('_', ' ')})"
        rows = [summary["by_condition"][f"{n}/{cond}"] for n in ns]
        left.plot(ns, [e["mean_sentences"] for e in rows], marker="o", ms=3, label=label, **style)
        right.plot(ns, [100 * e["strict"] for e in rows], marker="o", ms=3, **style)
    left.plot(ns, ns, color="0.7", lw=0.8, zorder=0)  # the limit each prompt sets
    left.set(xlabel="N in 'at most N sentences'", ylabel="mean sentences per response", ylim=(0, None))
    right.set(xlabel="N in 'at most N sentences'", ylabel="strict accuracy (%)", ylim=(0, 105))
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.legend(fontsize=7, loc="outside right upper")
    fig.suptitle(f"Length steering at layer {summary['layer']} (c = {summary['settings']['coef']:g}, "
                 f"n = {summary['by_condition']['1/instruction']['n']} queries)",
                 fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------------- SAIF

SAIF_MAIN = ("none", "prompting", "diffmean", "saif", "saif_output", "clamp", "sdcv", "top1_decay")
"""The main comparison's conditions, in the order the bars are drawn (saif and saif_output: the entries at the
run's k)."""


def _wilson(v: float, n: int, confidence: float) -> tuple[float, float]:
    from scipy.stats import binomtest

    if not n:
        return 0.0, 0.0
    ci = binomtest(round(v * n), n).proportion_ci(confidence, method="wilson")
    return 100 * (v - ci.low), 100 * (ci.high - v)


def _short(t: str) -> str:
    return t.split(":")[-1].replace("_", " ")


def saif_conditions(summary: dict, *, metric: str = "strict", confidence: float = 0.95) -> Figure:
    """Accuracy per instruction type without the instruction under each steering method, next to the prompting
    and no-steering baselines, with Wilson intervals."""
    conds = summary["conditions"]
    k = summary["settings"]["k"]
    names = [f"{c}_k{k}" if c in ("saif", "saif_output") else c for c in SAIF_MAIN]
    names = [c for c in names if c in conds]
    types = [*summary["types"], None]
    colors = ["#bdbdbd", "#636363", "#4393c3", "#d6604d", "#b2182b", "#f4a582", "#92c5de", "#b2abd2"]
    fig = Figure(figsize=(max(6.4, 1.1 * len(types) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.84 / len(names)
    for j, (name, color) in enumerate(zip(names, colors, strict=False)):
        entries = [conds[name]["overall"] if t is None else conds[name]["by_type"][t] for t in types]
        vals = [100 * e[metric] for e in entries]
        err = np.array([_wilson(e[metric], e["n"], confidence) for e in entries]).T
        label = {"none": "no instruction", "prompting": "instruction (prompting)"}.get(name, name.replace("_", " "))
        ax.bar(np.arange(len(types)) - 0.42 + width * (j + 0.5), vals, width, yerr=err, capsize=1.2,
               error_kw={"lw": 0.5}, color=color, label=label)
    n0 = conds[names[0]]
    ax.set_xticks(range(len(types)), [f"{_short(t) if t else 'overall'}\nn={(n0['by_type'][t] if t else n0['overall'])['n']}"
                                      for t in types], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"SAIF steering without the instruction, layer {summary['layer']}, k={k}: {metric} accuracy, "
                 f"{round(100 * confidence)}% Wilson intervals", fontsize=9)
    return fig


def saif_k_sweep(summary: dict) -> Figure:
    """Strict and loose accuracy against the number of latents steered with, overall and per type, with the
    prompting, difference-of-means and no-steering levels as horizontal lines."""
    conds = summary["conditions"]
    ks = sorted(v["k"] for v in conds.values() if v.get("kind") == "k-sweep")
    fig = Figure(figsize=(9.6, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, ("strict", "loose"), strict=True):
        for t in summary["types"]:
            ax.plot(ks, [100 * conds[f"saif_k{k}"]["by_type"][t][metric] for k in ks], lw=0.8, alpha=0.6,
                    marker=".", label=_short(t))
        ax.plot(ks, [100 * conds[f"saif_k{k}"]["overall"][metric] for k in ks], color="black", lw=2, marker="o",
                label="overall")
        for name, style in (("prompting", ":"), ("diffmean", "--"), ("none", "-.")):
            if name in conds:
                ax.axhline(100 * conds[name]["overall"][metric], color="gray", ls=style, lw=1, label=f"{name} (overall)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xticks(ks)
        ax.set_xlabel("latents steered with (k)")
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(-3, 103)
    axes[0].set_ylabel("accuracy without the instruction (%)")
    axes[1].legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"SAIF k-sweep at layer {summary['layer']}", fontsize=9)
    return fig


def saif_layer_sweep(summary: dict, *, metric: str = "strict") -> Figure:
    """Overall accuracy of SAIF steering by layer, editing every position or only the prompt's (a final-layer
    edit acts on the output only through the positions it edits)."""
    conds = summary["conditions"]
    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = fig.subplots()
    for positions, style, label in (("all", "-", "prompt and generated tokens"), ("prompt", "--", "prompt only")):
        rows = sorted((v["layer"], v["overall"][metric]) for v in conds.values()
                      if v.get("kind") == "layer-sweep" and v.get("positions") == positions)
        ax.plot([r[0] for r in rows], [100 * r[1] for r in rows], ls=style, marker="o", label=label)
    for name, s in (("prompting", ":"), ("none", "-.")):
        if name in conds:
            ax.axhline(100 * conds[name]["overall"][metric], color="gray", ls=s, lw=1, label=name)
    ax.set_xticks(summary["layers"])
    ax.set_xlabel("layer (hook_resid_post)")
    ax.set_ylabel(f"{metric} accuracy without the instruction (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"SAIF layer sweep (k={summary['settings']['k']}), all types", fontsize=9)
    return fig


def saif_placement(summary: dict) -> Figure:
    """Instruction placed after the content (post) against before it (pre): as a prompt, and as the positives
    the latents were selected from (then steering without the instruction)."""
    conds = summary["conditions"]
    k = summary["settings"]["k"]
    pairs = [("prompting", "prompting_pre"), (f"saif_k{k}", "saif_scored_pre")]
    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = fig.subplots()
    for j, (post, pre) in enumerate(pairs):
        for m, metric in enumerate(("strict", "loose")):
            for i, (name, color) in enumerate(((post, "#d6604d"), (pre, "#4393c3"))):
                e = conds[name]["overall"]
                x = 2.4 * j + m + (i - 0.5) * 0.4
                ax.bar(x, 100 * e[metric], 0.4, yerr=np.array([_wilson(e[metric], e["n"], 0.95)]).T, capsize=1.5,
                       color=color, alpha=1.0 if metric == "strict" else 0.55,
                       label=("post" if i == 0 else "pre") if j == 0 and m == 0 else None)
    ax.set_xticks([0, 1, 2.4, 3.4], ["prompting\nstrict", "prompting\nloose", "SAIF\nstrict", "SAIF\nloose"],
                  fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, frameon=False, title="instruction placement", title_fontsize=7)
    fig.suptitle("Pre vs post placement, all types (95% Wilson intervals)", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------- the bridge to SAE latents


def bridge_curve(curve: Sequence[dict], baselines: dict[str, dict], *, title: str, confidence: float = 0.95,
                 method: str = "abs") -> Figure:
    """RR of latent-level patching against the number of top latents patched (symlog x: 0 has a place), with its
    bootstrap band, full patching and the unpatched target as horizontal lines; below, the fraction of
    ‖x_src − x_tgt‖² the patched latents explain. `curve`: dicts with column, n_latents, rr_mean, rr_low, rr_high,
    explained (the top-k columns, then 'all' and 'all+error'); `baselines`: 'target' and 'full' with rr_mean,
    rr_low, rr_high."""
    top = [c for c in curve if c["column"] not in ("all", "all+error")]
    every = {c["column"]: c for c in curve if c["column"] in ("all", "all+error")}
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    x = np.array([c["n_latents"] for c in top], dtype=float)
    for name, color, label in (("full", "#b2182b", "full patching"), ("target", "#636363", "unpatched target")):
        b = baselines[name]
        ax.axhline(b["rr_mean"], color=color, lw=1, ls="--", label=label)
        ax.axhspan(b["rr_low"], b["rr_high"], color=color, alpha=0.08, lw=0)
    ax.plot(x, [c["rr_mean"] for c in top], marker="o", ms=3.5, color="#2166ac", label=f"top-k latents ({method})")
    ax.fill_between(x, [c["rr_low"] for c in top], [c["rr_high"] for c in top], color="#2166ac", alpha=0.2, lw=0)
    ax2.plot(x, [c["explained"] for c in top], marker="o", ms=3.5, color="#2166ac")
    if "all" in every:
        d_sae = every["all"]["n_latents"]
        a = every["all"]
        ax.errorbar([d_sae], [a["rr_mean"]], yerr=[[a["rr_mean"] - a["rr_low"]], [a["rr_high"] - a["rr_mean"]]],
                    fmt="s", ms=4, color="#4393c3", capsize=2, label="all latents, no error term")
        ax2.plot([d_sae], [a["explained"]], "s", ms=4, color="#4393c3")
        ticks = [*x.tolist(), d_sae]
        names = [str(int(v)) for v in x] + [f"all\n({d_sae})"]
    else:
        ticks, names = x.tolist(), [str(int(v)) for v in x]
    ax2.axhline(1.0, color="#b2182b", lw=1, ls="--")
    for a_ in (ax, ax2):
        a_.set_xscale("symlog", linthresh=1, linscale=0.5)
        a_.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax2.set_xticks(ticks, names, fontsize=7)
    ax2.set_xlim(min(ticks) - 0.4, max(ticks) * 1.6 + 0.4)  # symlog draws nothing below 0 and cuts the last marker
    ax.set_ylabel(f"mean RR ({round(100 * confidence)}% bootstrap CI)")
    ax2.set_ylabel("explained ‖Δx‖²")
    ax2.set_xlabel("latents patched (top-k by rank)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return fig
