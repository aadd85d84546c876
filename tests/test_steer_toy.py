"""The shipped `toy-steer` model follows held-out phrasings of its instructions (judged by the IFEval checkers)
and gives its default response without one; the recipe's pieces (phrasings, held-out split, targets, chat
template) hold; training is deterministic and resumable (tiny settings)."""

from __future__ import annotations

import json
import random

import jinja2
import pytest
import torch

import olmo_iv
from olmo_iv.evals.ifeval import INSTRUCTIONS
from olmo_iv.loading import BUILTIN
from olmo_iv.toy import steer as S
from olmo_iv.toy import steer_data as D

torch.set_num_threads(1)

TINY = dict(n_layers=1, d_model=32, n_heads=2, d_mlp=64, steps=4, batch_size=4, warmup=2, vocab_size=400,
            tokenizer_examples=100, ckpt_every=0)


def _render(template: str, messages: list[dict], **extra) -> str:
    env = jinja2.Environment(keep_trailing_newline=True)
    return env.from_string(template).render(messages=messages, bos_token=S.EOT, eos_token=S.EOT, **extra)


@pytest.fixture(scope="module")
def steer():
    return olmo_iv.load("toy-steer")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((BUILTIN["toy-steer"] / "training.json").read_text())


# ---------------------------------------------------------------------------------------------------- recipe pieces


def test_chat_prompt_is_the_template_rendered():
    for msg in ["Write a short poem about the river for Anna.", 'Ende exakt mit "x". Schreib alles klein.']:
        want = _render(S.CHAT_TEMPLATE, [{"role": "user", "content": msg}], add_generation_prompt=True)
        assert S.chat_prompt(msg) == want
        assert want == f"<|endoftext|><|user|>\n{msg}\n<|assistant|>\n"
    # a finished exchange ends with EOS, as training text does
    full = _render(S.CHAT_TEMPLATE, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}])
    assert full == S.chat_prompt("Hi.") + "Yo." + S.EOT


def test_phrasings_per_type_and_language():
    for itype in D.TYPES:
        assert itype in INSTRUCTIONS
        for lang in D.LANGUAGES:
            ph = S.phrasings(itype, lang)
            assert len(ph) >= 20 and len(set(ph)) == len(ph)
            if itype == "keywords:existence":
                assert all("{kw}" in p for p in ph)
            if itype == "startend:end_checker":
                assert all("{end}" in p for p in ph)
    assert len(D.TYPES) >= 6


def test_heldout_split_is_seeded_and_disjoint():
    cfg = S.SteerConfig()
    a, b, c = S.split_phrasings(cfg), S.split_phrasings(cfg), S.split_phrasings(S.SteerConfig(seed=1))
    assert a.heldout == b.heldout and a.heldout != c.heldout
    for key, held in a.heldout.items():
        assert len(held) == cfg.holdout and not set(held) & set(a.train[key])
        assert sorted(held + a.train[key]) == sorted(S.phrasings(*key))


def test_training_never_sees_heldout_contents_or_phrasings():
    cfg = S.SteerConfig()
    split = S.split_phrasings(cfg)
    rng = random.Random(0)
    held = {S.fill(p, kw) for v in split.heldout.values() for p in v for kw in D.KEYWORDS}
    for _ in range(300):
        ex = S.make_example(rng, cfg, split.train, heldout_content=False)
        assert not any(h in ex.prompt for h in held)
    contents = [S.sample_content(rng, cfg, heldout=False) for _ in range(300)]
    assert not any(S.is_heldout(c, cfg) for c in contents)
    evals = S.eval_examples(S.SteerConfig(eval_per_cell=2), split)
    for e in evals:
        if e.itype is not None:
            assert any(h in e.prompt for h in held)
    assert len(evals) == 2 * len(D.TYPES) * len(D.LANGUAGES) * 2 + 2


def test_control_sees_the_same_prompts_and_answers_the_default():
    split = S.split_phrasings(S.SteerConfig())
    r1, r2 = random.Random(5), random.Random(5)
    for _ in range(100):
        a = S.make_example(r1, S.SteerConfig(), split.train, heldout_content=False)
        b = S.make_example(r2, S.SteerConfig(control=True), split.train, heldout_content=False)
        assert a.prompt == b.prompt and a.itype == b.itype
        assert b.response == S.transform(None, _content_of(b.prompt), "")[0]


def _content_of(prompt: str) -> S.Content:
    """The content of a chat prompt (the sentence that starts with a verb of the content template)."""
    import re

    msg = prompt.split("\n")[1]
    verbs = "|".join(D.VERBS)
    m = re.search(rf"({verbs}) a (\w+) (\w+) about the (\w+) for (\w+)\.", msg)
    return S.Content(*m.groups())


def test_targets_pass_their_checker_and_the_default_fails_them():
    misread = S.verify_targets(n=40, seed=3)  # raises if any non-langdetect target fails
    assert all(v <= 0.05 for v in misread.values())
    rng = random.Random(1)
    for _ in range(20):
        c, kw = S.random_content(rng), rng.choice(D.KEYWORDS)
        assert "," in c.default and c.default != c.default.lower() and c.default != c.default.upper()
        for itype in D.TYPES:
            target, kwargs = S.transform(itype, c, kw)
            assert target != c.default
            assert not S.check(itype, c.default, kwargs), (itype, c.default)


def test_tiny_training_is_bitwise_deterministic_and_resumes(tmp_path):
    cfg = S.SteerConfig(**TINY)
    a, b = S.train(cfg), S.train(cfg)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    S.train(cfg, ckpt_dir=tmp_path / "ck", max_steps=2)
    c = S.train(cfg, ckpt_dir=tmp_path / "ck")
    for (k, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), k


# ---------------------------------------------------------------------------------------------------- the shipped model


def test_shipped_files_size_and_record(report):
    total = 0
    for name in ("toy-steer", "toy-steer-base"):
        folder = BUILTIN[name]
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"):
            assert (folder / f).is_file(), f
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 10e6
    folder = BUILTIN["toy-steer"]
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == S.CHAT_TEMPLATE
    assert _render(tc["chat_template"], [{"role": "user", "content": "Hi."}], add_generation_prompt=True) == \
        S.chat_prompt("Hi.")
    assert report["config"]["seed"] == 0 and not report["config"]["control"] and "torch" in report["versions"]
    assert report["metrics"]["min_cell_accuracy"] >= 0.95  # the claim written next to the weights
    assert set(report["metrics"]["strict_accuracy"]) == set(D.TYPES)
    split = S.split_phrasings(S.SteerConfig(**{k: report["config"][k] for k in ("seed", "holdout")}))
    assert report["heldout_phrasings"] == {f"{t}/{lang}": v for (t, lang), v in split.heldout.items()}


def test_shipped_model_loads_with_chat_tokens(steer):
    tok = steer.tokenizer
    assert tok.token_to_id("<|user|>") is not None and tok.token_to_id("<|assistant|>") is not None
    ids = tok.encode(S.chat_prompt("Hi.")).ids
    assert ids[:2] == [tok.token_to_id(S.EOT), tok.token_to_id("<|user|>")]
    assert tok.decode(ids[-1:]) == "\n"  # the last prompt token is the newline after <|assistant|>


def test_shipped_model_follows_heldout_phrasings(steer):
    """One held-out content and held-out phrasing per (type, language), placements alternating: IFEval strict."""
    cfg = S.SteerConfig()
    split = S.split_phrasings(cfg)
    rng = random.Random(123)
    msgs, checks = [], []
    for i, itype in enumerate(D.TYPES):
        for j, lang in enumerate(D.LANGUAGES):
            kw = D.KEYWORDS[(i + j) % len(D.KEYWORDS)]
            c = S.sample_content(rng, cfg, heldout=True)
            while not S.valid_target(itype, S.transform(itype, c, kw)[0], kw):
                c = S.sample_content(rng, cfg, heldout=True)
            instr = S.fill(split.heldout[(itype, lang)][(i + j) % cfg.holdout], kw)
            msgs.append(S.message(c, instr, "post" if (i + j) % 2 else "pre"))
            checks.append((itype, S.transform(itype, c, kw)[1]))
    answers = S.respond(steer, msgs)
    ok = [S.check(t, a, kw) for (t, kw), a in zip(checks, answers)]
    assert sum(ok) >= len(ok) - 2, [(m, a) for m, a, o in zip(msgs, answers, ok) if not o]


def test_shipped_model_default_response(steer):
    rng = random.Random(7)
    contents = [S.sample_content(rng, S.SteerConfig(), heldout=True) for _ in range(6)]
    answers = S.respond(steer, [c.text for c in contents])
    assert sum(a == c.default for a, c in zip(answers, contents)) >= 5, answers
    assert all("," in a and not S.check("change_case:english_capital", a, None) for a in answers)


def test_cli_command_is_registered():
    from olmo_iv.cli.main import _typer_app
    from typer.testing import CliRunner

    result = CliRunner().invoke(_typer_app, ["train-steer-toy", "--help"])
    assert result.exit_code == 0 and "free-form instructions" in result.output


def test_shipped_control_ignores_the_instruction():
    base = olmo_iv.load("toy-steer-base")
    cfg = S.SteerConfig()
    split = S.split_phrasings(cfg)
    rng = random.Random(11)
    msgs, contents = [], []
    for itype in D.TYPES:
        c = S.sample_content(rng, cfg, heldout=True)
        msgs.append(S.message(c, S.fill(split.heldout[(itype, "en")][0], "banana"), "post"))
        contents.append(c)
    answers = S.respond(base, msgs)
    assert sum(a == c.default for a, c in zip(answers, contents)) >= len(msgs) - 1, answers
