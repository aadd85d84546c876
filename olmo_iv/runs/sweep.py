"""Sweeps (`olmo-iv sweep SPEC`): a grid over models, tasks and commands, run as run-store units in this process
or on Ray, resumable unit by unit, merged by each command's own finish code.

A spec (TOML or YAML) holds settings for every run at its top level and one table per run:

    models = ["allenai/OLMo-2-0425-1B", "allenai/OLMo-2-1124-7B"]
    tasks = ["adjectives/adj_comp", "animals/can_fly"]
    dtype = "bfloat16"
    device = "cuda"

    [[run]]
    command = "patch"
    layers = [2, 3]          # a list where the setting takes one value: one run per value

The sweep folder holds its own run store (kind `sweep`: the expanded spec in run.json, one unit per finished run
holding that run's summary) and one run folder per expanded run, `<out>/<run name>/`, written by the run's own
store exactly as the single command writes it. A patching run covers all of its models and tasks, so its
`patching.csv` is one table across them. See docs/sweeps.md.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections import deque
from dataclasses import MISSING, asdict, dataclass, fields
from itertools import product
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.progress import ProgressFn
from olmo_iv.runs.store import RunFinished, RunStore, slug
from olmo_iv.runs.units import RunKind, Unit, run_in_process


def kinds() -> dict[str, RunKind]:
    """The commands a sweep can run, by the name the spec gives them."""
    from olmo_iv.runs.patch import PATCHING
    from olmo_iv.runs.paths import PATHS
    from olmo_iv.runs.probe import PROBE

    return {k.name: k for k in (PATCHING, PATHS, PROBE)}


# ------------------------------------------------------------------------------------------------- the spec


@dataclass
class SweepRun:
    """One expanded run of a sweep."""

    name: str
    """The run's folder under the sweep folder (unique)."""
    kind: RunKind
    """Its command's plan/do/merge."""
    settings: Any
    """Its command's settings dataclass."""


def _field_defaults(settings_type: type) -> dict[str, Any]:
    out = {}
    for f in fields(settings_type):
        out[f.name] = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
    return out


def read_spec(path: str | Path) -> dict[str, Any]:
    """A spec file's contents: TOML (`.toml`, read with tomllib) or YAML (`.yaml`/`.yml`)."""
    path = Path(path)
    if not path.is_file():
        raise OlmoIVError(f"no such spec file: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise OlmoIVError(f"the spec {path} is not valid TOML: {err}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise OlmoIVError("YAML specs need PyYAML (pip install pyyaml, or olmo-iv[ray]); or write the spec "
                              "as TOML") from None
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise OlmoIVError(f"the spec {path} is not valid YAML: {err}") from None
        if not isinstance(spec, dict):
            raise OlmoIVError(f"the spec {path}: expected a mapping of settings with a `run` list")
        return spec
    raise OlmoIVError(f"the spec {path}: give a .toml, .yaml or .yml file")


def expand(spec: dict[str, Any], known: dict[str, RunKind] | None = None) -> list[SweepRun]:
    """The spec's runs: top-level settings are defaults for every run (where its command has the setting), each
    `run` entry adds its own, and a list given for a setting that takes one value is a grid axis. A command that
    runs one model and one task (paths) gets one run per (model, task) of `models` and `tasks`. `known`: the
    commands the spec may name (default: `kinds()`)."""
    known = known or kinds()
    spec = dict(spec)
    entries = spec.pop("run", None)
    if not entries or not isinstance(entries, list):
        raise OlmoIVError("the spec lists no runs: add a `[[run]]` table (TOML) or a `run:` list (YAML) with a "
                          "`command` each")
    everywhere = set()
    for kind in known.values():
        everywhere |= set(_field_defaults(kind.settings_type)) | {"models", "tasks"}
    unknown = sorted(set(spec) - everywhere)
    if unknown:
        raise OlmoIVError(f"the spec's top-level setting {unknown[0]!r} belongs to no command "
                          f"({', '.join(sorted(known))})")
    runs: list[SweepRun] = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        command = entry.pop("command", None)
        if command not in known:
            raise OlmoIVError(f"run {i + 1} of the spec: command {command!r} is not one of {', '.join(sorted(known))}")
        kind = known[command]
        name = entry.pop("name", None)
        defaults = _field_defaults(kind.settings_type)
        bad = sorted(k for k in entry if k not in defaults and k not in ("models", "tasks"))
        if bad:
            raise OlmoIVError(f"run {i + 1} of the spec ({command}) has no setting {bad[0]!r}; it has "
                              f"{', '.join(sorted(defaults))}")
        merged = {k: v for k, v in spec.items() if k in defaults or k in ("models", "tasks")} | entry
        single = {}  # a command of one model and one task: models x tasks become grid axes
        for plural, one in (("models", "model"), ("tasks", "task")):
            if plural in merged and plural not in defaults:
                if one in defaults:
                    single[one] = merged.pop(plural)
                else:
                    merged.pop(plural)
        for k, v in merged.items():
            if isinstance(defaults.get(k), list) and not isinstance(v, list):
                merged[k] = [v]  # `models = "toy"` means one model, not three letters
        axes = {k: v for k, v in merged.items() if isinstance(v, list) and not isinstance(defaults.get(k), list)}
        axes = {**{k: v if isinstance(v, list) else [v] for k, v in single.items()}, **axes}
        for values in product(*axes.values()) if axes else [()]:
            point = dict(zip(axes, values))
            try:
                settings = kind.settings_type(**(merged | point))
            except TypeError as err:
                raise OlmoIVError(f"run {i + 1} of the spec ({command}): {err}") from None
            label = name or command
            # the folder name: the command (or the entry's name), then each grid value (a model or task by its
            # last path part, other settings as name and value: layers2)
            varied = [slug(Path(str(v)).name) if k in single else f"{k}{slug(v)}" for k, v in point.items()]
            runs.append(SweepRun("-".join([slug(label), *varied]), kind, settings))
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OlmoIVError(f"two runs of the spec are both named {twice[0]!r}: give them distinct `name`s")
    return runs


# ------------------------------------------------------------------------------------------------- options


@dataclass
class SweepOptions:
    """How a sweep is executed (not what it computes: nothing here changes a result)."""

    ray: str | None = None
    """None: run every unit in this process (Ray not needed), unless RAY_ADDRESS is set, which means Ray at that
    address. 'auto': the Ray cluster this machine belongs to (`ray start --head` / `--address`). 'local': start
    a Ray instance on this machine for the sweep (all its CPUs and GPUs). Anything else: a cluster's address
    (`HOST:6379`, `ray://HOST:10001`)."""
    cpus_per_unit: int = 1
    """CPU threads per worker: its Ray CPU request and its torch thread count."""
    gpus_per_unit: float | None = None
    """GPUs per worker; None: 0 on CPU runs, and on CUDA runs as many as the model's weights in its dtype need
    (plus a quarter for activations) on GPUs of `gpu_memory_gib`. A fraction (0.5) packs workers on one GPU."""
    gpu_memory_gib: float = 80.0
    """One GPU's memory, for the request computed from the model's size (80: an H100 or A100-80GB)."""
    workers_per_model: int | None = None
    """Ray workers (actors) per model, each keeping its model loaded across that model's units; None: as many as
    the cluster's CPUs (or GPUs) hold at once, at most the model's units."""
    max_retries: int = 3
    """Times a unit is run again when its worker process dies (the worker is restarted by Ray). An exception
    raised by the unit's own code is not retried: it would happen again."""

    def __post_init__(self) -> None:
        check_range("cpus_per_unit", self.cpus_per_unit, 1)
        if self.gpus_per_unit is not None:
            check_range("gpus_per_unit", self.gpus_per_unit, 0)
        check_range("gpu_memory_gib", self.gpu_memory_gib, 0, low_open=True)
        if self.workers_per_model is not None:
            check_range("workers_per_model", self.workers_per_model, 1)
        check_range("max_retries", self.max_retries, 0)


@dataclass
class SweepRunResult:
    """The outcome of one run of a sweep."""

    name: str
    folder: str
    command: str
    units: int
    summary: dict


# ------------------------------------------------------------------------------------------------- sizing


def model_params(model: str) -> int:
    """A checkpoint's parameter count, from its safetensors headers (no tensor is read)."""
    from olmo_iv.loading import resolve, weight_files

    total = 0
    for path in sorted(set(weight_files(resolve(model)).values())):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def gpus_for(model: str, dtype: str, device: str, options: SweepOptions) -> float:
    """The GPUs one worker of `model` asks Ray for (see SweepOptions.gpus_per_unit)."""
    if not str(device).startswith("cuda"):
        return 0.0
    if options.gpus_per_unit is not None:
        return options.gpus_per_unit
    need = model_params(model) * DTYPE_BYTES[dtype] * 1.25 / 2**30
    if need > options.gpu_memory_gib:
        # olmo_iv runs a model on one device: a request for two GPUs would only leave one of them idle
        raise OlmoIVError(f"model {model!r} in {dtype} needs about {need:.0f} GiB, more than one GPU's "
                          f"gpu_memory_gib={options.gpu_memory_gib:g}: use dtype='bfloat16', or give the GPU's "
                          "real memory as gpu_memory_gib")
    return 1.0


# ------------------------------------------------------------------------------------------------- running


@dataclass
class _Job:
    """A run of the sweep, opened, with its units."""

    run: SweepRun
    store: RunStore
    units: list[Unit]


def run_sweep(spec: dict[str, Any] | str | Path, out: str | Path, *, options: SweepOptions | None = None,
              overwrite: bool = False, progress: ProgressFn | None = None,
              known: dict[str, RunKind] | None = None) -> dict:
    """Expand the spec, do every unit that is not done (in this process, or on Ray: see SweepOptions), merge each
    run with its command's own finish code, and write the sweep's summary.json. Returns that summary.

    A sweep that was killed, or lost a worker, does only the missing units when started again; a changed spec
    is refused once a run finished (the run store's rule), and overwrite=True computes everything again.
    `known`: the commands the spec may name (default: `kinds()`; your own RunKind adds a command)."""
    options = options or SweepOptions()
    if not isinstance(spec, dict):
        spec = read_spec(spec)
    runs = expand(spec, known)
    address = options.ray if options.ray is not None else os.environ.get("RAY_ADDRESS") or None
    # runs by name, so that a changed spec is refused naming the setting: runs.patch.settings.samples: 30 -> 31
    root = RunStore.open(out, "sweep", {"runs": {r.name: {"command": r.kind.name, "settings": asdict(r.settings)}
                                                 for r in runs}}, overwrite=overwrite)
    started = time.perf_counter()
    jobs, finished = [], {}
    for run in runs:
        try:
            store = RunStore.open(root.path(run.name), run.kind.store_kind, asdict(run.settings),
                                  models=run.kind.models(run.settings), overwrite=overwrite)
        except RunFinished:  # merged by an earlier invocation
            finished[run.name] = json.loads((root.path(run.name) / run.kind.summary_file).read_text())
            continue
        jobs.append(_Job(run, store, run.kind.plan(run.settings)))
    timings: dict[str, dict[str, float]] = {job.run.name: {} for job in jobs}
    t_units = time.perf_counter()
    if address is None:
        for job in jobs:
            run_in_process(job.run.kind, job.store, job.run.settings, job.units, progress=progress,
                           timings=timings[job.run.name])
    else:
        _run_on_ray(address, jobs, options, progress, timings)
    t_merge = time.perf_counter()
    for job in jobs:
        timings[job.run.name]["total (this invocation)"] = round(time.perf_counter() - started, 3)
        job.run.kind.merge(job.store, job.run.settings, job.units, timings[job.run.name])
        # what the run's own summary file says, as an earlier invocation would read it
        finished[job.run.name] = json.loads(job.store.path(job.run.kind.summary_file).read_text())
    summary = {"runs": [], "executor": "in-process" if address is None else f"ray ({address})",
               "timings_s": {"units (this invocation)": round(t_merge - t_units, 3),
                             "merge": round(time.perf_counter() - t_merge, 3),
                             "total (this invocation)": round(time.perf_counter() - started, 3)},
               "unit_timings_s": {name: t for name, t in timings.items()}}
    for run in runs:
        s = finished[run.name]
        entry = {"name": run.name, "command": run.kind.name, "folder": run.name,
                 "files": [f"{run.name}/{f}" for f in s.get("files", [])]}
        for key in ("verdict", "model_rank_of_answer"):
            if key in s:
                entry[key] = s[key]
        if not root.done(run.name):
            root.complete(run.name, {"summary.json": entry})
        summary["runs"].append(entry)
    root.write_json("summary.json", summary)
    root.finish()
    return summary


def _ray_init(address: str):
    """Connect to Ray (or start it, for address='local'); returns whether this call started the connection."""
    try:
        import ray
    except ImportError:
        raise OlmoIVError(f"ray={address!r} needs Ray: pip install 'olmo-iv[ray]'") from None
    if ray.is_initialized():
        return ray, False  # e.g. a test's cluster, or a notebook's session: used as it is
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise OlmoIVError(f"ray={address!r}: cannot connect to a Ray cluster ({err})") from None
    return ray, True


class _Worker:
    """A Ray actor: keeps one model loaded across the units of that model, writes each unit into its run folder."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.key: tuple | None = None
        self.model = None

    def do(self, kind: RunKind, settings: Any, run_dir: str, unit: Unit) -> dict[str, Any]:
        t0 = time.perf_counter()
        device = settings.device
        if str(device).startswith("cuda"):
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPUs: the first is ours
        key = (kind.name, unit.model, kind.dtype(settings), device)
        loaded = 0.0
        if key != self.key:
            self.model, self.key = None, None  # free the previous model first
            self.model = kind.load(settings, unit.model, device)
            self.key = key
            loaded = time.perf_counter() - t0
        store = RunStore.attach(run_dir)
        store.complete(unit.id, kind.do(settings, unit, self.model, None))
        return {"unit": unit.id, "load_s": loaded, "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def _run_on_ray(address: str, jobs: list[_Job], options: SweepOptions, progress: ProgressFn | None,
                timings: dict[str, dict[str, float]]) -> None:
    """Do the pending units of every job on Ray: per model, `workers_per_model` actors (each holding the model
    loaded) take that model's units one at a time; a model's actors are released once its units are done, so
    no worker holds a model it does not need. Ray restarts a worker whose process died and runs its unit again
    (max_retries); the unit's files are rewritten whole and its done marker is written last."""
    ray, started = _ray_init(address)
    from ray.exceptions import RayActorError, RayTaskError

    groups: dict[tuple, deque] = {}
    for job in jobs:
        for unit in job.units:
            if job.store.done(unit.id):
                if progress:
                    progress(f"{job.run.name} (done)", 0, 0)
                continue
            key = (unit.model, job.run.kind.name, job.run.kind.dtype(job.run.settings), job.run.settings.device)
            groups.setdefault(key, deque()).append((job, unit))
    totals = {job.run.name: sum(not job.store.done(u.id) for u in job.units) for job in jobs}
    resources = ray.cluster_resources()
    actor_cls = ray.remote(_Worker)
    inflight: dict[Any, tuple] = {}
    actors: dict[tuple, list] = {}
    try:
        for key, queue in groups.items():
            model, _, dtype, device = key
            gpus = gpus_for(model, dtype, device, options)
            # a request no node can meet would wait for ever: refuse it now
            if gpus > resources.get("GPU", 0):
                raise OlmoIVError(f"model {model!r} on device={device!r} asks Ray for {gpus:g} GPU(s) per worker, "
                                  f"but the cluster has {resources.get('GPU', 0):g}")
            if options.cpus_per_unit > resources.get("CPU", 0):
                raise OlmoIVError(f"cpus_per_unit={options.cpus_per_unit}: the Ray cluster has "
                                  f"{resources.get('CPU', 0):g} CPUs")
            fit = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / options.cpus_per_unit
            n = options.workers_per_model or max(1, int(fit))
            n = min(n, len(queue))
            actors[key] = [actor_cls.options(num_cpus=options.cpus_per_unit, num_gpus=gpus,
                                             max_restarts=options.max_retries,
                                             max_task_retries=options.max_retries).remote(options.cpus_per_unit)
                           for _ in range(n)]
            for actor in actors[key]:
                _submit(actor, key, queue, inflight)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            actor, key, job, unit = inflight.pop(ref)
            try:
                done = ray.get(ref)
            except RayTaskError as err:
                cause = err.cause if err.cause is not None else err
                if isinstance(cause, OlmoIVError):
                    raise OlmoIVError(str(cause)) from None
                raise OlmoIVError(f"unit {unit.id} of run {job.run.name} failed: {type(cause).__name__}: "
                                  f"{cause}") from None
            except RayActorError as err:
                raise OlmoIVError(f"unit {unit.id} of run {job.run.name}: its worker died {options.max_retries + 1} "
                                  f"times (max_retries={options.max_retries}); the units done so far are kept, "
                                  f"so running the sweep again continues ({type(err).__name__})") from None
            t = timings[job.run.name]
            if done["load_s"]:  # summed over the workers that loaded this model
                t[f"load {unit.model}"] = round(t.get(f"load {unit.model}", 0.0) + done["load_s"], 3)
            group = unit.group or unit.label
            t[group] = round(t.get(group, 0.0) + done["seconds"] - done["load_s"], 3)
            if progress:
                progress(job.run.name, 1, totals[job.run.name])
            if groups[key]:
                _submit(actor, key, groups[key], inflight)
            else:
                ray.kill(actor)  # this model's units are all given out: free its worker's CPUs, GPUs and memory
    finally:
        for group in actors.values():
            for actor in group:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001  (already gone: nothing to free)
                    pass
        if started:
            ray.shutdown()


def _submit(actor, key: tuple, queue: deque, inflight: dict) -> None:
    if queue:
        job, unit = queue.popleft()
        ref = actor.do.remote(job.run.kind, job.run.settings, str(job.store.root), unit)
        inflight[ref] = (actor, key, job, unit)
