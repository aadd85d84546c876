"""A training run killed with SIGKILL at an arbitrary moment, then resumed, ends with exactly the weights of an
uninterrupted run (CPU, same thread count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# The library entry point (what `olmo-iv sae train` calls), in a subprocess that can be SIGKILLed. Not the CLI
# itself: importing every command module costs seconds per start on a shared 2-core machine.
DRIVER = """
import sys
from olmo_iv.runs.sae import SAETrainSettings, train_run
from olmo_iv.sae.train import TrainConfig
tc = TrainConfig(steps=200, batch_size=256, checkpoint_every=4, log_every=5, expansion=4, k=8, auxk_alpha=0.1,
                 dead_tokens=2000)
s = SAETrainSettings(model="toy", hook_name="blocks.2.hook_resid_post", max_windows=200, context_size=32,
                     windows_per_buffer=16, eval_windows=0, train=tc)
train_run(s, sys.argv[1])
"""


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-c", DRIVER, str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    full = tmp_path / "full"
    subprocess.run(_cmd(full), env=_env(), cwd=ROOT, check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(killed.glob("units/*/done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # land somewhere inside the run, maybe inside a checkpoint write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    assert list(killed.glob("units/checkpoint-*/done.json")) and not (killed / "summary.json").exists()

    # the same command on the same folder continues from the last checkpoint
    done = subprocess.run(_cmd(killed), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((killed / "summary.json").read_text())
    assert 0 < run["resumed_at_step"] < 200
    a = load_file(str(full / "sae" / "sae_weights.safetensors"))
    b = load_file(str(killed / "sae" / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (full / "history.json").read_text() == (killed / "history.json").read_text()
