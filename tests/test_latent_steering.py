"""SAE latents for SAIF: steering with them (latent vectors, clamping in SAE space with the error term kept, SDCV
denoising, top-1 decaying steering) and reading them (logit-lens proximity to an instruction's tokens, output
score), each checked against a straightforward computation on a tiny random OLMo-2 model and small SAEs."""

from __future__ import annotations

import pytest
import torch

from olmo_iv import OlmoIVError
from olmo_iv.analysis.latents import LatentScorer, instruction_proximity, output_score
from olmo_iv.interventions.steering import (
    ClampLatents,
    Steer,
    check_specs,
    decoder_rows,
    generate_steered,
    latent_steer,
    latent_vector,
    sdcv,
    steering_hooks,
)
from olmo_iv.model import ModelConfig, OLMo2, init_weights
from olmo_iv.sae import SAE, SAEConfig

PROMPTS = [[5, 9, 17, 3], [44, 2, 8, 31, 7, 12, 60], [1], [23, 23, 9, 40, 2]]
LAYER = 2
HOOK = f"blocks.{LAYER}.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=64, eos_token_id=0)
    m = init_weights(OLMo2(cfg), seed=3).eval()
    with torch.no_grad():  # a non-trivial final gain, so that forgetting it (or applying it twice) shows
        m.ln_final.weight.copy_(1 + 0.4 * torch.randn(32, generator=torch.Generator().manual_seed(9)))
    return m


@pytest.fixture(scope="module")
def sae():
    s = SAE(SAEConfig(d_in=32, d_sae=64, k=8, hook_name=HOOK), seed=1)
    with torch.no_grad():
        s.b_dec.copy_(0.01 * torch.randn(32, generator=torch.Generator().manual_seed(2)))
    return s


def _resid(model, ids: torch.Tensor, layer: int = LAYER) -> torch.Tensor:
    return model(ids, stop_at_layer=layer + 1)


def _captured(model, specs, ids: torch.Tensor, name: str = HOOK) -> torch.Tensor:
    """The activation at `name` after the specs' hooks have edited it."""
    seen = []
    hooks = steering_hooks(specs)
    hooks.setdefault(name, []).append(lambda x, n: seen.append(x.clone()))
    with model.hooks(hooks):
        model(ids)
    return seen[0]


def _invertible_sae(rescale: bool) -> SAE:
    """Undercomplete ReLU SAE with W_dec @ W_enc = I and a large encoder bias: on small residuals every latent is
    active, so encode is affine and decode inverts it exactly on the latents (re-encoding returns the codes)."""
    g = torch.Generator().manual_seed(4)
    s = SAE(SAEConfig(d_in=32, d_sae=16, architecture="standard", k=None, hook_name=HOOK, input_scale=0.5,
                      rescale_acts_by_decoder_norm=rescale), seed=None)
    with torch.no_grad():
        s.W_dec.copy_(torch.randn(16, 32, generator=g) * (0.5 + torch.rand(16, 1, generator=g)))
        s.W_enc.copy_(torch.linalg.pinv(s.W_dec.double()).float())
        s.b_enc.fill_(10.0)
        s.b_dec.copy_(0.1 * torch.randn(32, generator=g))
    return s


# -- ClampLatents -----------------------------------------------------------------------------------------------


def test_clamping_to_the_current_codes_is_the_identity_at_every_position(model, sae):
    ids = torch.tensor([PROMPTS[1]])
    codes = sae.encode(_resid(model, ids))[0]  # [T, d_sae]
    for p in range(ids.shape[1]):
        # the latents firing at p and two silent ones, clamped to their codes at p, only at p (the last position)
        fired = codes[p].nonzero()[:, 0].tolist()
        silent = [j for j in range(64) if codes[p, j] == 0][:2]
        latents = fired + silent
        assert len(fired) == 8
        spec = ClampLatents(sae, latents, values=codes[p, latents], positions="last_prompt")
        head = ids[:, :p + 1]
        plain, edited = _resid(model, head), _captured(model, [spec], head)
        assert (edited - plain).abs().max() <= 1e-5
        with model.hooks(steering_hooks([spec])):
            steered = model(head)
        assert (steered - model(head)).abs().max() <= 1e-5
    # the edit alone, on every position of a batch at once, with the codes the hook itself computes
    x = _resid(model, torch.tensor([PROMPTS[0], PROMPTS[3][:4]]))
    silent_everywhere = [j for j in range(64) if bool((sae.encode(x)[..., j] == 0).all())][:3]
    spec = ClampLatents(sae, silent_everywhere, values=0.0)
    assert torch.equal(spec.edit(x, torch.ones(x.shape[1])), x)


def test_coefficient_zero_is_bit_identical_to_no_hook(model, sae):
    ids = torch.tensor([PROMPTS[1]])
    spec = ClampLatents(sae, [3, 17, 40], values=[4.0, 5.0, 6.0], coef=0.0)
    with model.hooks(steering_hooks([spec])):
        steered = model(ids)
    assert torch.equal(steered, model(ids))
    assert generate_steered(model, PROMPTS, [spec], max_new_tokens=6) == \
        generate_steered(model, PROMPTS, [], max_new_tokens=6)
    # and the same spec at full strength does change the output (the zero above is not vacuous)
    full = ClampLatents(sae, [3, 17, 40], values=[4.0, 5.0, 6.0])
    with model.hooks(steering_hooks([full])):
        assert not torch.allclose(model(ids), steered)


@pytest.mark.parametrize("coef", [1.0, 0.25])
def test_clamp_edit_is_the_decoded_code_change(model, sae, coef):
    """What is exactly true for any SAE: h' = h + decode(new) - decode(codes), new = codes moved toward values."""
    ids = torch.tensor([PROMPTS[1]])
    h = _resid(model, ids)
    latents, values = [3, 17, 40], torch.tensor([4.0, 5.0, 6.0])
    edited = _captured(model, [ClampLatents(sae, latents, values=values, coef=coef)], ids)
    codes = sae.encode(h)
    new = codes.clone()
    new[..., latents] = codes[..., latents] + coef * (values - codes[..., latents])
    want = h + sae.decode(new) - sae.decode(codes)
    torch.testing.assert_close(edited, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rescale", [False, True])
def test_reencoding_the_clamped_activation_gives_the_targets(model, rescale):
    sae = _invertible_sae(rescale)
    ids = torch.tensor([PROMPTS[1]])
    h = _resid(model, ids)
    assert bool((sae.pre_acts(h) > 0).all())  # the regime where encode is affine and decode inverts it
    latents, values = [2, 5, 11], torch.tensor([3.0, 0.5, 7.0])
    for coef in (1.0, 0.3):
        edited = _captured(model, [ClampLatents(sae, latents, values=values, coef=coef)], ids)
        before, after = sae.encode(h), sae.encode(edited)
        want = before.clone()
        want[..., latents] += coef * (values - before[..., latents])
        torch.testing.assert_close(after, want, atol=1e-4, rtol=0)
        if coef == 1.0:
            torch.testing.assert_close(after[..., latents], values.expand(1, ids.shape[1], 3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("specs", [
    ["clamp"],
    ["clamp_generated_decay", "steer"],
    ["clamp_last_prompt", "steer_other_layer"],
], ids=["clamp", "clamp+steer", "clamp_last+steer"])
def test_cached_generation_equals_full_recompute(model, sae, specs):
    u = torch.randn(32, generator=torch.Generator().manual_seed(5))
    make = {
        "clamp": lambda: ClampLatents(sae, [3, 17, 40], values=[6.0, 6.0, 6.0]),
        "clamp_generated_decay": lambda: ClampLatents(sae, [3, 17], values=8.0, positions="generated", decay=0.8),
        "clamp_last_prompt": lambda: ClampLatents(sae, [5, 40], values=9.0, positions="last_prompt"),
        "steer": lambda: Steer(layer=LAYER, vector=u, coef=4.0),  # same hook point, after the clamp
        "steer_other_layer": lambda: Steer(layer=0, vector=u, coef=5.0, positions="prompt"),
    }
    specs = [make[s]() for s in specs]
    cached = generate_steered(model, PROMPTS, specs, max_new_tokens=10, batch_size=3)
    recompute = generate_steered(model, PROMPTS, specs, max_new_tokens=10, batch_size=3, use_cache=False)
    assert cached == recompute and cached != generate_steered(model, PROMPTS, [], max_new_tokens=10, batch_size=3)


def test_clamp_spec_defaults_and_errors(model, sae):
    spec = ClampLatents(sae, [1, 2], values=3.0)
    assert (spec.layer, spec.hook, spec.hook_name) == (LAYER, "hook_resid_post", HOOK)
    assert spec.values.tolist() == [3.0, 3.0] and "sae=" not in repr(spec)
    assert ClampLatents(sae, [1], values=1.0, layer=3, hook="hook_resid_pre").hook_name == "blocks.3.hook_resid_pre"
    for kw, msg in [(dict(latents=[64]), "out of range"), (dict(latents=[1, 1]), "repeats"),
                    (dict(latents=[]), "empty"), (dict(values=[1.0, 2.0, 3.0]), "3 entries"),
                    (dict(values=float("nan")), "NaN"), (dict(positions="middle"), "positions"),
                    (dict(coef=float("inf")), "coef"), (dict(decay=0.0), "decay")]:
        args = dict(latents=[1, 2], values=1.0) | kw
        with pytest.raises(OlmoIVError, match=msg):
            ClampLatents(sae, **args)
    with pytest.raises(OlmoIVError, match="not a block"):
        ClampLatents(SAE(SAEConfig(d_in=32, d_sae=8, k=2), seed=0), [1], values=1.0)
    with pytest.raises(OlmoIVError, match="d_in=16"):
        check_specs(model, [ClampLatents(SAE(SAEConfig(d_in=16, d_sae=8, k=2, hook_name=HOOK)), [1], values=1.0)])


# -- vectors from latents ---------------------------------------------------------------------------------------


def test_latent_vector_is_the_weighted_sum_of_decoder_rows(model, sae):
    latents, w = [4, 9, 33], torch.tensor([0.5, 2.0, -1.25])
    v = latent_vector(sae, latents, w)
    explicit = sum(float(wj) * sae.W_dec[j] for j, wj in zip(latents, w))
    torch.testing.assert_close(v, explicit.detach(), atol=1e-6, rtol=0)
    # with an input scale and SAELens' decoder-norm rescaling: what these codes add to the reconstruction
    odd, few = _invertible_sae(rescale=True), [4, 9, 13]
    codes = torch.zeros(16)
    codes[few] = w
    torch.testing.assert_close(latent_vector(odd, few, w), (odd.decode(codes) - odd.decode(0 * codes)).detach(),
                               atol=1e-5, rtol=0)
    # Steer(add) with it, at coef = its norm, adds v itself at every position
    ids = torch.tensor([PROMPTS[1]])
    edited = _captured(model, [Steer(layer=LAYER, vector=v, coef=float(v.norm()))], ids)
    torch.testing.assert_close(edited, _resid(model, ids) + v, atol=1e-5, rtol=0)
    with pytest.raises(OlmoIVError, match="2 entries for 3"):
        latent_vector(sae, latents, [1.0, 2.0])


def test_scorer_weights_are_the_table_statistics():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(40, 16, generator=g) * 3, torch.rand(30, 16, generator=g)
    s = LatentScorer(16)
    s.add(pos[:25], positive=True)
    s.add(pos[25:], positive=True)
    s.add(neg, positive=False)
    latents = [7, 2, 11]
    rows = s.table(latents)
    torch.testing.assert_close(s.weights(latents), torch.tensor([r["mu_pos"] for r in rows]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.weights(latents, by="mean_diff"),
                               pos[:, latents].mean(0) - neg[:, latents].mean(0), atol=1e-6, rtol=0)
    assert torch.equal(s.weights(latents, by="max_pos"), pos[:, latents].max(0).values)
    with pytest.raises(OlmoIVError, match="by="):
        s.weights(latents, by="median")


def test_sdcv_projects_onto_the_span_of_the_decoder_rows(sae):
    latents = [1, 8, 20, 41]
    A = decoder_rows(sae, latents).double()  # [4, 32]
    g = torch.Generator().manual_seed(6)
    inside = (torch.randn(4, generator=g, dtype=torch.float64) @ A)
    # a component orthogonal to every row: a random vector minus its projection (via QR, independent of lstsq)
    q, _ = torch.linalg.qr(A.T)
    r = torch.randn(32, generator=g, dtype=torch.float64)
    outside = r - q @ (q.T @ r)
    assert (A @ outside).abs().max() < 1e-10
    torch.testing.assert_close(sdcv(inside.float(), sae, latents).double(), inside, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdcv((inside + outside).float(), sae, latents).double(), inside, atol=1e-5, rtol=0)
    # any vector: the result is in the span, and what it removes is orthogonal to every row
    v = torch.randn(32, generator=g)
    p = sdcv(v, sae, latents).double()
    torch.testing.assert_close(p, q @ (q.T @ p), atol=1e-5, rtol=0)
    assert (A @ (v.double() - p)).abs().max() < 1e-5
    scaled = sdcv(v, sae, latents, rescale=True)
    torch.testing.assert_close(scaled.norm(), v.norm(), atol=1e-5, rtol=0)
    assert torch.allclose(scaled / scaled.norm(), p.float() / p.norm().float(), atol=1e-6)
    # repeated directions (a rank-deficient system) still give the projection
    dup = SAE(SAEConfig(d_in=32, d_sae=64, k=8, hook_name=HOOK), seed=1)
    with torch.no_grad():
        dup.W_dec[2] = 2 * dup.W_dec[1]
    torch.testing.assert_close(sdcv(v, dup, [1, 2, 8]), sdcv(v, dup, [1, 8]), atol=1e-5, rtol=0)
    with pytest.raises(OlmoIVError, match="orthogonal"):
        sdcv(outside.float(), sae, latents, rescale=True)
    with pytest.raises(OlmoIVError, match="d_in is 32"):
        sdcv(torch.ones(31), sae, latents)


def test_top1_latent_with_decay_is_a_steer(model, sae):
    """S6 (Xie 2025): the top-1 latent added with a decaying strength is a plain Steer on its decoder row."""
    spec = latent_steer(sae, 17, 6.0, decay=0.5)
    plain = Steer(layer=LAYER, vector=sae.W_dec[17], mode="add", coef=6.0, decay=0.5)
    assert torch.equal(spec.vector, plain.vector) and spec.hook_name == plain.hook_name
    # prompt positions get coef, the k-th generated one coef·γ^k
    assert spec.weights(0, 7, 4, torch.device("cpu")).tolist() == [6.0] * 4 + [6.0, 3.0, 1.5]
    out = generate_steered(model, PROMPTS, [spec], max_new_tokens=8)
    assert out == generate_steered(model, PROMPTS, [plain], max_new_tokens=8)
    assert out == generate_steered(model, PROMPTS, [spec], max_new_tokens=8, use_cache=False)


# -- interpretation ---------------------------------------------------------------------------------------------


def _planted(model, latent: int, token: int, hook_name: str = HOOK) -> SAE:
    """An SAE whose latent's decoder row, through the final norm's gain, is the token's unembedding row."""
    s = SAE(SAEConfig(d_in=32, d_sae=64, k=8, hook_name=hook_name), seed=1)
    with torch.no_grad():
        s.W_dec[latent] = model.lm_head.weight[token] / model.ln_final.weight
    return s


def test_instruction_proximity_ranks_equal_a_full_sort(model, sae):
    latents, tokens = [0, 5, 17, 63], [12, 40, 77]
    resid = torch.randn(32, generator=torch.Generator().manual_seed(8))
    rows = instruction_proximity(model, sae, latents, tokens, k=10, instruction_resid=resid)
    for row, j in zip(rows, latents):
        # the full model's final norm and unembedding on the decoder row (the RMS scale changes no rank)
        logits = model.unembed(sae.W_dec[j][None, None].detach())[0, 0]
        order = logits.argsort(descending=True).tolist()
        ranks = [order.index(t) + 1 for t in tokens]
        assert row["ranks"] == ranks and row["rank"] == min(ranks) and row["token"] == tokens[ranks.index(min(ranks))]
        assert row["rr"] == 1 / min(ranks) and row["top"] == order[:10] and row["hits"] == sum(r <= 10 for r in ranks)
        d = sae.W_dec[j].detach() * model.ln_final.weight.detach()
        cos = torch.nn.functional.cosine_similarity(d[None], model.lm_head.weight[tokens].detach())
        assert row["cos_max"] == pytest.approx(float(cos.max()), abs=1e-6)
        assert row["cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
        want = torch.nn.functional.cosine_similarity(sae.W_dec[j].detach(), resid, dim=0)
        assert row["cos_resid"] == pytest.approx(float(want), abs=1e-6)


def test_a_latent_planted_on_a_token_ranks_it_first(model):
    sae = _planted(model, latent=9, token=42)
    row = instruction_proximity(model, sae, [9], [3, 42, 80], k=5)[0]
    assert row["rank"] == 1 and row["token"] == 42 and row["top"][0] == 42
    assert row["cos_max"] == pytest.approx(1.0, abs=1e-6) and "cos_resid" not in row
    with pytest.raises(OlmoIVError, match="vocabulary"):
        instruction_proximity(model, sae, [9], [96])
    with pytest.raises(OlmoIVError, match="latent=64"):
        instruction_proximity(model, sae, [64], [1])


def test_output_score_of_a_planted_latent(model):
    L = model.config.n_layers - 1
    sae = _planted(model, latent=9, token=42, hook_name=f"blocks.{L}.hook_resid_post")
    prompts = PROMPTS + [[7, 7, 7, 7, 7, 7]]
    out = output_score(model, sae, 9, prompts, [42, 5], coef=3.0, batch_size=2)
    assert out["prob_gain"][0] > 0 and out["logit_gain"][0] > 0 and out["rank_gain"][0] >= 0 and out["score"] != 0
    assert out["n_prompts"] == 5 and out["targets"] == [42, 5] and out["hook_name"] == sae.cfg.hook_name
    # the straightforward computation, prompt by prompt: the last block's output plus coef·u, unembedded
    u = sae.W_dec[9].detach() / sae.W_dec[9].detach().norm()
    base, steered = [], []
    for p in prompts:
        with torch.no_grad():
            x = model(torch.tensor([p]), stop_at_layer=L + 1)
        base.append(model.unembed(x)[0, -1].softmax(-1)[[42, 5]])
        steered.append(model.unembed(x + 3.0 * u)[0, -1].softmax(-1)[[42, 5]])
    base, steered = torch.stack(base).mean(0).detach(), torch.stack(steered).mean(0).detach()
    torch.testing.assert_close(torch.tensor(out["prob_base"]).float(), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(out["prob_steered"]).float(), steered, atol=1e-5, rtol=1e-4)
    assert out["score"] == pytest.approx(float((steered - base).sum()), abs=1e-5)
    zero = output_score(model, sae, 9, prompts, [42, 5], coef=0.0)
    assert zero["prob_gain"] == [0.0, 0.0] and zero["logit_gain"] == [0.0, 0.0] and zero["rank_gain"] == [0.0, 0.0]
    # a mid-layer SAE amplified far enough also promotes the token
    mid = _planted(model, latent=9, token=42)
    assert output_score(model, mid, 9, prompts, [42], coef=50.0)["prob_gain"][0] > 0
    with pytest.raises(OlmoIVError, match="empty"):
        output_score(model, sae, 9, [], [42], coef=1.0)
