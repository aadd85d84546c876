"""`olmo-iv stats RUN_DIR`: superadditivity tests on a patching run (olmo_iv.analysis.superadditivity)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from olmo_iv.cli.app import app, console
from rich.markup import escape
from rich.table import Table

# scipy.stats (0.6 s to import) loads only when this command runs, not with every command
METRICS = ("logit_diff", "rr_diff")


def _f(x: float, fmt: str = ".2f") -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def _sound_table(rows: list, cfg) -> Table:
    r0 = rows[0]
    pct = round(cfg.confidence * 100)
    t = Table(title=f"Superadditivity ({cfg.metric}): {r0.model} / {r0.task} / {r0.mode} / target_pos={r0.target_pos}",
              caption=f"top {min(cfg.top, len(rows))} of {len(rows)} tested sets by mean margin; q: {cfg.fdr.upper()} over all "
                      f"{len(rows)}; * q_W <= {cfg.alpha}")
    for name in ("layers", f"mean [{pct}% CI]", f"median [{pct}% CI]", f"r_rb [{pct}% CI]", "k+/k-/k0", "p_W",
                 "q_W", "p_sign", "q_sign"):
        t.add_column(name, justify="left" if name == "layers" else "right")
    for r in rows[: cfg.top]:
        t.add_row(r.layers + (" *" if r.significant else ""), f"{_f(r.mean)} [{_f(r.mean_lo)}, {_f(r.mean_hi)}]",
                  f"{_f(r.median)} [{_f(r.median_lo)}, {_f(r.median_hi)}]",
                  f"{_f(r.rank_biserial)} [{_f(r.rb_lo)}, {_f(r.rb_hi)}]", f"{r.n_pos}/{r.n_neg}/{r.n_zero}",
                  _f(r.p_wilcoxon, ".1e"), _f(r.q_wilcoxon, ".1e"), _f(r.p_sign, ".1e"), _f(r.q_sign, ".1e"))
    return t


def _reference_table(rows: list) -> Table:
    r0 = rows[0]
    t = Table(title=f"The authors' test (reproduced, not evidence): {r0.model} / {r0.task} / target_pos={r0.target_pos}",
              caption=f"top {len(rows)} by mean {r0.select_metric}, tested on {r0.test_metric}; "
                      "ttest_1samp(0/1, popmean=50): t encodes only k")
    for name in ("tuple", f"mean {r0.select_metric}", "k/n", "t", "p"):
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(f"({r.i}, {r.j})", f"{r.selected_mean:.2f}", f"{r.k}/{r.n}", f"{r.t:.1f}", f"{r.p:.3e}")
    return t


@app.command("stats")
def stats_command(
    run_dir: Path = typer.Argument(..., help="Run folder written by `olmo-iv patch` (patching.csv, summary.json)."),
    metric: str = typer.Option("logit_diff", help=f"Score for margins, ranking and tests: {' or '.join(METRICS)}."),
    task: list[str] = typer.Option(None, "--task", help="Only this task (repeatable); default every task in the run."),
    target_pos: str = typer.Option(None, "--target-pos", help="Only this patched position (0, -1, filler); default all."),
    alpha: float = typer.Option(0.05, help="False discovery rate."),
    fdr: str = typer.Option("bh", help="bh (Benjamini-Hochberg) or by (Benjamini-Yekutieli, any dependence)."),
    confidence: float = typer.Option(0.95, help="Confidence level of the intervals."),
    top: int = typer.Option(10, help="Rows shown and written to LaTeX per group (the CSV has all)."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for the rank-biserial interval (0: none)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    reference_select: str = typer.Option("rr_diff", help="Metric that picks the authors' top tuples (their "
                                         "contrastive tables: rr_diff; their BigBench tables: logit_diff)."),
) -> None:
    """Test layer pairs for superadditivity: a sound test (Wilcoxon + sign test, BH, effect sizes) beside the
    authors' t-test reproduced as is. Writes stats_sound_<metric>.{csv,tex,json}, stats_reference.{csv,tex}."""
    from olmo_iv.analysis.superadditivity import StatsConfig
    from olmo_iv.runs.stats import run_stats

    cfg = StatsConfig(metric=metric, alpha=alpha, fdr=fdr, confidence=confidence, n_boot=n_boot, seed=seed, top=top)
    result = run_stats(run_dir, cfg, tasks=task or None, target_pos=target_pos, reference_select=reference_select)
    con = console()
    groups: dict[tuple, list] = {}
    for r in result.sound:
        groups.setdefault((r.model, r.task, r.mode, r.target_pos), []).append(r)
    refs: dict[tuple, list] = {}
    for r in result.reference:
        refs.setdefault((r.model, r.task, r.mode, r.target_pos), []).append(r)
    for key, rows in groups.items():
        con.print(_sound_table(rows, cfg))
        con.print(_reference_table(refs[key]))
    con.print("files: " + escape(", ".join(str(p) for p in result.files)))
