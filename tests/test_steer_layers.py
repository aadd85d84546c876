"""The layer search (one function for `steer format` and `steer layers`), its NLL measure, and cross-model transfer
(vectors of one model steering another of the same width)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict

import pytest
import torch

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.chat import format_prompt
from olmo_iv.generate import encode
from olmo_iv.interventions.steering import SteeringVectors, compute_vectors, generate_steered, response_nll
from olmo_iv.model import ModelConfig, OLMo2, init_weights
from olmo_iv.runs.steer import (
    FormatRow,
    FormatSettings,
    LayerSearchSettings,
    run_format,
    run_layers,
    search_layer,
    toy_steer_rows,
)


@pytest.fixture(scope="module")
def toy():
    return olmo_iv.load("toy")


def _rows_file(tmp_path, rows: list[FormatRow]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"key": r.key, "prompt": r.prompt, "prompt_without_instruction": r.without,
                                        "instruction_id_list": [r.instruction_id], "kwargs": [r.kwargs]}) + "\n"
                            for r in rows))
    return str(path)


def _small_rows() -> list[FormatRow]:
    rows = [FormatRow(k, f"Adjective: {w}. Answer in lowercase letters.", f"Adjective: {w}.",
                      "change_case:english_lowercase", {}) for k, w in enumerate(("big", "cold", "fast", "hot"))]
    return rows + [FormatRow(10 + k, f"Animal: {w}. Wrap your answer in double quotes.", f"Animal: {w}.",
                             "startend:quotation", {}) for k, w in enumerate(("crow", "bear", "wolf"))]


def test_response_nll_equals_a_per_row_full_forward(toy):
    prompts = [[5, 9, 17, 3], [44, 2, 8, 31, 7, 12, 60], [1], [23, 23]]
    responses = [[4, 4, 4], [100, 7], [], [9, 8, 7, 6, 5]]
    got = response_nll(toy, prompts, responses, batch_size=3, chunk=2)
    for p, r, g in zip(prompts, responses, got, strict=True):
        if not r:
            assert g is None
            continue
        logp = torch.log_softmax(toy(torch.tensor([p + r]))[0].double(), -1)
        want = -float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(r)) / len(r))
        assert g == pytest.approx(want, abs=1e-4)
    with pytest.raises(OlmoIVError, match="one response per prompt"):
        response_nll(toy, prompts, responses[:2])


def test_search_layer_filters_degenerate_layers_and_keeps_no_steering_unless_beaten(toy):
    rows = [FormatRow(k, f"Q{k}. Answer in lowercase letters.", f"Q{k}.", "change_case:english_lowercase", {})
            for k in range(3)]
    vecs = SteeringVectors(torch.randn(6, 96, generator=torch.Generator().manual_seed(0)), torch.ones(6))
    texts = {"none": "The Weather Is Nice Today", "L0": "the cat sat down " * 6,  # lowercase, but a loop
             "L1": "hello there my good friend", "L2": "it is raining in the city today",
             "L3": "The Weather Is Nice Today"}
    calls = []

    def fake(unit, messages, specs):
        calls.append((unit, [s.layer for s in specs]))
        assert messages == [r.without for r in rows]
        return [texts[unit.rsplit("__valid_", 1)[1]]] * len(messages)

    chosen, scores = search_layer(toy, rows, vecs, [0, 1, 2, 3], fake, unit="u", nll=False)
    assert calls == [("u__valid_none", []), ("u__valid_L0", [0]), ("u__valid_L1", [1]), ("u__valid_L2", [2]),
                     ("u__valid_L3", [3])]
    assert [(s.layer, s.loose, s.degenerate, s.low_perplexity, s.kept) for s in scores] == [
        (-1, 0.0, 0.0, None, 0.0), (0, 1.0, 1.0, None, 0.0), (1, 1.0, 0.0, None, 1.0), (2, 1.0, 0.0, None, 1.0),
        (3, 0.0, 0.0, None, 0.0)]
    assert chosen.layer == 1 and chosen.mode == "adjust_rs" and chosen.zbar == 1.0  # the first best layer
    texts["none"] = "the weather is nice today"  # no steering already follows: no layer beats it
    assert search_layer(toy, rows, vecs, [0, 1, 2, 3], fake, unit="u", nll=False)[0] is None


def test_layer_search_run(tmp_path, toy):
    rows = _small_rows()
    s = LayerSearchSettings(model="toy", data=_rows_file(tmp_path, rows), layers=[1, 3], n_valid=2,
                            max_new_tokens=6, batch_size=2)
    summary = run_layers(s, tmp_path / "L")
    with open(tmp_path / "L" / "layers.csv", newline="") as f:
        got = list(csv.DictReader(f))
    by = {r.key: r for r in rows}
    for iid in ("change_case:english_lowercase", "startend:quotation"):
        mine = [r for r in got if r["instruction_id"] == iid]
        assert [int(r["layer"]) for r in mine] == [-1, 1, 3]
        best, chosen = float(mine[0]["loose"]), -1  # the rule, recomputed from the table
        for r in mine[1:]:
            if float(r["kept_loose"]) > best:
                best, chosen = float(r["kept_loose"]), int(r["layer"])
        assert summary["chosen"][iid] == chosen and [int(r["chosen"]) for r in mine].count(1) == 1
        valid = [by[k] for k in summary["validation_keys"][iid]]
        assert len(valid) == 2
        train = [r for r in rows if r.instruction_id == iid and r.key not in summary["validation_keys"][iid]]
        vecs = SteeringVectors.load(tmp_path / "L" / "vectors" / iid.replace(":", "__"))
        want = compute_vectors(toy, [(r.prompt, r.without) for r in train], batch_size=2)
        assert torch.equal(vecs.u, want.u) and torch.equal(vecs.zbar, want.zbar)
        # the steered responses at layer 3, and their NLL under the unsteered model
        ids = [encode(toy.tokenizer, format_prompt(toy, r.without)) for r in valid]
        new = generate_steered(toy, ids, [want.spec(3, mode="adjust_rs")], max_new_tokens=6)
        texts = json.loads((tmp_path / "L" / "units" / f"{iid.replace(':', '__')}__valid_L3" / "texts.json").read_text())
        assert texts == [toy.tokenizer.decode(g) for g in new]
        nll = response_nll(toy, ids, [encode(toy.tokenizer, t) for t in texts])
        nll = [x for x in nll if x is not None]
        assert float(mine[2]["mean_nll"]) == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert (tmp_path / "L" / "layers.png").exists() and summary["overall_layer"] in (-1, 1, 3)


def test_cross_model_vectors_need_the_same_width(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=64)
    narrow = olmo_iv.save(init_weights(OLMo2(cfg), seed=0), tmp_path / "narrow")
    for settings, run in ((FormatSettings(model="toy-steer", vectors_from=str(narrow)), run_format),
                          (LayerSearchSettings(model="toy-steer", vectors_from=str(narrow)), run_layers)):
        with pytest.raises(OlmoIVError, match=r"vectors_from=.* has d_model=32 but model='toy-steer' has "
                                              r"d_model=96: .* same width"):
            run(settings, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_format_with_another_models_vectors(tmp_path):
    """toy-steer's vectors steering toy-steer-base: the layer search's steered responses are the base model's,
    steered with vectors computed by toy-steer on the fold's rows."""
    rows = [r for r in toy_steer_rows(per_type=4) if r.instruction_id in ("change_case:english_capital",
                                                                             "startend:quotation")]
    s = FormatSettings(model="toy-steer-base", vectors_from="toy-steer", data=_rows_file(tmp_path, rows),
                       layers=[1, 3], max_new_tokens=16, nll=False)
    summary = run_format(s, tmp_path / "F")
    assert set(summary["checkpoints"]) == {"toy-steer-base", "toy-steer"} and summary["vectors_from"] == "toy-steer"
    assert summary["overall"]["instruction"]["n"] == len(rows)
    src, base = olmo_iv.load("toy-steer"), olmo_iv.load("toy-steer-base")
    by = {r.key: r for r in rows}
    iid = "change_case:english_capital"
    train = [by[k] for k in summary["folds"][iid][1]]  # fold 0's vectors and validation come from fold 1
    vecs = compute_vectors(src, [(r.prompt, r.without) for r in train])
    ids = [encode(base.tokenizer, format_prompt(base, r.without)) for r in train]
    new = generate_steered(base, ids, [vecs.spec(3, mode="adjust_rs")], max_new_tokens=16)
    texts = json.loads((tmp_path / "F" / "units" / f"{iid.replace(':', '__')}__fold0__valid_L3" / "texts.json")
                       .read_text())
    assert texts == [base.tokenizer.decode(g) for g in new]
    own = compute_vectors(base, [(r.prompt, r.without) for r in train])
    assert not torch.allclose(own.u[3], vecs.u[3])  # the transfer really used the other model's vectors
    assert asdict(s)["vectors_from"] == json.loads((tmp_path / "F" / "run.json").read_text())["settings"]["vectors_from"]


def test_cli_layers(tmp_path):
    from olmo_iv.cli.main import _typer_app as app
    from typer.testing import CliRunner

    data = _rows_file(tmp_path, _small_rows())
    r = CliRunner().invoke(app, ["steer", "layers", "--model", "toy", "--data", data, "--layers", "1,3", "--n-valid",
                                 "2", "--max-new-tokens", "4", "--no-nll", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert "one layer for all instructions" in r.output and summary["settings"]["nll"] is False
    with open(tmp_path / "c" / "layers.csv", newline="") as f:
        assert all(row["mean_nll"] == "" for row in csv.DictReader(f))


def test_repetition_counts_words_of_a_text_and_tokens_of_ids():
    from olmo_iv.runs.steer import repetition

    assert repetition("a b c d a b c d") == pytest.approx(1 / 5)  # 5 word 4-grams, one repeats
    assert repetition("SURESURESURESURESURE") == 0.0  # one word: a text cannot see this loop
    assert repetition([7] * 8) == pytest.approx(4 / 5)  # its tokens can: 5 4-grams, 4 repeat the first
    assert repetition([1, 2, 3]) == 0.0 and repetition("") == 0.0


def test_choose_filtered_is_the_first_best_non_degenerate_candidate_beating_no_steering():
    from olmo_iv.runs.steer import choose_filtered

    # (accuracy, degenerate share); candidate 0 loops more than no steering and keeps 0
    assert choose_filtered((0.1, 0.2), [(0.9, 0.5), (0.6, 0.2), (0.6, 0.0), (0.3, 0.1)]) == (1, [0.0, 0.6, 0.6, 0.3])
    assert choose_filtered((0.6, 0.0), [(0.6, 0.0), (0.9, 0.1)]) == (None, [0.6, 0.0])  # a tie does not beat it
    assert choose_filtered((0.0, 0.0), []) == (None, [])
    # a second criterion (the low-perplexity share) filters on its own; None means not measured
    assert choose_filtered((0.1, 0.2, 0.0), [(0.6, 0.2, 0.5), (0.5, 0.0, 0.0)]) == (1, [0.0, 0.5])
    assert choose_filtered((0.1, 0.2, None), [(0.6, 0.2, 0.5), (0.5, 0.0, None)]) == (0, [0.6, 0.5])


def test_the_perplexity_filter_counts_responses_the_unsteered_model_finds_too_predictable(toy):
    """min_perplexity: a response whose perplexity under the unsteered model is below the threshold counts for the
    second filter; a layer with more such responses than no steering keeps 0 even when its n-grams do not loop."""
    rows = [FormatRow(k, f"Q{k}. Answer in lowercase letters.", f"Q{k}.", "change_case:english_lowercase", {})
            for k in range(3)]
    vecs = SteeringVectors(torch.randn(6, 96, generator=torch.Generator().manual_seed(0)), torch.ones(6))
    prompts = [encode(toy.tokenizer, format_prompt(toy, r.without)) for r in rows]
    # all lowercase but the unsteered text; the toy predicts L1's words far better than the other two
    texts = {"none": "The Weather Is Nice Today", "L1": "cold colder colder", "L2": "it is raining today"}
    nll = {k: response_nll(toy, prompts, [encode(toy.tokenizer, t)] * 3) for k, t in texts.items()}
    cut = (max(nll["L1"]) + min(nll["none"] + nll["L2"])) / 2
    assert max(nll["L1"]) < cut < min(nll["none"] + nll["L2"])

    def fake(unit, messages, specs):
        return [texts[unit.rsplit("__valid_", 1)[1]]] * len(messages)

    chosen, scores = search_layer(toy, rows, vecs, [1, 2], fake, unit="u", min_perplexity=float(torch.tensor(cut).exp()))
    assert [(s.layer, s.loose, s.degenerate, s.low_perplexity, s.kept) for s in scores] == [
        (-1, 0.0, 0.0, 0.0, 0.0), (1, 1.0, 0.0, 1.0, 0.0), (2, 1.0, 0.0, 0.0, 1.0)]
    assert chosen.layer == 2  # L1 follows the instruction but is flagged; without the filter it would win
    assert search_layer(toy, rows, vecs, [1, 2], fake, unit="u", min_perplexity=None)[0].layer == 1
    assert search_layer(toy, rows, vecs, [1, 2], fake, unit="u", min_perplexity=None)[1][1].low_perplexity is None
    assert search_layer(toy, rows, vecs, [1, 2], fake, unit="u", nll=False)[1][1].low_perplexity is None
