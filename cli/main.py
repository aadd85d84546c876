"""Entry point of the `olmo-iv` command: a thin layer over the library.

Each command module registers its command(s) on `olmo_iv.cli.app.app`; importing them here wires them up.
Library errors (`OlmoIVError`) are printed as one clear message, never a traceback; the Python parameters they
name (`device='cuda'`, `overwrite=True`) are shown as this command line's flags.
"""

import re
import sys

from olmo_iv.cli import (  # noqa: F401  (registers the commands)
    eval,
    ifeval,
    patch,
    paths,
    probe,
    sae,
    saif,
    stats,
    steer,
    sweep,
    tasks,
    train_steer_toy,
    train_toy,
    train_toy_saes,
)
from olmo_iv.cli.app import app as _typer_app
from rich.console import Console
from rich.markup import escape

from olmo_iv.errors import OlmoIVError
from olmo_iv.runs.store import RunFinished

_PARAM = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)=(True\b)?")
FLAG_OF = {"n": "samples", "lda_layer": "layer", "head_tokens": "head-token", "prompt_mode": "mode"}
"""Library parameters whose command-line flag has another name."""


def as_flags(message: str) -> str:
    """'device='cuda'' -> '--device 'cuda'', 'overwrite=True' -> '--overwrite': the library names its Python
    parameters, the command line its flags (parameters and flags share their names, '_' written '-')."""
    def flag(m: re.Match) -> str:
        name = FLAG_OF.get(m.group(1), m.group(1)).replace("_", "-")
        return f"--{name}" + ("" if m.group(2) else " ")

    return _PARAM.sub(flag, message)


def app() -> None:
    try:
        _typer_app()
    except RunFinished as done:
        Console().print(escape(as_flags(str(done))), highlight=False)
    except OlmoIVError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(as_flags(str(err)))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    app()
