"""Sweeps: spec expansion, the in-process executor against the single command, and a real two-node local Ray
cluster (ray.cluster_utils.Cluster): byte-equal merged results, a worker killed mid-unit, resume after a failure."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from olmo_iv import OlmoIVError
from olmo_iv.runs.patch import PATCHING, PatchSettings, run_patching
from olmo_iv.runs.store import RunFinished
from olmo_iv.runs.sweep import SweepOptions, expand, kinds, read_spec, run_sweep

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["adjectives/adj_comp", "animals/can_fly"]
# toy model, 2 tasks x 2 parts of 25 samples: 4 units, a fraction of a second each
SPEC = {"models": ["toy"], "tasks": TASKS, "samples": 30, "mode": "reference",
        "run": [{"command": "patch", "layers": 2}]}


def single_command_csv(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("single") / "run"
    run_patching(PatchSettings(models=["toy"], tasks=TASKS, samples=30, mode="reference", layers=2), out)
    return (out / "patching.csv").read_bytes()


@pytest.fixture(scope="module")
def reference_csv(tmp_path_factory) -> bytes:
    """patching.csv of `olmo-iv patch` with the spec's settings: what every executor must write."""
    return single_command_csv(tmp_path_factory)


# ------------------------------------------------------------------------------------------------- the spec


def test_spec_expands_to_a_grid(tmp_path):
    (tmp_path / "s.toml").write_text('models = ["toy", "toy-base"]\ntasks = ["adjectives/adj_comp"]\nsamples = 5\n'
                                     '[[run]]\ncommand = "patch"\nlayers = [1, 2]\n'
                                     '[[run]]\ncommand = "paths"\nname = "trace"\n')
    (tmp_path / "s.yaml").write_text("models: [toy, toy-base]\ntasks: [adjectives/adj_comp]\nsamples: 5\nrun:\n"
                                     "  - {command: patch, layers: [1, 2]}\n  - {command: paths, name: trace}\n")
    for name in ("s.toml", "s.yaml"):
        runs = expand(read_spec(tmp_path / name))
        assert [r.name for r in runs] == ["patch-layers1", "patch-layers2", "trace-toy-adj_comp",
                                          "trace-toy-base-adj_comp"]
        assert runs[0].settings.models == ["toy", "toy-base"] and runs[1].settings.layers == 2
        assert runs[2].settings.model == "toy" and runs[2].settings.samples == 5
    assert expand({"models": "toy", "run": [{"command": "patch"}]})[0].settings.models == ["toy"]
    with pytest.raises(OlmoIVError, match="top-level setting 'sample' belongs to no command"):
        expand({"sample": 3, "run": [{"command": "patch"}]})
    with pytest.raises(OlmoIVError, match="command 'pach' is not one of patch, paths, probe"):
        expand({"run": [{"command": "pach"}]})
    with pytest.raises(OlmoIVError, match=r"run 1 of the spec \(patch\) has no setting 'model'"):
        expand({"run": [{"command": "patch", "model": "toy"}]})
    with pytest.raises(OlmoIVError, match="no runs"):
        expand({"models": ["toy"]})
    with pytest.raises(OlmoIVError, match="both named 'patch'"):
        expand({"run": [{"command": "patch"}, {"command": "patch", "samples": 3}]})
    with pytest.raises(OlmoIVError, match="unknown task"):
        expand({"run": [{"command": "patch", "tasks": ["adjectives/nope"]}]})


def test_in_process_sweep_equals_the_single_command_and_resumes(tmp_path, reference_csv):
    run_dir = tmp_path / "sw" / "patch"

    def killer(label, advance, total):
        if any(run_dir.glob("units/*/done.json")):
            raise KeyboardInterrupt  # the sweep killed in the middle of its second unit

    with pytest.raises(KeyboardInterrupt):
        run_sweep(SPEC, tmp_path / "sw", progress=killer)
    done = {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("units/*/done.json")}
    assert 0 < len(done) < 4 and not (run_dir / "patching.csv").exists()
    summary = run_sweep(SPEC, tmp_path / "sw")  # started again: only the missing units
    assert {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("units/*/done.json")
            if p.parent.name in done} == done
    assert (run_dir / "patching.csv").read_bytes() == reference_csv
    assert summary["executor"] == "in-process" and summary["runs"][0]["files"][0] == "patch/patching.csv"
    assert summary["runs"][0]["verdict"][0]["task"] == TASKS[0]
    with pytest.raises(RunFinished, match="already holds this sweep run, finished"):
        run_sweep(SPEC, tmp_path / "sw")
    with pytest.raises(OlmoIVError, match=r"other settings .*samples: 30 -> 31"):
        run_sweep({**SPEC, "samples": 31}, tmp_path / "sw")


def test_paths_and_probe_runs_in_a_sweep(tmp_path):
    summary = run_sweep({"tasks": ["adjectives/adj_comp", "animals/can_fly"], "run": [
        {"command": "paths", "models": ["toy"], "tasks": ["animals/can_fly"], "samples": 2},
        {"command": "probe", "models": ["toy", "toy-base"]}]}, tmp_path / "sw")
    assert [r["name"] for r in summary["runs"]] == ["paths-toy-can_fly", "probe"]
    assert "paths-toy-can_fly/paths_per_token.csv" in summary["runs"][0]["files"]
    assert "probe/probe.csv" in summary["runs"][1]["files"]
    rows = list(csv.DictReader(open(tmp_path / "sw" / "probe" / "probe.csv")))
    assert {r["model"] for r in rows} == {"toy", "toy-base"}


def test_cli(tmp_path):
    from olmo_iv.cli.main import _typer_app

    spec = tmp_path / "toy.toml"
    spec.write_text('models = ["toy"]\ntasks = ["animals/can_fly"]\nsamples = 3\nmode = "reference"\n'
                    '[[run]]\ncommand = "patch"\nlayers = 1\n')
    result = CliRunner().invoke(_typer_app, ["sweep", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "patch (patch)" in result.output and "can_fly: layers" in result.output
    assert (tmp_path / "o" / "patch" / "patching.csv").exists()
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["runs"][0]["name"] == "patch"


def test_gpu_request_follows_the_models_size():
    from olmo_iv.runs.sweep import gpus_for, model_params

    n = model_params("toy")
    assert 100_000 < n < 10_000_000
    assert gpus_for("toy", "float32", "cpu", SweepOptions()) == 0
    assert gpus_for("toy", "bfloat16", "cuda:1", SweepOptions()) == 1
    assert gpus_for("toy", "bfloat16", "cuda", SweepOptions(gpus_per_unit=0.5)) == 0.5
    with pytest.raises(OlmoIVError, match="needs about .* GiB, more than one GPU's gpu_memory_gib=1e-06"):
        gpus_for("toy", "float32", "cuda", SweepOptions(gpu_memory_gib=1e-6))


# ------------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, one CPU each, started with Ray's own test utilities."""
    ray = pytest.importorskip("ray", reason="Ray is in the test extra: pip install -e '.[test]'")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    # workers import this checkout's tests (the fault test's unit function) and run one torch thread
    ray.init(address=c.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield c
    ray.shutdown()
    c.shutdown()


def test_ray_sweep_equals_in_process(tmp_path, cluster, reference_csv):
    summary = run_sweep(SPEC, tmp_path / "ray", options=SweepOptions(ray=cluster.address))
    assert summary["executor"].startswith("ray")
    assert (tmp_path / "ray" / "patch" / "patching.csv").read_bytes() == reference_csv
    assert not os.environ.get("RAY_ADDRESS")  # connecting did not turn later in-process sweeps into Ray ones
    # a request the cluster cannot meet is refused instead of waiting for ever
    with pytest.raises(OlmoIVError, match=r"asks Ray for 1 GPU\(s\) per worker, but the cluster has 0"):
        run_sweep({**SPEC, "device": "cuda"}, tmp_path / "gpu", options=SweepOptions(ray=cluster.address))
    with pytest.raises(OlmoIVError, match="cpus_per_unit=3: the Ray cluster has 2 CPUs"):
        run_sweep(SPEC, tmp_path / "cpu", options=SweepOptions(ray=cluster.address, cpus_per_unit=3))


def _dies_once(marker: str, out: str, settings, unit, model, progress=None):
    """Patching's unit, except that the first unit 0001 kills its own worker process half-way through writing
    its rows (as a worker lost mid-unit would leave it); the marker file records that it happened."""
    payload = PATCHING.do(settings, unit, model, progress)
    if unit.id.endswith("__0001") and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        half = Path(out) / "units" / unit.id / "rows.csv"
        half.parent.mkdir(parents=True, exist_ok=True)
        half.write_text(payload["rows.csv"][: len(payload["rows.csv"]) // 2])
        os._exit(1)
    return payload


def dying(marker: Path, run_dir: Path) -> dict:
    return {**kinds(), "patch": dataclasses.replace(PATCHING, do=functools.partial(_dies_once, str(marker),
                                                                                  str(run_dir)))}


def test_a_worker_killed_mid_unit_is_retried(tmp_path, cluster, reference_csv):
    marker = tmp_path / "killed"
    run_sweep(SPEC, tmp_path / "f", options=SweepOptions(ray=cluster.address, max_retries=2),
              known=dying(marker, tmp_path / "f" / "patch"))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker process died
    text = (tmp_path / "f" / "patch" / "patching.csv").read_bytes()
    assert text == reference_csv
    rows = list(csv.DictReader(text.decode().splitlines()))
    assert len({(r["model"], r["task"], r["sample"], r["layers"]) for r in rows}) == len(rows) == 2 * 30 * 21


def test_a_failed_ray_sweep_resumes_with_the_missing_units(tmp_path, cluster, reference_csv):
    marker = tmp_path / "killed"
    run_dir = tmp_path / "r" / "patch"
    with pytest.raises(OlmoIVError, match=r"its worker died 1 times \(max_retries=0\)"):
        run_sweep(SPEC, tmp_path / "r", options=SweepOptions(ray=cluster.address, max_retries=0),
                  known=dying(marker, run_dir))
    assert not (run_dir / "units" / "toy__adjectives_adj_comp__pos0__0001" / "done.json").exists()
    done = {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("units/*/done.json")}
    run_sweep(SPEC, tmp_path / "r", options=SweepOptions(ray=cluster.address))
    assert {k: v for k, v in ((p.parent.name, p.stat().st_mtime_ns) for p in run_dir.glob("units/*/done.json"))
            if k in done} == done  # what was done is not done again
    assert (run_dir / "patching.csv").read_bytes() == reference_csv
