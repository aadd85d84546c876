"""How good an SAE is: reconstruction (FVU), sparsity (mean L0), dead latents, and the model's loss with the
SAE spliced in (CE recovered against zero ablation, KL to the clean model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.progress import ProgressFn
from olmo_iv.sae.arch import SAE
from olmo_iv.sae.data import special_ids
from olmo_iv.sae.hooks import sae_hook


def fvu(x: Tensor, recon: Tensor) -> float:
    """Fraction of variance unexplained: ||x − x̂||² / ||x − mean(x)||² over the batch."""
    x, recon = x.double(), recon.double()
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: Tensor, *, batch_size: int = 4096) -> dict[str, float]:
    """FVU, mean L0 and dead fraction (latents that never fire) of `sae` on activations [N, d_in]."""
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise OlmoIVError(f"acts must be a non-empty [n_tokens, d_in] tensor, got {tuple(acts.shape)}")
    err = torch.zeros((), dtype=torch.float64)
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = acts.double().mean(0)
    var = (acts.double() - mean).pow(2).sum()
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i:i + batch_size]
        recon, codes = sae(x)
        err += (x.double() - recon.double()).pow(2).sum()
        active = codes != 0
        l0 += float(active.sum())
        fired |= active.any(0)
    return {"fvu": float(err / var.clamp_min(1e-30)), "l0": l0 / acts.shape[0],
            "dead_fraction": float((~fired).float().mean()), "tokens": int(acts.shape[0])}


def _ce(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Per-token next-token CE [B, T-1] (0 where the target is padding)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    return nll * mask[:, 1:]


@torch.no_grad()
def spliced_metrics(model: Any, sae: SAE, windows: Sequence[Sequence[int]], *, hook_name: str | None = None,
                    exclude: Sequence[int] | None = None, batch_size: int = 8, score_from: Sequence[int] | None = None,
                    progress: ProgressFn | None = None) -> dict[str, float]:
    """The model's next-token loss on `windows` clean, with the SAE's reconstruction spliced in at its hook,
    and with that activation zeroed. Returns ce_clean, ce_sae, ce_zero, ce_recovered = (ce_zero − ce_sae) /
    (ce_zero − ce_clean) (1 = as good as the model, 0 = as bad as deleting the activation), and kl_sae, the mean
    KL(clean || spliced) per predicted token. Excluded tokens (BOS, <|endoftext|>) keep their activation.

    score_from: per window, the first position whose next-token prediction is scored (default 0: all). E.g. the
    last prompt token, to score only the response of a model trained on responses alone; the SAE is still
    spliced in at every position."""
    name = hook_name or sae.cfg.hook_name
    if not name:
        raise OlmoIVError("the SAE records no hook point: pass hook_name=")
    excl = torch.tensor(sorted(special_ids(getattr(model, "tokenizer", None), model.config) if exclude is None
                               else exclude), dtype=torch.long)
    if score_from is not None and len(score_from) != len(windows):
        raise OlmoIVError(f"score_from has {len(score_from)} entries for {len(windows)} windows")
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    n_tok = 0
    total = (len(windows) + batch_size - 1) // batch_size
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width)
        for r, w in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(list(w))
            mask[r, :len(w)] = 1
        scored = mask.clone()  # scored[:, t + 1] = 1: the prediction made at position t counts
        if score_from is not None:
            starts = torch.tensor([int(x) for x in score_from[i:i + batch_size]])
            scored[:, 1:] *= torch.arange(width - 1)[None, :] >= starts[:, None]
        splice = mask.bool() & ~torch.isin(ids, excl) if excl.numel() else mask.bool()
        clean = model(ids)
        with model.hooks({name: sae_hook(sae, mask=splice)}):
            recon = model(ids)

        def zero(x: Tensor, _: str, splice: Tensor = splice) -> Tensor:
            return torch.where(splice[..., None], torch.zeros_like(x), x)

        with model.hooks({name: zero}):
            zeroed = model(ids)
        sums["clean"] += float(_ce(clean, ids, scored).sum())
        sums["sae"] += float(_ce(recon, ids, scored).sum())
        sums["zero"] += float(_ce(zeroed, ids, scored).sum())
        lp_c = F.log_softmax(clean[:, :-1].float(), -1)
        lp_s = F.log_softmax(recon[:, :-1].float(), -1)
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1) * scored[:, 1:]
        sums["kl"] += float(kl.sum())
        n_tok += int(scored[:, 1:].sum())
        if progress is not None:
            progress("evaluating", 1, total)
    if n_tok == 0:
        raise OlmoIVError("windows must hold at least one window of two or more tokens (with a scored prediction)")
    ce = {k: v / n_tok for k, v in sums.items()}
    gap = ce["zero"] - ce["clean"]
    recovered = (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-12 else float("nan")
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_recovered": recovered,
            "kl_sae": ce["kl"], "tokens": n_tok}
