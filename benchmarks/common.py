"""Shared pieces of the benchmarks: model shapes, random checkpoints saved by transformers, the machine's
description and matmul throughput, timing, peak memory, analytic GEMM FLOPs and isolated worker processes.

Every implementation is measured in its own subprocess (`run_worker`), so that one's allocations cannot inflate
another's peak memory and each starts from the same state.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from olmo_iv.errors import OlmoIVError
from olmo_iv.io import versions, write_json

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """Widths of a random OLMo-2 model (MHA, head_dim = d_model / n_heads, untied embeddings)."""

    name: str
    n_layers: int
    """Decoder blocks."""
    d_model: int
    """Residual width."""
    n_heads: int
    """Query (= key/value) heads."""
    d_mlp: int
    """Hidden width of the gated MLP."""
    vocab_size: int = 100352
    """OLMo-2's padded vocabulary."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def with_layers(self, n_layers: int) -> Shape:
        return Shape(self.name if n_layers == self.n_layers else f"{self.name}-{n_layers}L", n_layers,
                     self.d_model, self.n_heads, self.d_mlp, self.vocab_size)


SHAPES = {
    "1b": Shape("1b", 16, 2048, 16, 8192),  # OLMo-2-0425-1B
    "7b": Shape("7b", 32, 4096, 32, 11008),  # OLMo-2-1124-7B
    "small": Shape("small", 16, 512, 8, 2048),  # issue 5's CPU shape: 1B depth, small widths, the real vocabulary
    "tiny": Shape("tiny", 4, 64, 4, 128, vocab_size=300),  # smoke tests
}


# ---------------------------------------------------------------------------------------------- checkpoints


def make_checkpoint(shape: Shape, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    cache_dir: Path | None = None) -> Path:
    """A random `Olmo2ForCausalLM` of this shape written by `save_pretrained`, cached by (shape, seed, dtype).

    The norm weights are perturbed (all-ones would hide mix-ups between implementations). Built on `device` (a
    7B model initialises in seconds on a GPU), written to a temporary folder and renamed, so a killed run never
    leaves half a checkpoint behind.
    """
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "olmo_iv_bench")
    dname = str(dtype).removeprefix("torch.")
    folder = cache_dir / f"{shape.name}-L{shape.n_layers}-d{shape.d_model}-v{shape.vocab_size}-s{seed}-{dname}"
    if (folder / "config.json").exists():
        return folder
    cfg = Olmo2Config(vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
                      num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                      num_key_value_heads=shape.n_heads, rms_norm_eps=1e-6, rope_theta=500000.0,
                      tie_word_embeddings=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Olmo2ForCausalLM._from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    tmp = cache_dir / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    del hf
    os.replace(tmp, folder)
    return folder


def load_hf(folder: Path, dtype: torch.dtype, device: str):
    """transformers' Olmo2ForCausalLM from the checkpoint, in eval mode, with its default (SDPA) attention."""
    from transformers import Olmo2ForCausalLM

    return Olmo2ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- the machine


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, threads torch uses, memory, GPU, load average."""
    info: dict[str, Any] = {"cpu": _lscpu().get("Model name", platform.processor() or "unknown"),
                            "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                            "memory_gib": round(_meminfo().get("MemTotal", 0) / 2**20, 1),
                            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (empty off Linux)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_gflops(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """The machine's own dense matmul throughput: best of `repeats` n x n @ n x n products (2 n^3 FLOPs each),
    after one warm-up. n = 2048 on CPU (a few tenths of a second), 8192 on a GPU."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    t = timeit(lambda: a @ b, device, warmup=1, repeats=repeats)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "gflops": round(2 * n**3 / t["best_s"] / 1e9, 1)}


# ---------------------------------------------------------------------------------------------- measuring


def timeit(fn: Callable[[], Any], device: str, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Wall-clock seconds of `fn()` (device synchronised): median and best of `repeats` after `warmup` calls."""
    for _ in range(warmup):
        fn()
        sync(device)
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "best_s": min(runs), "runs_s": [round(r, 5) for r in runs]}


class PeakMemory:
    """Peak memory used inside the `with` block above what was in use when it was entered.

    CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() at entry: tensor bytes only (no CUDA context,
    no allocator cache). CPU: the process's peak resident set (VmHWM, reset at entry through
    /proc/self/clear_refs) minus its resident set at entry: every byte the process touched, tensors, allocator
    caches and Python objects alike. Where clear_refs cannot be written, the peak since the process started
    (ru_maxrss) is used, which is only right when the block's peak exceeds everything before it.
    """

    def __init__(self, device: str) -> None:
        self.device, self.bytes, self.method = device, 0, ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated above the allocated bytes at the start"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.method = "peak RSS (VmHWM, reset via /proc/self/clear_refs) above the RSS at the start"
            except OSError:
                self.method = "ru_maxrss (peak since process start) above the RSS at the start"
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            import resource

            peak = _status_kib("VmHWM") * 1024 if "VmHWM" in self.method else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.bytes = max(0, peak - self.base)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OlmoIVError(f"/proc/self/status has no {field}: CPU peak memory is measured on Linux only")


# ---------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Run:
    """A batch of identical forward pieces: `rows` sequences of `seq_len` tokens through `blocks` blocks, then
    the unembedding at `logit_positions` positions of each row."""

    rows: int
    seq_len: int
    blocks: int
    logit_positions: int


def gemm_flops(shape: Shape, runs: list[Run], *, attention: bool = True) -> int:
    """Executed matrix-multiply FLOPs (2 per multiply-add). Per token per block: 2 d (q+k+v+o widths) for the
    attention projections and 2 * 3 d d_mlp for the gated MLP; per sequence per block: 4 T^2 H dh for QK^T and
    PV (the dense square: causal kernels may skip part of it); per logit position: 2 d V for the unembedding.
    Norms, RoPE, softmax and the activation are not counted; `attention=False` leaves out QK^T and PV as well
    (torch's FlopCounterMode does not count the CPU flash-attention kernel)."""
    d, h, dh = shape.d_model, shape.n_heads, shape.head_dim
    per_token = 2 * d * (4 * h * dh) + 2 * 3 * d * shape.d_mlp
    total = 0
    for r in runs:
        per_block = r.seq_len * per_token + (4 * r.seq_len**2 * h * dh if attention else 0)
        total += r.rows * (r.blocks * per_block + r.logit_positions * 2 * d * shape.vocab_size)
    return total


# ---------------------------------------------------------------------------------------------- processes, files


def run_worker(script: str | Path, spec: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Run `python script --worker SPEC.json` in a fresh process and return the dict it writes to spec['out']."""
    with tempfile.TemporaryDirectory(prefix="olmo_iv_bench_") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json"), "tensors": str(Path(tmp) / "tensors.pt")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(script), "--worker", str(spec_path)], timeout=timeout,
                              env={**os.environ, "PYTHONPATH": _pythonpath()})
        if proc.returncode != 0:
            raise OlmoIVError(f"the {spec.get('method')} worker failed (exit {proc.returncode}); see its output above")
        result = json.loads(Path(spec["out"]).read_text())
        if Path(spec["tensors"]).exists():
            result["tensors"] = torch.load(spec["tensors"])
        return result


def _pythonpath() -> str:
    """The repository root first, so that workers import this checkout's olmo_iv and benchmarks/common.py."""
    root = str(Path(__file__).resolve().parent.parent)
    here = str(Path(__file__).resolve().parent)
    return os.pathsep.join([root, here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def worker_spec(argv: list[str]) -> dict[str, Any] | None:
    """The spec when this process was started as a worker (`--worker SPEC.json`), else None."""
    if len(argv) == 3 and argv[1] == "--worker":
        return json.loads(Path(argv[2]).read_text())
    return None


def finish_worker(spec: dict[str, Any], result: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    if tensors is not None:
        torch.save(tensors, spec["tensors"])
    write_json(spec["out"], result)


def save_result(path: Path, bench: str, settings: dict[str, Any], payload: dict[str, Any], device: str) -> Path:
    """The JSON beside the printed table: date, machine, versions, settings and the measured numbers."""
    record = {"benchmark": bench, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(device), "versions": _versions(), "settings": settings, **payload}
    return write_json(path, record)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = versions()
    root = Path(__file__).resolve().parent.parent
    try:  # the commit measured, and whether the working tree differed from it
        git = ["git", "-C", str(root)]
        out["git_commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        out["git_dirty"] = str(bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    for name in ("transformers", "nnsight"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def shape_dict(shape: Shape) -> dict[str, Any]:
    return {**asdict(shape), "head_dim": shape.head_dim}


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
