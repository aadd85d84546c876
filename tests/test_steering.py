"""Steering: exactness of the interventions, KV-cached generation equal to the authors' full recompute, vectors
equal to the authors' procedure, a planted direction recovered, and the two CLI forms."""

from __future__ import annotations

import json

import pytest
import torch

import olmo_iv
import olmo_iv.runs.steer
from olmo_iv import OlmoIVError
from olmo_iv.generate import encode
from olmo_iv.interventions.steering import (
    Steer,
    SteeringVectors,
    compute_vectors,
    diff_of_means,
    generate_steered,
    steering_hooks,
)
from olmo_iv.model import ModelConfig, OLMo2, init_weights
from olmo_iv.reference import stolfo_generate, stolfo_vectors

PROMPTS = [[5, 9, 17, 3], [44, 2, 8, 31, 7, 12, 60], [1], [23, 23, 9, 40, 2]]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=64, eos_token_id=0)
    return init_weights(OLMo2(cfg), seed=3).eval()


def _u(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_coefficient_zero_is_bit_identical_to_no_hook(model):
    ids = torch.tensor([PROMPTS[1]])
    plain = model(ids)
    with model.hooks(steering_hooks([Steer(layer=2, vector=_u(32), coef=0.0)])):
        steered = model(ids)
    assert torch.equal(plain, steered)
    assert generate_steered(model, PROMPTS, [Steer(layer=1, vector=_u(32), coef=0.0)], max_new_tokens=8) == \
        generate_steered(model, PROMPTS, [], max_new_tokens=8)


def test_set_projection_gives_zbar_at_every_hooked_position(model):
    spec = Steer(layer=2, vector=_u(32, 1), mode="adjust_rs", zbar=3.25)
    seen = []
    hooks = steering_hooks([spec])
    hooks["blocks.2.hook_resid_post"].append(lambda x, name: seen.append(x.clone()))
    with model.hooks(hooks):
        model(torch.tensor([PROMPTS[1]]))
    proj = seen[0] @ spec.vector
    assert torch.allclose(proj, torch.full_like(proj, 3.25), atol=1e-5, rtol=0)


def test_a_last_layer_hook_changes_only_the_hooked_positions(model):
    ids = torch.tensor([PROMPTS[1]])
    plain = model(ids)
    with model.hooks(steering_hooks([Steer(layer=3, vector=_u(32, 2), coef=8.0, positions="last_prompt")])):
        steered = model(ids)
    assert torch.equal(plain[:, :-1], steered[:, :-1]) and not torch.allclose(plain[:, -1], steered[:, -1])


@pytest.mark.parametrize("specs", [
    [dict(layer=1, coef=6.0)],
    [dict(layer=2, mode="adjust_rs", zbar=4.0)],
    [dict(layer=1, coef=5.0, positions="generated", decay=0.7), dict(layer=3, mode="ablate", positions="prompt")],
    [dict(layer=0, coef=9.0, positions="last_prompt")],
], ids=["add", "adjust_rs", "decay+ablate", "last_prompt"])
def test_cached_generation_equals_full_recompute(model, specs):
    specs = [Steer(vector=_u(32, k), **s) for k, s in enumerate(specs)]
    cached = generate_steered(model, PROMPTS, specs, max_new_tokens=12, batch_size=3)
    recompute = generate_steered(model, PROMPTS, specs, max_new_tokens=12, batch_size=3, use_cache=False)
    unsteered = generate_steered(model, PROMPTS, [], max_new_tokens=12, batch_size=3)
    assert cached == recompute and cached != unsteered


def test_sampling_is_reproducible_for_a_seed(model):
    spec = [Steer(layer=1, vector=_u(32), coef=3.0)]
    a = generate_steered(model, PROMPTS, spec, max_new_tokens=10, seed=7, temperature=1.5)
    assert a == generate_steered(model, PROMPTS, spec, max_new_tokens=10, seed=7, temperature=1.5)
    assert a != generate_steered(model, PROMPTS, spec, max_new_tokens=10, seed=8, temperature=1.5)


def test_a_planted_direction_is_recovered():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 64, generator=g)
    base = torch.randn(200, 3, 64, generator=g) * 2
    with_acts = base + 3 * v / v.norm(dim=-1, keepdim=True) + 0.3 * torch.randn(200, 3, 64, generator=g)
    without_acts = base + 0.3 * torch.randn(200, 3, 64, generator=g)
    u, zbar = diff_of_means(with_acts, without_acts)
    cos = (u * v / v.norm(dim=-1, keepdim=True)).sum(-1)
    assert bool((cos > 0.99).all()) and torch.allclose(zbar, torch.einsum("nld,ld->l", with_acts, u) / 200)
    with pytest.raises(OlmoIVError, match="identical"):
        diff_of_means(with_acts, with_acts)


def test_vectors_and_steered_generation_follow_the_authors_procedure():
    """On a local checkpoint: our batched vectors and KV-cached steered generations equal a pair-by-pair,
    full-recompute implementation of the authors' procedure (chat-templated prompts, last token, all layers,
    unit norm, z̄ of the with runs, every position edited)."""
    model = olmo_iv.load("toy")
    model.chat_template = ("{% for m in messages %}{{ '<|endoftext|>' + m['content'] + '\\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}")
    pairs = [("Given an adjective, state its antonym. Adjective: big.", "Adjective: big."),
             ("Given an adjective, state its antonym. Adjective: cold.", "Adjective: cold."),
             ("Given an animal, state its color. Animal: crow.", "Animal: crow.")]
    vecs = compute_vectors(model, pairs)
    from olmo_iv.chat import format_prompt

    w = [encode(model.tokenizer, format_prompt(model, a)) for a, _ in pairs]
    wo = [encode(model.tokenizer, format_prompt(model, b)) for _, b in pairs]
    u, zbar = stolfo_vectors(model, w, wo)
    torch.testing.assert_close(vecs.u, u, atol=1e-5, rtol=0)
    torch.testing.assert_close(vecs.zbar, zbar, atol=1e-4, rtol=1e-5)
    assert torch.allclose(vecs.u.norm(dim=-1), torch.ones(6), atol=1e-6)
    for layer, mode in ((2, "adjust_rs"), (4, "add")):
        spec = vecs.spec(layer, mode=mode, coef=1.0 if mode == "adjust_rs" else 6.0)
        ours = generate_steered(model, wo, [spec], max_new_tokens=6, stop_ids=[0])
        theirs = [stolfo_generate(model, p, layer, vecs.u[layer], mode=mode, coef=spec.coef,
                                  zbar=float(vecs.zbar[layer]), max_new_tokens=6, stop_id=0) for p in wo]
        assert ours == theirs


def test_cli_forms(tmp_path):
    from olmo_iv.cli.main import _typer_app as app
    from typer.testing import CliRunner

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"with": f"Given an adjective, state its antonym. Adjective: {w}.",
                                         "without": f"Adjective: {w}."}) + "\n" for w in ("big", "cold", "fast")))
    r = CliRunner().invoke(app, ["steer", "vectors", "--model", "toy", "--pairs", str(pairs), "--out",
                                 str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    vecs = SteeringVectors.load(tmp_path / "v")
    assert vecs.u.shape == (6, 96) and vecs.zbar.shape == (6,) and vecs.meta["n_pairs"] == 3
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Adjective: {w}."}) + "\n" for w in ("hot", "small")))
    r = CliRunner().invoke(app, ["steer", "generate", "--model", "toy", "--vectors", str(tmp_path / "v"), "--layer",
                                 "2", "--mode", "adjust_rs", "--coef", "1", "--prompts", str(prompts),
                                 "--max-new-tokens", "5", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "g" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Adjective: hot.", "Adjective: small."]
    model = olmo_iv.load("toy")
    spec = vecs.spec(2, mode="adjust_rs")
    want = generate_steered(model, [encode(model.tokenizer, p) for p in ("Adjective: hot.", "Adjective: small.")],
                            [spec], max_new_tokens=5)
    assert [r["ids"] for r in rows] == want and rows[0]["text"] == model.tokenizer.decode(want[0])
    with pytest.raises(OlmoIVError, match="layer=9"):
        generate_steered(model, [[1, 2]], [vecs.spec(9)], max_new_tokens=2)
    # composition: a second vector at another layer, both active at once
    r = CliRunner().invoke(app, ["steer", "generate", "--model", "toy", "--vectors", str(tmp_path / "v"), "--layer",
                                 "2", "--mode", "adjust_rs", "--prompts", str(prompts), "--max-new-tokens", "5",
                                 "--also", f"{tmp_path / 'v'}:4:add:3", "--out", str(tmp_path / "g2")])
    assert r.exit_code == 0, r.output
    both = [json.loads(x)["ids"] for x in (tmp_path / "g2" / "generations.jsonl").read_text().splitlines()]
    want = generate_steered(model, [encode(model.tokenizer, p) for p in ("Adjective: hot.", "Adjective: small.")],
                            [spec, vecs.spec(4, mode="add", coef=3.0)], max_new_tokens=5)
    assert both == want


def test_format_experiment_runs_and_resumes(tmp_path):
    from olmo_iv.runs.steer import FormatSettings, run_format

    rows = [{"key": k, "prompt": f"Adjective: {w}. Answer in lowercase letters.", "prompt_without_instruction":
             f"Adjective: {w}.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
            for k, w in enumerate(("big", "cold", "fast", "hot"))]
    rows += [{"key": 10 + k, "prompt": f"Animal: {w}. Wrap your answer in double quotes.",
              "prompt_without_instruction": f"Animal: {w}.", "instruction_id_list": ["startend:quotation"],
              "kwargs": [{}]} for k, w in enumerate(("crow", "bear"))]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = FormatSettings(model="toy", data=str(data), layers=[1, 3], max_new_tokens=6)
    summary = run_format(s, tmp_path / "f")
    assert set(summary["by_instruction"]) == {"change_case:english_lowercase", "startend:quotation"}
    assert summary["overall"]["instruction"]["n"] == 6
    import csv

    with open(tmp_path / "f" / "results.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 6 * 4 and {r["condition"] for r in got} == {"no_instruction", "no_instruction+steer",
                                                                  "instruction", "instruction+steer"}
    assert (tmp_path / "f" / "conditions.png").exists() and (tmp_path / "f" / "layers.csv").exists()
    with pytest.raises(OlmoIVError, match="finished"):
        run_format(s, tmp_path / "f")


@pytest.mark.parametrize("task", ["include", "exclude"])
def test_keyword_experiments_run(tmp_path, task):
    from olmo_iv.runs.steer import KeywordSettings, run_keywords

    summary = run_keywords(KeywordSettings(model="toy", task=task, limit=2, n_pairs=2, max_new_tokens=4, coef=5.0),
                           tmp_path / task)
    assert summary["n"] == 2 and set(summary["strict"]) == {"no_instruction", "no_instruction+steer"}
    assert (tmp_path / task / "results.csv").exists()


def test_length_experiment_builds_a_vector_per_level(tmp_path):
    """Five level vectors, each from its own (query + level phrasing, query) pairs, equal to compute_vectors on
    those pairs; every level steers its own condition; the counts in the summary are those of the responses."""
    import csv

    from olmo_iv.runs.steer import LENGTH_LEVELS, LengthSettings, length_pairs, run_length

    settings = LengthSettings(model="toy", n_pairs=3, n_test=2, max_sentences=2, max_new_tokens=6, coef=5.0)
    s = run_length(settings, tmp_path / "len")
    conds = ["instruction", *(f"instruction+{name}" for name in LENGTH_LEVELS)]
    assert set(s["by_condition"]) == {f"{n}/{c}" for n in (1, 2) for c in conds}
    assert s["conciseness"] == "instruction+extremely_concise" and list(s["by_vector"]) == conds
    model = olmo_iv.load("toy")
    queries = [json.loads(x)["model_output"].strip() for x in open(olmo_iv.runs.steer.LENGTH_QUERIES)]
    for k in range(5):
        pairs = length_pairs(queries[:3], k)
        assert all(w.startswith(q + " ") and w[len(q) + 1:] in s["levels"][k]["phrasings"] for w, q in pairs)
        want = compute_vectors(model, pairs)
        got = SteeringVectors.load(tmp_path / "len" / "vectors" / f"level{k}")
        assert torch.equal(got.u, want.u) and torch.equal(got.zbar, want.zbar)
    # the responses of one steered condition are the steered generations of the held-out (last) queries
    from olmo_iv.chat import format_prompt

    prompts = [f"{q} Answer using at most 2 sentences." for q in queries[-2:]]
    ids = [encode(model.tokenizer, format_prompt(model, p)) for p in prompts]
    spec = SteeringVectors.load(tmp_path / "len" / "vectors" / "level4").spec(s["layer"], mode="add", coef=5.0)
    want = [model.tokenizer.decode(g) for g in generate_steered(model, ids, [spec], max_new_tokens=6)]
    with open(tmp_path / "len" / "results.csv", newline="") as f:
        got = [r for r in csv.DictReader(f)]
    sel = [r for r in got if r["max_sentences"] == "2" and r["condition"] == "instruction+extremely_verbose"]
    assert [r["response"] for r in sel] == want and len(got) == 2 * 6 * 2
    e = s["by_condition"]["2/instruction+extremely_verbose"]
    assert e["mean_words"] == sum(int(r["words"]) for r in sel) / 2
    assert e["strict"] == sum(int(r["strict"]) for r in sel) / 2
    assert (tmp_path / "len" / "length.png").exists()
    with pytest.raises(OlmoIVError, match="levels"):
        LengthSettings(levels=[0, 5])
