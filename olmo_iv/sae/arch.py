"""The sparse autoencoder module: TopK, BatchTopK, ReLU + L1 ("standard") and JumpReLU, in one class.

Canonical tensors (the SAELens layout): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
and threshold [d_sae] for JumpReLU (BatchTopK infers with its learnt global threshold, stored the same way).

    pre   = ((s·x) - b_dec·apply_b_dec_to_input) @ W_enc + b_enc     (· ‖W_dec row‖ if rescale_acts_by_decoder_norm)
    codes = topk(pre, k) | relu(pre) | relu(pre)·[pre > threshold]
    x̂     = (codes @ W_dec + b_dec) / s

s is `input_scale`: training scales inputs so that E‖s·x‖² = d_in, and the SAE keeps s so that it always takes
and returns raw model activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from olmo_iv.errors import OlmoIVError

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")
"""What `SAEConfig.architecture` accepts. jumprelu is for inference (Gemma Scope, SAELens files)."""


@dataclass
class SAEConfig:
    d_in: int
    """Width of the activations the SAE reads (the model's d_model for residual hooks)."""
    d_sae: int
    """Number of latents."""
    architecture: str = "topk"
    """topk (primary), batchtopk, standard (ReLU + L1) or jumprelu (inference only)."""
    k: int | None = 32
    """Active latents per token (topk) or on average per token (batchtopk); None for standard / jumprelu."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the (scaled) input before the encoder, as SAELens and sparsify do."""
    rescale_acts_by_decoder_norm: bool = False
    """SAELens topk option: multiply pre-activations by the decoder row norms (and divide before decoding)."""
    input_scale: float = 1.0
    """s: the SAE encodes s·x and returns x̂ / s. Training sets it so that E‖s·x‖² = d_in."""
    hook_name: str | None = None
    """TransformerLens hook name the SAE reads, e.g. 'blocks.3.hook_resid_post'."""
    model_name: str | None = None
    """The model the SAE was trained on (a built-in name, a folder or a hub id)."""
    context_size: int | None = None
    """Tokens per training window."""
    dtype: str = "float32"
    """Parameter dtype, as a torch dtype name."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Other metadata, kept on a round trip (training settings, the source format, ...)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise OlmoIVError(f"architecture={self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise OlmoIVError(f"d_in={self.d_in} and d_sae={self.d_sae} must be at least 1")
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None or self.k < 1 or self.k > self.d_sae:
                raise OlmoIVError(f"k={self.k} must be in 1..d_sae={self.d_sae} for architecture {self.architecture!r}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise OlmoIVError(f"input_scale={self.input_scale} must be a positive finite number")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAEOutput(NamedTuple):
    recon: Tensor
    """The reconstruction x̂, in the input's units."""
    codes: Tensor
    """Dense latent activations [..., d_sae]."""


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise OlmoIVError(f"dtype={name!r} is not a torch dtype")
    return dt


class SAE(nn.Module):
    """A sparse autoencoder. `encode(x)` dense codes, `decode(z)` reconstruction, `sae(x)` both (SAEOutput).

    `SAE.load(path)` reads SAELens, sparsify and Gemma Scope folders; `sae.save(path)` writes SAELens v6.
    """

    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        dt = _dtype(cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=device))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt, device=device))
        has_threshold = cfg.architecture in ("jumprelu", "batchtopk")
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=device),
                                      requires_grad=False) if has_threshold else None
        if seed is not None:
            self.reset_parameters(seed)

    # -- initialisation and constraints ---------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Unit-norm random decoder rows; the encoder starts as the decoder's transpose (both sparsify and
        SAELens do this: each latent starts by reading the direction it writes)."""
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen, dtype=torch.float64)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w.to(self.W_dec.dtype))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Give every decoder row unit norm (the scale of a latent lives in its code, not its direction)."""
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm + torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of W_dec's gradient along each row: with unit-norm rows, that component
        only changes the norm, which the next renormalisation undoes, so it would be wasted step size."""
        g = self.W_dec.grad
        if g is None:
            return
        parallel = (g * self.W_dec).sum(dim=1, keepdim=True)
        g.sub_(parallel * self.W_dec)

    # -- inference -------------------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _scaled_in(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.input_scale != 1.0:
            x = x * self.cfg.input_scale
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [..., d_sae] of raw inputs x [..., d_in]."""
        if x.shape[-1] != self.cfg.d_in:
            raise OlmoIVError(f"the SAE reads d_in={self.cfg.d_in} features; x has {x.shape[-1]} in its last dim")
        pre = self._scaled_in(x) @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: Tensor) -> Tensor:
        """Pre-activations -> dense codes, by the architecture's rule."""
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch == "standard":
            return pre.relu()
        # jumprelu, and batchtopk at inference (its learnt global threshold, as SAELens exports it)
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., d_sae] of raw activations x [..., d_in]."""
        return self.activate(self.pre_acts(x))

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [..., d_in], in the units of the raw activations."""
        codes = codes.to(self.W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            codes = codes / self.W_dec.norm(dim=-1)
        out = codes @ self.W_dec + self.b_dec
        return out / self.cfg.input_scale if self.cfg.input_scale != 1.0 else out

    def forward(self, x: Tensor) -> SAEOutput:
        codes = self.encode(x)
        return SAEOutput(self.decode(codes), codes)

    # -- sparse training path (TopK) ------------------------------------------------------------------------

    def topk_sparse(self, xs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For already-scaled inputs xs [N, d_in]: (values [N, k] with gradients, indices [N, k], relu'd dense
        pre-activations [N, d_sae] without gradients, the encoder input xs - b_dec). Only the k chosen latents get encoder gradients, so the
        backward costs N·k·d_in instead of N·d_sae·d_in."""
        xin = xs - self.b_dec if self.cfg.apply_b_dec_to_input else xs
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xin, self.W_enc).relu_()
            vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = GatheredEncode.apply(vals, xin, self.W_enc, self.b_enc, idx)
        return vals, idx, pre, xin

    def decode_sparse(self, vals: Tensor, idx: Tensor, bias: bool = True) -> Tensor:
        """Scaled-space reconstruction from (values, indices) [N, k]: an embedding-bag sum of decoder rows."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        return out + self.b_dec if bias else out

    def codes_from_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        return torch.zeros(vals.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device).scatter_(
            -1, idx, vals.detach())

    # -- I/O (implemented in olmo_iv.sae.io) -----------------------------------------------------------------

    @classmethod
    def load(cls, path, *, device: str | torch.device = "cpu", dtype: str | None = None,
             hook_name: str | None = None) -> SAE:
        """Read an SAE folder or file: SAELens (cfg.json + sae_weights.safetensors, v6 or older configs),
        sparsify (cfg.json + sae.safetensors) or Gemma Scope (params.npz). `hook_name` overrides the files'."""
        from olmo_iv.sae.io import load_sae

        return load_sae(path, device=device, dtype=dtype, hook_name=hook_name)

    def save(self, path, **metadata: Any):
        """Write SAELens v6 format (cfg.json + sae_weights.safetensors), the input scale folded into the weights."""
        from olmo_iv.sae.io import save_saelens

        return save_saelens(self, path, **metadata)


class GatheredEncode(torch.autograd.Function):
    """values = relu(xin @ W_enc + b_enc)[n, idx[n]], computed beforehand without gradients; the backward
    scatters gradients only into the chosen encoder columns (sparse in the latent dimension)."""

    @staticmethod
    def forward(ctx, vals: Tensor, xin: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xin, idx, vals, W_enc)
        ctx.d_sae = W_enc.shape[1]
        return vals.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xin, idx, vals, W_enc = ctx.saved_tensors
        g = grad * (vals > 0)  # the ReLU: latents chosen with a non-positive value pass no gradient
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1)
        d_sae = ctx.d_sae
        grad_W = grad_b = grad_x = None
        if ctx.needs_input_grad[2]:
            # dL/dW_enc[:, j] = sum over the tokens n that chose j of g[n, j] x[n]: group the N·k choices by latent
            # (one sort) and sum the rows of x with an embedding bag; N·k·d_in work, nothing of size N·k·d_in stored
            n, k = idx.shape
            order = flat_idx.argsort()
            rows = torch.arange(n, device=idx.device).repeat_interleave(k)[order]
            counts = torch.bincount(flat_idx, minlength=d_sae)
            offsets = torch.zeros_like(counts)
            offsets[1:] = counts.cumsum(0)[:-1]
            grad_W = F.embedding_bag(rows, xin, offsets, mode="sum", per_sample_weights=flat_g[order]).t()
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, flat_g)
        if ctx.needs_input_grad[1]:  # reaches b_dec through xin = s·x - b_dec
            grad_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=g, mode="sum")
        return None, grad_x, grad_W, grad_b, None
