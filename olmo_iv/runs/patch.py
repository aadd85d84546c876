"""A patching run on disk: tasks x models -> patching.csv, summary.json, heatmaps; crash-safe and resumable.

Samples are processed in units of PART_SIZE (in sample order), one unit per (model, task, position, part), through
the run store: a run killed at any moment and started again skips the finished units and redoes the rest, so the
final files hold every sample exactly once. `patching.csv` and `summary.json` are assembled from the units at the
end, in a fixed order.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from olmo_iv import tasks as task_registry
from olmo_iv.errors import OlmoIVError
from olmo_iv.interventions.patching import (
    check_grid_size,
    format_layers,
    layer_grid,
    parse_layers,
    patch_layers,
)
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs import figures
from olmo_iv.runs.store import RunStore, slug
from olmo_iv.runs.tables import COLUMNS, fmt_float
from olmo_iv.runs.units import RunKind, Unit, run_in_process

PART_SIZE = 25
DEFAULT_TASKS = ["adjectives/adj_comp", "adjectives/adj_ant", "animals/anim_color", "animals/can_fly"]


@dataclass
class PatchSettings:
    """Everything that determines the numbers of a run; recorded in settings.json and checked on resume."""

    models: list[str] = field(default_factory=lambda: ["toy"])
    """Built-in names, local folders or hub ids."""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """Registry names (`olmo-iv tasks` lists them)."""
    samples: int = 100
    """Samples per task: the first N rows in file order (the paper's choice) unless sample_seed is set."""
    sample_seed: int | None = None
    """Draw a seeded random subset of N rows instead of the first N."""
    layers: int | None = 2
    """Layer-set size: 1 (singles), 2 (pairs and the diagonal, the paper's grid) or 3 (all triples); None when
    explicit `sets` are given."""
    diagonal: bool = True
    """With layers=2, include the single layers as the diagonal (l, l)."""
    sets: list[str] = field(default_factory=list)
    """Explicit layer sets instead of a grid, e.g. ["0-1", "3", "2-5-7"]; overrides `layers`."""
    mode: str = "faithful"
    """'faithful' (the paper's text: a filler token before the query's prompt form, patched at the filler, RR 0
    beyond max_rank) or 'reference' (the authors' code, to reproduce their tables: bare query, patch at 0, RR -1)."""
    target_pos: list[str] = field(default_factory=list)
    """Positions patched in the target: '0', '-1' or 'filler'; empty means '0' (reference) or 'filler' (faithful)."""
    max_rank: int = 1000
    """Ranks above this give the RR sentinel."""
    dtype: str = "float32"
    """Model dtype: float32 (the authors' numbers), bfloat16 or float16."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self) -> None:
        if self.mode not in task_registry.MODES:
            raise OlmoIVError(f"mode {self.mode!r} is not one of {', '.join(task_registry.MODES)}")
        if self.sets:
            self.layers = None  # the run is the explicit sets, whatever the grid size says
        else:
            check_grid_size(self.layers)
        if self.samples < 1:
            raise OlmoIVError(f"samples={self.samples}: give at least 1")
        if self.max_rank < 1:
            raise OlmoIVError(f"max_rank={self.max_rank}: ranks start at 1, give at least 1")
        for text in self.sets:
            parse_layers(text)
        if not self.models or not self.tasks:
            raise OlmoIVError("give at least one model and one task")
        if not self.target_pos:
            self.target_pos = ["0"] if self.mode == "reference" else ["filler"]
        for p in self.target_pos:
            if p not in ("0", "-1", "filler"):
                raise OlmoIVError(f"target position {p!r}: use 0, -1 or filler")
            if p == "filler" and self.mode != "faithful":
                raise OlmoIVError("target position 'filler' exists only in the faithful mode (mode='faithful')")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise OlmoIVError(f"dtype {self.dtype!r}: use float32, bfloat16 or float16")
        for name in self.tasks:
            task_registry.get_task(name)  # an unknown name fails now, listing the known ones

    @property
    def rr_sentinel(self) -> float:
        return -1.0 if self.mode == "reference" else 0.0


def _part_rows(model_name, task, settings, encoded, result, pos_label) -> list[list]:
    # one conversion to Python lists: per-element tensor indexing is slow on 500k-row 7B triple grids
    rr_t, rr_c, rr_p = result.rr_target.tolist(), result.rr_clean.tolist(), result.rr_patched.tolist()
    lg_t, lg_c, lg_p = result.logit_target.tolist(), result.logit_clean.tolist(), result.logit_patched.tolist()
    rk_t, rk_c, rk_p = result.rank_target.tolist(), result.rank_clean.tolist(), result.rank_patched.tolist()
    labels = [(format_layers(ls), len(set(ls))) for ls in result.layer_sets]
    rows = []
    for i, enc in enumerate(encoded):
        s = enc.sample
        head = [model_name, task, settings.mode, s.index, s.query, s.answer, enc.answer_id]
        clean_target = [rk_c[i], fmt_float(rr_c[i]), fmt_float(lg_c[i]), rk_t[i], fmt_float(rr_t[i]), fmt_float(lg_t[i])]
        for j, (label, size) in enumerate(labels):
            rows.append([*head, label, size, pos_label, *clean_target, rk_p[i][j], fmt_float(rr_p[i][j]),
                         fmt_float(lg_p[i][j]), fmt_float(rr_p[i][j] - rr_t[i]), fmt_float(lg_p[i][j] - lg_t[i])])
    return rows


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def run_patching(settings: PatchSettings, out: str | Path, *, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> dict:
    """Run (or continue) the grid and write patching.csv, summary.json and the heatmaps into `out`.

    `progress(task, advance, total)` is called as rows finish. Returns the summary dict.
    """
    store = RunStore.open(out, "patching", asdict(settings), models=settings.models, overwrite=overwrite)
    started = time.perf_counter()
    units = plan(settings)
    timings = run_in_process(PATCHING, store, settings, units, progress=progress)
    timings["total (this invocation)"] = round(time.perf_counter() - started, 3)
    return merge(store, settings, units, timings)


def plan(settings: PatchSettings) -> list[Unit]:
    """One unit per (model, task, target position, part of PART_SIZE samples), in the order patching.csv lists
    them: grouped by model, so a worker loads each model once."""
    units = []
    for model_name in settings.models:
        for task in settings.tasks:
            n = len(task_registry.samples(task, mode=settings.mode, n=settings.samples, seed=settings.sample_seed))
            if not n:
                raise OlmoIVError(f"task {task} has no samples")
            for pos_label in settings.target_pos:
                for k, start in enumerate(range(0, n, PART_SIZE)):
                    units.append(Unit(f"{slug(model_name)}__{slug(task)}__pos{slug(pos_label)}__{k:04d}", model_name,
                                      task, f"patch {model_name} {task} pos {pos_label}",
                                      {"task": task, "pos": pos_label, "start": start}))
    return units


def load_model(settings: PatchSettings, model_name: str, device: str):
    model = load(model_name, dtype=getattr(torch, settings.dtype), device=device)
    if model.tokenizer is None:
        raise OlmoIVError(f"model {model_name!r} has no tokenizer.json: patching needs it to build prompts")
    return model


def do(settings: PatchSettings, unit: Unit, model, progress: ProgressFn | None = None) -> dict[str, str]:
    """Patch one part's samples at every layer set: the unit's rows.csv."""
    task, pos_label, start = unit.data["task"], unit.data["pos"], unit.data["start"]
    samples = task_registry.samples(task, mode=settings.mode, n=settings.samples, seed=settings.sample_seed)
    encoded = task_registry.encode(samples[start : start + PART_SIZE], model.tokenizer)
    sets = _layer_sets(settings, model.config.n_layers)
    positions = [_position(pos_label, e) for e in encoded]
    total = len(samples) * len(sets)
    report = (lambda _, n, __: progress(task, n, total)) if progress else None
    result = patch_layers(
        model, [torch.tensor(e.source_ids) for e in encoded], [torch.tensor(e.target_ids) for e in encoded],
        [e.answer_id for e in encoded], sets, source_pos=-1, target_pos=positions,
        max_rank=settings.max_rank, rr_sentinel=settings.rr_sentinel,
        cleans=[torch.tensor(e.clean_ids) for e in encoded], progress=report)
    return {"rows.csv": _csv_text(_part_rows(unit.model, task, settings, encoded, result, pos_label))}


def _layer_sets(settings: PatchSettings, n_layers: int) -> list[tuple[int, ...]]:
    if settings.sets:  # the engine checks every index against the model's layers
        return [parse_layers(text) for text in settings.sets]
    return layer_grid(n_layers, settings.layers, diagonal=settings.diagonal)


def _position(label: str, enc) -> int:
    if label == "filler":
        return enc.target_pos
    pos = int(label)
    return pos if pos >= 0 else len(enc.target_ids) + pos


def merge(store: RunStore, settings: PatchSettings, units: list[Unit], timings: dict[str, float]) -> dict:
    """Assemble patching.csv from the units in their fixed order, then summary.json and the heatmaps."""
    text = ",".join(COLUMNS) + "\n" + "".join(store.read(unit.id, "rows.csv") for unit in units)
    store.write_text("patching.csv", text)
    table = _read(store.path("patching.csv"))
    summary = {"settings": asdict(settings), "checkpoints": store.checkpoints, "timings_s": timings,
               "verdict_confidence": VERDICT_CONFIDENCE, "verdict": verdict(table), "top10": top10(table),
               "files": ["patching.csv", "summary.json"]}
    for metric, label in (("rr_diff", "mean RR difference (patched - query alone)"),
                          ("logit_diff", "mean logit difference (patched - query alone)")):
        for pos in settings.target_pos:
            fig = patching_figure(table, metric, pos, label=label,
                                  title=f"{settings.mode} prompts, patched at {pos}, {settings.samples} samples per task")
            summary["files"] += [p.name for p in store.save_figure(f"heatmap_{metric}_pos{slug(pos)}", fig)]
    from olmo_iv.io import versions

    summary["versions"] = versions()
    store.write_json("summary.json", summary)
    store.finish(prune_units=True)  # patching.csv holds every unit's rows now
    return summary


def _read(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([r[c] for r in rows]) for c in COLUMNS}


def _means(table: dict[str, np.ndarray], metric: str) -> dict[tuple[str, str, str], dict[str, float]]:
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for m, t, p, layers, v in zip(table["model"], table["task"], table["target_pos"], table["layers"], table[metric]):
        groups.setdefault((m, t, p), {}).setdefault(layers, []).append(float(v))
    return {k: {layers: float(np.mean(v)) for layers, v in g.items()} for k, g in groups.items()}


VERDICT_CONFIDENCE = 0.95


def verdict(table: dict[str, np.ndarray], confidence: float = VERDICT_CONFIDENCE, n_boot: int = 2000,
            seed: int = 0) -> list[dict]:
    """Per model, task and position: the layer set with the largest mean RR difference, a seeded percentile
    bootstrap CI of that mean, and the best single layer beside it. (The same percentile bootstrap as
    scipy.stats.bootstrap, written out for a mean: the main job should not pay 0.6 s to import scipy.stats.)"""
    out = []
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for m, t, p, layers, v in zip(table["model"], table["task"], table["target_pos"], table["layers"],
                                  table["rr_diff"]):
        groups.setdefault((m, t, p), {}).setdefault(layers, []).append(float(v))
    for (m, t, p), by_set in groups.items():
        means = {k: float(np.mean(v)) for k, v in by_set.items()}
        best = max(means, key=means.__getitem__)  # first of equals in the grid's order
        singles = {k: v for k, v in means.items() if "-" not in k}
        single = max(singles, key=singles.__getitem__) if singles else None
        x = np.asarray(by_set[best])
        resampled = x[np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))].mean(1)
        low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
        out.append({"model": m, "task": t, "target_pos": p, "layers": best, "mean": means[best],
                    "ci_low": float(low), "ci_high": float(high), "n": len(x), "best_single": single,
                    "best_single_mean": means[single] if single is not None else float("nan")})
    return out


def top10(table: dict[str, np.ndarray]) -> list[dict]:
    """Per model, task and position: the ten layer sets with the largest mean RR difference and logit difference."""
    out = []
    for metric in ("rr_diff", "logit_diff"):
        for (m, t, p), means in _means(table, metric).items():
            best = sorted(means.items(), key=lambda kv: -kv[1])[:10]  # stable: ties keep the grid order
            out.append({"model": m, "task": t, "target_pos": p, "metric": metric,
                        "top": [{"layers": k, "mean": round(v, 6)} for k, v in best]})
    return out


def patching_figure(table: dict[str, np.ndarray], metric: str, pos: str, *, label: str, title: str):
    """The figure a grid calls for: L x L heatmaps for pairs, a per-layer profile for single layers, and the best
    sets as bars for triples or explicit sets (which have no square picture)."""
    means = {(m, t): v for (m, t, p), v in _means(table, metric).items() if p == pos}
    sizes = {len(parse_layers(k)) for v in means.values() for k in v}
    if sizes == {1}:
        profile = {key: {parse_layers(k)[0]: v for k, v in by.items()} for key, by in means.items()}
        return figures.layer_profile(profile, title=title, label=label)
    if sizes <= {1, 2} and any(len(by) > 1 for by in means.values()):
        return figures.pair_heatmaps(heatmap_panels(table, metric, pos), title=title, label=label)
    best = {key: sorted(by.items(), key=lambda kv: -kv[1])[:10] for key, by in means.items()}
    return figures.top_sets(best, title=f"{title}: the 10 best layer sets", label=label)


def heatmap_panels(table: dict[str, np.ndarray], metric: str, pos: str) -> dict[tuple[str, str], np.ndarray]:
    """(model, task) -> L x L matrix of means: [i][j] for the pair i<j, [l][l] for the single layer, NaN elsewhere."""
    panels = {}
    for (m, t, p), means in _means(table, metric).items():
        if p != pos:
            continue
        cells = {parse_layers(k): v for k, v in means.items()}
        if any(len(k) > 2 for k in cells):
            continue  # triples have no square picture
        n = 1 + max(max(k) for k in cells)
        grid = np.full((n, n), np.nan)
        for k, v in cells.items():
            i, j = (k[0], k[0]) if len(k) == 1 else k
            grid[i, j] = v
        panels[(m, t)] = grid
    return panels


PATCHING = RunKind(name="patch", store_kind="patching", settings_type=PatchSettings, plan=plan, load=load_model,
                   do=do, merge=merge, models=lambda s: list(s.models), dtype=lambda s: s.dtype)
"""Patching's plan/do/merge, for `run_patching` and for sweeps."""
