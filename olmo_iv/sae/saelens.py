"""`SAELensModel`: our OLMo-2 behind the small TransformerLens protocol SAELens uses, so that SAELens's own
trainer and evals run on it:

    from sae_lens import LanguageModelSAETrainingRunner
    runner = LanguageModelSAETrainingRunner(cfg, override_model=SAELensModel(olmo_iv.load("toy")))

SAELens calls `run_with_cache(tokens, names_filter=[hook], stop_at_layer=L + 1, prepend_bos=False)`,
`to_tokens(text, ...)`, `tokenizer` (a transformers tokenizer) and, in its evals, `run_with_hooks(tokens,
fwd_hooks=[(hook, fn)], return_type="both", loss_per_token=True)` with TransformerLens hooks `fn(act, hook)`.
Our hook names are TransformerLens's, so SAELens's `hook_name` strings mean the same activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from olmo_iv.errors import OlmoIVError


class _HookInfo:
    """What a TransformerLens hook function receives as `hook`: the point's name (and layer())."""

    def __init__(self, name: str) -> None:
        self.name = name

    def layer(self) -> int:
        return int(self.name.split(".")[1])


def hf_tokenizer(tokenizer: Any) -> Any:
    """A transformers tokenizer around our `tokenizers.Tokenizer`, with <|endoftext|> as BOS/EOS and <|pad|> (or
    <|endoftext|>) as padding, as OLMo-2's tokenizer_config declares."""
    if tokenizer is None:
        return None
    if not type(tokenizer).__module__.startswith("tokenizers"):
        return tokenizer  # already a transformers tokenizer
    from transformers import PreTrainedTokenizerFast

    specials: dict[str, str] = {}
    eot = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None
    if eot:
        specials.update(bos_token=eot, eos_token=eot, pad_token=eot)
    if tokenizer.token_to_id("<|pad|>") is not None:
        specials["pad_token"] = "<|pad|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


class SAELensModel(nn.Module):
    """A thin adapter over `olmo_iv.OLMo2` with the methods SAELens's ActivationsStore and evals call."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = hf_tokenizer(tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
        c = model.config
        # the TransformerLens config fields SAELens reads (device, widths, context)
        self.cfg = SimpleNamespace(device=model.device, d_model=c.d_model, n_layers=c.n_layers,
                                   n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, model_name=model.name_or_path,
                                   default_prepend_bos=False, tokenizer_prepends_bos=False)

    @property
    def W_E(self) -> Tensor:
        return self.model.embed.weight

    def hook_names(self) -> list[str]:
        return self.model.hook_names()

    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = False, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> Tensor:
        """Token ids [batch, pos] of a string or a list of strings (right-padded). OLMo-2 adds no BOS by default;
        prepend_bos=True puts <|endoftext|> first, as the checkpoints' own BOS convention does."""
        if self.tokenizer is None:
            raise OlmoIVError("the model has no tokenizer: to_tokens needs tokenizer.json")
        texts = [input] if isinstance(input, str) else list(input)
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos:
            rows = [[self.tokenizer.bos_token_id, *r] for r in rows]
        if truncate:
            rows = [r[: self.cfg.n_ctx] for r in rows]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if padding_side == "left":
                out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.model.device) if move_to_device else out

    def _names(self, names_filter: str | Sequence[str] | Callable[[str], bool] | None) -> list[str]:
        valid = self.model.hook_names()
        if names_filter is None:
            return valid
        if isinstance(names_filter, str):
            return [names_filter]
        if callable(names_filter):
            return [n for n in valid if names_filter(n)]
        return list(names_filter)

    def _tokens(self, tokens: Tensor | str | Sequence[str], prepend_bos: bool | None) -> Tensor:
        if isinstance(tokens, Tensor):
            return tokens.to(self.model.device)
        return self.to_tokens(tokens, prepend_bos=prepend_bos)

    def _output(self, tokens: Tensor, logits: Tensor | None, return_type: str | None, loss_per_token: bool) -> Any:
        if return_type is None or logits is None:
            return None if return_type is None else logits
        if return_type == "logits":
            return logits
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        loss = -lp.gather(-1, tokens[:, 1:, None])[..., 0]
        loss = loss if loss_per_token else loss.mean()
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise OlmoIVError(f"return_type={return_type!r} is not one of logits, loss, both, None")

    def forward(self, tokens: Tensor | str | Sequence[str], return_type: str | None = "logits",
                loss_per_token: bool = False, prepend_bos: bool | None = False, stop_at_layer: int | None = None,
                **_: Any) -> Any:
        ids = self._tokens(tokens, prepend_bos)
        out = self.model(ids, stop_at_layer=stop_at_layer)
        if stop_at_layer is not None:
            return out  # the residual entering block stop_at_layer, as TransformerLens returns
        return self._output(ids, out, return_type, loss_per_token)

    def run_with_cache(self, tokens: Tensor | str | Sequence[str], names_filter=None, stop_at_layer: int | None = None,
                       prepend_bos: bool | None = False, return_type: str | None = "logits",
                       loss_per_token: bool = False, **_: Any) -> tuple[Any, dict[str, Tensor]]:
        ids = self._tokens(tokens, prepend_bos)
        out, cache = self.model.run_with_cache(ids, self._names(names_filter), stop_at_layer=stop_at_layer)
        if stop_at_layer is not None:
            return out, dict(cache)
        return self._output(ids, out, return_type, loss_per_token), dict(cache)

    def run_with_hooks(self, tokens: Tensor | str | Sequence[str], return_type: str | None = "logits",
                       fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
                       loss_per_token: bool = False, prepend_bos: bool | None = False,
                       stop_at_layer: int | None = None, **_: Any) -> Any:
        """Run with TransformerLens-style hooks `fn(activation, hook) -> activation | None`."""
        ids = self._tokens(tokens, prepend_bos)
        spec: list[tuple[str, Callable]] = []
        for name, fn in fwd_hooks:
            for n in self._names(name):
                spec.append((n, lambda x, n, fn=fn: fn(x, hook=_HookInfo(n))))
        with self.model.hooks(spec):
            out = self.model(ids, stop_at_layer=stop_at_layer)
        if stop_at_layer is not None:
            return out
        return self._output(ids, out, return_type, loss_per_token)
