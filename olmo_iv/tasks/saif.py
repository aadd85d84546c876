"""SAIF's data (He et al. 2025): positives (content + instruction) and negatives (the content alone), across
paraphrased and translated variants of each instruction, placed after (`post`, SAIF's default) or before (`pre`)
the content. Data only: the user messages go through the model's chat template downstream.

    samples = build_samples("saif", "translate_fr", n=200)                  # training split, post placement
    pos, neg = [s.positive for s in samples], [s.negative for s in samples]
    groups = [s.variant for s in samples]                                   # "en/3": SAIF's consistency unit

Two sources:

- "toy-steer": the steering toy's 8 IFEval instruction types, its phrasings (frames x cores in en/fr/de/es) and its
  contents, split as the shipped checkpoint was trained: split="train" draws trained contents with trained
  phrasings, split="test" held-out contents with held-out phrasings (as `olmo_iv.runs.steer.toy_steer_rows`).
  Variant "en/7" is `olmo_iv.toy.steer.phrasings(type, "en")[7]`.
- "saif": translate_fr, summarize and keywords ("Include the word {kw}") for real models, with our own phrasings
  (olmo_iv/data/saif/instructions.json: 10 English, 3 each in fr/de/es/zh) and, as contents, the
  instruction-stripped IFEval base queries (olmo_iv/data/llm_steer_instruct/ifeval_wo_instructions.jsonl) that
  carry no leftover constraint and fit the type's length bounds (CONTENT_WORDS). The split is fixed: one content
  in TEST_SHARE (by a hash of its text) and HELDOUT phrasings per language are test-only.

`seed` changes which contents, keywords and variant order a call draws, never the split. Samples of one call
that differ only in `placement` or `variants` share their contents and keywords, so comparisons are paired.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from olmo_iv.errors import OlmoIVError, check_range

SOURCES = ("toy-steer", "saif")
PLACEMENTS = ("post", "pre")
SPLITS = ("train", "test")
SAIF_TYPES = ("translate_fr", "summarize", "keywords")
SAIF_LANGUAGES = ("en", "fr", "de", "es", "zh")

HELDOUT = {"en": 2, "fr": 1, "de": 1, "es": 1, "zh": 1}
"""source "saif": phrasings per (type, language) kept for split="test" (chosen by SPLIT_SEED)."""
TEST_SHARE = 4
"""source "saif": one content in this many (by a hash of its text) is test-only, the same for every type."""
SPLIT_SEED = 0
"""Seeds the "saif" split; fixed, so that train and test stay disjoint whatever `seed` a call draws with."""
CONTENT_WORDS = {"translate_fr": (6, 80), "summarize": (12, 200), "keywords": (6, 80)}
"""Inclusive bounds on a content's word count (`\\w+`) per type: a summary needs something to shorten."""

# Leftover constraints the authors' stripping missed ("Your response should be in English.", "Use less than 100
# words.", markdown, JSON, ...): such a content would fight the instruction, so it is dropped. URLs and
# multi-line texts too (langdetect and word counts read them badly).
LEFTOVER = re.compile(
    r"\b(?:english|lower ?case|all caps|capital letters?|paragraphs?|bullet|markdown|json|exactly|words?|"
    r"sentences?|new lines?|highlight\w*|sections?|format|title|quotation|commas?|end (?:your|with|it)|repeat|"
    r"postscript|p\.s|placeholders?|square brackets|response|wrap)\b|\*|https?:|\n",
    re.IGNORECASE,
)

DATA = Path(str(resources.files("olmo_iv") / "data"))
INSTRUCTIONS_FILE = DATA / "saif" / "instructions.json"
CONTENTS_FILE = DATA / "llm_steer_instruct" / "ifeval_wo_instructions.jsonl"


@dataclass(frozen=True)
class SaifSample:
    """One SAIF pair: the positive user message (content with the instruction placed) and the negative one (the
    content alone)."""

    type: str
    """Instruction type: an IFEval id for source "toy-steer", else "translate_fr" | "summarize" | "keywords"."""
    content: str
    """The content alone (= the negative user message)."""
    instruction: str
    """This sample's instruction text (its variant's phrasing, keyword filled in)."""
    variant: str
    """"language/index" of the phrasing, e.g. "en/3": the unit of SAIF's consistency across variants."""
    placement: str
    """"post" (content, then instruction; SAIF's default) or "pre"."""
    kwargs: dict
    """What the judge needs: IFEval kwargs for toy types; {"language": "fr"}, {} or {"keyword": kw} for SAIF's."""
    sep: str = "\n\n"
    """Between content and instruction: a blank line for "saif" (as the spec), one space for "toy-steer" (as the
    toy was trained)."""

    @property
    def positive(self) -> str:
        """The user message with the instruction placed after ("post") or before ("pre") the content."""
        if self.placement == "post":
            return f"{self.content}{self.sep}{self.instruction}"
        return f"{self.instruction}{self.sep}{self.content}"

    @property
    def negative(self) -> str:
        """The content alone."""
        return self.content

    @property
    def language(self) -> str:
        """The instruction's language (the variant's first part)."""
        return self.variant.split("/")[0]


# ---------------------------------------------------------------------------------------------------- toy-steer


@functools.cache
def _toy():
    """(toy.steer module, the shipped toy-steer checkpoint's SteerConfig, its phrasing split)."""
    from olmo_iv.loading import BUILTIN
    from olmo_iv.toy import steer as T

    cfg = T.SteerConfig(**json.loads((BUILTIN["toy-steer"] / "training.json").read_text())["config"])
    return T, cfg, T.split_phrasings(cfg)


def _toy_phrasings(itype: str, split: str | None) -> dict[str, str]:
    T, _, sp = _toy()
    out = {}
    for lang in T.D.LANGUAGES:
        allowed = None if split is None else set((sp.train if split == "train" else sp.heldout)[(itype, lang)])
        for i, p in enumerate(T.phrasings(itype, lang)):
            if allowed is None or p in allowed:
                out[f"{lang}/{i}"] = p
    return out


# ---------------------------------------------------------------------------------------------------- saif


@functools.cache
def _saif_data() -> dict:
    """instructions.json, checked: every type, every language, enough phrasings, distinct, {kw} where needed."""
    data = json.loads(INSTRUCTIONS_FILE.read_text(encoding="utf-8"))
    for itype in SAIF_TYPES:
        langs = data["types"].get(itype, {})
        for lang in SAIF_LANGUAGES:
            ph = langs.get(lang, [])
            if len(ph) <= HELDOUT[lang] or len(set(ph)) != len(ph):
                raise OlmoIVError(f"{INSTRUCTIONS_FILE}: {itype}/{lang} needs more than {HELDOUT[lang]} distinct "
                                  "phrasings")
            if any(("{kw}" in p) != (itype == "keywords") for p in ph):
                raise OlmoIVError(f"{INSTRUCTIONS_FILE}: {itype}/{lang}: {{kw}} belongs in keywords phrasings only")
    return data


def _saif_phrasings(itype: str, split: str | None) -> dict[str, str]:
    out = {}
    for lang in SAIF_LANGUAGES:
        ph = _saif_data()["types"][itype][lang]
        held = set(random.Random(f"{SPLIT_SEED}/saif/{itype}/{lang}").sample(range(len(ph)), HELDOUT[lang]))
        for i, p in enumerate(ph):
            if split is None or (i in held) == (split == "test"):
                out[f"{lang}/{i}"] = p
    return out


def _is_test_content(text: str) -> bool:
    h = hashlib.sha256(f"{SPLIT_SEED}/saif-content/{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") % TEST_SHARE == 0


@functools.cache
def _base_queries() -> tuple[str, ...]:
    """The stripped IFEval base queries with no leftover constraint, in file order, without duplicates."""
    texts = []
    for number, line in enumerate(CONTENTS_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.append(json.loads(line)["model_output"].strip())
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise OlmoIVError(f"{CONTENTS_FILE} line {number}: expected a JSON object with model_output "
                                  f"({err})") from None
    return tuple(dict.fromkeys(t for t in texts if t and not LEFTOVER.search(t)))


@functools.cache
def saif_contents(itype: str, split: str) -> tuple[str, ...]:
    """The contents of one SAIF type in one split, in file order."""
    low, high = CONTENT_WORDS[itype]
    return tuple(t for t in _base_queries()
                 if low <= len(re.findall(r"\w+", t)) <= high and _is_test_content(t) == (split == "test"))


def _keyword(rng: random.Random, content: str) -> str:
    # a keyword the content lacks, so a negative never passes the keyword check by itself
    free = [k for k in _saif_data()["keywords"] if k.lower() not in content.lower()]
    return rng.choice(free)


# ---------------------------------------------------------------------------------------------------- API


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise OlmoIVError(f"source={source!r}: use one of {', '.join(SOURCES)}")


def saif_types(source: str) -> tuple[str, ...]:
    """The instruction types of a source: the toy's 8 IFEval ids, or SAIF_TYPES."""
    _check_source(source)
    return _toy()[0].D.TYPES if source == "toy-steer" else SAIF_TYPES


def _check_type(source: str, itype: str) -> None:
    types = saif_types(source)
    if itype not in types:
        raise OlmoIVError(f"itype={itype!r} is not a type of source {source!r}: use one of {', '.join(types)}")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise OlmoIVError(f"split={split!r}: use 'train' or 'test'")


def phrasings(source: str, itype: str, split: str | None = None) -> dict[str, str]:
    """Variant name -> phrasing ("{kw}" still to fill) of one type; split None: both splits."""
    _check_type(source, itype)
    _check_split(split)
    return _toy_phrasings(itype, split) if source == "toy-steer" else _saif_phrasings(itype, split)


def variant_names(source: str, itype: str, split: str | None = None) -> list[str]:
    """The variants ("language/index") of one type, language by language; split None: both splits."""
    return list(phrasings(source, itype, split))


@dataclass
class _Draw:
    """What one sample draws, independent of its variant and placement (so those comparisons are paired)."""

    content: str
    kw: str
    kwargs: dict = field(default_factory=dict)


def _draws(source: str, itype: str, n: int, split: str, seed: int) -> list[_Draw]:
    rng = random.Random(f"{seed}/saif-samples/{source}/{itype}/{split}")
    out = []
    if source == "toy-steer":
        T, cfg, _ = _toy()
        for _ in range(n):
            kw = rng.choice(T.D.KEYWORDS)
            while True:  # as the toy's own evaluation: no content whose target langdetect misreads
                c = T.sample_content(rng, cfg, heldout=split == "test")
                response, kwargs = T.transform(itype, c, kw)
                if T.valid_target(itype, response, kw):
                    break
            out.append(_Draw(c.text, kw, kwargs or {}))
        return out
    pool = list(saif_contents(itype, split))
    order: list[str] = []
    for _ in range(n):
        if not order:  # every content once, in a fresh order, before any repeats
            order = rng.sample(pool, len(pool))
        content = order.pop()
        kw = _keyword(rng, content) if itype == "keywords" else ""
        kwargs = {"language": "fr"} if itype == "translate_fr" else {"keyword": kw} if kw else {}
        out.append(_Draw(content, kw, kwargs))
    return out


def build_samples(source: str, itype: str, *, n: int, placement: str = "post", variants: Sequence[str] | None = None,
                  split: str = "train", seed: int = 0) -> list[SaifSample]:
    """n samples of one instruction type; sample i takes variant i mod len(variants) (all the split's variants, in
    `variant_names` order, when None), so every variant gets n/len(variants) samples, up to one.

    split="train": for scoring latents; split="test": held-out contents and phrasings, for steering evaluation.
    Source "saif" takes every content of the split once, in a seeded order, before any repeats (n beyond the pool,
    `saif_contents`, repeats contents with other variants); "toy-steer" draws contents as the toy does.
    """
    _check_type(source, itype)
    if isinstance(n, bool) or not isinstance(n, int):
        raise OlmoIVError(f"n={n!r}: give a whole number")
    check_range("n", n, 1)
    if placement not in PLACEMENTS:
        raise OlmoIVError(f"placement={placement!r}: use 'post' or 'pre'")
    if split not in SPLITS:
        raise OlmoIVError(f"split={split!r}: use 'train' or 'test'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OlmoIVError(f"seed={seed!r}: give a whole number")
    table = phrasings(source, itype, split)
    if variants is None:
        chosen = list(table)
    else:
        if isinstance(variants, str):
            raise OlmoIVError(f"variants={variants!r}: give a list of variant names, e.g. ['en/0']")
        chosen = list(variants)
        if not chosen:
            raise OlmoIVError("variants=[]: give at least one variant (None: all of the split's)")
        bad = [v for v in chosen if v not in table]
        if bad:
            raise OlmoIVError(f"variants={chosen}: {bad} are not {split} variants of {itype} "
                              f"(see variant_names({source!r}, {itype!r}, split={split!r}))")
        if len(set(chosen)) != len(chosen):
            raise OlmoIVError(f"variants={chosen}: a variant is listed twice")
    sep = " " if source == "toy-steer" else "\n\n"
    fill = (lambda p, kw: _toy()[0].fill(p, kw)) if source == "toy-steer" else (lambda p, kw: p.replace("{kw}", kw))
    return [SaifSample(itype, d.content, fill(table[chosen[i % len(chosen)]], d.kw), chosen[i % len(chosen)],
                       placement, d.kwargs, sep)
            for i, d in enumerate(_draws(source, itype, n, split, seed))]


__all__ = ["CONTENT_WORDS", "PLACEMENTS", "SAIF_LANGUAGES", "SAIF_TYPES", "SOURCES", "SPLITS", "SaifSample",
           "build_samples", "phrasings", "saif_contents", "saif_types", "variant_names"]
