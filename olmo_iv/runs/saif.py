"""SAIF runs on disk (`olmo-iv saif run`), through the run store: which SAE latents carry each instruction, what
they mean, and whether steering with them makes the model follow the instruction without being told.

One run does the whole pipeline of He et al. (arXiv 2502.11356) for every instruction type, on any model and SAEs
(default: the steering toy with its shipped SAEs, offline, in under a minute):

1. score: positives (content + instruction, in every paraphrase and translation) against negatives (the content
   alone), at the last prompt token of the chat-templated prompt, at every layer with an SAE, for both
   placements (instruction after the content, SAIF's default, and before it);
2. interpret: the selected latents' logit-lens tokens and their proximity to the instruction's own tokens;
3. steer held-out contents without the instruction, judged strict and loose, under these conditions:
   - none (no instruction, no steering) and prompting (the instruction, post and pre): the baselines;
   - diffmean: Stolfo's difference-of-means vector at the same layer (adjust_rs), the strong simple baseline;
   - saif_k{k}: the top-k latents' decoder directions weighted by mu+, set to the positives' mean projection
     (adjust_rs, SAIF's "calibrated residual-stream adjustment"), for every k of the k-sweep;
   - clamp: the top-k latents clamped to mu+ in SAE space, the SAE's error term kept;
   - sdcv: the difference-of-means vector denoised onto the top-k decoder directions (Zhao et al.);
   - top1_decay: the best latent alone with a decaying strength (Xie), the strength chosen per type on training
     contents (top1_strength.csv);
   - saif_output_k{k}: the SAIF vector from the k selected latents with the best output score (Arad et al.: the
     next-token probability a latent moves to the type's output tokens when amplified; output_scores.csv);
   - the layer sweep (saif at every layer, on all positions and on the prompt only: without the generated
     tokens, a final-layer edit cannot act at all) and the placement comparison (latents scored pre vs post).

Outputs: contexts.csv (the top activating prompt positions of each type's best latents), latents.csv (per layer, placement, type: the top latents with mu+, mu-, f+, f-, the lowest per-variant
firing, logit-lens tokens, proximity), results.csv (every response with its verdicts), top1_strength.csv, output_scores.csv, summary.json (accuracy
per condition and type, settings, checkpoints, versions) and figures (conditions, k-sweep, layer sweep, placement).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.io import versions
from olmo_iv.loading import load
from olmo_iv.progress import ProgressFn
from olmo_iv.runs.store import RunStore

PLACEMENTS = ("post", "pre")
WEIGHTS = ("mu_pos", "mean_diff")


@dataclass
class SaifSettings:
    """What determines a SAIF run."""

    model: str = "toy-steer"
    sae: str | None = None
    """None: the SAEs shipped for the model (one per layer). Otherwise a folder with one SAE per layer in
    subfolders named by hook (blocks.{l}.hook_resid_post), or a single SAE's folder (then only its layer)."""
    source: str | None = None
    """Instruction data (olmo_iv.tasks.saif): 'toy-steer' (the toy's eight IFEval types) or 'saif' (translation,
    summarization, keywords). None: 'toy-steer' for the toy-steer models, 'saif' otherwise."""
    types: list[str] | None = None
    """Instruction types; None: every type of the source."""
    layer: int | None = None
    """The layer of the main comparison and the k-sweep; None: the final layer (SAIF's finding)."""
    layers: list[int] | None = None
    """The layer sweep; None: every layer with an SAE."""
    k: int = 8
    """Latents selected for the main comparison (clamp, sdcv, the layer sweep and the placement comparison)."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """The k-sweep."""
    method: str = "saif"
    """Latent score (olmo_iv.analysis.latents.METHODS)."""
    tau: float = 0.1
    """saif: a latent that fires on more than this share of the negatives is excluded."""
    variants_by: str = "language"
    """The unit of consistency (the lowest firing rate over variants): 'language' (each translation, its
    paraphrases pooled) or 'phrasing' (each paraphrase alone; with one or two samples per phrasing this asks a
    latent to fire on nearly every positive)."""
    weights: str = "mu_pos"
    """Decoder directions weighted by mu+ (mean activation on the positives) or by mu+ - mu-."""
    decay: float = 0.9
    """top1_decay: the k-th generated token gets gamma^k of the strength."""
    strengths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    """top1_decay: the candidate strengths, in multiples of the shift that moves the latent's code from mu- to mu+;
    the one used is chosen per type on `n_valid` training contents (the authors' rule, as for layers)."""
    output_alpha: float = 1.0
    """saif_output: each candidate latent's output score is measured with its unit decoder direction added at this
    multiple of the mean residual norm (the validation contents' last prompt token, at the main layer)."""
    n_valid: int | None = None
    """Training contents per type (without the instruction) on which top1_decay's strength is chosen and the
    latents' output scores are measured (None: 16, or n_train if fewer); they are among the scored ones, never
    among the steered test contents."""
    steer: bool = True
    """False: score and interpret only (`olmo-iv saif score`): latents.csv, vectors/ and summary.json."""
    n_train: int = 48
    """Contents per type whose positives and negatives are scored (and give the difference-of-means vector)."""
    n_test: int = 16
    """Held-out contents per type that are steered."""
    max_new_tokens: int = 64
    style: str = "auto"
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from olmo_iv.analysis.latents import METHODS

        check_range("k", self.k, 1)
        if not self.ks:
            raise OlmoIVError("ks= is empty: give the numbers of latents of the k-sweep, e.g. [1, 2, 4, 8]")
        for k in self.ks:
            check_range("ks", k, 1)
        if self.method not in METHODS:
            raise OlmoIVError(f"method={self.method!r}: use one of {', '.join(METHODS)}")
        if self.weights not in WEIGHTS:
            raise OlmoIVError(f"weights={self.weights!r}: use one of {', '.join(WEIGHTS)}")
        if self.variants_by not in ("language", "phrasing"):
            raise OlmoIVError(f"variants_by={self.variants_by!r}: use 'language' or 'phrasing'")
        check_range("tau", self.tau, 0, 1)
        check_range("decay", self.decay, 0, 1, low_open=True)
        if not self.strengths:
            raise OlmoIVError("strengths= is empty: give top1_decay's candidate strengths, e.g. [1, 2, 4, 8]")
        for x in self.strengths:
            check_range("strengths", x, 0, 1e4, low_open=True)
        if self.n_valid is not None:
            check_range("n_valid", self.n_valid, 1, self.n_train)
        check_range("output_alpha", self.output_alpha, 0, 1e3, low_open=True)
        check_range("n_train", self.n_train, 2)
        check_range("n_test", self.n_test, 1)
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("batch_size", self.batch_size, 1)

    def data_source(self) -> str:
        if self.source is not None:
            return self.source
        return "toy-steer" if self.model in ("toy-steer", "toy-steer-base") else "saif"


# ---------------------------------------------------------------------------------------------- the SAEs


def load_saes(sae: str | None, model_name: str, n_layers: int, layers: list[int] | None):
    """{layer: SAE} for the run: the shipped SAEs, a folder of per-layer SAEs, or one SAE's folder."""
    from olmo_iv.sae.arch import SAE
    from olmo_iv.sae.data import hook_layer

    wanted = list(range(n_layers)) if layers is None else list(layers)
    for layer in wanted:
        if not 0 <= layer < n_layers:
            raise OlmoIVError(f"layers={layers}: this model has layers 0..{n_layers - 1}")
    if sae is None or sae == "builtin":
        from olmo_iv.sae.builtin import resolve_sae

        out = {}
        for layer in wanted:
            try:
                out[layer] = resolve_sae(None, model_name, layer)
            except OlmoIVError:
                if layers is not None:
                    raise
        if not out:
            raise OlmoIVError(f"no SAE is shipped for model {model_name!r}: pass sae= (a folder of SAEs)")
        return out
    folder = Path(sae)
    if not folder.is_dir():
        raise OlmoIVError(f"sae={sae!r} is not a folder")
    if (folder / "cfg.json").exists():  # a single SAE
        one = SAE.load(folder)
        layer = hook_layer(one.cfg.hook_name or "")
        if layer is None:
            raise OlmoIVError(f"sae={sae!r} records no block hook point (cfg.json hook_name)")
        return {layer: one}
    out = {}
    for layer in wanted:
        sub = folder / f"blocks.{layer}.hook_resid_post"
        if (sub / "cfg.json").exists():
            out[layer] = SAE.load(sub)
        elif layers is not None:
            raise OlmoIVError(f"sae={sae!r} has no SAE for layer {layer} ({sub.name}/cfg.json)")
    if not out:
        raise OlmoIVError(f"sae={sae!r} holds no SAE: expected cfg.json, or blocks.L.hook_resid_post/cfg.json")
    return out


# ---------------------------------------------------------------------------------------------- the run


def _tag(*parts: Any) -> str:
    return "__".join(str(p).replace(":", "-").replace("/", "-") for p in parts)


def run_saif(settings: SaifSettings, out: str | Path, *, overwrite: bool = False,
             progress: ProgressFn | None = None) -> dict:
    """The whole SAIF pipeline (module docstring); returns the summary it writes."""
    from olmo_iv.activations import extract
    from olmo_iv.analysis.latents import LatentScorer, instruction_proximity, output_score
    from olmo_iv.chat import format_prompt
    from olmo_iv.evals.judges import RuleJudge
    from olmo_iv.generate import encode
    from olmo_iv.interventions.steering import (
        ClampLatents,
        Steer,
        decoder_rows,
        diff_of_means,
        generate_steered,
        latent_steer,
        latent_vector,
        sdcv,
    )
    from olmo_iv.runs import figures
    from olmo_iv.runs.steer import choose_filtered, repetition
    from olmo_iv.sae.analysis import logit_lens, top_contexts_many
    from olmo_iv.tasks.saif import build_samples, saif_types

    source = settings.data_source()
    types = settings.types or list(saif_types(source))
    for t in types:
        if t not in saif_types(source):
            raise OlmoIVError(f"types={types}: {t!r} is not a type of source {source!r} "
                              f"({', '.join(saif_types(source))})")
    train = {(t, p): build_samples(source, t, n=settings.n_train, placement=p, split="train", seed=settings.seed)
             for t in types for p in PLACEMENTS}
    test = {(t, p): build_samples(source, t, n=settings.n_test, placement=p, split="test", seed=settings.seed)
            for t in types for p in PLACEMENTS}
    data_sha = hashlib.sha256(json.dumps([[asdict(s) for s in v] for v in [*train.values(), *test.values()]],
                                         sort_keys=True).encode()).hexdigest()
    model = load(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
    if model.tokenizer is None:
        raise OlmoIVError(f"model {settings.model!r} has no tokenizer.json: SAIF renders prompts, it needs one")
    L = model.config.n_layers
    saes = load_saes(settings.sae, settings.model, L, settings.layers)
    main = settings.layer if settings.layer is not None else max(saes)
    if main not in saes:
        raise OlmoIVError(f"layer={main}: there is no SAE for it (SAEs for layers {sorted(saes)})")
    sae_sha = {str(layer): hashlib.sha256(b"".join(p.detach().cpu().float().numpy().tobytes()
                                                   for p in s.parameters())).hexdigest()
               for layer, s in sorted(saes.items())}
    store = RunStore.open(out, "saif", {**asdict(settings), "source": source, "types": types,
                                        "data_sha256": data_sha, "sae_sha256": sae_sha},
                          models=[settings.model], overwrite=overwrite)
    for s in saes.values():
        s.to(model.device)
    hook = "hook_resid_post"
    layers = sorted(saes)

    def ids_of(texts: list[str]) -> list[list[int]]:
        return [encode(model.tokenizer, format_prompt(model, t, style=settings.style)) for t in texts]

    # 1. score: activations at the last prompt token, every SAE layer at once, per type and placement
    scorers: dict[tuple[int, str, str], LatentScorer] = {}
    acts_pos: dict[tuple[str, str], torch.Tensor] = {}
    acts_neg: dict[tuple[str, str], torch.Tensor] = {}
    for (t, p), samples in train.items():
        pos = extract(model, ids_of([s.positive for s in samples]), hook, layers=layers, positions=-1,
                      batch_size=settings.batch_size, dtype=torch.float32)
        neg = extract(model, ids_of([s.negative for s in samples]), hook, layers=layers, positions=-1,
                      batch_size=settings.batch_size, dtype=torch.float32)
        acts_pos[t, p], acts_neg[t, p] = pos, neg
        for i, layer in enumerate(layers):
            sae = saes[layer]
            sc = LatentScorer(sae.cfg.d_sae, tau=settings.tau)
            with torch.no_grad():
                zp, zn = sae.encode(pos[:, i].to(sae.W_dec.dtype)), sae.encode(neg[:, i].to(sae.W_dec.dtype))
            names = [s.language if settings.variants_by == "language" else s.variant for s in samples]
            for variant in sorted(set(names)):
                rows = [j for j, v in enumerate(names) if v == variant]
                sc.add(zp[rows].float().cpu(), positive=True, variant=variant)
            sc.add(zn.float().cpu(), positive=False)
            scorers[layer, t, p] = sc
        if progress is not None:
            progress("scoring", 1, len(train))

    kmax = max([settings.k, *settings.ks])
    # only latents with a positive score are instruction-relevant: a latent that never fires scores 0 and is not
    # selected, so a layer with few such latents gets fewer than k (and steers with none when there are none)
    selected: dict[tuple[int, str, str], list[int]] = {}
    for key, sc in scorers.items():
        score = sc.scores(settings.method)
        selected[key] = [j for j in sc.top(kmax, settings.method) if score[j] > 0]

    # 2. interpret: the logit lens of the selected latents, and their proximity to the instruction on both sides:
    # - instruction tokens: in the type's instructions but in none of its contents;
    # - output tokens: in at least a quarter of the model's unsteered responses to the positives and in at most
    #   5% of its responses to the negatives (what following the instruction writes: "SURE", "<<", "Bien");
    # each latent's proximity is the best rank of such a token among all tokens its decoder direction promotes,
    # next to chance (about vocab / (that many tokens + 1))
    def token_sets(t: str) -> tuple[list[int], list[int]]:
        samples = train[t, "post"]
        inst = {i for s in samples for i in model.tokenizer.encode(s.instruction).ids}
        content = {i for s in samples for i in model.tokenizer.encode(s.negative).ids}
        unit = _tag("responses", t)
        if not store.done(unit):
            got = {}
            for side, texts in (("positive", [s.positive for s in samples]), ("negative", [s.negative for s in samples])):
                got[side] = generate_steered(model, ids_of(texts), [], max_new_tokens=settings.max_new_tokens,
                                             batch_size=settings.batch_size)
            store.complete(unit, {"ids.json": got})
        got = store.read_json(unit, "ids.json")
        share = {side: {} for side in got}
        for side, rows in got.items():
            for row in rows:
                for i in set(row):
                    share[side][i] = share[side].get(i, 0) + 1 / len(rows)
        out_tokens = [i for i, f in share["positive"].items() if f >= 0.25 and share["negative"].get(i, 0) <= 0.05]
        return sorted(inst - content), sorted(out_tokens)

    tokens_of = {t: token_sets(t) for t in types}
    vocab = model.config.vocab_size

    def proximity(layer: int, latents: list[int], ids: list[int]) -> dict[int, dict]:
        if not ids or not latents:
            return {}
        return {r["latent"]: r for r in instruction_proximity(model, saes[layer], latents, ids, k=50)}

    def near_cells(near: dict, ids: list[int]) -> list:
        token = model.tokenizer.decode([near["token"]]) if near else ""
        return [near.get("rank", ""), token, round(vocab / (len(ids) + 1), 1)]

    latent_rows = []
    for (layer, t, p), latents in sorted(selected.items()):
        sc = scorers[layer, t, p]
        score = sc.scores(settings.method)
        shown = latents[: max(settings.k, 16)]
        table = {r["latent"]: r for r in sc.table(shown)}
        inst_ids, out_ids = tokens_of[t]
        near_in, near_out = proximity(layer, shown, inst_ids), proximity(layer, shown, out_ids)
        for rank, j in enumerate(shown):
            r = table[j]
            lens = logit_lens(model, saes[layer], j, k=5)["top"]
            tokens = " | ".join(model.tokenizer.decode([i]) for i, _ in lens)
            variants = [v for k_, v in r.items() if k_.startswith("f_") and k_ not in ("f_pos", "f_neg")]
            latent_rows.append([layer, p, t, rank + 1, j, round(float(score[j]), 6), round(r["mu_pos"], 6),
                                round(r["mu_neg"], 6), round(r["f_pos"], 4), round(r["f_neg"], 4),
                                round(min(variants) if variants else r["f_pos"], 4), tokens,
                                *near_cells(near_in.get(j, {}), inst_ids), *near_cells(near_out.get(j, {}), out_ids)])
    store.write_csv("latents.csv", ["layer", "placement", "type", "rank", "latent", "score", "mu_pos", "mu_neg",
                                    "f_pos", "f_neg", "min_variant_f", "logit_lens_top", "instruction_token_rank",
                                    "instruction_token", "instruction_chance_rank", "output_token_rank",
                                    "output_token", "output_chance_rank"], latent_rows)

    # top activating contexts of each type's best latents at the main layer, over all scored prompts (every type's
    # positives and negatives): where else does the latent fire?
    windows, owner = [], []
    for (t, p), samples in sorted(train.items()):
        for s in samples:
            for side, text in (("positive", s.positive), ("negative", s.negative)):
                windows.append(ids_of([text])[0])
                owner.append(f"{t} {p} {side}")
    best_of = {t: selected[main, t, "post"][:3] for t in types}
    found = top_contexts_many(model, saes[main], windows, [j for js in best_of.values() for j in js], k=5, context=12,
                              batch_size=settings.batch_size)
    context_rows = []
    for t in types:
        for j in best_of[t]:
            for c in found[j]:
                context_rows.append([main, t, j, round(c["value"], 4), owner[c["window"]], c["position"],
                                     repr(model.tokenizer.decode([c["token"]])), model.tokenizer.decode(c["context"])])
    store.write_csv("contexts.csv", ["layer", "type", "latent", "value", "prompt", "position", "token", "context"],
                    context_rows)

    # 3. steer held-out contents without the instruction
    def spec_saif(layer: int, t: str, p: str, k: int, positions: str = "all",
                  latents: list[int] | None = None) -> Steer | None:
        # the top-k selected latents, or the given ones (the output-score selection)
        sc, sae = scorers[layer, t, p], saes[layer]
        latents = selected[layer, t, p][:k] if latents is None else latents
        if not latents:
            return None
        table = sc.table(latents)
        w = torch.tensor([r["mu_pos"] if settings.weights == "mu_pos" else r["mu_pos"] - r["mu_neg"]
                          for r in table])
        v = latent_vector(sae, latents, w)
        u = v / v.norm()
        zbar = float((acts_pos[t, p][:, layers.index(layer)] @ u).mean())
        return Steer(layer=layer, vector=u, mode="adjust_rs", zbar=zbar, positions=positions)

    def spec_diffmean(layer: int, t: str, p: str) -> Steer:
        i = layers.index(layer)
        u, zbar = diff_of_means(acts_pos[t, p][:, i : i + 1], acts_neg[t, p][:, i : i + 1])
        return Steer(layer=layer, vector=u[0], mode="adjust_rs", zbar=float(zbar[0]))

    def spec_sdcv(layer: int, t: str, p: str) -> Steer | None:
        if not selected[layer, t, p]:
            return None
        i = layers.index(layer)
        u, _ = diff_of_means(acts_pos[t, p][:, i : i + 1], acts_neg[t, p][:, i : i + 1])
        d = sdcv(u[0], saes[layer], selected[layer, t, p][: settings.k])
        d = d / d.norm()
        return Steer(layer=layer, vector=d, mode="adjust_rs", zbar=float((acts_pos[t, p][:, i] @ d).mean()))

    def spec_clamp(layer: int, t: str, p: str) -> ClampLatents | None:
        latents = selected[layer, t, p][: settings.k]
        if not latents:
            return None
        values = torch.tensor([r["mu_pos"] for r in scorers[layer, t, p].table(latents)])
        return ClampLatents(sae=saes[layer], latents=latents, values=values, layer=layer)

    def spec_top1(layer: int, t: str, p: str, multiple: float | None) -> Steer | None:
        if not selected[layer, t, p] or multiple is None:
            return None
        # the best latent's direction added with `multiple` x the strength that moves its code from mu- to mu+,
        # decaying over the generated tokens
        j = selected[layer, t, p][0]
        r = scorers[layer, t, p].table([j])[0]
        strength = (r["mu_pos"] - r["mu_neg"]) * float(decoder_rows(saes[layer], [j]).norm())
        return latent_steer(saes[layer], j, multiple * strength, decay=settings.decay, layer=layer)

    # the SAIF vector of every type as steering vectors (`olmo-iv steer generate --vectors RUN/vectors/TYPE`):
    # u and z̄ per layer with an SAE; layers without one hold zeros, which steering refuses
    from safetensors.torch import save

    for t in types:
        u_all, zbar_all = torch.zeros(L, model.config.d_model), torch.zeros(L)
        for layer in layers:
            spec = spec_saif(layer, t, "post", settings.k)
            if spec is not None:
                u_all[layer], zbar_all[layer] = spec.vector, float(spec.zbar)
        folder = f"vectors/{_tag(t)}"
        store.write_bytes(f"{folder}/vectors.safetensors", save({"u": u_all, "zbar": zbar_all},
                                                                metadata={"format": "pt"}))
        store.write_json(f"{folder}/vectors.json", {
            "kind": "saif", "model": settings.model, "checkpoint": store.checkpoints[settings.model],
            "hook": hook, "position": "last", "style": settings.style, "type": t, "layers": layers,
            "k": settings.k, "weights": settings.weights, "method": settings.method, "placement": "post",
            "latents": {str(layer): selected[layer, t, "post"][: settings.k] for layer in layers},
            "sae_sha256": sae_sha, "versions": versions()})

    summary: dict[str, Any] = {"settings": asdict(settings), "source": source, "types": types, "layer": main,
                               "layers": layers, "checkpoints": store.checkpoints, "versions": versions(),
                               "sae_sha256": sae_sha, "conditions": {}, "selected": {},
                               # the tokens following each instruction writes (output proximity, output scores)
                               "output_tokens": {t: {"ids": tokens_of[t][1],
                                                     "text": [model.tokenizer.decode([i]) for i in tokens_of[t][1]]}
                                                 for t in types}}
    for (layer, t, p), latents in sorted(selected.items()):
        summary["selected"].setdefault(str(layer), {}).setdefault(p, {})[t] = latents[: settings.k]
    summary["n_positive_latents"] = {f"{layer}/{p}/{t}": int((sc.scores(settings.method) > 0).sum())
                                     for (layer, t, p), sc in sorted(scorers.items())}
    if not settings.steer:
        store.write_json("summary.json", summary)
        store.finish()
        return summary

    judge = RuleJudge()

    # top1_decay's strength, chosen per type on training contents without the instruction: unsteered and at each
    # candidate multiple; a candidate whose looping share (token 4-grams, which also see "SURESURE") exceeds no
    # steering's keeps 0, the first best wins if it beats no steering (choose_filtered, as the layer search)
    n_valid = settings.n_valid or min(16, settings.n_train)  # training contents that choose strengths and latents
    top1_multiple: dict[str, float | None] = {}
    strength_rows = []
    for t in types:
        samples = train[t, "post"][:n_valid]
        prompts = ids_of([s.negative for s in samples])
        scored = []
        for multiple in [None, *settings.strengths]:
            unit = _tag("valid_top1", "none" if multiple is None else f"x{multiple:g}", t)
            spec = spec_top1(main, t, "post", multiple)
            if multiple is not None and spec is None:
                break  # no selected latent: nothing to steer with
            if not store.done(unit):
                new = generate_steered(model, prompts, [] if spec is None else [spec],
                                       max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
                store.complete(unit, {"ids.json": new})
            new = store.read_json(unit, "ids.json")
            loose = sum(judge.judge(s, model.tokenizer.decode(g)).loose for s, g in zip(samples, new, strict=True))
            scored.append((multiple, loose / len(samples), sum(repetition(g) > 0.5 for g in new) / len(new)))
        chosen, kept = choose_filtered(scored[0][1:], [x[1:] for x in scored[1:]])
        top1_multiple[t] = None if chosen is None else scored[1 + chosen][0]
        for (multiple, loose, degenerate), k in zip(scored, [scored[0][1], *kept], strict=True):
            strength_rows.append([t, "none" if multiple is None else multiple, len(samples), round(loose, 4),
                                  round(degenerate, 4), round(k, 4), int(multiple == top1_multiple[t])])
        if progress is not None:
            progress("top-1 strength", 1, len(types))
    store.write_csv("top1_strength.csv", ["type", "multiple", "n", "loose", "degenerate", "kept", "chosen"],
                    strength_rows)
    summary["top1_multiple"] = top1_multiple

    # the output score (Arad et al., S7) of every selected latent at the main layer: amplified on the validation
    # contents, how much probability moves to the type's output tokens at the next token. The k best with a
    # positive score give the saif_output condition: selection by what a latent writes, not by where it fires.
    by_output: dict[str, list[int]] = {}
    output_rows = []
    for t in types:
        samples = train[t, "post"][:n_valid]
        targets = tokens_of[t][1]
        unit = _tag("output_score", t)
        if not store.done(unit):
            norm = float(acts_neg[t, "post"][: len(samples), layers.index(main)].norm(dim=-1).mean())
            prompts = ids_of([s.negative for s in samples])
            got = {str(j): output_score(model, saes[main], j, prompts, targets, coef=settings.output_alpha * norm,
                                        layer=main, batch_size=settings.batch_size)["score"]
                   for j in (selected[main, t, "post"] if targets else [])}
            store.complete(unit, {"scores.json": {"coef": settings.output_alpha * norm, "scores": got}})
        got = store.read_json(unit, "scores.json")
        ranked = sorted(got["scores"].items(), key=lambda kv: -kv[1])  # stable: saif order among ties
        by_output[t] = [int(j) for j, x in ranked if x > 0][: settings.k]
        for rank, j in enumerate(selected[main, t, "post"]):
            if str(j) in got["scores"]:
                output_rows.append([main, t, j, rank + 1, round(got["scores"][str(j)], 6), round(got["coef"], 6),
                                    int(j in by_output[t])])
        if progress is not None:
            progress("output scores", 1, len(types))
    store.write_csv("output_scores.csv", ["layer", "type", "latent", "saif_rank", "output_score", "coef", "selected"],
                    output_rows)
    summary["output_selected"] = by_output

    conditions: list[tuple[str, dict[str, Any], Any]] = [
        ("none", {}, lambda t: ([], False, "post")),
        ("prompting", {"placement": "post"}, lambda t: ([], True, "post")),
        ("prompting_pre", {"placement": "pre"}, lambda t: ([], True, "pre")),
        ("diffmean", {"layer": main}, lambda t: ([spec_diffmean(main, t, "post")], False, "post")),
        ("clamp", {"layer": main, "k": settings.k}, lambda t: ([spec_clamp(main, t, "post")], False, "post")),
        ("sdcv", {"layer": main, "k": settings.k}, lambda t: ([spec_sdcv(main, t, "post")], False, "post")),
        ("top1_decay", {"layer": main, "k": 1},
         lambda t: ([spec_top1(main, t, "post", top1_multiple[t])], False, "post")),
    ]
    conditions.append((f"saif_output_k{settings.k}", {"layer": main, "k": settings.k, "kind": "output-score"},
                       lambda t: ([spec_saif(main, t, "post", settings.k, latents=by_output[t])], False, "post")))
    for k in sorted(set(settings.ks)):
        conditions.append((f"saif_k{k}", {"layer": main, "k": k, "kind": "k-sweep"},
                           lambda t, k=k: ([spec_saif(main, t, "post", k)], False, "post")))
    for layer in layers:
        for positions in ("all", "prompt"):
            conditions.append((f"saif_L{layer}_{positions}", {"layer": layer, "k": settings.k, "positions": positions,
                                                              "kind": "layer-sweep"},
                               lambda t, layer=layer, positions=positions:
                               ([spec_saif(layer, t, "post", settings.k, positions)], False, "post")))
    conditions.append(("saif_scored_pre", {"layer": main, "k": settings.k, "placement": "pre", "kind": "placement"},
                       lambda t: ([spec_saif(main, t, "pre", settings.k)], False, "post")))

    results = []
    n_units = len(conditions) * len(types)
    for name, meta, make in conditions:
        for t in types:
            specs, with_instruction, placement = make(t)
            specs = [s for s in specs if s is not None]  # no selected latent: no steering (recorded as steered=0)
            samples = test[t, placement]
            texts_in = [s.positive if with_instruction else s.negative for s in samples]
            unit = _tag("gen", name, t)
            if not store.done(unit):
                new = generate_steered(model, ids_of(texts_in), specs, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size)
                store.complete(unit, {"texts.json": [model.tokenizer.decode(g) for g in new], "ids.json": new})
            texts, ids = store.read_json(unit, "texts.json"), store.read_json(unit, "ids.json")
            for i, (s, text, g) in enumerate(zip(samples, texts, ids, strict=True)):
                v = judge.judge(s, text)
                results.append([name, t, i, meta.get("layer", ""), meta.get("k", ""), meta.get("positions", "all"),
                                meta.get("placement", "post"), int(bool(specs)), int(v.strict), int(v.loose),
                                round(repetition(text), 4), round(repetition(g), 4), text])
            if progress is not None:
                progress("steering", 1, n_units)
    header = ["condition", "type", "index", "layer", "k", "positions", "placement", "steered", "strict", "loose",
              "repetition", "token_repetition", "response"]
    store.write_csv("results.csv", header, results)

    for name, meta, _ in conditions:
        rows = [r for r in results if r[0] == name]
        entry = {**meta, "by_type": {}}
        for t in [*types, None]:
            sel = [r for r in rows if t is None or r[1] == t]
            acc = {"n": len(sel), "strict": sum(r[8] for r in sel) / len(sel), "loose": sum(r[9] for r in sel) / len(sel)}
            if t is None:
                entry["overall"] = acc
            else:
                entry["by_type"][t] = acc
        summary["conditions"][name] = entry
    store.write_json("summary.json", summary)
    store.save_figure("conditions", figures.saif_conditions(summary))
    store.save_figure("k_sweep", figures.saif_k_sweep(summary))
    store.save_figure("layer_sweep", figures.saif_layer_sweep(summary))
    store.save_figure("placement", figures.saif_placement(summary))
    store.finish()
    return summary


def run_saif_steer(run_dir: str | Path, itype: str, prompts: str | Path, out: str | Path, *, layer: int | None = None,
                   mode: str = "adjust_rs", coef: float = 1.0, positions: str = "all", max_new_tokens: int = 64,
                   batch_size: int = 16, device: str = "cpu", dtype: str = "float32", overwrite: bool = False,
                   progress: ProgressFn | None = None) -> list[dict]:
    """Steered generation with the SAIF vector of type `itype` from a finished SAIF run (`run_dir`), on the model
    the run used, through `olmo_iv.runs.steer.run_generate` (generations.jsonl)."""
    from olmo_iv.runs.steer import GenerateSettings, run_generate

    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise OlmoIVError(f"run_dir={str(run_dir)!r} holds no summary.json: run `saif score` or `saif run` first")
    summary = json.loads(path.read_text())
    if itype not in summary["types"]:
        raise OlmoIVError(f"itype={itype!r}: the run scored {', '.join(summary['types'])}")
    layer = summary["layer"] if layer is None else layer
    if layer not in summary["layers"]:
        raise OlmoIVError(f"layer={layer}: the run has SAIF vectors for layers {summary['layers']}")
    settings = GenerateSettings(model=summary["settings"]["model"], vectors=str(Path(run_dir) / "vectors" / _tag(itype)),
                                prompts=str(prompts), layer=layer, mode=mode, coef=coef, positions=positions,
                                max_new_tokens=max_new_tokens, style=summary["settings"]["style"],
                                batch_size=batch_size, device=device, dtype=dtype)
    return run_generate(settings, out, overwrite=overwrite, progress=progress)
