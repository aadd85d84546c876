"""Path tracing: exactness of every surrogate at the observed point, DP counts against brute force, the frontier
against the per-path product, the fast trace against the direct one, Figures 4/5 rules, and the CLI run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import olmo_iv
from olmo_iv import reference as R
from olmo_iv.analysis import paths as P
from olmo_iv.errors import OlmoIVError
from olmo_iv.kernels import frozen_mlp
from tests.conftest import make_hf_checkpoint

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gqa_relu_model(tmp_path_factory):
    """GQA (4 query heads over 2 kv heads) with a ReLU gate: the two variants the surrogates must also cover."""
    folder, _ = make_hf_checkpoint(tmp_path_factory.mktemp("gqa_relu"), seed=5, num_attention_heads=4,
                                   num_key_value_heads=2, hidden_act="relu", num_hidden_layers=3)
    model = olmo_iv.load(folder)
    assert model.config.hidden_act == "relu" and model.config.n_kv_heads == 2
    return model


def _ids(n: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["mha_silu", "gqa_relu"])
def test_surrogates_exact_at_the_observed_point(which, tiny_model, gqa_relu_model):
    model = tiny_model if which == "mha_silu" else gqa_relu_model
    cfg = model.config
    ids = _ids(9, seed=1)
    obs = P.observe(model, ids)
    sur = P.linearize(model, obs)
    names = ["ln_final.hook_normalized"] + [f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in (
        "hook_resid_pre", "attn.hook_pattern", "hook_attn_out", "hook_resid_mid", "mlp.hook_out", "hook_mlp_out")]
    logits, cache = model.run_with_cache(ids[None], names=names)
    H, dh, rep, T = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads, len(ids)
    for layer, b in enumerate(model.blocks):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [H, T, T]
        # RMSNorm as a diagonal: diag(s_att) y_att == what is added to the residual, and the same after the MLP
        torch.testing.assert_close(sur.s_att[layer] * obs.y_att[layer], cache[f"blocks.{layer}.hook_attn_out"][0], **TOL)
        torch.testing.assert_close(sur.s_mlp[layer] * obs.y_mlp[layer], cache[f"blocks.{layer}.hook_mlp_out"][0], **TOL)
        # frozen gate: M_t h_mid == the MLP's raw output, at every token
        h_mid = cache[f"blocks.{layer}.hook_resid_mid"][0]
        m = frozen_mlp(h_mid, torch.arange(T), sur.act_g[layer], b.mlp.up_proj.weight, b.mlp.down_proj.weight)
        torch.testing.assert_close(m, cache[f"blocks.{layer}.mlp.hook_out"][0], **TOL)
        # attention: sum_h sum_j a^h_qj W_O^h W_V^{kv(h)} x_j == attn.hook_out (Eq. 3's decomposition)
        x = cache[f"blocks.{layer}.hook_resid_pre"][0]
        w_v, w_o = b.attn.v_proj.weight, b.attn.o_proj.weight
        y = torch.zeros(T, cfg.d_model)
        for h in range(H):
            vals = x @ w_v[(h // rep) * dh : (h // rep + 1) * dh].T  # [T, dh]
            y += (pat[h] @ vals) @ w_o[:, h * dh : (h + 1) * dh].T
        torch.testing.assert_close(y, obs.y_att[layer], **TOL)
        # the graph's argmax (first index on ties) and its weight
        assert torch.equal(obs.argmax[layer], pat.argmax(-1))
        torch.testing.assert_close(obs.amax[layer], pat.max(-1).values)
    torch.testing.assert_close(sur.s_fin * obs.x_fin[-1], cache["ln_final.hook_normalized"][0, -1], **TOL)
    torch.testing.assert_close(obs.logits, logits[0, -1], **TOL)
    errors = P.surrogate_errors(model, obs, sur)  # the library's own check, which path-tracing runs record
    assert set(errors) == {"attn_norm", "mlp_norm", "frozen_mlp", "final_norm"} and max(errors.values()) <= 1e-5


def _random_graph(L: int, H: int, T: int, seed: int) -> P.AttnGraph:
    g = torch.Generator().manual_seed(seed)
    q = torch.arange(T).expand(L, H, T)
    argmax = (torch.rand(L, H, T, generator=g) * (q + 1)).long()  # causal: a query attends to a key <= itself
    return P.AttnGraph(argmax, torch.rand(L, H, T, generator=g))


@pytest.mark.parametrize("seed", range(12))
def test_dp_counts_equal_brute_force_enumeration(seed):
    rng = np.random.default_rng(seed)
    L, H, T = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 7))
    graph = _random_graph(L, H, T, seed)
    counts = graph.count_paths()
    brute = [len(R.enumerate_paths(graph, s)) for s in range(T)]
    assert counts == brute
    assert graph.reach()[0].tolist() == [c > 0 for c in counts]
    assert counts[T - 1] >= 1  # the all-self-edges path always exists


def test_counts_pass_int64():
    """Every token attends to every earlier one somewhere: counts grow like T^L and leave int64 behind."""
    L, T = 64, 30
    argmax = torch.minimum(torch.arange(T)[:, None], torch.arange(T)[None, :]).expand(L, T, T).clone()  # min(h, q)
    counts = P.AttnGraph(argmax, torch.ones(L, T, T)).count_paths()
    assert counts[0] > 2**63 and isinstance(counts[0], int)
    # closed form: paths from j to T-1 over L layers on the complete causal DAG = C(L + T-1-j - 1, T-1-j)
    from math import comb

    assert counts == [comb(L - 1 + T - 1 - j, T - 1 - j) for j in range(T)]


@pytest.mark.parametrize("mode", P.MODES)
def test_frontier_values_equal_per_path_product(mode, gqa_relu_model):
    model = gqa_relu_model
    ids = _ids(7, seed=2)
    obs = P.observe(model, ids)
    sur = P.linearize(model, obs)
    graph = P.AttnGraph(obs.argmax, obs.amax)
    sources = list(range(len(ids)))
    chunks = list(P.iter_path_values(model, obs, sur, graph, sources, mode, chunk=3))  # tiny chunks: many splits
    tokens = torch.cat([t for t, _ in chunks])
    values = torch.cat([v for _, v in chunks])
    expected = [p for s in sources for p in R.enumerate_paths(graph, s)]
    assert len(expected) > 20
    assert tokens.tolist() == [list(p) for p in expected]  # same paths, in the reference's DFS order
    direct = torch.stack([R.path_value_direct(model, obs, sur, graph, p, mode) for p in expected])
    torch.testing.assert_close(values, direct, **TOL)


def test_modes_differ_and_reference_ignores_heads(tiny_model):
    ids = _ids(6, seed=3)
    obs = P.observe(tiny_model, ids)
    sur = P.linearize(tiny_model, obs)
    graph = P.AttnGraph(obs.argmax, obs.amax)
    vals = {m: torch.cat([v for _, v in P.iter_path_values(tiny_model, obs, sur, graph, [0, 2], m)]) for m in P.MODES}
    assert not torch.allclose(vals["reference"], vals["masked_heads"])
    assert not torch.allclose(vals["masked_heads"], vals["attn_weighted"])
    # reference values depend on the token sequence only: any argmax graph with the same edges gives them
    path = R.enumerate_paths(graph, 0)[0]
    other = P.AttnGraph(torch.zeros_like(graph.argmax), graph.amax)
    torch.testing.assert_close(R.path_value_direct(tiny_model, obs, sur, other, path, "reference"),
                               R.path_value_direct(tiny_model, obs, sur, graph, path, "reference"))


@pytest.mark.parametrize("mode", P.MODES)
def test_trace_equals_direct_trace(mode, tiny_model):
    ids = _ids(8, seed=0)
    cfg = P.PathConfig(mode=mode, threshold=120, chunk=4, readout_chunk=5)
    fast = P.trace(tiny_model, ids, 17, cfg)
    slow = R.trace_direct(tiny_model, ids, 17, cfg)
    assert 0 < len(fast.tokens) < sum(fast.total)  # the threshold keeps some paths, not all
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.rank, slow.rank)
    torch.testing.assert_close(fast.logit, slow.logit, **TOL)
    assert fast.total == slow.total == P.AttnGraph(fast.graph.argmax, fast.graph.amax).count_paths()
    assert (fast.rank <= 120).all()


def test_head_activity_and_kept_counts_by_hand(tiny_model):
    r = P.trace(tiny_model, _ids(8, seed=4), 3, P.PathConfig(threshold=200))
    L, H, T = r.graph.shape
    a = r.graph.argmax
    by_hand = torch.zeros(T, L, H)
    kept = torch.zeros(T, dtype=torch.long)
    for path in r.tokens.tolist():
        kept[path[0]] += 1
        for layer in range(L):
            for h in range(H):
                by_hand[path[0], layer, h] += float(a[layer, h, path[layer + 1]] == path[layer])
    by_hand /= kept.clamp(min=1)[:, None, None]
    assert torch.equal(r.kept_per_source(), kept)
    torch.testing.assert_close(r.head_activity(chunk=7), by_hand)


def test_sources_threshold_and_memory_guard(tiny_model):
    ids = _ids(8, seed=0)
    r = P.trace(tiny_model, ids, 17, P.PathConfig(sources="5:", threshold=300))  # 300 = vocab: keeps every path
    assert r.sources == [5, 6, 7] and [t for t, n in enumerate(r.total) if n] == [5, 6, 7]
    assert len(r.tokens) == sum(r.total) and set(r.tokens[:, 0].tolist()) == {5, 6, 7}
    assert P.parse_sources("all", 4) == [0, 1, 2, 3]
    assert P.parse_sources("1:-1", 5) == [1, 2, 3]
    assert P.parse_sources("3,1,-1", 5) == [1, 3, 4]
    with pytest.raises(OlmoIVError, match="position 9 is outside a prompt of 5 tokens"):
        P.parse_sources("3,9", 5)  # a source that does not exist is an error, not zero paths
    with pytest.raises(OlmoIVError, match="max_paths"):
        P.trace(tiny_model, ids, 17, P.PathConfig(max_paths=3))
    with pytest.raises(OlmoIVError, match="path mode"):
        P.PathConfig(mode="all_heads")
    with pytest.raises(OlmoIVError, match="sources"):
        P.PathConfig(sources="a:b")
    with pytest.raises(OlmoIVError, match="answer token"):
        P.trace(tiny_model, ids, 10**6)


def test_needs_fp32(tiny_checkpoint):
    model = olmo_iv.load(tiny_checkpoint[0], dtype=torch.bfloat16)
    with pytest.raises(OlmoIVError, match="fp32"):
        P.observe(model, _ids(4))


def test_readout_rank_by_counting_equals_argsort_position():
    g = torch.Generator().manual_seed(0)
    v, w_u, s = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g), torch.rand(16, generator=g)
    logit, rank = P.readout(v, s, w_u, answer=7, chunk=4)
    z = (v * s) @ w_u.T
    torch.testing.assert_close(logit, z[:, 7])
    assert rank.tolist() == [int((row.argsort(descending=True) == 7).nonzero()) + 1 for row in z]


def test_figure_aggregation_rules():
    # Figure 4: mean over the samples given; a position a (shorter) sample lacks counts 0
    assert P.mean_kept_per_token([[2, 4, 6], [0, 2]]).tolist() == [1.0, 3.0, 3.0]
    # Figure 5: sum of per-sample fractions / the requested number of samples, not the completed ones
    a = np.full((2, 3, 4), 0.5)
    b = np.zeros((1, 3, 4))
    b[0, 1, 2] = 1.0
    m = P.mean_head_activity([a, b], n_samples=4)
    assert m.shape == (2, 3, 4) and m[0, 0, 0] == 0.125 and m[0, 1, 2] == 0.375 and m[1, 0, 0] == 0.125
    # the reference rounds each sample's fractions, then the mean, to 2 decimals
    c = np.full((1, 1, 1), 1 / 3)
    assert P.mean_head_activity([c, c, c], n_samples=7, reference_rounding=True)[0, 0, 0] == 0.14


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", *words]))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def test_cli_run_writes_resumes_and_checks_settings(tmp_path, tiny_checkpoint):
    from olmo_iv.cli.main import _typer_app
    from typer.testing import CliRunner

    from olmo_iv import tasks

    samples = tasks.samples("adjectives/adj_comp", n=2)
    words = [w for s in samples for w in (s.clean + " " + s.answer).split()]
    model = olmo_iv.load(tiny_checkpoint[0])
    model.tokenizer = _word_tokenizer(words)
    olmo_iv.save(model, tmp_path / "model")
    out = tmp_path / "run"
    args = ["paths", "--model", str(tmp_path / "model"), "--task", "adjectives/adj_comp", "--samples", "2",
            "--trace", "masked_heads", "--mode", "reference", "--threshold", "150", "--sources", "6:", "--out", str(out)]
    runner = CliRunner()
    res = runner.invoke(_typer_app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["trace"]["mode"] == "masked_heads" and "torch" in summary["versions"]
    for name in ("paths_per_token.csv", "paths_per_token.png", "paths_per_token.pdf", "head_activity.csv", "run.json"):
        assert (out / name).exists(), name
    first = out / "units" / f"{samples[0].index:04d}"
    result = json.loads((first / "result.json").read_text())
    assert result["answer_id"] == model.tokenizer.token_to_id(samples[0].answer)
    assert len(result["kept_paths"]) == len(result["ids"]) and sum(result["kept_paths"][:6]) == 0
    assert any(f.startswith("head_activity_T") for f in summary["files"])
    # the per-sample files hold what the library computes
    enc = tasks.encode(samples, model.tokenizer)[0]
    direct = P.trace(olmo_iv.load(tmp_path / "model"), torch.tensor(enc.clean_ids), enc.answer_id,
                     P.PathConfig(mode="masked_heads", threshold=150, sources="6:"))
    assert result["kept_paths"] == direct.kept_per_source().tolist()
    assert (first / "paths.csv").read_text().count("\n") == 1 + len(direct.tokens)
    # a sample not marked done is redone identically when the same command runs again
    before = (first / "result.json").read_text()
    (first / "result.json").unlink()
    (first / "done.json").unlink()
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**manifest, "finished": False}))  # as if killed before the end
    res = runner.invoke(_typer_app, args)
    assert res.exit_code == 0, res.output
    again = json.loads((first / "result.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in json.loads(before).items()
                                                                  if k != "seconds"}
    res = runner.invoke(_typer_app, args)  # finished: it says so
    assert res.exit_code != 0 and "overwrite=True" in str(res.exception)
    res = runner.invoke(_typer_app, [*args[:-2], "--threshold", "50", "--out", str(out)])
    assert res.exit_code != 0 and "other settings" in str(res.exception)
