"""Helpers for the tests that kill a run with SIGKILL and continue it: start a library entry point in a
subprocess, kill it once some units are done, and compare the run folders' units."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def done_markers(run: Path) -> dict[str, tuple[int, int, str]]:
    """unit -> (inode, mtime, content) of its done marker: a unit written again gets a new file (atomic rename)."""
    out = {}
    for p in sorted(run.glob("units/*/done.json")):
        st = p.stat()
        out[p.parent.name] = (st.st_ino, st.st_mtime_ns, p.read_text())
    return out


def payloads(run: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(run.glob("units/*/*"))
            if p.name != "done.json"}


def kill_after(driver: str, args: list[str], out: Path, units: int, timeout: float = 120) -> None:
    """Run `python -c driver *args` and SIGKILL it as soon as `units` units of the run in `out` are done."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", driver, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while len(list(out.glob("units/*/done.json"))) < units and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
