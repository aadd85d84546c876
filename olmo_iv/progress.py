"""The one way the library reports progress: a callback. Progress bars are drawn by the CLI, never here.

    def progress(label: str, advance: int, total: int | None, info: dict | None = None) -> None: ...

`label` names the piece of work (one bar per label), `advance` is how many more units just finished (0 is
allowed: "this work is already done"), `total` is the number of units of that piece (None when unknown), and
`info` optional running figures to show beside the bar (an SAE's FVU, L0 and dead fraction).
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, label: str, advance: int, total: int | None, info: dict | None = None, /) -> None: ...
