"""`olmo-iv patch` runs: files, resume after a kill, settings checks, the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from olmo_iv import OlmoIVError
from olmo_iv.runs.patch import PatchSettings, run_patching
from olmo_iv.runs.store import RunFinished
from tests.conftest import make_olmo2_vocab_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 4-layer model with OLMo-2's vocabulary and an OLMo-2-equivalent tokenizer."""
    return make_olmo2_vocab_checkpoint(tmp_path_factory, n_layers=4)


def settings(checkpoint, **kw):
    base = dict(models=[checkpoint], tasks=["adjectives/adj_comp", "animals/can_fly"], samples=30, layers=2,
                mode="reference")
    return PatchSettings(**{**base, **kw})


def test_run_writes_every_row_and_resumes_after_a_kill(tmp_path, checkpoint):
    s = settings(checkpoint)
    whole = run_patching(s, tmp_path / "whole")
    rows = list(csv.DictReader(open(tmp_path / "whole" / "patching.csv")))
    assert len(rows) == 2 * 30 * 10  # tasks x samples x (6 pairs + 4 singles)
    keys = {(r["task"], r["sample"], r["layers"]) for r in rows}
    assert len(keys) == len(rows)
    first = rows[0]
    assert first["mode"] == "reference" and first["target_pos"] == "0" and first["query"] == "big"
    assert float(first["rr_diff"]) == pytest.approx(float(first["rr_patched"]) - float(first["rr_target"]))
    assert whole["top10"][0]["metric"] == "rr_diff" and len(whole["top10"][0]["top"]) == 10
    assert (tmp_path / "whole" / "heatmap_rr_diff_pos0.png").stat().st_size > 1000

    calls = {"n": 0}

    def killer(description, advance, total):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the middle of a part

    with pytest.raises(KeyboardInterrupt):
        run_patching(s, tmp_path / "killed", progress=killer)
    assert not (tmp_path / "killed" / "patching.csv").exists()
    run_patching(s, tmp_path / "killed")  # the same settings continue where the run stopped
    assert (tmp_path / "killed" / "patching.csv").read_bytes() == (tmp_path / "whole" / "patching.csv").read_bytes()
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["top10"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["top10"]
    assert summary["settings"]["samples"] == 30 and "torch" in summary["versions"]
    # a finished run says so and where its files are; overwrite=True computes it again
    with pytest.raises(RunFinished, match="finished; its results are in .*patching.csv.*overwrite=True"):
        run_patching(s, tmp_path / "killed")
    run_patching(s, tmp_path / "killed", overwrite=True)
    assert (tmp_path / "killed" / "patching.csv").read_bytes() == (tmp_path / "whole" / "patching.csv").read_bytes()


def test_other_settings_in_the_folder_are_refused(tmp_path, checkpoint):
    run_patching(settings(checkpoint, samples=2, layers=1), tmp_path / "run")
    with pytest.raises(OlmoIVError, match=r"other settings \(settings.layers: 1 -> 2"):
        run_patching(settings(checkpoint, samples=2, layers=2), tmp_path / "run")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(OlmoIVError, match="not empty"):
        run_patching(settings(checkpoint, samples=2), tmp_path / "junk")


def test_faithful_mode_patches_the_filler(tmp_path, checkpoint):
    run_patching(settings(checkpoint, mode="faithful", samples=3, layers=1), tmp_path / "f")
    rows = list(csv.DictReader(open(tmp_path / "f" / "patching.csv")))
    assert {r["target_pos"] for r in rows} == {"filler"} and {r["mode"] for r in rows} == {"faithful"}
    assert all(float(r["rr_target"]) >= 0 for r in rows)  # RR 0, not -1, beyond max_rank


def test_settings_errors(checkpoint):
    with pytest.raises(OlmoIVError, match="only in the faithful mode"):
        settings(checkpoint, target_pos=["filler"])
    assert PatchSettings(models=[checkpoint]).target_pos == ["filler"]  # the default mode is faithful
    with pytest.raises(OlmoIVError, match="size 4 are not offered"):
        settings(checkpoint, layers=4)
    with pytest.raises(OlmoIVError, match="unknown task"):
        settings(checkpoint, tasks=["adjectives/nope"])


def test_explicit_sets_and_out_of_range_layer(tmp_path, checkpoint):
    run_patching(settings(checkpoint, samples=2, sets=["0-3", "2", "1-2-3"]), tmp_path / "s")
    rows = list(csv.DictReader(open(tmp_path / "s" / "patching.csv")))
    assert [r["layers"] for r in rows[:3]] == ["0-3", "2", "1-2-3"] and len(rows) == 2 * 2 * 3
    with pytest.raises(OlmoIVError, match="layer 4 is out of range: this model has layers 0..3"):
        run_patching(settings(checkpoint, samples=2, sets=["1-4"]), tmp_path / "bad")
    with pytest.raises(OlmoIVError, match="write layers joined by"):
        settings(checkpoint, sets=["1,4"])


def test_cli(tmp_path, checkpoint):
    from olmo_iv.cli.main import _typer_app

    result = CliRunner().invoke(_typer_app, ["patch", "--model", checkpoint, "--task", "animals/anim_color",
                                             "--samples", "3", "--layers", "1", "--mode", "reference",
                                             "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "Where do the instruction vectors live?" in result.output and "anim_color: layers" in result.output
    assert "top-10 by mean rr_diff" not in result.output and (tmp_path / "c" / "patching.csv").exists()
    tables = CliRunner().invoke(_typer_app, ["patch", "--model", checkpoint, "--task", "animals/anim_color",
                                             "--samples", "3", "--layers", "1", "--mode", "reference", "--tables",
                                             "--out", str(tmp_path / "c"), "--overwrite"])
    assert tables.exit_code == 0 and "top-10 by mean rr_diff" in tables.output


def test_verdict_interval_is_the_percentile_bootstrap_of_the_mean():
    import numpy as np
    from scipy import stats

    from olmo_iv.runs.patch import verdict

    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.3, 100)
    table = {"model": np.array(["m"] * 200), "task": np.array(["t"] * 200), "target_pos": np.array(["0"] * 200),
             "layers": np.array(["0-1"] * 100 + ["0"] * 100), "rr_diff": np.concatenate([x, x - 0.2])}
    (v,) = verdict(table, n_boot=4000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(1)).confidence_interval
    assert v["layers"] == "0-1" and v["best_single"] == "0" and v["n"] == 100
    assert v["mean"] == pytest.approx(x.mean()) and v["best_single_mean"] == pytest.approx(x.mean() - 0.2)
    assert (v["ci_low"], v["ci_high"]) == pytest.approx((ref.low, ref.high), abs=0.01)  # other draws: noise only
