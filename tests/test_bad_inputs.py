"""Every bad input a user can give gets one clear line and exit code 2: no traceback, no exit 0 on a
meaningless request, no silent wrong number. `python -m tests.test_bad_inputs` prints the table of the closing
note (each case run as a real `olmo-iv` process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.activations import NonFiniteError, extract
from olmo_iv.analysis.paths import PathConfig, trace
from olmo_iv.generate import generate
from olmo_iv.interventions.patching import layer_grid, patch_layers

# (arguments, a phrase the message must hold); "{tmp}" is a fresh folder, "{file}" an existing file,
# "{run}" a finished patching run, "{latin1}" a task file whose CSV is not UTF-8.
CASES = [
    (["patch", "--samples", "0"], "--samples 0: give at least 1"),
    (["patch", "--max-rank", "0"], "--max-rank 0: ranks start at 1"),
    (["patch", "--layers", "4"], "size 4 are not offered"),
    (["patch", "--sets", "1,4x"], "layer set '4x'"),
    (["patch", "--sets", "0-99", "--out", "{tmp}"], "layer 99 is out of range"),
    (["patch", "--task", "nope"], "unknown task"),
    (["patch", "--mode", "paper"], "mode 'paper'"),
    (["patch", "--target-pos", "7"], "target position '7'"),
    (["patch", "--mode", "reference", "--target-pos", "filler"], "only in the faithful mode"),
    (["patch", "--device", "cudaa", "--out", "{tmp}"], "not a torch device"),
    (["patch", "--device", "cuda:7", "--out", "{tmp}"], "cuda"),
    (["patch", "--dtype", "float33"], "float33"),
    (["patch", "--model", "/nonexistent/model", "--out", "{tmp}"], "no such directory"),
    (["patch", "--samples", "100000"], "samples"),
    (["patch", "--out", "{file}"], "is a file"),
    (["patch", "--out", "{file}/sub"], "inside a file"),
    (["patch", "--out", "/proc/olmo-iv-run"], "cannot write the run there"),
    (["stats", "{run}", "--alpha", "2"], "--alpha 2.0: give a value in (0, 1)"),
    (["stats", "{run}", "--alpha", "0"], "--alpha 0.0"),
    (["stats", "{run}", "--n-boot", "-3"], "--n-boot -3"),
    (["stats", "{run}", "--confidence", "1.5"], "--confidence 1.5"),
    (["stats", "{run}", "--metric", "foo"], "--metric 'foo'"),
    (["stats", "{run}", "--fdr", "xx"], "--fdr 'xx'"),
    (["stats", "{run}", "--top", "0"], "--top 0"),
    (["stats", "{tmp}"], "no such run folder"),
    (["stats", "{run}", "--task", "nope"], "nope"),
    (["paths", "--samples", "2", "--sources", "99", "--out", "{tmp}"], "position 99 is outside"),
    (["paths", "--sources", "a:b"], "--sources 'a:b'"),
    (["paths", "--samples", "2", "--head-token", "999", "--out", "{tmp}"], "--head-token [999]: position 999 is outside"),
    (["paths", "--threshold", "0"], "--threshold 0"),
    (["paths", "--trace", "foo"], "path mode 'foo'"),
    (["paths", "--chunk", "0"], "--chunk 0"),
    (["paths", "--samples", "0"], "--samples 0"),
    (["probe", "--C", "-1"], "--C -1.0"),
    (["probe", "--test-size", "1.5"], "--test-size 1.5"),
    (["probe", "--batch-size", "0"], "--batch-size 0"),
    (["probe", "--dtype", "x"], "--dtype 'x'"),
    (["probe", "--model", "toy", "--layer", "99", "--task", "adj_comp", "--task", "can_fly", "--out", "{tmp}"],
     "--layer 99 is outside"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["eval", "--batch-size", "0"], "--batch-size 0"),
    (["eval", "--samples", "0"], "--samples 0"),
    (["eval", "--judge", "foo"], "unknown judge"),
    (["eval", "--judge", "http"], "--judge-url"),
    (["eval", "--mode", "x"], "unknown mode 'x'"),
    (["tasks", "nope"], "unknown task"),
    (["tasks", "adj_comp", "--mode", "x"], "unknown mode"),
    (["tasks", "mine/latin", "--tasks-file", "{latin1}"], "not UTF-8"),
    (["train-toy", "--which", "x"], "--which 'x'"),
    (["train-toy", "--steps", "0"], "--steps 0"),
    (["--threads", "0", "tasks"], "--threads 0"),
    (["steer", "format", "--layers", "a,b"], "--layers 'a,b'"),
    (["steer", "vectors", "--pairs", "{file}", "--batch-size", "0"], "--batch-size 0"),
    (["steer", "vectors", "--pairs", "{file}", "--position", "middle"], "--position 'middle'"),
    (["steer", "generate", "--vectors", "{tmp}", "--layer", "1", "--prompts", "{file}", "--max-new-tokens", "0"],
     "--max-new-tokens 0"),
    (["steer", "keywords", "--task", "both"], "--task 'both'"),
    (["steer", "length", "--coef", "nan"], "--coef nan"),
    (["steer", "length", "--levels", "0,9"], "--levels [0, 9]: give distinct levels among 0..4"),
    (["steer", "length", "--levels", "a"], "--levels 'a'"),
    (["steer", "layers", "--n-valid", "0"], "--n-valid 0"),
    (["steer", "compose", "--length-level", "7"], "--length-level 7"),
    (["steer", "format", "--min-perplexity", "0.5"], "--min-perplexity 0.5"),
    (["steer", "compose", "--length-coef", "nan"], "--length-coef nan"),
    (["steer", "compose", "--length-coef", "inf"], "--length-coef inf"),
    (["steer", "compose", "--length-layer", "4", "--out", "{tmp}"], "--length-layer 4"),
    (["steer", "layers", "--vectors-from", "toy", "--layers", "5"], "--layers [5]: layer 5 is outside 0..3"),
    (["ifeval", "--model", "toy", "--batch-size", "0"], "--batch-size 0"),
    (["saif", "run", "--k", "0"], "--k 0"),
    (["saif", "run", "--ks", "1,x"], "--ks '1,x'"),
    (["saif", "run", "--tau", "nan"], "--tau nan"),
    (["saif", "run", "--strengths", "2,0"], "--strengths 0"),
    (["saif", "run", "--strengths", "2,x"], "--strengths '2,x'"),
    (["saif", "run", "--n-train", "8", "--n-valid", "9"], "--n-valid 9"),
    (["saif", "run", "--types", "nope", "--out", "{tmp}"], "--types"),
    (["saif", "run", "--layer", "9", "--out", "{tmp}"], "--layer 9"),
    (["saif", "score", "--source", "nope", "--out", "{tmp}"], "nope"),
    (["saif", "score", "--sae", "{file}", "--out", "{tmp}"], "is not a folder"),
    (["saif", "steer", "--run", "{tmp}", "--type", "x", "--prompts", "{file}"], "no summary.json"),
    (["saif", "bridge", "--ks", "a"], "--ks 'a'"),
    (["sweep", "{tmp}/none.toml"], "no such spec file"),
    (["sweep", "{file}"], "give a .toml, .yaml or .yml file"),
    (["sweep", "{file}", "--max-retries", "-1"], "--max-retries -1: give a value in [0, inf)"),
    (["sweep", "{file}", "--ray", "auto", "--cpus-per-unit", "0"], "--cpus-per-unit 0"),
]


def make_places(root: Path) -> Path:
    (root / "file").write_text("x")
    (root / "latin.csv").write_bytes("word,opposite\nchaud,froid\nété,hiver\n".encode("latin-1"))
    (root / "latin.json").write_text(json.dumps([{"name": "mine/latin", "csv": "latin.csv", "query_column": "word",
                                                  "answer_column": "opposite", "instruction": "Flip it."}]))
    from olmo_iv.runs.patch import PatchSettings, run_patching

    run_patching(PatchSettings(tasks=["animals/can_fly"], samples=6), root / "run")
    return root


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    return make_places(tmp_path_factory.mktemp("bad"))


def run_case(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of `olmo-iv ARGV`, run in this process as the console script runs it."""
    import contextlib
    import io

    from olmo_iv.cli import main

    err, old = io.StringIO(), sys.argv
    sys.argv = ["olmo-iv", *argv]
    try:
        with contextlib.redirect_stderr(err):
            main.app()
        code = 0
    except SystemExit as ex:
        code = int(ex.code or 0)
    finally:
        sys.argv = old
    return code, " ".join(err.getvalue().split())


def _args(args: list[str], places: Path, n: int) -> list[str]:
    subs = {"{tmp}": str(places / f"t{n}"), "{file}": str(places / "file"), "{run}": str(places / "run"),
            "{latin1}": str(places / "latin.json")}
    out = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


@pytest.mark.parametrize("n", range(len(CASES)))
def test_bad_input_is_one_clear_line(n, places):
    args, phrase = CASES[n]
    code, err = run_case(_args(args, places, n))
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error:") and phrase in err, err


# ------------------------------------------------------------------------------------------------ NaN


def _nan_checkpoint(folder: Path) -> Path:
    model = olmo_iv.load("toy")
    with torch.no_grad():
        model.blocks[2].attn.v_proj.weight[3, 5] = float("nan")
    return olmo_iv.save(model, folder)


@pytest.mark.parametrize("command", [["patch", "--samples", "2"], ["paths", "--samples", "1"],
                                     ["probe", "--task", "adj_comp", "--task", "can_fly"], ["eval", "--samples", "2"]])
def test_a_nan_weight_makes_every_command_fail_clearly(command, tmp_path, monkeypatch, capsys):
    from olmo_iv.cli import main

    bad = _nan_checkpoint(tmp_path / "nan")
    monkeypatch.setattr(sys, "argv", ["olmo-iv", *command, "--model", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as ex:
        main.app()
    err = " ".join(capsys.readouterr().err.split())
    assert ex.value.code == 2 and "v_proj" in err and "NaN" in err, err


def test_a_hook_that_injects_nan_is_caught_by_every_analysis():
    model = olmo_iv.load("toy")
    ids = torch.tensor(model.tokenizer.encode("Adjective: big. Answer:").ids)
    poison = {"blocks.2.hook_mlp_out": lambda x, name: x * float("nan")}
    with model.hooks(poison):
        with pytest.raises(NonFiniteError, match="first appear at blocks.2.hook_mlp_out"):
            patch_layers(model, [ids], [ids], [5], layer_grid(6, 1), target_pos=0)
        with pytest.raises(NonFiniteError, match="first appear at blocks.2.hook_mlp_out"):
            trace(model, ids, 5, PathConfig(threshold=10))
        with pytest.raises(NonFiniteError, match="first appear at blocks.2.hook_mlp_out"):
            extract(model, [ids], "hook_resid_post", layers=[4])
        with pytest.raises(NonFiniteError, match="first appear at blocks.2.hook_mlp_out"):
            generate(model, [ids.tolist()], max_new_tokens=2)
    with pytest.raises(OlmoIVError, match="float16"):  # fp16 overflow: the message says what to use instead
        half = olmo_iv.load("toy", dtype=torch.float16)
        with half.hooks({"blocks.1.hook_attn_out": lambda x, name: x * 1e6}):
            patch_layers(half, [ids], [ids], [5], layer_grid(6, 1), target_pos=0)


if __name__ == "__main__":  # the closing note's table
    import tempfile

    root = make_places(Path(tempfile.mkdtemp()))
    print("| command | exit | message |\n|---|---|---|")
    for n, (args, _) in enumerate(CASES):
        argv = _args(args, root, n)
        code, msg = run_case(argv)
        shown = " ".join(argv).replace(str(root), "DIR")
        print(f"| `olmo-iv {shown}` | {code} | {msg.replace(str(root), 'DIR').replace('|', '/')[:220]} |")
