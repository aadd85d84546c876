"""Superadditivity statistics on activation-patching results (paper §5.1, Tables 3-6).

Question: does patching the instruction vector at two layers together do more than the two single-layer patches
added up? For a layer set S (|S| >= 2) and sample s the *margin* is

    m[s] = f(S)[s] - sum_{l in S} f({l})[s]

with f a per-sample patching score (logit_diff or rr_diff). Superadditivity means m > 0 beyond chance.

Two tests live here, side by side:
- `reference_test`: the authors' test, bug for bug (docs/statistics.md): top-10 tuples picked by the 2-decimal mean
  rr_diff (diagonal included), a 0/1 outcome on logit_diff, and `ttest_1samp(holds, popmean=50)`, whose t only encodes
  k (how many samples satisfied the inequality) and whose p is always ~0. Kept to reproduce the paper's numbers only.
- `sound_test`: every layer set with >= 2 layers is tested (no selection before testing): a one-sided Wilcoxon
  signed-rank test and an exact sign test on the margins, Benjamini-Hochberg across the tested sets, effect sizes
  with confidence intervals, one metric for everything.

Input: `Group`s, one per (model, task, mode, target_pos); `olmo_iv.runs.stats.read_run` reads them from a run.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy import stats

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.interventions.patching import format_layers

METRICS = ("logit_diff", "rr_diff")
"""Per-sample scores the tests can run on: logit_patched - logit_target, rr_patched - rr_target."""

LayerSet = tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class Group:
    """The per-sample scores of one (model, task, mode, target_pos): every layer set, every sample."""

    model: str
    task: str
    mode: str
    target_pos: str
    """'0', '-1' or 'filler', as `olmo-iv patch` labels the patched position."""
    samples: np.ndarray
    """Sample ids, sorted; the columns of every score array."""
    scores: dict[str, dict[LayerSet, np.ndarray]]
    """metric -> layer set (sorted tuple; a single layer l is (l,)) -> [n_samples] float64."""

    @property
    def label(self) -> str:
        return f"{self.model} / {self.task} / {self.mode} / target_pos={self.target_pos}"

    def layer_sets(self) -> list[LayerSet]:
        return sorted(next(iter(self.scores.values())), key=lambda s: (len(s), s))


def select_groups(groups: list[Group], tasks: list[str] | None = None, target_pos: str | int | None = None) -> list[Group]:
    """Groups of the given tasks / target position; an unknown value is an error that lists what exists."""
    out = groups
    if tasks:
        have = sorted({g.task for g in groups})
        match = lambda g, t: g.task == t or g.task.rsplit("/", 1)[-1] == t  # noqa: E731  "adj_comp" works too
        unknown = [t for t in tasks if not any(match(g, t) for g in groups)]
        if unknown:
            raise OlmoIVError(f"task(s) {', '.join(unknown)} not in this run; it has: {', '.join(have)}")
        out = [g for g in out if any(match(g, t) for t in tasks)]
    if target_pos is not None:
        target_pos = str(target_pos)
        have = sorted({g.target_pos for g in out})
        if target_pos not in have:
            raise OlmoIVError(f"target_pos {target_pos} not in this run; it has: {', '.join(map(str, have))}")
        out = [g for g in out if g.target_pos == target_pos]
    return out


def _check_singles(group: Group, sets: list[LayerSet]) -> None:
    scores = next(iter(group.scores.values()))
    need = sorted({layer for s in sets for layer in s})
    missing = [layer for layer in need if (layer,) not in scores]
    if missing:
        raise OlmoIVError(f"{group.label}: no single-layer patches for layer(s) {', '.join(map(str, missing))}; the "
                          "superadditivity margin f(i,j) - f(i) - f(j) needs them: rerun `olmo-iv patch` with single "
                          "layers included")


def margins(group: Group, metric: str, zero_tol: float = 0.0) -> dict[LayerSet, np.ndarray]:
    """Per-sample margin f(S) - sum_l f(l) for every layer set S of >= 2 layers; |m| <= zero_tol is set to 0."""
    if metric not in METRICS:
        raise OlmoIVError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    f = group.scores[metric]
    sets = [s for s in group.layer_sets() if len(s) >= 2]
    if not sets:
        raise OlmoIVError(f"{group.label}: the run has no multi-layer patches (only single layers), so there is "
                          "nothing to test for superadditivity: run `olmo-iv patch` with layer pairs")
    _check_singles(group, sets)
    out = {}
    for s in sets:
        m = f[s] - np.sum([f[(layer,)] for layer in s], axis=0)
        out[s] = np.where(np.abs(m) <= zero_tol, 0.0, m)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The authors' test, reproduced (do not use it as evidence: docs/statistics.md)


@dataclass
class ReferenceRow:
    model: str
    task: str
    mode: str
    target_pos: str
    select_metric: str
    """Metric whose 2-decimal rounded mean picked the tuple (rr_diff in the authors' committed script)."""
    test_metric: str
    """Metric the inequality is evaluated on (always logit_diff in the authors' script)."""
    rank: int
    """1 = highest selected mean."""
    i: int
    j: int
    selected_mean: float
    k: int
    """Samples with f(i,j) >= f(i,i) + f(j,j)."""
    n: int
    t: float
    p: float


def grid_means(group: Group, metric: str) -> list[tuple[tuple[int, int], float]]:
    """The authors' L x L grid, row-major, restricted to computed tuples (pairs i<j and the diagonal (l,l)):
    ((i, j), mean rounded to 2 decimals). Layer triples are not in the grid (the authors' 3-layer files are NaN)."""
    f = group.scores[metric]
    keys = [(s[0], s[-1]) for s in f if len(s) <= 2]
    return [((i, j), float(np.round(np.mean(f[(i,) if i == j else (i, j)]), 2))) for i, j in sorted(keys)]


def reference_ttest(holds: np.ndarray) -> tuple[float, float]:
    """The authors' statistic: ttest_1samp on 0/1 outcomes against popmean=50.0 (a proportion against 50).

    t encodes only k = holds.sum(): k=50 of 100 -> -985.0, k=99 -> -4901, k in {0, n} -> -inf with p = 0.
    """
    with warnings.catch_warnings():  # zero variance at k in {0, n}: scipy warns, then returns -inf as the authors got
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_1samp(np.asarray(holds, dtype=float), popmean=50.0)
    return float(res.statistic), float(res.pvalue)


def reference_test(group: Group, *, top: int = 10, select_metric: str = "rr_diff",
                   test_metric: str = "logit_diff") -> list[ReferenceRow]:
    """`experiments/statistical_test.py` reproduced: pick the `top` grid tuples by 2-decimal mean `select_metric`
    (stable descending sort, ties in row-major order, diagonal included), then per sample
    holds = f(i,j) >= f(i,i) + f(j,j) on `test_metric` (for (l,l): f(l) <= 0), then `reference_ttest`."""
    grid = grid_means(group, select_metric)
    if not any(i != j for (i, j), _ in grid):
        raise OlmoIVError(f"{group.label}: the run has no layer pairs, so the authors' test has nothing to rank")
    _check_singles(group, [(i, j) for (i, j), _ in grid])
    chosen = sorted(grid, key=lambda kv: kv[1], reverse=True)[:top]  # Python's sort is stable, also in reverse
    f = group.scores[test_metric]
    rows = []
    for rank, ((i, j), mean) in enumerate(chosen, start=1):
        pair = f[(i,) if i == j else (i, j)]
        holds = pair >= f[(i,)] + f[(j,)]
        t, p = reference_ttest(holds)
        rows.append(ReferenceRow(group.model, group.task, group.mode, group.target_pos, select_metric, test_metric,
                                 rank, i, j, mean, int(holds.sum()), len(holds), t, p))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The sound test


@dataclass
class StatsConfig:
    metric: str = "logit_diff"
    """Score used for the margins, the ranking and the tests alike: logit_diff or rr_diff."""
    alpha: float = 0.05
    """False discovery rate across the tested layer sets of a group."""
    fdr: str = "bh"
    """'bh' (Benjamini-Hochberg: valid under independence or positive dependence of the tests) or 'by'
    (Benjamini-Yekutieli: any dependence, more conservative). Pairs sharing a layer share its single-layer scores."""
    confidence: float = 0.95
    """Level of every confidence interval."""
    n_boot: int = 2000
    """Bootstrap resamples for the rank-biserial interval (percentile method; 0: no interval)."""
    seed: int = 0
    """Seed of the bootstrap."""
    zero_tol: float = 1e-6
    """Margins with |m| <= zero_tol count as exact ties (0): float noise of batched runs is not evidence."""
    top: int = 10
    """Rows shown and written to LaTeX per group (by mean margin); the CSV has every tested set."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise OlmoIVError(f"metric={self.metric!r}: use one of {', '.join(METRICS)}")
        if self.fdr not in ("bh", "by"):
            raise OlmoIVError(f"fdr={self.fdr!r}: use 'bh' (Benjamini-Hochberg) or 'by' (Benjamini-Yekutieli)")
        check_range("alpha", self.alpha, 0, 1, low_open=True, high_open=True)
        check_range("confidence", self.confidence, 0, 1, low_open=True, high_open=True)
        check_range("n_boot", self.n_boot, 0)
        check_range("zero_tol", self.zero_tol, 0)
        check_range("top", self.top, 1)


@dataclass
class SoundRow:
    model: str
    task: str
    mode: str
    target_pos: str
    metric: str
    layers: str
    """The tested layer set, '3-7'."""
    n: int
    n_pos: int
    """Samples with margin > 0."""
    n_neg: int
    n_zero: int
    """Samples with |margin| <= zero_tol: dropped by the signed-rank and the sign test."""
    mean: float
    mean_lo: float
    mean_hi: float
    """t interval of the mean margin."""
    median: float
    median_lo: float
    median_hi: float
    """Distribution-free (order-statistic) interval of the median margin."""
    rank_biserial: float
    """Matched-pairs rank-biserial correlation (R+ - R-) / (R+ + R-), in [-1, 1]."""
    rb_lo: float
    rb_hi: float
    """Percentile bootstrap interval of the rank-biserial correlation."""
    w_stat: float
    """Wilcoxon R+ (sum of ranks of positive margins, zeros dropped)."""
    p_wilcoxon: float
    """One-sided (greater) Wilcoxon signed-rank p-value."""
    q_wilcoxon: float
    """FDR-adjusted p-value (StatsConfig.fdr) across the group's tested sets."""
    p_sign: float
    """One-sided exact binomial sign test of n_pos out of n_pos + n_neg against 1/2."""
    q_sign: float
    significant: bool
    """q_wilcoxon <= alpha."""
    rank: int = 0
    """Position by mean margin within the group (1 = largest)."""


def rank_biserial(m: np.ndarray, axis: int = -1) -> np.ndarray:
    """Matched-pairs rank-biserial correlation of margins along `axis`, zeros dropped (as the Wilcoxon test does).

    Ranks of |m| among the non-zero entries equal the ranks among all entries minus the number of zeros
    (the zeros take the lowest ranks), which keeps this vectorised over bootstrap resamples.
    """
    m = np.asarray(m, dtype=float)
    ranks = stats.rankdata(np.abs(m), axis=axis)
    zeros = np.sum(m == 0, axis=axis, keepdims=True)
    ranks = ranks - zeros
    r_pos = np.sum(np.where(m > 0, ranks, 0.0), axis=axis)
    r_neg = np.sum(np.where(m < 0, ranks, 0.0), axis=axis)
    total = r_pos + r_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (r_pos - r_neg) / np.where(total > 0, total, 1.0), np.nan)


def margin_stats(m: np.ndarray, cfg: StatsConfig) -> dict[str, float]:
    """All statistics of one margin vector (no multiple-testing correction): the fields of `SoundRow`."""
    m = np.asarray(m, dtype=float)
    n, pos, neg = len(m), int(np.sum(m > 0)), int(np.sum(m < 0))
    out: dict[str, float] = dict(n=n, n_pos=pos, n_neg=neg, n_zero=n - pos - neg, mean=float(np.mean(m)),
                                 median=float(np.median(m)))
    nan = float("nan")
    if n >= 2 and np.ptp(m) > 0:
        ci = stats.ttest_1samp(m, 0.0).confidence_interval(cfg.confidence)
        out.update(mean_lo=float(ci.low), mean_hi=float(ci.high))
    else:  # constant margins: the interval collapses onto the value
        out.update(mean_lo=float(m[0]) if n else nan, mean_hi=float(m[0]) if n else nan)
    ci = stats.quantile_test(m, q=0, p=0.5).confidence_interval(cfg.confidence)
    out.update(median_lo=float(ci.low), median_hi=float(ci.high))
    if pos + neg == 0:  # every margin is an exact tie: no evidence either way
        out.update(rank_biserial=nan, rb_lo=nan, rb_hi=nan, w_stat=0.0, p_wilcoxon=1.0, p_sign=1.0)
        return out
    w = stats.wilcoxon(m, alternative="greater", zero_method="wilcox")
    out.update(w_stat=float(w.statistic), p_wilcoxon=float(w.pvalue),
               p_sign=float(stats.binomtest(pos, pos + neg, 0.5, alternative="greater").pvalue),
               rank_biserial=float(rank_biserial(m)))
    if cfg.n_boot > 0 and n >= 2:
        # scipy's percentile bootstrap, vectorised over resamples; a resample of exact ties only has no
        # rank-biserial (NaN), and then the interval is NaN rather than a number that silently ignores it
        ci = stats.bootstrap((m,), rank_biserial, vectorized=True, n_resamples=cfg.n_boot, method="percentile",
                             confidence_level=cfg.confidence,
                             random_state=np.random.default_rng(cfg.seed)).confidence_interval
        out.update(rb_lo=float(ci.low), rb_hi=float(ci.high))
    else:
        out.update(rb_lo=nan, rb_hi=nan)
    return out


def sound_test(group: Group, cfg: StatsConfig | None = None) -> list[SoundRow]:
    """Test every layer set of >= 2 layers of the group for superadditivity; rows sorted by mean margin
    (largest first, ties by layer set). BH runs over all tested sets, so showing only the top rows selects
    nothing that was not already corrected for."""
    cfg = cfg or StatsConfig()
    ms = margins(group, cfg.metric, cfg.zero_tol)
    per = {s: margin_stats(m, cfg) for s, m in ms.items()}
    sets = list(per)
    if cfg.fdr not in ("bh", "by"):
        raise OlmoIVError(f"unknown FDR method {cfg.fdr!r}: use 'bh' or 'by'")
    q_w = stats.false_discovery_control([per[s]["p_wilcoxon"] for s in sets], method=cfg.fdr)
    q_s = stats.false_discovery_control([per[s]["p_sign"] for s in sets], method=cfg.fdr)
    rows = []
    for s, qw, qs in zip(sets, q_w, q_s, strict=True):
        rows.append(SoundRow(group.model, group.task, group.mode, group.target_pos, cfg.metric, format_layers(s),
                             q_wilcoxon=float(qw), q_sign=float(qs), significant=bool(qw <= cfg.alpha), **per[s]))
    order = sorted(range(len(rows)), key=lambda r: (-rows[r].mean, (len(sets[r]), sets[r])))
    rows = [rows[r] for r in order]
    for rank, row in enumerate(rows, start=1):
        row.rank = rank
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Files


def csv_rows(rows: list, row_type: type) -> tuple[list[str], list[list]]:
    """(header, rows) of a list of result dataclasses, floats in their exact shortest form."""
    names = [f.name for f in fields(row_type)]
    return names, [[repr(float(v)) if isinstance(v, float) else v for v in asdict(row).values()] for row in rows]


def _tex(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")


def _num(x: float, fmt: str = ".2f") -> str:
    return "--" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _groups_of(rows: list) -> dict[tuple, list]:
    out: dict[tuple, list] = defaultdict(list)
    for row in rows:
        out[(row.model, row.task, row.mode, row.target_pos)].append(row)
    return out


def sound_latex(rows: list[SoundRow], cfg: StatsConfig) -> str:
    """One tabular per group with its top rows by mean margin (booktabs)."""
    out = []
    pct = round(cfg.confidence * 100)
    for (model, task, mode, pos), rs in _groups_of(rows).items():
        shown = [r for r in rs if r.rank <= cfg.top]
        out.append(f"% {_tex(model)} / {_tex(task)} / mode {_tex(mode)} / target_pos {pos}: top {len(shown)} of "
                   f"{len(rs)} tested layer sets by mean margin of {cfg.metric}; q = {cfg.fdr.upper()} over all {len(rs)}")
        out.append("\\begin{tabular}{lrrrrrr}\n\\toprule")
        out.append(f"Layers & Mean margin [{pct}\\% CI] & Median & $r_{{rb}}$ & $k_+/k_-$ & $p_W$ & $q_W$ \\\\\n\\midrule")
        for r in shown:
            star = "$^*$" if r.significant else ""
            out.append(f"({r.layers.replace('-', ', ')}) & {_num(r.mean)} [{_num(r.mean_lo)}, {_num(r.mean_hi)}] & "
                       f"{_num(r.median)} & {_num(r.rank_biserial)} & {r.n_pos}/{r.n_neg} & {_num(r.p_wilcoxon, '.2e')} & "
                       f"{_num(r.q_wilcoxon, '.2e')}{star} \\\\")
        out.append("\\bottomrule\n\\end{tabular}\n")
    return "\n".join(out)


def reference_latex(rows: list[ReferenceRow]) -> str:
    """The authors' table layout, `(i, j) & t & p`, with k added so that the reader sees what t encodes."""
    out = []
    for (model, task, mode, pos), rs in _groups_of(rows).items():
        out.append(f"% {_tex(model)} / {_tex(task)} / mode {_tex(mode)} / target_pos {pos}: the authors' test "
                   f"(top {len(rs)} by mean {rs[0].select_metric}, tested on {rs[0].test_metric}, "
                   "ttest_1samp(0/1, popmean=50)); t encodes only k, p carries no evidence")
        out.append("\\begin{tabular}{lrrr}\n\\toprule\nTuple & $t$ & $p$ & $k$ \\\\\n\\midrule")
        for r in rs:
            out.append(f"({r.i}, {r.j}) & {_num(r.t, '.1f')} & {_num(r.p, '.3e')} & {r.k}/{r.n} \\\\")
        out.append("\\bottomrule\n\\end{tabular}\n")
    return "\n".join(out)


@dataclass
class StatsResult:
    sound: list[SoundRow]
    reference: list[ReferenceRow]
    files: list[Path] = field(default_factory=list)
