"""`olmo-iv ifeval`: score responses on IFEval offline, strict and loose."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import app, console
from rich.table import Table


@app.command("ifeval")
def ifeval(
    responses: Path = typer.Option(..., "--responses", "-r", help='JSONL, one {"prompt": ..., "response": ...} per line, matched to the inputs by prompt text.'),
    input_data: Path = typer.Option(None, "--input-data", help="IFEval input_data.jsonl (key, prompt, instruction_id_list, kwargs). Default: the vendored 541 prompts."),
    out: Path = typer.Option(Path("runs/ifeval"), "--out", "-o", help="Run folder: eval_results_strict.jsonl, eval_results_loose.jsonl, summary.json, ifeval.png/.pdf."),
) -> None:
    """Score responses with the 25 IFEval checkers (strict and loose, prompt and instruction level), fully offline.
    Writes the official result files, a summary and a chart."""
    from olmo_iv.runs.ifeval import run_ifeval

    con = console()
    summary = run_ifeval(responses, out, input_data=input_data)
    table = Table(title=f"IFEval: {summary['n_prompts']} prompts, {summary['n_instructions']} instructions")
    table.add_column("level")
    table.add_column("n", justify="right")
    table.add_column("strict", justify="right")
    table.add_column("loose", justify="right")
    rows = [("prompt", "prompt_level", None), ("instruction", "instruction_level", None)]
    rows += [(f"  {c}", "by_category", c) for c in summary["strict"]["by_category"]]
    for label, kind, name in rows:
        s, lo = (summary[m][kind] if name is None else summary[m][kind][name] for m in ("strict", "loose"))
        table.add_row(label, str(s["n"]), f"{100 * s['accuracy']:.1f}%", f"{100 * lo['accuracy']:.1f}%")
    con.print(table)
    con.print(f"[green]wrote[/] {', '.join(str(out / f) for f in summary['files'])}")
