"""Interop with the real sae-lens and eai-sparsify packages (the `interop` extra): SAEs they write load in ours
and compute the same codes and reconstructions; ours load in SAELens with the right hook name and the same codes;
SAELens's own trainer runs on our model through `SAELensModel`."""

from __future__ import annotations

import warnings

import pytest
import torch

from olmo_iv.sae import SAE, SAEConfig

sae_lens = pytest.importorskip("sae_lens")
TOL = 1e-5


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _x(d_in: int, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("standard", False), ("topk", True),
                                              ("topk", False), ("jumprelu", False), ("jumprelu", True)])
def test_saelens_files_load_in_ours(tmp_path, arch, apply_b_dec):
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    meta = {"hook_name": "blocks.2.hook_resid_post", "model_name": "toy"}
    d_in, d_sae = 24, 96
    if arch == "standard":
        theirs = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec))
    elif arch == "topk":
        theirs = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=7, apply_b_dec_to_input=apply_b_dec))
    else:
        theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec))
    for k, v in meta.items():
        theirs.cfg.metadata[k] = v
    _randomise(theirs, 0)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.hook_name == "blocks.2.hook_resid_post"
    assert ours.cfg.architecture == arch
    x = _x(d_in)
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x), ours.encode(x)
        assert (z_theirs != 0).any()
        assert torch.allclose(z_ours, z_theirs, atol=TOL, rtol=0)
        assert torch.allclose(ours.decode(z_theirs), theirs.decode(z_theirs), atol=TOL, rtol=0)
        assert torch.allclose(ours(x).recon, theirs(x), atol=TOL, rtol=0)


def test_saelens_old_config_with_hook_point(tmp_path):
    """Pre-6.0 configs name the hook `hook_point` and the activation `activation_fn_str`."""
    import json

    from safetensors.torch import save_file

    d_in, d_sae = 8, 16
    gen = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=gen), "b_enc": torch.randn(d_sae, generator=gen),
         "W_dec": torch.randn(d_sae, d_in, generator=gen), "b_dec": torch.randn(d_in, generator=gen)}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "hook_point": "blocks.1.hook_resid_pre",
                                                   "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
                                                   "apply_b_dec_to_input": True, "dtype": "torch.float32"}))
    ours = SAE.load(tmp_path)
    assert ours.cfg.hook_name == "blocks.1.hook_resid_pre" and ours.cfg.architecture == "topk" and ours.cfg.k == 3
    x = _x(d_in)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    vals, idx = pre.topk(3, dim=-1)
    expected = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    assert torch.allclose(ours.encode(x), expected, atol=TOL)


@pytest.mark.parametrize("arch", ["topk", "standard", "batchtopk", "jumprelu"])
def test_ours_load_in_saelens(tmp_path, arch):
    cfg = SAEConfig(d_in=16, d_sae=64, architecture=arch, k=5 if arch in ("topk", "batchtopk") else None,
                    input_scale=0.37, hook_name="blocks.3.hook_resid_post", model_name="toy", context_size=64)
    ours = SAE(cfg, seed=3)
    with torch.no_grad():
        ours.b_dec.copy_(torch.randn(16) * 0.5)
        ours.b_enc.copy_(torch.randn(64) * 0.1)
        if ours.threshold is not None:
            ours.threshold.fill_(0.05)
    ours.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.prepend_bos is False
    assert theirs.cfg.metadata.context_size == 64
    x = _x(16) * 5
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        assert (z_ours != 0).any()
        assert torch.allclose(z_theirs, z_ours, atol=TOL, rtol=0)
        assert torch.allclose(theirs.decode(z_theirs), ours.decode(z_ours), atol=TOL * 10, rtol=TOL)
    # and back: our loader unfolds the scale, so the decoder rows are unit-norm again
    again = SAE.load(tmp_path)
    assert again.cfg.input_scale == pytest.approx(0.37) and again.cfg.architecture == arch
    assert torch.allclose(again.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(again.encode(x), z_ours, atol=TOL, rtol=0)


def test_sparsify_files_load_in_ours(tmp_path, monkeypatch):
    pytest.importorskip("sparsify")
    import sparsify
    import sparsify.sparse_coder
    import sparsify.utils

    # with triton installed sparsify picks its Triton decoder, which needs a GPU; its eager one is the CPU path
    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)
    coder = sparsify.SparseCoder(24, sparsify.SparseCoderConfig(k=6, num_latents=80))
    with torch.no_grad():
        coder.b_dec.copy_(torch.randn(24) * 0.3)
        coder.encoder.bias.copy_(torch.randn(80) * 0.1)
    coder.save_to_disk(tmp_path / "layers.3")
    ours = SAE.load(tmp_path / "layers.3")
    assert ours.cfg.hook_name == "blocks.3.hook_resid_post" and ours.cfg.k == 6
    x = _x(24)
    with torch.no_grad():
        top_acts, top_idx, _ = coder.encode(x)
        dense = torch.zeros(x.shape[0], 80).scatter_(-1, top_idx, top_acts)
        assert torch.allclose(ours.encode(x), dense, atol=TOL, rtol=0)
        assert torch.allclose(ours.decode(dense), coder.decode(top_acts, top_idx), atol=TOL, rtol=0)


def test_saelens_trainer_runs_on_our_model(tmp_path):
    """SAELens's own LanguageModelSAETrainingRunner trains on our OLMo-2 through the adapter."""
    import olmo_iv
    from olmo_iv.sae.saelens import SAELensModel

    datasets = pytest.importorskip("datasets")
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    model = olmo_iv.load("toy")
    adapter = SAELensModel(model)
    ctx = 32
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(2, model.config.vocab_size, (64, ctx), generator=gen)
    ds = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=model.config.d_model, d_sae=192, k=8),
        model_name="toy", hook_name="blocks.2.hook_resid_post", dataset_path="", is_dataset_tokenized=True,
        streaming=False, context_size=ctx, training_tokens=1024, train_batch_size_tokens=256,
        n_batches_in_buffer=16, store_batch_size_prompts=8, device="cpu", prepend_bos=False,
        logger=LoggingConfig(log_to_wandb=False), output_path=str(tmp_path / "out"), checkpoint_path=str(tmp_path / "ck"),
        n_checkpoints=0, verbose=False, n_batches_for_norm_estimate=2, n_eval_batches=1, eval_batch_size_prompts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = LanguageModelSAETrainingRunner(cfg, override_model=adapter, override_dataset=ds).run()
    x = model.run_with_cache(rows[:2], ["blocks.2.hook_resid_post"], stop_at_layer=3)[1]["blocks.2.hook_resid_post"]
    assert trained.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert torch.isfinite(trained.encode(x)).all()
    # what SAELens saved loads in ours with the same codes
    folder = tmp_path / "saved"
    trained.save_model(folder)
    ours = SAE.load(folder)
    with torch.no_grad():
        assert torch.allclose(ours.encode(x.reshape(-1, x.shape[-1])), trained.encode(x.reshape(-1, x.shape[-1])),
                              atol=TOL, rtol=0)


def test_adapter_protocol_matches_our_model():
    import olmo_iv
    from olmo_iv.sae.saelens import SAELensModel

    model = olmo_iv.load("toy")
    adapter = SAELensModel(model)
    ids = adapter.to_tokens(["Adjective: big. Answer:", "hi"], prepend_bos=False)
    assert ids.shape[0] == 2
    out, cache = adapter.run_with_cache(ids, names_filter=["blocks.1.hook_resid_post"], stop_at_layer=2,
                                        prepend_bos=False)
    _, ref = model.run_with_cache(ids, ["blocks.1.hook_resid_post"])
    assert torch.equal(cache["blocks.1.hook_resid_post"], ref["blocks.1.hook_resid_post"])
    logits, loss = adapter.run_with_hooks(ids, return_type="both", loss_per_token=True,
                                          fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x * 0)])
    assert loss.shape == (2, ids.shape[1] - 1)
    assert not torch.allclose(logits, model(ids))
