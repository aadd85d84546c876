"""A bridge run on disk (`olmo-iv saif bridge`): how many SAE latents an instruction vector needs.

Units, in order (each resumable; a later one reads the earlier ones' files):
    layers       (only when no layer is given) single-layer full patching at every layer; the layer whose patch
                 restores most RR is the one studied
    ranking      the decomposition on every sample: the latent ranking (two held-out rows with heldout=True), the
                 top latents with their logit-lens tokens, and the SAE's fingerprint
    part_NNNN    latent-level patching of PART_SIZE samples with that ranking

Merged files: bridge.csv (per k: RR mean and bootstrap CI, explained fraction), samples.csv (every sample and
column), latents.csv (the top latents), layers.csv (with the layer profile), bridge.png/.pdf, summary.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from olmo_iv import tasks as task_registry
from olmo_iv.analysis.bridge import (
    DEFAULT_KS,
    METHODS,
    BridgeResult,
    Ranking,
    best_layer,
    bootstrap_mean_ci,
    bridge,
    check_ks,
    decompose,
    latent_table,
    layer_profile,
    rank_latents,
    split_folds,
)
from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.io import versions
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs import figures
from olmo_iv.runs.patch import DEFAULT_TASKS
from olmo_iv.runs.store import RunStore
from olmo_iv.runs.tables import fmt_float
from olmo_iv.sae.arch import SAE
from olmo_iv.sae.data import hook_layer

PART_SIZE = 25
CONFIDENCE = 0.95
N_BOOT = 2000
LENS_TOKENS = 8
"""Logit-lens tokens listed per latent (each way)."""


@dataclass
class BridgeSettings:
    """Everything that determines a bridge run; recorded in run.json and checked on resume."""

    model: str = "toy"
    """Built-in name, local folder or hub id."""
    task: str = DEFAULT_TASKS[0]
    """Registry name (`olmo-iv tasks` lists them); the default is the first task `olmo-iv patch` runs."""
    mode: str = "faithful"
    """Prompts as in `olmo-iv patch`: faithful (patched at the filler) or reference (at the query's first token)."""
    layer: int | None = None
    """The layer patched (hook_resid_post); None: the given SAE's layer, or (no SAE given, or one that records no
    hook point) the layer whose single-layer full patch restores most RR."""
    sae: str | None = None
    """SAE folder or file (SAELens, sparsify, Gemma Scope); None: the SAE shipped for (model, layer)."""
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    """Numbers of top latents patched; every latent, and every latent plus the error term, are always added."""
    samples: int = 100
    """Samples of the task: the first N rows in file order."""
    method: str = "abs"
    """How latents are ranked: abs, signed or attribution (olmo_iv.analysis.bridge.METHODS)."""
    heldout: bool = False
    """Rank on one seeded half of the samples and evaluate on the other (both ways)."""
    seed: int = 0
    """Seed of the held-out split and of the bootstrap."""
    top_latents: int = 20
    """Latents listed in latents.csv."""
    max_rank: int = 1000
    """Ranks above this give the RR sentinel (0 faithful, -1 reference)."""
    device: str = "cpu"
    """torch device."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.mode not in task_registry.MODES:
            raise OlmoIVError(f"mode={self.mode!r} is not one of {', '.join(task_registry.MODES)}")
        self.task = task_registry.get_task(self.task).name
        if self.method not in METHODS:
            raise OlmoIVError(f"method={self.method!r}: use one of {', '.join(METHODS)}")
        if self.layer is not None:
            check_range("layer", self.layer, 0)
        self.ks = check_ks(self.ks)
        check_range("samples", self.samples, 2 if self.heldout else 1)
        check_range("top_latents", self.top_latents, 1)
        check_range("max_rank", self.max_rank, 1)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise OlmoIVError(f"dtype={self.dtype!r}: use float32, bfloat16 or float16")

    @property
    def rr_sentinel(self) -> float:
        return -1.0 if self.mode == "reference" else 0.0


def shipped_sae(model: str, layer: int, device: str) -> SAE:
    """The SAE shipped for (model, layer), on `device`."""
    try:
        from olmo_iv.sae.builtin import resolve_sae
    except ImportError:  # a checkout without shipped SAEs: only explicit ones
        raise OlmoIVError(f"no SAE is shipped with this installation for model={model!r}: pass sae= a folder "
                          "(e.g. one written by `olmo-iv sae train`)") from None
    found = resolve_sae(None, model, layer)
    return (found if isinstance(found, SAE) else SAE.load(found, device=device)).to(device).eval()


def sae_fingerprint(sae: SAE) -> str:
    """Config and weights of an SAE, hashed: a resumed run refuses an SAE other than the one it started with."""
    from olmo_iv.sae.data import model_fingerprint

    cfg = json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256((cfg + model_fingerprint(sae)).encode()).hexdigest()[:16]


class _Lazy:
    """The model and the encoded samples, loaded on first use: a continued run whose units are done needs neither."""

    def __init__(self, settings: BridgeSettings, samples: list) -> None:
        self.settings, self.samples = settings, samples
        self._model, self._encoded = None, None

    @property
    def model(self):
        if self._model is None:
            s = self.settings
            self._model = load(s.model, dtype=getattr(torch, s.dtype), device=s.device)
            if self._model.tokenizer is None:
                raise OlmoIVError(f"model {s.model!r} has no tokenizer.json: the bridge needs it to build prompts")
        return self._model

    @property
    def encoded(self) -> list:
        if self._encoded is None:
            self._encoded = task_registry.encode(self.samples, self.model.tokenizer)
        return self._encoded


def run_bridge(settings: BridgeSettings, out: str | Path, *, overwrite: bool = False,
               progress: ProgressFn | None = None) -> dict:
    """Run (or continue) the bridge and write its files into `out`. Returns the summary dict."""
    store = RunStore.open(out, "bridge", asdict(settings), models=[settings.model], overwrite=overwrite)
    samples = task_registry.samples(settings.task, mode=settings.mode, n=settings.samples)
    lazy = _Lazy(settings, samples)
    # an explicit SAE is read before any unit is done: a bad path then fails a start that blocks nothing
    given = SAE.load(settings.sae, device=settings.device).eval() if settings.sae is not None else None
    layer, profile = _layer(store, settings, lazy, given, progress)
    sae = given if given is not None else shipped_sae(settings.model, layer, settings.device)
    fp = sae_fingerprint(sae)
    if not store.done("ranking"):
        store.complete("ranking", _ranking_unit(settings, lazy, sae, layer),
                       meta={"sae_fingerprint": fp, "layer": layer})
    recorded = json.loads((store.unit_dir("ranking") / "done.json").read_text())["sae_fingerprint"]
    if recorded != fp:
        raise OlmoIVError(f"{store.root} holds a bridge run started with another SAE (fingerprint {recorded}, now "
                          f"{fp}): choose another out=, or pass overwrite=True to start afresh")
    ranking, folds = _read_ranking(store)
    parts = [(f"part_{k:04d}", start) for k, start in enumerate(range(0, len(samples), PART_SIZE))]
    for unit, start in parts:
        chunk = slice(start, start + PART_SIZE)
        if not store.done(unit):
            result = bridge(lazy.model, sae, lazy.encoded[chunk], layer, ks=settings.ks, ranking=ranking,
                            folds=folds[chunk], max_rank=settings.max_rank, rr_sentinel=settings.rr_sentinel)
            store.complete(unit, {"rows.json": _part_rows(samples[chunk], result)})
        if progress is not None:
            progress("latent patching", len(samples[chunk]), len(samples))
    return _merge(store, settings, layer, profile, fp, [u for u, _ in parts])


def _layer(store: RunStore, settings: BridgeSettings, lazy: _Lazy, given: SAE | None,
           progress) -> tuple[int, list[dict] | None]:
    """The settings' layer; else the given SAE's layer; else the best single layer by full patching (the `layers`
    unit), with every layer's RR."""
    if settings.layer is not None:
        n_layers = lazy.model.config.n_layers
        if settings.layer >= n_layers:
            raise OlmoIVError(f"layer={settings.layer} is out of range: {settings.model} has layers 0..{n_layers - 1}")
        return settings.layer, None
    if given is not None and given.cfg.hook_name:
        layer = hook_layer(given.cfg.hook_name)
        if layer is None:
            raise OlmoIVError(f"the SAE reads {given.cfg.hook_name!r}, not a block's output: give an SAE of "
                              "blocks.L.hook_resid_post")
        return layer, None
    if not store.done("layers"):
        result = layer_profile(lazy.model, lazy.encoded, max_rank=settings.max_rank, rr_sentinel=settings.rr_sentinel,
                               progress=progress)
        rr = result.rr_patched.numpy()
        rows = []
        for layer in range(rr.shape[1]):
            low, high = bootstrap_mean_ci(rr[:, layer], CONFIDENCE, N_BOOT, settings.seed)
            rows.append({"layer": layer, "rr_mean": float(rr[:, layer].mean()), "rr_low": low, "rr_high": high})
        store.complete("layers", {"layers.json": {"best": best_layer(result), "rows": rows}})
    got = store.read_json("layers", "layers.json")
    return int(got["best"]), got["rows"]


def _ranking_unit(settings: BridgeSettings, lazy: _Lazy, sae: SAE, layer: int) -> dict:
    """The decomposition on every sample: the ranking the parts use (held-out rows and folds, or one row), and the
    all-sample ranking's top latents with their logit-lens tokens."""
    from olmo_iv.sae.analysis import logit_lens

    model, encoded = lazy.model, lazy.encoded
    dec = decompose(model, sae, encoded, layer, gradients=settings.method == "attribution")
    whole = rank_latents(dec, settings.method)
    if settings.heldout:
        folds = split_folds(len(encoded), settings.seed)
        ranking = rank_latents(dec, settings.method, folds)
    else:
        folds, ranking = torch.zeros(len(encoded), dtype=torch.long), whole
    rows = latent_table(dec, whole, min(settings.top_latents, sae.cfg.d_sae))
    k = min(LENS_TOKENS, model.config.vocab_size)
    for row in rows:
        lens = logit_lens(model, sae, row["latent"], k=k)
        for side in ("top", "bottom"):
            row[f"{side}_tokens"] = [model.tokenizer.decode([t]) for t, _ in lens[side]]
    tensors = {"order": ranking.order.contiguous(), "scores": ranking.scores.contiguous(), "folds": folds}
    return {"ranking.safetensors": save_tensors(tensors), "latents.json": rows}


def _read_ranking(store: RunStore) -> tuple[Ranking, torch.Tensor]:
    tensors = load_tensors((store.unit_dir("ranking") / "ranking.safetensors").read_bytes())
    return Ranking(store.settings["method"], tensors["order"], tensors["scores"]), tensors["folds"]


def _part_rows(samples: list, result: BridgeResult) -> list[dict]:
    """One record per sample: its index, query and answer, fold, target and full patching, and every column."""
    rr, rr_t, rr_f = result.rr.tolist(), result.rr_target.tolist(), result.rr_full.tolist()
    out = []
    for i, s in enumerate(samples):
        out.append({"index": s.index, "query": s.query, "answer": s.answer, "fold": int(result.folds[i]),
                    "rank_target": int(result.rank_target[i]), "rr_target": rr_t[i],
                    "logit_target": float(result.logit_target[i]), "rank_full": int(result.rank_full[i]),
                    "rr_full": rr_f[i], "logit_full": float(result.logit_full[i]),
                    "delta_sq": float(result.delta_sq[i]),
                    "columns": [{"column": c, "n_latents": n, "rank": int(result.rank[i, j]), "rr": rr[i][j],
                                 "logit": float(result.logit[i, j]), "residual_sq": float(result.residual_sq[i, j])}
                                for j, (c, n) in enumerate(zip(result.columns, result.n_latents, strict=True))]})
    return out


def _merge(store: RunStore, settings: BridgeSettings, layer: int, profile: list[dict] | None, fp: str,
           units: list[str]) -> dict:
    rows = [r for unit in units for r in store.read_json(unit, "rows.json")]
    columns = [(c["column"], c["n_latents"]) for c in rows[0]["columns"]]
    delta_sq = np.array([r["delta_sq"] for r in rows])
    ci = lambda x: bootstrap_mean_ci(x, CONFIDENCE, N_BOOT, settings.seed)  # noqa: E731
    curve = []
    for j, (column, n_latents) in enumerate(columns):
        rr = np.array([r["columns"][j]["rr"] for r in rows])
        residual = np.array([r["columns"][j]["residual_sq"] for r in rows])
        explained = 1.0 - residual.sum() / delta_sq.sum() if delta_sq.sum() > 0 else float("nan")
        curve.append({"column": column, "n_latents": n_latents, "rr_mean": float(rr.mean()),
                      **dict(zip(("rr_low", "rr_high"), ci(rr))),
                      "rank_median": float(np.median([r["columns"][j]["rank"] for r in rows])),
                      "explained": float(explained)})
    baselines = {}
    for name in ("target", "full"):
        rr = np.array([r[f"rr_{name}"] for r in rows])
        low, high = ci(rr)
        baselines[name] = {"rr_mean": float(rr.mean()), "rr_low": low, "rr_high": high,
                           "rank_median": float(np.median([r[f"rank_{name}"] for r in rows]))}
    files = []
    head = ["column", "n_latents", "rr_mean", "rr_low", "rr_high", "rank_median", "explained"]
    files.append(store.write_csv("bridge.csv", head, [[c[h] if h in ("column", "n_latents") else fmt_float(c[h])
                                                        for h in head] for c in curve]
                                 + [[name, "", *(fmt_float(b[h]) for h in head[2:6]), fmt_float(float(name == "full"))]
                                    for name, b in baselines.items()]))
    sample_head = ["index", "query", "answer", "fold", "column", "n_latents", "rank", "rr", "logit", "residual_sq",
                   "delta_sq", "rank_target", "rr_target", "rank_full", "rr_full"]
    files.append(store.write_csv("samples.csv", sample_head, [
        [r["index"], r["query"], r["answer"], r["fold"], c["column"], c["n_latents"], c["rank"], fmt_float(c["rr"]),
         fmt_float(c["logit"]), fmt_float(c["residual_sq"]), fmt_float(r["delta_sq"]), r["rank_target"],
         fmt_float(r["rr_target"]), r["rank_full"], fmt_float(r["rr_full"])] for r in rows for c in r["columns"]]))
    latents = store.read_json("ranking", "latents.json")
    lat_head = ["rank", "latent", "score", "share", "mean_dz", "mean_z_src", "mean_z_tgt", "fires_src", "fires_tgt",
                "norm", "explained_cumulative"]
    files.append(store.write_csv("latents.csv", [*lat_head, "top_tokens", "bottom_tokens"], [
        [*(row[h] if h in ("rank", "latent") else fmt_float(row[h]) for h in lat_head),
         " | ".join(row["top_tokens"]), " | ".join(row["bottom_tokens"])] for row in latents]))
    if profile is not None:
        files.append(store.write_csv("layers.csv", ["layer", "rr_mean", "rr_low", "rr_high"],
                                     [[p["layer"], *(fmt_float(p[h]) for h in ("rr_mean", "rr_low", "rr_high"))]
                                      for p in profile]))
    title = (f"{figures.display_model(settings.model)} · {figures.display_task(settings.task)} · layer {layer} · "
             f"{settings.mode}, n={len(rows)}" + (", held-out ranking" if settings.heldout else ""))
    files += store.save_figure("bridge", figures.bridge_curve(curve, baselines, title=title,
                                                              confidence=CONFIDENCE, method=settings.method))
    source = "settings" if settings.layer is not None else "sae" if profile is None else "best single layer"
    summary = {"settings": asdict(settings), "layer": layer, "layer_from": source,
               "layer_profile": profile, "n": len(rows), "sae_fingerprint": fp, "confidence": CONFIDENCE,
               "curve": curve, **baselines, "latents": latents[: min(10, len(latents))],
               "checkpoints": store.checkpoints, "versions": versions()}
    summary["files"] = [p.name for p in files] + ["summary.json"]
    store.write_json("summary.json", summary)
    store.finish()
    return summary
