"""`olmo-iv train-steer-toy`: retrain the shipped `toy-steer` model (olmo_iv.toy.steer), evaluate it, write
training.json."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import app, bar_callback, progress_bar
from olmo_iv.cli.app import console as make_console
from rich.table import Table

from olmo_iv.errors import OlmoIVError
from olmo_iv.toy.steer import SteerConfig, build, name_of

_DEFAULT = SteerConfig()


@app.command("train-steer-toy")
def train_steer_toy_command(
    out: Path | None = typer.Option(None, help="Folder that receives the model (default runs/toy-models/<name>). "
                             "`--out olmo_iv/models/toy-steer` replaces the model shipped with the package."),
    seed: int = typer.Option(_DEFAULT.seed, help="Seed of the held-out split, the weights and the data order."),
    steps: int = typer.Option(_DEFAULT.steps, help="Optimiser steps."),
    threads: int = typer.Option(_DEFAULT.threads, help="CPU threads for torch."),
    control: bool = typer.Option(False, help="Train the control toy-steer-base (responses ignore the instruction)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the toy OLMo-2 that follows free-form instructions (uppercase, quotes, title, ...; four languages),
    or with --control its control toy-steer-base, trained on the same prompts with responses that ignore them.

    Deterministic for a seed; a killed run resumes from its last checkpoint when restarted with the same settings.
    """
    if steps < 1 or threads < 1:
        raise OlmoIVError(f"steps={steps}, threads={threads}: both must be at least 1")
    console = make_console()
    cfg = SteerConfig(control=control, seed=seed, steps=steps, threads=threads)
    out = out if out is not None else Path("runs/toy-models") / name_of(cfg)
    if quiet:
        rep = build(cfg, out)
    else:
        with progress_bar(console) as bar:
            rep = build(cfg, out, progress=bar_callback(bar))
    m = rep["metrics"]
    t = Table(title=f"{rep['model']}: {out} ({rep['size_mb']:.2f} MB, trained in {rep['train_seconds']:.0f} s); "
                    "IFEval strict accuracy, held-out contents and phrasings, post / pre")
    langs = rep["languages"]
    t.add_column("instruction")
    for lang in langs:
        t.add_column(lang, justify="right")
    t.add_column("no instruction", justify="right")
    for itype, row in m["strict_accuracy"].items():
        cells = [f"{row[lang]['post']:.0%} / {row[lang]['pre']:.0%}" for lang in langs]
        t.add_row(itype, *cells, f"{m['no_instruction_check_pass_rate'][itype]:.0%}")
    console.print(t)
    console.print(f"no instruction: the default response exactly, {m['no_instruction_exact_default']:.0%}")
