"""Superadditivity statistics of a patching run (`olmo-iv stats RUN_DIR`), written into that run's folder."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from olmo_iv.analysis.superadditivity import (
    METRICS,
    Group,
    LayerSet,
    ReferenceRow,
    SoundRow,
    StatsConfig,
    StatsResult,
    csv_rows,
    reference_latex,
    reference_test,
    select_groups,
    sound_latex,
    sound_test,
)
from olmo_iv.errors import OlmoIVError
from olmo_iv.interventions.patching import format_layers, parse_layers
from olmo_iv.io import versions
from olmo_iv.runs.store import RunStore, slug
from olmo_iv.runs.tables import COLUMNS


def read_run(run_dir: str | Path) -> tuple[list[Group], dict]:
    """Read RUN_DIR/patching.csv and RUN_DIR/summary.json into one `Group` per (model, task, mode, target_pos).

    Every layer set of a group must cover the same samples, and no (sample, layer set) may appear twice:
    a half-written or concatenated run is reported, never silently trimmed.
    """
    run_dir = Path(run_dir)
    path, summary_path = run_dir / "patching.csv", run_dir / "summary.json"
    if not run_dir.is_dir():
        raise OlmoIVError(f"no such run folder: {run_dir}")
    if not path.exists():
        raise OlmoIVError(f"{run_dir} has no patching.csv: run `olmo-iv patch` first, or pass the run folder it wrote")
    if not summary_path.exists():
        raise OlmoIVError(f"{run_dir} has no summary.json: the run is incomplete or was not written by `olmo-iv patch`")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise OlmoIVError(f"{summary_path} is not valid JSON: {err}") from err

    raw: dict[tuple, dict[str, dict[LayerSet, dict[int, float]]]] = defaultdict(lambda: defaultdict(dict))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("model", "task", "mode", "sample", "layers", "target_pos", *METRICS) if c not in header]
        if missing:
            raise OlmoIVError(f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(header) or 'none'}); "
                              f"expected the `olmo-iv patch` format: {', '.join(COLUMNS)}")
        for lineno, row in enumerate(reader, start=2):
            try:
                key = (row["model"], row["task"], row["mode"], row["target_pos"].strip())
                sample = int(row["sample"])
                values = {m: float(row[m]) for m in METRICS}
            except (TypeError, ValueError) as err:
                raise OlmoIVError(f"{path}, line {lineno}: unreadable value ({err})") from None
            layers = parse_layers(row["layers"])
            if list(layers) != sorted(set(layers)):
                raise OlmoIVError(f"{path}, line {lineno}: layers {row['layers']!r} must be distinct and sorted, "
                                  "as `olmo-iv patch` writes them")
            if "n_layers" in row and row["n_layers"] not in (None, "") and int(row["n_layers"]) != len(layers):
                raise OlmoIVError(f"{path}, line {lineno}: n_layers={row['n_layers']} but layers={row['layers']!r}")
            for m, v in values.items():
                if not math.isfinite(v):
                    raise OlmoIVError(f"{path}, line {lineno}: {m} is {v}; the patching run wrote a non-finite score")
                per_set = raw[key][m].setdefault(layers, {})
                if sample in per_set:
                    raise OlmoIVError(f"{path}, line {lineno}: sample {sample}, layers {row['layers']}, "
                                      f"target_pos {key[3]} appears twice (task {key[1]}); was the file concatenated?")
                per_set[sample] = v
    if not raw:
        raise OlmoIVError(f"{path} has a header but no rows: the patching run wrote no results")

    groups = []
    for (model, task, mode, pos), by_metric in sorted(raw.items()):
        sets = by_metric[METRICS[0]]
        samples = sorted(next(iter(sets.values())))
        for layers, per_sample in sets.items():
            if sorted(per_sample) != samples:
                other = set(per_sample) ^ set(samples)
                raise OlmoIVError(f"{path}: task {task}, target_pos {pos}: layers {format_layers(layers)} covers a "
                                  f"different set of samples than the others (e.g. sample {min(other)}); the run is "
                                  "incomplete: resume `olmo-iv patch` to finish it")
        scores = {m: {ls: np.array([d[s] for s in samples]) for ls, d in by_metric[m].items()} for m in METRICS}
        groups.append(Group(model, task, mode, pos, np.array(samples), scores))
    return groups, summary


def run_stats(run_dir: str | Path, cfg: StatsConfig | None = None, *, tasks: list[str] | None = None,
              target_pos: str | int | None = None, reference_select: str = "rr_diff", write: bool = True) -> StatsResult:
    """Both tests on every selected group of a run; with `write`, CSV + LaTeX + JSON go into the run folder.

    Sound files carry the metric in their name, so runs with both metrics keep both; a selection (tasks=,
    target_pos=) adds its own suffix, so the statistics of the whole run are never replaced by a part's.
    """
    cfg = cfg or StatsConfig()
    if cfg.metric not in METRICS or reference_select not in METRICS:
        raise OlmoIVError(f"metric={cfg.metric!r}, reference_select={reference_select!r}: use one of {', '.join(METRICS)}")
    all_groups, summary = read_run(run_dir)
    groups = select_groups(all_groups, tasks, target_pos)
    sound = [row for g in groups for row in sound_test(g, cfg)]
    reference = [row for g in groups for row in reference_test(g, top=cfg.top, select_metric=reference_select)]
    result = StatsResult(sound, reference)
    if write:
        store = RunStore.attach(run_dir)
        part = ""
        if tasks:
            part += "__" + "+".join(slug(t) for t in tasks)
        if target_pos is not None:
            part += f"__pos{slug(str(target_pos))}"
        stem = f"stats_sound_{cfg.metric}{part}"
        result.files = [store.write_csv(f"{stem}.csv", *csv_rows(sound, SoundRow)),
                        store.write_text(f"{stem}.tex", sound_latex(sound, cfg)),
                        store.write_csv(f"stats_reference{part}.csv", *csv_rows(reference, ReferenceRow)),
                        store.write_text(f"stats_reference{part}.tex", reference_latex(reference))]
        digest = hashlib.sha256(store.path("patching.csv").read_bytes()).hexdigest()
        meta = {"settings": {**asdict(cfg), "tasks": tasks, "target_pos": target_pos,
                             "reference_select": reference_select, "reference_test_metric": "logit_diff"},
                "versions": versions(), "input": {"patching_csv_sha256": digest, "run_settings": summary.get("settings"),
                                                  "run_versions": summary.get("versions")},
                "files": [p.name for p in result.files]}
        result.files.append(store.write_json(f"{stem}.json", meta))
        store.save_outputs()
    return result
