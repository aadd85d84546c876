"""`olmo-iv sweep SPEC`: a grid of runs over models, tasks and commands, in this process or on Ray."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import OVERWRITE, app, bar_callback, console, progress_bar
from rich.markup import escape


@app.command("sweep")
def sweep(
    spec: Path = typer.Argument(..., help="The sweep's spec: a TOML or YAML file (docs/sweeps.md)."),
    out: Path = typer.Option(None, "--out", "-o", help="Sweep folder. Default: runs/<the spec's file name>."),
    ray: str = typer.Option(None, "--ray", help="Run the units on Ray: auto (this machine's cluster), local (start "
                            "one here) or a cluster address. Default: in this process, or Ray at RAY_ADDRESS if set."),
    cpus_per_unit: int = typer.Option(1, help="CPU threads per Ray worker."),
    gpus_per_unit: float = typer.Option(None, help="GPUs per Ray worker. Default: from the model's size and dtype."),
    gpu_memory_gib: float = typer.Option(80.0, help="One GPU's memory, for the default GPU request."),
    workers_per_model: int = typer.Option(None, help="Ray workers per model. Default: as many as the cluster holds."),
    max_retries: int = typer.Option(3, help="Times a unit is run again when its worker process dies."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Run every (command, model, task, setting) of a spec as run-store units, merge each run as its own command
    does (one patching.csv across models and tasks), and write the sweep's summary.json. Started again, a sweep
    does only the units that are missing."""
    from olmo_iv.runs.sweep import SweepOptions, run_sweep

    con = console()
    options = SweepOptions(ray=ray, cpus_per_unit=cpus_per_unit, gpus_per_unit=gpus_per_unit,
                           gpu_memory_gib=gpu_memory_gib, workers_per_model=workers_per_model,
                           max_retries=max_retries)
    out = out or Path("runs") / spec.stem
    with progress_bar(con) as bar:
        summary = run_sweep(spec, out, options=options, overwrite=overwrite, progress=bar_callback(bar))
    con.print(f"[bold]{len(summary['runs'])} run(s)[/], {summary['executor']}:")
    for run in summary["runs"]:
        con.print(f"  {escape(run['name'])} ({run['command']}): {escape(str(out / run['folder']))}/")
        for v in run.get("verdict", []):
            con.print(f"    {escape(Path(v['model']).name)} · {escape(v['task'])}: layers {v['layers']}  "
                      f"{v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]")
    con.print(f"files: {escape(str(out))}/summary.json")
