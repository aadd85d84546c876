"""The shipped toy models: they load, follow unseen phrasings of the instructions (toy) or ignore them
(toy-base), carry the task at T_inst (faithful patch); and the recipe that trains them is deterministic."""

from __future__ import annotations

import json

import pytest
import torch

import olmo_iv
from olmo_iv import tasks
from olmo_iv.loading import BUILTIN
from olmo_iv.toy.train import (
    SUBTASKS,
    ToyConfig,
    gist_logits,
    greedy_answers,
    load_data,
    patching_check,
    train,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    return olmo_iv.load("toy")


@pytest.fixture(scope="module")
def toy_base():
    return olmo_iv.load("toy-base")


@pytest.fixture(scope="module")
def data():
    return load_data(seed=0, holdout=40)


def _report(name: str) -> dict:
    return json.loads((BUILTIN[name] / "training.json").read_text())


def test_shipped_layout_size_and_record():
    total = 0
    for name in ("toy", "toy-base"):
        folder = BUILTIN[name]
        for f in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
            assert (folder / f).is_file(), f"{name} lacks {f}"
        total += sum(p.stat().st_size for p in folder.iterdir())
        rep = _report(name)
        assert rep["config"]["control"] == (name == "toy-base")
        assert {"seed", "steps", "lr"} <= set(rep["config"]) and "torch" in rep["versions"]
        assert rep["command"].startswith("olmo-iv train-toy")
    assert total < 8e6
    for task in SUBTASKS:  # the claim written next to the weights
        assert _report("toy")["metrics"]["accuracy_heldout"][task] >= 0.9
        assert _report("toy")["metrics"]["accuracy_table1"][task] >= 0.9


def test_loads_in_fp32_with_its_tokenizer(toy):
    assert toy.dtype == torch.float32 and toy.tokenizer is not None
    tok = toy.tokenizer
    assert tok.token_to_id("<|endoftext|>") == toy.config.eos_token_id
    assert tok.token_to_id("<|pad|>") == toy.config.pad_token_id
    assert toy.config.vocab_size >= tok.get_vocab_size()


def test_toy_answers_golden(toy):
    """The first row of each data file under its Table-1 instruction (labels from the data, not the model)."""
    got = greedy_answers(toy, [tasks.samples(t, n=1)[0].clean for t in SUBTASKS])
    assert got == ["bigger", "small", "red", "yes"]


def test_toy_follows_heldout_phrasings(toy, data):
    """Phrasings never trained on (recorded in training.json), 30 queries each: >= 90% exact match per task."""
    held = _report("toy")["heldout_instructions"]
    for name, t in data.tasks.items():
        assert held[name] == t.heldout_instructions  # the split is reproducible from the seed
        prompts, gold = [], []
        for i, (q, a) in enumerate(t.rows[:30]):
            prompts.append(t.prompt(held[name][i % len(held[name])], q))
            gold.append(a)
        acc = sum(p == g for p, g in zip(greedy_answers(toy, prompts), gold)) / len(gold)
        assert acc >= 0.9, (name, acc)


def test_toy_answer_depends_on_instruction(toy, data):
    """Same query, the two instructions of its Field: two different answers, each the instructed one."""
    for fld in ("Adjective", "Animal"):
        a, b = [t for t in data.tasks.values() if t.field == fld]
        qs = [q for q, _ in a.rows[:20]]
        ans_a = greedy_answers(toy, [a.prompt(a.instruction, q) for q in qs])
        ans_b = greedy_answers(toy, [b.prompt(b.instruction, q) for q in qs])
        assert sum(x != y for x, y in zip(ans_a, ans_b)) >= 18


def test_toy_base_ignores_instruction(toy_base, data):
    """The control: a query's answer is the same under all four Table-1 instructions, and it is a real answer
    (one of the two labels of that query)."""
    instructions = [t.instruction for t in data.tasks.values()]
    for fld in ("Adjective", "Animal"):
        a, b = [t for t in data.tasks.values() if t.field == fld]
        rows = list(zip(a.rows[:25], b.rows[:25]))
        answers = [greedy_answers(toy_base, [a.prompt(i, qa) for (qa, _), _ in rows]) for i in instructions]
        same = sum(len(set(col)) == 1 for col in zip(*answers)) / len(rows)
        assert same >= 0.95, (fld, same)
        valid = sum(ans in (la, lb) for ans, ((_, la), (_, lb)) in zip(answers[0], rows)) / len(rows)
        assert valid >= 0.9, (fld, valid)


def test_faithful_patch_carries_the_task(toy, toy_base, data):
    """Patching the instruction's T_inst (layer 0) into the filler makes each task's instructed answer the top
    token far more often than patching the other same-Field instruction does; in the control it cannot."""
    toy_r, base_r = patching_check(toy, data, layers=[0], n=40), patching_check(toy_base, data, layers=[0], n=40)
    for name in SUBTASKS:
        r = toy_r[name]["0"]
        assert r["top1"] >= 0.6 and r["top1"] - r["partner_top1"] >= 0.4, (name, r)
        r = base_r[name]["0"]
        assert abs(r["top1"] - r["partner_top1"]) <= 0.1, (name, r)


# ---------------------------------------------------------------------------------------------------- recipe

TINY = dict(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=320, steps=20, batch_size=8, warmup=5,
            threads=1, ckpt_every=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_and_resumes_exactly(data, tmp_path):
    cfg = ToyConfig(**TINY)
    a = train(cfg, data)
    b = train(cfg, data)
    sa, sb = _state(a), _state(b)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], _state(train(ToyConfig(**{**TINY, "seed": 1}), data))["embed.weight"])
    # killed after 10 steps, resumed: the same weights as the uninterrupted run
    ckpt = tmp_path / "ckpt"
    train(ToyConfig(**TINY), data, ckpt_dir=ckpt, max_steps=10)
    assert (ckpt / "state.json").exists()
    sc = _state(train(ToyConfig(**TINY), data, ckpt_dir=ckpt))
    assert all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_refuses_other_settings(data, tmp_path):
    train(ToyConfig(**TINY), data, ckpt_dir=tmp_path, max_steps=2)
    with pytest.raises(olmo_iv.OlmoIVError, match="other settings"):
        train(ToyConfig(**{**TINY, "lr": 1e-3}), data, ckpt_dir=tmp_path)


def test_gist_plumbing_equals_plain_forward(toy):
    """With every instruction position kept, the two-pass gist run is the ordinary forward of the concatenation
    (same positions, same cache), so keep=1 differs from it only by what it hides."""
    tok = toy.tokenizer
    instr = torch.tensor([tok.encode("Given an adjective, state its antonym.").ids])
    ids = torch.tensor([tok.encode("Adjective: big. Answer:").ids])
    full = toy(torch.cat([instr, ids], 1))[:, instr.shape[1] :]
    two_pass = gist_logits(toy, instr, torch.ones_like(instr), ids, keep=instr.shape[1])
    torch.testing.assert_close(two_pass, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gist_logits(toy, instr, torch.ones_like(instr), ids, keep=1), full, atol=1e-3)


def test_cli_rejects_bad_which():
    from olmo_iv.cli.main import _typer_app
    from typer.testing import CliRunner

    res = CliRunner().invoke(_typer_app, ["train-toy", "--which", "big"])
    assert res.exit_code != 0 and isinstance(res.exception, olmo_iv.OlmoIVError)
