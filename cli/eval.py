"""`olmo-iv eval`: task inference (paper §3, Figure 12): greedy answers, exact-match and instructional accuracy."""

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

from olmo_iv.errors import OlmoIVError


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}"


@app.command("eval")
def eval_(
    model: list[str] = typer.Option(["toy"], "--model", "-m", help="Built-in name (toy, toy-base), local folder or hub id; repeatable."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Task name (see `olmo-iv tasks`); repeatable. Default: the four contrastive subtasks."),
    samples: int = typer.Option(None, help="First N samples of each task (default: all, as the reference)."),
    mode: str = typer.Option("faithful", help=MODE_HELP),
    judge: str = typer.Option("rules", help="IA judge: rules (built in) or http (an OpenAI-compatible endpoint)."),
    judge_url: str = typer.Option(None, help="With --judge http: base URL, e.g. http://localhost:8000/v1."),
    judge_model: str = typer.Option(None, help="With --judge http: the judge model's name at that endpoint."),
    judge_key_env: str = typer.Option(None, help="With --judge http: environment variable holding the API key."),
    judge_timeout: float = typer.Option(60.0, help="With --judge http: seconds per request."),
    max_new_tokens: int = typer.Option(5, help="Tokens to generate per prompt (the reference's default 5)."),
    batch_size: int = typer.Option(32, help="Prompts per generation batch."),
    out: Path = out_option("runs/eval"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Generate greedy answers (no BOS, no chat template, stop at a newline) and score exact-match accuracy (both
    post-processings) and instructional accuracy (options and judge). Writes per-sample CSVs, summary.csv/json and
    the Figure 12 bar chart."""
    from olmo_iv.evals.inference import CONTRASTIVE_TASKS, EvalSettings, HTTPJudge, RuleJudge
    from olmo_iv.runs.eval import run_eval

    if judge == "rules":
        if judge_url or judge_model or judge_key_env:
            raise OlmoIVError("--judge-url/--judge-model/--judge-key-env need --judge http")
        the_judge = RuleJudge()
    elif judge == "http":
        if not judge_url or not judge_model:
            raise OlmoIVError("--judge http needs --judge-url and --judge-model")
        the_judge = HTTPJudge(judge_url, judge_model, api_key_env=judge_key_env, timeout=judge_timeout,
                              exact_yes=mode == "reference")
    else:
        raise OlmoIVError(f"unknown judge {judge!r}: use rules or http")
    settings = EvalSettings(mode=mode, samples=samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            dtype=dtype)
    con = console()
    with progress_bar(con) as bar:
        rows = run_eval(model, task or list(CONTRASTIVE_TASKS), settings, out, judge=the_judge, device=device,
                        overwrite=overwrite, progress=bar_callback(bar))
    table = Table(title=f"task inference ({mode} post-processing), % of n samples")
    for col in ("model", "task", "n", "EM ref", "EM faithful", "option IA", "judge IA", "IA"):
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in rows:
        table.add_row(Path(r["model"]).name, r["task"].rsplit("/", 1)[-1], str(r["n"]), _pct(r["em_reference"]),
                      _pct(r["em_faithful"]), _pct(r["option_ia"]), _pct(r["judge_ia"]), _pct(r["ia"]))
    con.print(table)
    con.print(f"files: {escape(str(out))}/ (summary.csv, summary.json, figure12.png, figure12.pdf, <model>/<task>.csv)")
