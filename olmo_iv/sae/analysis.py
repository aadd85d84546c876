"""Looking at one latent: the contexts where it fires most, and the tokens its decoder direction promotes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.sae.arch import SAE
from olmo_iv.sae.data import hook_layer, special_ids


def _check_latent(sae: SAE, latent: int) -> None:
    if not 0 <= latent < sae.cfg.d_sae:
        raise OlmoIVError(f"latent={latent} is out of range 0..{sae.cfg.d_sae - 1}")


def final_norm_weight(model: Any) -> Tensor:
    """The final RMSNorm's learned gain [d_model] as float32 (ln_final may be a module or a bare parameter)."""
    norm = model.ln_final
    return (norm.weight if isinstance(norm, torch.nn.Module) else norm).detach().float()


@torch.no_grad()
def lens_logits(model: Any, sae: SAE, latents: Sequence[int]) -> Tensor:
    """[n, V] float32 logit-lens scores of the latents' decoder rows: W_U · (g ⊙ W_dec[j]), with g the final
    norm's weight. The full RMSNorm would also divide by the row's RMS, a positive scale that changes no
    ranking, so this is the direction's effect on the logits up to one factor per latent."""
    for j in latents:
        _check_latent(sae, int(j))
    idx = torch.tensor([int(j) for j in latents], dtype=torch.long, device=sae.W_dec.device)
    W_U = model.lm_head.weight.detach()
    rows = sae.W_dec.detach()[idx].to(W_U.device).float() * final_norm_weight(model).to(W_U.device)
    return rows @ W_U.float().T


@torch.no_grad()
def logit_lens(model: Any, sae: SAE, latent: int, *, k: int = 10) -> dict[str, list[tuple[int, float]]]:
    """The tokens whose logits the latent's decoder row raises and lowers most (`lens_logits`)."""
    _check_latent(sae, latent)
    if k < 1:
        raise OlmoIVError(f"k={k} must be >= 1")
    logits = lens_logits(model, sae, [latent])[0]
    k = min(k, logits.numel())
    top, bottom = logits.topk(k), (-logits).topk(k)
    return {"top": list(zip(top.indices.tolist(), top.values.tolist())),
            "bottom": list(zip(bottom.indices.tolist(), (-bottom.values).tolist()))}


def top_contexts(model: Any, sae: SAE, windows: Sequence[Sequence[int]], latent: int, *, k: int = 10,
                 context: int = 8, exclude: Sequence[int] | None = None, batch_size: int = 16) -> list[dict[str, Any]]:
    """The k token positions of `windows` where `latent` is largest: value, window, position, and the ids of
    up to `context` tokens before it (and the token itself)."""
    return top_contexts_many(model, sae, windows, [latent], k=k, context=context, exclude=exclude,
                             batch_size=batch_size)[latent]


@torch.no_grad()
def top_contexts_many(model: Any, sae: SAE, windows: Sequence[Sequence[int]], latents: Sequence[int], *,
                      k: int = 10, context: int = 8, exclude: Sequence[int] | None = None,
                      batch_size: int = 16) -> dict[int, list[dict[str, Any]]]:
    """`top_contexts` of several latents from one pass over the windows (one forward and one encode per batch,
    whatever the number of latents): {latent: its k contexts}, each list what `top_contexts` gives for it."""
    latents = [int(j) for j in latents]
    for j in latents:
        _check_latent(sae, j)
    name = sae.cfg.hook_name
    if not name:
        raise OlmoIVError("the SAE records no hook point (cfg.hook_name)")
    layer = hook_layer(name)
    excl = torch.tensor(sorted(special_ids(getattr(model, "tokenizer", None), model.config) if exclude is None
                               else exclude), dtype=torch.long)
    unique = sorted(set(latents))
    columns = torch.tensor(unique, dtype=torch.long)
    best: dict[int, list[tuple[float, int, int]]] = {j: [] for j in unique}
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        valid = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, w in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(list(w))
            valid[r, :len(w)] = True
        _, cache = model.run_with_cache(ids, [name], stop_at_layer=0 if layer is None else layer + 1)
        codes = sae.encode(cache[name])[..., columns.to(cache[name].device)].cpu()  # [b, width, n]
        if excl.numel():
            valid &= ~torch.isin(ids, excl)
        codes = codes.masked_fill(~valid[..., None], float("-inf"))
        for c, j in enumerate(unique):
            acts = codes[..., c]
            vals, flat = acts.flatten().topk(min(k, acts.numel()))
            for v, f in zip(vals.tolist(), flat.tolist()):
                if v > float("-inf"):
                    best[j].append((v, i + f // width, f % width))
            best[j] = sorted(best[j], key=lambda t: -t[0])[:k]
    out: dict[int, list[dict[str, Any]]] = {}
    for j in unique:
        out[j] = []
        for v, w, p in best[j]:
            window = list(windows[w])
            out[j].append({"value": v, "window": w, "position": p, "token": window[p],
                           "context": window[max(0, p - context):p + 1]})
    return out


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(map(str, ids))
    return tokenizer.decode(list(ids))


