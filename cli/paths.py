"""`olmo-iv paths`: locally-linear path tracing over a task's samples (paper Figures 4 and 5; docs/paths.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import DEVICE, MODE_HELP, OVERWRITE, app, bar_callback, console, out_option, progress_bar
from rich.markup import escape
from rich.table import Table


@app.command("paths")
def paths(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name (toy, toy-base), local folder or hub id."),
    task: str = typer.Option("adjectives/adj_comp", "--task", "-t", help="Task name (see `olmo-iv tasks`)."),
    samples: int = typer.Option(100, help="Samples: the first N rows in file order (Figures 4 and 5 use 100)."),
    trace: str = typer.Option("reference", help="Tracing: reference (the authors' code: all-heads OV, identity on every "
                              "edge), masked_heads (only the heads on the edge) or attn_weighted (those heads times a_ij, Eq. 3)."),
    threshold: int = typer.Option(100, help="Keep paths that rank the answer <= this (1 = top)."),
    sources: str = typer.Option("all", help="Source tokens: all, 'A:' (A to the end, the reference's start_pos), 'A:B' or '3,7,8'."),
    mode: str = typer.Option("faithful", help=MODE_HELP),
    head_token: list[int] = typer.Option(None, "--head-token", help="Source position of a Figure-5 heatmap; repeatable. Default: T_inst."),
    chunk: int = typer.Option(4096, help="Path vectors per step (memory ~ layers x chunk x d_model floats)."),
    readout_chunk: int = typer.Option(256, help="Path vectors per unembedding matmul (memory ~ readout_chunk x vocab floats)."),
    max_paths: int = typer.Option(10**9, help="Refuse samples with more paths than this (counted before any work)."),
    out: Path = out_option("runs/paths"),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Trace the paths that carry the answer from each input token to the output through the argmax-attention
    graph, keep those whose logits rank the answer within --threshold, and report kept paths per source token
    (Figure 4) and head activity (Figure 5). Writes per-sample CSV/JSON, aggregate CSVs, summary.json and PNGs."""
    from olmo_iv.analysis.paths import PathConfig
    from olmo_iv.runs.paths import PathRunSettings, run_paths

    con = console()
    settings = PathRunSettings(model=model, task=task, samples=samples, prompt_mode=mode,
                               trace=PathConfig(mode=trace, threshold=threshold, sources=sources, chunk=chunk,
                                                readout_chunk=readout_chunk, max_paths=max_paths),
                               head_tokens=head_token or [], device=device)
    with progress_bar(con, unit="paths") as bar:
        summary = run_paths(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    table = Table(title=f"{model} · {task} · {trace}: mean kept paths (rank <= {threshold}) per source token, "
                        f"{summary['n_samples']} samples")
    for name in ("position", "mean kept", "mean total"):
        table.add_column(name, justify="right")
    for t, (k, n) in enumerate(zip(summary["mean_kept_paths"], summary["mean_total_paths"], strict=True)):
        if n:
            table.add_row(str(t), f"{k:.2f}", f"{n:.4g}")
    con.print(table)
    con.print(f"files: {escape(str(out))}/ ({', '.join(summary['files'])})")
