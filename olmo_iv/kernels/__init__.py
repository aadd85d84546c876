"""Custom ops of path tracing: `torch.ops.olmo_iv.{norm_scale, frozen_mlp, path_step}`.

The plain-torch implementations (ops.py) serve every device; on a machine with CUDA and Triton, the fused Triton
kernels (triton_kernels.py) are registered for CUDA tensors. Set OLMO_IV_TRITON=0 to keep the torch ones there.
Triton is imported only when CUDA is available, so CPU-only runs never pay for it (and tests can import it
themselves under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

from olmo_iv.kernels.ops import (
    frozen_mlp,
    frozen_mlp_torch,
    norm_scale,
    norm_scale_torch,
    path_step,
    path_step_torch,
)


def _register_triton() -> bool:
    if os.environ.get("OLMO_IV_TRITON", "1") == "0" or not torch.cuda.is_available():
        return False
    try:
        from olmo_iv.kernels import triton_kernels as tk
    except ImportError:  # no triton in this environment: the torch impls serve CUDA too
        return False
    norm_scale.register_kernel("cuda")(tk.norm_scale)
    frozen_mlp.register_kernel("cuda")(tk.frozen_mlp)
    path_step.register_kernel("cuda")(tk.path_step)
    return True


TRITON_ON_CUDA: bool = _register_triton()
"""Whether CUDA tensors run the Triton kernels."""

__all__ = ["TRITON_ON_CUDA", "frozen_mlp", "frozen_mlp_torch", "norm_scale", "norm_scale_torch", "path_step",
           "path_step_torch"]
