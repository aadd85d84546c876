"""The SAIF run (olmo_iv.runs.saif): its tables agree with each other and with the library, exported vectors steer
exactly as the run did, and a run resumes and refuses bad settings with clear errors."""

import csv
import json

import pytest
import torch

from olmo_iv.errors import OlmoIVError
from olmo_iv.runs.saif import SaifSettings, run_saif, run_saif_steer
from olmo_iv.runs.store import RunFinished

TYPES = ["change_case:english_capital", "startend:quotation"]


def small(**kw) -> SaifSettings:
    base = dict(types=TYPES, n_train=12, n_test=4, ks=[1, 4], k=4, max_new_tokens=24, batch_size=32)
    return SaifSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saif") / "run"
    return out, run_saif(small(), out)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_summary_matches_results(run):
    out, summary = run
    rows = _rows(out / "results.csv")
    assert {r["condition"] for r in rows} == set(summary["conditions"])
    for name, entry in summary["conditions"].items():
        for t in TYPES:
            sel = [r for r in rows if r["condition"] == name and r["type"] == t]
            assert len(sel) == 4
            assert entry["by_type"][t]["strict"] == pytest.approx(sum(int(r["strict"]) for r in sel) / len(sel))
            assert entry["by_type"][t]["loose"] == pytest.approx(sum(int(r["loose"]) for r in sel) / len(sel))
    # strict implies loose, response by response
    assert all(int(r["loose"]) >= int(r["strict"]) for r in rows)
    for name in ("conditions", "k_sweep", "layer_sweep", "placement"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").exists()


def test_latents_table_respects_exclusion(run):
    out, summary = run
    rows = _rows(out / "latents.csv")
    assert rows
    for r in rows:  # the saif score excludes latents firing on more than tau of the negatives
        assert float(r["f_neg"]) <= summary["settings"]["tau"] + 1e-12
        assert float(r["mu_pos"]) >= float(r["mu_neg"]) or float(r["score"]) <= 0
    layer = str(summary["layer"])
    contexts = _rows(out / "contexts.csv")
    assert {(r["type"], int(r["latent"])) for r in contexts} == {
        (t, j) for t in TYPES for j in summary["selected"][layer]["post"][t][:3]}
    for t, j in {(r["type"], r["latent"]) for r in contexts}:
        values = [float(r["value"]) for r in contexts if r["type"] == t and r["latent"] == j]
        assert values == sorted(values, reverse=True) and values[0] > 0
    for t in TYPES:
        top = [int(r["latent"]) for r in rows if r["layer"] == layer and r["type"] == t and r["placement"] == "post"]
        assert top[: summary["settings"]["k"]] == summary["selected"][layer]["post"][t]


def test_exported_vector_steers_as_the_run_did(run, tmp_path):
    """`saif steer` with the exported vector reproduces the run's own saif_k{k} responses token for token."""
    from olmo_iv.tasks.saif import build_samples

    out, summary = run
    k = summary["settings"]["k"]
    t = TYPES[0]
    samples = build_samples(summary["source"], t, n=4, placement="post", split="test", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s.negative}) + "\n" for s in samples))
    got = run_saif_steer(out, t, prompts, tmp_path / "steer", max_new_tokens=24, batch_size=32)
    want = [r["response"] for r in _rows(out / "results.csv") if r["condition"] == f"saif_k{k}" and r["type"] == t]
    assert [r["text"] for r in got] == want


def test_top1_strength_is_chosen_by_the_rule_and_steers_the_test_contents(run):
    """top1_strength.csv follows choose_filtered on its own numbers, and the top1_decay responses are the toy's
    generations under the chosen multiple of the best latent's mu- to mu+ shift (none chosen: unsteered)."""
    import olmo_iv
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode
    from olmo_iv.interventions.steering import decoder_rows, generate_steered, latent_steer
    from olmo_iv.runs.saif import load_saes
    from olmo_iv.runs.steer import choose_filtered
    from olmo_iv.tasks.saif import build_samples

    out, summary = run
    rows = _rows(out / "top1_strength.csv")
    layer, model = summary["layer"], olmo_iv.load(summary["settings"]["model"])
    saes = load_saes(None, summary["settings"]["model"], model.config.n_layers, None)
    results = _rows(out / "results.csv")
    for t in TYPES:
        mine = [r for r in rows if r["type"] == t]
        assert [r["multiple"] for r in mine] == ["none", *(str(float(x)) for x in summary["settings"]["strengths"])]
        assert all(int(r["n"]) == 12 for r in mine)  # n_valid defaults to min(16, n_train)
        chosen, kept = choose_filtered((float(mine[0]["loose"]), float(mine[0]["degenerate"])),
                                       [(float(r["loose"]), float(r["degenerate"])) for r in mine[1:]])
        assert [float(r["kept"]) for r in mine[1:]] == pytest.approx(kept)
        multiple = None if chosen is None else float(mine[1 + chosen]["multiple"])
        assert summary["top1_multiple"][t] == multiple
        assert [int(r["chosen"]) for r in mine] == [int(i == (0 if chosen is None else 1 + chosen))
                                                   for i in range(len(mine))]
        samples = build_samples(summary["source"], t, n=4, placement="post", split="test", seed=0)
        ids = [encode(model.tokenizer, format_prompt(model, s.negative)) for s in samples]
        specs = []
        if multiple is not None:
            j = summary["selected"][str(layer)]["post"][t][0]
            r = next(x for x in _rows(out / "latents.csv")
                     if x["layer"] == str(layer) and x["placement"] == "post" and x["type"] == t and x["rank"] == "1")
            shift = (float(r["mu_pos"]) - float(r["mu_neg"])) * float(decoder_rows(saes[layer], [j]).norm())
            specs = [latent_steer(saes[layer], j, multiple * shift, decay=summary["settings"]["decay"], layer=layer)]
        want = [model.tokenizer.decode(g) for g in generate_steered(model, ids, specs, max_new_tokens=24)]
        got = [r for r in results if r["condition"] == "top1_decay" and r["type"] == t]
        assert [r["response"] for r in got] == want
        assert all(int(r["steered"]) == int(multiple is not None) for r in got)
    # both branches are exercised on the toy: one type keeps no steering, the other is steered
    assert {summary["top1_multiple"][t] is None for t in TYPES} == {True, False}
    # the strongest candidate on the toy makes a looping response somewhere, and the token measure sees it
    assert max(float(r["degenerate"]) for r in rows) > 0


def test_output_score_selection_follows_the_scores_and_steers_with_those_latents(run):
    """output_scores.csv: the library's output score of each candidate; saif_output_k{k} takes the k best with a
    positive score and steers with their mu+-weighted decoder directions set to the positives' mean projection."""
    import olmo_iv
    from olmo_iv.activations import extract
    from olmo_iv.analysis.latents import output_score
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode
    from olmo_iv.interventions.steering import Steer, generate_steered, latent_vector
    from olmo_iv.runs.saif import load_saes
    from olmo_iv.tasks.saif import build_samples

    out, summary = run
    layer, k = summary["layer"], summary["settings"]["k"]
    model = olmo_iv.load(summary["settings"]["model"])
    sae = load_saes(None, summary["settings"]["model"], model.config.n_layers, None)[layer]
    scores = _rows(out / "output_scores.csv")
    latents = _rows(out / "latents.csv")
    results = _rows(out / "results.csv")

    def ids(texts):
        return [encode(model.tokenizer, format_prompt(model, x)) for x in texts]

    for t in TYPES:
        mine = [r for r in scores if r["type"] == t]
        assert [int(r["latent"]) for r in mine] == summary["selected"][str(layer)]["post"][t][: len(mine)]
        ranked = sorted(mine, key=lambda r: -float(r["output_score"]))
        want = [int(r["latent"]) for r in ranked if float(r["output_score"]) > 0][:k]
        assert summary["output_selected"][t] == want and want
        assert {int(r["latent"]) for r in mine if r["selected"] == "1"} == set(want)
        train = build_samples(summary["source"], t, n=12, placement="post", split="train", seed=0)
        best = ranked[0]
        again = output_score(model, sae, int(best["latent"]), ids([x.negative for x in train[:12]]),
                             summary["output_tokens"][t]["ids"], coef=float(best["coef"]), layer=layer)
        assert again["score"] == pytest.approx(float(best["output_score"]), abs=2e-6)
        # the steering: mu+-weighted decoder directions of those latents, set to the positives' mean projection
        mu = {int(r["latent"]): float(r["mu_pos"]) for r in latents
              if r["layer"] == str(layer) and r["placement"] == "post" and r["type"] == t}
        v = latent_vector(sae, want, torch.tensor([mu[j] for j in want]))
        u = v / v.norm()
        acts = extract(model, ids([x.positive for x in train]), "hook_resid_post", layers=[layer], positions=-1,
                       batch_size=32, dtype=torch.float32)[:, 0]
        spec = Steer(layer=layer, vector=u, mode="adjust_rs", zbar=float((acts @ u).mean()))
        test = build_samples(summary["source"], t, n=4, placement="post", split="test", seed=0)
        new = generate_steered(model, ids([x.negative for x in test]), [spec], max_new_tokens=24, batch_size=32)
        got = [r["response"] for r in results if r["condition"] == f"saif_output_k{k}" and r["type"] == t]
        assert got == [model.tokenizer.decode(g) for g in new]


def test_finished_run_says_so_and_other_settings_are_refused(run):
    out, _ = run
    with pytest.raises(RunFinished):
        run_saif(small(), out)
    with pytest.raises(OlmoIVError, match="k"):
        run_saif(small(k=2), out)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(OlmoIVError, match="types="):
        run_saif(small(types=["no_such_type"]), tmp_path / "a")
    with pytest.raises(OlmoIVError, match="layer=7"):
        run_saif(small(layer=7), tmp_path / "b")
    with pytest.raises(OlmoIVError, match="k="):
        small(k=0)
    with pytest.raises(OlmoIVError, match="tau="):
        small(tau=float("nan"))
    with pytest.raises(OlmoIVError, match="strengths="):
        small(strengths=[])
    with pytest.raises(OlmoIVError, match="strengths="):
        small(strengths=[2.0, 0.0])
    with pytest.raises(OlmoIVError, match="n_valid="):
        small(n_valid=13)  # more than n_train


DRIVER = """
import json, sys
from olmo_iv.runs.saif import SaifSettings, run_saif
run_saif(SaifSettings(**json.loads(sys.argv[2])), sys.argv[1])
"""


def test_a_killed_run_continues_to_the_uninterrupted_result(run, tmp_path):
    from tests.killing import done_markers, kill_after, payloads

    whole, _ = run
    killed = tmp_path / "killed"
    kw = {k: v for k, v in vars(small()).items()}
    kill_after(DRIVER, [str(killed), json.dumps(kw)], killed, units=5)
    before = done_markers(killed)
    assert 5 <= len(before) < len(done_markers(whole)) and not (killed / "summary.json").exists()
    run_saif(small(), killed)
    after = done_markers(killed)
    assert set(after) == set(done_markers(whole))  # no unit lost
    assert {u: after[u] for u in before} == before  # no finished unit computed again
    assert payloads(killed) == payloads(whole)
    for name in ("latents.csv", "contexts.csv", "results.csv", "top1_strength.csv", "output_scores.csv"):
        assert (killed / name).read_text() == (whole / name).read_text(), name


def test_the_real_model_path_runs_on_a_model_without_a_chat_template(tmp_path):
    """Source 'saif' (translation, summary and keyword instructions on IFEval queries, rule judges) on `toy`, which
    has no chat template, with one of its shipped SAEs: every condition, type and test content gets a response."""
    from olmo_iv.tasks.saif import saif_types

    settings = SaifSettings(model="toy", source="saif", n_train=8, n_test=2, ks=[2], k=2, max_new_tokens=8,
                            layers=[5], strengths=[4.0])
    summary = run_saif(settings, tmp_path / "run")
    assert summary["source"] == "saif" and summary["types"] == list(saif_types("saif")) and summary["layer"] == 5
    rows = _rows(tmp_path / "run" / "results.csv")
    assert len(rows) == len(summary["conditions"]) * len(summary["types"]) * 2
    assert {r["type"] for r in rows} == set(summary["types"])
    strength = _rows(tmp_path / "run" / "top1_strength.csv")
    assert [(r["type"], r["multiple"]) for r in strength] == [(t, m) for t in summary["types"] for m in ("none", "4.0")]
    assert int(strength[0]["n"]) == 8
