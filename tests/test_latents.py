"""SAIF latent scoring: planted instruction latents rank first under every method that should find them; latents
that fire on the negatives are excluded; AUROC equals sklearn's; streaming equals one batch."""

from __future__ import annotations

import pytest
import torch

from olmo_iv import OlmoIVError
from olmo_iv.analysis.latents import METHODS, LatentScorer

PLANTED = [3, 7, 11]
CONTENT = 5  # fires on positives and negatives alike: a content latent, not an instruction latent


def _codes(n: int, positive: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.relu(torch.randn(n, 64, generator=g) - 1.5)  # sparse background noise
    c[:, CONTENT] = 3.0 + torch.rand(n, generator=g)
    if positive:
        c[:, PLANTED] = 2.0 + torch.rand(n, len(PLANTED), generator=g)
    else:
        c[:, PLANTED] = 0.0  # the instruction latents are silent without the instruction
    return c


def _scorer(**kw) -> LatentScorer:
    s = LatentScorer(64, **kw)
    for k, variant in enumerate(("en-1", "en-2", "fr", "de")):
        s.add(_codes(30, True, seed=k), positive=True, variant=variant)
    s.add(_codes(80, False, seed=10), positive=False)
    return s


@pytest.mark.parametrize("method", [m for m in METHODS if m != "consistency"])
def test_planted_latents_rank_first(method):
    top = _scorer().top(3, method=method)
    assert sorted(top) == PLANTED, (method, top)


def test_latents_that_fire_on_negatives_are_excluded():
    s = _scorer()
    assert s.scores("saif")[CONTENT] == float("-inf") and CONTENT not in s.top(64, "saif")
    assert CONTENT in s.top(10, "consistency")  # consistency alone cannot tell content from instruction
    row = s.table([PLANTED[0]])[0]
    assert row["f_pos"] == 1.0 and row["f_neg"] == 0.0 and row["f_fr"] == 1.0 and row["mu_pos"] > 2


def test_auroc_equals_sklearn_and_streaming_equals_one_batch():
    from sklearn.metrics import roc_auc_score

    s = _scorer()
    pos, neg = torch.cat(s.values[True]), torch.cat(s.values[False])
    y = [1] * len(pos) + [0] * len(neg)
    auroc = s.auroc()
    for i in (0, CONTENT, PLANTED[1], 40):
        x = torch.cat([pos[:, i], neg[:, i]]).numpy()
        want = roc_auc_score(y, x) if len(set(x.tolist())) > 1 else 0.5
        assert auroc[i].item() == pytest.approx(want, abs=1e-12)
    one = LatentScorer(64)
    one.add(pos, positive=True)
    one.add(neg, positive=False)
    for m in ("mean_diff", "freq_diff", "cohen_d", "auroc"):
        torch.testing.assert_close(one.scores(m), s.scores(m))


def test_errors():
    with pytest.raises(OlmoIVError, match="positive and negative"):
        LatentScorer(8).scores()
    with pytest.raises(OlmoIVError, match=r"\[N, 8\]"):
        LatentScorer(8).add(torch.zeros(3, 9), positive=True)
    with pytest.raises(OlmoIVError, match="NaN"):
        LatentScorer(8).add(torch.full((2, 8), float("nan")), positive=True)
    with pytest.raises(OlmoIVError, match="tau"):
        LatentScorer(8, tau=2)
