"""The SAEs shipped with the toy models (`olmo_iv/saes/<model>/blocks.<l>.hook_resid_post/`): their training text
and the recipe that regenerates them.

Text sources (registered in `olmo_iv.sae.data` as "toy-steer" and "toy-tasks"):

- `steer_examples`: chat-rendered conversations exactly as `toy-steer` saw them in training, drawn with
  `olmo_iv.toy.steer.make_example` itself: `<|endoftext|><|user|>\\n{message}\\n<|assistant|>\\n{response}`, the
  message with no instruction (15%) or one of the 8 instruction types in one of 4 languages, before or after the
  content. Split "train": trained contents and phrasings; "heldout": held-out contents with held-out phrasings
  (the prompts SAIF and the evaluation use).
- `toy_task_examples`: the `toy` model's four subtasks in its training layouts,
  `{instruction} {Field}: {query}. Answer: {answer}\\n` (also with `<|endoftext|>` before it or between the
  instruction and the Field), the Table-1 instruction or a rephrasing. "train": trained rephrasings; "heldout":
  the held-out ones.

Each document is one sequence as the model was trained on (`token_windows(pack=False)`), starting at position 0:
packing several into a window would show the model contexts it never saw, and a window cut mid-conversation.

    from olmo_iv.toy.saes import train_builtin_saes
    train_builtin_saes("toy-steer", "olmo_iv/saes")      # writes olmo_iv/saes/toy-steer/blocks.L.hook_resid_post/

Like the toys' own recipes (olmo_iv.toy.train, olmo_iv.toy.steer), the recipe writes its output folders itself:
cfg.json + sae_weights.safetensors (SAELens v6, `SAE.save`) and training.json (settings, held-out metrics, the
model's fingerprint, the call that reproduces it). The SAEs are trained by `olmo_iv.sae.train.train_sae` on an
`olmo_iv.sae.data.ModelStream`; loading them is `olmo_iv.sae.builtin`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from olmo_iv.errors import OlmoIVError
from olmo_iv.loading import BUILTIN
from olmo_iv.progress import ProgressFn
from olmo_iv.sae.train import TrainConfig

SPLITS = ("train", "heldout")
DEFAULT_DOCS = {"train": 4000, "heldout": 400}
"""Documents a source yields when its argument names no count."""


def _parse(arg: str, source: str) -> tuple[str, int]:
    """'' | 'SPLIT' | 'SPLIT:N' -> (split, n)."""
    split, _, count = arg.partition(":")
    split = split or "train"
    if split not in SPLITS:
        raise OlmoIVError(f"source={source}:{arg!r}: the split must be one of {', '.join(SPLITS)}")
    try:
        n = int(count) if count else DEFAULT_DOCS[split]
    except ValueError:
        raise OlmoIVError(f"source={source}:{arg!r}: the count after the split must be an integer") from None
    if n < 1:
        raise OlmoIVError(f"source={source}:{arg!r}: the count must be >= 1")
    return split, n


def _shipped_config(model: str) -> dict:
    """The recipe settings of a shipped toy (its training.json), so the text follows the split it was trained on."""
    path = BUILTIN[model] / "training.json"
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise OlmoIVError(f"cannot read the recipe settings of {model!r} from {path}: {err}") from err


def steer_examples(split: str = "train", n: int = DEFAULT_DOCS["train"], seed: int = 0) -> Iterator[tuple[str, str]]:
    """`n` toy-steer (chat prompt, response) pairs drawn by `olmo_iv.toy.steer.make_example` with the shipped
    model's settings; a pure function of (split, n, seed). The prompt ends with the generation prompt
    (`<|assistant|>\\n`), whose last token is where SAIF reads SAE codes."""
    from olmo_iv.toy import steer

    if split not in SPLITS:
        raise OlmoIVError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    cfg = steer.SteerConfig(**_shipped_config("toy-steer"))
    phrasing_split = steer.split_phrasings(cfg)
    pool = phrasing_split.train if split == "train" else phrasing_split.heldout
    rng = random.Random(f"{seed}/sae-text/{split}")
    for _ in range(n):
        ex = steer.make_example(rng, cfg, pool, heldout_content=split == "heldout")
        yield ex.prompt, ex.response


def toy_task_examples(split: str = "train", n: int = DEFAULT_DOCS["train"], seed: int = 0) -> Iterator[tuple[str, str]]:
    """`n` (prompt, answer) pairs of the `toy` model's four subtasks in its training layouts (fractions as in its
    ToyConfig, the 'gist' share counted as the main layout, whose text it is); a pure function of (split, n, seed).
    The prompt ends with "Answer:", the answer is " {answer}\\n"."""
    from olmo_iv.toy.train import EOT, ToyConfig, load_data

    if split not in SPLITS:
        raise OlmoIVError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    cfg = ToyConfig(**_shipped_config("toy"))
    data = load_data(cfg.seed, cfg.holdout)
    names = list(data.tasks)
    weights = [len(t.rows) for t in data.tasks.values()]  # every (task, query) pair equally often, as in training
    rng = random.Random(f"{seed}/sae-text/{split}")
    for _ in range(n):
        task = data.tasks[rng.choices(names, weights)[0]]
        query, answer = rng.choice(task.rows)
        if split == "heldout":
            instr = rng.choice(task.heldout_instructions)
        else:
            pool = task.train_instructions
            instr = pool[0] if rng.random() < cfg.p_table1 else rng.choice(pool[1:])
        body = f"{task.field}: {query}. Answer:"
        u = rng.random()
        if u < cfg.p_sep:
            prompt = f"{instr}{EOT}{body}"
        elif u < cfg.p_sep + cfg.p_bos:
            prompt = f"{EOT}{instr} {body}"
        else:
            prompt = f"{instr} {body}"
        yield prompt, f" {answer}\n"


EXAMPLES = {"toy-steer": steer_examples, "toy-tasks": toy_task_examples}
"""Text source name -> its (prompt, completion) generator."""
ENDS_WITH_EOT = {"toy-steer": True, "toy-tasks": False}
"""Whether the model was trained to end the completion with <|endoftext|> (toy-steer: yes; toy: the newline)."""


def source_texts(source: str, arg: str) -> Iterator[str]:
    """The documents of text source `source` ('toy-steer' or 'toy-tasks') for its argument '[SPLIT[:N]]':
    prompt + completion (the separator <|endoftext|> that `token_windows` appends ends each as in training)."""
    split, n = _parse(arg, source)
    for prompt, completion in EXAMPLES[source](split, n):
        yield prompt + completion


# ---------------------------------------------------------------------------------------------------- recipe

MODEL_SOURCES = {"toy-steer": "toy-steer", "toy": "toy-tasks"}
"""Built-in model -> the text source of its SAEs (its own training distribution)."""


def _default_train() -> TrainConfig:
    # Chosen on toy-steer layer 3 and toy layers 0 and 5 (held-out FVU; docs/sae.md "Shipped SAEs"): k 8 / 16 / 32
    # gave FVU 0.085 / 0.064 / 0.049 at lr 4e-3; lr 6e-3 with a linear decay beat the default constant 9e-4; a
    # 20k-token dead threshold with AuxK weight 1/4 revives more latents on toy's narrow layer 0 (dead 41% -> 23%).
    return TrainConfig(architecture="topk", expansion=8.0, k=16, batch_size=1024, steps=1200, lr=6e-3,
                       lr_schedule="linear", lr_warmup_steps=50, dead_tokens=20_000, auxk_alpha=0.25, seed=0,
                       log_every=100)


@dataclass
class BuiltinSAESettings:
    """Everything that determines a shipped SAE besides its model and layer; written to its training.json."""

    source: str | None = None
    """Text source (olmo_iv.sae.data.read_texts); None: the model's own (MODEL_SOURCES)."""
    train_docs: int = 4000
    """Training documents (one conversation or task example each; about 180k tokens for toy-steer)."""
    eval_docs: int = 400
    """Held-out documents for the metrics (held-out contents and phrasings)."""
    text_seed: int = 0
    """Seed of the documents' draws."""
    context_size: int = 128
    """Longest window, in tokens (no toy document is longer: one window per document)."""
    model_batch: int = 64
    """Windows per forward pass while harvesting."""
    threads: int = 1
    """torch CPU threads while training (they change the low bits of the result)."""
    train: TrainConfig = field(default_factory=_default_train)
    """The SAE and optimiser settings."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source(model: str, settings: BuiltinSAESettings) -> str:
    source = settings.source or MODEL_SOURCES.get(model)
    if source not in EXAMPLES:
        raise OlmoIVError(f"source={source!r}: built-in SAEs train on one of {', '.join(EXAMPLES)} (model={model!r})")
    return source


def example_windows(tokenizer: Any, examples: Sequence[tuple[str, str]], context_size: int,
                    separator: int | None) -> tuple[list[list[int]], list[int]]:
    """One window per (prompt, completion) (tokens of both, then `separator` if any), and the index of each
    prompt's last token in its window. Raises if a prompt does not tokenize to a prefix of its window."""
    from olmo_iv.sae.data import token_windows

    windows = token_windows([p + c for p, c in examples], tokenizer, context_size, separator=separator, pack=False)
    if len(windows) != len(examples):
        raise OlmoIVError("a document tokenized to fewer than 2 tokens")
    last = []
    for (prompt, _), w in zip(examples, windows):
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        if w[:len(ids)] != ids or len(ids) > context_size:
            raise OlmoIVError(f"the prompt does not tokenize to a prefix of its document: {prompt!r}")
        last.append(len(ids) - 1)
    return windows, last


@torch.no_grad()
def evaluate_sae(model: Any, sae: Any, windows: list[list[int]], last: list[int], *, exclude: Sequence[int],
                 batch_size: int = 64) -> dict[str, Any]:
    """Held-out metrics of one SAE: FVU, L0, dead fraction over every non-special token; FVU and L0 at the last
    prompt tokens alone (where SAIF reads codes); CE / KL with the SAE spliced in at every non-special position,
    scored on the completion's predictions (from the last prompt token on: what the toys are trained to predict)."""
    from olmo_iv.activations import extract
    from olmo_iv.sae.data import hook_layer, window_activations
    from olmo_iv.sae.metrics import reconstruction_metrics, spliced_metrics

    hook = sae.cfg.hook_name
    acts = window_activations(model, windows, hook, exclude=exclude, batch_size=batch_size)
    tokens = reconstruction_metrics(sae, acts)
    layer = hook_layer(hook)
    at_last = extract(model, windows, hook.split(".", 2)[2], layers=[layer], positions=last,
                      batch_size=batch_size)[:, 0].float()
    last_m = reconstruction_metrics(sae, at_last)
    # the last prompt tokens vary little among themselves (at layer 0 hardly at all), so their own FVU can exceed 1
    # while the error is small: also give it relative to the variance over all tokens
    err = (at_last.double() - sae(at_last).recon.double()).pow(2).sum(-1).mean()
    token_var = (acts.double() - acts.double().mean(0)).pow(2).sum(-1).mean()
    spliced = spliced_metrics(model, sae, windows, exclude=exclude, batch_size=batch_size, score_from=last)
    spliced["delta_ce"] = spliced["ce_sae"] - spliced["ce_clean"]
    return {"fvu": tokens["fvu"], "l0": tokens["l0"], "dead_fraction": tokens["dead_fraction"],
            "tokens": tokens["tokens"],
            "last_prompt_token": {"fvu": last_m["fvu"], "error_vs_token_variance": float(err / token_var),
                                  "l0": last_m["l0"], "prompts": last_m["tokens"]},
            "spliced": spliced}


def train_builtin_saes(model: str, out: str | Path, layers: Sequence[int] | None = None, *,
                       settings: BuiltinSAESettings | None = None,
                       progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Train the SAEs of built-in model `model` ('toy-steer' or 'toy') at blocks.L.hook_resid_post for each layer
    (default: all) and write each to out/<model>/blocks.L.hook_resid_post/ (cfg.json, sae_weights.safetensors,
    training.json). Deterministic on CPU for the settings and thread count. Returns the training.json records."""
    import olmo_iv
    from olmo_iv.io import versions, write_json
    from olmo_iv.sae.data import MemoryCache, ModelStream, model_fingerprint, special_ids
    from olmo_iv.sae.train import train_sae

    settings = settings or BuiltinSAESettings()
    settings.train.validate()
    if model not in MODEL_SOURCES:
        raise OlmoIVError(f"model={model!r} has no built-in SAE recipe (one of {', '.join(MODEL_SOURCES)})")
    for name in ("train_docs", "eval_docs", "context_size", "model_batch", "threads"):
        if getattr(settings, name) < 1:
            raise OlmoIVError(f"{name}={getattr(settings, name)} must be >= 1")
    m = olmo_iv.load(model).eval()
    n_layers = m.config.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise OlmoIVError(f"layers={layers} must be a non-empty list of layers in 0..{n_layers - 1}")
    source = _source(model, settings)
    sep = m.config.eos_token_id if ENDS_WITH_EOT[source] else None
    draw = EXAMPLES[source]
    train_w, _ = example_windows(m.tokenizer, list(draw("train", settings.train_docs, settings.text_seed)),
                                 settings.context_size, sep)
    eval_w, eval_last = example_windows(m.tokenizer, list(draw("heldout", settings.eval_docs, settings.text_seed)),
                                        settings.context_size, sep)
    exclude = special_ids(m.tokenizer, m.config)
    fingerprint = model_fingerprint(m)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    records = []
    try:
        for layer in layers:
            hook = f"blocks.{layer}.hook_resid_post"
            t0 = time.perf_counter()
            # one buffer holding every training token: each epoch is a full reshuffle
            stream = ModelStream(m, train_w, hook, windows_per_buffer=len(train_w), exclude=exclude,
                                 seed=settings.train.seed, model_batch=settings.model_batch, cache=MemoryCache())
            meta = {"model_fingerprint": fingerprint, "dataset_path": source,
                    "exclude_special_token_ids": list(exclude)}
            result = train_sae(stream, settings.train, progress=progress, hook_name=hook, model_name=model,
                               context_size=settings.context_size, metadata=meta)
            seconds = time.perf_counter() - t0
            metrics = evaluate_sae(m, result.sae, eval_w, eval_last, exclude=exclude,
                                   batch_size=settings.model_batch)
            folder = Path(out) / model / hook
            result.sae.save(folder)
            record = {
                "model": model, "hook_name": hook, "layer": layer, "model_fingerprint": fingerprint,
                "settings": settings.to_dict(), "seed": settings.train.seed,
                "d_in": result.sae.cfg.d_in, "d_sae": result.sae.cfg.d_sae, "k": result.sae.cfg.k,
                "tokens_seen": int(result.final["tokens"]), "train_tokens_per_epoch": int(sum(
                    sum(t not in exclude for t in w) for w in train_w)),
                "train_windows": len(train_w), "heldout_windows": len(eval_w),
                "heldout": metrics, "final_train_report": result.final, "history": result.history,
                "train_seconds": round(seconds, 1),
                "call": f"olmo_iv.toy.saes.train_builtin_saes({model!r}, {str(out)!r}, layers=[{layer}])",
                "command": f"olmo-iv train-toy-saes --model {model} --layers {layer} --out {out}",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), "threads": settings.threads,
            }
            write_json(folder / "training.json", record)
            records.append(record)
    finally:
        torch.set_num_threads(threads)
    return records
