"""Checkpoint loading: layouts, config variants, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.loading import hf_name
from tests.conftest import make_hf_checkpoint


@pytest.fixture()
def checkpoint(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    return folder


def test_loads_on_meta_then_fills_every_parameter(tiny_model, tiny_checkpoint):
    state = load_file(str(tiny_checkpoint[0] / "model.safetensors"))
    for name, p in tiny_model.named_parameters():
        assert p.device.type == "cpu" and not p.requires_grad
        torch.testing.assert_close(p, state[hf_name(name)], rtol=0, atol=0)
    assert tiny_model.tokenizer is None  # no tokenizer.json in this checkpoint


def test_rope_parameters_and_rope_theta_both_accepted(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    a = olmo_iv.load(checkpoint)
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    b = olmo_iv.load(checkpoint)
    assert a.config.rope_theta == b.config.rope_theta == theta


def test_save_roundtrip_sharded(tmp_path, tiny_model):
    folder = olmo_iv.save(tiny_model, tmp_path / "out", max_shard_bytes=60_000)
    assert (folder / "model.safetensors.index.json").exists()
    again = olmo_iv.load(folder)
    ids = torch.randint(0, 300, (1, 6))
    torch.testing.assert_close(again(ids), tiny_model(ids), rtol=0, atol=0)
    from transformers import Olmo2ForCausalLM  # transformers reads what we write

    hf = Olmo2ForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (hf(ids).logits - tiny_model(ids)).abs().max() <= 1e-5


def test_tokenizer_json_is_loaded(tmp_path, tiny_checkpoint):
    from tokenizers import Tokenizer, models

    folder = tmp_path / "with_tok"
    shutil.copytree(tiny_checkpoint[0], folder)
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    assert olmo_iv.load(folder).tokenizer.encode("a").ids == [0]


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(OlmoIVError, match="no such directory"):
        olmo_iv.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OlmoIVError, match="has no config.json"):
        olmo_iv.load(tmp_path / "empty")


def test_hub_id_not_cached_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(OlmoIVError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        olmo_iv.load("allenai/OLMo-2-0425-1B")


def test_wrong_model_type(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "llama"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OlmoIVError, match="model_type='llama'.*OLMo-2 and OLMo-3 only"):
        olmo_iv.load(checkpoint)


def _rewrite(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_unexpected_misshaped_tensors(checkpoint):
    _rewrite(checkpoint, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(OlmoIVError, match="missing tensors model.layers.1.mlp.up_proj.weight"):
        olmo_iv.load(checkpoint)
    _rewrite(checkpoint, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 64),
                                              "model.layers.7.extra.weight": torch.zeros(2)}))
    with pytest.raises(OlmoIVError, match="unexpected tensors model.layers.7.extra.weight"):
        olmo_iv.load(checkpoint)
    _rewrite(checkpoint, lambda s: (s.pop("model.layers.7.extra.weight"),
                                    s.update({"model.norm.weight": torch.zeros(65)})))
    with pytest.raises(OlmoIVError, match=r"model.norm.weight .* has shape \(65,\).*\(64,\)"):
        olmo_iv.load(checkpoint)


def test_corrupt_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OlmoIVError, match="not a readable safetensors file"):
        olmo_iv.load(checkpoint)


def test_pickle_weights_are_refused(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(OlmoIVError, match="safetensors only"):
        olmo_iv.load(checkpoint)


def test_missing_shard(tmp_path):
    folder, _ = make_hf_checkpoint(tmp_path, max_shard_size="100KB")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(OlmoIVError, match=f"shard {shard.name} .* is missing"):
        olmo_iv.load(folder)


def test_unavailable_or_malformed_device(tiny_checkpoint):
    if not torch.cuda.is_available():
        with pytest.raises(OlmoIVError, match=r"^device='cuda': this torch has no CUDA device.*device='cpu'"):
            olmo_iv.load(tiny_checkpoint[0], device="cuda")
    with pytest.raises(OlmoIVError, match="device='gpu' is not a torch device"):
        olmo_iv.load(tiny_checkpoint[0], device="gpu")


def test_dtype_names(tiny_checkpoint):
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16),
                        ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        assert olmo_iv.load(tiny_checkpoint[0], dtype=name).dtype == dtype
    with pytest.raises(OlmoIVError, match=r"dtype='float8' is not supported: use 'float32', 'bfloat16'"):
        olmo_iv.load(tiny_checkpoint[0], dtype="float8")
    with pytest.raises(OlmoIVError, match=r"dtype=torch.int8 is not supported"):
        olmo_iv.load(tiny_checkpoint[0], dtype=torch.int8)


def test_non_finite_weights_are_named(checkpoint):
    def poison(s):
        s["model.layers.2.mlp.down_proj.weight"][3, 4] = float("nan")

    _rewrite(checkpoint, poison)
    with pytest.raises(OlmoIVError, match=r"tensor model.layers.2.mlp.down_proj.weight in model.safetensors holds "
                                          r"NaN or inf values \(the checkpoint is corrupt"):
        olmo_iv.load(checkpoint)
    _rewrite(checkpoint, lambda s: s["model.layers.2.mlp.down_proj.weight"].fill_(1e6))
    with pytest.raises(OlmoIVError, match=r"down_proj.weight .*its values overflow float16"):
        olmo_iv.load(checkpoint, dtype="float16")


def test_name_mapping_is_a_bijection(tiny_model):
    from olmo_iv.loading import our_name

    names = [n for n, _ in tiny_model.named_parameters()]
    assert hf_name("blocks.1.ln_attn.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_name("blocks.0.attn.q_norm.weight") == "model.layers.0.self_attn.q_norm.weight"
    assert hf_name("ln_final.weight") == "model.norm.weight" and hf_name("lm_head.weight") == "lm_head.weight"
    assert [our_name(hf_name(n)) for n in names] == names
    assert len({hf_name(n) for n in names}) == len(names)
