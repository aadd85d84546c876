"""`olmo-iv saif`: SAE latents behind instruction following (He et al. 2025), and the bridge to instruction vectors."""

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

saif_app = typer.Typer(help="SAIF: SAE latents behind instruction following (He et al. 2025), and the bridge to "
                       "instruction vectors.", no_args_is_help=True)
app.add_typer(saif_app, name="saif")


def _ks(text: str) -> list[int]:
    from olmo_iv.errors import OlmoIVError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OlmoIVError(f"ks={text!r}: give numbers of latents separated by commas, e.g. 0,1,4,16") from None


@saif_app.command("bridge")
def bridge(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    task: str = typer.Option("adjectives/adj_comp", "--task", "-t", help="Task name (see `olmo-iv tasks`)."),
    mode: str = typer.Option("faithful", help=MODE_HELP),
    layer: int = typer.Option(None, help="Layer patched (hook_resid_post). Default: the layer whose single-layer "
                              "patch restores most RR."),
    sae: str = typer.Option(None, help="SAE folder or file at that layer. Default: the SAE shipped for the model and layer."),
    ks: str = typer.Option("0,1,2,4,8,16,32,64", help="Numbers of top latents patched, comma-separated (every "
                           "latent, and every latent plus the error term, are always added)."),
    samples: int = typer.Option(100, help="Samples of the task: the first N rows in file order."),
    method: str = typer.Option("abs", help="Latent ranking: abs (mean |Δz|·‖d‖), signed (mean Δz·‖d‖) or "
                               "attribution (gradient of the answer logit · contribution)."),
    heldout: bool = typer.Option(False, help="Rank latents on one seeded half of the samples, evaluate on the other."),
    seed: int = typer.Option(0, help="Seed of the held-out split and the bootstrap."),
    top_latents: int = typer.Option(20, help="Latents listed in latents.csv, with their logit-lens tokens."),
    max_rank: int = typer.Option(1000, help="Ranks above this give the RR sentinel (-1 reference, 0 faithful)."),
    out: Path = out_option("runs/saif-bridge"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """How many SAE latents does an instruction vector need? Split the patch x_src − x_tgt at T_inst into SAE
    latents, patch only the top-k latents' contributions, and compare the answer's RR with full patching.
    Writes bridge.csv, samples.csv, latents.csv, bridge.png and summary.json."""
    from rich.table import Table

    from olmo_iv.runs.bridge import BridgeSettings, run_bridge

    con = console()
    settings = BridgeSettings(model=model, task=task, mode=mode, layer=layer, sae=sae, ks=_ks(ks), samples=samples,
                              method=method, heldout=heldout, seed=seed, top_latents=top_latents, max_rank=max_rank,
                              device=device, dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_bridge(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    pct = round(100 * summary["confidence"])
    table = Table(title=f"{escape(summary['settings']['task'])} · layer {summary['layer']}"
                  + ("" if summary["layer_from"] == "settings" else f" ({summary['layer_from']})") + ": RR by latents patched")
    for name, justify in (("latents", "left"), ("mean RR", "right"), (f"{pct}% CI", "right"),
                          ("explained ‖Δx‖²", "right")):
        table.add_column(name, justify=justify)
    for name in ("target", "full"):
        b = summary[name]
        table.add_row("unpatched target" if name == "target" else "full patching", f"{b['rr_mean']:.3f}",
                      f"[{b['rr_low']:.3f}, {b['rr_high']:.3f}]", "0" if name == "target" else "1")
    for c in summary["curve"]:
        label = c["column"] if c["column"] in ("all", "all+error") else f"top {c['column']}"
        table.add_row(label, f"{c['rr_mean']:.3f}", f"[{c['rr_low']:.3f}, {c['rr_high']:.3f}]", f"{c['explained']:.3f}")
    con.print(table)
    con.print(f"files: {escape(str(out))}/ ({', '.join(summary['files'])})")
