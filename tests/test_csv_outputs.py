"""Every CSV any command writes reads back: numeric columns parse as numbers (no numpy reprs such as
`np.float64(1.5)`, no tensors), and every row has the header's width."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

RUNS = [
    ["patch", "--samples", "3", "--out", "{d}/patch"],
    ["patch", "--samples", "3", "--layers", "3", "--task", "animals/can_fly", "--out", "{d}/patch3"],
    ["stats", "{d}/patch", "--n-boot", "50"],
    ["stats", "{d}/patch", "--n-boot", "50", "--task", "animals/can_fly"],
    ["paths", "--samples", "2", "--out", "{d}/paths"],
    ["eval", "--samples", "3", "--out", "{d}/eval"],
    ["probe", "--task", "adj_comp", "--task", "can_fly", "--task", "anim_color", "--out", "{d}/probe"],
]
TEXT_COLUMNS = {"model", "task", "mode", "query", "answer", "layers", "target_pos", "token", "prompt", "gold",
                "generation", "answer_reference", "answer_faithful", "split", "metric", "ia_source", "select_metric",
                "test_metric", "in_options", "judge", "em_reference", "em_faithful", "significant", "converged"}


def _number(text: str) -> bool:
    try:
        return not math.isnan(float(text)) or text.lower() == "nan"
    except ValueError:
        return False


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from olmo_iv.cli import main

    d = tmp_path_factory.mktemp("csv")
    for args in RUNS:
        argv = ["olmo-iv", *[a.replace("{d}", str(d)) for a in args]]
        old = sys.argv
        sys.argv = argv
        try:
            main.app()
        except SystemExit as ex:
            assert ex.code in (0, None), argv
        finally:
            sys.argv = old
    return d


def test_every_csv_parses(outputs):
    files = sorted(Path(outputs).rglob("*.csv"))
    names = {f.name for f in files}
    assert {"patching.csv", "paths_per_token.csv", "head_activity.csv", "summary.csv", "probe.csv", "lda.csv",
            "stats_reference.csv", "stats_sound_logit_diff.csv"} <= names
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        header, body = rows[0], rows[1:]
        assert body, f
        for row in body:
            assert len(row) == len(header), (f, row)
            assert not any("np." in cell or "tensor(" in cell for cell in row), (f, row)
        for k, col in enumerate(header):
            if col in TEXT_COLUMNS:
                continue
            cells = [r[k] for r in body if r[k] != ""]
            if cells and sum(_number(c) for c in cells) >= len(cells) / 2:  # a numeric column: all of it
                bad = [c for c in cells if not _number(c)]
                assert not bad, (f.name, col, bad[:3])
