"""Every GPU measurement the project still owes (docs/benchmarks.md), in one command, within 8 minutes on one
H100 or H200. Each part runs its benchmark script in its own process group with its own time limit; a part
that fails or runs out of time is recorded as such and the next one starts. The JSON results go to
benchmarks/results/ (each script's own record), and gpu-check.json lists what each part did.

Parts (GPU sizes; --dry-run runs each at a tiny size on the CPU, to check the wiring):

  forward       bench_forward.py: the OLMo-2-1B-shaped forward pass, bf16, ours against transformers
  patching-1b   bench_patching.py: the 1B 2-layer grid (136 sets) on 100 samples, bf16 (target: under 5 s)
  patching-7b   bench_patching.py: the 7B 3-layer grid (4,960 sets), bf16, ours, on --samples-7b samples
                (100 would take the whole budget if the per-sample time were 5 s; the JSON has s/sample)
  paths         bench_paths.py: path tracing on 1B- and 7B-shaped models, Triton kernels and plain torch
  sae           bench_sae.py, where it exists and takes --device: SAE training
  steering      bench_steer*.py, where it exists and takes --device: steering

    python benchmarks/gpu_check.py                 # on the GPU machine: writes benchmarks/results/*-cuda*.json
    python benchmarks/gpu_check.py --dry-run       # CPU, tiny sizes, results in a temporary folder
    python benchmarks/gpu_check.py --only forward,paths --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUDGET_S = 480
"""The whole check's limit: 8 minutes."""


@dataclass(frozen=True)
class Part:
    """One measurement: a benchmark script with its GPU and dry-run arguments and its time limit."""

    name: str
    script: str
    """A file name in benchmarks/, or a glob (the first match runs): a part whose script is missing is skipped."""
    gpu_args: list[str]
    dry_args: list[str]
    limit_s: float
    """Its share of the budget on the GPU (creating the random checkpoint included)."""
    out: str
    """Its result file name (passed as --out)."""
    needs: list[str] = field(default_factory=list)
    """Options the script must offer besides those passed (every option passed is checked against the script's
    --help, else the part is skipped, saying which): a script that cannot run on a GPU is not run as if it
    could, and a script whose options changed is not run with the wrong ones."""


PARTS = [
    Part("forward", "bench_forward.py", ["--device", "cuda", "--dtype", "bf16", "--shape", "1b", "--rounds", "1"],
         ["--device", "cpu", "--shape", "tiny", "--layers", "2", "--batch", "1", "--seq-len", "8", "--repeats", "1",
          "--rounds", "1"], 75, "forward-cuda-1b-bf16.json"),
    Part("patching-1b", "bench_patching.py",
         ["--device", "cuda", "--dtype", "bf16", "--shape", "1b", "--samples", "100", "--rounds", "1"],
         ["--device", "cpu", "--shape", "tiny", "--samples", "2", "--samples-b", "1", "--methods", "ours,nnsight-b-last",
          "--rounds", "1"], 90, "patching-cuda-1b-2L-bf16.json"),
    Part("patching-7b", "bench_patching.py",
         ["--device", "cuda", "--dtype", "bf16", "--shape", "7b", "--layers-size", "3", "--methods", "ours",
          "--rounds", "1"],
         ["--device", "cpu", "--shape", "tiny", "--layers-size", "3", "--methods", "ours", "--samples", "2",
          "--rounds", "1"], 150, "patching-cuda-7b-3L-bf16.json"),
    Part("paths", "bench_paths.py", ["--device", "cuda"],
         ["--device", "cpu", "--gpu-shapes", "tiny", "--direct-paths", "20", "--fast-paths", "100", "--gpu-paths",
          "200", "--threads", "1"], 120, "paths-cuda.json"),
    Part("sae", "bench_sae.py", ["--device", "cuda"], ["--device", "cpu", "--steps", "1"], 45, "sae-cuda.json",
         needs=["--device", "--out", "--steps"]),
    Part("steering", "bench_steer*.py", ["--device", "cuda", "--shape", "1b"],
         ["--device", "cpu", "--shape", "tiny", "--prompts", "2", "--new-tokens", "4", "--recompute-tokens", "2",
          "--layer", "1", "--repeats", "1"], 45, "steering-cuda.json", needs=["--device", "--out"]),
]
assert sum(p.limit_s for p in PARTS) <= BUDGET_S + 45  # the optional parts share the tail of the budget


def find_script(part: Part) -> Path | None:
    matches = sorted(HERE.glob(part.script))
    return matches[0] if matches else None


def missing_options(script: Path, options: list[str]) -> list[str]:
    """The options `script --help` does not mention."""
    if not options:
        return []
    try:
        text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              timeout=120).stdout
    except subprocess.TimeoutExpired:
        return options
    return [o for o in options if o not in text]


def run_part(name: str, script: Path, args: list[str], out: Path, limit_s: float, log: Path) -> dict:
    """Run one part's script in its own process group (its benchmark's worker processes included), killed as a
    group at `limit_s`."""
    cmd = [sys.executable, str(script), *args, "--out", str(out)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE.parent)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and every worker it started
            proc.wait()
            status = f"timed out after {limit_s:.0f} s"
    tail = log.read_text().splitlines()[-15:]
    return {"part": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "command": cmd[1:], "result": str(out) if out.exists() else None, "log": str(log), "output_tail": tail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part at a tiny size on the CPU (checks the wiring)")
    p.add_argument("--only", default=None, help=f"comma-separated parts ({','.join(q.name for q in PARTS)})")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    p.add_argument("--part-limit", type=float, default=None, help="each part's limit (default: its own share)")
    p.add_argument("--samples-7b", type=int, default=20, help="samples of the 7B 3-layer grid")
    p.add_argument("--results", type=Path, default=None,
                   help="where the JSON goes (default benchmarks/results, or a temporary folder with --dry-run)")
    args = p.parse_args(argv)
    parts = PARTS
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {q.name for q in PARTS}]
        if unknown:
            p.error(f"unknown part {unknown[0]!r}: choose from {', '.join(q.name for q in PARTS)}")
        parts = [q for q in PARTS if q.name in names]
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here: run on the GPU machine, or pass --dry-run")
    results = args.results or (Path(tempfile.mkdtemp(prefix="olmo_iv_gpu_check_")) if args.dry_run else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    logs = results / "gpu-check-logs"
    logs.mkdir(exist_ok=True)
    deadline = time.perf_counter() + args.budget
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "budget_s": args.budget, "parts": []}
    for part in parts:
        script = find_script(part)
        left = deadline - time.perf_counter()
        if script is None:
            entry = {"part": part.name, "status": f"skipped: no benchmarks/{part.script}"}
        elif missing := missing_options(script, [a for a in dict.fromkeys(
                (part.dry_args if args.dry_run else part.gpu_args) + ["--out", *part.needs]) if a.startswith("--")]):
            entry = {"part": part.name, "status": f"skipped: {script.name} has no {', '.join(missing)} option"}
        elif left < 10:
            entry = {"part": part.name, "status": "skipped: the budget is spent"}
        else:
            extra = []
            if part.name == "patching-7b":
                extra = ["--samples", str(args.samples_7b)] if not args.dry_run else []
            limit = min(args.part_limit or part.limit_s, left)
            entry = run_part(part.name, script, (part.dry_args if args.dry_run else part.gpu_args) + extra,
                             results / part.out, limit, logs / f"{part.name}.log")
        print(f"{part.name:>12}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else ""),
              flush=True)
        record["parts"].append(entry)
    (results / "gpu-check.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {results / 'gpu-check.json'}")
    return 0 if all(e["status"] == "ok" or e["status"].startswith("skipped: no ") or "has no" in e["status"]
                    for e in record["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
