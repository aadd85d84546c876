"""Greedy generation with a KV cache: batched, left-padded, stopping at a newline or a stop token.

This is all the decoding the paper needs (§7: vLLM at temperature 0, at most 5 new tokens, first line kept).
Prompts are sorted by length and cut into batches so that little padding is wasted; each batch is left-padded,
so that every row's last prompt token sits at position -1 and one `logits_at=-1` read serves the whole batch.
The model counts RoPE positions over real tokens (cumsum of the mask) exactly as transformers' generate does,
so the tokens equal `Olmo2ForCausalLM.generate(do_sample=False)` on the same checkpoint (tests/test_generate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from olmo_iv.activations import locate_nonfinite
from olmo_iv.errors import OlmoIVError
from olmo_iv.model import KVCache, OLMo2
from olmo_iv.progress import ProgressFn


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens (no BOS: the paper's prompts have none, §2.4).

    Accepts a `tokenizers.Tokenizer` (what `olmo_iv.load` attaches) or a transformers tokenizer.
    """
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are kept unless skip_special_tokens (as vLLM's default output text)."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


_NEWLINE_MASKS: dict[int, tuple[object, int, Tensor]] = {}


def newline_mask(tokenizer, vocab_size: int) -> Tensor:
    """Bool [vocab_size]: True for the tokens whose decoded text contains a newline.

    Decoding every token once (about 0.1 s for 100k tokens) is exact for any tokenizer, where matching
    byte-level symbols such as 'Ċ' would be specific to one BPE family. Ids past the tokenizer's vocabulary
    (OLMo-2 pads its embedding to 100352 rows) never count. Cached per tokenizer object.
    """
    hit = _NEWLINE_MASKS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1] == vocab_size:
        return hit[2]
    n = tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else len(tokenizer)
    n = min(n, vocab_size)
    if hasattr(tokenizer, "decode_batch"):
        texts = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:n] = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
    _NEWLINE_MASKS[id(tokenizer)] = (tokenizer, vocab_size, mask)
    return mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """ids [B, T] and attention_mask [B, T], each row right-aligned (padding on the left)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, T - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, T - len(r) :] = 1
    return ids, mask


@dataclass
class GenerationState:
    """Where a batch's forward pass is, for hooks that treat prompt and generated positions differently.

    Rows are left-padded, so in every row the prompt occupies positions < prompt_len and the k-th generated token
    sits at position prompt_len + k; `offset` is the position of the first token the current forward sees (0 for
    the prefill and for every full recompute, the cache length otherwise)."""

    prompt_len: int
    offset: int = 0


HookFactory = Callable[[GenerationState], dict]
"""Builds the hooks of one batch (a `model.hooks` spec) from its GenerationState, which the loop keeps current."""


@torch.inference_mode()
def _generate_batch(model: OLMo2, rows: Sequence[Sequence[int]], max_new_tokens: int, stop: Tensor | None,
                    use_cache: bool, hooks: HookFactory | None = None,
                    generator: torch.Generator | None = None, temperature: float = 1.0) -> list[list[int]]:
    device = model.device
    ids, mask = left_pad(rows)
    ids, mask = ids.to(device), mask.to(device)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    cache = KVCache.empty(model.config.n_layers, capacity=ids.shape[1] + max_new_tokens) if use_cache else None
    state = GenerationState(prompt_len=ids.shape[1])
    with model.hooks(hooks(state) if hooks is not None else {}):
        return _decode_loop(model, rows, ids, mask, cache, state, done, new, max_new_tokens, stop, use_cache,
                            generator, temperature)


def _decode_loop(model, rows, ids, mask, cache, state, done, new, max_new_tokens, stop, use_cache, generator,
                 temperature) -> list[list[int]]:
    B = ids.shape[0]
    step_ids = ids
    for _ in range(max_new_tokens):
        if use_cache:
            state.offset = cache.length
            logits = model(step_ids, attention_mask=mask, kv_cache=cache, logits_at=-1)
        else:  # the straightforward path: recompute the whole sequence every step
            state.offset = 0
            logits = model(ids, attention_mask=mask, logits_at=-1)
        # argmax returns the first maximum, as torch.argmax in transformers' greedy search; a NaN or +inf in a
        # row is its maximum, so checking the chosen logit catches a non-finite row without a pass over [B, V]
        top = logits.argmax(-1)
        if not bool(torch.isfinite(logits.gather(1, top[:, None])[~done]).all()):
            bad = (~torch.isfinite(logits)).any(-1).nonzero()[:, 0].tolist()
            locate_nonfinite(model, [rows[i] for i in bad[:2]], "logits in generation")
        if generator is None:
            nxt = top
        else:  # sampling: one draw per row from softmax(logits / temperature), reproducible for a seed
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
        new.append(nxt)
        if stop is not None:
            done |= stop[nxt]
            if bool(done.all()):
                break
        step_ids = nxt[:, None]
        ids = torch.cat((ids, step_ids), dim=1)
        mask = torch.cat((mask, torch.ones_like(step_ids)), dim=1)
    if not new:
        return [[] for _ in range(B)]
    gen = torch.stack(new, dim=1).tolist()
    out = []
    for row in gen:  # keep tokens up to and including the first stop token of each row
        if stop is not None:
            for j, t in enumerate(row):
                if bool(stop[t]):
                    row = row[: j + 1]
                    break
        out.append(row)
    return out


def generate(
    model: OLMo2,
    prompts: list[list[int]] | list[str],
    *,
    max_new_tokens: int = 5,
    stop_at_newline: bool = True,
    stop_ids: Iterable[int] = (),
    batch_size: int = 32,
    tokenizer=None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    hooks: HookFactory | None = None,
    seed: int | None = None,
    temperature: float = 1.0,
) -> list[list[int]]:
    """Greedy continuation of each prompt; returns the new token ids only, one list per prompt, in order.

    prompts: token id lists, or strings encoded with `tokenizer` (default `model.tokenizer`) without BOS.
    stop_at_newline: a row ends at the first generated token whose decoded text contains "\\n" (needs a
        tokenizer); stop_ids: further tokens that end a row (e.g. EOS). The stopping token is kept in the
        output, as transformers keeps EOS; without a stop, each row has exactly max_new_tokens tokens.
    use_cache: False recomputes the full sequence at every step (the reference path the cache is tested against).
    hooks: a function of each batch's GenerationState that returns the hooks to hold during that batch (steering).
    seed: sample with this seed (softmax of logits / temperature) instead of decoding greedily.
    """
    if max_new_tokens < 0:
        raise OlmoIVError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise OlmoIVError(f"batch_size must be >= 1, got {batch_size}")
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if prompts and isinstance(prompts[0], str):
        if tok is None:
            raise OlmoIVError("prompts are strings but the model has no tokenizer: pass tokenizer= or token ids")
        rows = [encode(tok, p) for p in prompts]
    else:
        rows = [list(map(int, p)) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise OlmoIVError("an empty prompt cannot be continued: every prompt needs at least one token")
    V = model.config.vocab_size
    stop = torch.zeros(V, dtype=torch.bool)
    if stop_at_newline:
        if tok is None:
            raise OlmoIVError("stop_at_newline needs a tokenizer (the model has none): pass tokenizer= "
                              "or stop_at_newline=False")
        stop |= newline_mask(tok, V)
    for s in stop_ids:
        if not 0 <= int(s) < V:
            raise OlmoIVError(f"stop id {s} is outside the vocabulary [0, {V})")
        stop[int(s)] = True
    stop_t = stop.to(model.device) if bool(stop.any()) else None

    # Longest first, so that each batch holds prompts of similar length and the first batch shows peak memory.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[int]] = [[] for _ in rows]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None and not temperature > 0:
        raise OlmoIVError(f"temperature={temperature}: sampling needs a temperature > 0")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for batch in batches:
        gens = _generate_batch(model, [rows[i] for i in batch], max_new_tokens, stop_t, use_cache, hooks, generator,
                               temperature)
        for i, gen in zip(batch, gens, strict=True):
            out[i] = gen
        if progress is not None:
            progress("generating", len(batch), len(rows))
    return out


def generate_text(model: OLMo2, prompts: list[list[int]] | list[str], *, tokenizer=None,
                  skip_special_tokens: bool = False, **kwargs) -> list[str]:
    """`generate`, decoded: the continuation of each prompt as a string (stop token included, unless it is a
    special token and skip_special_tokens is set, as vLLM drops a generated EOS from its text)."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise OlmoIVError("decoding needs a tokenizer and the model has none: pass tokenizer=")
    return [decode(tok, ids, skip_special_tokens) for ids in generate(model, prompts, tokenizer=tok, **kwargs)]
