"""The Typer application that every command module registers itself on."""

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

app = typer.Typer(
    name="olmo-iv",
    help="Instruction vectors in OLMo-2: patching, statistics, geometry, path tracing, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _setup(
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch. Default: 1 or torch's default, "
                                "whichever runs a small matrix product faster here (OMP_NUM_THREADS is respected)."),
) -> None:
    """Instruction vectors in OLMo-2: patching, statistics, geometry, path tracing, evaluation."""
    from olmo_iv.io import auto_cpu_threads

    auto_cpu_threads(threads)


# Options that mean the same in every command (docs/cli.md: one meaning per flag).
MODE_HELP = ("Prompts and answer rules: faithful (the paper's text; the default everywhere) or reference (the "
             "authors' code, bugs included, to reproduce their tables).")
DEVICE = typer.Option("cpu", help="torch device: cpu, cuda, cuda:1, mps.")
DTYPE = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16.")
OVERWRITE = typer.Option(False, help="Discard the run in --out and compute it again. Without it, a run with the same "
                         "settings continues where it stopped, and a finished one says where its results are.")


def int_list(text: str | None, name: str, kind: type = int) -> list | None:
    """'1,2,4' -> [1, 2, 4] for a comma-separated option (None or '' -> None); `name` is the library parameter the
    error names (the CLI shows it as the flag); kind=float reads '0.5,2' as well."""
    from olmo_iv.errors import OlmoIVError

    if not text:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OlmoIVError(f"{name}={text!r}: give numbers separated by commas, e.g. 0,2,4") from None


def out_option(default: str):
    return typer.Option(Path(default), "--out", "-o", help="Run folder.")


def console() -> Console:
    """The console every command prints on: wide enough that a piped table is not cut at 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def progress_bar(console: Console, unit: str = "", transient: bool = True) -> Progress:
    """The progress bar every long command shows: description, bar, done/total [unit], elapsed, remaining."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    # no bar when the output is a pipe or a file: it would only leave blank lines behind
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient,
                    disable=not console.is_terminal)


INFO_SHOWN = {"fvu": "FVU", "l0": "L0", "dead": "dead"}
"""Running figures a bar shows when the library reports them."""


def bar_callback(bar: Progress):
    """The library's progress callback (olmo_iv.progress.ProgressFn), drawn as one rich bar per label."""
    tasks: dict[str, int] = {}

    def progress(label: str, advance: int, total: int | None, info: dict | None = None) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total or None)
        shown = {k: v for k, v in (info or {}).items() if k in INFO_SHOWN}
        text = "  ".join(f"{INFO_SHOWN[k]} {v:.3g}" for k, v in shown.items())
        bar.update(tasks[label], advance=advance, description=f"{label}  {text}" if text else label)

    return progress
