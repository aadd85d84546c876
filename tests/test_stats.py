"""Superadditivity statistics: the authors' test reproduced exactly, and the sound test's power and size."""

from __future__ import annotations

import csv
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from olmo_iv.analysis.superadditivity import (
    Group,
    StatsConfig,
    margins,
    rank_biserial,
    reference_test,
    reference_ttest,
    sound_test,
)
from olmo_iv.errors import OlmoIVError
from olmo_iv.runs.stats import read_run, run_stats

COLUMNS = ("model", "task", "mode", "sample", "layers", "n_layers", "target_pos", "rank_clean", "rr_clean",
           "logit_clean", "rank_target", "rr_target", "logit_target", "rank_patched", "rr_patched",
           "logit_patched", "rr_diff", "logit_diff")
"""The columns statistics read (patching.csv has more: query, answer, answer_id)."""

# ------------------------------------------------------------------------------------------------------------
# A synthetic-run generator: writes patching.csv + summary.json in the format `olmo-iv patch` writes.


def additive_scores(rng: np.random.Generator, n_layers: int, n_samples: int, *, triples: bool = False,
                    margin=None, single_noise: float = 1.0) -> dict[tuple[int, ...], np.ndarray]:
    """Per-sample true effects g(l) ~ N(mu_l, 1); a set S scores sum g(l) + margin(S, rng, n) (default N(0, 1)),
    a single layer scores g(l) + e_l with e_l ~ N(0, single_noise). The observed margin of S is margin(S) - sum e_l,
    so sets sharing a layer have correlated margins, as in real runs; it stays symmetric about 0 when margin is."""
    mu = rng.normal(0, 1, n_layers)
    g = [mu[layer] + rng.normal(0, 1, n_samples) for layer in range(n_layers)]
    f = {(layer,): g[layer] + rng.normal(0, single_noise, n_samples) for layer in range(n_layers)}
    margin = margin or (lambda s, rng, n: rng.normal(0, 1, n))
    sets = list(itertools.combinations(range(n_layers), 2))
    if triples:
        sets += list(itertools.combinations(range(n_layers), 3))
    for s in sets:
        f[s] = sum(g[layer] for layer in s) + margin(s, rng, n_samples)
    return f


def run_rows(logit: dict, rr: dict | None = None, *, model: str = "synthetic", task: str = "adj_comp",
             mode: str = "reference", target_pos: int = 0, seed: int = 0) -> list[dict]:
    """Long-format rows; rr_diff defaults to a coarse (tie-heavy) function of logit_diff, like real RR scores."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(logit.values())))
    rr = rr or {s: np.round(np.tanh(v / 4), 2) for s, v in logit.items()}
    rank_t = rng.integers(1, 1500, n)
    rr_t = np.where(rank_t <= 1000, 1.0 / rank_t, -1.0)
    logit_t, logit_c = rng.normal(0, 2, n), rng.normal(5, 2, n)
    rows = []
    for s in sorted(logit, key=lambda s: (len(s), s)):
        for i in range(n):
            rr_p = rr_t[i] + rr[s][i]
            rank_p = round(1 / rr_p) if 0 < rr_p <= 1 else -1
            rows.append(dict(model=model, task=task, mode=mode, sample=i, layers="-".join(map(str, s)), n_layers=len(s),
                             target_pos=target_pos, rank_clean=1, rr_clean=1.0, logit_clean=logit_c[i],
                             rank_target=rank_t[i], rr_target=rr_t[i], logit_target=logit_t[i], rank_patched=rank_p,
                             rr_patched=rr_p, logit_patched=logit_t[i] + logit[s][i], rr_diff=rr[s][i],
                             logit_diff=logit[s][i]))
    return rows


def write_run(run_dir: Path, rows: list[dict], columns=COLUMNS) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "patching.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (run_dir / "summary.json").write_text(json.dumps({"settings": {"model": "synthetic"}, "versions": {"x": "1"}}))
    return run_dir


def group(logit: dict, rr: dict | None = None) -> Group:
    """The in-memory Group that read_run would build (for the fast many-seed checks)."""
    n = len(next(iter(logit.values())))
    rr = rr or {s: np.round(np.tanh(v / 4), 2) for s, v in logit.items()}
    return Group("synthetic", "t", "reference", "0", np.arange(n), {"logit_diff": logit, "rr_diff": rr})


# ------------------------------------------------------------------------------------------------------------
# The authors' test


@pytest.mark.parametrize("k,t_expected", [(50, -985.0), (99, -4901.0), (100, -math.inf)])
def test_reference_t_values_encode_k(tmp_path, k, t_expected):
    n = 100
    f01 = np.where(np.arange(n) < k, 1.0, -1.0)  # (0,1) holds for exactly k samples since f(0) = f(1) = 0
    logit = {(0,): np.zeros(n), (1,): np.full(n, 0.5), (0, 1): f01 + 0.5}
    rr = {(0,): np.full(n, 0.1), (1,): np.full(n, 0.2), (0, 1): np.full(n, 0.3)}
    groups, _ = read_run(write_run(tmp_path, run_rows(logit, rr)))
    rows = reference_test(groups[0])
    assert [(r.i, r.j) for r in rows] == [(0, 1), (1, 1), (0, 0)]  # by mean rr, diagonal included
    pair = rows[0]
    assert pair.k == k and pair.n == n and pair.select_metric == "rr_diff" and pair.test_metric == "logit_diff"
    if math.isinf(t_expected):
        assert pair.t == -math.inf and pair.p == 0.0
    else:
        assert round(pair.t, 1) == t_expected
        assert 0 < pair.p < 1e-190  # "highly significant" whatever the data
    # diagonal (l,l): holds iff f(l) <= 0: layer 0 (f = 0) holds always, layer 1 (f = 0.5) never
    assert (rows[2].k, rows[1].k) == (100, 0)
    assert rows[1].t == rows[2].t == -math.inf


def test_reference_ttest_matches_scipy_on_booleans():
    for k in (1, 2, 50, 88, 96, 99):
        holds = np.arange(100) < k
        t, p = reference_ttest(holds)
        expected = (k / 100 - 50) / (math.sqrt(k * (100 - k) / (100 * 99)) / 10)
        assert t == pytest.approx(expected, rel=1e-12)
        assert (t, p) == tuple(float(x) for x in stats.ttest_1samp(holds.astype(float), popmean=50.0))


def test_reference_selection_rounds_then_sorts_stably_in_row_major_order():
    n, L = 10, 5
    rng = np.random.default_rng(0)
    logit = {(i,) if i == j else (i, j): rng.normal(size=n) for i in range(L) for j in range(i, L)}
    # means before rounding: (0,3) 0.304 and (1,1) 0.296 both round to 0.30 -> row-major: (0,3) before (1,1);
    # (2,4) 0.296 ties too and comes last; (3,4) 0.31 is strictly larger; everything else is 0.0
    rr = {s: np.zeros(n) for s in logit}
    for s, v in {(0, 3): 0.304, (1,): 0.296, (2, 4): 0.296, (3, 4): 0.31}.items():
        rr[s] = np.full(n, v)
    rows = reference_test(group(logit, rr))
    got = [(r.i, r.j) for r in rows]
    zeros_row_major = [(0, 0), (0, 1), (0, 2), (0, 4), (1, 2), (1, 3)]  # the first 6 of the 0.0 ties
    assert got == [(3, 4), (0, 3), (1, 1), (2, 4)] + zeros_row_major
    assert [r.selected_mean for r in rows[:4]] == [0.31, 0.30, 0.30, 0.30]
    # selection metric switch (the authors' BigBench tables were picked by logit means)
    by_logit = reference_test(group(logit, rr), select_metric="logit_diff")
    means = {(s[0], s[-1]): round(float(np.mean(v)), 2) for s, v in logit.items()}
    assert [r.selected_mean for r in by_logit] == sorted(means.values(), reverse=True)[:10]


# ------------------------------------------------------------------------------------------------------------
# The sound test


def test_margins_are_set_minus_sum_of_singles_including_triples():
    rng = np.random.default_rng(1)
    f = additive_scores(rng, 4, 30, triples=True)
    m = margins(group(f), "logit_diff")
    assert set(m) == {s for s in f if len(s) >= 2}
    np.testing.assert_allclose(m[(1, 3)], f[(1, 3)] - f[(1,)] - f[(3,)])
    np.testing.assert_allclose(m[(0, 2, 3)], f[(0, 2, 3)] - f[(0,)] - f[(2,)] - f[(3,)])


def test_rank_biserial_known_values_and_link_to_wilcoxon():
    assert rank_biserial(np.array([1.0, -2.0, 3.0])) == pytest.approx(1 / 3)  # R+ = 1 + 3, R- = 2
    assert rank_biserial(np.array([0.0, 1.0, -2.0, 0.0, 3.0])) == pytest.approx(1 / 3)  # zeros dropped
    assert rank_biserial(np.array([1.0, 2.0])) == 1.0 and rank_biserial(np.array([-1.0, -5.0])) == -1.0
    assert np.isnan(rank_biserial(np.zeros(4)))
    m = np.random.default_rng(2).normal(0.3, 1, 40).round(1)  # ties and zeros
    nz = int(np.sum(m != 0))
    r_plus = stats.wilcoxon(m, alternative="greater").statistic
    assert rank_biserial(m) == pytest.approx(4 * r_plus / (nz * (nz + 1)) - 1)
    # vectorised over rows == row by row
    rows = np.random.default_rng(3).normal(size=(5, 12)).round(1)
    np.testing.assert_allclose(rank_biserial(rows), [rank_biserial(r) for r in rows])


def test_rank_biserial_interval_is_scipys_percentile_bootstrap():
    rng = np.random.default_rng(4)
    x = rng.normal(0.3, 1, 60)
    (row,) = sound_test(group({(0,): np.zeros(60), (1,): np.zeros(60), (0, 1): x}), StatsConfig(n_boot=4000))
    ref = stats.bootstrap((x,), rank_biserial, vectorized=True, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert (row.rb_lo, row.rb_hi) == (ref.low, ref.high)  # the same draws: the same interval
    assert row.rb_lo < row.rank_biserial < row.rb_hi


def test_sound_test_finds_planted_superadditivity(tmp_path):
    planted = {(1, 3): 1.0, (2, 5): 1.3}  # margin sd is sqrt(3): effects of 0.6 and 0.75 sd
    rng = np.random.default_rng(0)
    f = additive_scores(rng, 6, 100, margin=lambda s, rng, n: rng.normal(planted.get(s, 0.0), 1, n))
    groups, _ = read_run(write_run(tmp_path, run_rows(f)))
    rows = sound_test(groups[0], StatsConfig(n_boot=500))
    assert len(rows) == 15 and [r.rank for r in rows] == list(range(1, 16))
    by = {r.layers: r for r in rows}
    for name in ("1-3", "2-5"):
        r = by[name]
        assert r.significant and r.q_wilcoxon < 0.01 and r.q_sign < 0.05
        assert r.mean_lo > 0 and r.median_lo > 0 and 0 < r.rb_lo < r.rank_biserial < r.rb_hi
    assert {rows[0].layers, rows[1].layers} == {"1-3", "2-5"}
    # BH adjusted values equal scipy's on the raw p-values of all 15 pairs
    np.testing.assert_allclose([r.q_wilcoxon for r in rows],
                               stats.false_discovery_control([r.p_wilcoxon for r in rows]))
    null = [r for r in rows if r.layers not in ("1-3", "2-5")]
    assert sum(r.significant for r in null) <= 1


def test_sound_test_false_positive_rate_is_nominal_on_additive_data():
    """Margins symmetric about 0 (continuous, and discrete with ties and zeros): P(p <= .05) <= .05 + 3 SE."""
    n_seeds, alpha = 200, 0.05
    cfg = StatsConfig(n_boot=0)
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_seeds)
    values = np.array([-0.5, -1 / 3, 0.0, 0.0, 1 / 3, 0.5])
    draws = {
        "normal": lambda s, rng, n: rng.normal(0, 1, n),
        "laplace": lambda s, rng, n: rng.laplace(0, 1, n),
        "discrete": lambda s, rng, n: rng.choice(values, n),
    }
    for name, draw in draws.items():
        rej_w = rej_s = 0
        for seed in range(n_seeds):
            noise = 0.0 if name == "discrete" else 1.0  # exact ties need noise-free single-layer scores
            f = additive_scores(np.random.default_rng(seed), 2, 40, margin=draw, single_noise=noise)
            (row,) = sound_test(group(f), cfg)
            rej_w += row.p_wilcoxon <= alpha
            rej_s += row.p_sign <= alpha
        assert rej_w / n_seeds <= bound, (name, rej_w)
        assert rej_s / n_seeds <= bound, (name, rej_s)
        assert rej_w > 0 or name == "discrete"  # the test is not simply dead


def test_bh_keeps_the_family_wise_error_under_the_global_null():
    """All 6 pairs of 4 layers additive (pairs share single-layer scores, so the tests are dependent): under
    the global null every discovery is false, so P(any q <= .05) is the FDR and must stay <= .05 + 3 SE."""
    n_seeds, alpha = 200, 0.05
    hits = 0
    for seed in range(n_seeds):
        rows = sound_test(group(additive_scores(np.random.default_rng(1000 + seed), 4, 30)), StatsConfig(n_boot=0))
        hits += any(r.significant for r in rows)
    assert hits / n_seeds <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_seeds), hits


def test_exact_zero_margins_give_no_evidence_and_no_warnings():
    n = 20
    f = {(0,): np.ones(n), (1,): np.zeros(n), (0, 1): np.ones(n) + 1e-9}  # layer 1 has no effect (e.g. the last layer)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (row,) = sound_test(group(f), StatsConfig(zero_tol=1e-6))
    assert row.n_zero == n and row.p_wilcoxon == 1.0 and row.p_sign == 1.0 and not row.significant


def test_same_metric_for_ranking_and_testing():
    rng = np.random.default_rng(5)
    f = additive_scores(rng, 4, 50)
    rr = {s: rng.normal(size=50) for s in f}
    rows = sound_test(group(f, rr), StatsConfig(metric="rr_diff", n_boot=0))
    m = margins(group(f, rr), "rr_diff")
    assert all(r.metric == "rr_diff" for r in rows)
    assert [r.layers for r in rows] == ["-".join(map(str, s)) for s in sorted(m, key=lambda s: -m[s].mean())]
    assert rows[0].mean == pytest.approx(max(v.mean() for v in m.values()))


# ------------------------------------------------------------------------------------------------------------
# Reading runs: clear errors


def test_read_run_errors(tmp_path):
    n = 5
    f = {(0,): np.zeros(n), (1,): np.zeros(n), (0, 1): np.ones(n)}
    rows = run_rows(f)
    with pytest.raises(OlmoIVError, match="lacks the column.*logit_diff"):
        read_run(write_run(tmp_path / "a", rows, [c for c in COLUMNS if c != "logit_diff"]))
    g, _ = read_run(write_run(tmp_path / "b", [r for r in rows if r["layers"] != "1"]))
    with pytest.raises(OlmoIVError, match="no single-layer patches for layer.* 1"):
        sound_test(g[0])
    with pytest.raises(OlmoIVError, match="no single-layer patches"):
        reference_test(g[0])
    g, _ = read_run(write_run(tmp_path / "c", [r for r in rows if r["n_layers"] == 1]))
    with pytest.raises(OlmoIVError, match="no multi-layer patches"):
        sound_test(g[0])
    with pytest.raises(OlmoIVError, match="no layer pairs"):
        reference_test(g[0])
    with pytest.raises(OlmoIVError, match="appears twice"):
        read_run(write_run(tmp_path / "d", rows + rows[:1]))
    with pytest.raises(OlmoIVError, match="different set of samples"):
        read_run(write_run(tmp_path / "e", rows[:-1]))
    with pytest.raises(OlmoIVError, match="no patching.csv"):
        read_run(tmp_path)
    (tmp_path / "b" / "summary.json").unlink()
    with pytest.raises(OlmoIVError, match="no summary.json"):
        read_run(tmp_path / "b")
    with pytest.raises(OlmoIVError, match="task.*nope.*adj_comp"):
        run_stats(write_run(tmp_path / "f", rows), tasks=["nope"], write=False)


# ------------------------------------------------------------------------------------------------------------
# The command


def test_stats_command_writes_tables_and_metadata(tmp_path):
    import typer
    from olmo_iv.cli.stats import stats_command
    from typer.testing import CliRunner

    app = typer.Typer()  # a group (the callback keeps Typer from collapsing a one-command app)
    app.callback()(lambda: None)
    app.command("stats")(stats_command)

    rng = np.random.default_rng(0)
    rows = []
    for task, pos in itertools.product(("adj_comp", "can_fly"), (0, -1)):
        rows += run_rows(additive_scores(rng, 5, 30), task=task, target_pos=pos)
    run = write_run(tmp_path / "run", rows)
    res = CliRunner().invoke(app, ["stats", str(run), "--task", "can_fly", "--target-pos", "0", "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    assert "Superadditivity (logit_diff)" in res.output and "can_fly" in res.output and "adj_comp" not in res.output
    # a selection gets its own files: the statistics of the whole run are never replaced by a part's
    with open(run / "stats_sound_logit_diff__can_fly__pos0.csv") as f:
        sound = list(csv.DictReader(f))
    assert len(sound) == 10 and {r["task"] for r in sound} == {"can_fly"} and {r["target_pos"] for r in sound} == {"0"}
    with open(run / "stats_reference__can_fly__pos0.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    tex = (run / "stats_sound_logit_diff__can_fly__pos0.tex").read_text()
    assert tex.count("\\begin{tabular}") == 1 and "can\\_fly" in tex
    assert "& $t$ & $p$" in (run / "stats_reference__can_fly__pos0.tex").read_text()
    meta = json.loads((run / "stats_sound_logit_diff__can_fly__pos0.json").read_text())
    assert meta["settings"]["metric"] == "logit_diff" and meta["settings"]["n_boot"] == 200
    assert meta["input"]["run_settings"] == {"model": "synthetic"} and "numpy" in meta["versions"]
    assert not list(run.glob(".*tmp*"))  # atomic writes leave no temporaries

    res = CliRunner().invoke(app, ["stats", str(run), "--metric", "rr_diff", "--n-boot", "0"])
    assert res.exit_code == 0, res.output
    with open(run / "stats_sound_rr_diff.csv") as f:
        assert len(list(csv.DictReader(f))) == 40


def test_stats_command_error_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import olmo_iv.cli.main

    n = 4
    run = write_run(tmp_path, run_rows({(0,): np.zeros(n), (1,): np.zeros(n)}))
    monkeypatch.setattr(sys, "argv", ["olmo-iv", "stats", str(run)])
    with pytest.raises(SystemExit) as exit_:
        olmo_iv.cli.main.app()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "no multi-layer patches" in " ".join(err.split()) and "Traceback" not in err
