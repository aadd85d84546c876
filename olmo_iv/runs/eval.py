"""A task-inference run on disk (`olmo-iv eval`): one unit per (model, task), then summary.csv/json and Figure 12.

Per model and task: {out}/{model}/{task}.csv, one row per sample (scores, generation); then {out}/summary.csv,
{out}/summary.json and {out}/figure12.{png,pdf}.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from olmo_iv.errors import OlmoIVError
from olmo_iv.evals.inference import (
    EvalSettings,
    HTTPJudge,
    Judge,
    RuleJudge,
    SampleScore,
    _check_mode,
    evaluate_task,
    sample_rows,
)
from olmo_iv.io import versions
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs import figures
from olmo_iv.runs.store import RunStore, slug

SUMMARY_FIELDS = ("model", "task", "n", "mode", "em", "em_reference", "em_faithful", "option_ia", "judge_ia", "ia",
                  "ia_source")


def judge_label(judge: Judge) -> str:
    """How a judge is recorded in the settings (an HTTP judge by model, endpoint and decision rule)."""
    if isinstance(judge, HTTPJudge):
        return f"http:{judge.model}@{judge.base_url}" + (":exact-yes" if judge.exact_yes else "")
    return judge.name


def _csv(rows: Sequence[dict], header: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def run_eval(models: Sequence[str], tasks: Sequence[str], settings: EvalSettings, out: str | Path, *,
             judge: Judge | None = None, device: str = "cpu", overwrite: bool = False,
             progress: ProgressFn | None = None) -> list[dict]:
    """Evaluate every model on every task through the run store; returns the summary rows."""
    from olmo_iv.tasks import get_task

    if not models:
        raise OlmoIVError("models= is empty: give at least one model to evaluate")
    if not tasks:
        raise OlmoIVError("tasks= is empty: give at least one task to evaluate")
    _check_mode(settings.mode)
    dtype = getattr(torch, settings.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise OlmoIVError(f"dtype={settings.dtype!r}: use float32, bfloat16 or float16")
    judge = judge if judge is not None else RuleJudge()
    settings = replace(settings, judge=judge_label(judge))
    task_names = [get_task(t).name for t in tasks]  # canonical names; fails early on a typo
    store = RunStore.open(out, "task-inference", {"settings": asdict(settings), "models": list(map(str, models)),
                                                  "tasks": task_names, "device": str(device)},
                          models=models, overwrite=overwrite)
    sample_fields = [f.name for f in fields(SampleScore)]
    summary: list[dict] = []
    for model_name in models:
        model = None
        for task in task_names:
            unit = f"{slug(model_name)}__{slug(task)}"
            if not store.done(unit):
                if model is None:
                    model = load(model_name, dtype=dtype, device=device)
                rows, score = evaluate_task(model, task, settings, judge, progress=progress)
                store.complete(unit, {"samples.csv": _csv(sample_rows(rows), sample_fields),
                                      "score.json": {"model": str(model_name), **asdict(score)}})
            store.write_text(f"{slug(model_name)}/{slug(task)}.csv", store.read(unit, "samples.csv"))
            summary.append(store.read_json(unit, "score.json"))
        del model
    store.write_text("summary.csv", _csv(summary, SUMMARY_FIELDS))
    store.write_json("summary.json", {"settings": asdict(settings), "models": list(map(str, models)),
                                      "tasks": task_names, "checkpoints": store.checkpoints, "versions": versions(),
                                      "scores": summary})
    store.save_figure("figure12", figures.inference_scores(
        summary, title=f"Task inference ({settings.mode} post-processing)"))
    store.finish()
    return summary
