"""A probe run on disk (`olmo-iv probe`): instruction vectors per model (one unit each), then a linear probe per
layer and the LDA of one layer; probe.csv, lda.csv, probe.json and the figures."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from olmo_iv.analysis.probes import (
    LdaResult,
    ProbeConfig,
    ProbeResult,
    lda_projection,
    probe_layers,
    split,
    task_vectors,
)
from olmo_iv.errors import OlmoIVError
from olmo_iv.io import versions
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs import figures
from olmo_iv.runs.store import RunStore, slug
from olmo_iv.runs.units import RunKind, Unit, run_in_process

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ProbeRunSettings:
    """Everything that determines a probe run; recorded in run.json and checked on resume."""

    models: list[str] = field(default_factory=lambda: ["toy", "toy-base"])
    """Built-in names, local folders or hub ids."""
    tasks: list[str] = field(default_factory=list)
    """Registry names; empty: every task with rephrasings (the paper's 8)."""
    lda_layer: int = 0
    """Layer of the LDA figure (the authors' default: 0); the probe runs on every layer."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Split, solver and interval settings."""
    batch_size: int = 64
    """Instructions per forward pass."""
    device: str = "cpu"
    """torch device."""
    dtype: str = "float32"
    """Model dtype."""
    save_vectors: bool = False
    """Also write vectors_<model>.npz ([N, layers, d] float32)."""

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        if self.dtype not in DTYPES:
            raise OlmoIVError(f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if len(set(self.models)) != len(self.models) or not self.models:
            raise OlmoIVError(f"models={self.models}: give each model once, at least one")
        if self.batch_size < 1:
            raise OlmoIVError(f"batch_size={self.batch_size}: give at least 1")
        from olmo_iv.tasks import get_task, list_tasks

        self.tasks = [get_task(t).name for t in self.tasks] or [t for t in list_tasks() if get_task(t).rephrased]


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass
class ProbeRun:
    """What a probe run returns: per model, the probe rows and the LDA; and the files written."""

    probes: dict[str, list[ProbeResult]]
    ldas: dict[str, LdaResult]
    names: dict[str, str]
    files: list[Path]


def run_probe(settings: ProbeRunSettings, out: str | Path, *, overwrite: bool = False,
              progress: ProgressFn | None = None) -> ProbeRun:
    store = RunStore.open(out, "probe", asdict(settings), models=settings.models, overwrite=overwrite)
    units = plan(settings)
    run_in_process(PROBE, store, settings, units, progress=progress)
    return finish(store, settings, units, progress)


def plan(settings: ProbeRunSettings) -> list[Unit]:
    """One unit per model: its instruction vectors."""
    return [Unit(slug(m), m, "instruction vectors") for m in settings.models]


def load_model(settings: ProbeRunSettings, model_name: str, device: str):
    net = load(model_name, dtype=getattr(torch, settings.dtype), device=device)
    if not 0 <= settings.lda_layer < net.config.n_layers:
        raise OlmoIVError(f"lda_layer={settings.lda_layer} is outside [0, {net.config.n_layers}) for {model_name}")
    return net


def do(settings: ProbeRunSettings, unit: Unit, net, progress: ProgressFn | None = None) -> dict[str, bytes]:
    """One model's instruction vectors of every task: vectors.npz."""
    vs = task_vectors(net, settings.tasks, batch_size=settings.batch_size, progress=progress)
    return {"vectors.npz": _npz(X=vs.X, labels=vs.labels, texts=np.array(vs.texts), index=vs.index)}


def finish(store: RunStore, settings: ProbeRunSettings, units: list[Unit],
           progress: ProgressFn | None = None) -> ProbeRun:
    """The probes and the LDA from every model's vectors: probe.csv, lda.csv, probe.json and the figures."""
    cfg = settings.probe
    probes: dict[str, list[ProbeResult]] = {}
    ldas: dict[str, LdaResult] = {}
    names: dict[str, str] = {}
    index: dict[str, np.ndarray] = {}
    for unit in units:
        m = unit.model
        with np.load(store.unit_dir(unit.id) / "vectors.npz", allow_pickle=False) as z:
            X, labels, texts, idx = z["X"], z["labels"], z["texts"], z["index"]
        if settings.save_vectors:
            store.write_bytes(f"vectors_{Path(m).name}.npz", _npz(X=X, labels=labels, texts=texts, index=idx))
        names[m], index[m] = Path(m).name, idx
        probes[m] = probe_layers(X, labels, cfg, progress=progress)
        train, test = split(labels, cfg)
        ldas[m] = lda_projection(X[:, settings.lda_layer], labels, train, test)

    if len(set(names.values())) < len(names):  # two folders with one base name: label by the full path
        names = {m: m for m in names}
    layer = settings.lda_layer
    pfields = [f.name for f in fields(ProbeResult)]
    files = [store.write_csv("probe.csv", ["model", *pfields],
                             [[m, *asdict(r).values()] for m, rows in probes.items() for r in rows])]
    k = min(res.coords.shape[1] for res in ldas.values())
    files.append(store.write_csv(
        "lda.csv", ["model", "layer", "task", "index", "split", *[f"ld{i + 1}" for i in range(k)]],
        [[m, layer, res.labels[i], int(index[m][i]), "test" if res.is_test[i] else "train", *res.coords[i, :k]]
         for m, res in ldas.items() for i in range(len(res.labels))]))
    files += store.save_figure("probe", figures.probe_accuracy({names[m]: r for m, r in probes.items()}))
    if k >= 2:
        files += store.save_figure("lda", figures.lda_scatter({names[m]: r for m, r in ldas.items()}, layer=layer))
    meta = {"settings": asdict(settings), "checkpoints": store.checkpoints, "versions": versions(),
            "extraction": "resid_post at the instruction's last token, instruction alone, no special tokens",
            "lda": {m: {"explained_variance_ratio": res.explained_variance_ratio.tolist(),
                        "test_accuracy": res.test_accuracy} for m, res in ldas.items()},
            "files": [p.name for p in files]}
    files.append(store.write_json("probe.json", meta))
    store.finish()
    return ProbeRun(probes, ldas, names, files)


PROBE = RunKind(name="probe", store_kind="probe", settings_type=ProbeRunSettings, plan=plan, load=load_model, do=do,
                merge=lambda store, settings, units, timings: finish(store, settings, units),
                models=lambda s: list(s.models), dtype=lambda s: s.dtype, summary_file="probe.json")
"""Probing's plan/do/merge, for `run_probe` and for sweeps."""
