"""The batched, prefix-sharing patching engine equals the straightforward method, and its metrics are right."""

from __future__ import annotations

import pytest
import torch

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.interventions.patching import (
    PatchResult,
    answer_rank,
    layer_grid,
    patch_layers,
    work_per_sample,
)
from olmo_iv.reference import patch_layers_reference
from tests.conftest import make_hf_checkpoint


@pytest.fixture(scope="module")
def five_layer(tmp_path_factory):
    folder, _ = make_hf_checkpoint(tmp_path_factory.mktemp("five"), seed=3, num_hidden_layers=5, num_key_value_heads=2)
    return olmo_iv.load(folder)


def _samples(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randint(0, 300, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g) for _ in range(n)]
    sources[-1] = sources[0]  # a shared instruction: its source run is done once
    targets = [torch.randint(0, 300, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g) for _ in range(n)]
    answers = [int(a) for a in torch.randint(0, 300, (n,), generator=g)]
    return sources, targets, answers


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("target_pos", [0, -1])
def test_engine_equals_straightforward_method(five_layer, size, target_pos):
    sources, targets, answers = _samples(size * 10 + target_pos)
    sets = layer_grid(5, size)
    fast = patch_layers(five_layer, sources, targets, answers, sets, target_pos=target_pos)
    logits, ranks = patch_layers_reference(five_layer, sources, targets, answers, sets, target_pos=target_pos)
    assert fast.logit_patched.shape == (6, len(sets))
    assert (fast.logit_patched - logits).abs().max() <= 1e-5
    assert torch.equal(fast.rank_patched, ranks)
    # the target-only run: logits of the plain target at its last position
    for i, t in enumerate(targets):
        logit, rank = answer_rank(five_layer(t[None], logits_at=-1), torch.tensor([answers[i]]))
        assert abs(float(logit) - float(fast.logit_target[i])) <= 1e-5 and int(rank) == int(fast.rank_target[i])


def test_explicit_sets_diagonal_and_order(five_layer):
    sources, targets, answers = _samples(7)
    sets = [(4, 1), (2, 2), (2,), (0, 3, 4), (3,)]
    r = patch_layers(five_layer, sources, targets, answers, sets)
    assert r.layer_sets == sets  # the caller's order and spelling are kept
    torch.testing.assert_close(r.logit_patched[:, 1], r.logit_patched[:, 2], rtol=0, atol=0)  # (l, l) is (l,)
    logits, ranks = patch_layers_reference(five_layer, sources, targets, answers, sets)
    assert (r.logit_patched - logits).abs().max() <= 1e-5 and torch.equal(r.rank_patched, ranks)


def test_last_layer_patch_at_position_0_cannot_reach_the_last_token(five_layer):
    sources, _, answers = _samples(8)
    targets = [torch.tensor([5, 6, 7]), torch.tensor([9, 10])]
    r = patch_layers(five_layer, sources[:2], targets, answers[:2], [(4,), (1, 4), (1,)], target_pos=0)
    # multi-token query: block L-1 at position 0 changes nothing (up to the last bits of differently shaped GEMMs)
    assert torch.all(r.logit_diff[:, 0].abs() <= 1e-6) and torch.equal(r.rank_patched[:, 0], r.rank_target)
    torch.testing.assert_close(r.logit_patched[:, 1], r.logit_patched[:, 2], rtol=0, atol=1e-6)


def test_layer_grid_counts_and_authors_order():
    g = layer_grid(16, 2)
    assert len(g) == 136 and g[:2] == [(0, 1), (0, 2)] and g[119] == (14, 15) and g[120:] == [(l, l) for l in range(16)]
    assert len(layer_grid(16, 2, diagonal=False)) == 120
    assert len(layer_grid(16, 3)) == 560 and len(layer_grid(32, 3)) == 4960 and len(layer_grid(32, 2)) == 528
    assert work_per_sample(layer_grid(16, 2), 16)["ratio"] > 3


def test_rank_by_counting_equals_argsort_position():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 1000, generator=g)
    answers = torch.randint(0, 1000, (50,), generator=g)
    before = logits.clone()
    _, rank = answer_rank(logits, answers)
    assert torch.equal(logits, before)  # the caller's logits are untouched unless consume=True
    order = logits.argsort(dim=1, descending=True)
    expected = (order == answers[:, None]).float().argmax(1) + 1
    assert torch.equal(rank, expected)


def test_reciprocal_rank_sentinel():
    rank = torch.tensor([1, 4, 1000, 1001])
    r = PatchResult([(0,)], torch.zeros(4), rank, torch.zeros(4, 1), rank[:, None], max_rank=1000, rr_sentinel=-1.0)
    assert r.rr_target.tolist() == [1.0, 0.25, 0.001, -1.0]
    r.rr_sentinel = 0.0
    assert r.rr_target.tolist()[-1] == 0.0
    assert torch.all(r.rr_diff == 0)


def test_bad_input_errors(five_layer):
    s, t, a = _samples(9, 2)
    with pytest.raises(OlmoIVError, match="layer 5 is out of range: this model has layers 0..4"):
        patch_layers(five_layer, s, t, a, [(1, 5)])
    with pytest.raises(OlmoIVError, match="list of layer sets is empty"):
        patch_layers(five_layer, s, t, a, [])
    with pytest.raises(OlmoIVError, match="empty layer set"):
        patch_layers(five_layer, s, t, a, [()])
    with pytest.raises(OlmoIVError, match=r"answer id 300 is outside the vocabulary \[0, 300\)"):
        patch_layers(five_layer, s, t, [1, 300], [(1,)])
    with pytest.raises(OlmoIVError, match="give one of each per sample"):
        patch_layers(five_layer, s, t, a[:1], [(1,)])
    with pytest.raises(OlmoIVError, match="target_pos 7 is outside"):
        patch_layers(five_layer, s, t, a, [(1,)], target_pos=7)
