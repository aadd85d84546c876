"""SAE file formats: SAELens (read and write), sparsify and Gemma Scope (read). Safetensors and npz only.

| format     | files                                   | mapping                                                          |
|------------|-----------------------------------------|------------------------------------------------------------------|
| SAELens v6 | cfg.json + sae_weights.safetensors      | canonical names; hook in metadata.hook_name (older: hook_point)  |
| sparsify   | cfg.json + sae.safetensors              | W_enc = encoder.weight.T; W_dec [latents, d_in]; encode − b_dec  |
| Gemma Scope| params.npz                              | canonical names, JumpReLU, no b_dec subtraction                  |

Nothing is unpickled: npz files are read with allow_pickle=False, so an object array is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from olmo_iv.errors import OlmoIVError
from olmo_iv.io import atomic_write, write_json
from olmo_iv.sae.arch import SAE, SAEConfig

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config layout our writer emits (recorded as metadata.sae_lens_version)."""


def detect_format(path: str | os.PathLike) -> str:
    """'saelens', 'sparsify' or 'gemmascope' for a folder (or a params.npz file)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        return "gemmascope"
    if not p.is_dir():
        raise OlmoIVError(f"path={str(p)!r} is neither an SAE folder nor a params.npz file")
    if (p / SAELENS_WEIGHTS).exists():
        return "saelens"
    if (p / SPARSIFY_WEIGHTS).exists():
        return "sparsify"
    if (p / GEMMA_SCOPE_PARAMS).exists():
        return "gemmascope"
    raise OlmoIVError(f"{p} holds no SAE: expected {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} (sparsify) or "
                      f"{GEMMA_SCOPE_PARAMS} (Gemma Scope)")


def load_sae(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | None = None,
             hook_name: str | None = None) -> SAE:
    """Load an SAE from a local folder in any supported format. `hook_name` overrides what the files say."""
    fmt = detect_format(path)
    cfg, tensors = {"saelens": _read_saelens, "sparsify": _read_sparsify, "gemmascope": _read_gemmascope}[fmt](Path(path))
    if hook_name is not None:
        cfg.hook_name = hook_name
    cfg.metadata.setdefault("source_format", fmt)
    if dtype is not None:
        cfg.dtype = dtype
    sae = SAE(cfg, seed=None, device=device)
    _assign(sae, tensors)
    return sae


def _assign(sae: SAE, tensors: dict[str, torch.Tensor]) -> None:
    cfg = sae.cfg
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if sae.threshold is not None:
        shapes["threshold"] = (cfg.d_sae,)
    for name, shape in shapes.items():
        if name not in tensors:
            raise OlmoIVError(f"the SAE file has no tensor {name!r} (it has {', '.join(sorted(tensors))})")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise OlmoIVError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape} for d_in={cfg.d_in}, "
                              f"d_sae={cfg.d_sae}")
        with torch.no_grad():
            getattr(sae, name).copy_(t.to(getattr(sae, name).dtype))


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise OlmoIVError(f"{path} is not a readable safetensors file: {err}") from err


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OlmoIVError(f"{path} is not a readable JSON file: {err}") from err


def _dtype_name(value: Any) -> str:
    return str(value or "float32").replace("torch.", "")


# -- SAELens ------------------------------------------------------------------------------------------------


def _read_saelens(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    raw = _json(folder / SAELENS_CFG)
    tensors = _safetensors(folder / SAELENS_WEIGHTS)
    meta = dict(raw.get("metadata") or {})
    arch = raw.get("architecture")
    k = raw.get("k")
    if arch is None:  # pre-6.0 configs: the activation function names the architecture
        act = raw.get("activation_fn_str") or raw.get("activation_fn") or "relu"
        kwargs = raw.get("activation_fn_kwargs") or {}
        arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}.get(act)
        if arch is None:
            raise OlmoIVError(f"{folder}: activation_fn_str={act!r} is not supported (relu, topk, jumprelu)")
        k = kwargs.get("k", k)
    if arch == "batchtopk":  # a training checkpoint; SAELens infers with a JumpReLU at the learnt threshold
        if "threshold" not in tensors and "topk_threshold" in tensors:
            tensors["threshold"] = torch.full((int(raw["d_sae"]),), float(tensors["topk_threshold"]))
        arch = "jumprelu"
    if arch not in ("standard", "topk", "jumprelu"):
        raise OlmoIVError(f"{folder}: SAELens architecture {arch!r} is not supported (standard, topk, batchtopk, "
                          "jumprelu)")
    norm = raw.get("normalize_activations", "none")
    # expected_average_only_in is folded into the weights when SAELens saves, and is the identity at inference
    if norm not in ("none", "expected_average_only_in", None):
        raise OlmoIVError(f"{folder}: normalize_activations={norm!r} is not supported (none, "
                          "expected_average_only_in)")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise OlmoIVError(f"{folder}: reshape_activations={raw['reshape_activations']!r} is not supported")
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    ours = meta.pop("olmo_iv", None) or {}
    cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=arch,
                    k=int(k) if arch == "topk" else None,
                    apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                    rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
                    hook_name=hook, model_name=meta.get("model_name") or raw.get("model_name"),
                    context_size=meta.get("context_size") or raw.get("context_size"),
                    dtype=_dtype_name(raw.get("dtype")), metadata=meta)
    scale = float(ours.get("input_scale", 1.0))
    if scale != 1.0:  # our writer folded s into the weights; unfold it so that decoder rows are unit-norm again
        tensors = dict(tensors)
        tensors["W_enc"] = tensors["W_enc"].double() / scale
        tensors["W_dec"] = tensors["W_dec"].double() * scale
        tensors["b_dec"] = tensors["b_dec"].double() * scale
        cfg.input_scale = scale
    if ours.get("architecture") == "batchtopk" and arch == "jumprelu":
        cfg.architecture, cfg.k = "batchtopk", int(ours.get("k") or 1)
    cfg.metadata["olmo_iv"] = ours
    return cfg, tensors


def saelens_config(sae: SAE, **metadata: Any) -> dict[str, Any]:
    """The cfg.json SAELens v6 reads for this SAE (after the input scale is folded into the weights)."""
    cfg = sae.cfg
    arch = {"batchtopk": "jumprelu"}.get(cfg.architecture, cfg.architecture)
    meta = {k: v for k, v in cfg.metadata.items() if k not in ("olmo_iv", "source_format", "sparsify")}
    meta.update(model_name=cfg.model_name, hook_name=cfg.hook_name, hook_head_index=None,
                context_size=cfg.context_size, prepend_bos=False, model_class_name="olmo_iv.OLMo2")
    meta.update(metadata)
    # SAELens reads configs without a version >= 6 as pre-6.0 and then ignores `metadata`: this marks the v6 layout
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta["olmo_iv"] = {"input_scale": cfg.input_scale, "architecture": cfg.architecture, "k": cfg.k,
                       "note": "input_scale is folded into W_enc, W_dec and b_dec; the SAE reads raw activations"}
    out: dict[str, Any] = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype,
                           "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
                           "normalize_activations": "none", "reshape_activations": "none"}
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    out["metadata"] = meta
    return out


def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The tensors of sae_weights.safetensors, with s folded in: W_enc·s, W_dec/s, b_dec/s give the same
    pre-activations (so the same codes) on raw inputs, and return raw reconstructions."""
    s = sae.cfg.input_scale
    if s != 1.0 and sae.cfg.rescale_acts_by_decoder_norm:
        raise OlmoIVError("an SAE with rescale_acts_by_decoder_norm=True and input_scale != 1 cannot be written "
                          "in SAELens format: folding the scale would change the decoder norms it rescales by")
    t = {n: getattr(sae, n).detach().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if s != 1.0:
        dt = t["W_enc"].dtype
        t["W_enc"] = (t["W_enc"].double() * s).to(dt)
        t["W_dec"] = (t["W_dec"].double() / s).to(dt)
        t["b_dec"] = (t["b_dec"].double() / s).to(dt)
    if sae.threshold is not None:
        t["threshold"] = sae.threshold.detach().cpu()
    return {k: v.contiguous() for k, v in t.items()}


def save_saelens(sae: SAE, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write `path/cfg.json` and `path/sae_weights.safetensors` (SAELens v6), each atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = saelens_tensors(sae)
    atomic_write(folder / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / SAELENS_CFG, saelens_config(sae, **metadata))
    return folder


# -- sparsify -----------------------------------------------------------------------------------------------

_SPARSIFY_HOOKS = ((r"(?:.*\.)?layers\.(\d+)$", "blocks.{}.hook_resid_post"),
                   (r"(?:.*\.)?layers\.(\d+)\.mlp$", "blocks.{}.mlp.hook_out"),
                   (r"(?:.*\.)?layers\.(\d+)\.self_attn$", "blocks.{}.attn.hook_out"))


def sparsify_hook_name(hookpoint: str) -> str | None:
    """sparsify names hook points by HF module path; the output of `layers.L` is TransformerLens's resid_post."""
    for pattern, name in _SPARSIFY_HOOKS:
        m = re.fullmatch(pattern, hookpoint)
        if m:
            return name.format(m.group(1))
    return None


def _read_sparsify(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    raw = _json(folder / SAELENS_CFG)
    tensors = _safetensors(folder / SPARSIFY_WEIGHTS)
    if raw.get("activation", "topk") != "topk":
        raise OlmoIVError(f"{folder}: sparsify activation {raw.get('activation')!r} is not supported (topk)")
    if raw.get("transcode") or "W_skip" in tensors:
        raise OlmoIVError(f"{folder}: sparsify transcoders and skip connections are not supported")
    if "encoder.weight" not in tensors or "W_dec" not in tensors:
        raise OlmoIVError(f"{folder}/{SPARSIFY_WEIGHTS} lacks encoder.weight or W_dec (has {', '.join(sorted(tensors))})")
    enc = tensors["encoder.weight"]  # [latents, d_in]
    d_sae, d_in = enc.shape
    w_dec = tensors["W_dec"]
    if tuple(w_dec.shape) != (d_sae, d_in):  # decide by shape: some converters store the transpose
        if tuple(w_dec.shape) == (d_in, d_sae):
            w_dec = w_dec.T
        else:
            raise OlmoIVError(f"{folder}: W_dec has shape {tuple(w_dec.shape)}, expected {(d_sae, d_in)}")
    out = {"W_enc": enc.T.contiguous(), "b_enc": tensors["encoder.bias"], "W_dec": w_dec.contiguous(),
           "b_dec": tensors["b_dec"]}
    meta = {"sparsify": raw}
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="topk", k=int(raw.get("k", 32)),
                    apply_b_dec_to_input=True, hook_name=sparsify_hook_name(folder.name),
                    dtype=_dtype_name(enc.dtype), metadata=meta)
    return cfg, out


# -- Gemma Scope --------------------------------------------------------------------------------------------


def _read_gemmascope(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    import numpy as np

    file = path if path.is_file() else path / GEMMA_SCOPE_PARAMS
    try:
        with np.load(file, allow_pickle=False) as npz:  # never unpickle
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise OlmoIVError(f"{file} is not a readable npz of plain arrays: {err}") from err
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if "W_enc" not in tensors:
        raise OlmoIVError(f"{file} has no W_enc (has {', '.join(sorted(tensors))})")
    d_in, d_sae = tensors["W_enc"].shape
    m = re.search(r"layer_(\d+)", str(file))
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else None
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", k=None, apply_b_dec_to_input=False,
                    hook_name=hook, dtype=_dtype_name(tensors["W_enc"].dtype), metadata={})
    return cfg, tensors
