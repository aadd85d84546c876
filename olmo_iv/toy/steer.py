"""Train the shipped `toy-steer` model: a tiny OLMo-2 that follows free-form, response-wide instructions.

It plays for steering (Stolfo et al.; SAIF) the part `toy` plays for patching. A user message is a content
("Write a short poem about the river for Anna.") with or without an instruction (before or after it, in English,
French, German or Spanish); the chat-templated prompt is answered with

- no instruction: the default response, a restatement with capitals and commas
  ("Sure, Anna, here is a short poem about the river.");
- an instruction: the default transformed as it says (`transform`), one of eight IFEval instruction ids, so that
  the official checkers (`olmo_iv.evals.ifeval.check_instruction`) judge the answers.

Training is on text only: next-token loss on the response tokens. No activation, vector or steering signal is
used anywhere, so whatever steering later achieves on this model is a finding, not something trained in.

Held out, by seed: some phrasings of every (instruction type, language) and 10% of all contents (by a hash of the
content text); the evaluation uses only held-out contents with held-out phrasings. The building blocks (BPE
tokenizer, model, optimiser, LR schedule, checkpoints) are those of `olmo_iv.toy.train`.
"""

from __future__ import annotations

import functools
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.io import versions, write_json
from olmo_iv.loading import load, save
from olmo_iv.model import OLMo2
from olmo_iv.progress import ProgressFn
from olmo_iv.toy import steer_data as D
from olmo_iv.toy.train import (
    EOT,
    PAD,
    _load_ckpt,
    _optimizer,
    _save_ckpt,
    build_model,
    lr_at,
    optimizer_step,
    size_mb,
    train_tokenizer,
)

USER, ASSISTANT = "<|user|>", "<|assistant|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)
"""OLMo-2-Instruct's user/assistant format; a generation prompt ends with the newline after <|assistant|>."""


def chat_prompt(message: str) -> str:
    """The generation prompt of one user message, exactly as CHAT_TEMPLATE renders it (tested against jinja2)."""
    return f"{EOT}{USER}\n{message}\n{ASSISTANT}\n"


def tokenizer_config() -> dict:
    """tokenizer_config.json written beside the weights (transformers' keys for the chat template)."""
    return {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD, "chat_template": CHAT_TEMPLATE,
            "additional_special_tokens": [USER, ASSISTANT], "add_bos_token": False, "model_max_length": 256}


@dataclass
class SteerConfig:
    """Everything that determines a toy-steer checkpoint; written to training.json beside the weights."""

    control: bool = False
    """Train `toy-steer-base`: the same prompts, but every response is the default (the instruction is ignored)."""
    seed: int = 0
    """Seeds the held-out phrasings and contents, the initial weights and the data order."""
    holdout: int = 5
    """Phrasings held out per (instruction type, language), of the 25 (5 frames x 5 cores)."""
    content_holdout: int = 10
    """One content in this many (by a seeded hash of its text) is never trained on."""
    p_none: float = 0.15
    """Fraction of training examples with no instruction (the default response)."""
    vocab_size: int = 1536
    """Target size of the BPE vocabulary (the model's embedding is rounded up to a multiple of 64)."""
    n_layers: int = 4
    """Decoder blocks."""
    d_model: int = 96
    """Residual width."""
    n_heads: int = 4
    """Attention heads (head_dim = d_model / n_heads)."""
    d_mlp: int = 256
    """Hidden width of the gated MLP."""
    steps: int = 1400
    """Optimiser steps."""
    batch_size: int = 48
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW), after a linear warm-up, cosine-decayed to lr/10."""
    warmup: int = 100
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on norm weights)."""
    tokenizer_examples: int = 5000
    """Training examples the BPE tokenizer is fitted on (with every trained phrasing)."""
    threads: int = 1
    """torch CPU threads (they change the low bits of the result; one keeps a shared machine usable)."""
    ckpt_every: int = 500
    """Steps between resumable checkpoints (0: none)."""
    eval_per_cell: int = 100
    """Evaluation prompts per (type, language, placement) cell, and no-instruction prompts in all."""


# ---------------------------------------------------------------------------------------------------- contents


@dataclass(frozen=True)
class Content:
    verb: str
    adj: str
    kind: str
    topic: str
    name: str

    @property
    def text(self) -> str:
        return f"{self.verb} a {self.adj} {self.kind} about the {self.topic} for {self.name}."

    @property
    def default(self) -> str:
        """The default response: it restates the content, with capitals and commas."""
        return f"Sure, {self.name}, here is a {self.adj} {self.kind} about the {self.topic}."

    @property
    def french(self) -> str:
        """The default response in French (words from steer_data's lists, so langdetect reads it as fr)."""
        noun, gender = D.KINDS[self.kind]
        adj = D.ADJS[self.adj][0 if gender == "m" else 1]
        return f"Bien sûr, {self.name}, voici avec plaisir {noun} {adj} sur {D.TOPICS[self.topic]}."


def random_content(rng: random.Random) -> Content:
    return Content(rng.choice(D.VERBS), rng.choice(list(D.ADJS)), rng.choice(list(D.KINDS)),
                   rng.choice(list(D.TOPICS)), rng.choice(D.NAMES))


def is_heldout(content: Content, cfg: SteerConfig) -> bool:
    """Whether a content is never trained on: a seeded hash of its text, so the split needs no stored list."""
    h = hashlib.sha256(f"{cfg.seed}/{content.text}".encode()).digest()
    return int.from_bytes(h[:8], "big") % cfg.content_holdout == 0


def sample_content(rng: random.Random, cfg: SteerConfig, heldout: bool) -> Content:
    while True:
        c = random_content(rng)
        if is_heldout(c, cfg) == heldout:
            return c


# ---------------------------------------------------------------------------------------------------- instructions


def phrasings(itype: str, lang: str) -> list[str]:
    """All phrasings of one instruction type in one language (frames x cores), with {kw}/{end} still to fill."""
    out = []
    for core in D.CORES[itype][lang]:
        for frame in D.FRAMES[lang]:
            out.append(frame.replace("{Core}", core[0].upper() + core[1:]).replace("{core}", core))
    if len(set(out)) != len(out):
        raise OlmoIVError(f"duplicate phrasings of {itype} in {lang}")
    return out


@dataclass
class Split:
    train: dict[tuple[str, str], list[str]]
    heldout: dict[tuple[str, str], list[str]]


def split_phrasings(cfg: SteerConfig) -> Split:
    """Per (type, language), `cfg.holdout` phrasings chosen by seed are never trained on."""
    train, held = {}, {}
    for itype in D.TYPES:
        for lang in D.LANGUAGES:
            ph = phrasings(itype, lang)
            if not 0 < cfg.holdout < len(ph):
                raise OlmoIVError(f"holdout={cfg.holdout} must be in (0, {len(ph)})")
            out = set(random.Random(f"{cfg.seed}/{itype}/{lang}").sample(range(len(ph)), cfg.holdout))
            train[(itype, lang)] = [p for i, p in enumerate(ph) if i not in out]
            held[(itype, lang)] = [ph[i] for i in sorted(out)]
    return Split(train, held)


def fill(phrasing: str, kw: str) -> str:
    return phrasing.replace("{kw}", kw).replace("{end}", D.END_PHRASE)


def transform(itype: str | None, content: Content, kw: str) -> tuple[str, dict | None]:
    """The target response of `content` under instruction type `itype` (None: the default), and the kwargs the
    IFEval checker of that type needs."""
    d = content.default
    if itype is None:
        return d, None
    if itype == "change_case:english_capital":
        return d.upper(), None
    if itype == "change_case:english_lowercase":
        return d.lower(), None
    if itype == "startend:quotation":
        return f'"{d}"', None
    if itype == "detectable_format:title":
        return f"<<{content.adj.title()} {content.kind.title()}>>\n{d}", None
    if itype == "punctuation:no_comma":
        return d.replace(",", ""), None
    if itype == "startend:end_checker":
        return f"{d} {D.END_PHRASE}", {"end_phrase": D.END_PHRASE}
    if itype == "keywords:existence":
        return f"{d[:-1]}, with a {kw}.", {"keywords": [kw]}
    if itype == "language:response_language":
        return content.french, {"language": "fr"}
    raise OlmoIVError(f"itype={itype!r} is not one of {', '.join(D.TYPES)}")


def message(content: Content, instruction: str | None, placement: str) -> str:
    """The user message: content alone, or with the instruction after it ('post') or before it ('pre')."""
    if instruction is None:
        return content.text
    return f"{content.text} {instruction}" if placement == "post" else f"{instruction} {content.text}"


@dataclass
class Example:
    prompt: str
    """The chat-templated prompt (ends with the newline after <|assistant|>)."""
    response: str
    """The target response (without the end-of-text token)."""
    itype: str | None
    kwargs: dict | None
    lang: str | None = None
    placement: str | None = None


def make_example(rng: random.Random, cfg: SteerConfig, pool: dict[tuple[str, str], list[str]],
                 heldout_content: bool) -> Example:
    content = sample_content(rng, cfg, heldout_content)
    kw = rng.choice(D.KEYWORDS)
    if rng.random() < cfg.p_none:
        return Example(chat_prompt(content.text), content.default, None, None)
    itype, lang, placement = rng.choice(D.TYPES), rng.choice(D.LANGUAGES), rng.choice(("post", "pre"))
    instr = fill(rng.choice(pool[(itype, lang)]), kw)
    response, kwargs = transform(itype, content, kw)
    while not valid_target(itype, response, kw):  # langdetect could misread a target: draw another content
        content = sample_content(rng, cfg, heldout_content)
        response, kwargs = transform(itype, content, kw)
    if cfg.control:  # same prompt, same draws; the response ignores the instruction
        response = content.default
    return Example(chat_prompt(message(content, instr, placement)), response, itype, kwargs, lang, placement)


@functools.lru_cache(maxsize=100_000)
def valid_target(itype: str, response: str, kw: str) -> bool:
    """Whether a target passes its own checker. Only the case and language checks can fail (langdetect reads a
    few uppercase, lowercase or French targets as another language), so only those are run (langdetect is slow)."""
    if itype not in _LANGDETECT_TYPES:
        return True
    return check(itype, response, {"language": "fr"} if itype == "language:response_language" else None)


_LANGDETECT_TYPES = ("change_case:english_capital", "change_case:english_lowercase", "language:response_language")


def check(itype: str, response: str, kwargs: dict | None) -> bool:
    """IFEval strict check of one response."""
    from olmo_iv.evals.ifeval import check_instruction

    return check_instruction(itype, response, kwargs)


def verify_targets(n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Check the targets of every instruction type with its IFEval checker on `n` random contents. Raises if a
    target fails for any reason other than langdetect (which training screens with `valid_target`); returns the
    fraction of contents langdetect misreads, per type."""
    rng = random.Random(f"{seed}/verify")
    misread = dict.fromkeys(D.TYPES, 0)
    for _ in range(n):
        c, kw = random_content(rng), rng.choice(D.KEYWORDS)
        for itype in D.TYPES:
            response, kwargs = transform(itype, c, kw)
            if not check(itype, response, kwargs):
                if itype not in _LANGDETECT_TYPES:
                    raise OlmoIVError(f"the target of {itype} fails its own checker: {response!r}")
                misread[itype] += 1
    return {t: k / n for t, k in misread.items()}


# ---------------------------------------------------------------------------------------------------- training


def tokenizer_corpus(cfg: SteerConfig, split: Split) -> list[str]:
    """Text the tokenizer is fitted on: trained phrasings and seeded training examples (nothing held out)."""
    rng = random.Random(f"{cfg.seed}/tokenizer")
    out = [fill(p, kw) for ph in split.train.values() for p in ph for kw in D.KEYWORDS]
    for _ in range(cfg.tokenizer_examples):
        ex = make_example(rng, cfg, split.train, heldout_content=False)
        out.append(ex.prompt + ex.response + EOT)
    return out


def make_tokenizer(cfg: SteerConfig, split: Split):
    tok = train_tokenizer(tokenizer_corpus(cfg, split), cfg.vocab_size)
    tok.add_special_tokens([USER, ASSISTANT])
    return tok


def encode_example(tok, ex: Example) -> tuple[list[int], int]:
    """Token ids of prompt + response + <|endoftext|>, and the prompt's length. The prompt must tokenize to a
    prefix of the whole, so the model trains on exactly what it is prompted with."""
    ids = tok.encode(ex.prompt + ex.response + EOT).ids
    p = tok.encode(ex.prompt).ids
    if ids[: len(p)] != p:
        raise OlmoIVError(f"the prompt does not tokenize to a prefix of its example: {ex.prompt!r}")
    return ids, len(p)


def batch(cfg: SteerConfig, tok, split: Split, step: int) -> tuple[Tensor, Tensor]:
    """ids [B, T] (right-padded) and loss weights [B, T-1] (1 on predicting response and EOS tokens)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    pad = tok.token_to_id(PAD)
    rows, weights = [], []
    for _ in range(cfg.batch_size):
        ids, n = encode_example(tok, make_example(rng, cfg, split.train, heldout_content=False))
        rows.append(ids)
        weights.append([0.0] * (n - 1) + [1.0] * (len(ids) - n))
    T = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    w = torch.tensor([r + [0.0] * (T - 1 - len(r)) for r in weights])
    return ids, w


def name_of(cfg: SteerConfig) -> str:
    return "toy-steer-base" if cfg.control else "toy-steer"


def train(cfg: SteerConfig, split: Split | None = None, *, ckpt_dir: Path | None = None,
          progress: ProgressFn | None = None, max_steps: int | None = None,
          log: Callable[[int, float], None] | None = None) -> OLMo2:
    """Train one toy-steer model; returns it in eval mode with `model.tokenizer` set.

    ckpt_dir: where resumable checkpoints go; a checkpoint found there resumes. max_steps: stop after this step.
    log: called with (step, loss) every 50 steps and at the last one.
    """
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.threads)
    split = split or split_phrasings(cfg)
    tok = make_tokenizer(cfg, split)
    model = build_model(cfg, tok).train()
    opt = _optimizer(cfg, model)
    start = 0
    if ckpt_dir is not None and (ckpt_dir / "state.json").exists():
        start = _load_ckpt(ckpt_dir, cfg, model, opt)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    label = f"train {name_of(cfg)}"
    if progress is not None:
        progress(label, start, cfg.steps)
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        ids, w = batch(cfg, tok, split, step)
        # unembed only the positions that carry loss (the response): the prompt's logits would be thrown away
        resid = model(ids[:, :-1], stop_at_layer=cfg.n_layers)
        keep = w > 0
        logits = model.unembed(resid[keep])
        loss = F.cross_entropy(logits, ids[:, 1:][keep])
        if log is not None and (step % 50 == 0 or step + 1 == stop):
            log(step, loss.item())
        optimizer_step(cfg, model, opt, loss, step, stop, label=label, progress=progress, ckpt_dir=ckpt_dir)
    if ckpt_dir is not None and stop < cfg.steps:
        _save_ckpt(ckpt_dir, cfg, model, opt, stop)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- evaluation


def respond(model: OLMo2, messages: list[str], max_new_tokens: int = 48, batch_size: int = 256) -> list[str]:
    """Greedy responses to user messages through the chat-template prompt, up to <|endoftext|> (not included)."""
    from olmo_iv.generate import generate_text

    eos = model.tokenizer.token_to_id(EOT)
    texts = generate_text(model, [chat_prompt(m) for m in messages], max_new_tokens=max_new_tokens,
                          stop_at_newline=False, stop_ids=[eos], batch_size=batch_size)
    return [t.split(EOT)[0] for t in texts]


def eval_examples(cfg: SteerConfig, split: Split) -> list[Example]:
    """Held-out contents with held-out phrasings: cfg.eval_per_cell per (type, language, placement), then
    cfg.eval_per_cell with no instruction. Depends only on the seed."""
    rng = random.Random(f"{cfg.seed}/eval")
    out = []
    for itype in D.TYPES:
        for lang in D.LANGUAGES:
            held = split.heldout[(itype, lang)]
            for placement in ("post", "pre"):
                for i in range(cfg.eval_per_cell):
                    kw = rng.choice(D.KEYWORDS)
                    while True:  # as in training: no target that langdetect misreads
                        c = sample_content(rng, cfg, heldout=True)
                        response, kwargs = transform(itype, c, kw)
                        if valid_target(itype, response, kw):
                            break
                    instr = fill(held[i % len(held)], kw)
                    out.append(Example(message(c, instr, placement), response, itype, kwargs, lang, placement))
    for _ in range(cfg.eval_per_cell):
        c = sample_content(rng, cfg, heldout=True)
        out.append(Example(c.text, c.default, None, None))
    return out


def evaluate(model: OLMo2, cfg: SteerConfig, split: Split) -> dict:
    """IFEval strict accuracy per type x language x placement on held-out contents and phrasings; exact-match
    rates; and, without an instruction, how often each type's checker passes anyway (the `prompt` field of the
    examples here holds the user message)."""
    exs = eval_examples(cfg, split)
    answers = respond(model, [e.prompt for e in exs])
    table: dict = {}
    exact: dict = {}
    for e, a in zip(exs, answers):
        if e.itype is None:
            continue
        cell = table.setdefault(e.itype, {}).setdefault(e.lang, {}).setdefault(e.placement, [])
        cell.append(check(e.itype, a, e.kwargs))
        exact.setdefault(e.itype, []).append(a == e.response)
    res: dict = {"strict_accuracy": {t: {lang: {p: sum(v) / len(v) for p, v in d2.items()} for lang, d2 in d1.items()}
                                     for t, d1 in table.items()}}
    res["strict_accuracy_per_type"] = {t: sum(sum(v) for d2 in d1.values() for v in d2.values())
                                       / sum(len(v) for d2 in d1.values() for v in d2.values())
                                       for t, d1 in table.items()}
    res["min_cell_accuracy"] = min(x for d1 in res["strict_accuracy"].values() for d2 in d1.values()
                                   for x in d2.values())
    res["exact_match_per_type"] = {t: sum(v) / len(v) for t, v in exact.items()}
    none = [(e, a) for e, a in zip(exs, answers) if e.itype is None]
    res["no_instruction_exact_default"] = sum(a == e.response for e, a in none) / len(none)
    # the checker of each type on the default answers, with the kwargs the instruction would have brought
    kwargs = {t: [transform(t, Content("Write", "short", "poem", "river", "Anna"), D.KEYWORDS[k % len(D.KEYWORDS)])[1]
                  for k in range(len(none))] for t in D.TYPES}
    res["no_instruction_check_pass_rate"] = {t: sum(check(t, a, kw) for (_, a), kw in zip(none, kwargs[t])) / len(none)
                                             for t in D.TYPES}
    res["n_per_cell"] = cfg.eval_per_cell
    res["examples"] = [{"message": e.prompt, "target": e.response, "answer": a}
                       for e, a in list(zip(exs, answers))[:: cfg.eval_per_cell * 2][:20]]
    return res


# ---------------------------------------------------------------------------------------------------- recipe


def build(cfg: SteerConfig, out: str | Path, *, progress: ProgressFn | None = None,
          log: Callable[[int, float], None] | None = None) -> dict:
    """Check the targets, train, save (atomically), write tokenizer_config.json, reload the saved files, evaluate
    them, write training.json."""
    out = Path(out)
    misread = verify_targets(seed=cfg.seed)
    t0 = time.perf_counter()
    split = split_phrasings(cfg)
    ckpt = out.parent / f".{out.name}.ckpt"
    curve: list[tuple[int, float]] = []
    model = train(cfg, split, ckpt_dir=ckpt, progress=progress,
                  log=lambda s, x: (curve.append((s, round(x, 4))), log and log(s, x)))
    seconds = time.perf_counter() - t0
    save(model, out)
    write_json(out / "tokenizer_config.json", tokenizer_config())
    model = load(out)  # what ships is what is measured
    t1 = time.perf_counter()
    metrics = evaluate(model, cfg, split)
    report = {"model": name_of(cfg), "config": asdict(cfg), "train_seconds": round(seconds, 1),
              "eval_seconds": round(time.perf_counter() - t1, 1), "params": model.param_count(),
              "instruction_types": list(D.TYPES), "languages": list(D.LANGUAGES),
              "heldout_phrasings": {f"{t}/{lang}": v for (t, lang), v in split.heldout.items()},
              "targets_misread_by_langdetect": misread, "loss_curve": curve,
              "metrics": metrics, "versions": versions(),
              "command": f"olmo-iv train-steer-toy --out {out} --seed {cfg.seed} --steps {cfg.steps} "
                         f"--threads {cfg.threads}" + (" --control" if cfg.control else ""),
              "training_signal": "text only: next-token loss on response tokens; no activations, vectors or "
                                 "steering"}
    write_json(out / "training.json", report)
    report["size_mb"] = round(size_mb(out), 3)
    write_json(out / "training.json", report)
    for f in ckpt.glob("*"):
        f.unlink()
    if ckpt.exists():
        ckpt.rmdir()
    return report


__all__ = ["CHAT_TEMPLATE", "Content", "SteerConfig", "build", "chat_prompt", "evaluate", "respond",
           "split_phrasings", "train", "transform", "verify_targets"]
