"""A path-tracing run on disk (`olmo-iv paths`): per-sample units, then Figure 4 and 5 tables and plots."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from olmo_iv import tasks as task_registry
from olmo_iv.analysis.paths import (
    PathConfig,
    PathResult,
    linearize,
    mean_head_activity,
    mean_kept_per_token,
    observe,
    surrogate_errors,
    trace,
)
from olmo_iv.errors import OlmoIVError
from olmo_iv.io import versions
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs import figures
from olmo_iv.runs.store import RunStore
from olmo_iv.runs.tables import fmt_float
from olmo_iv.runs.units import RunKind, Unit, run_in_process


@dataclass
class PathRunSettings:
    """Everything that determines the numbers of a run; recorded in settings.json and checked on resume."""

    model: str = "toy"
    """Built-in name, local folder or hub id."""
    task: str = "adjectives/adj_comp"
    """Registry name (`olmo-iv tasks` lists them)."""
    samples: int = 100
    """The first N samples in file order (the paper's Figures 4 and 5 use 100)."""
    prompt_mode: str = "reference"
    """Prompt construction of olmo_iv.tasks: 'reference' (answer token without a leading space) or 'faithful'."""
    trace: PathConfig = field(default_factory=PathConfig)
    """Tracing settings."""
    head_tokens: list[int] = field(default_factory=list)
    """Source positions whose Figure-5 heatmap is drawn; empty: T_inst of the first sample."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self) -> None:
        if isinstance(self.trace, dict):
            self.trace = PathConfig(**self.trace)
        if self.samples < 1:
            raise OlmoIVError(f"samples={self.samples}: give at least 1")


def _paths_csv(result: PathResult) -> str:
    L = result.tokens.shape[1] - 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", *(f"t{layer}" for layer in range(L)), "logit", "rank"])
    for toks, z, r in zip(result.tokens.tolist(), result.logit.tolist(), result.rank.tolist(), strict=True):
        w.writerow([toks[0], *toks[1:], fmt_float(z), r])
    return buf.getvalue()


def _check_head_tokens(settings: PathRunSettings, n_tokens: int) -> None:
    outside = [t for t in settings.head_tokens if not 0 <= t < n_tokens]
    if outside:
        raise OlmoIVError(f"head_tokens={settings.head_tokens}: position {outside[0]} is outside the shortest prompt "
                          f"({n_tokens} tokens)")


def run_paths(settings: PathRunSettings, out: str | Path, *, overwrite: bool = False,
              progress: ProgressFn | None = None) -> dict:
    """Trace every sample of a task (one unit each: paths.csv and result.json); then the aggregates and Figures
    4 and 5. `progress(label, advance, total)` reports paths."""
    store = RunStore.open(out, "path-tracing", asdict(settings), models=[settings.model], overwrite=overwrite)
    started = time.perf_counter()
    units = plan(settings)
    timings = run_in_process(PATHS, store, settings, units, progress=progress)
    timings["total (this invocation)"] = round(time.perf_counter() - started, 3)
    return merge(store, settings, units, timings)


def plan(settings: PathRunSettings) -> list[Unit]:
    """One unit per sample, in sample order."""
    samples = task_registry.samples(settings.task, mode=settings.prompt_mode, n=settings.samples)
    return [Unit(f"{s.index:04d}", settings.model, f"sample {k + 1}/{len(samples)}", "trace", {"k": k})
            for k, s in enumerate(samples)]


def load_model(settings: PathRunSettings, model_name: str, device: str):
    model = load(model_name, dtype=torch.float32, device=device)
    if model.tokenizer is None:
        raise OlmoIVError(f"model {model_name!r} has no tokenizer.json: path tracing needs it to build prompts")
    samples = task_registry.samples(settings.task, mode=settings.prompt_mode, n=settings.samples)
    _check_head_tokens(settings, min(len(e.clean_ids) for e in task_registry.encode(samples, model.tokenizer)))
    return model


def do(settings: PathRunSettings, unit: Unit, model, progress: ProgressFn | None = None) -> dict:
    """Trace one sample: its paths.csv and result.json."""
    samples = task_registry.samples(settings.task, mode=settings.prompt_mode, n=settings.samples)
    sample = samples[unit.data["k"]]
    enc = task_registry.encode([sample], model.tokenizer)[0]
    t0 = time.perf_counter()
    report = (lambda _, n, total: progress(unit.label, n, total)) if progress else None
    result = trace(model, torch.tensor(enc.clean_ids), enc.answer_id, settings.trace, progress=report)
    obs = observe(model, torch.tensor(enc.clean_ids))  # recorded with the sample: how exact its surrogates are
    errors = surrogate_errors(model, obs, linearize(model, obs))
    kept = result.kept_per_source().tolist()
    act = result.head_activity()
    return {"paths.csv": _paths_csv(result), "result.json": {
        "index": sample.index, "query": sample.query, "answer": sample.answer, "answer_id": enc.answer_id,
        "prompt": sample.clean, "ids": list(enc.clean_ids),
        "tokens": [model.tokenizer.decode([i]) for i in enc.clean_ids], "t_inst": enc.t_inst,
        "sentence_ends": list(enc.sentence_ends), "sources": result.sources, "total_paths": result.total,
        "kept_paths": kept, "model_rank": result.model_rank, "model_logit": result.model_logit,
        "head_activity": {str(t): act[t].tolist() for t in range(len(kept)) if kept[t]},
        "surrogate_max_error": errors, "seconds": round(time.perf_counter() - t0, 3)}}


def merge(store: RunStore, settings: PathRunSettings, units: list[Unit], timings: dict) -> dict:
    samples = task_registry.samples(settings.task, mode=settings.prompt_mode, n=settings.samples)
    return finish(store, settings, samples, timings)


def finish(store: RunStore, settings: PathRunSettings, samples, timings: dict) -> dict:
    """Aggregate the per-sample results into the Figure-4 and Figure-5 tables and plots, and summary.json."""
    results = [store.read_json(f"{s.index:04d}", "result.json") for s in samples]
    kept = [r["kept_paths"] for r in results]
    mean_kept = mean_kept_per_token(kept)
    mean_total = mean_kept_per_token([[float(x) for x in r["total_paths"]] for r in results])
    first = results[0]
    L_H = next((np.asarray(a).shape for r in results for a in r["head_activity"].values()), None)
    per_sample = []
    for r in results:
        a = np.zeros((len(r["kept_paths"]), *(L_H or (0, 0))))
        for t, m in r["head_activity"].items():
            a[int(t)] = np.asarray(m)
        per_sample.append(a)
    activity = mean_head_activity(per_sample, settings.samples)
    _check_head_tokens(settings, min(len(r["ids"]) for r in results))
    tag = f"{settings.model} · {settings.task} · {settings.trace.mode} tracing · answer rank ≤ {settings.trace.threshold}"
    # a position's token, where every sample has the same one there (prompts differ in their query words)
    shared = [r["tokens"][t] if all(t < len(q["tokens"]) and q["tokens"][t] == r["tokens"][t] for q in results)
              else "" for r in [first] for t in range(len(mean_kept)) if t < len(r["tokens"])]
    shared += [""] * (len(mean_kept) - len(shared))
    t_inst = sorted({r["t_inst"] for r in results})
    store.write_csv("paths_per_token.csv", ["position", "token", "mean_kept_paths", "mean_total_paths"],
                    [[t, shared[t], fmt_float(mean_kept[t]), fmt_float(mean_total[t])] for t in range(len(mean_kept))])
    files = ["run.json", "summary.json", "paths_per_token.csv", "units/*/paths.csv", "units/*/result.json"]
    fig = figures.kept_per_token(mean_kept, shared, highlight=t_inst, n_samples=len(results),
                                 title=f"Kept paths per source token\n{tag}")
    files += [p.name for p in store.save_figure("paths_per_token", fig)]
    store.write_csv("head_activity.csv", ["position", "layer", "head", "fraction"],
                    [[t, layer, h, fmt_float(activity[t, layer, h])] for t in range(activity.shape[0])
                     for layer in range(activity.shape[1]) for h in range(activity.shape[2])])
    files.append("head_activity.csv")
    for t in settings.head_tokens or [first["t_inst"]]:
        if L_H is None:
            continue  # no kept path anywhere: no head was used
        fig = figures.head_activity(activity[t], n_samples=settings.samples,
                                    title=f"Head activity on the kept paths from source position {t}\n{tag}")
        files += [p.name for p in store.save_figure(f"head_activity_T{t}", fig)]
    summary = {"settings": asdict(settings), "checkpoints": store.checkpoints, "versions": versions(),
               "timings_s": timings, "n_samples": len(results), "mean_kept_paths": mean_kept.tolist(),
               "mean_total_paths": mean_total.tolist(),
               "model_rank_of_answer": [r["model_rank"] for r in results], "files": files}
    store.write_json("summary.json", summary)
    store.finish()
    return summary


PATHS = RunKind(name="paths", store_kind="path-tracing", settings_type=PathRunSettings, plan=plan, load=load_model,
                do=do, merge=merge, models=lambda s: [s.model])
"""Path tracing's plan/do/merge, for `run_paths` and for sweeps."""
