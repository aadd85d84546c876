"""benchmarks/gpu_check.py: every part's options exist in its script, a dry run measures and records, and a part
over its time limit is killed with the processes it started."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def test_every_part_passes_only_options_its_script_defines():
    for part in gpu_check.PARTS:
        script = gpu_check.find_script(part)
        if script is None:
            assert part.name in ("sae", "steering")  # optional: run where their scripts exist
            continue
        defined = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', script.read_text())) | {"--out"}
        if part.name in ("sae", "steering") and not set(part.needs) <= defined:
            continue  # an optional part whose script lacks what it needs is skipped by gpu_check, saying why
        for args in (part.gpu_args, part.dry_args, part.needs):
            used = {a for a in args if a.startswith("--")}
            assert used <= defined, (part.name, used - defined)
    # the mandatory parts fit the 8-minute budget on their own
    assert sum(p.limit_s for p in gpu_check.PARTS if p.name not in ("sae", "steering")) <= gpu_check.BUDGET_S


def test_dry_run_measures_and_records(tmp_path):
    assert gpu_check.main(["--dry-run", "--only", "patching-7b", "--results", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu-check.json").read_text())
    assert record["dry_run"] and [p["status"] for p in record["parts"]] == ["ok"]
    result = json.loads((tmp_path / "patching-cuda-7b-3L-bf16.json").read_text())
    assert result["benchmark"] == "patching" and result["settings"]["layers_size"] == 3


def test_a_part_over_its_limit_is_killed_with_its_workers(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import subprocess, sys, time\n"
                      f"p = subprocess.Popen(['sleep', '60'])\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid))\n"
                      "time.sleep(60)\n")
    t0 = time.perf_counter()
    entry = gpu_check.run_part("slow", script, [], tmp_path / "out.json", 3, tmp_path / "slow.log")
    assert entry["status"] == "timed out after 3 s" and time.perf_counter() - t0 < 20
    pid = int((tmp_path / "pid").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
