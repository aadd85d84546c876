"""Atomic file writes and run metadata shared by every command that writes results."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A process killed at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create 0600 files; give the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def versions() -> dict[str, str]:
    """Versions of the software that produced a result, recorded with every output."""
    import numpy
    import torch

    import olmo_iv

    out = {"olmo_iv": olmo_iv.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "numpy": numpy.__version__, "platform": platform.platform(),
           "torch_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def auto_cpu_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count: `threads` if given; else 1 on a machine with at most 2 cores (shared or
    hyper-threaded vCPUs, where a second thread made the toy patching run 2-50x slower in our measurements); else
    torch's default if a representative small GEMM runs at least 1.5x faster with it than with 1 thread (median of
    9 timings each), and 1 otherwise. OMP_NUM_THREADS, when set, is respected. Returns the count in force;
    results record it."""
    import statistics
    import time

    import torch

    if threads is not None:
        if threads < 1:
            raise OlmoIVError(f"threads={threads}: give a positive number of threads")
        torch.set_num_threads(threads)
        return threads
    if os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() == 1:
        return torch.get_num_threads()  # the user decided
    default = torch.get_num_threads()
    if (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)
        return 1
    a, w = torch.randn(1024, 256), torch.randn(1024, 256)

    def median_time(n: int) -> float:
        torch.set_num_threads(n)
        torch.nn.functional.linear(a, w)
        times = []
        for _ in range(9):
            t = time.perf_counter()
            torch.nn.functional.linear(a, w)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    chosen = default if 1.5 * median_time(default) <= median_time(1) else 1
    torch.set_num_threads(chosen)
    return chosen
