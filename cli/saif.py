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
    int_list,
    out_option,
    progress_bar,
)
from rich.markup import escape

saif_app = typer.Typer(help="SAIF: SAE latents behind instruction following (He et al. 2025), and the bridge to "
                       "instruction vectors.", no_args_is_help=True)
app.add_typer(saif_app, name="saif")


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
    settings = BridgeSettings(model=model, task=task, mode=mode, layer=layer, sae=sae, ks=int_list(ks, "ks"), samples=samples,
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


def _saif_settings(model, sae, source, types, layer, layers, k, ks, method, tau, variants_by, weights, n_train,
                   n_test, max_new_tokens, style, batch_size, seed, device, dtype, steer: bool, strengths=None,
                   n_valid=None, output_alpha=1.0):
    from olmo_iv.runs.saif import SaifSettings

    kw = {} if ks is None else {"ks": int_list(ks, "ks")}
    if strengths is not None:
        kw["strengths"] = int_list(strengths, "strengths", float)
    return SaifSettings(model=model, sae=sae, source=source, types=types.split(",") if types else None, layer=layer,
                        layers=int_list(layers, "layers"), k=k, method=method, tau=tau, variants_by=variants_by,
                        weights=weights,
                        n_train=n_train, n_test=n_test, max_new_tokens=max_new_tokens, style=style,
                        batch_size=batch_size, seed=seed, device=device, dtype=dtype, steer=steer, n_valid=n_valid,
                        output_alpha=output_alpha,
                        **kw)


MODEL = typer.Option("toy-steer", "--model", "-m", help="Built-in name, local folder or hub id.")
SAE = typer.Option(None, help="SAE folder: one SAE, or one per layer in blocks.L.hook_resid_post/ subfolders. "
                   "Default: the SAEs shipped for the model.")
SOURCE = typer.Option(None, help="Instruction data: toy-steer (the toy's IFEval types) or saif (translation, "
                      "summarization, keywords). Default: toy-steer for the toy-steer models, saif otherwise.")
TYPES = typer.Option(None, help="Instruction types, comma-separated (default: all of the source).")
LAYER = typer.Option(None, help="Layer of the main comparison and the k-sweep (default: the final layer).")
LAYERS = typer.Option(None, help="Layers to score and sweep, comma-separated (default: every layer with an SAE).")
K = typer.Option(8, help="Latents selected for the main comparison.")
METHOD = typer.Option("saif", help="Latent score: saif, mean_diff, freq_diff, consistency, cohen_d or auroc.")
TAU = typer.Option(0.1, help="saif: exclude latents firing on more than this share of the negatives.")
VARIANTS_BY = typer.Option("language", help="Unit of consistency: language (each translation, paraphrases pooled) "
                           "or phrasing (each paraphrase alone).")
WEIGHTS = typer.Option("mu_pos", help="Decoder directions weighted by mu_pos or mean_diff.")
N_TRAIN = typer.Option(48, help="Contents per type scored (positives and negatives).")
N_TEST = typer.Option(16, help="Held-out contents per type steered.")
STYLE = typer.Option("auto", help="Prompt style: auto (the chat template if any), chat, plain or qa.")
BATCH = typer.Option(64, help="Prompts per forward pass.")
SEED = typer.Option(0, help="Seed of the samples.")


@saif_app.command("run")
def run(
    model: str = MODEL, sae: str = SAE, source: str = SOURCE, types: str = TYPES, layer: int = LAYER,
    layers: str = LAYERS, k: int = K,
    ks: str = typer.Option("1,2,4,8,16,32", help="The k-sweep, comma-separated."),
    method: str = METHOD, tau: float = TAU, variants_by: str = VARIANTS_BY, weights: str = WEIGHTS,
    n_train: int = N_TRAIN, n_test: int = N_TEST,
    strengths: str = typer.Option("1,2,4,8,16", help="top1_decay: candidate strengths, in multiples of the latent's "
                                  "mu- to mu+ shift, comma-separated; chosen per type on training contents."),
    n_valid: int = typer.Option(None, help="top1_decay and saif_output: training contents per type that choose the "
                                "strength and score the latents' output (default 16, or --n-train if fewer)."),
    output_alpha: float = typer.Option(1.0, help="saif_output: a latent's output score adds its direction at this "
                                       "multiple of the mean residual norm."),
    max_new_tokens: int = typer.Option(64, help="New tokens per response."),
    style: str = STYLE, batch_size: int = BATCH, seed: int = SEED,
    out: Path = out_option("runs/saif"),
    device: str = DEVICE, dtype: str = DTYPE, overwrite: bool = OVERWRITE,
) -> None:
    """The whole SAIF pipeline: score latents (pre and post placement, every layer), interpret them, and steer
    without the instruction against prompting and difference-of-means (k-sweep, layer sweep, placement)."""
    from olmo_iv.runs.saif import run_saif

    con = console()
    settings = _saif_settings(model, sae, source, types, layer, layers, k, ks, method, tau, variants_by, weights,
                              n_train, n_test, max_new_tokens, style, batch_size, seed, device, dtype, steer=True,
                              strengths=strengths, n_valid=n_valid, output_alpha=output_alpha)
    with progress_bar(con) as bar:
        summary = run_saif(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    from rich.table import Table

    conds = summary["conditions"]
    shown = [c for c in ("none", "prompting", "diffmean", f"saif_k{k}", f"saif_output_k{k}", "clamp", "sdcv", "top1_decay")
             if c in conds]
    table = Table(title=f"strict / loose accuracy (%) without the instruction, layer {summary['layer']}")
    table.add_column("type")
    for c in shown:
        table.add_column(c.replace("_", " "), justify="right")
    for t in [*summary["types"], None]:
        cells = [conds[c]["overall"] if t is None else conds[c]["by_type"][t] for c in shown]
        table.add_row(t or "overall", *(f"{100 * e['strict']:.0f} / {100 * e['loose']:.0f}" for e in cells))
    con.print(table)
    chosen = ", ".join(f"{t} x{m:g}" if m is not None else f"{t} none" for t, m in summary["top1_multiple"].items())
    con.print(f"top1_decay strength (multiples of mu- to mu+), chosen on training contents: {escape(chosen)}")
    con.print(f"files: {escape(str(out))}/ (latents.csv, contexts.csv, results.csv, top1_strength.csv, output_scores.csv, summary.json, "
              "vectors/, conditions, k_sweep, layer_sweep, placement .png/.pdf)")


@saif_app.command("score")
def score(
    model: str = MODEL, sae: str = SAE, source: str = SOURCE, types: str = TYPES, layer: int = LAYER,
    layers: str = LAYERS, k: int = K, method: str = METHOD, tau: float = TAU, variants_by: str = VARIANTS_BY,
    weights: str = WEIGHTS, n_train: int = N_TRAIN, style: str = STYLE, batch_size: int = BATCH, seed: int = SEED,
    out: Path = out_option("runs/saif-score"),
    device: str = DEVICE, dtype: str = DTYPE, overwrite: bool = OVERWRITE,
) -> None:
    """Score every latent on positives against negatives and write the top latents with their logit-lens tokens
    (latents.csv) and each type's SAIF vector (vectors/TYPE, for `olmo-iv saif steer` or `olmo-iv steer generate`)."""
    from olmo_iv.runs.saif import run_saif

    con = console()
    settings = _saif_settings(model, sae, source, types, layer, layers, k, None, method, tau, variants_by, weights,
                              n_train, 16, 64, style, batch_size, seed, device, dtype, steer=False)
    with progress_bar(con) as bar:
        summary = run_saif(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    for t, latents in summary["selected"][str(summary["layer"])]["post"].items():
        con.print(f"{t}: layer {summary['layer']} latents {', '.join(map(str, latents))}")
    con.print(f"files: {escape(str(out))}/ (latents.csv, contexts.csv, summary.json, vectors/)")


@saif_app.command("steer")
def steer(
    run_dir: Path = typer.Option(..., "--run", help="A folder `olmo-iv saif score` or `saif run` wrote."),
    type_: str = typer.Option(..., "--type", help="Instruction type whose SAIF vector steers."),
    prompts: Path = typer.Option(..., help='JSONL, one {"prompt": ...} user message per line.'),
    layer: int = typer.Option(None, help="Steered layer (default: the run's layer)."),
    mode: str = typer.Option("adjust_rs", help="adjust_rs (set the projection to the positives' mean: SAIF's calibrated edit) or add."),
    coef: float = typer.Option(1.0, help="add: the multiple of the unit vector; adjust_rs: a weight on the edit."),
    positions: str = typer.Option("all", help="Edited positions: all, prompt, generated or last_prompt."),
    max_new_tokens: int = typer.Option(64, help="New tokens per response."),
    batch_size: int = typer.Option(16, help="Prompts per batch and per unit of the run."),
    out: Path = out_option("runs/saif-steer"),
    device: str = DEVICE, dtype: str = DTYPE, overwrite: bool = OVERWRITE,
) -> None:
    """Steered generation with one type's SAIF vector (generations.jsonl, as `olmo-iv steer generate` writes)."""
    from olmo_iv.runs.saif import run_saif_steer

    con = console()
    with progress_bar(con) as bar:
        rows = run_saif_steer(run_dir, type_, prompts, out, layer=layer, mode=mode, coef=coef, positions=positions,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype,
                              overwrite=overwrite, progress=bar_callback(bar))
    for r in rows[:5]:
        con.print(f"{escape(r['prompt'])!s}\n  -> {escape(r['text'])}")
    con.print(f"files: {escape(str(out))}/generations.jsonl ({len(rows)} responses)")
