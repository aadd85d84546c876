"""Greedy generation: token equality with transformers' generate, KV cache vs recomputation, stopping rules."""

from __future__ import annotations

import pytest
import torch

import olmo_iv
from olmo_iv.errors import OlmoIVError
from olmo_iv.generate import decode, generate, generate_text, left_pad, newline_mask
from tests.conftest import make_hf_checkpoint

# Prompts of different lengths, longest first (generate sorts by length, so transformers sees the same batch).
PROMPTS = [[5, 17, 200, 3, 44, 91, 12, 250, 7], [9, 120, 33, 8, 61], [101, 2, 77], [42, 43], [299]]


def word_tokenizer(vocab_size: int = 300, newline_every: int = 7):
    """A word-level tokenizer whose token i is 'w{i}', or 'w{i}\\n' for every `newline_every`-th id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}" + ("\n" if i % newline_every == 0 else ""): i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def hf_generate(hf, prompts, n):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("gqa"), seed=3, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=2)


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_equals_transformers_generate(which, tiny_checkpoint, gqa_checkpoint):
    folder, hf = tiny_checkpoint if which == "mha" else gqa_checkpoint
    model = olmo_iv.load(folder)
    ours = generate(model, PROMPTS, max_new_tokens=8, stop_at_newline=False, batch_size=len(PROMPTS))
    theirs = hf_generate(hf, PROMPTS, 8)
    assert ours == theirs
    assert all(len(r) == 8 for r in ours)
    # the generations are not degenerate (a constant output would make the comparison weak)
    assert len({tuple(r) for r in ours}) > 1


def test_cache_equals_recompute_and_batching_is_invisible(tiny_model):
    cached = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_at_newline=False, batch_size=5)
    full = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_at_newline=False, batch_size=5, use_cache=False)
    alone = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_at_newline=False, batch_size=1)
    pairs = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_at_newline=False, batch_size=2)
    assert cached == full == alone == pairs


def test_cache_logits_equal_recompute(tiny_model):
    """The last-position logits of each cached step equal a full forward over the grown sequence."""
    ids, mask = left_pad(PROMPTS[:3])
    cache = olmo_iv.KVCache.empty(tiny_model.config.n_layers)
    step = ids
    with torch.no_grad():
        for _ in range(4):
            lc = tiny_model(step, attention_mask=mask, kv_cache=cache, logits_at=-1)
            lf = tiny_model(ids, attention_mask=mask, logits_at=-1)
            torch.testing.assert_close(lc, lf, rtol=1e-5, atol=1e-5)
            step = lc.argmax(-1)[:, None]
            ids, mask = torch.cat((ids, step), 1), torch.cat((mask, torch.ones_like(step)), 1)


def test_stops_at_newline_and_stop_ids(tiny_model):
    tok = word_tokenizer()
    free = generate(tiny_model, PROMPTS, max_new_tokens=12, stop_at_newline=False)
    is_nl = newline_mask(tok, tiny_model.config.vocab_size)
    assert int(is_nl.sum()) == len(range(0, 300, 7))

    def cut(row, stops):
        for j, t in enumerate(row):
            if t in stops:
                return row[: j + 1]
        return row

    nl_ids = {i for i in range(300) if i % 7 == 0}
    stopped = generate(tiny_model, PROMPTS, max_new_tokens=12, tokenizer=tok)
    assert stopped == [cut(r, nl_ids) for r in free]
    # a stop id that appears in some row but not as its first token exercises truncation mid-batch
    extra = free[0][3]
    stopped2 = generate(tiny_model, PROMPTS, max_new_tokens=12, stop_at_newline=False, stop_ids=[extra])
    assert stopped2 == [cut(r, {extra}) for r in free]
    assert len(stopped2[0]) == free[0].index(extra) + 1 <= 4


def test_string_prompts_and_text(tiny_model):
    tok = word_tokenizer()
    texts = [" ".join(f"w{i}" for i in p if i % 7) for p in PROMPTS]  # no newline tokens inside prompts
    rows = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    by_ids = generate(tiny_model, rows, max_new_tokens=6, tokenizer=tok)
    assert generate(tiny_model, texts, max_new_tokens=6, tokenizer=tok) == by_ids
    assert generate_text(tiny_model, texts, max_new_tokens=6, tokenizer=tok) == [decode(tok, r) for r in by_ids]
    assert decode(tok, [14, 3]) == "w14\n w3"


def test_errors(tiny_model):
    with pytest.raises(OlmoIVError, match="tokenizer"):
        generate(tiny_model, PROMPTS)  # the random checkpoint has no tokenizer.json
    with pytest.raises(OlmoIVError, match="tokenizer"):
        generate(tiny_model, ["hello"], stop_at_newline=False)
    with pytest.raises(OlmoIVError, match="empty prompt"):
        generate(tiny_model, [[1], []], stop_at_newline=False)
    with pytest.raises(OlmoIVError, match="outside the vocabulary"):
        generate(tiny_model, PROMPTS, stop_at_newline=False, stop_ids=[10**6])
    assert generate(tiny_model, PROMPTS, max_new_tokens=0, stop_at_newline=False) == [[] for _ in PROMPTS]
