"""Shared I/O helpers: atomic writes and the CPU thread calibration."""

from __future__ import annotations

import os

import pytest
import torch

from olmo_iv import OlmoIVError
from olmo_iv.io import atomic_write, auto_cpu_threads


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "a" / "f.txt"
    atomic_write(path, lambda tmp: tmp.write_text("one"))

    def dies(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    atomic_write(path, lambda tmp: (tmp.write_text("two"), os.chmod(tmp, 0o600)))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_thread_calibration(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert auto_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(OlmoIVError, match="positive number"):
            auto_cpu_threads(0)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        chosen = auto_cpu_threads()
        assert chosen in (1, 2) and torch.get_num_threads() == chosen
        monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two vCPUs: one thread, without a timing gamble
        torch.set_num_threads(2)
        assert auto_cpu_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting is respected, not measured
        torch.set_num_threads(2)
        assert auto_cpu_threads() == 2
    finally:
        torch.set_num_threads(before)
