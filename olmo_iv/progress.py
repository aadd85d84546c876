"""The one way the library reports progress: a callback. Progress bars are drawn by the CLI, never here.

    def progress(label: str, advance: int, total: int | None) -> None: ...

`label` names the piece of work (one bar per label), `advance` is how many more units just finished (0 is
allowed: "this work is already done"), `total` is the number of units of that piece (None when unknown).
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, "int | None"], None]
