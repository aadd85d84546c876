"""Train an SAE on a stream of activations: Adam (or sign-SGD with momentum), an LR schedule, AuxK for dead
latents, unit-norm decoder rows, and checkpoints that resume bit for bit.

The library never writes folders: `train_sae` hands checkpoint states to a callback (`olmo_iv.runs.sae` writes
them) and reports progress through `progress("training", advance, total, info)` (olmo_iv.progress).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.progress import ProgressFn
from olmo_iv.sae.arch import SAE, GatheredEncode, SAEConfig
from olmo_iv.sae.data import ActivationStream

OPTIMIZERS = ("adam", "signum")
SCHEDULES = ("constant", "linear", "cosine")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass
class TrainConfig:
    architecture: str = "topk"
    """topk (primary), batchtopk or standard (ReLU + L1). jumprelu is inference only."""
    expansion: float = 8.0
    """d_sae = round(expansion * d_in) unless d_sae is given; > 0."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    k: int = 32
    """Active latents per token (topk) or on average (batchtopk); >= 1."""
    l1_coefficient: float = 5.0
    """Weight of the L1 penalty sum_j |z_j| for standard SAEs (inputs are scaled to E||x||^2 = d_in); >= 0."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that makes dead latents predict the residual (Gao et al.); >= 0."""
    dead_tokens: int = 1_000_000
    """A latent is dead when it has not fired for this many tokens (or for every token seen so far, if fewer)."""
    optimizer: str = "adam"
    """adam, or signum (sparsify's sign-SGD, here with momentum)."""
    lr: float | None = None
    """Learning rate; None picks sparsify's rule: 2e-4 (adam) or 5e-3 (signum) / sqrt(d_sae / 2^14)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas; signum uses betas[0] as its momentum."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    lr_schedule: str = "constant"
    """After warm-up: constant, linear (to 0 at the last step) or cosine (to 0)."""
    batch_size: int = 4096
    """Tokens per step; >= 1."""
    steps: int = 1000
    """Optimiser steps; >= 1."""
    b_dec_init: str = "geometric_median"
    """geometric_median (Weiszfeld, on the first batches), mean, or zeros."""
    init_batches: int = 4
    """Batches read (and then re-read in training) to set the input scale and b_dec."""
    scale_inputs: bool = True
    """Scale inputs so that E||s·x||^2 = d_in; s is stored in the SAE."""
    seed: int = 0
    """Seed of the decoder initialisation."""
    log_every: int = 10
    """Report FVU, L0 and dead fraction every this many steps."""
    checkpoint_every: int = 0
    """Hand a resumable state to `on_checkpoint` every this many steps (0: never)."""

    def validate(self) -> None:
        checks = [
            (self.architecture in ("topk", "batchtopk", "standard"), f"architecture={self.architecture!r}: train "
             "topk, batchtopk or standard (jumprelu is for inference)"),
            (self.expansion > 0 and math.isfinite(self.expansion), f"expansion={self.expansion} must be > 0"),
            (self.d_sae is None or self.d_sae >= 1, f"d_sae={self.d_sae} must be >= 1"),
            (self.k >= 1, f"k={self.k} must be >= 1"),
            (self.l1_coefficient >= 0, f"l1_coefficient={self.l1_coefficient} must be >= 0"),
            (self.auxk_alpha >= 0, f"auxk_alpha={self.auxk_alpha} must be >= 0"),
            (self.dead_tokens >= 1, f"dead_tokens={self.dead_tokens} must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr={self.lr} must be > 0"),
            (all(0 <= b < 1 for b in self.betas), f"betas={self.betas} must lie in [0, 1)"),
            (self.lr_warmup_steps >= 0, f"lr_warmup_steps={self.lr_warmup_steps} must be >= 0"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule={self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.b_dec_init in B_DEC_INITS, f"b_dec_init={self.b_dec_init!r} is not one of {', '.join(B_DEC_INITS)}"),
            (self.init_batches >= 1, f"init_batches={self.init_batches} must be >= 1"),
            (self.log_every >= 1, f"log_every={self.log_every} must be >= 1"),
            (self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise OlmoIVError(message)

    def n_latents(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else max(1, round(self.expansion * d_in))

    def lr_for(self, d_sae: int) -> float:
        if self.lr is not None:
            return self.lr
        base = 2e-4 if self.optimizer == "adam" else 5e-3
        return base / math.sqrt(d_sae / 2**14)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base LR at `step` (0-based)."""
        if step < self.lr_warmup_steps:
            return (step + 1) / (self.lr_warmup_steps + 1)
        if self.lr_schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.lr_warmup_steps)
        t = min(1.0, (step - self.lr_warmup_steps) / span)
        return 1.0 - t if self.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where a checkpoint was taken."""

    sae: SAE
    optimizer: torch.optim.Optimizer
    step: int
    """Steps done."""
    stream_state: dict[str, Any]
    """The data position after the last step."""
    tokens_since_fired: Tensor
    """[d_sae] int64: tokens seen since each latent last fired."""
    tokens_seen: int
    history: list[dict[str, float]] = field(default_factory=list)
    """The progress reports so far."""
    window: dict[str, float] = field(default_factory=lambda: {"fvu": 0.0, "l0": 0.0, "loss": 0.0, "n": 0})
    """Sums since the last report (so that a resumed run reports the same numbers)."""


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict[str, float]]
    """One entry per report: step, tokens, loss, fvu, l0, dead, lr."""
    final: dict[str, float]


class Signum(torch.optim.Optimizer):
    """Sign-SGD with momentum (sparsify's default optimiser family): p -= lr · sign(m), m = β m + (1 − β) g.
    The sign makes every parameter move by exactly lr, whatever its gradient's scale."""

    def __init__(self, params, lr: float, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(m.sign(), alpha=-group["lr"])


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed distance to the rows of x (Weiszfeld's algorithm, in float64)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m


def init_sae(stream: ActivationStream, cfg: TrainConfig, **meta: Any) -> SAE:
    """A fresh SAE: unit-norm decoder, encoder = decoder transpose, input scale and b_dec from the first batches
    (which training then reads again: the stream is rewound)."""
    d_in = stream.d_in
    d_sae = cfg.n_latents(d_in)
    if cfg.architecture in ("topk", "batchtopk") and cfg.k > d_sae:
        raise OlmoIVError(f"k={cfg.k} exceeds the number of latents d_sae={d_sae}")
    start = stream.state()
    xs = torch.cat([stream.next_batch(cfg.batch_size) for _ in range(cfg.init_batches)]).double()
    stream.restore(start)
    _check_finite(xs, "the first batches")
    scale = 1.0
    if cfg.scale_inputs:
        ms = float(xs.pow(2).sum(-1).mean())
        if not ms > 0:
            raise OlmoIVError("the activations are all zero: there is nothing to scale or train on")
        scale = math.sqrt(d_in / ms)
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=cfg.architecture,
                        k=cfg.k if cfg.architecture != "standard" else None, input_scale=scale, **meta)
    sae = SAE(sae_cfg, seed=cfg.seed)
    with torch.no_grad():
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(xs * scale).float())
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_((xs * scale).mean(0).float())
    return sae


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    lr = cfg.lr_for(sae.cfg.d_sae)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, foreach=False)
    return Signum(params, lr=lr, momentum=cfg.betas[0])


def new_state(stream: ActivationStream, cfg: TrainConfig, **meta: Any) -> TrainState:
    cfg.validate()
    sae = init_sae(stream, cfg, **meta)
    return TrainState(sae=sae, optimizer=make_optimizer(sae, cfg), step=0, stream_state=stream.state(),
                      tokens_since_fired=torch.zeros(sae.cfg.d_sae, dtype=torch.int64), tokens_seen=0)


def _step_losses(sae: SAE, x: Tensor, cfg: TrainConfig, dead: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, fvu, fired latents mask [d_sae], active latents per token [N]) for one batch of raw activations."""
    xs = x.to(sae.W_enc.dtype) * sae.cfg.input_scale
    total_var = (xs - xs.mean(0)).pow(2).sum().clamp_min(1e-12)
    n_dead = int(dead.sum())
    arch = sae.cfg.architecture
    if arch == "topk":
        vals, idx, pre, xin = sae.topk_sparse(xs, cfg.k)
        recon = sae.decode_sparse(vals, idx)
        active = vals.detach() > 0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool).index_fill_(0, idx[active], True)
        l0 = active.sum(-1)
    else:
        xin = xs - sae.b_dec
        pre = torch.addmm(sae.b_enc, xin, sae.W_enc)
        if arch == "batchtopk":
            acts = pre.relu()
            flat = acts.flatten()
            keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, flat.topk(cfg.k * xs.shape[0],
                                                                                  sorted=False).indices, True)
            codes = acts * keep.view_as(acts)
            with torch.no_grad():  # the inference threshold: a running mean of the smallest kept activation
                positive = codes[codes > 0]
                if positive.numel():
                    sae.threshold.mul_(0.99).add_(0.01 * positive.min())
        else:
            codes = pre.relu()
        recon = codes @ sae.W_dec + sae.b_dec
        active = codes.detach() > 0
        fired = active.any(0)
        l0 = active.sum(-1)
        pre = pre.detach().relu()
    e = xs - recon
    fvu = e.pow(2).sum() / total_var
    loss = fvu
    if arch == "standard":
        loss = loss + cfg.l1_coefficient * (codes * sae.W_dec.norm(dim=1)).sum() / total_var
    if cfg.auxk_alpha > 0 and n_dead > 0 and arch != "standard":
        # AuxK (Gao et al. 2024, as in sparsify): the top dead latents reconstruct what the live ones miss
        k_aux = min(sae.cfg.d_in // 2, n_dead)
        weight = min(n_dead / max(1, sae.cfg.d_in // 2), 1.0)
        with torch.no_grad():
            aux_vals, aux_idx = pre.masked_fill(~dead, -1.0).topk(k_aux, dim=-1, sorted=False)
            aux_vals.clamp_min_(0)
        aux_vals = GatheredEncode.apply(aux_vals, xin, sae.W_enc, sae.b_enc, aux_idx)
        e_hat = sae.decode_sparse(aux_vals, aux_idx, bias=False)
        loss = loss + cfg.auxk_alpha * weight * (e_hat - e.detach()).pow(2).sum() / total_var
    return loss, fvu.detach(), fired, l0


def _check_finite(x: Tensor, where: str) -> None:
    """NaN or inf activations are the model's or the data's fault, not the optimiser's: say so before training
    on them (a NaN loss would otherwise read as divergence)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise OlmoIVError(f"{bad} of {x.shape[0]} activation vectors in {where} are NaN or infinite: check the "
                          "model's weights and the hook point")


def train_sae(stream: ActivationStream, cfg: TrainConfig, *, state: TrainState | None = None,
              progress: ProgressFn | None = None, on_checkpoint: Callable[[TrainState], None] | None = None,
              **meta: Any) -> TrainResult:
    """Train (or, given a checkpoint `state`, continue training) an SAE on `stream`.

    meta: SAEConfig metadata fields (hook_name, model_name, context_size, metadata). Deterministic on CPU: the
    same stream and settings give the same weights, and a run resumed from any checkpoint ends with exactly the
    weights of an uninterrupted run.
    """
    cfg.validate()
    if state is None:
        state = new_state(stream, cfg, **meta)
    else:
        stream.restore(state.stream_state)
    sae, opt = state.sae, state.optimizer
    base_lr = cfg.lr_for(sae.cfg.d_sae)
    window = state.window
    sae.train()
    reported = state.step  # steps already reported (a resumed run starts its bar there)
    while state.step < cfg.steps:
        step = state.step
        for group in opt.param_groups:
            group["lr"] = base_lr * cfg.lr_factor(step)
        x = stream.next_batch(cfg.batch_size)
        _check_finite(x, f"the batch of step {step}")
        dead = state.tokens_since_fired >= min(cfg.dead_tokens, max(state.tokens_seen, 1))
        if state.tokens_seen == 0:
            dead = torch.zeros_like(dead)
        loss, fvu, fired, l0 = _step_losses(sae, x, cfg, dead)
        if not torch.isfinite(loss):
            raise OlmoIVError(f"training diverged: the loss is {float(loss.detach())} at step {step}; lower lr= (now "
                              f"{base_lr * cfg.lr_factor(step):.3g}) or check the activations for inf/nan")
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        n = x.shape[0]
        state.tokens_since_fired += n
        state.tokens_since_fired[fired] = 0
        state.tokens_seen += n
        state.step += 1
        window["fvu"] += float(fvu)
        window["l0"] += float(l0.float().mean())
        window["loss"] += float(loss.detach())
        window["n"] += 1
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            m = window["n"]
            info = {"step": state.step, "tokens": state.tokens_seen, "loss": window["loss"] / m,
                    "fvu": window["fvu"] / m, "l0": window["l0"] / m,
                    "dead": dead_fraction(state.tokens_since_fired, cfg.dead_tokens, state.tokens_seen),
                    "lr": base_lr * cfg.lr_factor(step)}
            state.history.append(info)
            window.update(fvu=0.0, l0=0.0, loss=0.0, n=0)
            if progress is not None:
                progress("training", state.step - reported, cfg.steps, info)
                reported = state.step
        state.stream_state = stream.state()
        if on_checkpoint is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 \
                and state.step < cfg.steps:
            on_checkpoint(state)
    sae.eval()
    final = state.history[-1] if state.history else {}
    return TrainResult(sae=sae, history=state.history, final=final)


def dead_fraction(tokens_since_fired: Tensor, dead_tokens: int, tokens_seen: int) -> float:
    """Fraction of latents silent for dead_tokens tokens (or for every token so far, in shorter runs)."""
    if tokens_seen == 0:
        return 0.0
    return float((tokens_since_fired >= min(dead_tokens, tokens_seen)).float().mean())


# -- checkpoints as plain tensors + JSON (safetensors, never pickle) ---------------------------------------


def state_to_files(state: TrainState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a TrainState into tensors (for safetensors) and a JSON-ready dict."""
    tensors: dict[str, Tensor] = {f"sae.{k}": v.detach().clone().contiguous() for k, v in state.sae.state_dict().items()}
    opt = state.optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state_keys": {}}
    for pid, pstate in opt["state"].items():
        keys = []
        for key, value in pstate.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"opt.{pid}.{key}"] = t.detach().clone().contiguous()
            keys.append(key)
        opt_meta["state_keys"][str(pid)] = keys
    tensors["tokens_since_fired"] = state.tokens_since_fired.clone()
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"step": state.step, "tokens_seen": state.tokens_seen, "stream_state": state.stream_state,
            "history": [dict(h) for h in state.history], "window": dict(state.window), "sae_config": state.sae.cfg.to_dict(), "optimizer": opt_meta,
            "optimizer_class": type(state.optimizer).__name__}
    return tensors, meta


def state_from_files(tensors: dict[str, Tensor], meta: dict[str, Any], cfg: TrainConfig) -> TrainState:
    """Rebuild a TrainState written by `state_to_files`."""
    sae_cfg = SAEConfig(**meta["sae_config"])
    sae = SAE(sae_cfg, seed=None)
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    opt = make_optimizer(sae, cfg)
    om = meta["optimizer"]
    state = {int(pid): {key: tensors[f"opt.{pid}.{key}"] for key in keys} for pid, keys in om["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    return TrainState(sae=sae, optimizer=opt, step=int(meta["step"]), stream_state=meta["stream_state"],
                      tokens_since_fired=tensors["tokens_since_fired"].clone(), tokens_seen=int(meta["tokens_seen"]),
                      history=list(meta["history"]), window=dict(meta["window"]))
