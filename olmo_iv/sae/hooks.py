"""Splicing an SAE into the model at its hook point, with or without the error term.

    with spliced(model, sae):                       # the model computes on x̂ instead of x at sae.cfg.hook_name
        logits = model(ids)
    with spliced(model, sae, use_error_term=True, edit=lambda z: z.index_fill(-1, idx, 0.0)):
        logits = model(ids)                         # x̂(edited codes) + (x − x̂): only the edit changes the output
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.sae.arch import SAE

CodeEdit = Callable[[Tensor], Tensor]


def sae_hook(sae: SAE, *, use_error_term: bool = False, edit: CodeEdit | None = None,
             mask: Tensor | None = None, store: dict[str, Tensor] | None = None) -> Callable[[Tensor, str], Tensor]:
    """A hook `fn(value, name)` that replaces the activation by the SAE's reconstruction.

    use_error_term: add back x − x̂ (computed from the unedited codes), so that without an `edit` the model's
        output is unchanged while the codes are still computed (and editable).
    edit: codes -> codes, applied before decoding (steering, ablating latents).
    mask: [B, T] bool; positions where it is False keep the original activation (e.g. BOS, padding).
    store: if given, store["codes"] receives the (unedited) codes [B, T, d_sae].
    """

    def fn(x: Tensor, name: str) -> Tensor:
        if x.shape[-1] != sae.cfg.d_in:
            raise OlmoIVError(f"the SAE reads d_in={sae.cfg.d_in} but the activation at {name!r} has width "
                              f"{x.shape[-1]}")
        codes = sae.encode(x)
        if store is not None:
            store["codes"] = codes.detach()
        recon = sae.decode(edit(codes) if edit is not None else codes)
        if use_error_term:
            clean = sae.decode(codes) if edit is not None else recon
            recon = recon + (x.to(recon.dtype) - clean)
        out = recon.to(x.dtype)
        if mask is not None:
            out = torch.where(mask.to(x.device)[..., None], out, x)
        return out

    return fn


@contextmanager
def spliced(model, sae: SAE, *, hook_name: str | None = None, use_error_term: bool = False,
            edit: CodeEdit | None = None, mask: Tensor | None = None,
            store: dict[str, Tensor] | None = None) -> Iterator[None]:
    """Within the block, `model` runs with the SAE spliced in at `hook_name` (default: the SAE's own)."""
    name = hook_name or sae.cfg.hook_name
    if not name:
        raise OlmoIVError("the SAE records no hook point: pass hook_name= (e.g. 'blocks.3.hook_resid_post')")
    with model.hooks({name: sae_hook(sae, use_error_term=use_error_term, edit=edit, mask=mask, store=store)}):
        yield
