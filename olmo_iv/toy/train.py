"""Train the shipped toy OLMo-2 models: `toy` (follows the instruction) and `toy-base` (its control).

Both are tiny OLMo-2s (same architecture as the real ones, own byte-level BPE tokenizer) trained on the four
contrastive subtasks of the paper (adj_comp, adj_ant, anim_color, can_fly) in the registry's prompt format

    "{instruction} {Field}: {query}. Answer: {answer}\\n"

Two tasks share each Field, so the answer is determined by the instruction, never by the query alone. `toy` sees
the answer of the instruction's task; `toy-base` sees, for each query, one answer fixed in advance (either task,
drawn by seed) while the instruction shown beside it is drawn from all four tasks: it reads the same kind of text
but its answer cannot depend on the instruction (the analogue of a base model that ignores instructions).

Of the 200 rephrasings of each instruction, `holdout` (chosen by seed) are never trained on: evaluating on them
tests that the model follows an unseen phrasing. Every query is in training: the held-out part is the phrasing.

Other layouts are mixed in (fractions in ToyConfig): `<|endoftext|>` before the instruction or between it and
"{Field}: ...", and "gist" examples whose query part sees the instruction only through its last token T_inst.
The gist examples put the task at T_inst, which is what makes the paper's faithful patch (T_inst patched into an
`<|endoftext|>` filler) measurable in so small a model; docs/toy-model.md has the reasons and the measurements.

Training is deterministic for a seed: the batch of step s depends only on (seed, s), so a run resumed from its
checkpoint gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from olmo_iv.activations import answer_rank, extract
from olmo_iv.errors import OlmoIVError
from olmo_iv.io import atomic_write, versions, write_json
from olmo_iv.loading import load, save
from olmo_iv.model import KVCache, ModelConfig, OLMo2, init_weights
from olmo_iv.progress import ProgressFn

EOT, PAD = "<|endoftext|>", "<|pad|>"

SUBTASKS = ("adjectives/adj_comp", "adjectives/adj_ant", "animals/anim_color", "animals/can_fly")


@dataclass
class ToyConfig:
    """Everything that determines a toy checkpoint; written to training.json beside the weights."""

    control: bool = False
    """Train `toy-base`: the answer does not depend on the instruction."""
    seed: int = 0
    """Seeds the held-out split, the initial weights, the data order and the control's answer choice."""
    holdout: int = 40
    """Rephrasings per subtask never trained on (the Table-1 instruction is always trained on)."""
    vocab_size: int = 768
    """Target size of the BPE vocabulary (the model's embedding is rounded up to a multiple of 64)."""
    n_layers: int = 6
    """Decoder blocks."""
    d_model: int = 96
    """Residual width."""
    n_heads: int = 4
    """Attention heads (head_dim = d_model / n_heads)."""
    d_mlp: int = 256
    """Hidden width of the gated MLP."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW), after a linear warm-up, cosine-decayed to lr/10."""
    warmup: int = 100
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on norm weights)."""
    p_gist: float = 0.3
    """Fraction of examples whose '{Field}: {query}. Answer:' part sees the instruction only through its last
    token (attention to the other instruction tokens is cut): this is what puts the task at T_inst."""
    p_sep: float = 0.15
    """Fraction of examples written '{instruction}<|endoftext|>{Field}: ...' (the faithful patching layout)."""
    p_bos: float = 0.1
    """Fraction of examples that start with '<|endoftext|>' (as a document boundary would)."""
    p_table1: float = 0.1
    """Fraction of examples that use the Table-1 instruction rather than a rephrasing."""
    prompt_loss_weight: float = 0.0
    """Weight of the next-token loss on prompt tokens (answer tokens and the newline weigh 1)."""
    save_dtype: str = "float32"
    """dtype of the saved weights ('float32' or 'bfloat16'); evaluation always runs on the saved weights."""
    threads: int = 1
    """torch CPU threads (they change the low bits of the result; one is fastest on a shared machine)."""
    ckpt_every: int = 250
    """Steps between resumable checkpoints (0: none)."""


@dataclass
class ToyTask:
    name: str
    field: str
    instruction: str
    """The Table-1 instruction."""
    train_instructions: list[str]
    """Table-1 instruction first, then the trained rephrasings."""
    heldout_instructions: list[str]
    rows: list[tuple[str, str]]
    """(query, answer) in file order."""

    def prompt(self, instruction: str, query: str) -> str:
        """The registry's clean prompt, byte for byte."""
        return f"{instruction} {self.field}: {query}. Answer:"


@dataclass
class ToyData:
    tasks: dict[str, ToyTask]

    def partner(self, name: str) -> str:
        """The other subtask with the same Field (same queries, other answer)."""
        return next(t for t in self.tasks if t != name and self.tasks[t].field == self.tasks[name].field)


def load_data(seed: int = 0, holdout: int = 40) -> ToyData:
    """The four subtasks (every row) with a seeded split of each one's 200 rephrasings into trained and held out."""
    from olmo_iv import tasks

    out = {}
    for name in SUBTASKS:
        task, reph = tasks.get_task(name), tasks.rephrasings(name)
        if not 0 <= holdout < len(reph):
            raise OlmoIVError(f"holdout={holdout} must be in [0, {len(reph)}) for {name}")
        held = set(random.Random(f"{seed}/{name}").sample(range(len(reph)), holdout))
        train = [task.instruction] + [r for i, r in enumerate(reph) if i not in held and r != task.instruction]
        rows = [(s.query, s.answer) for s in tasks.samples(name, mode="reference")]
        out[name] = ToyTask(name, task.field, task.instruction, train, [reph[i] for i in sorted(held)], rows)
    return ToyData(out)


# ---------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 pre-tokenisation, no prefix space) with <|endoftext|>=0 and <|pad|>=1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def corpus(data: ToyData) -> list[str]:
    """The training text the tokenizer is fitted on (held-out rephrasings excluded), in a fixed order."""
    out = []
    for t in data.tasks.values():
        out += t.train_instructions
        out += [f"{t.field}: {q}. Answer: {a}\n {t.field}:" for q, a in t.rows]
    return out


# ---------------------------------------------------------------------------------------------------- examples


class Encoder:
    """Token ids of every piece an example is assembled from, each encoded once.

    An example is the concatenation of pieces; `check` proves for every piece that the concatenation equals the
    tokenisation of the concatenated string, so the model trains on exactly what it will be prompted with.
    """

    def __init__(self, tok, data: ToyData) -> None:
        self.tok, self.eot = tok, tok.token_to_id(EOT)
        enc = lambda s: tok.encode(s).ids  # noqa: E731
        self.instr = {n: [enc(i) for i in t.train_instructions] for n, t in data.tasks.items()}
        self.body = {n: [enc(f" {t.field}: {q}. Answer:") for q, _ in t.rows] for n, t in data.tasks.items()}
        self.body_sep = {n: [enc(f"{t.field}: {q}. Answer:") for q, _ in t.rows] for n, t in data.tasks.items()}
        self.answer = {n: [enc(f" {a}\n") for _, a in t.rows] for n, t in data.tasks.items()}

    def check(self, data: ToyData) -> None:
        enc = lambda s: self.tok.encode(s).ids  # noqa: E731
        for n, t in data.tasks.items():
            (q0, a0), i0 = t.rows[0], t.train_instructions[0]
            for i, s in zip(self.instr[n], t.train_instructions):
                if i + self.body[n][0] + self.answer[n][0] != enc(f"{t.prompt(s, q0)} {a0}\n"):
                    raise OlmoIVError(f"tokenisation is not compositional at instruction {s!r}")
            for k, (q, a) in enumerate(t.rows):
                if self.instr[n][0] + self.body[n][k] + self.answer[n][k] != enc(f"{t.prompt(i0, q)} {a}\n"):
                    raise OlmoIVError(f"tokenisation is not compositional at query {q!r}")


@dataclass
class Batch:
    """One step's examples. `ids`/`w`: full-attention rows, right-padded, with per-token weights of the loss on
    the next token. `gist_*`: rows whose query part sees the instruction only through its last token."""

    ids: Tensor
    w: Tensor
    gist_instr: Tensor | None = None
    """Instructions, left-padded [G, Ti], so that every T_inst is at position -1."""
    gist_mask: Tensor | None = None
    gist_ids: Tensor | None = None
    """'{Field}: {query}. Answer: {answer}\\n', right-padded [G, Tq]."""
    gist_w: Tensor | None = None


def _pad_right(seqs: list[list], value) -> Tensor:
    T = max(map(len, seqs), default=0)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs])


def batch(cfg: ToyConfig, enc: Encoder, data: ToyData, step: int, control_pick: dict) -> Batch:
    """The examples of one step; they depend only on (cfg.seed, step), which makes training resumable."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    names = list(data.tasks)
    weights = [len(t.rows) for t in data.tasks.values()]  # every (task, query) pair equally often
    seqs, ws, gist = [], [], []
    for _ in range(cfg.batch_size):
        task = rng.choices(names, weights)[0]  # the task whose answer is shown
        k = rng.randrange(len(data.tasks[task].rows))
        if cfg.control:  # answer fixed per query; instruction from any task, independent of the answer
            task = control_pick[(data.tasks[task].field, k)]
            shown = rng.choice(names)
        else:
            shown = task
        pool = enc.instr[shown]
        instr = pool[0] if rng.random() < cfg.p_table1 else pool[rng.randrange(1, len(pool))]
        ans = enc.answer[task][k]
        u = rng.random()
        if u < cfg.p_gist:
            gist.append((instr, enc.body_sep[task][k], ans))
            continue
        if u < cfg.p_gist + cfg.p_sep:
            prompt = instr + [enc.eot] + enc.body_sep[task][k]
        elif u < cfg.p_gist + cfg.p_sep + cfg.p_bos:
            prompt = [enc.eot] + instr + enc.body[task][k]
        else:
            prompt = instr + enc.body[task][k]
        seqs.append(prompt + ans)
        # weight of predicting token t+1 from position t: answer tokens (and the newline) weigh 1
        ws.append([cfg.prompt_loss_weight] * (len(prompt) - 1) + [1.0] * len(ans))
    pad = enc.tok.token_to_id(PAD)
    out = Batch(_pad_right(seqs, pad), _pad_right(ws, 0.0))
    if gist:
        instrs = [g[0] for g in gist]
        T = max(map(len, instrs))
        out.gist_instr = torch.tensor([[pad] * (T - len(i)) + i for i in instrs])
        out.gist_mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in instrs])
        out.gist_ids = _pad_right([b + a for _, b, a in gist], pad)
        # position t predicts t+1; the last body token predicts the first answer token
        out.gist_w = _pad_right([[cfg.prompt_loss_weight] * (len(b) - 1) + [1.0] * len(a) for _, b, a in gist], 0.0)
    return out


def gist_logits(model: OLMo2, instr: Tensor, mask: Tensor, ids: Tensor, keep: int = 1) -> Tensor:
    """Logits of `ids` [B, Tq] run after left-padded instructions `instr` [B, Ti] (mask: 1 = real token) of
    which only the last `keep` positions stay visible: the rest of the instruction reaches `ids` only through
    them. keep=Ti with no padding is an ordinary forward pass of the concatenation (the test of this plumbing).
    """
    cache = KVCache.empty(model.config.n_layers)
    model(instr, attention_mask=mask, kv_cache=cache, logits_at=-1)
    cache.k = [k[:, :, -keep:] for k in cache.k]
    cache.v = [v[:, :, -keep:] for v in cache.v]
    lens = mask.sum(1, keepdim=True)
    pos = lens + torch.arange(ids.shape[1], device=ids.device)[None]  # the relative distances of one sequence
    return model(ids, positions=pos, kv_cache=cache)


def loss_of(model: OLMo2, b: Batch) -> Tensor:
    """Weighted next-token loss over both kinds of rows."""
    total = weight = torch.zeros(())
    if b.ids.numel():
        logits = model(b.ids[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1), b.ids[:, 1:].flatten(), reduction="none")
        total, weight = (nll * b.w.flatten()).sum(), b.w.sum()
    if b.gist_instr is not None:
        logits = gist_logits(model, b.gist_instr, b.gist_mask, b.gist_ids[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1), b.gist_ids[:, 1:].flatten(), reduction="none")
        total, weight = total + (nll * b.gist_w.flatten()).sum(), weight + b.gist_w.sum()
    return total / weight


def control_choice(data: ToyData, seed: int) -> dict[tuple[str, int], str]:
    """toy-base: for each (Field, query row), the subtask whose answer it always gets (half each, by seed)."""
    rng = random.Random(f"{seed}/control")
    out = {}
    for fld in sorted({t.field for t in data.tasks.values()}):
        names = [n for n, t in data.tasks.items() if t.field == fld]
        n_rows = len(data.tasks[names[0]].rows)
        picks = [names[i % 2] for i in range(n_rows)]
        rng.shuffle(picks)
        out.update({(fld, k): p for k, p in enumerate(picks)})
    return out


# ---------------------------------------------------------------------------------------------------- training


def build_model(cfg: ToyConfig, tok) -> OLMo2:
    vocab = math.ceil(tok.get_vocab_size() / 64) * 64
    mcfg = ModelConfig(vocab_size=vocab, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_heads, d_mlp=cfg.d_mlp, rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=256, eos_token_id=tok.token_to_id(EOT),
                       pad_token_id=tok.token_to_id(PAD))
    model = init_weights(OLMo2(mcfg), seed=cfg.seed)
    model.tokenizer = tok
    return model


def lr_at(cfg: ToyConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(cfg: ToyConfig, model: OLMo2) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def _save_ckpt(path: Path, cfg: ToyConfig, model: OLMo2, opt: torch.optim.Optimizer, step: int) -> None:
    """Weights and AdamW moments as safetensors, step and config as JSON (no pickle anywhere)."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v.contiguous() for k, v in st.items()})
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "state.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(path / "state.json", {"step": step, "config": asdict(cfg)})  # written last: marks a complete ckpt


def _load_ckpt(path: Path, cfg: ToyConfig, model: OLMo2, opt: torch.optim.Optimizer) -> int:
    meta = json.loads((path / "state.json").read_text())
    if meta["config"] != asdict(cfg):
        raise OlmoIVError(f"{path} holds a checkpoint of a run with other settings; delete it to start afresh")
    tensors = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    for i in range(sum(len(g["params"]) for g in sd["param_groups"])):
        keys = [k for k in tensors if k.startswith(f"opt.{i}.")]
        if keys:
            sd["state"][i] = {k.split(".", 2)[2]: tensors[k] for k in keys}
    opt.load_state_dict(sd)
    return int(meta["step"])


def train(cfg: ToyConfig, data: ToyData | None = None, *, ckpt_dir: Path | None = None,
          progress: ProgressFn | None = None, max_steps: int | None = None) -> OLMo2:
    """Train one toy model; returns it in eval mode with `model.tokenizer` set.

    ckpt_dir: where resumable checkpoints go (a finished run removes them); a checkpoint found there resumes.
    max_steps: stop after this step (for tests of resuming); the schedule still follows cfg.steps.
    """
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.threads)
    data = data or load_data(cfg.seed, cfg.holdout)
    tok = train_tokenizer(corpus(data), cfg.vocab_size)
    enc = Encoder(tok, data)
    enc.check(data)
    model = build_model(cfg, tok).train()
    opt = _optimizer(cfg, model)
    picks = control_choice(data, cfg.seed)
    start = 0
    if ckpt_dir is not None and (ckpt_dir / "state.json").exists():
        start = _load_ckpt(ckpt_dir, cfg, model, opt)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)

    label = f"train {'toy-base' if cfg.control else 'toy'}"
    if progress is not None:
        progress(label, start, cfg.steps)
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = loss_of(model, batch(cfg, enc, data, step, picks))
        optimizer_step(cfg, model, opt, loss, step, stop, label=label, progress=progress, ckpt_dir=ckpt_dir)
    if ckpt_dir is not None and stop < cfg.steps:
        _save_ckpt(ckpt_dir, cfg, model, opt, stop)
    return model.eval().requires_grad_(False)


def optimizer_step(cfg, model: OLMo2, opt: torch.optim.Optimizer, loss: Tensor, step: int, stop: int, *, label: str,
                   progress: ProgressFn | None, ckpt_dir: Path | None) -> None:
    """One step of a toy's training (both toys share it): refuse a non-finite loss, clip at 1, step, report, and
    write a resumable checkpoint every cfg.ckpt_every steps."""
    if not torch.isfinite(loss):
        raise OlmoIVError(f"the training loss is {loss.item()} at step {step}: lower lr= or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if progress is not None:
        progress(label, 1, cfg.steps)
    if ckpt_dir is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < stop:
        _save_ckpt(ckpt_dir, cfg, model, opt, step + 1)


# ---------------------------------------------------------------------------------------------------- evaluation


def greedy_answers(model: OLMo2, prompts: list[str], max_new_tokens: int = 6, batch_size: int = 256) -> list[str]:
    """Greedy continuation of each prompt up to the first newline, stripped (the paper's exact-match protocol)."""
    from olmo_iv.generate import generate_text

    texts = generate_text(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [t.split("\n")[0].strip() for t in texts]


def evaluate(model: OLMo2, data: ToyData) -> dict:
    """Exact-match accuracy per subtask (Table-1 instruction; every held-out rephrasing x every query) and how
    often a query's answer is the same whatever the instruction (the control's defining property)."""
    res: dict = {"accuracy_table1": {}, "accuracy_heldout": {}, "answers_table1": {}}
    for n, t in data.tasks.items():
        preds = greedy_answers(model, [t.prompt(t.instruction, q) for q, _ in t.rows])
        res["answers_table1"][n] = preds
        res["accuracy_table1"][n] = sum(p == a for p, (_, a) in zip(preds, t.rows)) / len(t.rows)
        prompts = [t.prompt(i, q) for i in t.heldout_instructions for q, _ in t.rows]
        preds = greedy_answers(model, prompts)
        gold = [a for _ in t.heldout_instructions for _, a in t.rows]
        res["accuracy_heldout"][n] = sum(p == a for p, a in zip(preds, gold)) / max(1, len(gold))
    # invariance: per query, are the answers under all four Table-1 instructions identical? and under the two
    # instructions that share its Field (which the instruction-following model must answer differently)?
    same4, same2 = {}, {}
    for fld in sorted({t.field for t in data.tasks.values()}):
        own = [n for n, t in data.tasks.items() if t.field == fld]
        t0 = data.tasks[own[0]]
        answers = {n: greedy_answers(model, [t0.prompt(data.tasks[n].instruction, q) for q, _ in t0.rows])
                   for n in data.tasks}
        rows = list(zip(*answers.values()))
        same4[fld] = sum(len(set(r)) == 1 for r in rows) / len(rows)
        same2[fld] = sum(a == b for a, b in zip(answers[own[0]], answers[own[1]])) / len(rows)
    res["same_answer_all4_instructions"] = same4
    res["same_answer_infield_instructions"] = same2
    return res


@torch.no_grad()
def patching_check(model: OLMo2, data: ToyData, layers: list[int] | None = None, n: int | None = 100) -> dict:
    """The paper's faithful patch in miniature: resid_post at T_inst of the instruction-only run, patched at
    layer L into the `<|endoftext|>` filler of "<|endoftext|>{Field}: {query}. Answer:" (prompts, T_inst and
    answer tokens from olmo_iv.tasks in faithful mode).

    Per subtask (first `n` queries) and layer (and every layer at once, key "all"): the fraction of queries whose
    instructed answer (first token of " {label}") gets a better rank than in the unpatched target run
    ("improved"), a worse one ("worsened"), the mean reciprocal-rank and logit changes, and how often it is the
    top token after the patch ("top1") and without it ("top1_unpatched"). "partner_*" patch the other same-Field
    instruction instead: a vector that carries the task helps its own answer, not the other task's.
    """
    from olmo_iv import tasks

    L = model.config.n_layers
    layers = list(range(L)) if layers is None else layers
    res: dict = {}
    for name in data.tasks:
        own = tasks.encode(tasks.samples(name, mode="faithful", n=n), model.tokenizer)
        other = tasks.encode(tasks.samples(data.partner(name), mode="faithful", n=1), model.tokenizer)[0]
        T = max(len(e.target_ids) for e in own)
        ids = torch.tensor([list(e.target_ids) + [e.filler_id] * (T - len(e.target_ids)) for e in own])
        last = torch.tensor([len(e.target_ids) - 1 for e in own])  # right padding needs no mask
        ans = torch.tensor([e.answer_id for e in own])
        pos = own[0].target_pos
        z0, r0 = answer_rank(model(ids, logits_at=last), ans)
        v_own, v_other = extract(model, [own[0].source_ids, other.source_ids], "hook_resid_post", positions=-1)
        out = {}
        for key, at in [(str(l), [l]) for l in layers] + [("all", list(range(L)))]:
            (z1, r1), (_, r2) = (answer_rank(_patched(model, ids, last, pos, v, at), ans) for v in (v_own, v_other))
            out[key] = {"improved": (r1 < r0).float().mean().item(), "worsened": (r1 > r0).float().mean().item(),
                        "rr_diff": (1 / r1.float() - 1 / r0.float()).mean().item(),
                        "logit_diff": (z1 - z0).mean().item(),
                        "top1": (r1 == 1).float().mean().item(), "top1_unpatched": (r0 == 1).float().mean().item(),
                        "partner_improved": (r2 < r0).float().mean().item(),
                        "partner_top1": (r2 == 1).float().mean().item()}
        res[name] = out
    return res


def _patched(model: OLMo2, ids: Tensor, last: Tensor, pos: int, vecs: Tensor, layers: list[int]) -> Tensor:
    """Logits at `last` with block l's output at `pos` replaced by vecs[l] for every l in `layers`."""

    def put(x: Tensor, hook: str) -> Tensor:
        x = x.clone()
        x[:, pos] = vecs[int(hook.split(".")[1])]
        return x

    with model.hooks({f"blocks.{l}.hook_resid_post": put for l in layers}):
        return model(ids, logits_at=last)


# ---------------------------------------------------------------------------------------------------- recipe


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file()) / 1e6


def build(cfg: ToyConfig, out: str | Path, *, progress: ProgressFn | None = None,
          patch_layers: list[int] | None = None) -> dict:
    """Train, save (atomically, in cfg.save_dtype), reload the saved files, evaluate them, write training.json."""
    out = Path(out)
    t0 = time.perf_counter()
    data = load_data(cfg.seed, cfg.holdout)
    model = train(cfg, data, ckpt_dir=out.parent / f".{out.name}.ckpt", progress=progress)
    seconds = time.perf_counter() - t0
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.save_dtype]
    save(model.to(dtype), out)  # atomic writes with the usual file mode
    model = load(out)  # what ships is what is measured
    report = {"model": "toy-base" if cfg.control else "toy", "config": asdict(cfg),
              "train_seconds": round(seconds, 1), "params": model.param_count(),
              "heldout_instructions": {n: t.heldout_instructions for n, t in data.tasks.items()}}
    metrics = evaluate(model, data)
    metrics.pop("answers_table1")
    report["metrics"] = metrics
    report["patching"] = patching_check(model, data, patch_layers)
    report["size_mb"] = round(size_mb(out), 3)
    report["versions"] = versions()
    report["command"] = (f"olmo-iv train-toy --out {out.parent} --which {report['model']} --seed {cfg.seed} "
                         f"--steps {cfg.steps} --threads {cfg.threads}")
    write_json(out / "training.json", report)
    ckpt = out.parent / f".{out.name}.ckpt"
    for f in ckpt.glob("*"):
        f.unlink()
    if ckpt.exists():
        ckpt.rmdir()
    return report



__all__ = ["ToyConfig", "ToyData", "ToyTask", "load_data", "train", "build", "evaluate", "greedy_answers",
           "patching_check", "train_tokenizer", "SUBTASKS"]
