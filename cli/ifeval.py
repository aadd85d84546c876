"""`olmo-iv ifeval`: score responses on IFEval offline, strict and loose."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import DEVICE, DTYPE, OVERWRITE, app, bar_callback, console, out_option, progress_bar
from rich.markup import escape
from rich.table import Table


@app.command("ifeval")
def ifeval(
    responses: Path = typer.Option(None, "--responses", "-r", help='JSONL, one {"prompt": ..., "response": ...} per line, matched to the inputs by prompt text.'),
    model: str = typer.Option(None, "--model", "-m", help="Generate the responses with this model (greedy, its chat template where it has one) instead of --responses."),
    input_data: Path = typer.Option(None, "--input-data", help="IFEval input_data.jsonl (key, prompt, instruction_id_list, kwargs). Default: the vendored 541 prompts."),
    style: str = typer.Option("auto", help="With --model: auto (chat template if any, else plain), chat, plain or qa (\"Q: ...\\nA:\")."),
    max_new_tokens: int = typer.Option(256, help="With --model: tokens per response (a row also ends at EOS)."),
    batch_size: int = typer.Option(16, help="With --model: prompts per generation batch and per unit of the run."),
    limit: int = typer.Option(None, help="Only the first N prompts."),
    out: Path = out_option("runs/ifeval"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Score responses with the 25 IFEval checkers (strict and loose, prompt and instruction level), fully offline;
    or generate them with --model first. Writes the official result files, a summary and a chart."""
    from olmo_iv.runs.ifeval import IFEvalSettings, run_ifeval

    con = console()
    settings = IFEvalSettings(input_data=None if input_data is None else str(input_data),
                              responses=None if responses is None else str(responses), model=model, style=style,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, device=device,
                              dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_ifeval(settings, out, overwrite=overwrite, progress=bar_callback(bar))
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
    con.print(f"files: {escape(str(out))}/ ({', '.join(summary['files'])})")
