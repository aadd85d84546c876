"""`olmo-iv probe`: linear probe by layer and LDA of instruction vectors (olmo_iv.analysis.probes)."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import DEVICE, DTYPE, OVERWRITE, app, bar_callback, console, out_option, progress_bar
from rich.markup import escape
from rich.table import Table


@app.command("probe")
def probe_command(
    model: list[str] = typer.Option(["toy", "toy-base"], "--model", "-m",
                                    help="Built-in name, local folder or hub id; repeatable (default: toy and its control toy-base)."),
    task: list[str] = typer.Option(None, "--task", "--tasks", "-t",
                                   help="Task (see `olmo-iv tasks`); repeatable. Default: every task with rephrasings (the paper's 8)."),
    layer: int = typer.Option(0, "--layer", "-l", help="Layer of the LDA figure (the authors' default: 0); the probe runs on every layer."),
    seed: int = typer.Option(0, help="Seed of the stratified split and of the solver."),
    test_size: float = typer.Option(0.2, help="Held-out fraction."),
    standardize: bool = typer.Option(True, help="Z-score features on the training split (the authors did not)."),
    c: float = typer.Option(1.0, "--C", help="Inverse L2 strength of the logistic regression."),
    max_iter: int = typer.Option(1000, help="lbfgs iterations (the authors: 100)."),
    batch_size: int = typer.Option(64, help="Instructions per forward pass."),
    out: Path = out_option("runs/probe"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    save_vectors: bool = typer.Option(False, help="Also write vectors_<model>.npz ([N, layers, d] float32)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Probe which task a rephrased instruction belongs to from its instruction vector, at every layer, and draw
    the LDA of one layer. Writes probe.csv, probe.png, lda.csv, lda.png and probe.json (settings, versions)."""
    from olmo_iv.analysis.probes import ProbeConfig
    from olmo_iv.runs.probe import ProbeRunSettings, run_probe

    settings = ProbeRunSettings(models=model, tasks=task or [], lda_layer=layer, batch_size=batch_size, device=device,
                                dtype=dtype, save_vectors=save_vectors,
                                probe=ProbeConfig(seed=seed, test_size=test_size, standardize=standardize, C=c,
                                                  max_iter=max_iter))
    con = console()
    with progress_bar(con) as bar:
        result = run_probe(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    probes, ldas, names, files = result.probes, result.ldas, result.names, result.files
    first = next(iter(probes.values()))[0]
    table = Table(title="Probe accuracy [95% CI]",
                  caption=f"chance {first.chance:.2f}, n_test {first.n_test}, * not converged")
    table.add_column("layer", justify="right")
    for m in model:
        table.add_column(names[m], justify="right")
    for i in range(max(len(r) for r in probes.values())):
        cells = []
        for m in model:
            r = probes[m][i] if i < len(probes[m]) else None
            cells.append("" if r is None else f"{r.accuracy:.3f} [{r.ci_lo:.2f}, {r.ci_hi:.2f}]" + ("" if r.converged else "*"))
        table.add_row(str(i), *cells)
    con.print(table)
    for m, res in ldas.items():
        con.print(f"LDA layer {layer}, {names[m]}: held-out accuracy {res.test_accuracy:.3f}, explained variance "
                      + ", ".join(f"{v:.2f}" for v in res.explained_variance_ratio[:3]))
    con.print("files: " + escape(", ".join(str(p) for p in files)))


