"""Typed hook points with TransformerLens names, scoped hook ownership and an activation cache.

A hook is `fn(value, name) -> Tensor | None`: it may read the value, or return a tensor of the same shape to
replace it. Hook points are plain names looked up in one dict, so an unhooked forward pays one dict lookup per
point and nothing else (no identity modules, no per-layer Python callbacks).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError

HookFn = Callable[[Tensor, str], "Tensor | None"]
HookSpec = Mapping[str, "HookFn | Sequence[HookFn]"] | Iterable[tuple[str, HookFn]]

GLOBAL_HOOKS = ("hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "hook_logits")
# In forward order. hook_attn_out / hook_mlp_out are what is added to the residual (after OLMo-2's post-norm), so
# resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out hold exactly; attn.hook_out and
# mlp.hook_out are the raw sub-layer outputs before that norm, and ln_*.hook_scale the norm's sqrt(mean(x^2)+eps).
BLOCK_HOOKS = (
    "hook_resid_pre",
    "attn.hook_q",  # [B, T, H, dh], after QK-norm, before RoPE
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",  # after RoPE
    "attn.hook_rot_k",
    "attn.hook_pattern",  # [B, H, Tq, Tk]; asking for it switches that layer to eager attention
    "attn.hook_z",  # [B, T, H, dh], pattern @ v
    "attn.hook_out",  # [B, T, d], o_proj output
    "ln_attn.hook_scale",  # [B, T, 1]
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",  # [B, T, F], gate pre-activation
    "mlp.hook_pre_linear",  # up projection
    "mlp.hook_post",  # act(gate) * up
    "mlp.hook_out",  # down projection output
    "ln_mlp.hook_scale",
    "hook_mlp_out",
    "hook_resid_post",
)


FINITE_CHECKED = ("attn.hook_out", "hook_attn_out", "mlp.hook_out", "hook_mlp_out", "hook_resid_post")
"""Per-block points that `check_finite` watches, in forward order."""


def block_hook_names(layer: int) -> dict[str, str]:
    """Short name -> full name for one block, e.g. 'hook_resid_post' -> 'blocks.3.hook_resid_post'."""
    return {short: f"blocks.{layer}.{short}" for short in BLOCK_HOOKS}


def all_hook_names(n_layers: int) -> list[str]:
    names = ["hook_embed"]
    for layer in range(n_layers):
        names += block_hook_names(layer).values()
    return names + list(GLOBAL_HOOKS[1:])


def run_hooks(hooks: dict[str, list[HookFn]], name: str, x: Tensor) -> Tensor:
    """Apply the hooks registered at `name` to `x` (the caller has already checked that `hooks` is non-empty)."""
    for fn in hooks.get(name, ()):
        out = fn(x, name)
        if out is not None:
            if out.shape != x.shape:
                raise OlmoIVError(
                    f"hook at {name!r} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}: a hook "
                    "may only replace a value with a tensor of the same shape"
                )
            x = out.to(x.dtype)
    return x


def normalise_spec(spec: HookSpec) -> list[tuple[str, HookFn]]:
    items = spec.items() if isinstance(spec, Mapping) else spec
    pairs: list[tuple[str, HookFn]] = []
    for name, fns in items:
        for fn in fns if isinstance(fns, (list, tuple)) else (fns,):
            if not callable(fn):
                raise OlmoIVError(f"the hook for {name!r} is not callable: got {type(fn).__name__}")
            pairs.append((name, fn))
    return pairs


def check_names(names: Iterable[str], valid: Sequence[str]) -> None:
    valid_set = set(valid)
    for name in names:
        if name not in valid_set:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            examples = ", ".join(BLOCK_HOOKS)
            raise OlmoIVError(
                f"unknown hook name {name!r}.{hint} Valid names are {', '.join(GLOBAL_HOOKS[:1])}, "
                f"blocks.{{0..{_n_layers(valid) - 1}}}.{{{examples}}}, {', '.join(GLOBAL_HOOKS[1:])} "
                "(model.hook_names() lists them all)."
            )


def _n_layers(valid: Sequence[str]) -> int:
    return sum(1 for v in valid if v.endswith(".hook_resid_pre"))


class ActivationCache(dict):
    """A dict of hook name -> tensor that also accepts TransformerLens-style keys: cache['resid_post', 3]."""

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        if isinstance(key, tuple):
            short, layer = key
            short = short if short.startswith(("hook_", "attn.", "mlp.", "ln_")) else f"hook_{short}"
            key = f"blocks.{layer}.{short}"
        return super().__getitem__(key)


class HookedMixin:
    """Hook registry shared by the model and its blocks: `hooks()` context manager and `run_with_cache()`."""

    _hooks: dict[str, list[HookFn]]

    def hook_names(self) -> list[str]:
        return all_hook_names(self.config.n_layers)  # type: ignore[attr-defined]

    @contextmanager
    def hooks(self, spec: HookSpec) -> Iterator[None]:
        """Register hooks for the duration of a `with` block; they are removed even if the block raises.

        Hooks added here are removed by identity, so nested contexts and hooks added by others survive.
        """
        pairs = normalise_spec(spec)
        check_names((n for n, _ in pairs), self.hook_names())
        added: list[tuple[str, HookFn]] = []
        try:
            for name, fn in pairs:
                self._hooks.setdefault(name, []).append(fn)
                added.append((name, fn))
            yield
        finally:
            for name, fn in reversed(added):
                fns = self._hooks[name]
                for i in range(len(fns) - 1, -1, -1):
                    if fns[i] is fn:
                        del fns[i]
                        break
                if not fns:
                    del self._hooks[name]

    def run_with_cache(
        self,
        ids: Tensor,
        names: str | Iterable[str] | Callable[[str], bool] | None = None,
        *,
        device: torch.device | str | None = None,
        **forward_kwargs,
    ) -> tuple[Tensor, ActivationCache]:
        """Run a forward pass and return (output, cache of the activations at `names`).

        `names` is a hook name, a list of them, a predicate over names, or None for every hook point (memory-hungry on
        big models: ask for what you need). Cached tensors are detached copies, optionally moved to `device`.
        """
        valid = self.hook_names()
        if isinstance(names, str):  # one name, not its characters
            names = [names]
        if names is None:
            wanted = valid
        elif callable(names):
            wanted = [n for n in valid if names(n)]
        else:
            wanted = list(names)
            check_names(wanted, valid)
        cache = ActivationCache()

        def save(x: Tensor, name: str) -> None:
            cache[name] = x.detach().to(device) if device is not None else x.detach().clone()

        with self.hooks([(n, save) for n in wanted]):
            out = self(ids, **forward_kwargs)  # type: ignore[operator]
        return out, cache

    @contextmanager
    def check_finite(self) -> Iterator[None]:
        """Within the block, a forward raises OlmoIVError at the first hook point, in forward order, whose value
        holds a NaN or an inf: the embeddings, each block's attention and MLP outputs (raw and post-norm) and
        residual, and the logits. Opt-in: each check is a reduction and a device sync."""
        points = ["hook_embed"]
        for layer in range(self.config.n_layers):  # type: ignore[attr-defined]
            points += [f"blocks.{layer}.{s}" for s in FINITE_CHECKED]
        points.append("hook_logits")

        def check(x: Tensor, name: str) -> None:
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                hint = ""
                if x.dtype == torch.float16:
                    hint = "; float16 overflows easily: load the model with dtype='bfloat16' or 'float32'"
                raise OlmoIVError(
                    f"non-finite values first appear at {name} ({bad} of {x.numel()} are NaN or "
                    f"inf, dtype {str(x.dtype).removeprefix('torch.')}){hint}"
                )

        with self.hooks([(name, check) for name in points]):
            yield
