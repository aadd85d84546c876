"""The SAEs shipped for the toy models (olmo_iv/saes/): they load, match their model, reconstruct held-out text as
well as their training.json says, resolve_sae is clear, and the recipe and its text sources behave."""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path

import pytest
import tomllib
import torch

import olmo_iv
from olmo_iv.errors import OlmoIVError
from olmo_iv.sae import SAE, spliced
from olmo_iv.sae.builtin import SAES_DIR, builtin_sae, builtin_sae_path, builtin_saes, resolve_sae
from olmo_iv.sae.data import model_fingerprint, read_texts, special_ids, token_windows, window_activations
from olmo_iv.sae.metrics import reconstruction_metrics
from olmo_iv.sae.train import TrainConfig
from olmo_iv.toy import steer as S
from olmo_iv.toy.saes import (
    ENDS_WITH_EOT,
    EXAMPLES,
    MODEL_SOURCES,
    BuiltinSAESettings,
    example_windows,
    train_builtin_saes,
)

LAYERS = {"toy-steer": 4, "toy": 6}
SHIPPED = [(m, layer) for m, n in LAYERS.items() for layer in range(n)]
FVU_BOUND = 0.2
"""Every shipped SAE must explain at least 80% of the held-out variance."""


@functools.cache
def _model(name: str):
    return olmo_iv.load(name).eval()


@functools.cache
def _heldout(name: str, n: int):
    """The recorded held-out windows (same source, split, count and seed as the recipe) and last prompt indices."""
    m = _model(name)
    source = MODEL_SOURCES[name]
    sep = m.config.eos_token_id if ENDS_WITH_EOT[source] else None
    return example_windows(m.tokenizer, list(EXAMPLES[source]("heldout", n, 0)), 128, sep)


def _record(name: str, layer: int) -> dict:
    return json.loads((builtin_sae_path(name, layer) / "training.json").read_text())


def test_every_model_layer_is_shipped_and_nothing_else():
    assert builtin_saes() == sorted((m, f"blocks.{layer}.hook_resid_post") for m, layer in SHIPPED)


def test_shipped_size_and_package_data():
    total = sum(p.stat().st_size for p in SAES_DIR.rglob("*") if p.is_file())
    assert total <= 8 * 2**20, f"{total / 2**20:.2f} MB"
    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["olmo_iv"]
    assert "saes/**/*" in data


@pytest.mark.parametrize("name", list(LAYERS))
def test_shipped_saes_match_their_model_and_record(name):
    model = _model(name)
    fingerprint = model_fingerprint(model)
    for layer in range(LAYERS[name]):
        sae = builtin_sae(name, layer)
        rec = _record(name, layer)
        hook = f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.hook_name == hook and sae.cfg.d_in == model.config.d_model
        assert sae.cfg.architecture == "topk" and sae.cfg.d_sae == rec["d_sae"] and sae.cfg.k == rec["k"]
        assert sae.cfg.model_name == name
        # the model the SAE was trained on is the checkpoint shipped now
        assert rec["model_fingerprint"] == fingerprint == sae.cfg.metadata["model_fingerprint"]
        for key in ("settings", "seed", "tokens_seen", "heldout", "call", "command", "date", "train_seconds"):
            assert key in rec
        assert rec["tokens_seen"] == rec["settings"]["train"]["steps"] * rec["settings"]["train"]["batch_size"]


@pytest.mark.parametrize("name", list(LAYERS))
def test_heldout_fvu_is_as_recorded(name):
    model = _model(name)
    n_docs = _record(name, 0)["settings"]["eval_docs"]
    windows, last = _heldout(name, n_docs)
    exclude = special_ids(model.tokenizer, model.config)
    for layer in range(LAYERS[name]):
        sae = builtin_sae(name, layer)
        rec = _record(name, layer)["heldout"]
        acts = window_activations(model, windows, sae.cfg.hook_name, exclude=exclude, batch_size=64)
        m = reconstruction_metrics(sae, acts)
        assert m["tokens"] == rec["tokens"]
        assert m["fvu"] <= rec["fvu"] + 1e-3 and m["fvu"] < FVU_BOUND, (layer, m, rec["fvu"])
        assert m["l0"] == pytest.approx(rec["l0"], abs=1e-6)
        assert m["dead_fraction"] == pytest.approx(rec["dead_fraction"], abs=2e-3)


def test_error_term_splice_changes_nothing():
    model = _model("toy-steer")
    windows, _ = _heldout("toy-steer", 400)
    ids = torch.tensor([w for w in windows if len(w) == len(windows[0])][:4])
    clean = model(ids)
    for layer in range(LAYERS["toy-steer"]):
        sae = builtin_sae("toy-steer", layer)
        with spliced(model, sae, use_error_term=True):
            same = model(ids)
        with spliced(model, sae):
            recon = model(ids)
        torch.testing.assert_close(same, clean, atol=1e-4, rtol=0)
        assert (recon - clean).abs().max() > 1e-3  # the splice itself is live


def test_resolve_sae(tmp_path):
    ref = builtin_sae("toy-steer", 2)
    for spec in (None, "builtin"):
        got = resolve_sae(spec, "toy-steer", 2)
        assert got.cfg.hook_name == "blocks.2.hook_resid_post" and torch.equal(got.W_dec, ref.W_dec)
    with pytest.raises(OlmoIVError, match=r"model='toy-base'.*shipped: toy: blocks\.0\.hook_resid_post"):
        resolve_sae(None, "toy-base", 0)
    with pytest.raises(OlmoIVError, match=r"layer=4 \(blocks\.4\.hook_resid_post\).*toy-steer: blocks\.0\."):
        resolve_sae("builtin", "toy-steer", 4)
    with pytest.raises(OlmoIVError, match="sae='/nonexistent/sae' is neither 'builtin' nor"):
        resolve_sae("/nonexistent/sae", "toy-steer", 2)
    local = tmp_path / "mine"
    shutil.copytree(builtin_sae_path("toy-steer", 2), local)
    assert torch.equal(resolve_sae(local, "toy-steer", 2).W_enc, ref.W_enc)
    assert torch.equal(resolve_sae(str(local), "toy-steer", 2).W_enc, ref.W_enc)
    with pytest.raises(OlmoIVError, match=r"reads 'blocks\.2\.hook_resid_post', not layer=3"):
        resolve_sae(local, "toy-steer", 3)
    # a file with no hook name takes the requested layer's resid_post
    cfg = json.loads((local / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = None
    (local / "cfg.json").write_text(json.dumps(cfg))
    assert resolve_sae(local, "toy-steer", 1).cfg.hook_name == "blocks.1.hook_resid_post"


def test_steer_source_is_the_training_encoding():
    """The "toy-steer" source tokenizes exactly as toy-steer's training examples (prompt + response + EOT) and
    covers both placements, every language and the no-instruction case."""
    model = _model("toy-steer")
    windows = token_windows(read_texts("toy-steer:train:300"), model.tokenizer, 128,
                            separator=model.config.eos_token_id, pack=False)
    cfg = S.SteerConfig()
    split = S.split_phrasings(cfg)
    rng = random.Random("0/sae-text/train")
    seen = set()
    for w in windows:
        ex = S.make_example(rng, cfg, split.train, heldout_content=False)
        assert w == S.encode_example(model.tokenizer, ex)[0]
        seen.add((ex.lang, ex.placement))
    assert seen == {(None, None)} | {(lang, p) for lang in ("en", "fr", "de", "es") for p in ("pre", "post")}


def test_heldout_sources_use_heldout_text_only():
    cfg = S.SteerConfig()
    split = S.split_phrasings(cfg)
    trained = {S.fill(p, kw) for ph in split.train.values() for p in ph for kw in S.D.KEYWORDS}
    held = {S.fill(p, kw) for ph in split.heldout.values() for p in ph for kw in S.D.KEYWORDS}
    n_instructed = 0
    for prompt, _ in EXAMPLES["toy-steer"]("heldout", 60, 0):
        message = prompt.split("\n")[1]
        assert not any(t in message for t in trained)
        n_instructed += any(h in message for h in held)
    assert n_instructed >= 40  # 85% carry an instruction
    from olmo_iv.toy.train import EOT, load_data

    data = load_data(0, 40)
    train_instr = {i for t in data.tasks.values() for i in t.train_instructions}
    held_instr = {i for t in data.tasks.values() for i in t.heldout_instructions}
    for prompt, _ in EXAMPLES["toy-tasks"]("heldout", 60, 0):
        p = prompt.removeprefix(EOT)
        assert any(p.startswith(h + " ") or p.startswith(h + EOT) for h in held_instr)
        assert not any(p.startswith(i + " ") or p.startswith(i + EOT) for i in train_instr)


@pytest.mark.parametrize("name", list(LAYERS))
def test_last_prompt_token_is_trained_on(name):
    """SAIF reads codes at the last prompt token (toy-steer: the newline after <|assistant|>; toy: the colon of
    "Answer:"): it is not a special token, so the trainer keeps it; only <|endoftext|> and <|pad|> are left out."""
    model = _model(name)
    tok = model.tokenizer
    windows, last = _heldout(name, 40)
    exclude = special_ids(tok, model.config)
    assert set(exclude) == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")}
    last_ids = {w[i] for w, i in zip(windows, last)}
    expected = "Ċ" if name == "toy-steer" else ":"
    assert {tok.id_to_token(i) for i in last_ids} == {expected} and not last_ids & set(exclude)
    if name == "toy-steer":
        assert all(tok.id_to_token(w[i - 1]) == "<|assistant|>" for w, i in zip(windows, last))
    acts = window_activations(model, windows, "blocks.0.hook_resid_post", exclude=exclude)
    assert acts.shape[0] == sum(t not in exclude for w in windows for t in w)


def test_token_windows_unpacked():
    class Tok:
        def encode(self, text):
            return [int(x) for x in text.split()]

    docs = ["5 6 7", "8", "1 2 3 4 5 6"]
    assert token_windows(docs, Tok(), 4, separator=0, pack=False) == [[5, 6, 7, 0], [8, 0], [1, 2, 3, 4]]
    assert token_windows(docs, Tok(), 4, pack=False) == [[5, 6, 7], [1, 2, 3, 4]]
    assert token_windows(docs, Tok(), 4, separator=0, pack=False, max_windows=1) == [[5, 6, 7, 0]]


def test_recipe_is_deterministic(tmp_path):
    settings = BuiltinSAESettings(train_docs=40, eval_docs=8,
                                  train=TrainConfig(k=8, d_sae=64, batch_size=128, steps=6, log_every=3))
    recs = [train_builtin_saes("toy", tmp_path / run, layers=[1], settings=settings)[0] for run in ("a", "b")]
    files = [tmp_path / run / "toy" / "blocks.1.hook_resid_post" for run in ("a", "b")]
    assert (files[0] / "sae_weights.safetensors").read_bytes() == (files[1] / "sae_weights.safetensors").read_bytes()
    for r in recs:
        r.pop("date"), r.pop("train_seconds"), r.pop("call"), r.pop("command")
    assert recs[0] == recs[1]
    sae = SAE.load(files[0])
    assert sae.cfg.d_sae == 64 and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert json.loads((files[0] / "training.json").read_text())["tokens_seen"] == 6 * 128
    with pytest.raises(OlmoIVError, match="model='toy-base' has no built-in SAE recipe"):
        train_builtin_saes("toy-base", tmp_path / "c")
    with pytest.raises(OlmoIVError, match=r"layers=\[6\] must be"):
        train_builtin_saes("toy", tmp_path / "c", layers=[6])


def test_cli_command_is_registered():
    from olmo_iv.cli.main import _typer_app
    from typer.testing import CliRunner

    result = CliRunner().invoke(_typer_app, ["train-toy-saes", "--help"])
    assert result.exit_code == 0 and "SAELens format" in result.output


def test_spliced_metrics_score_from_matches_a_direct_computation():
    """score_from scores only the predictions from each window's given position on (here: the response)."""
    import torch.nn.functional as F

    from olmo_iv.sae.metrics import spliced_metrics

    model = _model("toy-steer")
    sae = builtin_sae("toy-steer", 1)
    windows, last = _heldout("toy-steer", 400)
    windows, last = windows[:5], last[:5]
    exclude = special_ids(model.tokenizer, model.config)
    got = spliced_metrics(model, sae, windows, exclude=exclude, batch_size=2, score_from=last)
    nll = {"clean": [], "sae": []}
    for w, start in zip(windows, last):
        ids = torch.tensor([w])
        keep = ~torch.isin(ids, torch.tensor(exclude))
        with torch.no_grad():
            clean = model(ids)
            with spliced(model, sae, mask=keep):
                recon = model(ids)
        for key, logits in (("clean", clean), ("sae", recon)):
            lp = F.log_softmax(logits[0, start:-1].float(), -1)
            nll[key] += (-lp.gather(-1, ids[0, start + 1:, None])[:, 0]).tolist()
    assert got["tokens"] == len(nll["clean"]) == sum(len(w) - 1 - s for w, s in zip(windows, last))
    assert got["ce_clean"] == pytest.approx(sum(nll["clean"]) / len(nll["clean"]), rel=1e-5)
    assert got["ce_sae"] == pytest.approx(sum(nll["sae"]) / len(nll["sae"]), rel=1e-5)
    full = spliced_metrics(model, sae, windows, exclude=exclude, batch_size=2)
    assert full["tokens"] == sum(len(w) - 1 for w in windows) and full["ce_clean"] != pytest.approx(got["ce_clean"])
    with pytest.raises(OlmoIVError, match="score_from has 2 entries for 5 windows"):
        spliced_metrics(model, sae, windows, score_from=last[:2])
