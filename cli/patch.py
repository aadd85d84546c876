"""`olmo-iv patch`: the paper's activation-patching grid (§5.1), on the shipped toy model by default."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import (
    DEVICE,
    DTYPE,
    MODE_HELP,
    OVERWRITE,
    app,
    bar_callback,
    console,
    out_option,
    progress_bar,
)
from rich.markup import escape
from rich.table import Table


@app.command("patch")
def patch(
    model: list[str] = typer.Option(["toy"], "--model", "-m", help="Built-in name (toy, toy-base), local folder or hub id; repeatable."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Task name (see `olmo-iv tasks`); repeatable. Default: the four contrastive subtasks."),
    samples: int = typer.Option(100, help="Samples per task: the first N rows in file order."),
    sample_seed: int = typer.Option(None, help="Draw a seeded random subset of N rows instead."),
    layers: int = typer.Option(2, help="Layer-set size: 1, 2 (pairs + diagonal, the paper's grid) or 3 (all triples)."),
    diagonal: bool = typer.Option(True, help="With --layers 2, include the single layers as the diagonal."),
    sets: str = typer.Option(None, help="Explicit layer sets instead of a grid, comma-separated, e.g. 0-1,3,2-5-7."),
    mode: str = typer.Option("faithful", help=MODE_HELP),
    target_pos: list[str] = typer.Option(None, "--target-pos", help="0, -1 or filler; repeatable. Default: 0 (reference) or filler (faithful)."),
    max_rank: int = typer.Option(1000, help="Ranks above this give the RR sentinel (-1 reference, 0 faithful)."),
    tables: bool = typer.Option(False, help="Also print the top-10 layer sets of every task (they are in summary.json)."),
    out: Path = out_option("runs/patch"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Patch the instruction's residual stream at T_inst into the query's run at one, two or three layers at once,
    and measure how much of the answer comes back. Writes patching.csv, summary.json and heatmaps, and ends with a
    verdict per task: where the model's instruction vectors live."""
    from olmo_iv.runs.patch import DEFAULT_TASKS, PatchSettings, run_patching

    con = console()
    settings = PatchSettings(models=model, tasks=task or list(DEFAULT_TASKS), samples=samples, sample_seed=sample_seed,
                             layers=layers, diagonal=diagonal, mode=mode,
                             sets=[x.strip() for x in sets.split(",") if x.strip()] if sets else [], target_pos=target_pos or [],
                             max_rank=max_rank, dtype=dtype, device=device)
    with progress_bar(con) as bar:
        summary = run_patching(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    if tables:
        for entry in summary["top10"]:
            table = Table(title=f"{entry['model']} · {entry['task']} · pos {entry['target_pos']}: top-10 by mean {entry['metric']}")
            table.add_column("rank", justify="right")
            table.add_column("layers")
            table.add_column(f"mean {entry['metric']}", justify="right")
            for i, row in enumerate(entry["top"], 1):
                table.add_row(str(i), row["layers"], f"{row['mean']:+.4f}")
            con.print(table)
    con.print(f"[bold]Where do the instruction vectors live?[/] Best layer set per task by mean RR difference "
              f"(patched minus query alone; {round(100 * summary['verdict_confidence'])}% bootstrap CI):")
    for v in summary["verdict"]:
        who = f"{escape(Path(v['model']).name)} · " if len(settings.models) > 1 else ""
        pos = f" (pos {v['target_pos']})" if len(settings.target_pos) > 1 else ""
        con.print(f"  {who}{escape(v['task'])}{pos}: layers {v['layers']}  {v['mean']:+.3f} [{v['ci_low']:+.3f}, "
                  f"{v['ci_high']:+.3f}]  (n={v['n']}; best single layer {v['best_single']}: {v['best_single_mean']:+.3f})")
    con.print(f"files: {escape(str(out))}/ ({', '.join(summary['files'])})")
