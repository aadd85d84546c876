"""Stolfo's composition of format and length steering (`olmo-iv steer compose`): its prompts, its vectors and its
hooks are the ones the format and length experiments use, acting together."""

from __future__ import annotations

import csv

import pytest
import torch

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.chat import format_prompt
from olmo_iv.generate import encode
from olmo_iv.interventions.steering import SteeringVectors, compute_vectors, generate_steered
from olmo_iv.runs.steer import (
    COMPOSE_CONDITIONS,
    ComposeSettings,
    FormatSettings,
    at_most,
    length_pairs,
    length_queries,
    run_compose,
    run_format,
)
from tests.test_steer_layers import _rows_file, _small_rows


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def toy():
    return olmo_iv.load("toy")


SMALL = dict(model="toy", layers=[1, 3], max_new_tokens=6, batch_size=4, n_pairs=4, nll=False, length_layer=2)


def test_every_condition_is_the_format_and_length_hooks_it_names(tmp_path, toy):
    rows = _small_rows()
    s = ComposeSettings(data=_rows_file(tmp_path, rows), **SMALL)
    summary = run_compose(s, tmp_path / "C")
    got = _csv(tmp_path / "C" / "results.csv")
    assert len(got) == len(rows) * len(COMPOSE_CONDITIONS) == 8 * 7
    assert list(summary["overall"]) == list(COMPOSE_CONDITIONS)
    n_of = {int(k): n for k, n in summary["max_sentences_of"].items()}
    assert set(n_of) == {r.key for r in rows} and all(1 <= n <= 5 for n in n_of.values())
    # the length vector: the length experiment's level-0 pairs over the first n_pairs queries, added at length_layer
    length = SteeringVectors.load(tmp_path / "C" / "vectors" / "length")
    want = compute_vectors(toy, length_pairs(length_queries()[:4], 0, 0), batch_size=4)
    assert torch.equal(length.u, want.u)
    length_spec = want.spec(2, mode="add", coef=20.0)
    by_key = {r.key: r for r in rows}
    layers = set(summary["format_layers"].values())
    assert None in layers and len(layers) > 1  # both kinds of fold: one steered by its format vector, one not
    for iid, folds in summary["folds"].items():
        for f, keys in enumerate(folds):
            test = [by_key[k] for k in keys]
            train = [r for r in rows if r.instruction_id == iid and r.key not in keys]
            layer = summary["format_layers"][f"{iid}/fold{f}"]
            fmt = [] if layer is None else [compute_vectors(toy, [(r.prompt, r.without) for r in train],
                                                            batch_size=4).spec(layer, mode="adjust_rs")]
            for cond in COMPOSE_CONDITIONS:
                base = [r.prompt if cond.startswith("instruction") else r.without for r in test]
                ids = [encode(toy.tokenizer, format_prompt(toy, f"{t} {at_most(n_of[r.key])}"))
                       for t, r in zip(base, test, strict=True)]
                specs = (fmt if "+format" in cond else []) + ([length_spec] if cond.endswith("+length") else [])
                new = generate_steered(toy, ids, specs, max_new_tokens=6, batch_size=4)
                mine = {int(r["key"]): r for r in got if r["condition"] == cond and r["instruction_id"] == iid}
                assert [mine[r.key]["response"] for r in test] == [toy.tokenizer.decode(g) for g in new], cond
                for r in test:
                    m = mine[r.key]
                    assert int(m["max_sentences"]) == n_of[r.key]
                    assert int(m["both"]) == int(m["format_loose"]) * int(m["length"])
                    assert int(m["format_layer"]) == (-1 if layer is None else layer)
    for c, e in summary["overall"].items():
        sel = [r for r in got if r["condition"] == c]
        assert e["n"] == len(sel) and e["length"] == pytest.approx(sum(int(r["length"]) for r in sel) / len(sel))
    assert (tmp_path / "C" / "compose.png").stat().st_size > 0 and (tmp_path / "C" / "compose.pdf").exists()


def test_without_the_length_instruction_the_format_conditions_are_the_format_experiments(tmp_path):
    """With no length instruction and no length vector, composition's four format conditions are the format
    experiment's, response for response (the same folds, vectors and layer search)."""
    data = _rows_file(tmp_path, _small_rows())
    compose = run_compose(ComposeSettings(data=data, length_instruction=False, **SMALL), tmp_path / "C")
    fmt = run_format(FormatSettings(data=data, **{k: v for k, v in SMALL.items()
                                                  if k not in ("n_pairs", "length_layer")}), tmp_path / "F")
    assert compose["folds"] == fmt["folds"]
    a, b = _csv(tmp_path / "C" / "results.csv"), _csv(tmp_path / "F" / "results.csv")
    for mine, theirs in (("no_instruction", "no_instruction"), ("no_instruction+format", "no_instruction+steer"),
                         ("instruction", "instruction"), ("instruction+format", "instruction+steer")):
        x = {r["key"]: (r["response"], r["format_strict"], r["format_loose"]) for r in a if r["condition"] == mine}
        y = {r["key"]: (r["response"], r["strict"], r["loose"]) for r in b if r["condition"] == theirs}
        assert x == y, mine
    # and the layers chosen are the format experiment's
    assert _csv(tmp_path / "C" / "layers.csv") == _csv(tmp_path / "F" / "layers.csv")


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(OlmoIVError, match="length_level=5"):
        ComposeSettings(length_level=5)
    with pytest.raises(OlmoIVError, match="length_coef="):
        ComposeSettings(length_coef=float("nan"))
    with pytest.raises(OlmoIVError, match="max_sentences=0"):
        ComposeSettings(max_sentences=0)
    with pytest.raises(OlmoIVError, match="length_layer=9"):
        run_compose(ComposeSettings(model="toy", length_layer=9, data=_rows_file(tmp_path, _small_rows())), tmp_path / "x")
    assert not (tmp_path / "x").exists()
