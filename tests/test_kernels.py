"""The path-tracing ops: torch impls against the materialised matrices of the reference, Triton impls (run on CPU
by the Triton interpreter) against the torch impls, and torch.library.opcheck on both."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmo_iv.kernels import ops

triton = pytest.importorskip("triton")


def _interpreted() -> bool:
    """Whether this process's Triton runs kernels in the interpreter. TRITON_INTERPRET is read when a function is
    decorated, and triton is imported at startup here (conftest's use_deterministic_algorithms imports inductor,
    which imports triton), so the variable must be set before the process starts: the Triton tests run in a
    subprocess started by test_interpreter_subprocess."""
    return type(triton.language.standard.zeros).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def tk():
    if not _interpreted():
        pytest.skip("Triton tests run in the TRITON_INTERPRET=1 subprocess of test_interpreter_subprocess")
    from olmo_iv.kernels import triton_kernels

    return triton_kernels


def test_interpreter_subprocess():
    """Run this file's Triton tests (names containing 'triton') under TRITON_INTERPRET=1 in a fresh process."""
    if _interpreted():
        pytest.skip("already interpreted: the Triton tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-k", "triton",
                           "-p", "no:cacheprovider"], cwd=root, env=env, capture_output=True, text=True)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "skipped" not in proc.stdout and re.search(r"\b8 passed\b", proc.stdout), tail  # all 8 Triton tests


def step_inputs(P=37, d=48, F=80, T=5, H=4, H_kv=2, dh=16, seed=0):
    """Random path_step arguments; sizes deliberately not multiples of the Triton tiles."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(v=r(P, d), tok=torch.randint(0, T, (P,), generator=g), skip=torch.randint(0, 2, (P,), generator=g).float(),
                coef=torch.rand(P, H, generator=g), s_att=r(T, d), s_mlp=r(T, d), act_g=r(T, F),
                w_v=r(H_kv * dh, d) / 7, w_o=r(d, H * dh) / 8, w_up=r(F, d) / 7, w_down=r(d, F) / 9)


def explicit_step(a: dict) -> torch.Tensor:
    """(I + S_mlp M_t)(skip I + S_att sum_h coef_h W_O^h W_V^h) v, with every matrix materialised per row, as the
    reference builds its d x d M[l][t]."""
    H = a["coef"].shape[1]
    d = a["v"].shape[1]
    dh = a["w_o"].shape[1] // H
    rep = H // (a["w_v"].shape[0] // dh)
    out = []
    for p in range(a["v"].shape[0]):
        t = int(a["tok"][p])
        ov = sum(a["coef"][p, h] * a["w_o"][:, h * dh : (h + 1) * dh] @ a["w_v"][(h // rep) * dh : (h // rep + 1) * dh]
                 for h in range(H))
        attn = a["skip"][p] * torch.eye(d) + torch.diag(a["s_att"][t]) @ ov
        M = a["w_down"] @ torch.diag(a["act_g"][t]) @ a["w_up"]
        out.append((torch.eye(d) + torch.diag(a["s_mlp"][t]) @ M) @ attn @ a["v"][p])
    return torch.stack(out)


def test_torch_ops_equal_materialised_matrices():
    a = step_inputs()
    torch.testing.assert_close(ops.path_step(**a), explicit_step(a), atol=1e-4, rtol=1e-5)
    mlp = ops.frozen_mlp(a["v"], a["tok"], a["act_g"], a["w_up"], a["w_down"])
    M = [a["w_down"] @ torch.diag(a["act_g"][t]) @ a["w_up"] for t in a["tok"].tolist()]
    torch.testing.assert_close(mlp, torch.stack([m @ v for m, v in zip(M, a["v"], strict=True)]), atol=1e-5, rtol=1e-5)
    y, w = torch.randn(6, 40) * 3, torch.randn(40)
    s = ops.norm_scale(y, w, 1e-6)
    torch.testing.assert_close(s * y, w * (y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [dict(), dict(P=1, H=2, H_kv=2, dh=16, d=32), dict(P=70, H=4, H_kv=1, F=33)])
def test_triton_path_step_equals_torch(tk, shape):
    a = step_inputs(**shape)
    torch.testing.assert_close(tk.path_step(**a), ops.path_step_torch(**a), atol=1e-5, rtol=1e-5)


def test_triton_mlp_and_norm_equal_torch(tk):
    a = step_inputs(P=21, F=100)
    args = (a["v"], a["tok"], a["act_g"], a["w_up"], a["w_down"])
    torch.testing.assert_close(tk.frozen_mlp(*args), ops.frozen_mlp_torch(*args), atol=1e-5, rtol=1e-5)
    for n, d in ((5, 48), (3, 1500)):  # 1500 > the kernel's 1024-wide block: two passes over the row
        y, w = torch.randn(n, d) * 2, torch.randn(d)
        torch.testing.assert_close(tk.norm_scale(y, w, 1e-6), ops.norm_scale_torch(y, w, 1e-6), atol=1e-6, rtol=1e-6)


def test_triton_gemm_epilogues_each_alone(tk):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(19, 40, generator=g), torch.randn(23, 40, generator=g)
    s, idx = torch.randn(4, 23, generator=g), torch.randint(0, 4, (19,), generator=g)
    r, alpha = torch.randn(19, 23, generator=g), torch.randn(19, generator=g)
    c = a @ b.T
    close = lambda x, y: torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)  # noqa: E731
    close(tk.fused_gemm(a, b), c)
    close(tk.fused_gemm(a, b, scale=s, idx=idx), c * s[idx])
    close(tk.fused_gemm(a, b, resid=r), c + r)
    close(tk.fused_gemm(a, b, resid=r, alpha=alpha), c + alpha[:, None] * r)
    assert tk.fused_gemm(a[:0], b).shape == (0, 23)


def _ops_args():
    a = step_inputs(P=9)
    return {
        "norm_scale": (torch.randn(5, 48), torch.randn(48), 1e-6),
        "frozen_mlp": (a["v"], a["tok"], a["act_g"], a["w_up"], a["w_down"]),
        "path_step": tuple(a.values()),
    }


@pytest.mark.parametrize("name", ["norm_scale", "frozen_mlp", "path_step"])
def test_opcheck_torch_impls(name):
    torch.library.opcheck(getattr(ops, name), _ops_args()[name])


_TRITON_TEST_OPS: dict = {}


@pytest.mark.parametrize("name", ["norm_scale", "frozen_mlp", "path_step"])
def test_opcheck_triton_impls(tk, name):
    """The Triton launchers wrapped as ops of their own (CPU tensors, interpreter), with the real ops' fakes."""
    if name not in _TRITON_TEST_OPS:
        op = torch.library.custom_op(f"olmo_iv_test::{name}_triton", getattr(tk, name), mutates_args=())
        op.register_fake(functools.partial(_fake, name))
        _TRITON_TEST_OPS[name] = op
    args = _ops_args()[name]
    op = _TRITON_TEST_OPS[name]
    torch.library.opcheck(op, args)
    torch.testing.assert_close(op(*args), getattr(ops, name)(*args), atol=1e-5, rtol=1e-5)


def _fake(name, *args):
    if name == "norm_scale":
        return args[0].new_empty(args[0].shape, dtype=torch.float32)
    if name == "frozen_mlp":
        return args[0].new_empty((args[0].shape[0], args[4].shape[0]))
    return args[0].new_empty(args[0].shape)


def test_cpu_dispatch_runs_the_torch_impl():
    import olmo_iv.kernels as K

    if not torch.cuda.is_available():
        assert K.TRITON_ON_CUDA is False  # triton is not even imported on a CPU-only machine
    a = step_inputs(P=4)
    assert torch.equal(ops.path_step(**a), ops.path_step_torch(**a))
