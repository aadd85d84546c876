"""Steering runs on disk (`olmo-iv steer ...`), through the run store.

    vectors:   vectors.safetensors (u [n_layers, d_model], zbar [n_layers]) and vectors.json (metadata)
    generate:  generations.jsonl, one {"prompt", "ids", "text"} per prompt (new token ids, stopping at EOS,
               which is not included), in units of `batch_size` prompts
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.evals.ifeval.scoring import read_jsonl
from olmo_iv.interventions.steering import MODES, SteeringVectors, compute_vectors, generate_steered
from olmo_iv.io import versions
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs.store import RunStore


def _file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """{"with": ..., "without": ...} per line: the user message with the instruction and without it."""
    out = []
    for number, row in read_jsonl(path, "pairs"):
        if not isinstance(row, dict) or not isinstance(row.get("with"), str) or not isinstance(row.get("without"), str):
            raise OlmoIVError(f"pairs= line {number}: expected an object with string fields 'with' and 'without'")
        out.append((row["with"], row["without"]))
    if not out:
        raise OlmoIVError(f"pairs={str(path)!r} holds no pairs")
    return out


def read_prompts(path: str | Path) -> list[str]:
    """{"prompt": ...} per line: one user message each."""
    out = []
    for number, row in read_jsonl(path, "prompts"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise OlmoIVError(f"prompts= line {number}: expected an object with a string field 'prompt'")
        out.append(row["prompt"])
    if not out:
        raise OlmoIVError(f"prompts={str(path)!r} holds no prompts")
    return out


@dataclass
class VectorSettings:
    """What determines a set of steering vectors."""

    model: str = "toy"
    pairs: str = ""
    """JSONL of {"with", "without"} user messages."""
    position: str = "last"
    """Where activations are read: last (the authors'), instruction or prompt."""
    style: str = "auto"
    """Prompt style (olmo_iv.chat): the model's chat template where it has one."""
    hook: str = "hook_resid_post"
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"


def run_vectors(settings: VectorSettings, out: str | Path, *, overwrite: bool = False,
                progress: ProgressFn | None = None) -> SteeringVectors:
    pairs = read_pairs(settings.pairs)
    store = RunStore.open(out, "steering-vectors", {**asdict(settings), "pairs_sha256": _file_sha(settings.pairs)},
                          models=[settings.model], overwrite=overwrite)
    model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
    vecs = compute_vectors(model, pairs, position=settings.position, style=settings.style, hook=settings.hook,
                           batch_size=settings.batch_size, progress=progress)
    vecs.meta.update(model=settings.model, checkpoint=store.checkpoints[settings.model], versions=versions())
    store.write_bytes("vectors.safetensors", save(vecs.tensors(), metadata={"format": "pt"}))
    store.write_json("vectors.json", vecs.meta)
    store.finish()
    return vecs


@dataclass
class GenerateSettings:
    """What determines a set of steered generations."""

    model: str = "toy"
    vectors: str = ""
    """Folder holding vectors.safetensors."""
    prompts: str = ""
    """JSONL of {"prompt"} user messages."""
    layer: int = 0
    mode: str = "add"
    coef: float = 1.0
    positions: str = "all"
    decay: float | None = None
    max_new_tokens: int = 64
    style: str = "auto"
    batch_size: int = 16
    seed: int | None = None
    """Sample with this seed instead of greedy decoding."""
    temperature: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OlmoIVError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("batch_size", self.batch_size, 1)


def run_generate(settings: GenerateSettings, out: str | Path, *, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> list[dict]:
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode

    prompts = read_prompts(settings.prompts)
    vecs = SteeringVectors.load(settings.vectors)
    spec = vecs.spec(settings.layer, mode=settings.mode, coef=settings.coef, positions=settings.positions,
                     decay=settings.decay)
    store = RunStore.open(out, "steered-generation",
                          {**asdict(settings), "prompts_sha256": _file_sha(settings.prompts),
                           "vectors_sha256": _file_sha(Path(settings.vectors) / "vectors.safetensors")},
                          models=[settings.model], overwrite=overwrite)
    model, rows = None, []
    for start in range(0, len(prompts), settings.batch_size):
        unit = f"generate_{start:05d}"
        chunk = prompts[start : start + settings.batch_size]
        if not store.done(unit):
            if model is None:
                model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
                if model.tokenizer is None:
                    raise OlmoIVError(f"model {settings.model!r} has no tokenizer.json: generation needs one")
            ids = [encode(model.tokenizer, format_prompt(model, p, style=settings.style)) for p in chunk]
            new = generate_steered(model, ids, [spec], max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size, seed=settings.seed,
                                   temperature=settings.temperature)
            texts = [model.tokenizer.decode(g) for g in new]
            store.complete(unit, {"rows.json": [{"prompt": p, "ids": g, "text": t}
                                                for p, g, t in zip(chunk, new, texts, strict=True)]})
        rows += store.read_json(unit, "rows.json")
        if progress is not None:
            progress("generating", len(chunk), len(prompts))
    store.write_text("generations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    store.write_json("summary.json", {"settings": asdict(settings), "checkpoints": store.checkpoints,
                                      "vectors": vecs.meta, "versions": versions(), "n": len(rows)})
    store.finish()
    return rows
