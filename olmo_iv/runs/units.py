"""Plan, do, merge: the interface a run kind offers so that any executor can run its units.

A run kind (patching, path tracing, ...) is three functions over its settings dataclass:

    units = kind.plan(settings)                     # the independent units, in their fixed merge order
    model = kind.load(settings, unit.model, device) # once per worker per model (units are grouped by model)
    payload = kind.do(settings, unit, model, progress)   # one unit's files: {"rows.csv": text, ...}
    kind.merge(store, settings, units, timings)     # the single command's finish code

The single command (`run_patching`) runs them in this process through `run_in_process`; a sweep
(`olmo_iv.runs.sweep`) runs the same `do` in Ray workers, which write `store.complete(unit.id, payload)` into the
shared run folder, and the driver calls the same `merge`. Because `merge` reads the payloads in plan order, the
merged files are the same whichever executor ran the units, and in whatever order they finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from olmo_iv.progress import ProgressFn
from olmo_iv.runs.store import RunStore


@dataclass(frozen=True)
class Unit:
    """One independent piece of a run: what `do` needs besides the run's settings."""

    id: str
    """The run-store unit id: its folder under units/ and its done marker."""
    model: str
    """The checkpoint the unit runs on. Executors group units by it, so a worker loads only models it needs."""
    label: str
    """The progress label (one bar per label)."""
    group: str = ""
    """Timings are summed per group (e.g. `patch MODEL TASK pos 0`); empty: per label."""
    data: dict[str, Any] = field(default_factory=dict)
    """Picklable data the unit needs (task name, sample range, position, ...)."""


@dataclass(frozen=True)
class RunKind:
    """A run kind's plan/do/merge functions, and the settings dataclass they take."""

    name: str
    """The command's name (`patch`, `paths`): the sweep spec's `command`."""
    store_kind: str
    """The run store's kind, recorded in run.json."""
    settings_type: type
    """The settings dataclass; `asdict(settings)` is the run store's settings."""
    plan: Callable[[Any], list[Unit]]
    load: Callable[[Any, str, str], Any]
    """(settings, model name, device) -> the loaded model; device is settings.device, or the device a Ray worker
    was given."""
    do: Callable[[Any, Unit, Any, ProgressFn | None], dict[str, Any]]
    merge: Callable[[RunStore, Any, list[Unit], dict[str, float]], Any]
    """(store, settings, units, timings): the merged outputs, written through the store; the run finished."""
    models: Callable[[Any], list[str]]
    """The checkpoints a run reads (fingerprinted by the store)."""
    dtype: Callable[[Any], str] = lambda settings: "float32"
    """The dtype models are loaded in: with the model's size, what a unit's GPU request is computed from."""
    summary_file: str = "summary.json"
    """The merged run's JSON summary (its `files` list and results), which a sweep's summary points to."""


def run_in_process(kind: RunKind, store: RunStore, settings: Any, units: list[Unit], *,
                   progress: ProgressFn | None = None, timings: dict[str, float] | None = None) -> dict[str, float]:
    """Do every unit that is not done, in plan order, loading each model once (units are grouped by model in
    plan order). Returns the timings: one `load MODEL` per model loaded, and seconds summed per unit group."""
    timings = {} if timings is None else timings
    loaded: tuple[str, Any] | None = None
    for unit in units:
        if store.done(unit.id):
            if progress:
                progress(f"{unit.label} (done)", 0, 0)
            continue
        if loaded is None or loaded[0] != unit.model:
            loaded = None  # free the previous model before loading the next
            t0 = time.perf_counter()
            loaded = (unit.model, kind.load(settings, unit.model, settings.device))
            timings[f"load {unit.model}"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        store.complete(unit.id, kind.do(settings, unit, loaded[1], progress))
        key = unit.group or unit.label
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 3)
    return timings
