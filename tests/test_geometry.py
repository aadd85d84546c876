"""Instruction-vector geometry: batched extraction == one-at-a-time, probe and LDA honesty, the probe command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from olmo_iv.analysis.probes import (
    ProbeConfig,
    instruction_vectors,
    last_token_resid,
    lda_projection,
    probe_layers,
    proportion_ci,
    split,
)
from olmo_iv.errors import OlmoIVError

TOY = Path(__file__).parents[1] / "olmo_iv" / "models"
CONTRASTIVE = ["adj_comp", "adj_ant", "anim_color", "can_fly"]


def byte_tokenizer(bos: bool = False):
    """Byte-level BPE without merges: every text maps to its UTF-8 bytes, ids < 256 (fits a 300-token model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))} | {"<s>": 256}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return tok


def test_batched_extraction_equals_one_at_a_time(tiny_model):
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 7, 3, 12, 5, 5, 9, 2, 11, 4]
    ids = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in lengths]
    got = last_token_resid(tiny_model, ids, batch_size=4)
    L = tiny_model.config.n_layers
    assert got.shape == (len(ids), L, tiny_model.config.d_model) and got.dtype == torch.float32
    for i, seq in enumerate(ids):  # the straightforward way: one full forward per instruction, cache every layer
        names = [f"blocks.{layer}.hook_resid_post" for layer in range(L)]
        _, cache = tiny_model.run_with_cache(torch.tensor([seq]), names=names)
        want = torch.stack([cache[name][0, -1] for name in names])
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
    # a subset of layers (the forward stops after the deepest one) and batch sizes agree
    torch.testing.assert_close(last_token_resid(tiny_model, ids, layers=[1], batch_size=3)[:, 0], got[:, 1])
    torch.testing.assert_close(last_token_resid(tiny_model, ids, batch_size=len(ids)), got, atol=1e-5, rtol=0)
    with pytest.raises(OlmoIVError, match=r"layers=\[3\]: this model has layers 0..2"):
        last_token_resid(tiny_model, ids, layers=[L])
    with pytest.raises(OlmoIVError, match="no tokens"):
        last_token_resid(tiny_model, [[1, 2], []])


def test_instruction_vectors_add_no_special_tokens(tiny_model):
    tok = byte_tokenizer(bos=True)  # a post-processor that would add a BOS: the reference runs have none
    texts = ["Given an adjective, state its antonym.", "Name the colour."]
    got = instruction_vectors(tiny_model, texts, tokenizer=tok)
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert [len(i) for i in ids] == [len(t.encode()) for t in texts] and 256 not in sum(ids, [])
    assert tok.encode(texts[0]).ids[0] == 256  # with specials, a BOS would come first
    torch.testing.assert_close(got, last_token_resid(tiny_model, ids))
    with pytest.raises(OlmoIVError, match="no tokenizer"):
        instruction_vectors(tiny_model, texts)


def planted(seed: int = 0, n: int = 50, d: int = 12):
    """4 classes x n points, 3 layers: pure noise, well separated, and weakly separated."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array(["a", "b", "c", "d"]), n)
    centres = rng.normal(0, 1, (4, d))
    cls = np.repeat(np.arange(4), n)
    X = np.stack([rng.normal(0, 1, (4 * n, d)), 10 * centres[cls] + rng.normal(0, 1, (4 * n, d)),
                  0.6 * centres[cls] + rng.normal(0, 1, (4 * n, d))], axis=1)
    return X.astype(np.float32), labels


def test_probe_accuracy_and_interval_on_planted_clusters():
    X, labels = planted()
    cfg = ProbeConfig(seed=3)
    res = probe_layers(X, labels, cfg)
    assert [r.layer for r in res] == [0, 1, 2]
    assert all(r.n_test == 40 and r.chance == 0.25 and r.converged for r in res)
    assert res[1].accuracy == 1.0 and res[1].ci_lo > 0.9
    assert res[0].ci_lo < 0.25 + 0.1 and res[0].accuracy < 0.5  # noise layer: near chance
    assert res[0].accuracy < res[2].accuracy < res[1].accuracy
    for r in res:  # Wilson interval, by its closed form
        p, n, z = r.accuracy, r.n_test, 1.959963984540054
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert (r.ci_lo, r.ci_hi) == pytest.approx((centre - half, centre + half), abs=1e-9)
        assert r.n_correct == round(r.accuracy * r.n_test)
    # unstandardised (the authors' setting) gives the same verdict on the separated layer
    assert probe_layers(X, labels, ProbeConfig(seed=3, standardize=False), layers=[1])[0].accuracy == 1.0


def test_split_is_seeded_and_stratified():
    _, labels = planted()
    train, test = split(labels, ProbeConfig(seed=1))
    train2, test2 = split(labels, ProbeConfig(seed=1))
    assert np.array_equal(test, test2) and np.array_equal(train, train2)
    assert not np.array_equal(np.sort(test), np.sort(split(labels, ProbeConfig(seed=2))[1]))
    assert sorted(set(train) | set(test)) == list(range(len(labels))) and not set(train) & set(test)
    _, counts = np.unique(labels[test], return_counts=True)
    assert counts.tolist() == [10, 10, 10, 10]
    with pytest.raises(OlmoIVError, match="two tasks"):
        split(np.array(["a"] * 10), ProbeConfig())
    assert proportion_ci(0, 10)[0] == 0.0 and proportion_ci(10, 10)[1] == 1.0


def test_lda_is_fitted_on_the_training_split_only():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X, labels = planted()
    X = X[:, 2]
    train, test = split(labels, ProbeConfig(seed=0))
    res = lda_projection(X, labels, train, test)
    assert res.coords.shape == (len(X), 3) and res.is_test.sum() == len(test)
    ref = LinearDiscriminantAnalysis(solver="svd").fit(X[train], labels[train])
    np.testing.assert_allclose(res.coords, ref.transform(X), atol=1e-6)
    moved = X.copy()
    moved[test] += 100.0  # held-out points cannot move the fit
    res2 = lda_projection(moved, labels, train, test)
    np.testing.assert_allclose(res2.coords[train], res.coords[train], atol=1e-6)
    np.testing.assert_allclose(res2.explained_variance_ratio, res.explained_variance_ratio)
    assert 0.25 < res.test_accuracy <= 1.0


def _invoke_probe(args: list[str]):
    import typer
    from olmo_iv.cli.probe import probe_command
    from typer.testing import CliRunner

    app = typer.Typer()
    app.callback()(lambda: None)  # a group: Typer would otherwise collapse a one-command app
    app.command("probe")(probe_command)
    return CliRunner().invoke(app, ["probe", *args], catch_exceptions=False)


def test_probe_command_on_a_tiny_checkpoint(tmp_path, tiny_model):
    import olmo_iv

    tiny_model.tokenizer = byte_tokenizer()
    folder = olmo_iv.save(tiny_model, tmp_path / "tiny")
    tiny_model.tokenizer = None
    out = tmp_path / "out"
    res = _invoke_probe(["--model", str(folder), "--task", "adj_comp", "--task", "can_fly", "--task", "snarks",
                         "--layer", "1", "--seed", "4", "--out", str(out), "--save-vectors"])
    assert res.exit_code == 0, res.output
    with open(out / "probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2] and {r["model"] for r in rows} == {str(folder)}
    assert all(0 <= float(r["ci_lo"]) <= float(r["accuracy"]) <= float(r["ci_hi"]) <= 1 for r in rows)
    assert all(int(r["n_test"]) == 120 for r in rows)
    with open(out / "lda.csv") as f:
        lda = list(csv.DictReader(f))
    assert len(lda) == 600 and sum(r["split"] == "test" for r in lda) == 120 and {r["layer"] for r in lda} == {"1"}
    meta = json.loads((out / "probe.json").read_text())
    assert meta["settings"]["probe"]["seed"] == 4 and meta["settings"]["tasks"] == [
        "adjectives/adj_comp", "animals/can_fly", "bigbench/snarks"] and "torch" in meta["versions"]
    assert (out / "probe.png").stat().st_size > 0 and (out / "lda.png").stat().st_size > 0
    vec = np.load(out / "vectors_tiny.npz")
    assert vec["X"].shape == (600, 3, 64)
    with pytest.raises(OlmoIVError, match="outside"):
        _invoke_probe(["--model", str(folder), "--task", "adj_comp", "--task", "can_fly", "--layer", "3",
                       "--out", str(tmp_path / "out3")])


@pytest.mark.skipif(not (TOY / "toy" / "config.json").exists() or not (TOY / "toy-base" / "config.json").exists(),
                    reason="the shipped toy models are not built yet (olmo_iv/models/toy, toy-base)")
def test_probe_separates_contrastive_tasks_on_the_toy_beside_its_control(tmp_path):
    out = tmp_path / "probe"
    args = ["--model", "toy", "--model", "toy-base", *sum((["--task", t] for t in CONTRASTIVE), []),
            "--out", str(out)]
    res = _invoke_probe(args)
    assert res.exit_code == 0, res.output
    with open(out / "probe.csv") as f:
        rows = list(csv.DictReader(f))
    by_model = {m: [r for r in rows if r["model"] == m] for m in ("toy", "toy-base")}
    assert all(by_model.values())  # the control is reported beside the instruction-following model
    best = max(by_model["toy"], key=lambda r: float(r["accuracy"]))
    assert float(best["accuracy"]) >= 0.95 and float(best["ci_lo"]) > float(best["chance"]) == 0.25
