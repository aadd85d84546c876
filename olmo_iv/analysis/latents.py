"""Which SAE latents carry an instruction (SAIF, He et al., arXiv 2502.11356): score every latent by how it separates
prompts with the instruction (positives, in several variants: paraphrases, translations) from the same content
without it (negatives).

    scorer = LatentScorer(sae.cfg.d_sae)
    scorer.add(codes_with, positive=True, variant="en-1")      # [N, d_sae] codes, streamed batch by batch
    scorer.add(codes_without, positive=False)
    top = scorer.top(k=16, method="saif")                      # latent ids, best first
    rows = scorer.table()                                      # mu+, mu-, f+, f-, per-variant firing

Methods (one score per latent, higher = more instruction-specific):
- mean_diff: mu+ - mu- (mean activation);
- freq_diff: f+ - f- (firing frequency, activation > threshold);
- consistency: the lowest firing frequency over the positive variants (fires for every phrasing);
- saif: mean_diff x consistency, and -inf for a latent that fires on more than `tau` of the negatives (the
  SAIF-like default: consistent, specific, and not a content latent);
- cohen_d: (mu+ - mu-) / pooled standard deviation;
- auroc: the probability that a positive's activation exceeds a negative's (ties count half).

Interpreting the selected latents (SAIF §1.6 of docs/saif-and-steering.md), returning data:

    instruction_proximity(model, sae, top, ids_of("French", " French", "translate"))   # logit-lens rank, cosines
    output_score(model, sae, j, neutral_prompts, target_ids, coef=8.0)                 # gain when amplified

Steering with them lives in olmo_iv.interventions.steering (latent_vector with `scorer.weights(...)`,
ClampLatents, sdcv, latent_steer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.progress import ProgressFn

METHODS = ("mean_diff", "freq_diff", "consistency", "saif", "cohen_d", "auroc")
WEIGHTS = ("mu_pos", "mean_diff", "max_pos")
"""Per-latent steering weights from a scorer: μ+ (SAIF), μ+ - μ-, or the largest positive activation (for α·max
clamping targets)."""


class LatentScorer:
    """Streaming per-latent statistics of positive and negative codes. Means, variances and firing counts are
    running sums; AUROC needs the values themselves, kept as float32 rows (N x d_sae) unless keep_values=False."""

    def __init__(self, d_sae: int, *, threshold: float = 0.0, tau: float = 0.1, keep_values: bool = True) -> None:
        check_range("d_sae", d_sae, 1)
        check_range("tau", tau, 0, 1)
        self.d_sae, self.threshold, self.tau, self.keep_values = d_sae, threshold, tau, keep_values
        self.n = {True: 0, False: 0}
        self.sum = {True: torch.zeros(d_sae, dtype=torch.float64), False: torch.zeros(d_sae, dtype=torch.float64)}
        self.sumsq = {True: torch.zeros(d_sae, dtype=torch.float64), False: torch.zeros(d_sae, dtype=torch.float64)}
        self.fires = {True: torch.zeros(d_sae, dtype=torch.float64), False: torch.zeros(d_sae, dtype=torch.float64)}
        self.max = {True: torch.full((d_sae,), float("-inf"), dtype=torch.float64),
                    False: torch.full((d_sae,), float("-inf"), dtype=torch.float64)}
        self.variant_n: dict[str, int] = {}
        self.variant_fires: dict[str, Tensor] = {}
        self.values: dict[bool, list[Tensor]] = {True: [], False: []}

    def add(self, codes: Tensor, *, positive: bool, variant: str | None = None) -> None:
        """Add a batch of codes [N, d_sae] (from `sae.encode`) of positive or negative prompts."""
        if codes.dim() != 2 or codes.shape[1] != self.d_sae:
            raise OlmoIVError(f"codes must be [N, {self.d_sae}], got {tuple(codes.shape)}")
        if not bool(torch.isfinite(codes).all()):
            raise OlmoIVError("codes= holds NaN or inf: the activations or the SAE are broken")
        c = codes.detach().double().cpu()
        on = (c > self.threshold).double()
        self.n[positive] += c.shape[0]
        self.sum[positive] += c.sum(0)
        self.sumsq[positive] += (c * c).sum(0)
        self.fires[positive] += on.sum(0)
        if c.shape[0]:
            self.max[positive] = torch.maximum(self.max[positive], c.max(0).values)
        if positive and variant is not None:
            self.variant_n[variant] = self.variant_n.get(variant, 0) + c.shape[0]
            self.variant_fires[variant] = self.variant_fires.get(variant, torch.zeros(self.d_sae, dtype=torch.float64)) + on.sum(0)
        if self.keep_values:
            self.values[positive].append(codes.detach().float().cpu())

    def _need(self) -> None:
        if not self.n[True] or not self.n[False]:
            raise OlmoIVError(f"scoring needs positive and negative codes; got {self.n[True]} and {self.n[False]}")

    def mean(self, positive: bool) -> Tensor:
        return self.sum[positive] / max(self.n[positive], 1)

    def freq(self, positive: bool) -> Tensor:
        return self.fires[positive] / max(self.n[positive], 1)

    def var(self, positive: bool) -> Tensor:
        n = self.n[positive]
        return ((self.sumsq[positive] - n * self.mean(positive) ** 2) / max(n - 1, 1)).clamp(min=0)

    def consistency(self) -> Tensor:
        """The lowest firing frequency over the positive variants (all positives as one variant if none given)."""
        if not self.variant_n:
            return self.freq(True)
        return torch.stack([self.variant_fires[v] / self.variant_n[v] for v in sorted(self.variant_n)]).min(0).values

    def scores(self, method: str = "saif") -> Tensor:
        """One score per latent [d_sae] (float64); see the module docstring for the methods."""
        self._need()
        if method not in METHODS:
            raise OlmoIVError(f"method={method!r}: use one of {', '.join(METHODS)}")
        diff = self.mean(True) - self.mean(False)
        if method == "mean_diff":
            return diff
        if method == "freq_diff":
            return self.freq(True) - self.freq(False)
        if method == "consistency":
            return self.consistency()
        if method == "saif":
            s = diff * self.consistency()
            return torch.where(self.freq(False) > self.tau, torch.full_like(s, float("-inf")), s)
        if method == "cohen_d":
            n1, n0 = self.n[True], self.n[False]
            pooled = ((n1 - 1) * self.var(True) + (n0 - 1) * self.var(False)) / max(n1 + n0 - 2, 1)
            return torch.where(pooled > 0, diff / pooled.sqrt(), torch.zeros_like(diff))
        return self.auroc()

    def auroc(self) -> Tensor:
        """Per latent, P(a positive's code > a negative's) + P(equal) / 2, by the rank-sum (Mann-Whitney U)."""
        self._need()
        if not self.keep_values:
            raise OlmoIVError("AUROC needs the codes themselves: create the scorer with keep_values=True")
        pos, neg = torch.cat(self.values[True]).double(), torch.cat(self.values[False]).double()
        both = torch.cat([pos, neg])
        # average ranks of ties, per column: rank by sorting, then average within equal runs
        order = both.argsort(0)
        sorted_vals = both.gather(0, order)
        ranks = torch.empty_like(both)
        n = both.shape[0]
        base = torch.arange(1, n + 1, dtype=torch.float64)[:, None].expand(-1, both.shape[1])
        new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
        new_group[1:] = sorted_vals[1:] != sorted_vals[:-1]
        group = new_group.long().cumsum(0)
        avg = torch.zeros(n + 1, both.shape[1], dtype=torch.float64).scatter_add_(0, group, base)
        count = torch.zeros(n + 1, both.shape[1], dtype=torch.float64).scatter_add_(0, group, torch.ones_like(base))
        ranks.scatter_(0, order, (avg / count.clamp(min=1)).gather(0, group))
        r_pos = ranks[: pos.shape[0]].sum(0)
        u = r_pos - pos.shape[0] * (pos.shape[0] + 1) / 2
        return u / (pos.shape[0] * neg.shape[0])

    def top(self, k: int, method: str = "saif") -> list[int]:
        """The k best latents by `method`, best first (latents scored -inf are never chosen)."""
        check_range("k", k, 1)
        s = self.scores(method)
        order = torch.argsort(s, descending=True, stable=True)
        return [int(i) for i in order[:k] if torch.isfinite(s[i])]

    def weights(self, latents: Sequence[int], by: str = "mu_pos") -> Tensor:
        """float32 [len(latents)] weights for `latent_vector` or targets for `ClampLatents`: mu_pos (the mean
        positive activation, SAIF's), mean_diff (μ+ - μ-) or max_pos (the largest positive activation)."""
        if by not in WEIGHTS:
            raise OlmoIVError(f"by={by!r}: use one of {', '.join(WEIGHTS)}")
        if by == "mean_diff":
            self._need()
        elif not self.n[True]:
            raise OlmoIVError("weights need positive codes: add some with positive=True")
        ids = [int(j) for j in latents]
        bad = [j for j in ids if not 0 <= j < self.d_sae]
        if bad or not ids:
            raise OlmoIVError(f"latents={ids[:5] if not bad else bad[:5]}: give latents in 0..{self.d_sae - 1}")
        w = {"mu_pos": self.mean(True), "mean_diff": self.mean(True) - self.mean(False),
             "max_pos": self.max[True]}[by]
        return w[ids].float()

    def table(self, latents: Sequence[int] | None = None) -> list[dict]:
        """Per latent: mu+, mu-, f+, f-, and the firing frequency in each positive variant."""
        self._need()
        ids = range(self.d_sae) if latents is None else latents
        mp, mn, fp, fn = self.mean(True), self.mean(False), self.freq(True), self.freq(False)
        out = []
        for i in ids:
            row = {"latent": int(i), "mu_pos": float(mp[i]), "mu_neg": float(mn[i]), "f_pos": float(fp[i]),
                   "f_neg": float(fn[i])}
            row.update({f"f_{v}": float(self.variant_fires[v][i] / self.variant_n[v]) for v in sorted(self.variant_n)})
            out.append(row)
        return out


# ------------------------------------------------------------------------------------------------ interpretation


def _token_ids(name: str, ids: Sequence[int], vocab_size: int) -> list[int]:
    out = list(dict.fromkeys(int(t) for t in ids))  # distinct, in the order given
    if not out:
        raise OlmoIVError(f"{name}= is empty: give at least one token id")
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise OlmoIVError(f"{name}={bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return out


def _ranks(logits: Tensor, ids: Tensor) -> Tensor:
    """1-based rank of each token `ids` [m] in every row of logits [n, V] (1 + the number strictly above it)."""
    return (logits[:, None, :] > logits[:, ids][..., None]).sum(-1) + 1


@torch.no_grad()
def instruction_proximity(model, sae, latents: Sequence[int], token_ids: Sequence[int], *, k: int = 50,
                          instruction_resid: Tensor | None = None) -> list[dict]:
    """How close each latent's decoder direction is to an instruction's tokens (e.g. the ids of "French",
    " French", "translate"), per latent:

    - rank: the best 1-based rank of the instruction's tokens in the logit lens (`lens_logits`: W_dec[j] through
      the final norm's weight and the unembedding; rank 1 = promoted most), `token` the token that attains it,
      rr = 1/rank, ranks (each token's), hits (how many rank in the top k), top (the k promoted tokens);
    - cos_max, cos_mean: cosines of g ⊙ W_dec[j] (the direction the lens reads, g the final norm's gain) with the
      unembedding rows of the tokens, so that a logit is ‖g ⊙ W_dec[j]‖ · ‖W_U[t]‖ · cos;
    - cos_resid (with `instruction_resid` [d_model], e.g. the mean residual over the instruction's tokens at the
      SAE's hook point): the cosine of W_dec[j] with it, both in the residual stream.
    """
    import torch.nn.functional as F

    from olmo_iv.sae.analysis import final_norm_weight, lens_logits

    V = model.config.vocab_size
    check_range("k", k, 1, V)
    if not latents:
        raise OlmoIVError("latents= is empty: give at least one latent index")
    ids = _token_ids("token_ids", token_ids, V)
    logits = lens_logits(model, sae, latents)  # validates the latents
    W_U = model.lm_head.weight.detach().float()
    t = torch.tensor(ids, device=logits.device)
    dirs = sae.W_dec.detach()[[int(j) for j in latents]].to(W_U.device).float()
    cos = F.normalize(dirs * final_norm_weight(model).to(W_U.device), dim=-1) @ F.normalize(W_U[t], dim=-1).T
    resid_cos = None
    if instruction_resid is not None:
        r = torch.as_tensor(instruction_resid).detach().float().reshape(-1).to(W_U.device)
        if r.numel() != dirs.shape[1] or not bool(torch.isfinite(r).all()) or not float(r.norm()) > 0:
            raise OlmoIVError(f"instruction_resid= must be a finite, non-zero vector of {dirs.shape[1]} entries")
        resid_cos = F.normalize(dirs, dim=-1) @ F.normalize(r, dim=0)
    ranks = _ranks(logits, t)  # [n, m]
    top = logits.topk(k, dim=-1).indices
    out = []
    for i, j in enumerate(latents):
        best = int(ranks[i].argmin())
        row = {"latent": int(j), "rank": int(ranks[i, best]), "token": ids[best], "rr": 1.0 / int(ranks[i, best]),
               "ranks": ranks[i].tolist(), "hits": int((ranks[i] <= k).sum()), "top": top[i].tolist(),
               "cos_max": float(cos[i].max()), "cos_mean": float(cos[i].mean())}
        if resid_cos is not None:
            row["cos_resid"] = float(resid_cos[i])
        out.append(row)
    return out


@torch.no_grad()
def output_score(model, sae, latent: int, prompts: Sequence[Sequence[int]] | Sequence[str],
                 target_ids: Sequence[int], *, coef: float, positions: str = "all", layer: int | None = None,
                 hook: str | None = None, batch_size: int = 16, progress: ProgressFn | None = None) -> dict:
    """What amplifying one latent does to the next token (the output score of Arad et al. 2025): add coef × the
    latent's unit decoder direction (`latent_steer`, at the SAE's hook point unless layer/hook say otherwise)
    on neutral prompts, and compare the target tokens at the last position with the unsteered run.

    Per target token (lists in the order of the distinct `target_ids`), means over prompts: prob_base,
    prob_steered, prob_gain, logit_gain, logprob_gain, rank_base, rank_steered (1 = the top token), and
    rank_gain = rank_base - rank_steered (positive = promoted). `score` is the target probability mass gained,
    the sum of prob_gain. Prompts are token ids or strings (encoded with the model's tokenizer, no BOS).
    """
    from olmo_iv.generate import encode, left_pad
    from olmo_iv.interventions.steering import check_specs, latent_steer, steering_hooks

    check_range("batch_size", batch_size, 1)
    spec = latent_steer(sae, latent, coef, positions=positions, layer=layer, hook=hook)
    check_specs(model, [spec])
    targets = _token_ids("target_ids", target_ids, model.config.vocab_size)
    if not prompts:
        raise OlmoIVError("prompts= is empty: give neutral prompts")
    if isinstance(prompts[0], str):
        if model.tokenizer is None:
            raise OlmoIVError("prompts are strings but the model has no tokenizer: give token ids")
        rows = [encode(model.tokenizer, p) for p in prompts]
    else:
        rows = [[int(t) for t in p] for p in prompts]
    if any(not r for r in rows):
        raise OlmoIVError("prompts= holds an empty prompt")
    device = model.device
    t = torch.tensor(targets, device=device)
    sums = {key: torch.zeros(len(targets), dtype=torch.float64) for key in
            ("prob_base", "prob_steered", "logit_gain", "logprob_gain", "rank_base", "rank_steered")}
    hooks = steering_hooks([spec])
    for i in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[i:i + batch_size])
        ids, mask = ids.to(device), mask.to(device)
        base = model(ids, attention_mask=mask, logits_at=-1).float()
        with model.hooks(hooks):
            steered = model(ids, attention_mask=mask, logits_at=-1).float()
        lp_b, lp_s = base.log_softmax(-1)[:, t], steered.log_softmax(-1)[:, t]
        sums["prob_base"] += lp_b.exp().sum(0).double().cpu()
        sums["prob_steered"] += lp_s.exp().sum(0).double().cpu()
        sums["logit_gain"] += (steered[:, t] - base[:, t]).sum(0).double().cpu()
        sums["logprob_gain"] += (lp_s - lp_b).sum(0).double().cpu()
        sums["rank_base"] += _ranks(base, t).sum(0).double().cpu()
        sums["rank_steered"] += _ranks(steered, t).sum(0).double().cpu()
        if progress is not None:
            progress("output score", len(ids), len(rows))
    mean = {key: v / len(rows) for key, v in sums.items()}
    gain = mean["prob_steered"] - mean["prob_base"]
    out = {"latent": int(latent), "coef": float(coef), "positions": positions, "hook_name": spec.hook_name,
           "n_prompts": len(rows), "targets": targets, "score": float(gain.sum())}
    out.update({key: v.tolist() for key, v in mean.items()})
    out["prob_gain"] = gain.tolist()
    out["rank_gain"] = (mean["rank_base"] - mean["rank_steered"]).tolist()
    return out
