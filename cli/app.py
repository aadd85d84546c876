"""The Typer application that every command module registers itself on."""

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


def progress_bar(console: Console, unit: str = "", transient: bool = False) -> Progress:
    """The progress bar every long command shows: description, bar, done/total [unit], elapsed, remaining."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)


def bar_callback(bar: Progress):
    """The library's progress callback (olmo_iv.progress.ProgressFn), drawn as one rich bar per label."""
    tasks: dict[str, int] = {}

    def progress(label: str, advance: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total or None)
        bar.update(tasks[label], advance=advance)

    return progress
