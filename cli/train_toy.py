"""`olmo-iv train-toy`: retrain the shipped toy models (olmo_iv.toy.train), evaluate them, write training.json."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import app, bar_callback, progress_bar
from olmo_iv.cli.app import console as make_console
from rich.table import Table

from olmo_iv.errors import OlmoIVError
from olmo_iv.toy.train import ToyConfig, build

_DEFAULT = ToyConfig()


@app.command("train-toy")
def train_toy_command(
    out: Path = typer.Option(Path("runs/toy-models"), help="Folder that receives toy/ and toy-base/. "
                             "`--out olmo_iv/models` replaces the models shipped with the package."),
    which: str = typer.Option("both", help="toy, toy-base or both."),
    seed: int = typer.Option(_DEFAULT.seed, help="Seed of the split, the weights and the data order."),
    steps: int = typer.Option(_DEFAULT.steps, help="Optimiser steps."),
    threads: int = typer.Option(_DEFAULT.threads, help="CPU threads for torch."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the toy OLMo-2 that follows the paper's instructions (toy) and its control (toy-base).

    Deterministic for a seed; a killed run resumes from its last checkpoint when restarted with the same settings.
    """
    if which not in ("toy", "toy-base", "both"):
        raise OlmoIVError(f"which={which!r}: use toy, toy-base or both")
    if steps < 1 or threads < 1:
        raise OlmoIVError(f"steps={steps}, threads={threads}: both must be at least 1")
    console = make_console()
    names = ["toy", "toy-base"] if which == "both" else [which]
    for name in names:
        cfg = ToyConfig(control=name == "toy-base", seed=seed, steps=steps, threads=threads)
        if quiet:
            rep = build(cfg, out / name)
        else:
            with progress_bar(console) as bar:
                rep = build(cfg, out / name, progress=bar_callback(bar))
        m = rep["metrics"]
        t = Table(title=f"{name}: {out / name} ({rep['size_mb']:.2f} MB, trained in {rep['train_seconds']:.0f} s)")
        for col in ("subtask", "exact match, Table-1 instr.", "exact match, held-out rephrasings"):
            t.add_column(col, justify="left" if col == "subtask" else "right")
        for task, acc in m["accuracy_table1"].items():
            t.add_row(task, f"{acc:.1%}", f"{m['accuracy_heldout'][task]:.1%}")
        console.print(t)
        same = ", ".join(f"{k} {v:.0%}" for k, v in m["same_answer_all4_instructions"].items())
        console.print(f"same answer under all four instructions: {same}")
