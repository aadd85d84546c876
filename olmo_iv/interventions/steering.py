"""Activation steering (Stolfo et al., ICLR 2025): difference-of-means vectors, interventions as hook specs, and
steered generation with a KV cache that equals the authors' full-recompute procedure token for token.

    vecs = compute_vectors(model, pairs)                        # per layer: u (unit) and z̄, from (with, without)
    spec = Steer(layer=3, vector=vecs.u[3], mode="adjust_rs", zbar=float(vecs.zbar[3]))
    ids = generate_steered(model, prompts, [spec], max_new_tokens=64)

The authors' procedure (docs/steering.md): both prompts of a pair rendered with the chat template and its
generation prompt; the residual stream after every block (`hook_resid_post`) at the last prompt token; the mean of
(with - without) over pairs, unit-normalised; z̄ the mean projection of the with-instruction activations on u. The
hook edits every position of the sequence, prompt and generated, at one layer. Their loop recomputes the whole
sequence for each new token; with the cache each position is edited once, when it is first computed, which gives
the same activations because every position only sees positions that were edited the same way.

Steering with SAE latents (SAIF, He et al. 2025, and its relatives) uses the same specs and hooks:

    v = latent_vector(sae, top, scorer.weights(top, by="mu_pos"))   # SAIF: Σ_j μ+_j W_dec[j]
    Steer(layer, v, coef=float(v.norm()))                            # adds v itself (Steer normalises vectors)
    ClampLatents(sae, top, values=scorer.weights(top, by="mu_pos"))  # set the latents in SAE space, error kept
    Steer(layer, sdcv(diffmean_u, sae, top))                         # DiffMean denoised in the latents' span
    latent_steer(sae, j, coef=8.0, decay=0.9)                        # one latent, decaying over generated tokens
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.generate import GenerationState, generate
from olmo_iv.hooks import BLOCK_HOOKS
from olmo_iv.progress import ProgressFn

if TYPE_CHECKING:
    from olmo_iv.sae.arch import SAE

MODES = ("add", "adjust_rs", "ablate")
"""add: h + c·u. adjust_rs (Stolfo's set-projection): h + (z̄ - h·u)·u, so that h·u = z̄. ablate: h - (h·u)·u."""
POSITIONS = ("all", "prompt", "generated", "last_prompt")
"""Which positions a spec edits: every one (the authors' choice), the prompt's, the generated tokens', or only the
last prompt token (where the vectors are read)."""
VECTOR_POSITIONS = ("last", "instruction", "prompt")
"""Where vectors are read: the last prompt token (the authors'), the mean over the instruction's tokens, or the
mean over all prompt tokens."""


def position_weights(positions: str, coef: float, decay: float | None, offset: int, length: int,
                     prompt_len: int | None, device: torch.device) -> Tensor:
    """[length] weight of positions offset..offset+length-1: coef where `positions` selects, 0 elsewhere; with
    `decay` γ the k-th generated position (k = 0, 1, ...) gets coef·γ^k. prompt_len None (a plain forward, no
    generation) makes every position a prompt position."""
    p = torch.arange(offset, offset + length, device=device)
    if prompt_len is None:
        prompt_len = offset + length
    on = {"all": torch.ones_like(p, dtype=torch.bool), "prompt": p < prompt_len, "generated": p >= prompt_len,
          "last_prompt": p == prompt_len - 1}[positions]
    w = torch.full((length,), float(coef), device=device)
    if decay is not None:
        k = (p - prompt_len).clamp(min=0).float()
        w = torch.where(p >= prompt_len, coef * decay**k, w)
    return w * on


class _Scheduled:
    """What every steering spec shares: where it acts (`layer`, `hook`), on which positions and how strongly
    (`positions`, `coef`, `decay`). The specs are dataclasses that hold these fields."""

    layer: int
    hook: str
    positions: str
    coef: float
    decay: float | None

    def _check_schedule(self) -> None:
        if self.positions not in POSITIONS:
            raise OlmoIVError(f"positions={self.positions!r}: use one of {', '.join(POSITIONS)}")
        if self.hook not in BLOCK_HOOKS:
            raise OlmoIVError(f"hook={self.hook!r}: use a block hook point such as 'hook_resid_post'")
        check_range("coef", self.coef)
        if not abs(self.coef) < float("inf"):
            raise OlmoIVError(f"coef={self.coef}: give a finite number")
        if self.decay is not None:
            check_range("decay", self.decay, 0, 1, low_open=True)

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{self.hook}"

    def weights(self, offset: int, length: int, prompt_len: int | None, device: torch.device) -> Tensor:
        """[length] weight of each position offset..offset+length-1 (0 where this spec does not act)."""
        return position_weights(self.positions, self.coef, self.decay, offset, length, prompt_len, device)


@dataclass
class Steer(_Scheduled):
    """One intervention: a direction at one layer's hook point, a mode, and where and how strongly it acts."""

    layer: int
    """Block whose output (by default) is edited."""
    vector: Tensor
    """[d_model] direction; normalised to unit length here."""
    mode: str = "add"
    """One of MODES."""
    coef: float = 1.0
    """add: the multiple of u added. adjust_rs and ablate: a weight on the edit (1 = the full edit)."""
    zbar: float | None = None
    """adjust_rs: the projection every edited position is set to."""
    positions: str = "all"
    """One of POSITIONS."""
    decay: float | None = None
    """None: constant. γ in (0, 1]: the k-th generated position (k = 0, 1, ...) gets coef·γ^k; prompt positions
    get coef."""
    hook: str = "hook_resid_post"
    """The block hook point edited."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OlmoIVError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        self._check_schedule()
        if self.mode == "adjust_rs":
            if self.zbar is None:
                raise OlmoIVError("mode='adjust_rs' needs zbar= (the mean projection of the with-instruction runs)")
            check_range("zbar", self.zbar)
        v = torch.as_tensor(self.vector).detach().float().reshape(-1)
        norm = float(v.norm())
        if not norm > 0 or not torch.isfinite(v).all():
            raise OlmoIVError("vector= must be a finite, non-zero direction")
        self.vector = v / norm

    def edit(self, x: Tensor, w: Tensor) -> Tensor:
        """x [B, T, d] edited with per-position weights w [T], in fp32, cast back to x's dtype."""
        u = self.vector.to(x.device)
        h = x.float()
        if self.mode == "add":
            out = h + w[None, :, None] * u
        else:
            proj = h @ u  # [B, T]
            target = (float(self.zbar) - proj) if self.mode == "adjust_rs" else -proj
            out = h + (w[None, :] * target)[..., None] * u
        return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ SAE latents


def sae_site(sae: SAE) -> tuple[int, str]:
    """(layer, block hook) of the hook point the SAE reads: 'blocks.3.hook_resid_post' -> (3, 'hook_resid_post')."""
    name = sae.cfg.hook_name or ""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is None or m.group(2) not in BLOCK_HOOKS:
        raise OlmoIVError(f"the SAE reads {name or 'no recorded hook point'!r}, not a block's hook point: pass "
                          "layer= and hook= (e.g. layer=3, hook='hook_resid_post')")
    return int(m.group(1)), m.group(2)


def latent_ids(sae: SAE, latents: Sequence[int]) -> list[int]:
    """`latents` as a list of distinct ints in 0..d_sae-1, or a clear error."""
    ids = [int(j) for j in latents]
    if not ids:
        raise OlmoIVError("latents= is empty: give at least one latent index")
    bad = [j for j in ids if not 0 <= j < sae.cfg.d_sae]
    if bad:
        raise OlmoIVError(f"latents={bad[:5]} are out of range 0..{sae.cfg.d_sae - 1}")
    if len(set(ids)) != len(ids):
        raise OlmoIVError(f"latents={ids} repeats a latent")
    return ids


def decoder_rows(sae: SAE, latents: Sequence[int]) -> Tensor:
    """[n, d_in] float32: what one unit of each latent's code adds to the reconstruction, decode(e_j) - decode(0).
    This is W_dec[j] for a plain SAE; the input scale s and SAELens' rescale_acts_by_decoder_norm divide it
    (by s, and by ‖W_dec[j]‖), so that codes from `sae.encode` give residual-space vectors in the model's units."""
    idx = torch.tensor(latent_ids(sae, latents), device=sae.W_dec.device)
    rows = sae.W_dec.detach()[idx].float()
    if sae.cfg.rescale_acts_by_decoder_norm:
        rows = rows / sae.W_dec.detach()[idx].float().norm(dim=-1, keepdim=True)
    return rows / sae.cfg.input_scale if sae.cfg.input_scale != 1.0 else rows


def _finite_vector(name: str, values: Tensor | Sequence[float] | float, n: int) -> Tensor:
    v = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    if v.numel() == 1 and n != 1:
        v = v.expand(n).clone()
    if v.numel() != n:
        raise OlmoIVError(f"{name}= has {v.numel()} entries for {n} latents")
    if not bool(torch.isfinite(v).all()):
        raise OlmoIVError(f"{name}= holds NaN or inf")
    return v


def latent_vector(sae: SAE, latents: Sequence[int], weights: Tensor | Sequence[float]) -> Tensor:
    """SAIF's steering vector Σ_j w_j · W_dec[j] over the selected latents: [d_in] float32, in residual units
    (see `decoder_rows`). Weights: μ+ (`LatentScorer.weights(latents, by="mu_pos")`) or the mean difference.
    A Steer normalises its vector, so `Steer(layer, v, coef=float(v.norm()))` adds v itself."""
    rows = decoder_rows(sae, latents)
    w = _finite_vector("weights", weights, rows.shape[0]).to(rows.device)
    return w @ rows


def latent_steer(sae: SAE, latent: int, coef: float, *, decay: float | None = None, positions: str = "all",
                 layer: int | None = None, hook: str | None = None) -> Steer:
    """Add coef × the latent's unit decoder direction at the SAE's hook point: the top-1 latent steering of
    S6 (Xie 2025) with `decay` γ, where the k-th generated token gets coef·γ^k (prompt positions get coef).
    The same as `Steer(layer, sae.W_dec[latent], mode="add", coef=coef, decay=decay)`."""
    if layer is None or hook is None:
        site_layer, site_hook = sae_site(sae)
        layer, hook = site_layer if layer is None else layer, site_hook if hook is None else hook
    return Steer(layer=layer, vector=decoder_rows(sae, [latent])[0], mode="add", coef=coef, positions=positions,
                 decay=decay, hook=hook)


def sdcv(vector: Tensor, sae: SAE, latents: Sequence[int], *, rescale: bool = False) -> Tensor:
    """SDCV (Zhao et al. 2025): denoise a steering vector (e.g. DiffMean) by keeping only its component in the
    span of the selected latents' decoder rows, the least-squares fit Σ_j c_j W_dec[j] ≈ vector.

    The projection is orthogonal (the closest vector of the span), computed by torch.linalg.lstsq in float64 on
    the CPU with the 'gelsd' driver, so collinear or repeated directions still give the projection (the
    minimum-norm coefficients). rescale=True gives the result the input's norm: a Steer normalises its vector
    anyway, but `coef=float(v.norm())`-style uses and comparisons with the raw vector keep their scale."""
    v = torch.as_tensor(vector).detach().reshape(-1)
    rows = decoder_rows(sae, latents)
    if v.numel() != rows.shape[1]:
        raise OlmoIVError(f"vector= has {v.numel()} entries; the SAE's d_in is {rows.shape[1]}")
    if not bool(torch.isfinite(v).all()):
        raise OlmoIVError("vector= holds NaN or inf")
    A, b = rows.double().cpu().T, v.double().cpu()[:, None]  # [d, n], [d, 1]
    proj = (A @ torch.linalg.lstsq(A, b, driver="gelsd").solution)[:, 0]
    if rescale:
        norm = float(proj.norm())
        if not norm > 1e-6 * float(b.norm()):  # rounding leaves ~1e-16·‖v‖ of an orthogonal vector
            raise OlmoIVError("vector= is orthogonal to the latents' decoder rows: nothing to rescale")
        proj = proj * (float(v.double().norm()) / norm)
    return proj.float().to(v.device)


@dataclass
class ClampLatents(_Scheduled):
    """Move selected SAE latents toward target values at one hook point, keeping the SAE's error term.

    With codes = sae.encode(h) and new = codes + w·(values - codes) on `latents` (unchanged elsewhere), the edited
    activation is h + decode(new) - decode(codes) = h + Σ_j (new_j - codes_j)·decoder_rows[j]. So w = 1 clamps
    the latents to `values` (SAIF's μ+ or α·max), values equal to the codes or w = 0 change nothing, and whatever
    the SAE fails to reconstruct stays in the residual. w is `coef` where `positions` selects, coef·γ^k on the
    k-th generated token with `decay` γ, and 0 elsewhere. Computed in float32, cast back to the activation's
    dtype; positions with w = 0 are not even encoded, and come back bit-identical."""

    sae: SAE = field(repr=False)
    """The SAE that reads this hook point (on the model's device)."""
    latents: Sequence[int]
    """The latents moved (distinct indices)."""
    values: Tensor | Sequence[float] | float
    """Target codes, one per latent (or one for all)."""
    coef: float = 1.0
    """The weight w: 1 sets the latents to the targets, 0 does nothing, in between interpolates."""
    positions: str = "all"
    """One of POSITIONS."""
    decay: float | None = None
    """None: constant. γ in (0, 1]: the k-th generated position gets coef·γ^k."""
    layer: int | None = None
    """Block edited; by default the SAE's (from sae.cfg.hook_name)."""
    hook: str | None = None
    """The block hook point edited; by default the SAE's."""

    def __post_init__(self) -> None:
        if self.layer is None or self.hook is None:
            layer, hook = sae_site(self.sae)
            self.layer = layer if self.layer is None else self.layer
            self.hook = hook if self.hook is None else self.hook
        self._check_schedule()
        self.latents = latent_ids(self.sae, self.latents)
        self.values = _finite_vector("values", self.values, len(self.latents))

    def edit(self, x: Tensor, w: Tensor) -> Tensor:
        """x [B, T, d] edited with per-position weights w [T]."""
        on = w != 0
        if not bool(on.any()):
            return x
        h = x[:, on].float()
        idx = torch.tensor(self.latents, device=h.device)
        codes = self.sae.encode(h).float().index_select(-1, idx)  # [B, t, n]
        move = w[on][None, :, None] * (self.values.to(h.device) - codes)
        # decode(new) - decode(codes) is linear in the code change (b_dec cancels): only the moved rows matter
        out = x.clone()
        out[:, on] = (h + move @ decoder_rows(self.sae, self.latents).to(h.device)).to(x.dtype)
        return out


Spec = Steer | ClampLatents
"""Anything `steering_hooks`, `generate_steered` and `check_specs` take; specs compose in order."""


def steering_hooks(specs: Sequence[Spec], state: GenerationState | None = None) -> dict[str, list]:
    """The hooks of `specs` for `model.hooks(...)`; several specs at one hook point act in order. Without a
    generation state, every position is a prompt position."""
    hooks: dict[str, list] = {}
    for spec in specs:
        def hook(x: Tensor, name: str, spec: Spec = spec) -> Tensor:
            offset = state.offset if state is not None else 0
            w = spec.weights(offset, x.shape[1], state.prompt_len if state is not None else None, x.device)
            return spec.edit(x, w)

        hooks.setdefault(spec.hook_name, []).append(hook)
    return hooks


def check_specs(model, specs: Sequence[Spec]) -> None:
    d, L = model.config.d_model, model.config.n_layers
    for spec in specs:
        if not 0 <= spec.layer < L:
            raise OlmoIVError(f"layer={spec.layer}: this model has layers 0..{L - 1}")
        if isinstance(spec, ClampLatents):
            if spec.sae.cfg.d_in != d:
                raise OlmoIVError(f"the SAE reads d_in={spec.sae.cfg.d_in}; this model's d_model is {d}")
            if spec.sae.W_dec.device != model.device:
                raise OlmoIVError(f"the SAE is on {spec.sae.W_dec.device} and the model on {model.device}: "
                                  "move the SAE with sae.to(model.device)")
        elif spec.vector.numel() != d:
            raise OlmoIVError(f"the steering vector has {spec.vector.numel()} entries; this model's d_model is {d}")


def generate_steered(model, prompts: Sequence[Sequence[int]] | Sequence[str], specs: Sequence[Spec], *,
                     max_new_tokens: int = 64, stop_ids: Sequence[int] | None = None, batch_size: int = 16,
                     use_cache: bool = True, seed: int | None = None, temperature: float = 1.0,
                     progress: ProgressFn | None = None) -> list[list[int]]:
    """New token ids per prompt with `specs` active on the prompt (prefill) and on every new token; greedy, or
    sampled with `seed`. A row ends at a stop token (default: the model's EOS), which is not included.
    use_cache=False is the authors' procedure: the whole sequence recomputed, and re-steered, for every token."""
    check_specs(model, specs)
    check_range("max_new_tokens", max_new_tokens, 1)
    if stop_ids is None:
        eos = model.config.eos_token_id
        stop_ids = () if eos is None else (eos,)
    out = generate(model, list(prompts), max_new_tokens=max_new_tokens, stop_at_newline=False, stop_ids=stop_ids,
                   batch_size=batch_size, use_cache=use_cache, progress=progress, seed=seed, temperature=temperature,
                   hooks=(lambda state: steering_hooks(specs, state)) if specs else None)
    stops = set(stop_ids)
    return [ids[:-1] if ids and ids[-1] in stops else ids for ids in out]


# ---------------------------------------------------------------------------------------------------- vectors


@dataclass
class SteeringVectors:
    """Difference-of-means directions for every layer of one hook point."""

    u: Tensor
    """[n_layers, d_model] unit vectors (float32)."""
    zbar: Tensor
    """[n_layers] mean projection of the with-instruction activations on u."""
    meta: dict[str, Any] = field(default_factory=dict)
    """How they were made: model, fingerprint, hook, position, number and digest of the pairs."""

    def spec(self, layer: int, **kw) -> Steer:
        """A Steer at `layer` with this layer's u (and z̄, used by mode='adjust_rs')."""
        if not 0 <= layer < self.u.shape[0]:
            raise OlmoIVError(f"layer={layer}: these vectors have layers 0..{self.u.shape[0] - 1}")
        return Steer(layer=layer, vector=self.u[layer], zbar=float(self.zbar[layer]),
                     hook=self.meta.get("hook", "hook_resid_post"), **kw)

    def tensors(self) -> dict[str, Tensor]:
        return {"u": self.u.contiguous(), "zbar": self.zbar.contiguous()}

    @classmethod
    def load(cls, folder: str | Path) -> SteeringVectors:
        """vectors.safetensors (u, zbar) and vectors.json (metadata) from a folder `olmo-iv steer vectors` wrote."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / "vectors.safetensors"
        if not path.exists():
            raise OlmoIVError(f"vectors={str(folder)!r} holds no vectors.safetensors: compute vectors first")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise OlmoIVError(f"{path} is not a readable safetensors file ({err})") from None
        if "u" not in t or "zbar" not in t or t["u"].dim() != 2 or t["zbar"].shape != t["u"].shape[:1]:
            raise OlmoIVError(f"{path} must hold u [n_layers, d_model] and zbar [n_layers]")
        meta_path = folder / "vectors.json"
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise OlmoIVError(f"{meta_path} is not valid JSON ({err}): write the vectors again") from None
        return cls(t["u"].float(), t["zbar"].float(), meta)


def diff_of_means(with_acts: Tensor, without_acts: Tensor) -> tuple[Tensor, Tensor]:
    """(u, z̄) from paired activations [N, L, d]: u = mean(with - without) / ||.||, z̄ = mean(with · u)."""
    if with_acts.shape != without_acts.shape or with_acts.dim() != 3:
        raise OlmoIVError(f"paired activations must both be [N, L, d]; got {tuple(with_acts.shape)} and "
                          f"{tuple(without_acts.shape)}")
    diff = (with_acts.double() - without_acts.double()).mean(0)
    norm = diff.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise OlmoIVError("with and without activations are identical at some layer: the pairs carry no difference")
    u = (diff / norm).float()
    zbar = torch.einsum("nld,ld->l", with_acts.float(), u) / with_acts.shape[0]
    return u, zbar


def _spans(with_ids: list[int], without_ids: list[int]) -> tuple[int, int]:
    """The tokens of the with-prompt that the without-prompt lacks: after the common prefix and before the
    common suffix (the instruction, wherever it is placed)."""
    a = 0
    while a < min(len(with_ids), len(without_ids)) and with_ids[a] == without_ids[a]:
        a += 1
    b = 0
    while b < min(len(with_ids), len(without_ids)) - a and with_ids[-1 - b] == without_ids[-1 - b]:
        b += 1
    return a, max(a + 1, len(with_ids) - b)


def compute_vectors(model, pairs: Sequence[tuple[str, str]], *, position: str = "last", style: str = "auto",
                    hook: str = "hook_resid_post", batch_size: int = 16,
                    progress: ProgressFn | None = None) -> SteeringVectors:
    """Difference-of-means vectors for every layer from (with-instruction, without-instruction) user messages,
    each rendered with the model's chat template (olmo_iv.chat, `style`)."""
    from olmo_iv.activations import extract, extract_span_mean
    from olmo_iv.chat import format_prompt
    from olmo_iv.generate import encode

    if position not in VECTOR_POSITIONS:
        raise OlmoIVError(f"position={position!r}: use one of {', '.join(VECTOR_POSITIONS)}")
    if not pairs:
        raise OlmoIVError("pairs= is empty: give (with, without) message pairs")
    if model.tokenizer is None:
        raise OlmoIVError("the model has no tokenizer.json: steering vectors need one to render the prompts")
    with_ids = [encode(model.tokenizer, format_prompt(model, w, style=style)) for w, _ in pairs]
    without_ids = [encode(model.tokenizer, format_prompt(model, wo, style=style)) for _, wo in pairs]
    if position == "last":
        w = extract(model, with_ids, hook, positions=-1, batch_size=batch_size, dtype=torch.float32,
                    progress=progress)
        wo = extract(model, without_ids, hook, positions=-1, batch_size=batch_size, dtype=torch.float32,
                     progress=progress)
    elif position == "prompt":
        w = extract_span_mean(model, with_ids, hook, [(0, len(s)) for s in with_ids], batch_size=batch_size)
        wo = extract_span_mean(model, without_ids, hook, [(0, len(s)) for s in without_ids], batch_size=batch_size)
    else:  # the instruction's tokens in the with-prompt, and the last prompt token of the without-prompt
        spans = [_spans(a, b) for a, b in zip(with_ids, without_ids, strict=True)]
        w = extract_span_mean(model, with_ids, hook, spans, batch_size=batch_size)
        wo = extract(model, without_ids, hook, positions=-1, batch_size=batch_size, dtype=torch.float32)
    u, zbar = diff_of_means(w.cpu(), wo.cpu())
    digest = __import__("hashlib").sha256(json.dumps(list(map(list, pairs))).encode()).hexdigest()
    meta = {"model": getattr(model, "name_or_path", None), "hook": hook, "position": position, "style": style,
            "n_pairs": len(pairs), "pairs_sha256": digest, "n_layers": int(u.shape[0]), "d_model": int(u.shape[1])}
    return SteeringVectors(u, zbar, meta)


@torch.inference_mode()
def response_nll(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                 batch_size: int = 16, chunk: int = 256) -> list[float | None]:
    """Per row, the mean negative log-likelihood (nats per token) of `responses[i]` after `prompts[i]` under the
    model as it is (no steering): the layer search's second degeneration measure, in place of the authors' GPT-2
    perplexity. A looping response scores low, gibberish high; an empty response has none (None). Only the
    response positions are unembedded, `chunk` rows at a time, so the vocabulary never costs [B, T, V] memory."""
    if len(prompts) != len(responses):
        raise OlmoIVError(f"{len(prompts)} prompts but {len(responses)} responses: give one response per prompt")
    check_range("batch_size", batch_size, 1)
    if any(len(p) == 0 for p in prompts):
        raise OlmoIVError("an empty prompt: every response needs at least one prompt token before it")
    L = model.config.n_layers
    out: list[float | None] = [None] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        idx = [i for i in range(start, min(start + batch_size, len(prompts))) if len(responses[i])]
        if not idx:
            continue
        rows = [list(prompts[i]) + list(responses[i]) for i in idx]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for j, r in enumerate(rows):  # right padding: causality keeps every real token from seeing it
            ids[j, : len(r)] = torch.as_tensor(r)
        h = model(ids.to(model.device), stop_at_layer=L)  # final residual [B, T, d]
        b_idx, p_idx, target = [], [], []
        for j, i in enumerate(idx):
            n_p, n_r = len(prompts[i]), len(responses[i])
            b_idx += [j] * n_r
            p_idx += range(n_p - 1, n_p + n_r - 1)  # the position that predicts each response token
            target += list(responses[i])
        x = h[torch.tensor(b_idx), torch.tensor(p_idx)]
        tgt = torch.tensor(target, device=x.device)
        nll = torch.empty(len(target), dtype=torch.float64)
        for c in range(0, len(target), chunk):
            logits = model.unembed(x[None, c : c + chunk])[0].float()
            nll[c : c + chunk] = (torch.logsumexp(logits, -1) - logits.gather(1, tgt[c : c + chunk, None])[:, 0]).cpu()
        k = 0
        for i in idx:
            n_r = len(responses[i])
            out[i] = float(nll[k : k + n_r].mean())
            k += n_r
    return out
