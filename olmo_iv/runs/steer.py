"""Steering runs on disk (`olmo-iv steer ...`), through the run store.

    vectors:   vectors.safetensors (u [n_layers, d_model], zbar [n_layers]) and vectors.json (metadata)
    generate:  generations.jsonl, one {"prompt", "ids", "text"} per prompt (new token ids, stopping at EOS,
               which is not included), in units of `batch_size` prompts
    format:    results.csv, layers.csv, summary.json, conditions and layers figures (four conditions per row)
    layers:    layers.csv, summary.json (chosen layers), the layers figure, vectors/<instruction>/
    keywords:  results.csv, summary.json
    length:    results.csv, summary.json, the length figure, vectors/level{k}/

Every generation is a unit of the run (a done unit is read back, never computed again), and so are vectors that
later units depend on, so a killed run continues to the uninterrupted result (tests/test_steer_resume.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.evals.ifeval.scoring import read_jsonl
from olmo_iv.interventions.steering import (
    MODES,
    Steer,
    SteeringVectors,
    compute_vectors,
    generate_steered,
    response_nll,
)
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

    def __post_init__(self) -> None:
        from olmo_iv.interventions.steering import VECTOR_POSITIONS

        if self.position not in VECTOR_POSITIONS:
            raise OlmoIVError(f"position={self.position!r}: use one of {', '.join(VECTOR_POSITIONS)}")
        check_range("batch_size", self.batch_size, 1)


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
class GenerationSettings:
    """The generation settings every steering experiment shares."""

    max_new_tokens: int = 64
    """New tokens per response (a row also ends at EOS)."""
    style: str = "auto"
    """Prompt style (olmo_iv.chat): the model's chat template where it has one."""
    batch_size: int = 16
    """Prompts per batch and per unit of the run."""
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("batch_size", self.batch_size, 1)


@dataclass
class GenerateSettings(GenerationSettings):
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
    seed: int | None = None
    """Sample with this seed instead of greedy decoding."""
    temperature: float = 1.0
    also: list[str] = field(default_factory=list)
    """More specs acting at the same time, each 'VECTORS_DIR:LAYER:MODE:COEF' (e.g. a format vector and a
    conciseness vector, composed as Stolfo et al. compose them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise OlmoIVError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        for text in self.also:
            _parse_also(text)


def _parse_also(text: str) -> tuple[str, int, str, float]:
    parts = text.rsplit(":", 3)
    try:
        folder, layer, mode, coef = parts
        return folder, int(layer), mode, float(coef)
    except ValueError:
        raise OlmoIVError(f"also={text!r}: write VECTORS_DIR:LAYER:MODE:COEF, e.g. runs/len:12:add:20") from None


def run_generate(settings: GenerateSettings, out: str | Path, *, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> list[dict]:
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode

    prompts = read_prompts(settings.prompts)
    vecs = SteeringVectors.load(settings.vectors)
    specs = [vecs.spec(settings.layer, mode=settings.mode, coef=settings.coef, positions=settings.positions,
                       decay=settings.decay)]
    for text in settings.also:
        folder, layer, mode, coef = _parse_also(text)
        specs.append(SteeringVectors.load(folder).spec(layer, mode=mode, coef=coef, positions=settings.positions))
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
            new = generate_steered(model, ids, specs, max_new_tokens=settings.max_new_tokens,
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


# ------------------------------------------------------------------------------------------ the format experiment

FORMAT_DATA = Path(__file__).resolve().parents[1] / "data" / "llm_steer_instruct" / "ifeval_single_instr_format.jsonl"
CONDITIONS = ("no_instruction", "no_instruction+steer", "instruction", "instruction+steer")


@dataclass
class FormatRow:
    key: int
    prompt: str
    """The user message with its instruction."""
    without: str
    """The same message without it."""
    instruction_id: str
    kwargs: dict


def toy_steer_rows(per_type: int = 20, lang: str = "en", placement: str = "post") -> list[FormatRow]:
    """The steering toy's format set: held-out contents with held-out phrasings (never trained on), per instruction
    type of the toy, in Stolfo's row format; the shipped checkpoint's settings, so the split is the one it kept."""
    import random

    from olmo_iv.loading import BUILTIN
    from olmo_iv.toy import steer as T

    cfg = T.SteerConfig(**json.loads((BUILTIN["toy-steer"] / "training.json").read_text())["config"])
    split = T.split_phrasings(cfg)
    rng = random.Random(f"{cfg.seed}/stolfo-format")
    rows = []
    for t, itype in enumerate(T.D.TYPES):
        held = split.heldout[(itype, lang)]
        for i in range(per_type):
            kw = rng.choice(T.D.KEYWORDS)
            content = T.sample_content(rng, cfg, heldout=True)
            _, kwargs = T.transform(itype, content, kw)
            instruction = T.fill(held[i % len(held)], kw)
            rows.append(FormatRow(1000 * t + i, T.message(content, instruction, placement), content.text, itype,
                                  kwargs or {}))
    return rows


def read_format_rows(path: str | Path | None = None) -> list[FormatRow]:
    """Single-instruction rows: key, prompt, prompt_without_instruction, instruction_id_list (one id), kwargs."""
    from olmo_iv.evals.ifeval import validate_kwargs

    out = []
    for number, row in read_jsonl(path or FORMAT_DATA, "data"):
        try:
            ids, kwargs = row["instruction_id_list"], row["kwargs"]
            if len(ids) != 1:
                raise OlmoIVError(f"data= line {number}: the format experiment takes one instruction per row")
            out.append(FormatRow(int(row["key"]), row["prompt"], row["prompt_without_instruction"], ids[0],
                                 validate_kwargs(ids[0], {k: v for k, v in kwargs[0].items() if v is not None})))
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise OlmoIVError(f"data= line {number}: expected key, prompt, prompt_without_instruction, "
                              f"instruction_id_list and kwargs ({err})") from None
    return out


@dataclass
class SearchSettings(GenerationSettings):
    """What the format experiment and the layer search share: the rows, the vectors' source, the candidate
    layers and the intervention."""

    model: str = "toy-steer"
    data: str | None = None
    """Rows as in Stolfo's format set; None: for toy-steer and toy-steer-base the toy's held-out format set
    (`toy_steer_rows`), for any other model the vendored 163 single-instruction IFEval format prompts."""
    vectors_from: str | None = None
    """Compute the vectors with this model and apply them to `model` (cross-model transfer, e.g. an instruct
    model's vectors on its base model, as the authors do); it must have `model`'s width. None: `model` itself."""
    vectors_style: str = "auto"
    """Prompt style of the vectors_from model's pairs (its chat template where it has one)."""
    layers: list[int] | None = None
    """Candidate layers. None: the authors' candidates, floor(L/5) to L-1 in steps of 2."""
    mode: str = "adjust_rs"
    coef: float = 1.0
    seed: int = 0
    nll: bool = True
    """Also score each validation response's mean token NLL under the unsteered model (the second degeneration
    measure; it costs one forward pass per response). False also turns off the perplexity filter."""
    min_perplexity: float | None = 2.5
    """With nll: a response whose perplexity under the unsteered model is below this counts as degenerate for the
    second filter (Stolfo: GPT-2 perplexity < 2.5). Like the n-gram filter, it zeroes a layer only where its share
    exceeds no steering's, so a model whose fluent responses it already predicts almost surely (the toys:
    perplexity about 1.0) is not filtered by it. None: off."""
    max_new_tokens: int = 96

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise OlmoIVError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        check_range("coef", self.coef)
        if self.min_perplexity is not None:
            check_range("min_perplexity", self.min_perplexity, 1, 1e6)


@dataclass
class FormatSettings(SearchSettings):
    """What determines a format-steering experiment (Stolfo et al. §2.5: four conditions per instruction). Per
    instruction and fold the best candidate layer on the fold's own (vector) rows is used, or none when no layer
    beats no steering there."""

    folds: int = 2
    """Vectors for a row come from the other folds' rows of its instruction: no row steers itself."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("folds", self.folds, 2)


@dataclass
class LayerSearchSettings(SearchSettings):
    """The authors' layer selection as a run of its own: per instruction, steer its held-out rows without the
    instruction at every candidate layer and keep the best loose accuracy that passes the degeneration filter."""

    n_valid: int = 10
    """Held-out validation rows per instruction (the authors': 10), drawn with `seed`; the instruction's other
    rows build its vector. An instruction with fewer rows keeps one row for its vector."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("n_valid", self.n_valid, 1)


def repetition(seq: str | Sequence[int], n: int = 4) -> float:
    """The share of n-grams that repeat an earlier one: the n-gram degeneration filter's measure (a looping
    response scores near 1; the perplexity filter is the other, `min_perplexity`). A text counts its words; a
    sequence of token ids counts tokens, which also sees loops without spaces ("SURESURESURE" is one word)."""
    units = seq.split() if isinstance(seq, str) else list(seq)
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def choose_filtered(base: Sequence[float | None],
                    candidates: Sequence[Sequence[float | None]]) -> tuple[int | None, list[float]]:
    """The authors' selection rule, for layers or strengths: `base` and each candidate are (accuracy, then one
    share of degenerate responses per criterion) on the same validation prompts, `base` unsteered. A candidate
    more degenerate than no steering by any criterion keeps 0 (a criterion that is None was not measured); the
    first candidate with the highest kept accuracy wins if it beats no steering. Returns its index (None: keep no
    steering) and every candidate's kept accuracy."""
    def worse(shares: Sequence[float | None]) -> bool:
        return any(x is not None and b is not None and x > b for x, b in zip(shares, base[1:], strict=True))

    kept = [0.0 if worse(c[1:]) else c[0] for c in candidates]
    best, chosen = base[0], None
    for i, k in enumerate(kept):
        if k > best:
            best, chosen = k, i
    return chosen, kept


GenerateFn = Callable[[str, list[str], list[Steer]], list[str]]
"""(unit, user messages, specs) -> one response text per message: a run's generation, through its store."""


@dataclass
class LayerScore:
    """One candidate layer of a layer search, on the validation rows of one instruction."""

    layer: int
    """-1: no steering (always a candidate, as the authors')."""
    n: int
    loose: float
    """IFEval loose accuracy of the steered responses to the rows without their instruction."""
    degenerate: float
    """Share of responses whose repeated word 4-grams exceed half (`repetition` > 0.5)."""
    low_perplexity: float | None
    """Share of responses whose perplexity under the unsteered model is below `min_perplexity` (Stolfo's
    criterion, with the model's own perplexity for GPT-2's); None: not measured (no NLL or no threshold)."""
    nll: float | None
    """Mean over the responses of the unsteered model's mean token NLL of the response (None: not scored)."""
    kept: float
    """loose, or 0 when either degenerate share exceeds no steering's (the authors' filter)."""


def search_layer(model, rows: Sequence[FormatRow], vecs: SteeringVectors, candidates: Sequence[int],
                 generate: GenerateFn, *, unit: str, mode: str = "adjust_rs", coef: float = 1.0, style: str = "auto",
                 nll: bool = True, min_perplexity: float | None = None,
                 batch_size: int = 16) -> tuple[Steer | None, list[LayerScore]]:
    """The authors' layer selection on `rows` (one instruction): generate without the instruction, unsteered and
    steered at each candidate layer; score IFEval loose accuracy and the degeneration measures; a layer whose
    share of looping responses, or (with nll and min_perplexity) of responses with a perplexity below
    min_perplexity, exceeds no steering's scores 0. Returns the chosen spec (None: no layer beats no steering)
    and one LayerScore per candidate, no steering first. Generations go through `generate` under the unit names
    `{unit}__valid_none` and `{unit}__valid_L{layer}`."""
    from olmo_iv.chat import format_prompt
    from olmo_iv.evals.ifeval import InputExample, score_example
    from olmo_iv.generate import encode

    messages = [r.without for r in rows]
    prompt_ids = [encode(model.tokenizer, format_prompt(model, m, style=style)) for m in messages] if nll else []

    def score(layer: int, texts: list[str]) -> LayerScore:
        loose = [score_example(InputExample(r.key, r.prompt, (r.instruction_id,), (r.kwargs,)), t).loose[0]
                 for r, t in zip(rows, texts, strict=True)]
        degenerate = sum(repetition(t) > 0.5 for t in texts) / len(texts)
        mean_nll = low = None
        if nll:
            per = [x for x in response_nll(model, prompt_ids, [encode(model.tokenizer, t) for t in texts],
                                           batch_size=batch_size) if x is not None]
            mean_nll = round(sum(per) / len(per), 6) if per else None
            if min_perplexity is not None:  # perplexity < p  <=>  mean NLL < log p; an empty response has none
                low = sum(x < math.log(min_perplexity) for x in per) / len(texts)
        return LayerScore(layer, len(texts), sum(loose) / len(loose), degenerate, low, mean_nll,
                          sum(loose) / len(loose))

    base = score(-1, generate(f"{unit}__valid_none", messages, []))
    specs = [vecs.spec(layer, mode=mode, coef=coef) for layer in candidates]
    scores = [score(layer, generate(f"{unit}__valid_L{layer}", messages, [spec]))
              for layer, spec in zip(candidates, specs, strict=True)]
    chosen, kept = choose_filtered((base.loose, base.degenerate, base.low_perplexity),
                                   [(s.loose, s.degenerate, s.low_perplexity) for s in scores])
    for s, k in zip(scores, kept, strict=True):
        s.kept = k
    return (None if chosen is None else specs[chosen]), [base, *scores]


def _search_data(settings: SearchSettings) -> tuple[list[FormatRow], str]:
    """The rows and the sha256 that identifies them in the run's settings. The steering toys (either one, as the
    steered model or the vectors' source) default to the toy's held-out format set."""
    toys = ("toy-steer", "toy-steer-base")
    if settings.data is None and (settings.model in toys or settings.vectors_from in toys):
        rows = toy_steer_rows()
        return rows, hashlib.sha256(json.dumps([asdict(r) for r in rows]).encode()).hexdigest()
    return read_format_rows(settings.data), _file_sha(settings.data or FORMAT_DATA)


def _search_models(settings: SearchSettings):
    """The steered model and the model the vectors come from (the same one unless vectors_from), checked for the
    same width; and the candidate layers, checked against both."""
    model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
    source = model
    if settings.vectors_from is not None:
        source = load(settings.vectors_from, dtype=getattr(torch, settings.dtype), device=settings.device)
        if source.config.d_model != model.config.d_model:
            raise OlmoIVError(f"vectors_from={settings.vectors_from!r} has d_model={source.config.d_model} but "
                              f"model={settings.model!r} has d_model={model.config.d_model}: steering vectors "
                              "transfer only between models of the same width")
        if source.tokenizer is None:
            raise OlmoIVError(f"vectors_from={settings.vectors_from!r} has no tokenizer.json: its vectors need one")
    if model.tokenizer is None:
        raise OlmoIVError(f"model={settings.model!r} has no tokenizer.json: generation needs one")
    L = min(model.config.n_layers, source.config.n_layers)
    candidates = settings.layers if settings.layers is not None else list(range(L // 5, L, 2))
    for layer in candidates:
        if not 0 <= layer < L:
            raise OlmoIVError(f"layers={candidates}: layer {layer} is outside 0..{L - 1}"
                              + (" (the layers both models have)" if source is not model else ""))
    return model, source, candidates


def _open_search_run(settings: SearchSettings, out: str | Path, kind: str, overwrite: bool,
                     check: Callable[[Any, Any], None] | None = None):
    """What the format, layer-search and composition runs start with: the rows, the steered model, the vectors'
    model, the candidate layers, and the run's store, opened only after `check(model, source)` passed (a bad
    setting writes nothing)."""
    rows, data_sha = _search_data(settings)
    model, source, candidates = _search_models(settings)
    if check is not None:
        check(model, source)
    models = [settings.model] + ([settings.vectors_from] if settings.vectors_from else [])
    store = RunStore.open(out, kind, {**asdict(settings), "data_sha256": data_sha}, models=models,
                          overwrite=overwrite)
    return rows, model, source, candidates, store


def _store_generate(store: RunStore, model, settings: GenerationSettings,
                    progress: ProgressFn | None) -> GenerateFn:
    """Generation as units of the run: a done unit is read back, never computed again."""
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode

    def gens(unit: str, texts: list[str], specs: list[Steer]) -> list[str]:
        if not store.done(unit):
            ids = [encode(model.tokenizer, format_prompt(model, t, style=settings.style)) for t in texts]
            new = generate_steered(model, ids, specs, max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size)
            store.complete(unit, {"texts.json": [model.tokenizer.decode(g) for g in new]})
        if progress is not None:
            progress("generating", len(texts), None)
        return store.read_json(unit, "texts.json")

    return gens


def _group(rows: Sequence[FormatRow]) -> dict[str, list[FormatRow]]:
    by_id: dict[str, list[FormatRow]] = {}
    for r in rows:
        by_id.setdefault(r.instruction_id, []).append(r)
    return dict(sorted(by_id.items()))


def _vectors_style(settings: SearchSettings) -> str:
    return settings.style if settings.vectors_from is None else settings.vectors_style


LAYER_HEADER = ["layer", "n", "loose", "degenerate_share", "low_perplexity_share", "mean_nll", "kept_loose"]


def _score_row(s: LayerScore) -> list:
    return [s.layer, s.n, round(s.loose, 6), round(s.degenerate, 6),
            "" if s.low_perplexity is None else round(s.low_perplexity, 6), "" if s.nll is None else s.nll,
            round(s.kept, 6)]


def _format_folds(settings: FormatSettings, rows: Sequence[FormatRow], model, source, candidates: list[int],
                  gens: GenerateFn) -> tuple[list[tuple[str, int, str, list[FormatRow], Steer | None]], list[list],
                                             dict[int, int]]:
    """The format vectors of the format and composition experiments: rows are dealt into `settings.folds` folds
    per instruction (seeded); per instruction and fold, vectors from the other folds' rows (computed by `source`)
    and the authors' layer search on them (steering `model`). Returns (instruction, fold, unit tag, the fold's
    rows, the chosen spec or None) per fold, the layers.csv rows, and every row's fold."""
    import random

    fold: dict[int, int] = {}
    for iid, group in _group(rows).items():
        order = list(range(len(group)))
        random.Random(f"{settings.seed}/{iid}").shuffle(order)
        for rank, i in enumerate(order):
            fold[group[i].key] = rank % settings.folds
    out, layer_rows = [], []
    for iid, group in _group(rows).items():
        for f in range(settings.folds):
            test = [r for r in group if fold[r.key] == f]
            train = [r for r in group if fold[r.key] != f]
            if not test:
                continue
            tag = f"{iid.replace(':', '__')}__fold{f}"
            chosen = None
            if train:
                vecs = compute_vectors(source, [(r.prompt, r.without) for r in train], style=_vectors_style(settings),
                                       batch_size=settings.batch_size)
                chosen, scores = search_layer(model, train, vecs, candidates, gens, unit=tag, mode=settings.mode,
                                              coef=settings.coef, style=settings.style, nll=settings.nll,
                                              min_perplexity=settings.min_perplexity, batch_size=settings.batch_size)
                layer_rows += [[iid, f, *_score_row(sc)] for sc in scores]
            out.append((iid, f, tag, test, chosen))
    return out, layer_rows, fold


def run_format(settings: FormatSettings, out: str | Path, *, overwrite: bool = False,
               progress: ProgressFn | None = None) -> dict:
    """Four conditions per row (no instruction, no instruction + steering, instruction, instruction + steering),
    judged by the IFEval checkers strict and loose; results.csv, summary.json, layers.csv and two figures."""
    from olmo_iv.evals.ifeval import InputExample, score_example
    from olmo_iv.runs import figures

    rows, model, source, candidates, store = _open_search_run(settings, out, "steer-format", overwrite)
    gens = _store_generate(store, model, settings, progress)
    folds, layer_rows, fold = _format_folds(settings, rows, model, source, candidates, gens)
    results = []
    for iid, f, tag, test, chosen in folds:
        for cond in CONDITIONS:
            texts_in = [r.prompt if cond.startswith("instruction") else r.without for r in test]
            specs = [chosen] if cond.endswith("+steer") and chosen is not None else []
            texts = gens(f"{tag}__{cond.replace('+', '_')}", texts_in, specs)
            for r, t in zip(test, texts, strict=True):
                s = score_example(InputExample(r.key, r.prompt, (r.instruction_id,), (r.kwargs,)), t)
                results.append([r.key, iid, f, chosen.layer if chosen is not None else -1, cond,
                                int(s.strict[0]), int(s.loose[0]), round(repetition(t), 4), t])
    header = ["key", "instruction_id", "fold", "layer", "condition", "strict", "loose", "repetition", "response"]
    store.write_csv("results.csv", header, results)
    store.write_csv("layers.csv", ["instruction_id", "fold", *LAYER_HEADER], layer_rows)
    summary = {"settings": asdict(settings), "checkpoints": store.checkpoints, "versions": versions(),
               "candidates": candidates, "vectors_from": settings.vectors_from or settings.model,
               "folds": {iid: [[r.key for r in group if fold[r.key] == f] for f in range(settings.folds)]
                         for iid, group in _group(rows).items()},
               "by_instruction": {}, "overall": {}}
    for iid in [*_group(rows), None]:
        sel = [r for r in results if iid is None or r[1] == iid]
        entry = {c: {"n": sum(r[4] == c for r in sel),
                     "strict": sum(r[5] for r in sel if r[4] == c) / max(1, sum(r[4] == c for r in sel)),
                     "loose": sum(r[6] for r in sel if r[4] == c) / max(1, sum(r[4] == c for r in sel))}
                 for c in CONDITIONS}
        if iid is None:
            summary["overall"] = entry
        else:
            summary["by_instruction"][iid] = entry
    store.write_json("summary.json", summary)
    store.save_figure("conditions", figures.steering_conditions(summary, metric="strict"))
    if layer_rows:
        store.save_figure("layers", figures.layer_sweep([dict(zip(["instruction_id", "fold", *LAYER_HEADER], r))
                                                         for r in layer_rows]))
    store.finish()
    return summary


def run_layers(settings: LayerSearchSettings, out: str | Path, *, overwrite: bool = False,
               progress: ProgressFn | None = None) -> dict:
    """The layer search on its own (`olmo-iv steer layers`): per instruction, vectors from its other rows and the
    authors' selection on `n_valid` held-out rows (`search_layer`). Writes layers.csv (every candidate with its
    loose accuracy, degenerate share, mean NLL and filtered accuracy), summary.json (the chosen layer per
    instruction, and one layer for all), layers.{png,pdf} and each instruction's vectors under vectors/<id>/."""
    import random

    from olmo_iv.runs import figures

    rows, model, source, candidates, store = _open_search_run(settings, out, "steer-layers", overwrite)
    gens = _store_generate(store, model, settings, progress)
    by_id = _group(rows)
    layer_rows, chosen_by, scores_by, vectors, valid_keys = [], {}, {}, {}, {}
    for iid, group in by_id.items():
        if len(group) < 2:
            raise OlmoIVError(f"data: instruction {iid} has 1 row; the layer search needs at least 2 per instruction "
                              "(one for its vector, one held out)")
        order = list(range(len(group)))
        random.Random(f"{settings.seed}/{iid}").shuffle(order)
        n_valid = min(settings.n_valid, len(group) - 1)
        valid = [group[i] for i in order[:n_valid]]
        train = [group[i] for i in sorted(order[n_valid:])]
        valid_keys[iid] = [r.key for r in valid]
        tag = iid.replace(":", "__")
        unit = f"{tag}__vectors"
        if not store.done(unit):  # a unit, so that a resumed run searches with the very same vectors
            v = compute_vectors(source, [(r.prompt, r.without) for r in train], style=_vectors_style(settings),
                                batch_size=settings.batch_size)
            v.meta.update(model=settings.vectors_from or settings.model, instruction_id=iid,
                          keys=[r.key for r in train])
            store.complete(unit, {"vectors.safetensors": save(v.tensors(), metadata={"format": "pt"}),
                                  "vectors.json": v.meta})
        vectors[iid] = SteeringVectors.load(store.unit_dir(unit))
        chosen, scores = search_layer(model, valid, vectors[iid], candidates, gens, unit=tag, mode=settings.mode,
                                      coef=settings.coef, style=settings.style, nll=settings.nll,
                                      min_perplexity=settings.min_perplexity, batch_size=settings.batch_size)
        chosen_by[iid] = chosen.layer if chosen is not None else -1
        scores_by[iid] = scores
        layer_rows += [[iid, *_score_row(s), int(s.layer == chosen_by[iid])] for s in scores]
    # one layer for every instruction: the best mean filtered accuracy, if it beats no steering's mean
    mean_kept = {c: sum(next(s.kept for s in sc if s.layer == c) for sc in scores_by.values()) / len(scores_by)
                 for c in [-1, *candidates]}
    overall = max(candidates, key=lambda c: (mean_kept[c], -c)) if candidates else -1
    if not mean_kept.get(overall, 0.0) > mean_kept[-1]:
        overall = -1
    store.write_csv("layers.csv", ["instruction_id", *LAYER_HEADER, "chosen"], layer_rows)
    for iid, v in vectors.items():
        folder = f"vectors/{iid.replace(':', '__')}"
        store.write_bytes(f"{folder}/vectors.safetensors", save(v.tensors(), metadata={"format": "pt"}))
        store.write_json(f"{folder}/vectors.json", v.meta)
    summary = {"settings": asdict(settings), "checkpoints": store.checkpoints, "versions": versions(),
               "candidates": candidates, "vectors_from": settings.vectors_from or settings.model,
               "validation_keys": valid_keys, "chosen": chosen_by, "overall_layer": overall,
               "mean_kept_loose": {str(k): v for k, v in mean_kept.items()},
               "by_instruction": {iid: [asdict(s) for s in sc] for iid, sc in scores_by.items()}}
    store.write_json("summary.json", summary)
    store.save_figure("layers", figures.layer_sweep([dict(zip(["instruction_id", *LAYER_HEADER], r))
                                                     for r in layer_rows]))
    store.finish()
    return summary


# ----------------------------------------------------------------------------------- word inclusion and exclusion

KEYWORD_DATA = FORMAT_DATA.parent
KEYWORD_INSTRUCTION = 'Make sure that the word "{word}" is included in the output.'


@dataclass
class KeywordSettings(GenerationSettings):
    """Stolfo's word experiments: a vector per word from (question + inclusion instruction, question) pairs;
    inclusion steers with +coef, exclusion with the inclusion vector at -coef; no instruction in the prompts."""

    model: str = "toy"
    task: str = "include"
    """include (keywords:existence, 86 prompts) or exclude (keywords:forbidden_words, 117 prompts)."""
    layer: int | None = None
    """Steered layer; None: two thirds of the way up."""
    coef: float = 40.0
    """The multiple of u added (subtracted for exclusion)."""
    n_pairs: int = 20
    """Validation questions per word vector."""
    limit: int | None = None
    """Only the first N test prompts."""
    max_new_tokens: int = 96

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in ("include", "exclude"):
            raise OlmoIVError(f"task={self.task!r}: use include or exclude")
        check_range("coef", self.coef)
        check_range("n_pairs", self.n_pairs, 1)
        if self.limit is not None:
            check_range("limit", self.limit, 1)


def run_keywords(settings: KeywordSettings, out: str | Path, *, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> dict:
    """No instruction vs no instruction + steering, per prompt, judged strictly by the IFEval checker."""
    from olmo_iv.chat import format_prompt
    from olmo_iv.evals.ifeval import InputExample, score_example
    from olmo_iv.generate import encode

    path = KEYWORD_DATA / f"ifeval_single_keyword_{settings.task}.jsonl"
    rows = read_format_rows(path)[: settings.limit]
    questions = [r["question"] for _, r in read_jsonl(KEYWORD_DATA / "inclusion_validation.jsonl", "data")]
    store = RunStore.open(out, f"steer-keywords-{settings.task}", asdict(settings), models=[settings.model],
                          overwrite=overwrite)
    model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
    layer = settings.layer if settings.layer is not None else (2 * model.config.n_layers) // 3
    sign = 1.0 if settings.task == "include" else -1.0
    results = []
    for r in rows:
        word = r.kwargs["keywords"][0] if settings.task == "include" else r.kwargs["forbidden_words"][0]
        unit = f"row_{r.key}"
        if not store.done(unit):
            pairs = [(f"{q} {KEYWORD_INSTRUCTION.format(word=word)}", q) for q in questions[: settings.n_pairs]]
            vecs = compute_vectors(model, pairs, style=settings.style, batch_size=settings.batch_size)
            ids = [encode(model.tokenizer, format_prompt(model, r.without, style=settings.style))]
            texts = {}
            for cond, specs in (("no_instruction", []),
                                ("no_instruction+steer", [vecs.spec(layer, mode="add", coef=sign * settings.coef)])):
                new = generate_steered(model, ids, specs, max_new_tokens=settings.max_new_tokens)
                texts[cond] = model.tokenizer.decode(new[0])
            store.complete(unit, {"texts.json": texts})
        texts = store.read_json(unit, "texts.json")
        for cond, text in texts.items():
            s = score_example(InputExample(r.key, r.prompt, (r.instruction_id,), (r.kwargs,)), text)
            results.append([r.key, word, cond, int(s.strict[0]), int(s.loose[0]), round(repetition(text), 4), text])
        if progress is not None:
            progress(settings.task, 1, len(rows))
    store.write_csv("results.csv", ["key", "word", "condition", "strict", "loose", "repetition", "response"], results)
    summary = {"settings": asdict(settings), "layer": layer, "checkpoints": store.checkpoints, "versions": versions(),
               "n": len(rows),
               "strict": {c: sum(x[3] for x in results if x[2] == c) / len(rows)
                          for c in ("no_instruction", "no_instruction+steer")}}
    store.write_json("summary.json", summary)
    store.finish()
    return summary


# --------------------------------------------------------------------------------------------------- length

LENGTH_QUERIES = KEYWORD_DATA / "ifeval_wo_instructions.jsonl"
LENGTH_PHRASINGS = KEYWORD_DATA / "length_phrasings.json"
LENGTH_LEVELS = ("extremely_concise", "concise", "moderate", "verbose", "extremely_verbose")
"""Stolfo's five levels of vague length phrasings; level 0's vector is the conciseness vector."""


def length_phrasings() -> list[list[str]]:
    """Per level (LENGTH_LEVELS order), its phrasings (vendored from Stolfo et al.'s repository)."""
    levels = json.loads(LENGTH_PHRASINGS.read_text())["levels"]
    if [lv["name"] for lv in levels] != list(LENGTH_LEVELS):
        raise OlmoIVError(f"{LENGTH_PHRASINGS} must list the levels {', '.join(LENGTH_LEVELS)} in order")
    return [list(lv["phrasings"]) for lv in levels]


def length_pairs(queries: list[str], level: int, seed: int = 0) -> list[tuple[str, str]]:
    """(query + one of the level's phrasings, query) per query; the phrasing is drawn per query and level, as
    the authors draw one per row, from a seeded generator so that a run is reproducible."""
    import random

    phrasings = length_phrasings()
    if not 0 <= level < len(phrasings):
        raise OlmoIVError(f"level={level}: the length levels are 0..{len(phrasings) - 1}")
    return [(f"{q} {random.Random(f'{seed}/{i}/{level}').choice(phrasings[level])}", q)
            for i, q in enumerate(queries)]


@dataclass
class LengthSettings(GenerationSettings):
    """Stolfo's length experiment: a vector per level of vague length phrasing (0 extremely concise, the
    conciseness vector, ... 4 extremely verbose) from (query + phrasing, query) pairs, each added in its own
    condition while the prompt asks for at most N sentences (N = 1..max_sentences), on held-out queries."""

    model: str = "toy"
    layer: int | None = None
    """Steered layer; None: two thirds of the way up."""
    coef: float = 20.0
    """The multiple of each level vector added (Stolfo: 20, with the conciseness vector)."""
    levels: list[int] = field(default_factory=lambda: list(range(len(LENGTH_LEVELS))))
    """Level vectors tested, each in its own condition (index into LENGTH_LEVELS)."""
    n_pairs: int = 50
    """Base queries per level vector (the first ones, as the authors'); every level uses the same queries."""
    n_test: int = 50
    """Held-out test queries (the last ones, as the authors')."""
    max_sentences: int = 5
    seed: int = 0
    """Seed of the phrasing drawn per query and level."""
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("coef", self.coef)
        check_range("n_pairs", self.n_pairs, 1)
        check_range("n_test", self.n_test, 1)
        check_range("max_sentences", self.max_sentences, 1)
        if self.layer is not None:
            check_range("layer", self.layer, 0)
        if not self.levels or len(set(self.levels)) != len(self.levels) or \
                not all(0 <= k < len(LENGTH_LEVELS) for k in self.levels):
            raise OlmoIVError(f"levels={self.levels}: give distinct levels among 0..{len(LENGTH_LEVELS) - 1} "
                              f"({', '.join(f'{k} {n}' for k, n in enumerate(LENGTH_LEVELS))})")


def at_most(n: int) -> str:
    """The authors' length instruction, e.g. "Answer using at most 3 sentences." (singular for 1)."""
    return f"Answer using at most {n} sentence{'s' if n > 1 else ''}."


def length_verdict(text: str, n: int) -> tuple[bool, int, int]:
    """(at most n sentences by IFEval's `length_constraints:number_sentences`, i.e. fewer than n + 1; the
    sentence count; the word count) of a response."""
    from olmo_iv.evals.ifeval import check_instruction
    from olmo_iv.evals.ifeval.text import count_sentences, count_words

    ok = check_instruction("length_constraints:number_sentences", text, {"num_sentences": n + 1, "relation": "less than"})
    return bool(ok), count_sentences(text), count_words(text)


def length_queries() -> list[str]:
    """The 541 instruction-stripped IFEval queries (GPT-4o's `model_output`), in file order."""
    return [r["model_output"].strip() for _, r in read_jsonl(LENGTH_QUERIES, "data") if r.get("model_output")]


def _length_vectors(store: RunStore, model, name: str, queries: list[str], level: int, *, seed: int, style: str,
                    batch_size: int) -> SteeringVectors:
    """The level's vectors from (query + phrasing, query) pairs, computed once as the unit `vectors_level{k}`, so a
    resumed run steers with the very same vectors."""
    unit = f"vectors_level{level}"
    if not store.done(unit):
        v = compute_vectors(model, length_pairs(queries, level, seed), style=style, batch_size=batch_size)
        v.meta.update(model=name, level=level, level_name=LENGTH_LEVELS[level])
        store.complete(unit, {"vectors.safetensors": save(v.tensors(), metadata={"format": "pt"}),
                              "vectors.json": v.meta})
    return SteeringVectors.load(store.unit_dir(unit))


def length_condition(level: int | None) -> str:
    """The condition name of a level vector (None: the instruction alone)."""
    return "instruction" if level is None else f"instruction+{LENGTH_LEVELS[level]}"


def run_length(settings: LengthSettings, out: str | Path, *, overwrite: bool = False,
               progress: ProgressFn | None = None) -> dict:
    """Per N and condition (the instruction alone, or with one level vector added): IFEval
    `length_constraints:number_sentences` (fewer than N + 1, i.e. at most N) strict accuracy and the mean sentence
    and word counts. Writes results.csv, summary.json, length.{png,pdf} and each level's vectors under
    vectors/level{k}/ (usable by `steer generate --vectors` and `--also`)."""
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode
    from olmo_iv.runs import figures

    queries = length_queries()
    if len(queries) < settings.n_pairs + settings.n_test:
        raise OlmoIVError(f"n_pairs={settings.n_pairs} + n_test={settings.n_test} exceed the {len(queries)} queries")
    train, test = queries[: settings.n_pairs], queries[len(queries) - settings.n_test :]
    store = RunStore.open(out, "steer-length", asdict(settings), models=[settings.model], overwrite=overwrite)
    model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
    L = model.config.n_layers
    layer = settings.layer if settings.layer is not None else (2 * L) // 3
    if not 0 <= layer < L:
        raise OlmoIVError(f"layer={layer}: this model has layers 0..{L - 1}")
    vecs: dict[int, SteeringVectors] = {}
    for k in settings.levels:
        vecs[k] = _length_vectors(store, model, settings.model, train, k, seed=settings.seed, style=settings.style,
                                  batch_size=settings.batch_size)
        if progress is not None:
            progress("vectors", 1, len(settings.levels))
    conditions = [None, *settings.levels]
    rows, by_condition = [], {}
    for n in range(1, settings.max_sentences + 1):
        prompts = [f"{q} {at_most(n)}" for q in test]
        for level in conditions:
            cond = length_condition(level)
            specs = [] if level is None else [vecs[level].spec(layer, mode="add", coef=settings.coef)]
            unit = f"n{n}_{cond.replace('+', '_')}"
            if not store.done(unit):
                ids = [encode(model.tokenizer, format_prompt(model, p, style=settings.style)) for p in prompts]
                new = generate_steered(model, ids, specs, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size)
                store.complete(unit, {"texts.json": [model.tokenizer.decode(g) for g in new]})
            texts = store.read_json(unit, "texts.json")
            ok, sentences, words = (list(x) for x in zip(*(length_verdict(t, n) for t in texts), strict=True))
            by_condition[f"{n}/{cond}"] = {"n": len(texts), "strict": sum(ok) / len(ok),
                                           "mean_sentences": sum(sentences) / len(texts),
                                           "mean_words": sum(words) / len(texts)}
            rows += [[n, cond, -1 if level is None else level, q, int(o), s, w, t]
                     for q, o, s, w, t in zip(range(len(test)), ok, sentences, words, texts, strict=True)]
            if progress is not None:
                progress("length", 1, settings.max_sentences * len(conditions))
    store.write_csv("results.csv", ["max_sentences", "condition", "level", "query", "strict", "sentences", "words",
                                    "response"], rows)
    by_vector = {}
    for level in conditions:
        cond = length_condition(level)
        per_n = [by_condition[f"{n}/{cond}"] for n in range(1, settings.max_sentences + 1)]
        by_vector[cond] = {"level": level, "strict": sum(e["strict"] for e in per_n) / len(per_n),
                           "mean_sentences": sum(e["mean_sentences"] for e in per_n) / len(per_n),
                           "mean_words": sum(e["mean_words"] for e in per_n) / len(per_n)}
    phrasings = length_phrasings()
    for k in settings.levels:
        store.write_bytes(f"vectors/level{k}/vectors.safetensors", save(vecs[k].tensors(), metadata={"format": "pt"}))
        store.write_json(f"vectors/level{k}/vectors.json", vecs[k].meta)
    summary = {"settings": asdict(settings), "layer": layer, "checkpoints": store.checkpoints, "versions": versions(),
               "levels": [{"level": k, "name": LENGTH_LEVELS[k], "condition": length_condition(k),
                           "phrasings": phrasings[k], "vectors": f"vectors/level{k}"} for k in settings.levels],
               "conciseness": length_condition(0) if 0 in settings.levels else None,
               "by_condition": by_condition, "by_vector": by_vector}
    store.write_json("summary.json", summary)
    store.save_figure("length", figures.length_levels(summary))
    store.finish()
    return summary


COMPOSE_CONDITIONS = tuple(f"{base}{fmt}{length}" for base in ("no_instruction", "instruction")
                           for fmt in ("", "+format") for length in ("", "+length"))
"""The composition experiment's conditions: the format instruction in the prompt or not, times format steering,
times length steering."""


@dataclass
class ComposeSettings(FormatSettings):
    """Stolfo's composition of format and length (their composition/evaluate_format_plus_length.py): every format
    row also asks for at most N sentences, N drawn per row; the format vector (`mode`, by default adjust_rs, at the
    layer searched per instruction and fold exactly as in the format experiment) and a length vector (added) act
    alone and together, with and without the format instruction in the prompt. Format is judged by the row's
    IFEval checker, length by `length_constraints:number_sentences`."""

    length_level: int = 0
    """The length vector's level (LENGTH_LEVELS): 0 extremely concise, the authors' conciseness vector; 4 extremely
    verbose, their verbosity vector."""
    length_layer: int | None = None
    """The layer where the length vector is added, and whose vector it is; None: two thirds of the way up, as
    `steer length` (the authors: 12 of Phi-3's 32)."""
    length_coef: float = 20.0
    """The multiple of the unit length vector added (the authors: 20)."""
    n_pairs: int = 50
    """Instruction-stripped IFEval queries (the first ones) whose (query + phrasing, query) pairs give the length
    vector, as in `steer length`."""
    max_sentences: int = 5
    """N is drawn per row, uniformly from 1..max_sentences, with `seed` (the authors: 1..5)."""
    length_instruction: bool = True
    """Append "Answer using at most N sentences." to every prompt (the authors' default); False: no prompt asks
    for a length, and length accuracy measures what the vector alone does."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.length_level < len(LENGTH_LEVELS):
            raise OlmoIVError(f"length_level={self.length_level}: give a level in 0..{len(LENGTH_LEVELS) - 1} "
                              f"({', '.join(f'{k} {n}' for k, n in enumerate(LENGTH_LEVELS))})")
        if self.length_layer is not None:
            check_range("length_layer", self.length_layer, 0)
        check_range("length_coef", self.length_coef, -1e6, 1e6)
        check_range("n_pairs", self.n_pairs, 1)
        check_range("max_sentences", self.max_sentences, 1)


COMPOSE_HEADER = ["key", "instruction_id", "fold", "format_layer", "condition", "max_sentences", "format_strict",
                  "format_loose", "length", "both", "sentences", "words", "repetition", "response"]


def run_compose(settings: ComposeSettings, out: str | Path, *, overwrite: bool = False,
                progress: ProgressFn | None = None) -> dict:
    """The eight conditions of COMPOSE_CONDITIONS per format row. Writes results.csv (every response: format strict
    and loose, at most N sentences, both, counts), layers.csv (the format layer search), summary.json (per condition,
    overall and per instruction: n, format strict and loose, length and both accuracy, mean sentences and words),
    compose.{png,pdf} and the length vector under vectors/length/."""
    import random

    from olmo_iv.evals.ifeval import InputExample, score_example
    from olmo_iv.runs import figures

    queries = length_queries()
    if settings.n_pairs > len(queries):
        raise OlmoIVError(f"n_pairs={settings.n_pairs}: there are {len(queries)} queries")

    def layer_of(model) -> int:
        return settings.length_layer if settings.length_layer is not None else (2 * model.config.n_layers) // 3

    def check(model, source) -> None:
        L = min(model.config.n_layers, source.config.n_layers)
        if not 0 <= layer_of(model) < L:
            raise OlmoIVError(f"length_layer={layer_of(model)}: the layers are 0..{L - 1}"
                              + (" (the layers both models have)" if source is not model else ""))

    rows, model, source, candidates, store = _open_search_run(settings, out, "steer-compose", overwrite, check)
    length_layer = layer_of(model)
    gens = _store_generate(store, model, settings, progress)
    length_vecs = _length_vectors(store, source, settings.vectors_from or settings.model, queries[: settings.n_pairs],
                                  settings.length_level, seed=settings.seed, style=_vectors_style(settings),
                                  batch_size=settings.batch_size)
    length_spec = length_vecs.spec(length_layer, mode="add", coef=settings.length_coef)
    rng = random.Random(f"{settings.seed}/sentences")
    n_of = {r.key: rng.randint(1, settings.max_sentences) for r in rows}

    def message(text: str, n: int) -> str:
        return f"{text} {at_most(n)}" if settings.length_instruction else text

    folds, layer_rows, fold = _format_folds(settings, rows, model, source, candidates, gens)
    results = []
    for iid, f, tag, test, chosen in folds:
        for cond in COMPOSE_CONDITIONS:
            texts_in = [message(r.prompt if cond.startswith("instruction") else r.without, n_of[r.key]) for r in test]
            specs = ([chosen] if "+format" in cond and chosen is not None else []) + \
                ([length_spec] if cond.endswith("+length") else [])
            texts = gens(f"{tag}__{cond.replace('+', '_')}", texts_in, specs)
            for r, t in zip(test, texts, strict=True):
                s = score_example(InputExample(r.key, r.prompt, (r.instruction_id,), (r.kwargs,)), t)
                ok, sentences, words = length_verdict(t, n_of[r.key])
                results.append([r.key, iid, f, chosen.layer if chosen is not None else -1, cond, n_of[r.key],
                                int(s.strict[0]), int(s.loose[0]), int(ok), int(s.loose[0] and ok), sentences, words,
                                round(repetition(t), 4), t])
    store.write_csv("results.csv", COMPOSE_HEADER, results)
    store.write_csv("layers.csv", ["instruction_id", "fold", *LAYER_HEADER], layer_rows)
    store.write_bytes("vectors/length/vectors.safetensors", save(length_vecs.tensors(), metadata={"format": "pt"}))
    store.write_json("vectors/length/vectors.json", length_vecs.meta)

    def entry(sel: list[list]) -> dict:
        n = len(sel)
        return {"n": n, "format_strict": sum(r[6] for r in sel) / n, "format_loose": sum(r[7] for r in sel) / n,
                "length": sum(r[8] for r in sel) / n, "both": sum(r[9] for r in sel) / n,
                "mean_sentences": sum(r[10] for r in sel) / n, "mean_words": sum(r[11] for r in sel) / n}

    by_id = _group(rows)
    summary = {"settings": asdict(settings), "checkpoints": store.checkpoints, "versions": versions(),
               "candidates": candidates, "vectors_from": settings.vectors_from or settings.model,
               "length_layer": length_layer, "length_vector": "vectors/length",
               "format_layers": {f"{iid}/fold{f}": (chosen.layer if chosen is not None else None)
                                 for iid, f, _, _, chosen in folds},
               "folds": {iid: [[r.key for r in group if fold[r.key] == f] for f in range(settings.folds)]
                         for iid, group in by_id.items()},
               "max_sentences_of": {str(k): n for k, n in n_of.items()},
               "overall": {c: entry([r for r in results if r[4] == c]) for c in COMPOSE_CONDITIONS},
               "by_instruction": {iid: {c: entry([r for r in results if r[4] == c and r[1] == iid])
                                        for c in COMPOSE_CONDITIONS} for iid in by_id}}
    store.write_json("summary.json", summary)
    store.save_figure("compose", figures.composition(summary))
    store.finish()
    return summary
