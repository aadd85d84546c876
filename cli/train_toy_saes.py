"""`olmo-iv train-toy-saes`: retrain the SAEs shipped for a built-in toy model (olmo_iv.toy.saes)."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import app, bar_callback, int_list, progress_bar
from olmo_iv.cli.app import console as make_console
from rich.table import Table


@app.command("train-toy-saes")
def train_toy_saes_command(
    model: str = typer.Option("toy-steer", "--model", "-m", help="Built-in model: toy-steer or toy."),
    layers: str = typer.Option(None, help="Comma-separated layers (default: all)."),
    out: Path = typer.Option(Path("runs/toy-saes"), help="Folder that receives <model>/blocks.L.hook_resid_post/. "
                             "`--out olmo_iv/saes` replaces the SAEs shipped with the package."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train TopK SAEs (768 latents, k 16) on a built-in toy's own training text, one per layer, and write them in
    SAELens format with a training.json each (held-out FVU, L0, dead fraction, spliced CE / KL)."""
    from olmo_iv.toy.saes import train_builtin_saes

    console = make_console()
    if quiet:
        records = train_builtin_saes(model, out, int_list(layers, "layers"))
    else:
        with progress_bar(console) as bar:
            records = train_builtin_saes(model, out, int_list(layers, "layers"), progress=bar_callback(bar))
    t = Table(title=f"{model}: SAEs written to {out}/{model} (held-out metrics)")
    for col in ("hook", "FVU", "L0", "dead", "FVU at last prompt token", "ΔCE", "KL", "seconds"):
        t.add_column(col, justify="right" if col != "hook" else "left")
    for r in records:
        h = r["heldout"]
        t.add_row(r["hook_name"], f"{h['fvu']:.4f}", f"{h['l0']:.1f}", f"{h['dead_fraction']:.1%}",
                  f"{h['last_prompt_token']['fvu']:.4f}", f"{h['spliced']['delta_ce']:+.4f}",
                  f"{h['spliced']['kl_sae']:.4f}", f"{r['train_seconds']:.0f}")
    console.print(t)
