"""The bridge between instruction vectors and SAE latents: the exact decomposition of the patch, latent-level
patching against full patching and the unpatched target, held-out ranking, the run and the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import olmo_iv
from olmo_iv import tasks
from olmo_iv.analysis import bridge as B
from olmo_iv.errors import OlmoIVError
from olmo_iv.interventions import patching
from olmo_iv.runs.store import RunFinished
from olmo_iv.sae import SAE, SAEConfig

TASK = "adjectives/adj_comp"


@pytest.fixture(scope="module")
def toy():
    return olmo_iv.load("toy").eval()


def make_sae(layer: int | None, *, scale: float = 1.0, rescale: bool = False, b_dec_input: bool = True,
             d_sae: int = 192, k: int = 8, seed: int = 0) -> SAE:
    """A random TopK SAE with a non-zero decoder bias, decoder rows of other norms than 1 and an input scale: every
    term the decomposition has to get right."""
    cfg = SAEConfig(d_in=96, d_sae=d_sae, k=k, input_scale=scale, rescale_acts_by_decoder_norm=rescale,
                    apply_b_dec_to_input=b_dec_input,
                    hook_name=None if layer is None else f"blocks.{layer}.hook_resid_post")
    sae = SAE(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(96, generator=gen))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=gen) + 0.5)
    return sae.eval()


def encoded(toy, mode: str = "faithful", n: int = 12):
    return tasks.encode(tasks.samples(TASK, mode=mode, n=n), toy.tokenizer)


def resid(toy, ids, layer: int, pos: int) -> torch.Tensor:
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = toy.run_with_cache(torch.tensor([list(ids)]), [name])
    return cache[name][0, pos]


def patched_run(toy, ids, layer: int, pos: int, vec: torch.Tensor, answer: int) -> tuple[float, int]:
    """The straightforward patched run: the whole model, block `layer`'s output at `pos` overwritten by a hook."""
    def put(x, name):
        x = x.clone()
        x[0, pos] = vec.to(x.dtype)
        return x

    with toy.hooks({f"blocks.{layer}.hook_resid_post": put}):
        logits = toy(torch.tensor([list(ids)]))[0, -1]
    return float(logits[answer]), int(1 + (logits > logits[answer]).sum())


# ------------------------------------------------------------------------------------------------ decomposition


@pytest.mark.parametrize("scale,rescale,b_dec_input", [(1.0, False, True), (0.37, True, False)])
def test_decomposition_is_exact_and_matches_the_sae(toy, scale, rescale, b_dec_input):
    layer = 2
    sae = make_sae(layer, scale=scale, rescale=rescale, b_dec_input=b_dec_input)
    enc = encoded(toy, "reference")
    dec = B.decompose(toy, sae, enc, layer)
    # the residuals are the block outputs at T_inst (source) and at the patch position (target)
    for i in (0, 5):
        torch.testing.assert_close(dec.x_src[i].float(), resid(toy, enc[i].source_ids, layer, enc[i].t_inst),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(dec.x_tgt[i].float(), resid(toy, enc[i].target_ids, layer, enc[i].target_pos),
                                   rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(dec.z_src, sae.encode(dec.x_src.float()).double())
        # x̂ = codes @ d + b is the SAE's own decode: input scale, decoder-norm rescaling and b_dec handled
        torch.testing.assert_close(dec.x_tgt - dec.e_tgt, sae.decode(dec.z_tgt.float()).double(), rtol=0, atol=1e-4)
    # the identity x_src - x_tgt = sum_j c_j + (e_src - e_tgt), to float64 rounding
    torch.testing.assert_close(dec.contribution() + dec.error, dec.delta, rtol=0, atol=1e-10)
    # a subset's contribution is the decode of the subset's codes, source minus target (b_dec cancels)
    subset = torch.tensor([3, 17, 40, 101, 150])
    mask = torch.zeros(sae.cfg.d_sae)
    mask[subset] = 1
    with torch.no_grad():
        want = sae.decode(dec.z_src.float() * mask) - sae.decode(dec.z_tgt.float() * mask)
    torch.testing.assert_close(dec.contribution(subset), want.double(), rtol=0, atol=1e-4)


def test_scores_rank_by_contribution_size_and_the_gradient_is_the_logits_slope(toy):
    layer = 1
    enc = encoded(toy, "reference", n=8)
    dec = B.decompose(toy, make_sae(layer), enc, layer, gradients=True)
    n = len(enc)
    # abs: mean over samples of the norm of latent j's contribution vector
    norms = torch.stack([torch.stack([(dec.delta_z[i, j] * dec.directions[j]).norm() for j in range(dec.z_src.shape[1])])
                         for i in range(n)])
    torch.testing.assert_close(B.latent_scores(dec, "abs"), norms.mean(0))
    signed = B.latent_scores(dec, "signed")
    torch.testing.assert_close(signed, (dec.delta_z * dec.directions.norm(dim=-1)).mean(0))
    ranking = B.rank_latents(dec, "signed")
    assert torch.all(signed[ranking.order[0, :-1]] >= signed[ranking.order[0, 1:]])
    # the gradient: the answer logit's slope along a direction, by central differences through patch_vectors
    v = torch.randn(n, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-2
    vecs = torch.stack([dec.x_tgt + eps * v, dec.x_tgt - eps * v], 1).float()
    logit, _ = patching.patch_vectors(toy, [torch.tensor(e.target_ids) for e in enc], [e.answer_id for e in enc],
                                      layer, vecs, target_pos=[e.target_pos for e in enc])
    slope = (logit[:, 0] - logit[:, 1]).double() / (2 * eps)
    torch.testing.assert_close(slope, (dec.grad * v).sum(-1), rtol=2e-2, atol=2e-2)
    attribution = B.latent_scores(dec, "attribution")
    torch.testing.assert_close(attribution, torch.stack([(dec.grad * dec.delta_z[:, [j]] * dec.directions[j]).sum(-1)
                                                         .mean() for j in range(dec.z_src.shape[1])]))
    with pytest.raises(OlmoIVError, match="method='nope'"):
        B.latent_scores(dec, "nope")


# ---------------------------------------------------------------------------------------------- latent patching


def test_patch_vectors_equals_the_straightforward_patched_run(toy, monkeypatch):
    enc = encoded(toy, "reference", n=7)  # queries of several lengths, patched at their first token
    layer = 3
    vecs = torch.randn(len(enc), 3, 96, generator=torch.Generator().manual_seed(1)) * 5
    monkeypatch.setattr(patching, "_row_budget", lambda model, length: 2)  # chunked over samples and variants
    logit, rank = patching.patch_vectors(toy, [torch.tensor(e.target_ids) for e in enc], [e.answer_id for e in enc],
                                         layer, vecs, target_pos=[e.target_pos for e in enc])
    for i, e in enumerate(enc):
        for j in range(3):
            want_logit, want_rank = patched_run(toy, e.target_ids, layer, e.target_pos, vecs[i, j], e.answer_id)
            assert abs(float(logit[i, j]) - want_logit) <= 1e-4 and int(rank[i, j]) == want_rank
    last = patching.patch_vectors(toy, [torch.tensor(enc[0].target_ids)], [enc[0].answer_id], 5, vecs[:1],
                                  target_pos=-1)  # the last block at the last position: only the unembedding
    assert abs(float(last[0][0, 0]) - patched_run(toy, enc[0].target_ids, 5, -1, vecs[0, 0], enc[0].answer_id)[0]) < 1e-4
    with pytest.raises(OlmoIVError, match="layer=6 is out of range"):
        patching.patch_vectors(toy, [torch.tensor(enc[0].target_ids)], [enc[0].answer_id], 6, vecs[:1])
    with pytest.raises(OlmoIVError, match="NaN"):
        patching.patch_vectors(toy, [torch.tensor(enc[0].target_ids)], [enc[0].answer_id], 1, vecs[:1] * float("nan"))


@pytest.mark.parametrize("mode,layer", [("faithful", 1), ("reference", 2)])
def test_all_latents_plus_error_is_full_patching_and_k0_is_the_target(toy, mode, layer):
    enc = encoded(toy, mode, n=10)
    sentinel = -1.0 if mode == "reference" else 0.0
    result = B.bridge(toy, make_sae(layer), enc, layer, ks=[0, 1, 5], rr_sentinel=sentinel)
    assert result.columns == ["0", "1", "5", "all", "all+error"] and result.n_latents == [0, 1, 5, 192, 192]
    full = result.columns.index("all+error")
    assert (result.logit[:, full] - result.logit_full).abs().max() <= 1e-5
    assert torch.equal(result.rank[:, full], result.rank_full)
    assert (result.logit[:, 0] - result.logit_target).abs().max() <= 1e-5
    assert torch.equal(result.rank[:, 0], result.rank_target)
    # full patching itself is patch_layers' single-layer patch (the paper's experiment)
    direct = patching.patch_layers(toy, [torch.tensor(e.source_ids) for e in enc],
                                   [torch.tensor(e.target_ids) for e in enc], [e.answer_id for e in enc], [(layer,)],
                                   target_pos=[e.target_pos for e in enc], rr_sentinel=sentinel)
    assert torch.equal(direct.rank_patched[:, 0], result.rank_full)
    torch.testing.assert_close(result.rr_full, direct.rr_patched[:, 0])
    explained = result.explained
    assert explained[0] == 0 and abs(float(explained[full]) - 1) < 1e-9
    # a top-k column patches exactly x_tgt + the top-k latents' contributions: its logit is that patched run's
    dec = B.decompose(toy, make_sae(layer), enc, layer)
    top = result.ranking.order[0, :5]
    for i in (0, 7):
        vec = dec.x_tgt[i] + dec.contribution(top)[i]
        want_logit, want_rank = patched_run(toy, enc[i].target_ids, layer, enc[i].target_pos, vec.float(),
                                            enc[i].answer_id)
        assert abs(float(result.logit[i, 2]) - want_logit) <= 1e-4 and int(result.rank[i, 2]) == want_rank
        resid_sq = float(((dec.delta[i] - dec.contribution(top)[i]) ** 2).sum())
        assert result.residual_sq[i, 2].item() == pytest.approx(resid_sq, rel=1e-9)


def test_heldout_ranking_comes_from_the_other_half(toy):
    layer = 2
    enc = encoded(toy, "reference", n=11)
    sae = make_sae(layer)
    result = B.bridge(toy, sae, enc, layer, ks=[3], heldout=True, seed=4)
    folds = result.folds
    assert torch.equal(folds, B.split_folds(11, 4)) and sorted(folds.bincount().tolist()) == [5, 6]
    assert not torch.equal(B.split_folds(11, 4), B.split_folds(11, 5))
    dec = B.decompose(toy, sae, enc, layer)
    for f in (0, 1):
        other = (folds != f).nonzero()[:, 0]
        scores = dec.delta_z[other].abs().mean(0) * dec.directions.norm(dim=-1)
        torch.testing.assert_close(result.ranking.scores[f], scores)
        top = torch.sort(-scores, stable=True).indices[:3]
        mine = (folds == f).nonzero()[:, 0]
        want = ((dec.delta[mine] - dec.contribution(top)[mine]) ** 2).sum(-1)
        torch.testing.assert_close(result.residual_sq[mine, 0], want)
    assert not torch.equal(result.ranking.order[0], result.ranking.order[1])  # the halves rank differently here
    with pytest.raises(OlmoIVError, match="at least 2"):
        B.bridge(toy, sae, enc[:1], layer, ks=[1], heldout=True)


def test_bad_inputs(toy):
    enc = encoded(toy, n=3)
    with pytest.raises(OlmoIVError, match="trained at 'blocks.2.hook_resid_post', but layer=1"):
        B.bridge(toy, make_sae(2), enc, 1)
    with pytest.raises(OlmoIVError, match="k=500 exceeds"):
        B.bridge(toy, make_sae(1), enc, 1, ks=[0, 500])
    with pytest.raises(OlmoIVError, match="each k must be an integer >= 0"):
        B.check_ks([1, -2])
    with pytest.raises(OlmoIVError, match="layer=9 is out of range"):
        B.decompose(toy, make_sae(None), enc, 9)
    wide = SAE(SAEConfig(d_in=64, d_sae=32, k=4))
    with pytest.raises(OlmoIVError, match="d_in=64"):
        B.decompose(toy, wide, enc, 1)


def test_bootstrap_interval_is_scipys_percentile_bootstrap():
    import numpy as np
    from scipy import stats

    x = np.random.default_rng(0).random(40)
    want = stats.bootstrap((x,), np.mean, n_resamples=500, method="percentile", confidence_level=0.9,
                           random_state=np.random.default_rng(3)).confidence_interval
    assert B.bootstrap_mean_ci(x, 0.9, 500, 3) == pytest.approx((want.low, want.high))
    assert B.bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(OlmoIVError, match="finite"):
        B.bootstrap_mean_ci([1.0, float("nan")])


# ----------------------------------------------------------------------------------------------- the run, the CLI


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    """A saved SAE without a hook name, so that it serves whichever layer the run picks."""
    folder = tmp_path_factory.mktemp("sae") / "sae"
    make_sae(None, scale=0.5).save(folder)
    return str(folder)


def test_run_files_resume_and_refusals(tmp_path, sae_folder, toy):
    from olmo_iv.runs.bridge import BridgeSettings, run_bridge

    s = BridgeSettings(sae=sae_folder, samples=30, ks=[0, 2, 8], top_latents=5)
    whole = run_bridge(s, tmp_path / "whole")
    profile = B.layer_profile(toy, encoded(toy, n=30))
    assert whole["layer"] == B.best_layer(profile) and whole["layer_from"] == "best single layer"
    assert whole["full"]["rr_mean"] == pytest.approx(float(profile.rr_patched[:, whole["layer"]].mean()))
    rows = list(csv.DictReader(open(tmp_path / "whole" / "bridge.csv")))
    assert [r["column"] for r in rows] == ["0", "2", "8", "all", "all+error", "target", "full"]
    by = {r["column"]: r for r in rows}
    assert by["all+error"]["rr_mean"] == by["full"]["rr_mean"] and by["0"]["rr_mean"] == by["target"]["rr_mean"]
    assert float(by["all+error"]["explained"]) == pytest.approx(1.0) and float(by["0"]["explained"]) == 0
    assert float(by["full"]["rr_low"]) <= float(by["full"]["rr_mean"]) <= float(by["full"]["rr_high"])
    samples = list(csv.DictReader(open(tmp_path / "whole" / "samples.csv")))
    assert len(samples) == 30 * 5 and len({(r["index"], r["column"]) for r in samples}) == 30 * 5
    latents = list(csv.DictReader(open(tmp_path / "whole" / "latents.csv")))
    assert [int(r["rank"]) for r in latents] == [1, 2, 3, 4, 5] and latents[0]["top_tokens"]
    assert (tmp_path / "whole" / "bridge.png").stat().st_size > 1000
    assert len(list(csv.DictReader(open(tmp_path / "whole" / "layers.csv")))) == toy.config.n_layers

    calls = {"n": 0}

    def killer(label, advance, total, info=None):
        if label == "latent patching":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt  # killed after the first part

    with pytest.raises(KeyboardInterrupt):
        run_bridge(s, tmp_path / "killed", progress=killer)
    done = sorted(p.parent.name for p in (tmp_path / "killed" / "units").glob("*/done.json"))
    assert done == ["layers", "part_0000", "ranking"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "units").rglob("*") if p.is_file()}
    again = run_bridge(s, tmp_path / "killed")  # the same settings continue where the run stopped
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished units were not redone
    for name in ("bridge.csv", "samples.csv", "latents.csv", "layers.csv"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert again["curve"] == whole["curve"]
    with pytest.raises(RunFinished, match="finished; its results are in .*bridge.csv"):
        run_bridge(s, tmp_path / "killed")
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["sae_fingerprint"] == whole["sae_fingerprint"] and "torch" in summary["versions"]

    # an SAE replaced in place is refused when the run continues
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        run_bridge(s, tmp_path / "swap", progress=killer)
    make_sae(None, scale=0.5, seed=9).save(tmp_path / "other")
    import shutil

    saved = tmp_path / "saved"
    shutil.copytree(sae_folder, saved)
    try:
        shutil.rmtree(sae_folder)
        shutil.copytree(tmp_path / "other", sae_folder)
        with pytest.raises(OlmoIVError, match="another SAE"):
            run_bridge(s, tmp_path / "swap")
    finally:
        shutil.rmtree(sae_folder)
        shutil.copytree(saved, sae_folder)


def test_the_sae_decides_the_layer_and_a_bad_sae_blocks_nothing(tmp_path):
    from olmo_iv.runs.bridge import BridgeSettings, run_bridge

    folder = tmp_path / "sae3"
    make_sae(3).save(folder)
    with pytest.raises(OlmoIVError):
        run_bridge(BridgeSettings(sae=str(tmp_path / "missing"), samples=3, ks=[0, 1]), tmp_path / "run")
    summary = run_bridge(BridgeSettings(sae=str(folder), samples=3, ks=[0, 1]), tmp_path / "run")
    assert summary["layer"] == 3 and summary["layer_from"] == "sae" and summary["layer_profile"] is None
    assert not (tmp_path / "run" / "layers.csv").exists()
    with pytest.raises(OlmoIVError, match="trained at 'blocks.3.hook_resid_post', but layer=1"):
        run_bridge(BridgeSettings(sae=str(folder), layer=1, samples=3, ks=[0, 1]), tmp_path / "run2")


def test_settings_errors():
    from olmo_iv.runs.bridge import BridgeSettings

    with pytest.raises(OlmoIVError, match="method='x'"):
        BridgeSettings(method="x")
    with pytest.raises(OlmoIVError, match="samples=1"):
        BridgeSettings(samples=1, heldout=True)
    with pytest.raises(OlmoIVError, match="unknown task"):
        BridgeSettings(task="nope")
    with pytest.raises(OlmoIVError, match="ks is empty"):
        BridgeSettings(ks=[])
    assert BridgeSettings(ks=[4, 0, 4]).ks == [0, 4]


def test_cli(tmp_path, sae_folder):
    from olmo_iv.cli.main import _typer_app, as_flags
    from typer.testing import CliRunner

    out = tmp_path / "c"
    result = CliRunner().invoke(_typer_app, ["saif", "bridge", "--sae", sae_folder, "--samples", "4", "--ks", "0,3",
                                             "--layer", "2", "--mode", "reference", "--heldout", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "full patching" in result.output and "top 3" in result.output and "all+error" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == 2 and summary["layer_from"] == "settings" and summary["settings"]["heldout"]
    assert not (out / "layers.csv").exists()
    bad = CliRunner().invoke(_typer_app, ["saif", "bridge", "--ks", "1,x", "--out", str(tmp_path / "d")])
    assert isinstance(bad.exception, OlmoIVError) and "--ks" in as_flags(str(bad.exception))
    help_ = CliRunner().invoke(_typer_app, ["saif", "--help"])
    assert help_.exit_code == 0 and "bridge" in help_.output
