"""The run store: resume, refusal of other settings or other weights, failed starts, finished runs; and the
foundations' invariants (no matplotlib backend switch, no CLI flags in library messages, one extractor)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.activations import NonFiniteError, answer_rank, extract, iter_token_activations
from olmo_iv.model import ModelConfig, OLMo2, init_weights
from olmo_iv.runs.patch import PatchSettings, run_patching
from olmo_iv.runs.store import RunFinished, RunStore, fingerprint, slug

ROOT = Path(__file__).resolve().parents[1]


def test_units_resume_and_finish(tmp_path):
    store = RunStore.open(tmp_path / "r", "test", {"a": 1})
    store.complete("u1", {"rows.csv": "x\n", "meta.json": {"k": 1}})
    assert store.done("u1") and not store.done("u2") and store.read_json("u1", "meta.json") == {"k": 1}
    again = RunStore.open(tmp_path / "r", "test", {"a": 1})  # same settings: continues
    assert again.done("u1")
    again.write_text("out.txt", "done")
    again.finish()
    with pytest.raises(RunFinished, match=r"finished; its results are in .*out.txt.*overwrite=True"):
        RunStore.open(tmp_path / "r", "test", {"a": 1})
    with pytest.raises(OlmoIVError, match=r"other settings \(settings.a: 1 -> 2\)"):
        RunStore.open(tmp_path / "r", "test", {"a": 2})
    fresh = RunStore.open(tmp_path / "r", "test", {"a": 2}, overwrite=True)
    assert not fresh.done("u1") and not (tmp_path / "r" / "out.txt").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(OlmoIVError, match="not empty and holds no olmo-iv run"):
        RunStore.open(tmp_path / "junk", "test", {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(OlmoIVError, match="is a file"):
        RunStore.open(tmp_path / "file", "test", {})
    assert slug("allenai/OLMo-2 1B") == "allenai_OLMo-2_1B"


def test_a_start_with_no_finished_unit_never_blocks(tmp_path):
    RunStore.open(tmp_path / "r", "test", {"device": "cudaa"})  # e.g. failed on the device right after
    store = RunStore.open(tmp_path / "r", "test", {"device": "cpu"})
    assert json.loads((tmp_path / "r" / "run.json").read_text())["settings"] == {"device": "cpu"}
    assert store.units_done() == []


def _checkpoint(path: Path, seed: int) -> str:
    tok_model = olmo_iv.load("toy")
    model = init_weights(OLMo2(tok_model.config), seed=seed)
    model.tokenizer = tok_model.tokenizer
    olmo_iv.save(model, path)
    return str(path)


def test_resume_refuses_a_checkpoint_rebuilt_in_place(tmp_path):
    ckpt = _checkpoint(tmp_path / "model", seed=0)
    fp = fingerprint(ckpt)
    assert fingerprint(ckpt) == fp  # deterministic
    s = PatchSettings(models=[ckpt], tasks=["animals/can_fly"], samples=30, layers=1, mode="reference")

    rows = [0]

    def killer(task, advance, total):
        rows[0] += advance
        if rows[0] > 25 * 6:  # in the second unit (25 samples x 6 layers each)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_patching(s, tmp_path / "run", progress=killer)
    _checkpoint(tmp_path / "model", seed=1)  # rebuilt in place: same path, same shapes, other weights
    assert fingerprint(ckpt)["weights"] != fp["weights"] and fingerprint(ckpt)["config.json"] == fp["config.json"]
    with pytest.raises(OlmoIVError, match=r"weights or files of a checkpoint changed.*weights"):
        run_patching(s, tmp_path / "run")


def test_failed_start_on_a_bad_device_then_the_corrected_command(tmp_path):
    ckpt = _checkpoint(tmp_path / "model", seed=0)
    bad = PatchSettings(models=[ckpt], tasks=["animals/can_fly"], samples=2, layers=1, device="cuda:7")
    with pytest.raises(OlmoIVError, match="device"):
        run_patching(bad, tmp_path / "run")
    good = PatchSettings(models=[ckpt], tasks=["animals/can_fly"], samples=2, layers=1)
    run_patching(good, tmp_path / "run")
    assert (tmp_path / "run" / "patching.csv").exists()
    with pytest.raises(OlmoIVError, match="no such directory"):  # a bad model path writes nothing at all
        run_patching(PatchSettings(models=[str(tmp_path / "nope")], tasks=["animals/can_fly"]), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_importing_never_switches_the_matplotlib_backend():
    code = ("import matplotlib; matplotlib.use('svg'); import olmo_iv, olmo_iv.runs.figures, olmo_iv.runs.patch, "
            "olmo_iv.runs.paths, olmo_iv.runs.eval, olmo_iv.runs.probe, olmo_iv.runs.stats, olmo_iv.analysis.probes, "
            "olmo_iv.analysis.paths, olmo_iv.analysis.superadditivity, olmo_iv.evals.inference, olmo_iv.cli.main, "
            "olmo_iv.runs.saif, olmo_iv.runs.bridge, olmo_iv.analysis.bridge, olmo_iv.analysis.latents; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


def _strings(path: Path):
    """The text of every message the library raises or warns with."""
    for node in ast.walk(ast.parse(path.read_text())):
        is_warn = isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "warn"
        if isinstance(node, ast.Raise) or is_warn:
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield part.lineno, part.value


def test_no_cli_flag_is_named_in_library_messages():
    import re

    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    found = [f"{p.relative_to(ROOT)}:{line}: {flag.search(text).group()}"
             for p in sorted((ROOT / "olmo_iv").rglob("*.py"))
             for line, text in _strings(p) if flag.search(text)]
    assert found == []


def test_extractor_equals_run_with_cache_and_stops_early(monkeypatch):
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_mlp=32)
    model = init_weights(OLMo2(cfg), seed=0).eval()
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    got = extract(model, seqs, "hook_resid_post", positions=-1, batch_size=2)
    for i, s in enumerate(seqs):
        _, cache = model.run_with_cache(torch.tensor([s]), names=[f"blocks.{l}.hook_resid_post" for l in range(3)])
        want = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1] for l in range(3)])
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-6)
    per_row = extract(model, seqs, "hook_mlp_out", layers=[1], positions=[0, 2, 0, 3], pad=False)
    _, cache = model.run_with_cache(torch.tensor([seqs[1]]), names=["blocks.1.hook_mlp_out"])
    torch.testing.assert_close(per_row[1, 0], cache["blocks.1.hook_mlp_out"][0, 2], rtol=0, atol=1e-6)
    ran = []
    monkeypatch.setattr(model.blocks[2], "forward", lambda *a, **k: ran.append(1))
    extract(model, seqs, "blocks.1.hook_resid_post")  # layer 2 is never run
    tokens = torch.cat(list(iter_token_activations(model, seqs, "blocks.0.hook_resid_post", exclude=(9,))))
    assert tokens.shape == (sum(map(len, seqs)) - 1, 16) and ran == []
    with pytest.raises(OlmoIVError, match="position 5 is outside"):
        extract(model, seqs, positions=5)
    # every token's activation, in row order of the length-sorted batches, equals each row run alone
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    want = []
    for i in order:
        _, cache = model.run_with_cache(torch.tensor([seqs[i]]), names=["blocks.0.hook_resid_post"], stop_at_layer=1)
        want += [cache["blocks.0.hook_resid_post"][0, t] for t, tok in enumerate(seqs[i]) if tok != 9]
    torch.testing.assert_close(tokens, torch.stack(want), rtol=0, atol=1e-5)


def test_span_means_equal_the_mean_of_each_row_run_alone():
    from olmo_iv.activations import extract_span_mean

    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_mlp=32)
    model = init_weights(OLMo2(cfg), seed=1).eval()
    seqs, spans = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]], [(1, 3), (0, 2), (2, 6)]
    got = extract_span_mean(model, seqs, "hook_mlp_out", spans, layers=[0, 2], batch_size=2)
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        _, cache = model.run_with_cache(torch.tensor([s]), names=["blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"])
        for k, layer in enumerate((0, 2)):
            torch.testing.assert_close(got[i, k], cache[f"blocks.{layer}.hook_mlp_out"][0, a:b].mean(0),
                                       rtol=0, atol=1e-5)
    with pytest.raises(OlmoIVError, match="span"):
        extract_span_mean(model, seqs, "hook_mlp_out", [(0, 9), (0, 1), (0, 1)])


def test_answer_rank_refuses_nan():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0]])
    with pytest.raises(NonFiniteError, match=r"rows \[1\]"):
        answer_rank(logits, torch.tensor([0, 1]))
    logit, rank = answer_rank(logits[:1], torch.tensor([0]))
    assert rank.tolist() == [3] and logit.tolist() == [0.0]
