"""The bridge between instruction vectors and SAE latents: which latents carry an instruction vector's effect.

Patching block l's output at the target's patch position with the source run's output at T_inst (the instruction
alone) restores the answer (paper §5.1). With an SAE at that hook point every activation is

    x = Σ_j z_j d_j + b + e        d_j: latent j's decoder direction in the activations' units, b: the decoder
                                   bias (both include the SAE's input scale), e = x − x̂: the SAE's error term

so the patch splits exactly into per-latent contributions (b cancels):

    x_src − x_tgt = Σ_j c_j + (e_src − e_tgt),        c_j = (z_src_j − z_tgt_j) d_j

Latent-level patching replaces x_tgt by x_tgt + Σ_{j∈S} c_j: S = ∅ is the unpatched target, S = every latent plus
the error term is full patching, and the curve over the top-k latents says how many latents the instruction
vector needs. The arithmetic is float64, so the identity holds to float64 rounding and the full patch rounds back
to the source residual itself.

    dec = decompose(model, sae, encoded, layer)               # codes, errors and directions at the patch
    result = bridge(model, sae, encoded, layer, ks=[0, 1, 4, 16])
    result.rr.mean(0), result.rr_full.mean(), result.explained
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from olmo_iv.activations import extract
from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.interventions.patching import PatchResult, patch_layers, patch_vectors, reciprocal_rank
from olmo_iv.progress import ProgressFn
from olmo_iv.sae.arch import SAE
from olmo_iv.tasks.registry import Encoded

METHODS = ("abs", "signed", "attribution")
"""How latents are ranked for a task:
abs          mean over samples of |Δz_j|·‖d_j‖, the size of latent j's share of the patch (default);
signed       mean of Δz_j·‖d_j‖, largest first: the latents the instruction switches on;
attribution  mean of g·c_j, g the gradient of the answer's logit in the target run at the patch: a first-order
             estimate of what latent j's contribution adds to the answer's logit."""
DEFAULT_KS = (0, 1, 2, 4, 8, 16, 32, 64)
ALL, ALL_ERROR = "all", "all+error"
"""The two columns after the top-k ones: every latent, and every latent plus the error term (= full patching)."""


# ------------------------------------------------------------------------------------------------ decomposition


def decoder_directions(sae: SAE) -> tuple[Tensor, Tensor]:
    """(d [d_sae, d_in], b [d_in]), float64: x̂ = codes @ d + b in the raw activations' units, whatever the SAE's
    input scale s (x̂ = (codes @ W_dec + b_dec) / s) and decoder-norm rescaling (codes divided by ‖W_dec[j]‖)."""
    w = sae.W_dec.detach().double()
    if sae.cfg.rescale_acts_by_decoder_norm:
        w = w / w.norm(dim=-1, keepdim=True)
    s = sae.cfg.input_scale
    return w / s, sae.b_dec.detach().double() / s


@dataclass
class Decomposition:
    """The source and target residuals at one layer's patch, and their SAE codes and errors (float64 on the CPU)."""

    layer: int
    x_src: Tensor  # [n, d]
    x_tgt: Tensor  # [n, d]
    z_src: Tensor  # [n, d_sae]
    z_tgt: Tensor  # [n, d_sae]
    e_src: Tensor  # [n, d]  x_src − x̂_src
    e_tgt: Tensor  # [n, d]
    directions: Tensor  # [d_sae, d]
    bias: Tensor  # [d]
    grad: Tensor | None = None  # [n, d]: ∂ answer logit / ∂ x_tgt in the target run (for method="attribution")

    @property
    def delta(self) -> Tensor:
        """x_src − x_tgt [n, d]: what full patching adds."""
        return self.x_src - self.x_tgt

    @cached_property
    def delta_z(self) -> Tensor:
        """z_src − z_tgt [n, d_sae]."""
        return self.z_src - self.z_tgt

    @property
    def error(self) -> Tensor:
        """e_src − e_tgt [n, d]: the part of the patch no latent accounts for."""
        return self.e_src - self.e_tgt

    @cached_property
    def norms(self) -> Tensor:
        """‖d_j‖ [d_sae]."""
        return self.directions.norm(dim=-1)

    def contribution(self, latents: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """Σ_{j∈latents} c_j for each sample (or the given rows) [n, d]; None: every latent."""
        dz = self.delta_z if rows is None else self.delta_z[rows]
        if latents is None:
            return _sparse_mm(dz, self.directions)
        return dz[:, latents] @ self.directions[latents]


def _sparse_mm(z: Tensor, d: Tensor) -> Tensor:
    """z @ d over the latents non-zero in some row only: codes are sparse, so this is the same sum (zeros add
    nothing) at a fraction of the work for SAEs of 10^5 latents."""
    active = z.ne(0).any(0).nonzero()[:, 0]
    return z[:, active] @ d[active]


def _encode(sae: SAE, x: Tensor) -> Tensor:
    with torch.no_grad():
        return sae.encode(x.to(sae.W_enc.device)).double().cpu()


def _check_sae(sae: SAE, model, layer: int) -> None:
    if sae.cfg.d_in != model.config.d_model:
        raise OlmoIVError(f"the SAE reads d_in={sae.cfg.d_in} features but the model's residual has "
                          f"d_model={model.config.d_model}: give an SAE trained on this model")
    want = f"blocks.{layer}.hook_resid_post"
    if sae.cfg.hook_name and sae.cfg.hook_name != want:
        raise OlmoIVError(f"the SAE was trained at {sae.cfg.hook_name!r}, but layer={layer} patches {want!r}: give "
                          "an SAE of that hook point or the matching layer")


def _check_layer(model, layer: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.config.n_layers:
        raise OlmoIVError(f"layer={layer!r} is out of range: this model has layers 0..{model.config.n_layers - 1}")


def _ids(encoded: Sequence[Encoded]) -> tuple[list[Tensor], list[Tensor], list[int], list[int]]:
    if not encoded:
        raise OlmoIVError("no samples: give at least one encoded sample")
    return ([torch.tensor(e.source_ids) for e in encoded], [torch.tensor(e.target_ids) for e in encoded],
            [e.answer_id for e in encoded], [e.target_pos for e in encoded])


def decompose(model, sae: SAE, encoded: Sequence[Encoded], layer: int, *, gradients: bool = False) -> Decomposition:
    """x_src (the source run's block-`layer` output at T_inst), x_tgt (the target run's at its patch position), their
    SAE codes and error terms. gradients=True also takes the answer logit's gradient at x_tgt (one backward pass
    per batch of targets), which method="attribution" ranks by."""
    _check_layer(model, layer)
    _check_sae(sae, model, layer)
    sources, targets, answers, positions = _ids(encoded)
    distinct: dict[tuple[int, ...], int] = {}
    src_index = [distinct.setdefault(tuple(s.tolist()), len(distinct)) for s in sources]
    x_src = extract(model, [torch.tensor(s) for s in distinct], layers=[layer], positions=-1)[:, 0]
    x_src = x_src[torch.tensor(src_index, device=x_src.device)]
    x_tgt = extract(model, targets, layers=[layer], positions=positions)[:, 0]
    d, b = decoder_directions(sae)
    d, b = d.cpu(), b.cpu()
    z_src, z_tgt = _encode(sae, x_src), _encode(sae, x_tgt)
    x_src, x_tgt = x_src.double().cpu(), x_tgt.double().cpu()
    grad = answer_gradients(model, targets, answers, layer, positions) if gradients else None
    return Decomposition(layer, x_src, x_tgt, z_src, z_tgt, x_src - (_sparse_mm(z_src, d) + b),
                         x_tgt - (_sparse_mm(z_tgt, d) + b), d, b, grad)


def answer_gradients(model, targets: Sequence[Tensor], answers: Sequence[int], layer: int,
                     positions: Sequence[int]) -> Tensor:
    """∂ (answer logit at the last position) / ∂ (block-`layer` output at the patch position) of each target run,
    [n, d] float64 on the CPU: attribution patching's linear estimate of a patch's effect on the answer."""
    out = torch.empty(len(targets), model.config.d_model, dtype=torch.float64)
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_len.setdefault(len(t), []).append(i)
    for length, rows in by_len.items():
        for start in range(0, len(rows), 16):  # a backward keeps every block's activations: small batches
            chunk = rows[start:start + 16]
            ids = torch.stack([targets[i] for i in chunk]).to(model.device)
            with torch.no_grad():
                h = model(ids, stop_at_layer=layer + 1)
            h.requires_grad_(True)
            with torch.enable_grad():
                logits = model(ids, start_at_layer=layer + 1, resid=h, logits_at=length - 1)
                picked = logits.gather(1, torch.tensor([answers[i] for i in chunk], device=model.device)[:, None])
                (g,) = torch.autograd.grad(picked.float().sum(), h)
            pos = torch.tensor([positions[i] for i in chunk], device=model.device)
            out[torch.tensor(chunk)] = g[torch.arange(len(chunk), device=model.device), pos].double().cpu()
    return out


# ------------------------------------------------------------------------------------------------------ ranking


@dataclass
class Ranking:
    """Latents ordered for a task. Row f of `order` and `scores` was computed on the samples outside fold f and is
    used for the samples of fold f (held-out ranking); without folds there is one row, from every sample."""

    method: str
    order: Tensor  # [rows, d_sae] latent ids, best first (ties: lower id first)
    scores: Tensor  # [rows, d_sae] float64, by latent id

    @property
    def d_sae(self) -> int:
        return self.order.shape[1]


def latent_scores(dec: Decomposition, method: str = "abs", rows: Tensor | None = None) -> Tensor:
    """One score per latent [d_sae] (float64), from the samples `rows` (default: all); larger ranks first."""
    if method not in METHODS:
        raise OlmoIVError(f"method={method!r}: use one of {', '.join(METHODS)}")
    dz = dec.delta_z if rows is None else dec.delta_z[rows]
    if dz.shape[0] == 0:
        raise OlmoIVError("no samples to score latents on")
    if method == "abs":
        return dz.abs().mean(0) * dec.norms
    if method == "signed":
        return dz.mean(0) * dec.norms
    if dec.grad is None:
        raise OlmoIVError("method='attribution' needs the answer gradients: decompose(..., gradients=True)")
    g = dec.grad if rows is None else dec.grad[rows]
    return (dz * (g @ dec.directions.T)).mean(0)


def rank_latents(dec: Decomposition, method: str = "abs", folds: Tensor | None = None) -> Ranking:
    """Order the latents by `latent_scores`; with `folds` (one 0/1 per sample), row f is ranked on the other fold."""
    if folds is None:
        scores = latent_scores(dec, method)[None]
    else:
        if folds.shape != (dec.x_src.shape[0],) or not set(folds.tolist()) <= {0, 1}:
            raise OlmoIVError(f"folds must hold one 0 or 1 per sample ({dec.x_src.shape[0]}), got {tuple(folds.shape)}")
        if len(set(folds.tolist())) < 2:
            raise OlmoIVError("held-out ranking needs samples in both folds: give at least 2 samples")
        scores = torch.stack([latent_scores(dec, method, (folds != f).nonzero()[:, 0]) for f in (0, 1)])
    order = torch.stack([torch.sort(-row, stable=True).indices for row in scores])
    return Ranking(method, order, scores)


def split_folds(n: int, seed: int = 0) -> Tensor:
    """A seeded split of n samples into two halves: fold 0 (the first ceil(n/2) of a permutation) and fold 1."""
    if n < 2:
        raise OlmoIVError(f"n={n}: a held-out ranking needs at least 2 samples, one per half")
    folds = torch.ones(n, dtype=torch.long)
    folds[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: (n + 1) // 2]] = 0
    return folds


# ---------------------------------------------------------------------------------------------- latent patching


@dataclass
class BridgeResult:
    """Answer logits and ranks of latent-level patches at one layer, per sample and column.

    Columns: the top-k latents for each k, then every latent ("all"), then every latent plus the error term
    ("all+error", which is full patching). Ranks are 1-based; RR as in `PatchResult`.
    """

    layer: int
    columns: list[str]
    n_latents: list[int]  # latents patched per column
    logit: Tensor  # [n, columns]
    rank: Tensor  # [n, columns]
    logit_target: Tensor  # [n]
    rank_target: Tensor  # [n]
    logit_full: Tensor  # [n]: full residual patching at the layer (patch_layers)
    rank_full: Tensor  # [n]
    residual_sq: Tensor  # [n, columns]: ‖(x_src − x_tgt) − what the column patches‖²
    delta_sq: Tensor  # [n]: ‖x_src − x_tgt‖²
    folds: Tensor  # [n]: the ranking row each sample used
    ranking: Ranking
    max_rank: int = 1000
    rr_sentinel: float = 0.0

    def rr_of(self, rank: Tensor) -> Tensor:
        return reciprocal_rank(rank, self.max_rank, self.rr_sentinel)

    @property
    def rr(self) -> Tensor:
        return self.rr_of(self.rank)

    @property
    def rr_target(self) -> Tensor:
        return self.rr_of(self.rank_target)

    @property
    def rr_full(self) -> Tensor:
        return self.rr_of(self.rank_full)

    @property
    def explained(self) -> Tensor:
        """Per column, the fraction of Σ_samples ‖x_src − x_tgt‖² the patched part explains:
        1 − Σ‖residual‖² / Σ‖x_src − x_tgt‖² (1 for all+error; can be negative for a poor top-k)."""
        return explained_fraction(self.residual_sq, self.delta_sq)


def explained_fraction(residual_sq: Tensor, delta_sq: Tensor) -> Tensor:
    """1 − Σ_i residual_sq[i, c] / Σ_i delta_sq[i], per column c (pooled over samples)."""
    total = float(delta_sq.sum())
    if total == 0:
        return torch.full((residual_sq.shape[1],), float("nan"), dtype=torch.float64)
    return torch.tensor([1.0 - float(residual_sq[:, c].contiguous().sum()) / total
                         for c in range(residual_sq.shape[1])], dtype=torch.float64)


def check_ks(ks: Sequence[int], d_sae: int | None = None) -> list[int]:
    """The distinct ks, ascending; each in 0..d_sae."""
    if not len(ks):
        raise OlmoIVError("ks is empty: give at least one number of latents, e.g. [0, 1, 4, 16]")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise OlmoIVError(f"ks={list(ks)}: each k must be an integer >= 0")
        if d_sae is not None and k > d_sae:
            raise OlmoIVError(f"ks={list(ks)}: k={k} exceeds the SAE's d_sae={d_sae} latents")
    return sorted({int(k) for k in ks})


def patch_columns(dec: Decomposition, ranking: Ranking, folds: Tensor, ks: Sequence[int]
                  ) -> tuple[list[str], list[int], Tensor]:
    """The replacement vectors of every column [n, columns, d] (float64): x_tgt + Σ_{j∈top-k} c_j for each k,
    x_tgt + Σ_j c_j, and x_tgt + Σ_j c_j + (e_src − e_tgt)."""
    ks = check_ks(ks, ranking.d_sae)
    n = dec.x_src.shape[0]
    columns = [str(k) for k in ks] + [ALL, ALL_ERROR]
    out = torch.empty(n, len(columns), dec.x_src.shape[1], dtype=torch.float64)
    for f in folds.unique().tolist():
        rows = (folds == f).nonzero()[:, 0]
        order = ranking.order[f]
        for c, k in enumerate(ks):
            out[rows, c] = dec.x_tgt[rows] + dec.contribution(order[:k], rows)
    every = dec.x_tgt + dec.contribution()
    out[:, len(ks)] = every
    out[:, len(ks) + 1] = every + dec.error
    return columns, [*ks, ranking.d_sae, ranking.d_sae], out


def bridge(model, sae: SAE, encoded: Sequence[Encoded], layer: int, *, ks: Sequence[int] = DEFAULT_KS,
           method: str = "abs", heldout: bool = False, seed: int = 0, ranking: Ranking | None = None,
           folds: Tensor | None = None, max_rank: int = 1000, rr_sentinel: float = 0.0,
           progress: ProgressFn | None = None) -> BridgeResult:
    """Latent-level patching at `layer`: for each sample and each k, the target run with its block output at the
    patch position replaced by x_tgt + the top-k latents' contributions; plus every latent, every latent with the
    error term, full patching and the unpatched target.

    The latents are ranked on the samples by `method` (METHODS); heldout=True ranks on one seeded half and
    evaluates on the other, both ways, so that no sample is evaluated with a ranking it helped to fit. A ranking
    computed beforehand (e.g. on all of a run's samples) can be passed with its `folds` (one row index per sample).
    """
    check_range("max_rank", max_rank, 1)
    n = len(encoded)
    dec = decompose(model, sae, encoded, layer, gradients=ranking is None and method == "attribution")
    if ranking is None:
        folds = split_folds(n, seed) if heldout else None
        ranking = rank_latents(dec, method, folds)
    if folds is None:
        if ranking.order.shape[0] != 1:
            raise OlmoIVError("a held-out ranking (two rows) needs folds: one 0 or 1 per sample")
        folds = torch.zeros(n, dtype=torch.long)
    if folds.shape != (n,) or not 0 <= int(folds.min()) <= int(folds.max()) < ranking.order.shape[0]:
        raise OlmoIVError(f"folds must hold one ranking row (0..{ranking.order.shape[0] - 1}) per sample ({n})")
    if ranking.d_sae != sae.cfg.d_sae:
        raise OlmoIVError(f"the ranking orders {ranking.d_sae} latents but the SAE has d_sae={sae.cfg.d_sae}")
    columns, sizes, vectors = patch_columns(dec, ranking, folds, ks)
    # column by column, reduced as delta_sq is: k=0 then explains exactly 0 and all+error exactly 1
    residual_sq = torch.stack([((dec.delta - (vectors[:, c] - dec.x_tgt)) ** 2).sum(-1)
                               for c in range(len(columns))], 1)
    sources, targets, answers, positions = _ids(encoded)
    logit, rank = patch_vectors(model, targets, answers, layer, vectors.to(model.dtype), target_pos=positions,
                                progress=progress)
    full = patch_layers(model, sources, targets, answers, [(layer,)], source_pos=-1, target_pos=positions,
                        max_rank=max_rank, rr_sentinel=rr_sentinel)
    return BridgeResult(layer, columns, sizes, logit, rank, full.logit_target, full.rank_target,
                        full.logit_patched[:, 0], full.rank_patched[:, 0], residual_sq, (dec.delta ** 2).sum(-1),
                        folds, ranking, max_rank, rr_sentinel)


# -------------------------------------------------------------------------------------------- layers and latents


def layer_profile(model, encoded: Sequence[Encoded], *, max_rank: int = 1000, rr_sentinel: float = 0.0,
                  progress: ProgressFn | None = None) -> PatchResult:
    """Single-layer full patching at every layer (source at T_inst, target at its patch position): the layer
    whose patch restores most RR is where an SAE should look for the instruction vector."""
    sources, targets, answers, positions = _ids(encoded)
    return patch_layers(model, sources, targets, answers, [(layer,) for layer in range(model.config.n_layers)],
                        source_pos=-1, target_pos=positions, max_rank=max_rank, rr_sentinel=rr_sentinel,
                        progress=progress)


def best_layer(result: PatchResult) -> int:
    """The layer with the largest mean patched RR (the first of equals)."""
    return int(torch.argmax(result.rr_patched.mean(0)))


def latent_table(dec: Decomposition, ranking: Ranking, top: int = 20) -> list[dict]:
    """The `top` latents of ranking row 0 with what they do at the patch: score, share of the summed |scores|,
    mean Δz, mean codes in source and target, how often each fires, ‖d_j‖, and the explained fraction of
    ‖x_src − x_tgt‖² of the latents up to this one."""
    check_range("top", top, 1)
    order, scores = ranking.order[0], ranking.scores[0]
    total = float(scores.abs().sum()) or 1.0
    delta_sq = (dec.delta ** 2).sum(-1)
    rows = []
    for r, j in enumerate(order[:top].tolist(), start=1):
        residual = ((dec.delta - dec.contribution(order[:r])) ** 2).sum(-1)
        rows.append({"rank": r, "latent": j, "score": float(scores[j]), "share": float(scores[j]) / total,
                     "mean_dz": float(dec.delta_z[:, j].mean()), "mean_z_src": float(dec.z_src[:, j].mean()),
                     "mean_z_tgt": float(dec.z_tgt[:, j].mean()), "fires_src": float((dec.z_src[:, j] > 0).double().mean()),
                     "fires_tgt": float((dec.z_tgt[:, j] > 0).double().mean()), "norm": float(dec.norms[j]),
                     "explained_cumulative": float(explained_fraction(residual[:, None], delta_sq)[0])})
    return rows


def bootstrap_mean_ci(x: np.ndarray | Sequence[float], confidence: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (scipy.stats.bootstrap, seeded); constant data or one value: the
    value itself."""
    from scipy import stats

    check_range("confidence", confidence, 0, 1, low_open=True, high_open=True)
    x = np.asarray(x, dtype=float)
    if x.size == 0 or not np.isfinite(x).all():
        raise OlmoIVError("bootstrap_mean_ci needs finite values, at least one")
    if x.size == 1 or np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    ci = stats.bootstrap((x,), np.mean, vectorized=True, n_resamples=n_boot, method="percentile",
                         confidence_level=confidence, random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)
