"""Reading activations: the one extractor every analysis uses, and the one answer-rank function.

    acts = extract(model, seqs, "hook_resid_post", positions=-1)            # [N, n_layers, d]
    acts = extract(model, seqs, "hook_mlp_out", layers=[3, 5], positions=t_inst)   # per-row positions
    for x in iter_token_activations(model, seqs, "blocks.3.hook_resid_post", exclude=(bos,)):
        ...                                                                   # [n_tokens, d] per batch

Sequences are sorted by length (stably) and run in batches; a batch is right-padded to its longest row, which
needs no attention mask (causality keeps every real token blind to the padding after it, and RoPE positions count
from 0 either way), or, with `pad=False`, holds rows of one length only, so that a row's numbers do not depend
on what it is batched with. The forward stops after the last block it needs; the unembedding never runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.hooks import BLOCK_HOOKS
from olmo_iv.progress import ProgressFn

BatchSize = int | Callable[[int], int]
"""Rows per forward: a number, or a function of the batch's sequence length."""


def answer_rank(logits: Tensor, answers: Tensor, *, consume: bool = False) -> tuple[Tensor, Tensor]:
    """(answer logit, 1-based rank) per row of `logits` [N, V]: rank = 1 + the number of logits strictly above the
    answer's, counted without a sort.

    A row with a NaN or infinite logit has no rank: NaN compares false with everything, so counting would report
    it as rank 1. That is an error here, never a number. The count is taken in a float buffer (`gt_` writes 0/1,
    exact below 2**24 logits), not through a bool -> int64 mask (8 bytes per logit); consume=True lets the buffer be
    `logits` itself (a temporary).
    """
    if not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits)).any(1).nonzero()[:, 0].tolist()
        raise NonFiniteError(f"non-finite logits (NaN or inf) in rows {bad[:8]} of {logits.shape[0]}: no rank exists")
    answer_logit = logits.gather(1, answers[:, None]).float()
    buf = logits.float() if logits.dtype != torch.float32 else (logits if consume else logits.clone())
    return answer_logit[:, 0], 1 + buf.gt_(answer_logit).sum(1).long()


class NonFiniteError(OlmoIVError):
    """Activations or logits are NaN or infinite: the result would be meaningless."""


def locate_nonfinite(model, seqs: Sequence[Sequence[int]] | Tensor, what: str) -> NoReturn:
    """Raise a NonFiniteError that names the first hook point, in forward order, where the run of one of `seqs`
    turns NaN or infinite (the model's `check_finite`; for float16 it suggests bfloat16 or float32). Analyses call
    this when they find non-finite `what` (logits, activations): the checked forward costs one extra pass."""
    for seq in seqs:
        ids = torch.as_tensor(seq, dtype=torch.long).reshape(1, -1).to(model.device)
        try:
            with torch.no_grad(), model.check_finite():
                model(ids)
        except NonFiniteError:
            raise
        except OlmoIVError as err:
            if "non-finite" not in str(err):
                raise
            raise NonFiniteError(f"non-finite {what}: {err}") from None
    raise NonFiniteError(f"non-finite {what}, although a checked forward of each input is finite: the NaN or inf "
                         "comes from the intervention itself (a patched value or a hook's output)")


def _hook_names(model, hook: str, layers: Sequence[int] | None) -> tuple[list[int], list[str]]:
    """Layers and full hook names for a block hook given as 'hook_resid_post' (with `layers`) or 'blocks.3.…'."""
    L = model.config.n_layers
    if not isinstance(hook, str):
        raise OlmoIVError(f"hook= must be one hook name such as 'hook_resid_post', got {type(hook).__name__}")
    if hook.startswith("blocks."):
        _, layer, short = hook.split(".", 2)
        if layers is not None:
            raise OlmoIVError(f"hook={hook!r} names its layer already: drop layers=, or pass hook={short!r}")
        layers = [int(layer)]
        hook = short
    if hook not in BLOCK_HOOKS:
        raise OlmoIVError(f"hook={hook!r} is not a block hook point: use one of {', '.join(BLOCK_HOOKS)}")
    layers = list(range(L)) if layers is None else [int(layer) for layer in layers]
    if not layers or min(layers) < 0 or max(layers) >= L:
        raise OlmoIVError(f"layers={layers}: this model has layers 0..{L - 1}")
    return layers, [f"blocks.{layer}.{hook}" for layer in layers]


def _as_rows(seqs: Sequence[Sequence[int]] | Tensor) -> list[Tensor]:
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    if not rows:
        raise OlmoIVError("seqs= is empty: give at least one sequence of token ids")
    if any(r.numel() == 0 for r in rows):
        raise OlmoIVError("seqs= holds an empty sequence: every row needs at least one token")
    return rows


def _batches(lengths: list[int], batch_size: BatchSize, pad: bool) -> list[list[int]]:
    """Row indices per batch: rows sorted by length (stable), consecutive rows up to the batch size, and with
    pad=False only rows of equal length together."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    for i in order:
        size = batch_size(lengths[i]) if callable(batch_size) else batch_size
        if size < 1:
            raise OlmoIVError(f"batch_size={size}: give at least 1 row per batch")
        last = batches[-1] if batches else None
        if last is None or len(last) >= size or (not pad and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


@torch.no_grad()
def extract(
    model,
    seqs: Sequence[Sequence[int]] | Tensor,
    hook: str = "hook_resid_post",
    *,
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] = -1,
    batch_size: BatchSize = 64,
    pad: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """The activation at `hook` for each layer in `layers` (default: all) at one position of each sequence.

    positions: one index for every row (negative counts from the row's last real token, so -1 is the last token
        of each row whatever the padding), or one index per row.
    Returns [N, len(layers), d] in the model's dtype (or `dtype`) on the model's device (or `device`), rows in the
    order of `seqs`.
    """
    layers, names = _hook_names(model, hook, layers)
    rows = _as_rows(seqs)
    lengths = [len(r) for r in rows]
    per_row = [positions] * len(rows) if isinstance(positions, int) else [int(p) for p in positions]
    if len(per_row) != len(rows):
        raise OlmoIVError(f"positions= has {len(per_row)} entries for {len(rows)} sequences")
    resolved = []
    for p, n in zip(per_row, lengths):
        q = p if p >= 0 else n + p
        if not 0 <= q < n:
            raise OlmoIVError(f"position {p} is outside a sequence of {n} tokens")
        resolved.append(q)
    out: Tensor | None = None
    stop = max(layers) + 1
    batches = _batches(lengths, batch_size, pad)
    for batch in batches:
        ids = _padded([rows[i] for i in batch], model.device)
        idx = torch.arange(len(batch), device=model.device)
        pos = torch.tensor([resolved[i] for i in batch], device=model.device)
        grabbed: dict[str, Tensor] = {}
        def grab(x: Tensor, name: str, grabbed=grabbed, idx=idx, pos=pos) -> None:
            grabbed[name] = x[idx, pos]  # gathered in the hook: a layer's [B, T, d] is never kept

        with model.hooks({name: grab for name in names}):
            model(ids, stop_at_layer=stop)
        if out is None:
            d = grabbed[names[0]].shape[-1]
            out = torch.empty(len(rows), len(layers), d, dtype=dtype or model.dtype, device=device or model.device)
        out[torch.tensor(batch, device=out.device)] = torch.stack([grabbed[n] for n in names], 1).to(out)
        if progress is not None:
            progress("activations", len(batch), len(rows))
    assert out is not None
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out)).flatten(1).any(1).nonzero()[:, 0].tolist()
        locate_nonfinite(model, [rows[i] for i in bad[:4]], f"activations at {hook}")
    return out


@torch.no_grad()
def extract_span_mean(
    model,
    seqs: Sequence[Sequence[int]] | Tensor,
    hook: str,
    spans: Sequence[tuple[int, int]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Tensor:
    """The mean activation over tokens [start, end) of each sequence, for each layer: float32 [N, len(layers), d]
    on the CPU (e.g. the instruction's tokens, or the whole prompt)."""
    layers, names = _hook_names(model, hook, layers)
    rows = _as_rows(seqs)
    if len(spans) != len(rows):
        raise OlmoIVError(f"spans= has {len(spans)} entries for {len(rows)} sequences")
    for (a, b), r in zip(spans, rows):
        if not 0 <= a < b <= len(r):
            raise OlmoIVError(f"span ({a}, {b}) is empty or outside a sequence of {len(r)} tokens")
    out = torch.empty(len(rows), len(layers), model.config.d_model)
    for batch in _batches([len(r) for r in rows], batch_size, pad=True):
        ids = _padded([rows[i] for i in batch], model.device)
        t = torch.arange(ids.shape[1], device=model.device)[None, :]
        lo = torch.tensor([spans[i][0] for i in batch], device=model.device)[:, None]
        hi = torch.tensor([spans[i][1] for i in batch], device=model.device)[:, None]
        weight = ((t >= lo) & (t < hi)).float() / (hi - lo).float()  # [B, T]
        grabbed: dict[str, Tensor] = {}

        def grab(x: Tensor, name: str, grabbed=grabbed, weight=weight) -> None:
            grabbed[name] = torch.einsum("bt,btd->bd", weight, x.float())

        with model.hooks({name: grab for name in names}):
            model(ids, stop_at_layer=max(layers) + 1)
        out[torch.tensor(batch)] = torch.stack([grabbed[n] for n in names], 1).cpu()
    if not bool(torch.isfinite(out).all()):
        locate_nonfinite(model, rows[:4], f"activations at {hook}")
    return out


@torch.no_grad()
def iter_token_activations(
    model,
    seqs: Sequence[Sequence[int]] | Tensor,
    hook: str,
    *,
    batch_size: int = 32,
    exclude: Sequence[int] = (),
    progress: ProgressFn | None = None,
) -> Iterator[Tensor]:
    """The activation at one block hook (e.g. 'blocks.3.hook_resid_post') for every real token of every sequence,
    one batch of sequences at a time: yields [n_tokens, d], tokens in row order (rows in length order), skipping
    padding and tokens whose id is in `exclude` (e.g. BOS / <|endoftext|>, the attention sink)."""
    layers, names = _hook_names(model, hook, None)
    rows = _as_rows(seqs)
    lengths = [len(r) for r in rows]
    skip = torch.tensor(sorted(set(int(t) for t in exclude)), dtype=torch.long, device=model.device)
    for batch in _batches(lengths, batch_size, pad=True):
        ids = _padded([rows[i] for i in batch], model.device)
        n = torch.tensor([lengths[i] for i in batch], device=model.device)
        keep = torch.arange(ids.shape[1], device=model.device)[None, :] < n[:, None]
        if skip.numel():
            keep &= ~torch.isin(ids, skip)
        grabbed: list[Tensor] = []
        def grab(x: Tensor, name: str, grabbed=grabbed, keep=keep) -> None:
            grabbed.append(x[keep])

        with model.hooks({names[0]: grab}):
            model(ids, stop_at_layer=layers[0] + 1)
        if progress is not None:
            progress("activations", len(batch), len(rows))
        yield grabbed[0]


def _padded(rows: list[Tensor], device: torch.device) -> Tensor:
    """Rows right-padded with token 0 (any valid id: causality keeps real tokens from seeing it)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = r
    return ids.to(device)
