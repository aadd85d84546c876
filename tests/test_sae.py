"""SAEs: the module, training on synthetic data with a known dictionary, checkpoints, formats (without the
interop packages), splicing, metrics, activation streams and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from olmo_iv.errors import OlmoIVError
from olmo_iv.sae import SAE, SAEConfig, spliced
from olmo_iv.sae.data import (
    MemoryCache,
    ModelStream,
    TensorStream,
    read_texts,
    special_ids,
    token_windows,
    window_activations,
)
from olmo_iv.sae.metrics import fvu, reconstruction_metrics, spliced_metrics
from olmo_iv.sae.train import (
    TrainConfig,
    geometric_median,
    new_state,
    state_from_files,
    state_to_files,
    train_sae,
)


def synthetic(n: int = 16384, d: int = 32, m: int = 96, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations that are exact sparse combinations of m unit directions (k active per token) plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=gen)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=gen).argsort(1)[:, :k]
    codes = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=gen) * 2 + 1)
    return codes @ D + 0.5, D


@pytest.fixture(scope="module")
def toy():
    import olmo_iv

    return olmo_iv.load("toy").eval()


# -- the module -------------------------------------------------------------------------------------------------


def test_init_unit_norm_decoder_and_transposed_encoder():
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4), seed=1)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=0)
    sae.W_dec.grad = torch.randn(32, 8)
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu", "batchtopk"])
def test_encode_decode_formulas(arch):
    cfg = SAEConfig(d_in=8, d_sae=24, architecture=arch, k=5 if arch in ("topk", "batchtopk") else None, input_scale=0.5)
    sae = SAE(cfg, seed=2)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8))
        sae.b_enc.copy_(torch.randn(24) * 0.1)
        if sae.threshold is not None:
            sae.threshold.fill_(0.2)
    x = torch.randn(10, 8) * 3
    pre = (0.5 * x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "topk":
        v, i = pre.topk(5, dim=-1)
        ref = torch.zeros_like(pre).scatter_(-1, i, v.relu())
    elif arch == "standard":
        ref = pre.relu()
    else:
        ref = pre.relu() * (pre > 0.2)
    recon, codes = sae(x)
    assert torch.allclose(codes, ref, atol=1e-6)
    assert torch.allclose(recon, (ref @ sae.W_dec + sae.b_dec) / 0.5, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), recon)


def test_config_validation_names_the_parameter():
    with pytest.raises(OlmoIVError, match="k=0"):
        SAEConfig(d_in=8, d_sae=16, k=0)
    with pytest.raises(OlmoIVError, match="architecture="):
        SAEConfig(d_in=8, d_sae=16, architecture="gated")
    for bad, match in [({"k": 0}, "k=0"), ({"expansion": 0}, "expansion="), ({"lr": -1.0}, "lr="),
                       ({"architecture": "jumprelu"}, "architecture="), ({"steps": 0}, "steps="),
                       ({"optimizer": "sgd"}, "optimizer="), ({"lr_schedule": "step"}, "lr_schedule=")]:
        with pytest.raises(OlmoIVError, match=match):
            TrainConfig(**bad).validate()


def test_sparse_encoder_gradients_match_dense_autograd():
    """The TopK training path (gradients only into the k chosen encoder columns) equals plain autograd."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, k=4), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(12))
        sae.b_enc.copy_(torch.randn(40) * 0.3)
    x = torch.randn(30, 12)
    vals, idx, _, _ = sae.topk_sparse(x, 4)
    sae.decode_sparse(vals, idx).pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    codes = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    (codes @ sae.W_dec + sae.b_dec).pow(2).sum().backward()
    for got, p in zip(sparse_grads, (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)):
        assert torch.allclose(got, p.grad, atol=1e-4, rtol=1e-4)


# -- training -----------------------------------------------------------------------------------------------


def test_topk_recovers_a_known_sparse_dictionary():
    x, D = synthetic()
    cfg = TrainConfig(d_sae=192, k=3, batch_size=512, steps=500, lr=4e-3, log_every=100, dead_tokens=20000)
    reports = []
    result = train_sae(TensorStream(x), cfg,
                       progress=lambda label, advance, total, info=None: reports.append((advance, total, info)))
    W = result.sae.W_dec.detach()
    cos = (D @ (W / W.norm(dim=1, keepdim=True)).T).max(dim=1).values
    metrics = reconstruction_metrics(result.sae, x[:4096])
    assert cos.mean() > 0.95, cos.mean()
    assert metrics["fvu"] < 0.1, metrics
    assert metrics["l0"] == pytest.approx(3.0, abs=0.01)
    assert [r[0] for r in reports] == [100] * 5 and reports[0][1] == 500  # advances of log_every steps
    assert {"fvu", "l0", "dead", "lr", "loss"} <= set(reports[-1][2])
    assert reports[-1][2]["fvu"] < reports[0][2]["fvu"]


def test_input_scale_and_b_dec_init():
    x, _ = synthetic(n=4096)
    x = x * 40.0
    state = new_state(TensorStream(x), TrainConfig(d_sae=64, k=3, batch_size=1024, init_batches=2, b_dec_init="mean"))
    s = state.sae.cfg.input_scale
    assert (x[:2048] * s).pow(2).sum(-1).mean() == pytest.approx(32, rel=0.1)
    assert state.stream_state == {"buffer": 0, "offset": 0}  # the init batches are read again in training
    med = geometric_median(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))
    assert med.norm() < 1.0  # the outlier barely moves it (the mean would be at ~25)


@pytest.mark.parametrize("arch", ["batchtopk", "standard"])
def test_other_architectures_train(arch):
    x, _ = synthetic(n=8192)
    cfg = TrainConfig(architecture=arch, d_sae=128, k=3, batch_size=512, steps=60, lr=3e-3, log_every=20,
                      l1_coefficient=0.5)
    result = train_sae(TensorStream(x), cfg)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["fvu"] < result.history[0]["fvu"]
    if arch == "batchtopk":
        assert float(result.sae.threshold[0]) > 0 and torch.all(result.sae.threshold == result.sae.threshold[0])
        assert result.history[-1]["l0"] == pytest.approx(3.0, abs=0.01)


def test_signum_optimizer_and_schedule():
    x, _ = synthetic(n=4096)
    cfg = TrainConfig(d_sae=64, k=3, batch_size=256, steps=40, optimizer="signum", lr_warmup_steps=10,
                      lr_schedule="cosine", log_every=4)
    result = train_sae(TensorStream(x), cfg)
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] < max(lrs) and lrs[-1] < 0.1 * max(lrs)
    assert cfg.lr_factor(0) == pytest.approx(1 / 11) and cfg.lr_factor(39) < 0.01


def test_nan_activations_and_nan_loss_are_errors():
    x, _ = synthetic(n=2048)
    x[700] = float("nan")
    with pytest.raises(OlmoIVError, match="1 of 256 activation vectors in the batch of step 2 are NaN"):
        train_sae(TensorStream(x, shuffle=False), TrainConfig(d_sae=64, k=3, batch_size=256, steps=10,
                                                              b_dec_init="zeros", init_batches=1))
    with pytest.raises(OlmoIVError, match="diverged.*lr="):  # finite data, an absurd learning rate
        train_sae(TensorStream(synthetic(n=2048)[0] * 1e30), TrainConfig(d_sae=64, k=3, batch_size=256, steps=10,
                                                                         lr=1e30, scale_inputs=False))


def test_checkpoint_state_resumes_bit_identically():
    """In-process half of the resume guarantee (tests/test_sae_resume.py kills a real process)."""
    x, _ = synthetic(n=6000)
    cfg = TrainConfig(d_sae=64, k=3, batch_size=500, steps=30, checkpoint_every=7, auxk_alpha=0.1, dead_tokens=1500)
    full = train_sae(TensorStream(x, seed=3), cfg)
    saved = []
    train_sae(TensorStream(x, seed=3), cfg, on_checkpoint=lambda s: saved.append(state_to_files(s)))
    assert len(saved) == 4  # steps 7, 14, 21, 28
    tensors, meta = saved[1]
    meta = json.loads(json.dumps(meta))  # what the checkpoint file holds
    resumed = train_sae(TensorStream(x, seed=3), cfg, state=state_from_files(tensors, meta, cfg))
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    assert resumed.history == full.history


# -- formats without the interop packages ----------------------------------------------------------------------


def test_saelens_round_trip_keeps_codes(tmp_path):
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k=4, input_scale=2.5, hook_name="blocks.1.hook_resid_post",
                        model_name="toy", context_size=64), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16))
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["prepend_bos"] is False
    assert cfg["metadata"]["context_size"] == 64 and cfg["metadata"]["model_name"] == "toy"
    back = SAE.load(tmp_path)
    x = torch.randn(20, 16)
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(back(x).recon, sae(x).recon, atol=1e-5)
    assert back.cfg.input_scale == pytest.approx(2.5)


def test_sparsify_folder_subtracts_b_dec(tmp_path):
    d_in, n = 8, 20
    gen = torch.Generator().manual_seed(0)
    t = {"encoder.weight": torch.randn(n, d_in, generator=gen), "encoder.bias": torch.randn(n, generator=gen),
         "W_dec": torch.randn(n, d_in, generator=gen), "b_dec": torch.randn(d_in, generator=gen)}
    folder = tmp_path / "layers.5"
    folder.mkdir()
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 3, "num_latents": n, "d_in": d_in,
                                                 "expansion_factor": 32, "normalize_decoder": True}))
    sae = SAE.load(folder)
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post"
    x = torch.randn(6, d_in)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    v, i = pre.topk(3, dim=-1)
    codes = torch.zeros_like(pre).scatter_(-1, i, v)
    assert torch.allclose(sae.encode(x), codes, atol=1e-6)
    assert torch.allclose(sae.decode(codes), codes @ t["W_dec"] + t["b_dec"], atol=1e-6)


def test_gemma_scope_npz_and_no_pickle(tmp_path):
    d_in, n = 8, 16
    rng = np.random.default_rng(0)
    arrays = {"W_enc": rng.normal(size=(d_in, n)).astype(np.float32), "W_dec": rng.normal(size=(n, d_in)).astype(np.float32),
              "b_enc": rng.normal(size=n).astype(np.float32), "b_dec": rng.normal(size=d_in).astype(np.float32),
              "threshold": np.abs(rng.normal(size=n)).astype(np.float32)}
    folder = tmp_path / "layer_7" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **arrays)
    sae = SAE.load(folder)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_name == "blocks.7.hook_resid_post"
    x = rng.normal(size=(5, d_in)).astype(np.float32)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]  # Gemma Scope does not subtract b_dec
    codes = np.maximum(pre, 0) * (pre > arrays["threshold"])
    assert np.allclose(sae.encode(torch.from_numpy(x)).detach().numpy(), codes, atol=1e-5)
    evil = tmp_path / "evil.npz"
    np.savez(evil, W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(OlmoIVError, match="npz"):
        SAE.load(evil)


def test_unknown_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OlmoIVError, match="holds no SAE"):
        SAE.load(tmp_path)


# -- model, streams, splicing, metrics ----------------------------------------------------------------------------


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n\n" + json.dumps({"prompt": "p doc"}) + "\n")
    assert list(read_texts(tmp_path / "a.txt")) == ["first doc\nstill first", "second doc"]
    assert list(read_texts(tmp_path / "b.jsonl")) == ["json doc", "p doc"]
    assert list(read_texts(tmp_path)) == ["first doc\nstill first", "second doc", "json doc", "p doc"]
    assert next(read_texts("tasks")).startswith("Given")
    ifeval = list(read_texts("ifeval"))
    assert len(ifeval) == 541 and all(isinstance(t, str) and t for t in ifeval)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(OlmoIVError, match="text_field="):
        list(read_texts(tmp_path / "c.jsonl"))
    with pytest.raises(OlmoIVError, match="source="):
        list(read_texts(tmp_path / "missing.txt"))


def test_windows_and_excluded_special_tokens(toy):
    texts = ["Adjective: big. Answer: small", "Animal: cat. Answer: no"] * 20
    eos = toy.config.eos_token_id
    windows = token_windows(texts, toy.tokenizer, 16, separator=eos)
    assert all(len(w) == 16 for w in windows[:-1]) and eos in sum(windows, [])
    excl = special_ids(toy.tokenizer, toy.config)
    assert eos in excl
    acts = window_activations(toy, windows, "blocks.1.hook_resid_post", exclude=excl)
    n_real = sum(1 for w in windows for t in w if t not in excl)
    assert acts.shape == (n_real, toy.config.d_model)


def test_model_stream_runs_only_up_to_the_hook_and_restores(toy):
    windows = token_windows(read_texts("tasks"), toy.tokenizer, 32, separator=toy.config.eos_token_id, max_windows=40)
    calls = {"later": 0}

    def later(x, name):
        calls["later"] += 1

    stream = ModelStream(toy, windows, "blocks.1.hook_resid_post", windows_per_buffer=8, seed=5)
    with toy.hooks({"blocks.2.hook_resid_pre": later}):
        a = stream.next_batch(300)
        state = stream.state()
        b = stream.next_batch(400)  # spans two buffers
    assert calls["later"] == 0  # blocks after the hooked one never ran
    stream.restore(state)
    assert torch.equal(stream.next_batch(400), b)
    again = ModelStream(toy, windows, "blocks.1.hook_resid_post", windows_per_buffer=8, seed=5)
    assert torch.equal(again.next_batch(300), a)


def test_disk_cache_skips_the_model(toy, tmp_path):
    from olmo_iv.runs.sae import DiskActivationCache

    windows = token_windows(read_texts("tasks"), toy.tokenizer, 32, separator=toy.config.eos_token_id, max_windows=24)
    first = ModelStream(toy, windows, "blocks.2.hook_resid_post", windows_per_buffer=8)
    first.cache = DiskActivationCache(tmp_path / first.cache_key("fp"))
    a = first.next_batch(1000)
    assert len(list((tmp_path / first.cache_key("fp")).glob("buffer_*.safetensors"))) >= 2

    def boom(x, name):
        raise AssertionError("the model ran although the cache holds the buffers")

    second = ModelStream(toy, windows, "blocks.2.hook_resid_post", windows_per_buffer=8)
    second.cache = DiskActivationCache(tmp_path / first.cache_key("fp"))
    with toy.hooks({"blocks.0.hook_resid_pre": boom}):
        assert torch.equal(second.next_batch(1000), a)


def _identity_sae(d: int, hook: str) -> SAE:
    """A ReLU SAE that reconstructs exactly: relu(x) − relu(−x) = x."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="standard", k=None, apply_b_dec_to_input=False,
                        hook_name=hook), seed=None)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_splicing_with_and_without_error_term(toy):
    ids = torch.tensor([[5, 17, 33, 8, 91, 4]])
    hook = "blocks.2.hook_resid_post"
    clean = toy(ids)
    sae = SAE(SAEConfig(d_in=toy.config.d_model, d_sae=64, k=4, hook_name=hook), seed=0)
    with spliced(toy, sae):
        lossy = toy(ids)
    with spliced(toy, sae, use_error_term=True):
        same = toy(ids)
    store = {}
    with spliced(toy, sae, use_error_term=True, edit=lambda z: z * 0, store=store):
        edited = toy(ids)
    assert not torch.allclose(lossy, clean, atol=1e-3)
    assert torch.allclose(same, clean, atol=1e-4)
    assert not torch.allclose(edited, clean, atol=1e-3)
    assert store["codes"].shape == (1, 6, 64)
    with pytest.raises(OlmoIVError, match="hook_name="):
        with spliced(toy, SAE(SAEConfig(d_in=toy.config.d_model, d_sae=8, k=2), seed=0)):
            pass


def test_metrics(toy):
    x = torch.randn(100, 4)
    assert fvu(x, x) == 0.0 and fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    hook = "blocks.1.hook_resid_post"
    perfect = _identity_sae(toy.config.d_model, hook)
    windows = token_windows(read_texts("tasks"), toy.tokenizer, 32, separator=toy.config.eos_token_id, max_windows=6)
    m = spliced_metrics(toy, perfect, windows)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4) and m["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_zero"] != pytest.approx(m["ce_clean"])
    acts = window_activations(toy, windows, hook)
    r = reconstruction_metrics(perfect, acts)
    assert r["fvu"] < 1e-10 and 0 < r["l0"] <= toy.config.d_model


def test_memory_cache_avoids_recomputing_epochs(toy):
    windows = token_windows(read_texts("tasks"), toy.tokenizer, 32, separator=toy.config.eos_token_id, max_windows=8)
    stream = ModelStream(toy, windows, "blocks.0.hook_resid_post", windows_per_buffer=8, cache=MemoryCache())
    n = window_activations(toy, windows, "blocks.0.hook_resid_post", exclude=stream.exclude).shape[0]
    stream.next_batch(n)
    calls = []
    with toy.hooks({"blocks.0.hook_resid_pre": lambda x, name: calls.append(1)}):
        stream.next_batch(n)  # the second epoch, reshuffled, from memory
    assert not calls and stream.epoch == 1


# -- CLI ------------------------------------------------------------------------------------------------------


def test_cli_train_eval_inspect(tmp_path):
    import olmo_iv.cli.main  # noqa: F401  (registers the commands)
    from olmo_iv.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["sae", "train", "--model", "toy", "--layer", "1", "--out", str(out), "--steps", "12", "--batch-size", "256",
            "--max-windows", "48", "--context-size", "32", "--eval-windows", "8", "--expansion", "2", "--k", "8"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for f in ("sae/cfg.json", "sae/sae_weights.safetensors", "metrics.json", "history.json", "summary.json",
              "run.json"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "run.json").read_text())  # the run store's: settings, versions, fingerprints
    assert summary["model_fingerprint"] and manifest["versions"]["torch"] and manifest["settings"]["train"]["k"] == 8
    assert manifest["finished"] and "toy" in manifest["checkpoints"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fvu", "l0", "dead_fraction"} <= set(metrics["heldout"]) and "ce_recovered" in metrics["spliced"]
    assert not list(out.glob("units/*/checkpoint.safetensors"))  # pruned once finished
    sae = SAE.load(out / "sae")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.d_sae == 2 * 96
    res = runner.invoke(app, ["sae", "eval", str(out / "sae"), "--max-windows", "4", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "ce_recovered" in json.loads((tmp_path / "ev" / "metrics.json").read_text())["spliced"]
    res = runner.invoke(app, ["sae", "inspect", str(out / "sae"), "--latent", "3", "--max-windows", "8", "--top", "3"])
    assert res.exit_code == 0 and "logit lens" in res.output, res.output
    res = runner.invoke(app, args[:6] + ["--out", str(tmp_path / "bad"), "--k", "0"])
    assert isinstance(res.exception, OlmoIVError) and "--k 0" in str(res.exception)
    from olmo_iv.runs.store import RunFinished

    res = runner.invoke(app, args)  # the same command again: finished, says where the results are
    assert isinstance(res.exception, RunFinished) and str(out) in str(res.exception)


def test_top_contexts_of_many_latents_equal_a_per_window_reference(toy):
    """The one-pass, batched, many-latent search equals the straightforward one: every window run alone, every
    non-special position's code collected, sorted by value (ties in window then position order), the first k."""
    from olmo_iv.sae.analysis import top_contexts, top_contexts_many
    from olmo_iv.sae.builtin import builtin_sae
    from olmo_iv.sae.data import special_ids

    sae = builtin_sae("toy", 2)
    name = sae.cfg.hook_name
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, toy.config.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 20, (23,), generator=gen)]
    windows += [windows[4]]  # a duplicate window: equal values, ties broken by window order
    specials = special_ids(toy.tokenizer, toy.config)
    windows[7][2] = sorted(specials)[0]  # a special token is never a context
    with torch.no_grad():
        codes = [sae.encode(toy.run_with_cache(torch.tensor([w]), [name])[1][name])[0] for w in windows]
    latents = [int(j) for j in codes[0].amax(0).topk(4).indices] + [int(codes[0].amax(0).topk(4).indices[0])]
    many = top_contexts_many(toy, sae, windows, latents, k=6, context=3, batch_size=5)
    assert set(many) == set(latents)
    for j in latents:
        cells = sorted(((float(c[p, j]), w, p) for w, c in enumerate(codes) for p in range(len(windows[w]))
                        if windows[w][p] not in specials), key=lambda x: -x[0])[:6]
        got = many[j]
        assert [(c["window"], c["position"]) for c in got] == [(w, p) for _, w, p in cells]
        assert [c["value"] for c in got] == pytest.approx([v for v, _, _ in cells], abs=1e-5)
        for c in got:
            assert c["token"] == windows[c["window"]][c["position"]]
            assert c["context"] == windows[c["window"]][max(0, c["position"] - 3): c["position"] + 1]
        assert top_contexts(toy, sae, windows, j, k=6, context=3, batch_size=5) == got
    with pytest.raises(OlmoIVError, match="latent="):
        top_contexts_many(toy, sae, windows, [sae.cfg.d_sae])
