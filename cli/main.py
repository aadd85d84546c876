"""Entry point of the `olmo-iv` command: a thin layer over the library.

Each command lives in its own module and registers itself on `cli.app.app`; importing them here is all
that wires them up. Library errors (`OlmoIVError`) are printed as one clear message, never a traceback.
"""

import importlib
import sys

from rich.console import Console

from cli.app import app as _typer_app
from olmo_iv.errors import OlmoIVError

COMMAND_MODULES: tuple[str, ...] = (
    # one line per command module; each registers its command(s) on cli.app.app
    "cli.tasks",
    "cli.stats",
    "cli.probe",
    "cli.patch",
    "cli.eval",
    "cli.train_toy",
    "cli.paths",
    "cli.sae",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def app() -> None:
    try:
        _typer_app()
    except OlmoIVError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    app()
