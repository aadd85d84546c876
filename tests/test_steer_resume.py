"""Steering experiments (`steer format`, `keywords`, `length`, `layers`, `compose`) killed with SIGKILL after some units are done, then
run again with the same settings: the outputs equal an uninterrupted run's, no finished unit is computed again
and none is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from olmo_iv.runs import steer as S
from tests.killing import done_markers, kill_after, payloads

# The library entry points (what the `olmo-iv steer` commands call), in a subprocess that can be SIGKILLed; not the
# CLI itself, whose imports cost seconds per start on a shared machine.
DRIVER = """
import json, sys
from olmo_iv.runs import steer as S
kind, out, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
settings, run = {"format": (S.FormatSettings, S.run_format), "keywords": (S.KeywordSettings, S.run_keywords),
                 "length": (S.LengthSettings, S.run_length), "layers": (S.LayerSearchSettings, S.run_layers),
                 "compose": (S.ComposeSettings, S.run_compose)}[kind]
run(settings(**kw), out)
"""
RUNS = {"format": (S.FormatSettings, S.run_format), "keywords": (S.KeywordSettings, S.run_keywords),
        "length": (S.LengthSettings, S.run_length), "layers": (S.LayerSearchSettings, S.run_layers),
        "compose": (S.ComposeSettings, S.run_compose)}


def _format_rows(tmp_path: Path) -> str:
    rows = [{"key": k, "prompt": f"Adjective: {w}. Answer in lowercase letters.", "prompt_without_instruction":
             f"Adjective: {w}.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
            for k, w in enumerate(("big", "cold", "fast", "hot"))]
    rows += [{"key": 10 + k, "prompt": f"Animal: {w}. Wrap your answer in double quotes.",
              "prompt_without_instruction": f"Animal: {w}.", "instruction_id_list": ["startend:quotation"],
              "kwargs": [{}]} for k, w in enumerate(("crow", "bear", "wolf"))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind, kw, outputs", [
    ("format", dict(model="toy", layers=[1, 3], max_new_tokens=6, batch_size=2),
     ["results.csv", "layers.csv", "summary.json"]),
    ("keywords", dict(model="toy", task="include", limit=6, n_pairs=2, max_new_tokens=4, coef=5.0),
     ["results.csv", "summary.json"]),
    ("length", dict(model="toy", n_pairs=3, n_test=2, max_sentences=2, levels=[0, 3], max_new_tokens=6, coef=5.0),
     ["results.csv", "summary.json"]),
    ("layers", dict(model="toy", layers=[0, 1, 3], n_valid=2, max_new_tokens=6, batch_size=2),
     ["layers.csv", "summary.json"]),
    ("compose", dict(model="toy", layers=[1, 3], max_new_tokens=6, batch_size=2, n_pairs=3, nll=False),
     ["results.csv", "layers.csv", "summary.json"]),
], ids=["format", "keywords", "length", "layers", "compose"])
def test_a_killed_run_continues_to_the_uninterrupted_result(tmp_path, kind, kw, outputs):
    if kind in ("format", "layers", "compose"):
        kw = {**kw, "data": _format_rows(tmp_path)}
    settings_cls, run = RUNS[kind]
    run(settings_cls(**kw), tmp_path / "whole")
    whole = tmp_path / "whole"

    killed = tmp_path / "killed"
    kill_after(DRIVER, [kind, str(killed), json.dumps(kw)], killed, units=2)
    before = done_markers(killed)
    total = len(done_markers(whole))
    assert 2 <= len(before) < total and not (killed / "summary.json").exists()

    run(settings_cls(**kw), killed)  # the same settings continue where the run stopped
    after = done_markers(killed)
    assert set(after) == set(done_markers(whole))  # no unit lost
    assert {u: after[u] for u in before} == before  # no finished unit computed again
    assert payloads(killed) == payloads(whole)
    for name in outputs:
        assert (killed / name).read_text() == (whole / name).read_text(), name
