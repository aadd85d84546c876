"""OLMo-3: parity with transformers' Olmo3ForCausalLM beyond the sliding window, with plain RoPE and with YaRN;
the KV cache, patching and path tracing beyond the window; loading and saving."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import olmo_iv
from olmo_iv.analysis import paths as P
from olmo_iv.generate import generate
from olmo_iv.interventions.patching import layer_grid, patch_layers
from olmo_iv.model import KVCache, ModelConfig, OLMo2
from olmo_iv.reference import patch_layers_reference, trace_direct
from tests.conftest import make_olmo3_checkpoint
from tests.test_generate import PROMPTS, hf_generate
from tests.test_model import hf_layer_outputs

WINDOW = 5  # make_olmo3_checkpoint's sliding window; every input below is longer
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
VARIANTS = {
    "mha_default_rope": dict(num_key_value_heads=4),
    "gqa_yarn_rope_scaling": dict(rope_scaling=YARN),  # as the hub's config.json files spell it
    "gqa_yarn_rope_parameters": dict(rope_parameters={  # as transformers 5 writes it
        "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 64, "attention_factor": 1.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


def variant(model: OLMo2, **changes) -> OLMo2:
    """The same weights under a changed config (to show that the window and YaRN matter)."""
    other = OLMo2(dataclasses.replace(model.config, **changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.fixture(scope="module")
def olmo3(tmp_path_factory):
    folder, hf = make_olmo3_checkpoint(tmp_path_factory.mktemp("olmo3"), seed=1, rope_scaling=YARN)
    return folder, hf, olmo_iv.load(folder)


@pytest.mark.parametrize("which", list(VARIANTS))
def test_parity_fp32_beyond_the_window(tmp_path, which):
    folder, hf = make_olmo3_checkpoint(tmp_path, seed=2, **VARIANTS[which])
    model = olmo_iv.load(folder)
    cfg = model.config
    assert cfg.model_type == "olmo3" and cfg.sliding_window == WINDOW
    assert cfg.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert cfg.rope("full_attention")["rope_type"] == ("default" if which.startswith("mha") else "yarn")
    assert cfg.rope("sliding_attention")["rope_type"] == "default"
    ids = torch.randint(0, 300, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    ref, ref_layers = hf_layer_outputs(hf, ids)
    logits, cache = model.run_with_cache(ids, names=lambda n: n.endswith("hook_resid_post"))
    assert (logits - ref).abs().max() <= 1e-4
    for layer, out in enumerate(ref_layers):
        assert (cache["resid_post", layer] - out).abs().max() <= 1e-4
    # the comparison is sharp: without the window, or without YaRN, the logits move
    assert (variant(model, layer_types=["full_attention"] * 4)(ids) - ref).abs().max() > 1e-3
    if "yarn" in which:
        plain = {k: {"rope_type": "default", "rope_theta": p["rope_theta"]} for k, p in cfg.rope_parameters.items()}
        assert (variant(model, rope_parameters=plain)(ids) - ref).abs().max() > 1e-3


def test_pattern_is_zero_outside_the_window(olmo3):
    model = olmo3[2]
    T = 3 * WINDOW
    _, cache = model.run_with_cache(torch.randint(0, 300, (1, T)), names=lambda n: n.endswith("hook_pattern"))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for layer, kind in enumerate(model.config.layer_types):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
        allowed = (k <= q) & ((k > q - WINDOW) if kind == "sliding_attention" else True)
        assert torch.all(pattern[:, ~allowed] == 0) and torch.all(pattern[:, allowed] > 0)


def test_left_padding_matches_transformers(olmo3):
    _, hf, model = olmo3
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    ours = model(ids, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[1, 4:], model(ids[1, 4:])[0], rtol=0, atol=1e-5)


def test_kv_cache_beyond_the_window_equals_full_recompute(olmo3):
    _, hf, model = olmo3
    ids = torch.randint(0, 300, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(6))
    full = model(ids)
    cache = KVCache.empty(model.config.n_layers)
    parts = [model(ids[:, :3], kv_cache=cache), model(ids[:, 3:10], kv_cache=cache)]  # a chunk after a prefix
    parts += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(10, 4 * WINDOW)]  # single steps
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    # greedy generation from prompts of different lengths, well past the window: cache, recompute, transformers
    cached = generate(model, PROMPTS, max_new_tokens=8, stop_at_newline=False, batch_size=len(PROMPTS))
    recomputed = generate(model, PROMPTS, max_new_tokens=8, stop_at_newline=False, use_cache=False)
    assert cached == recomputed == hf_generate(hf, PROMPTS, 8)
    assert len({tuple(r) for r in cached}) > 1


def test_patching_equals_the_straightforward_method(olmo3):
    model = olmo3[2]
    g = torch.Generator().manual_seed(7)
    sources = [torch.randint(0, 300, (int(n),), generator=g) for n in torch.randint(6, 10, (4,), generator=g)]
    targets = [torch.randint(0, 300, (int(n),), generator=g) for n in torch.randint(6, 12, (4,), generator=g)]
    answers = [int(a) for a in torch.randint(0, 300, (4,), generator=g)]
    sets = layer_grid(4, 1) + layer_grid(4, 2)
    for target_pos in (0, -1):
        fast = patch_layers(model, sources, targets, answers, sets, target_pos=target_pos)
        logits, ranks = patch_layers_reference(model, sources, targets, answers, sets, target_pos=target_pos)
        assert (fast.logit_patched - logits).abs().max() <= 1e-5
        assert torch.equal(fast.rank_patched, ranks)


@pytest.mark.parametrize("mode", P.MODES)
def test_path_tracing_equals_direct_trace_beyond_the_window(olmo3, mode):
    model = olmo3[2]
    ids = torch.randint(0, 300, (2 * WINDOW,), generator=torch.Generator().manual_seed(0))
    cfg = P.PathConfig(mode=mode, threshold=150, chunk=4, readout_chunk=5)
    fast = P.trace(model, ids, 17, cfg)
    slow = trace_direct(model, ids, 17, cfg)
    assert 0 < len(fast.tokens) < sum(fast.total)
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.rank, slow.rank)
    torch.testing.assert_close(fast.logit, slow.logit, rtol=1e-5, atol=1e-5)
    # the graph respects the window: a sliding layer's edges reach back fewer than WINDOW tokens
    q = torch.arange(2 * WINDOW)
    for layer, kind in enumerate(model.config.layer_types):
        back = q - fast.graph.argmax[layer]
        assert torch.all(back >= 0) and (kind == "full_attention" or torch.all(back < WINDOW))


def test_save_is_read_back_by_transformers_as_olmo3(tmp_path, olmo3):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = olmo3[2]
    folder = olmo_iv.save(model, tmp_path / "out")
    assert AutoConfig.from_pretrained(folder).model_type == "olmo3"
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "Olmo3ForCausalLM"
    ids = torch.randint(0, 300, (1, 3 * WINDOW))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-5
    again = olmo_iv.load(folder)
    assert again.config.rope("full_attention") == model.config.rope("full_attention")
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch, olmo3):
    import huggingface_hub.constants as c

    repo = tmp_path / "hub" / "models--allenai--Olmo-3-1025-7B"
    commit = "0" * 40
    shutil.copytree(olmo3[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = olmo_iv.load("allenai/Olmo-3-1025-7B")
    assert model.config.model_type == "olmo3"
    ids = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(model(ids), olmo3[2](ids), rtol=0, atol=0)


def test_config_checks(olmo3):
    raw = json.loads((olmo3[0] / "config.json").read_text())
    assert ModelConfig.from_hf(raw).to_hf()["rope_parameters"]["full_attention"]["rope_type"] == "yarn"
    with pytest.raises(olmo_iv.OlmoIVError, match="layer_types must give one of"):
        ModelConfig.from_hf({**raw, "layer_types": ["full_attention"] * 3})
    with pytest.raises(olmo_iv.OlmoIVError, match="sliding_window >= 1"):
        ModelConfig.from_hf({**raw, "sliding_window": None})
    with pytest.raises(olmo_iv.OlmoIVError, match="RoPE types"):
        ModelConfig.from_hf({**raw, "rope_parameters": None, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(olmo_iv.OlmoIVError, match="OLMo-2 uses plain"):
        ModelConfig.from_hf({**raw, "model_type": "olmo2", "rope_parameters": None, "rope_theta": 5e5, "rope_scaling": YARN})


def test_parity_bf16(olmo3):
    from transformers import Olmo3ForCausalLM

    folder = olmo3[0]
    model = olmo_iv.load(folder, dtype="bf16")
    hf = Olmo3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()  # not the shared fp32 one
    ids = torch.randint(0, 300, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids)
    assert ours.dtype == torch.bfloat16
    # as for OLMo-2: transformers' SDPA takes another CPU kernel path, and the ~1e-5 difference of the attention
    # outputs grows to about one bf16 ulp at the logits' scale
    assert (ours.float() - ref.float()).abs().max() <= 2e-2
