"""Parity with transformers' Olmo2ForCausalLM and the semantics of every hook point."""

from __future__ import annotations

import pytest
import torch

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.model import KVCache
from tests.conftest import make_hf_checkpoint


def hf_layer_outputs(hf, ids, **kw):
    """Outputs of every HF decoder layer, captured with plain forward hooks, and the logits."""
    outs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in hf.model.layers]
    try:
        with torch.no_grad():
            logits = hf(ids, **kw).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outs


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_parity_fp32(tmp_path, kv_heads):
    folder, hf = make_hf_checkpoint(tmp_path, seed=kv_heads, num_key_value_heads=kv_heads)
    model = olmo_iv.load(folder)
    ids = torch.randint(0, 300, (3, 13), generator=torch.Generator().manual_seed(1))
    ref, ref_layers = hf_layer_outputs(hf, ids)
    logits, cache = model.run_with_cache(ids, names=lambda n: n.endswith("hook_resid_post"))
    assert (logits - ref).abs().max() <= 1e-4
    for layer, out in enumerate(ref_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], out, rtol=0, atol=1e-5)


def test_parity_bf16(tmp_path):
    folder, hf = make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = olmo_iv.load(folder, dtype=torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    ref, _ = hf_layer_outputs(hf, ids)
    ours = model(ids)
    assert ours.dtype == torch.bfloat16
    # Stated tolerance: bf16 carries ~3 significant digits; logits here are O(1). The ops are HF's, but its SDPA
    # call takes another CPU kernel path (attention outputs differ by ~1e-5), which grows to ~1e-2 at the logits.
    assert (ours.float() - ref.float()).abs().max() <= 2e-2


def test_parity_real_head_dim_and_vocab_sharded(tmp_path):
    """What the real checkpoints have and the tiny ones lack: head_dim 128, the 100352-row vocabulary, and
    several shards with an index (d_model 256 in 2 heads keeps it fast)."""
    folder, hf = make_hf_checkpoint(tmp_path, vocab_size=100352, hidden_size=256, intermediate_size=512,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                    rope_theta=500000.0, max_shard_size="60MB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    model = olmo_iv.load(folder)
    assert model.config.head_dim == 128
    ids = torch.randint(0, 100278, (2, 12), generator=torch.Generator().manual_seed(3))
    ref, ref_layers = hf_layer_outputs(hf, ids)
    logits, cache = model.run_with_cache(ids, names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert (logits - ref).abs().max() <= 1e-4
    for layer, out in enumerate(ref_layers):
        torch.testing.assert_close(cache["resid_post", layer], out, rtol=0, atol=1e-5)


def test_padding_and_positions(tiny_model):
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(4))
    lengths = [10, 6, 3]
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    batched = tiny_model(ids, attention_mask=mask)
    unmasked = tiny_model(ids)  # right padding needs no mask at all
    for row, n in enumerate(lengths):
        alone = tiny_model(ids[row, :n])[0]
        torch.testing.assert_close(batched[row, :n], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(unmasked[row, :n], alone, rtol=0, atol=1e-5)
    last = torch.tensor(lengths) - 1
    torch.testing.assert_close(tiny_model(ids, logits_at=last), batched[torch.arange(3), last], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_model(ids, logits_at=-1), unmasked[:, -1], rtol=0, atol=1e-6)


def test_left_padding_matches_hf(tiny_checkpoint, tiny_model):
    _, hf = tiny_checkpoint
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    ours = tiny_model(ids, attention_mask=mask)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1, 3:], tiny_model(ids[1, 3:])[0], rtol=0, atol=1e-5)


def test_kv_cache_equals_full_forward(tiny_model):
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    full = tiny_model(ids)
    cache = KVCache.empty(tiny_model.config.n_layers)
    first = tiny_model(ids[:, :5], kv_cache=cache)
    steps = [tiny_model(ids[:, t : t + 1], kv_cache=cache)[:, 0] for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, torch.stack(steps, 1)], 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("capacity", [9, 6, 1])  # exact, too small (the buffer grows once), far too small
def test_a_preallocated_kv_cache_equals_a_growing_one(tiny_model, capacity):
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    grown, pre = KVCache.empty(tiny_model.config.n_layers), KVCache.empty(tiny_model.config.n_layers, capacity)
    outs = []
    for cache in (grown, pre):
        first = tiny_model(ids[:, :5], attention_mask=mask[:, :5], kv_cache=cache)
        steps = [tiny_model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache)[:, 0]
                 for t in range(5, 9)]
        outs.append(torch.cat([first, torch.stack(steps, 1)], 1))
    assert torch.equal(outs[0], outs[1]) and pre.length == grown.length == 9
    for layer in range(tiny_model.config.n_layers):
        assert torch.equal(pre.k[layer][:, :, :9], grown.k[layer]) and torch.equal(pre.v[layer][:, :, :9], grown.v[layer])
    with pytest.raises(OlmoIVError, match="capacity=0"):
        KVCache.empty(2, 0)


def test_residual_identities_and_hook_shapes(tiny_model):
    cfg = tiny_model.config
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(7))
    logits, c = tiny_model.run_with_cache(ids)
    assert set(c) == set(tiny_model.hook_names())
    torch.testing.assert_close(c["blocks.0.hook_resid_pre"], c["hook_embed"])
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}."
        torch.testing.assert_close(c[b + "hook_resid_mid"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"])
        torch.testing.assert_close(c[b + "hook_resid_post"], c[b + "hook_resid_mid"] + c[b + "hook_mlp_out"])
        torch.testing.assert_close(c[b + "mlp.hook_post"],
                                   torch.nn.functional.silu(c[b + "mlp.hook_pre"]) * c[b + "mlp.hook_pre_linear"])
        block = tiny_model.blocks[layer]
        raw = c[b + "attn.hook_out"]
        torch.testing.assert_close(c[b + "hook_attn_out"], block.ln_attn.weight * raw / c[b + "ln_attn.hook_scale"])
        assert c[b + "attn.hook_q"].shape == (2, 7, cfg.n_heads, cfg.head_dim)
        assert c[b + "attn.hook_pattern"].shape == (2, cfg.n_heads, 7, 7)
        torch.testing.assert_close(c[b + "attn.hook_pattern"].sum(-1), torch.ones(2, cfg.n_heads, 7))
        assert torch.all(c[b + "attn.hook_pattern"].triu(1) == 0)  # causal
        z = (c[b + "attn.hook_pattern"] @ c[b + "attn.hook_v"].transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(c[b + "attn.hook_z"], z)
        if layer + 1 < cfg.n_layers:
            torch.testing.assert_close(c[f"blocks.{layer + 1}.hook_resid_pre"], c[b + "hook_resid_post"])
    torch.testing.assert_close(c["hook_logits"], logits)
    torch.testing.assert_close(logits, tiny_model.lm_head(c["ln_final.hook_normalized"]))


def test_replacing_hooks_and_partial_runs(tiny_model):
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(8))
    base, cache = tiny_model.run_with_cache(ids, names=["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"])
    # identity replacement changes nothing; a zeroing replacement changes the logits
    with tiny_model.hooks({"blocks.1.hook_resid_post": lambda x, name: x.clone()}):
        torch.testing.assert_close(tiny_model(ids), base, rtol=0, atol=0)
    with tiny_model.hooks({"blocks.1.hook_resid_post": lambda x, name: torch.zeros_like(x)}):
        assert (tiny_model(ids) - base).abs().max() > 1e-3
    # starting from a cached residual equals the full run; stopping returns the residual
    resumed = tiny_model(ids, start_at_layer=1, resid=cache["blocks.0.hook_resid_post"])
    torch.testing.assert_close(resumed, base, rtol=0, atol=1e-5)
    stopped = tiny_model(ids, stop_at_layer=3)
    torch.testing.assert_close(stopped, cache["blocks.2.hook_resid_post"], rtol=0, atol=0)
    # replacing the norm scale with itself is exact
    with tiny_model.hooks({"ln_final.hook_scale": lambda s, n: s.clone()}):
        torch.testing.assert_close(tiny_model(ids), base, rtol=0, atol=1e-5)


def test_hooks_removed_on_exception_and_nested(tiny_model):
    ids = torch.randint(0, 300, (1, 4))
    seen = []
    outer = lambda x, n: seen.append("outer")  # noqa: E731
    with tiny_model.hooks({"hook_embed": outer}):
        with pytest.raises(RuntimeError, match="boom"):
            with tiny_model.hooks({"hook_embed": lambda x, n: (_ for _ in ()).throw(RuntimeError("boom"))}):
                tiny_model(ids)
        seen.clear()
        tiny_model(ids)
        assert seen == ["outer"]  # the inner hook is gone, the outer one survives
    assert tiny_model._hooks == {}
    seen.clear()
    tiny_model(ids)
    assert seen == []


def test_hook_errors(tiny_model):
    with pytest.raises(OlmoIVError, match="unknown hook name 'blocks.0.hook_resid_pst'.*Did you mean"):
        with tiny_model.hooks({"blocks.0.hook_resid_pst": lambda x, n: None}):
            pass
    with pytest.raises(OlmoIVError, match="blocks.9.hook_resid_post"):
        tiny_model.run_with_cache(torch.zeros(1, 2, dtype=torch.long), names=["blocks.9.hook_resid_post"])
    with pytest.raises(OlmoIVError, match="same shape"):
        with tiny_model.hooks({"hook_embed": lambda x, n: x[:, :1]}):
            tiny_model(torch.zeros(1, 3, dtype=torch.long))


def test_token_ids_outside_vocab(tiny_model):
    with pytest.raises(OlmoIVError, match=r"\[300\] are outside the vocabulary \[0, 300\)"):
        tiny_model(torch.tensor([[1, 300]]))
    with pytest.raises(OlmoIVError, match="integer tensor"):
        tiny_model(torch.tensor([[1.0, 2.0]]))


def test_unhooked_forward_does_not_touch_hook_machinery(tiny_model, monkeypatch):
    import olmo_iv.model as model_module

    def fail(*args, **kwargs):
        raise AssertionError("run_hooks called on an unhooked forward")

    monkeypatch.setattr(model_module, "run_hooks", fail)
    tiny_model(torch.randint(0, 300, (1, 5)))  # would raise if any hook point did more than a dict check


def test_layer_range_and_input_shapes_refused(tiny_model):
    ids = torch.randint(0, 300, (2, 5))
    for kw in ({"stop_at_layer": 4}, {"stop_at_layer": -1}, {"start_at_layer": 4, "resid": torch.zeros(2, 5, 64)},
               {"start_at_layer": 2, "stop_at_layer": 1, "resid": torch.zeros(2, 5, 64)}):
        with pytest.raises(OlmoIVError, match=r"need 0 <= start_at_layer <= stop_at_layer <= n_layers=3"):
            tiny_model(ids, **kw)
    with pytest.raises(OlmoIVError, match=r"resid of shape \[2, 5, 64\].*got shape \(2, 5, 32\)"):
        tiny_model(ids, start_at_layer=1, resid=torch.zeros(2, 5, 32))
    with pytest.raises(OlmoIVError, match="non-empty"):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(OlmoIVError, match=r"non-empty \[batch, tokens\] tensor, got shape \(1, 2, 3\)"):
        tiny_model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(OlmoIVError, match=r"logits_at=5 is out of range for 5 tokens"):
        tiny_model(ids, logits_at=5)
    with pytest.raises(OlmoIVError, match=r"logits_at=\[0, -6\] is out of range"):
        tiny_model(ids, logits_at=torch.tensor([0, -6]))
    with pytest.raises(OlmoIVError, match=r"one position per row"):
        tiny_model(ids, logits_at=torch.tensor([0, 1, 2]))
    with pytest.raises(OlmoIVError, match=r"attention_mask has shape \(2, 4\), expected \[2, 5\]"):
        tiny_model(ids, attention_mask=torch.ones(2, 4))
    torch.testing.assert_close(tiny_model(ids, logits_at=torch.tensor([-1, 4])), tiny_model(ids)[:, -1])


def test_longer_than_the_context_is_refused(tiny_model):
    limit = tiny_model.config.max_position_embeddings
    with pytest.raises(OlmoIVError, match=f"{limit + 1} tokens exceed .* max_position_embeddings={limit}"):
        tiny_model(torch.zeros(1, limit + 1, dtype=torch.long), stop_at_layer=0)
    cache = KVCache.empty(tiny_model.config.n_layers)
    tiny_model(torch.zeros(1, limit - 1, dtype=torch.long), kv_cache=cache, stop_at_layer=1)
    with pytest.raises(OlmoIVError, match=f"{limit + 1} tokens exceed"):  # counted with the cached tokens
        tiny_model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache, stop_at_layer=1)


def test_run_with_cache_accepts_one_name(tiny_model):
    ids = torch.randint(0, 300, (1, 4))
    _, cache = tiny_model.run_with_cache(ids, names="blocks.0.hook_resid_post")
    assert list(cache) == ["blocks.0.hook_resid_post"]


def test_check_finite_names_the_first_bad_point(tiny_model):
    ids = torch.randint(0, 300, (1, 4))
    with tiny_model.check_finite():
        tiny_model(ids)  # a healthy forward passes
    poison = {"blocks.1.mlp.hook_post": lambda x, n: torch.full_like(x, float("inf"))}
    with tiny_model.hooks(poison), tiny_model.check_finite():
        with pytest.raises(OlmoIVError, match=r"first appear at blocks\.1\.mlp\.hook_out \(.* dtype float32\)$"):
            tiny_model(ids)
    half = olmo_iv.load(tiny_model.name_or_path, dtype="fp16")
    with half.hooks({"blocks.0.hook_resid_mid": lambda x, n: x * 1e5}), half.check_finite():
        with pytest.raises(OlmoIVError, match=r"blocks\.0\.mlp\.hook_out .*dtype='bfloat16' or 'float32'"):
            half(ids)
    assert tiny_model._hooks == {} and half._hooks == {}
