"""OLMo-2 and OLMo-3 in plain PyTorch, with typed hook points. Read it top to bottom.

Block (OLMo-2's "reordered" post-norm; there is no pre-norm, attention and MLP read the raw residual):
    h   = x + RMSNorm_attn(Attn(x))          attention: QK-norm over the whole projection, then half-split RoPE
    out = h + RMSNorm_mlp(MLP(h))            MLP: down(act(gate(h)) * up(h)), act = SiLU (SwiGLU)
then a final RMSNorm and the unembedding. Numerics follow transformers' Olmo2: the norms run in fp32 and
multiply their weight in fp32 before casting back, and RoPE's cos/sin stay in fp32.

OLMo-3 is the same block with two per-layer differences (transformers' Olmo3): three of every four layers use
sliding-window attention (a query sees only the last `sliding_window` keys, itself included), and the
full-attention layers may use YaRN-scaled RoPE while the sliding ones keep plain RoPE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from olmo_iv.errors import OlmoIVError
from olmo_iv.hooks import BLOCK_HOOKS, HookedMixin, HookFn, block_hook_names, run_hooks

MODEL_TYPES = {"olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}
ATTENTION_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "yarn")


@dataclass
class ModelConfig:
    vocab_size: int = 100352
    """Rows of the embedding and of lm_head (OLMo-2 pads its 100278 tokens to 100352)."""
    d_model: int = 2048
    """Width of the residual stream (HF: hidden_size)."""
    n_layers: int = 16
    """Number of decoder blocks (HF: num_hidden_layers)."""
    n_heads: int = 16
    """Query heads (HF: num_attention_heads)."""
    n_kv_heads: int = 16
    """Key/value heads; fewer than n_heads means grouped-query attention (the 32B models have 8)."""
    d_mlp: int = 8192
    """Hidden width of the gated MLP (HF: intermediate_size)."""
    head_dim: int | None = None
    """Width of one head; None means d_model // n_heads."""
    rope_theta: float = 500000.0
    """RoPE base frequency (of every layer unless rope_parameters says otherwise)."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm (the four per block, QK-norms included, and the final one)."""
    hidden_act: str = "silu"
    """Gate activation: 'silu' (SwiGLU, every OLMo) or 'relu' (gives 0/1 gate masks in path tracing)."""
    tie_word_embeddings: bool = False
    """Share the embedding with lm_head (no OLMo-2/3 checkpoint does)."""
    max_position_embeddings: int = 4096
    """Context length the checkpoint supports; longer inputs are refused (OLMo-3: 65536 with YaRN)."""
    bos_token_id: int | None = None
    """Token the checkpoint uses as BOS, if any (OLMo-2 adds none by default; <|endoftext|>=100257)."""
    eos_token_id: int | None = None
    """End-of-text token."""
    pad_token_id: int | None = None
    """Padding token."""
    model_type: str = "olmo2"
    """'olmo2' or 'olmo3': which transformers class the checkpoint belongs to (config.json's model_type)."""
    layer_types: list[str] | None = None
    """Attention type of each block, 'full_attention' or 'sliding_attention' (OLMo-3: three sliding, then one
    full); None means every block full (OLMo-2)."""
    sliding_window: int | None = None
    """Keys a query of a sliding-attention block sees, itself included (OLMo-3: 4096)."""
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """RoPE of each attention type, nested as transformers v5 writes it: {'full_attention': {'rope_type': 'yarn',
    'rope_theta': 500000.0, 'factor': 8.0, 'original_max_position_embeddings': 8192, ...}}. A type left out gets
    plain ('default') RoPE at rope_theta."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Other config.json fields, kept so that a saved config round-trips."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise OlmoIVError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.hidden_act not in ("silu", "relu"):
            raise OlmoIVError(f"hidden_act={self.hidden_act!r} is not supported: use 'silu' or 'relu'")
        if self.model_type not in MODEL_TYPES:
            raise OlmoIVError(
                f"model_type={self.model_type!r}: olmo-iv implements {' and '.join(MODEL_TYPES)}"
            )
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.n_layers
        if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(ATTENTION_TYPES):
            raise OlmoIVError(
                f"layer_types must give one of {ATTENTION_TYPES} for each of the {self.n_layers} "
                f"layers, got {self.layer_types}"
            )
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
            raise OlmoIVError(f"sliding-attention layers need sliding_window >= 1, got {self.sliding_window}")
        if self.model_type == "olmo2" and (
            set(self.layer_types) != {"full_attention"} or self.rope_parameters
        ):
            raise OlmoIVError(
                "OLMo-2 has full attention and plain RoPE in every layer; use model_type='olmo3'"
            )
        for kind, params in self.rope_parameters.items():
            if kind not in ATTENTION_TYPES or params.get("rope_type", "default") not in ROPE_TYPES:
                raise OlmoIVError(
                    f"rope_parameters[{kind!r}]={params}: supported are the attention types "
                    f"{ATTENTION_TYPES} and the RoPE types {ROPE_TYPES}"
                )
            if params.get("partial_rotary_factor", 1.0) != 1.0:
                raise OlmoIVError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")

    def rope(self, attention_type: str) -> dict[str, Any]:
        """The RoPE parameters of one attention type, defaults filled in."""
        return {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            **self.rope_parameters.get(attention_type, {}),
        }

    # transformers' config.json names -> ours
    HF_FIELDS = {
        "vocab_size": "vocab_size",
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "d_mlp",
        "head_dim": "head_dim",
        "rms_norm_eps": "rms_norm_eps",
        "hidden_act": "hidden_act",
        "tie_word_embeddings": "tie_word_embeddings",
        "max_position_embeddings": "max_position_embeddings",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "pad_token_id": "pad_token_id",
    }
    ROPE_AND_LAYER_FIELDS = ("rope_theta", "rope_parameters", "rope_scaling", "layer_types", "sliding_window")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict. RoPE may be given as checkpoints on the hub write it (`rope_theta`, and
        `rope_scaling` for OLMo-3's full-attention layers) or as transformers v5 does (`rope_parameters`, flat for
        OLMo-2, nested by attention type for OLMo-3)."""
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise OlmoIVError(
                f"config.json has model_type={model_type!r}; olmo-iv implements OLMo-2 and OLMo-3 only "
                "(model_type 'olmo2' or 'olmo3')"
            )
        if cfg.get("attention_bias"):
            raise OlmoIVError("config.json sets attention_bias=true; OLMo-2/3 checkpoints have no biases")
        kwargs = {ours: cfg[hf] for hf, ours in cls.HF_FIELDS.items() if cfg.get(hf) is not None}
        kwargs.setdefault("n_kv_heads", kwargs.get("n_heads", cls.n_heads))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several
                kwargs[key] = kwargs[key][0]

        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        if any(k in params for k in ATTENTION_TYPES):
            per_type = {k: dict(v) for k, v in params.items() if k in ATTENTION_TYPES and v}
        else:  # one flat dict: all layers for OLMo-2; OLMo-3 scales only its full-attention layers
            per_type = {"full_attention": params} if params else {}
        # (transformers 5 gives the sliding layers of a rope_scaling-style config 500000 whatever rope_theta says;
        # every OLMo-3 checkpoint has rope_theta 500000, and rope_theta is what OLMo-core uses for both)
        if scaling:
            per_type["full_attention"] = {**per_type.get("full_attention", {}), **scaling}
        for p in per_type.values():
            if "type" in p:  # the pre-v4.45 spelling
                p.setdefault("rope_type", p.pop("type"))
        thetas = [p["rope_theta"] for p in per_type.values() if p.get("rope_theta") is not None]
        theta = cfg.get("rope_theta")
        if theta is None and thetas:
            theta = thetas[0]
        if theta is None:
            raise OlmoIVError("config.json gives neither rope_theta nor rope_parameters.rope_theta")
        layers: dict[str, Any] = {}
        if model_type == "olmo2":
            for p in per_type.values():
                if p.get("rope_type", "default") != "default":
                    raise OlmoIVError(
                        f"RoPE type {p['rope_type']!r} is not supported: OLMo-2 uses plain ('default') RoPE"
                    )
            per_type = {}
        else:
            n = kwargs.get("n_layers", cls.n_layers)
            # transformers' Olmo3Config default: every fourth layer full, the others sliding
            layers["layer_types"] = cfg.get("layer_types") or [
                "full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)
            ]
            layers["sliding_window"] = cfg.get("sliding_window", 4096)
        skip = set(cls.HF_FIELDS) | set(cls.ROPE_AND_LAYER_FIELDS) | {"model_type"}
        extra = {k: v for k, v in cfg.items() if k not in skip}
        return cls(
            rope_theta=float(theta),
            model_type=model_type,
            rope_parameters=per_type,
            extra=extra,
            **layers,
            **kwargs,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json that transformers' Olmo2ForCausalLM / Olmo3ForCausalLM reads back."""
        ours = asdict(self)
        cfg = {k: v for k, v in self.extra.items() if k not in self.ROPE_AND_LAYER_FIELDS}
        cfg.update({hf: ours[o] for hf, o in self.HF_FIELDS.items() if ours[o] is not None})
        cfg.update(
            model_type=self.model_type,
            architectures=[MODEL_TYPES[self.model_type]],
            attention_bias=False,
            attention_dropout=0.0,
            rope_theta=self.rope_theta,
            rope_scaling=None,
        )
        if self.model_type == "olmo3":
            # both spellings: v5 reads the nested rope_parameters, earlier versions rope_theta + rope_scaling
            full = self.rope("full_attention")
            cfg.update(
                layer_types=list(self.layer_types or ()),
                sliding_window=self.sliding_window,
                rope_parameters={kind: self.rope(kind) for kind in ATTENTION_TYPES},
                rope_scaling=full if full["rope_type"] != "default" else None,
            )
        return cfg


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), in fp32 as transformers' Olmo2RMSNorm: the weight multiplies before the
    cast back (Llama casts first), which is what keeps bf16 parity exact."""

    def __init__(
        self, dim: int, eps: float, hooks: dict[str, list[HookFn]] | None = None, name: str = ""
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.hooks = hooks  # the model's registry, by reference (None: no hook point, as in the QK-norms)
        self.scale_name = name

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # the scale hook sees what TransformerLens calls the scale: sqrt(mean(x^2) + eps)
        if self.hooks and self.scale_name in self.hooks:
            scale = 1.0 / inv
            new = run_hooks(self.hooks, self.scale_name, scale)
            if new is not scale:
                inv = 1.0 / new.float()
        return (self.weight * (h * inv)).to(x.dtype)


def rope_frequencies(cfg: ModelConfig, attention_type: str) -> tuple[Tensor, float]:
    """(inv_freq [head_dim / 2] fp32 on the CPU, attention factor that multiplies cos and sin) of one attention
    type. YaRN (arXiv 2309.00071) keeps the high frequencies, divides the low ones by `factor` and ramps linearly
    in between, over the dimensions that turn between beta_fast and beta_slow times in the original context;
    the constants and defaults are transformers' (`_compute_yarn_parameters`), which is the parity oracle."""
    p, dim = cfg.rope(attention_type), cfg.head_dim
    assert dim is not None
    base = float(p["rope_theta"])
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if p["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    original = p.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = p.get("factor") or cfg.max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def dim_turning(turns: float) -> float:  # the dimension whose frequency turns `turns` times in `original`
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_turning(p.get("beta_fast") or 32), dim_turning(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin of shape [B, T, 1, head_dim] for half-split ('rotate_half') RoPE."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:  # YaRN scales the attention logits through q and k
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)  # promoted to fp32 by cos/sin, then cast back


@dataclass
class KVCache:
    """Rotated keys and values of every layer, [B, n_kv_heads, T_past, head_dim], grown by each forward.

    With a `capacity`, each layer's keys and values live in one buffer of that many positions, allocated at the
    first forward and filled in place, and attention reads a view of the filled part: a decoding step then
    copies only its new key and value, where concatenating copies the whole cache (at 128 new tokens that copy
    was a fifth of a steered generation's time on a CPU). The values are the same either way."""

    k: list[Tensor | None]
    v: list[Tensor | None]
    capacity: int | None = None
    """Positions to preallocate per layer (None: grow by concatenation)."""
    filled: list[int] = field(default_factory=list)
    """Positions written per layer, with a capacity."""

    @classmethod
    def empty(cls, n_layers: int, capacity: int | None = None) -> KVCache:
        if capacity is not None and capacity < 1:
            raise OlmoIVError(f"capacity={capacity}: give at least 1 position, or None")
        return cls([None] * n_layers, [None] * n_layers, capacity, [0] * n_layers)

    @property
    def length(self) -> int:
        if self.k[0] is None:
            return 0
        return self.filled[0] if self.capacity is not None else self.k[0].shape[2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new keys and values [B, H, T, dh] of `layer`; returns all of that layer's so far."""
        if self.capacity is None:
            if self.k[layer] is not None:
                k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
            self.k[layer], self.v[layer] = k, v
            return k, v
        past, T = self.filled[layer], k.shape[2]
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or past + T > buf_k.shape[2]:  # first use, or more positions than planned: grow
            size = max(self.capacity, past + T, 2 * past)
            new_k, new_v = k.new_empty(*k.shape[:2], size, k.shape[3]), v.new_empty(*v.shape[:2], size, v.shape[3])
            if past:
                new_k[:, :, :past], new_v[:, :, :past] = buf_k[:, :, :past], buf_v[:, :, :past]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, past : past + T], buf_v[:, :, past : past + T] = k, v
        self.filled[layer] = past + T
        return buf_k[:, :, : past + T], buf_v[:, :, : past + T]


def _sub_hook_names(layer: int, prefix: str) -> dict[str, str]:
    """'hook_q' -> 'blocks.{layer}.attn.hook_q' for the hook points of one sub-module."""
    return {s.removeprefix(prefix): f"blocks.{layer}.{s}" for s in BLOCK_HOOKS if s.startswith(prefix)}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, hooks: dict[str, list[HookFn]]) -> None:
        super().__init__()
        self.cfg, self.layer, self.hooks = cfg, layer, hooks
        self.names = _sub_hook_names(layer, "attn.")
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        # QK-norm over the whole flattened projection, before the head split and RoPE (it is not per head)
        self.q_norm = RMSNorm(cfg.n_heads * hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.n_kv_heads * hd, cfg.rms_norm_eps)

    def _hook(self, short: str, x: Tensor) -> Tensor:
        return run_hooks(self.hooks, self.names[short], x)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        cfg, H = self.cfg, self.hooks
        q = self.q_norm(self.q_proj(x)).view(B, T, cfg.n_heads, cfg.head_dim)
        k = self.k_norm(self.k_proj(x)).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        if H:
            q, k, v = self._hook("hook_q", q), self._hook("hook_k", k), self._hook("hook_v", v)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if H:
            q, k = self._hook("hook_rot_q", q), self._hook("hook_rot_k", k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, dh]
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        scale = cfg.head_dim**-0.5
        if H and self.names["hook_pattern"] in H:  # eager path: the pattern is materialised only on request
            rep = cfg.n_heads // cfg.n_kv_heads
            kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ kr.transpose(2, 3)) * scale
            if mask is None:
                mask = causal_mask(T, k.shape[2], x.device)
            scores = scores.masked_fill(~mask, float("-inf"))
            pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            z = self._hook("hook_pattern", pattern) @ vr
        else:
            causal = mask is None and k.shape[2] == T
            gqa = cfg.n_kv_heads != cfg.n_heads
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
            )
        z = z.transpose(1, 2)  # [B, T, H, dh]
        if H:
            z = self._hook("hook_z", z)
        return self.o_proj(z.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, hooks: dict[str, list[HookFn]]) -> None:
        super().__init__()
        self.hooks = hooks
        self.names = _sub_hook_names(layer, "mlp.")
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.act = F.silu if cfg.hidden_act == "silu" else F.relu

    def forward(self, x: Tensor) -> Tensor:
        H, n = self.hooks, self.names
        gate, up = self.gate_proj(x), self.up_proj(x)
        if H:
            gate, up = run_hooks(H, n["hook_pre"], gate), run_hooks(H, n["hook_pre_linear"], up)
        post = self.act(gate) * up
        if H:
            post = run_hooks(H, n["hook_post"], post)
        return self.down_proj(post)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, hooks: dict[str, list[HookFn]]) -> None:
        super().__init__()
        self.layer, self.hooks, self.n = layer, hooks, block_hook_names(layer)
        self.attention_type = cfg.layer_types[layer] if cfg.layer_types else "full_attention"
        self.attn = Attention(cfg, layer, hooks)
        self.ln_attn = RMSNorm(cfg.d_model, cfg.rms_norm_eps, hooks, self.n["ln_attn.hook_scale"])
        self.mlp = MLP(cfg, layer, hooks)
        self.ln_mlp = RMSNorm(cfg.d_model, cfg.rms_norm_eps, hooks, self.n["ln_mlp.hook_scale"])

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        H, n = self.hooks, self.n
        hk = (lambda name, t: run_hooks(H, n[name], t)) if H else (lambda name, t: t)
        x = hk("hook_resid_pre", x)
        a = hk("hook_attn_out", self.ln_attn(hk("attn.hook_out", self.attn(x, cos, sin, mask, cache))))
        x = hk("hook_resid_mid", x + a)
        m = hk("hook_mlp_out", self.ln_mlp(hk("mlp.hook_out", self.mlp(x))))
        return hk("hook_resid_post", x + m)


def causal_mask(t_new: int, t_all: int, device: torch.device) -> Tensor:
    """[1, 1, t_new, t_all] bool: the last t_new of t_all tokens see themselves and every earlier token."""
    q = torch.arange(t_all - t_new, t_all, device=device)[:, None]
    return (torch.arange(t_all, device=device)[None, :] <= q)[None, None]


class OLMo2(HookedMixin, nn.Module):
    """OLMo-2 or OLMo-3 causal LM (config.model_type). `model(ids)` returns logits; see `forward` for positions,
    padding and partial runs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self._hooks: dict[str, list[HookFn]] = {}  # shared by reference with every block and norm
        # an explicit (uninitialised) weight: the default normal_() init costs seconds of torch._dynamo import
        # on the meta device, and load() / init_weights() overwrite it anyway
        self.embed = nn.Embedding(
            cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model)
        )
        self.blocks = nn.ModuleList(Block(cfg, layer, self._hooks) for layer in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.rms_norm_eps, self._hooks, "ln_final.hook_scale")
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tokenizer = None  # a tokenizers.Tokenizer when the checkpoint has tokenizer.json
        self.name_or_path: str | None = None
        self.chat_template: str | None = None  # tokenizer_config.json's chat_template (olmo_iv.chat renders it)
        self.special_tokens: dict[str, str] = {}  # its bos/eos/pad tokens, which templates may use

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def check_ids(self, ids: Tensor) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise OlmoIVError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)].unique()[:5].tolist()
            raise OlmoIVError(
                f"token ids {bad} are outside the vocabulary [0, {self.config.vocab_size}): was the input "
                "tokenized with this model's tokenizer?"
            )

    def attention_inputs(
        self, positions: Tensor, attention_mask: Tensor | None = None, past: int = 0
    ) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """(cos, sin, mask) for every block, for queries at RoPE `positions` [B, T] after `past` cached tokens.

        mask is a bool [B or 1, 1, T, past + T] (True = may attend), or None for plain causal attention, which lets
        SDPA take its fast path. Blocks of one attention type share the same tensors. Blocks can be run one by one
        with these (prefix sharing in patching starts mid-stack).
        """
        cfg = self.config
        T, device = positions.shape[1], positions.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        per_type = {}
        for kind in sorted(set(cfg.layer_types or ())):
            window = cfg.sliding_window if kind == "sliding_attention" else None
            per_type[kind] = (
                *rope_cos_sin(positions, *rope_frequencies(cfg, kind)),
                self._mask(T, past, attention_mask if padded else None, window, device),
            )
        return [per_type[kind] for kind in cfg.layer_types or ()]

    @staticmethod
    def _mask(
        T: int, past: int, attention_mask: Tensor | None, window: int | None, device: torch.device
    ) -> Tensor | None:
        windowed = window is not None and past + T > window  # some query has a key beyond its window
        if attention_mask is None and not windowed:
            return causal_mask(T, past + T, device) if past and T > 1 else None
        q_idx = torch.arange(past, past + T, device=device)[:, None]
        k_idx = torch.arange(past + T, device=device)[None, :]
        allowed = k_idx <= q_idx
        if windowed:  # the window counts indices (padding included), not RoPE positions, as transformers does
            allowed = allowed & (k_idx > q_idx - window)
        if attention_mask is None:
            return allowed[None, None]
        # not padding; a padding query still sees itself, so that no softmax row is empty
        return (allowed & attention_mask.bool()[:, None, None, :]) | (k_idx == q_idx)

    def forward(
        self,
        ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        logits_at: Tensor | int | None = None,
        start_at_layer: int = 0,
        resid: Tensor | None = None,
        stop_at_layer: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Run the model on token ids [B, T] (a 1-D tensor is treated as one row).

        attention_mask: [B, T_past + T], 1 for real tokens and 0 for padding (left or right). Right padding needs
            no mask at all: causality already keeps real tokens from seeing the padding after them.
        positions: RoPE positions [B, T]; by default counted over real tokens (cumsum of the mask), as HF does.
        logits_at: compute logits only at these positions, an int or a LongTensor [B] -> logits [B, V]. Most
            analyses need one position, and the unembedding dominates the cost of a short prompt.
        start_at_layer, resid: start at block `start_at_layer` from the residual `resid` [B, T, d] that enters it
            (prefix sharing in patching). `ids` still gives the shape and the positions.
        stop_at_layer: run blocks [start_at_layer, stop_at_layer) and return that residual instead of logits.
        kv_cache: keys/values of earlier tokens (generation); it is extended in place.
        """
        cfg, H = self.config, self._hooks
        if not isinstance(ids, Tensor):
            raise OlmoIVError(f"token ids must be a torch tensor [batch, tokens], got {type(ids).__name__}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise OlmoIVError(
                f"token ids must be a non-empty [batch, tokens] tensor, got shape {tuple(ids.shape)}"
            )
        B, T = ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > cfg.max_position_embeddings:
            raise OlmoIVError(
                f"{past + T} tokens exceed the model's context of max_position_embeddings="
                f"{cfg.max_position_embeddings}; shorten the input (or raise model.config.max_position_embeddings "
                "at your own risk)"
            )
        stop = cfg.n_layers if stop_at_layer is None else stop_at_layer
        if not 0 <= start_at_layer <= stop <= cfg.n_layers:
            raise OlmoIVError(
                f"start_at_layer={start_at_layer}, stop_at_layer={stop_at_layer}: need 0 <= start_at_layer <= "
                f"stop_at_layer <= n_layers={cfg.n_layers}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise OlmoIVError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected [{B}, {past + T}] "
                "(batch, cached + new tokens)"
            )
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                positions = torch.arange(past, past + T, device=ids.device).expand(B, T)
        layer_inputs = self.attention_inputs(positions, attention_mask, past)

        if start_at_layer == 0:
            self.check_ids(ids)
            x = self.embed(ids)
            if H:
                x = run_hooks(H, "hook_embed", x)
        else:
            if resid is None or tuple(resid.shape) != (B, T, cfg.d_model):
                got = "none" if resid is None else f"shape {tuple(resid.shape)}"
                raise OlmoIVError(
                    f"start_at_layer={start_at_layer} needs resid of shape [{B}, {T}, "
                    f"{cfg.d_model}] (batch, tokens, d_model), got {got}"
                )
            x = resid
        for layer in range(start_at_layer, stop):
            x = self.blocks[layer](x, *layer_inputs[layer], kv_cache)
        if stop_at_layer is not None:
            return x

        if isinstance(logits_at, int):
            if not -T <= logits_at < T:
                raise OlmoIVError(
                    f"logits_at={logits_at} is out of range for {T} tokens (use -{T} .. {T - 1})"
                )
            x = x[:, logits_at, None]  # [B, 1, d] so that the hooks see [batch, pos, ...] as everywhere else
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), self._logit_positions(logits_at, B, T).to(x.device), None]
        logits = self.unembed(x)
        return logits[:, 0] if logits_at is not None else logits

    @staticmethod
    def _logit_positions(logits_at: Tensor | int, B: int, T: int) -> Tensor:
        """logits_at as a LongTensor [B] of positions in [0, T), or a clear error."""
        at = torch.as_tensor(logits_at)
        if at.is_floating_point() or at.is_complex() or at.dtype == torch.bool:
            raise OlmoIVError(f"logits_at must be an int or an integer tensor, got dtype {at.dtype}")
        if at.dim() == 0:
            at = at.expand(B)
        if tuple(at.shape) != (B,):
            raise OlmoIVError(
                f"logits_at must be an int or one position per row (shape [{B}]), got {tuple(at.shape)}"
            )
        if bool(((at < -T) | (at >= T)).any()):
            raise OlmoIVError(f"logits_at={at.tolist()} is out of range for {T} tokens (use -{T} .. {T - 1})")
        return at % T

    def unembed(self, x: Tensor) -> Tensor:
        """Final norm and lm_head on residuals [B, T, d] -> logits [B, T, V] (with their hook points)."""
        H = self._hooks
        x = self.ln_final(x)
        if H:
            x = run_hooks(H, "ln_final.hook_normalized", x)
        logits = self.lm_head(x)
        if H:
            logits = run_hooks(H, "hook_logits", logits)
        return logits

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_weights(model: OLMo2, seed: int = 0, std: float = 0.02) -> OLMo2:
    """Random weights (normal(0, std) matrices, unit norms), for tests and for training the toy model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                p.mul_(1.0 / math.sqrt(2 * model.config.n_layers))
    return model
