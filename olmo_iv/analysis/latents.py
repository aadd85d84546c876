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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError, check_range

METHODS = ("mean_diff", "freq_diff", "consistency", "saif", "cohen_d", "auroc")


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
