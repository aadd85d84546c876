"""Triton implementations of the path-tracing ops, registered for CUDA by olmo_iv/kernels/__init__.py.

Two kernels do all the work:
- `_norm_scale_kernel`: one program per row; sum of squares over d, then w * 1/sqrt(mean + eps).
- `_fused_gemm_kernel`: out = (A' @ B^T) * S[idx[m], n] + alpha[m] * R[m, n], where A' is A itself or, for the
  attention output projection, the kv-head activations expanded to query heads and weighted by coef[m, head]
  while they are loaded (so the [P, H*dh] expansion is never written). Each optional piece is a constexpr flag.

The frozen-gate MLP is two of these (up with the act(g) gather, down), the path step four (W_V; W_O with the head
weights, the S_att gather and the skip; W_up; W_down with the S_mlp gather and the residual). A single fused
MLP kernel would need the [rows, F] intermediate in SRAM, which does not fit for F = 8192; fusing the gathers,
scales and residuals into the GEMM epilogues removes every extra pass over memory instead.

All dots run in IEEE fp32 (no TF32): path values must match the plain-torch ops to fp32 rounding.
The launchers accept CPU tensors when TRITON_INTERPRET=1 was set before triton was imported (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from olmo_iv.kernels.ops import check_step_shapes


@triton.jit
def _norm_scale_kernel(y_ptr, w_ptr, out_ptr, D, stride_y, stride_o, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        y = tl.load(y_ptr + row * stride_y + cols, mask=cols < D, other=0.0).to(tl.float32)
        acc += y * y
    inv = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / D + eps)  # correctly rounded, not the approximate rsqrt
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, w * inv, mask=cols < D)


@triton.jit
def _fused_gemm_kernel(
    a_ptr, b_ptr, out_ptr, coef_ptr, s_ptr, idx_ptr, r_ptr, alpha_ptr,
    M, N, K,
    stride_am, stride_bn, stride_om, stride_cm, stride_s, stride_rm,
    HEAD_DIM: tl.constexpr, REP: tl.constexpr,
    HEADS: tl.constexpr, SCALE: tl.constexpr, RESID: tl.constexpr, ALPHA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A [M, *] and B [N, K] are row-major with unit column stride (the launcher makes them so).
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        mk = m_ok[:, None] & k_ok[None, :]
        if HEADS:  # logical column k = (query head h, dim i) reads kv column (h // REP, i), weighted by coef[m, h]
            head = rk // HEAD_DIM
            col = (head // REP) * HEAD_DIM + rk % HEAD_DIM
            a = tl.load(a_ptr + rm[:, None] * stride_am + col[None, :], mask=mk, other=0.0)
            a = a * tl.load(coef_ptr + rm[:, None] * stride_cm + head[None, :], mask=mk, other=0.0)
        else:
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=mk, other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    mn = m_ok[:, None] & n_ok[None, :]
    if SCALE:  # per-token diagonal, gathered by each row's target token
        row = tl.load(idx_ptr + rm, mask=m_ok, other=0)
        acc = acc * tl.load(s_ptr + row[:, None] * stride_s + rn[None, :], mask=mn, other=0.0)
    if RESID:
        r = tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mn, other=0.0)
        if ALPHA:
            r = r * tl.load(alpha_ptr + rm, mask=m_ok, other=0.0)[:, None]
        acc += r
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=mn)


def _blocks(M: int, N: int) -> tuple[int, int, int, int]:
    """Tile sizes (BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small row counts get a short M tile."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    return bm, 64 if N >= 64 else 32, 32, 4


def fused_gemm(
    a: Tensor,
    b: Tensor,
    *,
    scale: Tensor | None = None,
    idx: Tensor | None = None,
    resid: Tensor | None = None,
    alpha: Tensor | None = None,
    coef: Tensor | None = None,
    head_dim: int = 1,
) -> Tensor:
    """(A' @ B^T) * scale[idx] + alpha[:, None] * resid; A' = A, or A's kv heads expanded and weighted by coef.

    a [M, K] (or [M, H_kv*dh] with coef [M, H], logical K = H*dh); b [N, K]; scale [T, N] with idx [M];
    resid [M, N]; alpha [M]. All fp32; the result is a new fp32 [M, N] tensor.
    """
    a, b = a.contiguous(), b.contiguous()
    M, N, K = a.shape[0], b.shape[0], b.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=torch.float32)
    if M == 0:
        return out
    heads = coef is not None
    rep = 1
    if heads:
        coef = coef.contiguous()
        rep = coef.shape[1] // (a.shape[1] // head_dim)
    else:
        torch._check(a.shape[1] == K, lambda: f"fused_gemm: a has {a.shape[1]} columns, b has {K}")
    scale = scale.contiguous() if scale is not None else None
    idx = idx.contiguous() if idx is not None else None
    resid = resid.contiguous() if resid is not None else None
    alpha = alpha.contiguous() if alpha is not None else None
    dummy = out  # pointer for the arguments a flag switches off (never read)
    bm, bn, bk, warps = _blocks(M, N)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _fused_gemm_kernel[grid](
        a, b, out, coef if heads else dummy, scale if scale is not None else dummy,
        idx if idx is not None else dummy, resid if resid is not None else dummy,
        alpha if alpha is not None else dummy,
        M, N, K, a.stride(0), b.stride(0), out.stride(0), coef.stride(0) if heads else 0,
        scale.stride(0) if scale is not None else 0, resid.stride(0) if resid is not None else 0,
        HEAD_DIM=head_dim, REP=rep, HEADS=heads, SCALE=scale is not None, RESID=resid is not None,
        ALPHA=alpha is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    return out


def norm_scale(y: Tensor, w: Tensor, eps: float) -> Tensor:
    """Triton impl of olmo_iv::norm_scale."""
    y = y.contiguous()
    out = torch.empty(y.shape, device=y.device, dtype=torch.float32)
    if y.shape[0]:
        D = y.shape[1]
        _norm_scale_kernel[(y.shape[0],)](y, w.contiguous(), out, D, y.stride(0), out.stride(0), float(eps),
                                          BLOCK_D=min(1024, triton.next_power_of_2(D)))
    return out


def frozen_mlp(v: Tensor, tok: Tensor, act_g: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Triton impl of olmo_iv::frozen_mlp: the act(g) gather is fused into the up-projection."""
    return fused_gemm(fused_gemm(v, w_up, scale=act_g, idx=tok), w_down)


def path_step(v: Tensor, tok: Tensor, skip: Tensor, coef: Tensor, s_att: Tensor, s_mlp: Tensor, act_g: Tensor,
              w_v: Tensor, w_o: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Triton impl of olmo_iv::path_step: four GEMMs with the head weights, gathers and skips fused in."""
    check_step_shapes(v, tok, skip, coef, s_att, s_mlp, act_g, w_v, w_o, w_up, w_down)
    dh = w_o.shape[1] // coef.shape[1]
    z = fused_gemm(v, w_v)  # [P, H_kv*dh]
    u = fused_gemm(z, w_o, coef=coef, head_dim=dh, scale=s_att, idx=tok, resid=v, alpha=skip)
    h = fused_gemm(u, w_up, scale=act_g, idx=tok)
    return fused_gemm(h, w_down, scale=s_mlp, idx=tok, resid=u)
