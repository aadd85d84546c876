"""Issue 18: sweep scaling on Ray. A 16-unit toy sweep on a local two-node Ray cluster (ray.cluster_utils.Cluster,
one CPU per node), run with 1 worker and with 2, cluster start excluded.

The toy units ("spin") do a fixed amount of real work each: `--matmuls` fp32 products of two 512 x 512 matrices
on one torch thread (about 1 s on a quiet core), then write their result through the run store; the merge
concatenates them in plan order. So the measurement is of the sweep machinery (actors, scheduling, the store,
the merge), not of one command's speed. Per worker count, each round runs the whole sweep into a fresh folder:

- wall: `run_sweep` from its call to its return (actor start, units, merge);
- units wall: the executor's part of that (summary timings "units (this invocation)");
- units phase: from the first unit's start to the last unit's end;
- start-up: from the call to the first unit's start (the expansion, the store, the workers' process start and
  imports): paid once per worker, not per unit;
- scheduling overhead per unit: (time from the first unit's start to the last unit's end) x workers, minus the
  units' own seconds (measured inside each unit), over the units: dispatch, result transfer, the store's writes
  and idle waiting. The same with the start-up included is reported beside it.

The merged files of every run are checked to be byte-identical.

    python benchmarks/bench_sweep.py                 # writes benchmarks/results/sweep-cpu.json
    python benchmarks/bench_sweep.py --sleep 0.6 --out benchmarks/results/sweep-cpu-sleep.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import RESULTS, machine, save_result

from olmo_iv.runs.store import RunStore
from olmo_iv.runs.sweep import SweepOptions, kinds, run_sweep
from olmo_iv.runs.units import RunKind, Unit


@dataclass
class SpinSettings:
    """A toy run: `units` units of `matmuls` 512 x 512 fp32 products each."""

    units: int = 16
    """Units in the run."""
    matmuls: int = 100
    """Products per unit (the unit's size)."""
    sleep_s: float = 0.0
    """When > 0, each unit sleeps this long instead of multiplying: a unit that waits (as a GPU unit waits on
    its device) needs no CPU, so this measures the machinery alone, whatever else the machine's cores are doing."""
    device: str = "cpu"
    """Where the products run."""


def _plan(settings: SpinSettings) -> list[Unit]:
    return [Unit(f"spin__{k:04d}", "spin", "spin", "", {"k": k}) for k in range(settings.units)]


def _load(settings: SpinSettings, model: str, device: str) -> None:
    return None  # no model: the units need none


def _do(settings: SpinSettings, unit: Unit, model, progress=None) -> dict[str, str]:
    start = time.time()  # wall clock, comparable across the worker processes of this machine
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(unit.data["k"])
    a = torch.randn(512, 512, generator=gen)
    b = torch.randn(512, 512, generator=gen) / 512**0.5
    if settings.sleep_s > 0:
        time.sleep(settings.sleep_s)
    else:
        for _ in range(settings.matmuls):
            a = torch.tanh(a @ b)
    return {"row.csv": f"{unit.data['k']},{float(a.sum()):.6e}\n",
            "seconds.txt": f"{time.perf_counter() - t0:.6f} {start:.6f} {time.time():.6f}"}


def _merge(store: RunStore, settings: SpinSettings, units: list[Unit], timings: dict) -> dict:
    store.write_text("spin.csv", "unit,sum\n" + "".join(store.read(u.id, "row.csv") for u in units))
    summary = {"files": ["spin.csv"], "timings_s": timings}
    store.write_json("summary.json", summary)  # the sweep reads each run's own summary file
    store.finish()
    return summary


SPIN = RunKind(name="spin", store_kind="spin", settings_type=SpinSettings, plan=_plan, load=_load, do=_do,
               merge=_merge, models=lambda s: [])


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=16)
    p.add_argument("--matmuls", type=int, default=100, help="products of 512 x 512 per unit (the unit's size)")
    p.add_argument("--sleep", type=float, default=0.0, help="units sleep this many seconds instead (no CPU used)")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--rounds", type=int, default=2, help="sweeps per worker count (median reported)")
    p.add_argument("--out", type=Path, default=RESULTS / "sweep-cpu.json")
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    here = Path(__file__).resolve().parent
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # workers import this module (the spin units) and run one torch thread each
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]),
                                       "OMP_NUM_THREADS": "1"}})
    cluster_start = time.perf_counter() - t0
    spec = {"units": args.units, "matmuls": args.matmuls, "sleep_s": args.sleep, "run": [{"command": "spin"}]}
    known = {**kinds(), "spin": SPIN}
    rows, merged = [], set()
    try:
        with tempfile.TemporaryDirectory(prefix="olmo_iv_sweep_bench_") as tmp:
            for workers in [int(w) for w in args.workers.split(",")]:
                for r in range(args.rounds):
                    out = Path(tmp) / f"w{workers}-r{r}"
                    load_before = loadavg()
                    t, t_wall = time.perf_counter(), time.time()
                    summary = run_sweep(spec, out, known=known, options=SweepOptions(
                        ray=cluster.address, workers_per_model=workers, max_retries=0))
                    wall = time.perf_counter() - t
                    units_wall = summary["timings_s"]["units (this invocation)"]
                    times = [[float(x) for x in (out / "spin" / "units" / f"spin__{k:04d}" / "seconds.txt")
                              .read_text().split()] for k in range(args.units)]
                    work = sum(t[0] for t in times)
                    first_start = min(t[1] for t in times)
                    last_end = max(t[2] for t in times)
                    merged.add((out / "spin" / "spin.csv").read_bytes())
                    rows.append({"workers": workers, "round": r, "wall_s": round(wall, 3),
                                 "units_wall_s": units_wall, "merge_s": summary["timings_s"]["merge"],
                                 "startup_s": round(first_start - t_wall, 3),
                                 "units_phase_s": round(last_end - first_start, 3),
                                 "unit_seconds_sum": round(work, 3),
                                 "unit_seconds_median": round(statistics.median(t[0] for t in times), 3),
                                 "overhead_per_unit_s": round(((last_end - first_start) * workers - work)
                                                              / args.units, 4),
                                 "overhead_per_unit_with_startup_s": round((units_wall * workers - work)
                                                                           / args.units, 3),
                                 "loadavg_before": load_before, "loadavg_after": loadavg()})
                    print(f"workers {workers} round {r}: wall {wall:.2f} s (start-up {rows[-1]['startup_s']:.2f} s, "
                          f"units {units_wall:.2f} s, units' own work {work:.2f} s), scheduling overhead "
                          f"{rows[-1]['overhead_per_unit_s']:.3f} s/unit "
                          f"({rows[-1]['overhead_per_unit_with_startup_s']:.3f} with start-up), "
                          f"load {load_before} -> {rows[-1]['loadavg_after']}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if len(merged) != 1:
        sys.exit("the merged spin.csv differs between runs: not reporting")
    med = {w: statistics.median(r["wall_s"] for r in rows if r["workers"] == w) for w in {r["workers"] for r in rows}}
    phase = {w: statistics.median(r["units_phase_s"] for r in rows if r["workers"] == w) for w in med}
    result = {"cluster_start_s": round(cluster_start, 3), "rounds": rows,
              "median_wall_s": {str(w): round(v, 3) for w, v in sorted(med.items())},
              "speedup_2_over_1": round(med[1] / med[2], 3) if 1 in med and 2 in med else None,
              "speedup_2_over_1_units_phase": round(phase[1] / phase[2], 3) if 1 in phase and 2 in phase else None,
              "median_overhead_per_unit_s": {str(w): statistics.median(r["overhead_per_unit_s"] for r in rows
                                                                       if r["workers"] == w) for w in sorted(med)},
              "median_startup_s": {str(w): statistics.median(r["startup_s"] for r in rows if r["workers"] == w)
                                   for w in sorted(med)},
              "merged_identical": True}
    save_result(args.out, "sweep", vars(args) | {"out": str(args.out)}, result, "cpu")
    print(f"cluster start {cluster_start:.1f} s (excluded); median wall {result['median_wall_s']}; speedup "
          f"{result['speedup_2_over_1']}x (units phase {result['speedup_2_over_1_units_phase']}x); overhead per unit {result['median_overhead_per_unit_s']}; "
          f"machine {machine('cpu').get('cpu', '')}")


if __name__ == "__main__":
    main()
