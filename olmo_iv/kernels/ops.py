"""Custom ops of path tracing, as `torch.library` ops in the "olmo_iv" namespace, with plain-torch impls.

The locally-linear surrogate of a block at the observed input (docs/paths.md) needs three pieces:

    norm_scale(y, w, eps)        s = w * rsqrt(mean(y^2) + eps) per row      RMSNorm(y) == s * y at y
    frozen_mlp(v, tok, act_g, ...)   W_down (act_g[tok] * (W_up v))          MLP(h_t) == M_t h_t at h_t
    path_step(v, tok, skip, coef, ...)  (I + S_mlp M)(skip*I + S_att sum_h coef_h W_O^h W_V^h) v

Every row of a batch carries its own target token `tok` (the index into the per-token tables s_att, s_mlp,
act_g), so one call steps a whole frontier chunk at a layer, whatever tokens its paths go to: the weights are
shared by all tokens, only the per-token diagonals differ, and those are gathered per row. A call with a constant
`tok` is the per-(layer, token) step. Nothing d x d is ever materialised.

The `*_torch` functions here are the reference (CPU) implementations and run on any device that has no other
kernel; olmo_iv/kernels/__init__.py registers the fused Triton kernels of triton_kernels.py for CUDA. Fake impls give the
output shapes, so the ops pass `torch.library.opcheck` (fake tensors, AOT dispatch). No autograd: path tracing is
inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def norm_scale_torch(y: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm as a per-row diagonal: [N, d] -> fp32 [N, d], s = w * rsqrt(mean(y^2) + eps).

    Computed in fp32 as OLMo-2's norm is, so RMSNorm(y) == s * y at the observed y.
    """
    y = y.float()
    return w.float() * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


norm_scale = torch.library.custom_op("olmo_iv::norm_scale", norm_scale_torch, mutates_args=())


@norm_scale.register_fake
def _(y: Tensor, w: Tensor, eps: float) -> Tensor:
    torch._check(y.dim() == 2 and w.dim() == 1 and y.shape[1] == w.shape[0], lambda: "norm_scale: y [N, d], w [d]")
    return y.new_empty(y.shape, dtype=torch.float32)


def frozen_mlp_torch(v: Tensor, tok: Tensor, act_g: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The gated MLP with its gate frozen, on a batch of vectors: [P, d] -> [P, d].

    out[p] = W_down (act_g[tok[p]] * (W_up v[p])), where act_g [T, F] holds act(gate) observed at each token
    (silu(g) for SwiGLU, a 0/1 mask for ReLU). tok [P] int64; w_up [F, d]; w_down [d, F].
    """
    return ((v @ w_up.T) * act_g[tok]) @ w_down.T


frozen_mlp = torch.library.custom_op("olmo_iv::frozen_mlp", frozen_mlp_torch, mutates_args=())


@frozen_mlp.register_fake
def _(v: Tensor, tok: Tensor, act_g: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    torch._check(v.dim() == 2 and tok.shape == (v.shape[0],), lambda: "frozen_mlp: v [P, d], tok [P]")
    torch._check(w_up.shape == (act_g.shape[1], v.shape[1]), lambda: "frozen_mlp: w_up [F, d], act_g [T, F]")
    return v.new_empty((v.shape[0], w_down.shape[0]))


def path_step_torch(
    v: Tensor,
    tok: Tensor,
    skip: Tensor,
    coef: Tensor,
    s_att: Tensor,
    s_mlp: Tensor,
    act_g: Tensor,
    w_v: Tensor,
    w_o: Tensor,
    w_up: Tensor,
    w_down: Tensor,
) -> Tensor:
    """One block of the surrogate on a batch of path vectors: [P, d] -> [P, d].

        u = skip[p] * v + s_att[tok] * sum_h coef[p, h] * W_O^h W_V^{kv(h)} v        (attention edge)
        out = u + s_mlp[tok] * W_down (act_g[tok] * (W_up u))                        (MLP, always with its skip)

    v [P, d]; tok [P] int64 target tokens; skip [P] and coef [P, H] fp32 (the per-edge identity weight and
    per-head weights, which the tracing mode sets); s_att, s_mlp [T, d]; act_g [T, F]; w_v [H_kv*dh, d] (v_proj,
    GQA: query head h reads kv head h // (H/H_kv)); w_o [d, H*dh]; w_up [F, d]; w_down [d, F].
    """
    P, H = coef.shape
    dh = w_o.shape[1] // H
    z = (v @ w_v.T).view(P, -1, 1, dh)  # [P, H_kv, 1, dh]
    z = z.expand(-1, -1, H // z.shape[1], -1).reshape(P, H, dh) * coef[:, :, None]  # kv head -> its query heads
    u = skip[:, None] * v + s_att[tok] * (z.reshape(P, H * dh) @ w_o.T)
    return u + s_mlp[tok] * frozen_mlp_torch(u, tok, act_g, w_up, w_down)


path_step = torch.library.custom_op("olmo_iv::path_step", path_step_torch, mutates_args=())


@path_step.register_fake
def _(v, tok, skip, coef, s_att, s_mlp, act_g, w_v, w_o, w_up, w_down) -> Tensor:
    check_step_shapes(v, tok, skip, coef, s_att, s_mlp, act_g, w_v, w_o, w_up, w_down)
    return v.new_empty(v.shape)


def check_step_shapes(v, tok, skip, coef, s_att, s_mlp, act_g, w_v, w_o, w_up, w_down) -> None:
    """The shape contract of path_step (shared by the fake impl and the Triton launcher)."""
    P, d = v.shape
    H = coef.shape[1]
    torch._check(tok.shape == (P,) and skip.shape == (P,) and coef.shape[0] == P, lambda: "path_step: rows of P")
    torch._check(w_o.shape[0] == d and w_o.shape[1] % H == 0, lambda: "path_step: w_o [d, H*dh]")
    dh = w_o.shape[1] // H
    torch._check(w_v.shape[1] == d and w_v.shape[0] % dh == 0, lambda: "path_step: w_v [H_kv*dh, d]")
    torch._check(H % (w_v.shape[0] // dh) == 0, lambda: "path_step: H must be a multiple of H_kv")
    torch._check(s_att.shape == s_mlp.shape and s_att.shape[1] == d, lambda: "path_step: s_att, s_mlp [T, d]")
    torch._check(w_up.shape == (act_g.shape[1], d) and w_down.shape == (d, act_g.shape[1]),
                 lambda: "path_step: w_up [F, d], w_down [d, F], act_g [T, F]")

