"""The straightforward implementations that the fast paths are tested and benchmarked against.

Each is written for clarity, not speed: one hooked forward per (sample, layer set) for patching, one enumerated
and multiplied-out path at a time for path tracing. Tests assert that the engines equal these; the benchmarks
time both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from olmo_iv.activations import answer_rank
from olmo_iv.analysis.paths import (
    AttnGraph,
    Observation,
    PathConfig,
    PathResult,
    Surrogates,
    layer_weights,
    model_rank,
    prepare,
)
from olmo_iv.model import OLMo2


def patch_layers_reference(model, sources, targets, answers, layer_sets, *, source_pos=-1, target_pos=0):
    """The straightforward method, for tests and benchmarks: one source run and one hooked target run per
    (sample, layer set), batch size 1, full forward, plain forward hooks. Returns (logits [S, K], ranks [S, K])."""
    L = model.config.n_layers
    logits = torch.empty(len(targets), len(layer_sets))
    ranks = torch.empty(len(targets), len(layer_sets), dtype=torch.long)
    for i, (src, tgt, ans) in enumerate(zip(sources, targets, answers)):
        for j, layer_set in enumerate(layer_sets):
            _, cache = model.run_with_cache(src[None], names=[f"blocks.{l}.hook_resid_post" for l in range(L)])
            p = target_pos if target_pos >= 0 else len(tgt) + target_pos

            def put(x, name, p=p, cache=cache):
                x = x.clone()
                x[:, p] = cache[name][:, source_pos]
                return x

            with model.hooks({f"blocks.{l}.hook_resid_post": put for l in set(layer_set)}):
                out = model(tgt[None])[:, -1]
            logit, rank = answer_rank(out, torch.tensor([ans]))
            logits[i, j], ranks[i, j] = logit[0], rank[0]
    return logits, ranks




def edge_list(argmax: np.ndarray, layer: int, j: int) -> list[int]:
    """Targets of node (layer-1, j) in the reference order: ascending q over the heads' argmax edges ([L, H, T]
    array), then the pure self edge appended if no head made it."""
    out = [int(q) for q in np.flatnonzero((argmax[layer] == j).any(0))]
    return out if j in out else [*out, j]


def enumerate_paths(graph: AttnGraph, source: int) -> list[tuple[int, ...]]:
    """Brute-force DFS over every walk from (-1, source); keeps those at the last token at layer L-1."""
    L, _, T = graph.shape
    a = graph.argmax.cpu().numpy()
    lists = [[edge_list(a, layer, j) for j in range(T)] for layer in range(L)]
    out, stack = [], [(source,)]
    while stack:
        path = stack.pop()
        layer = len(path) - 1
        if layer == L:
            if path[-1] == T - 1:
                out.append(path)
            continue
        stack.extend(path + (q,) for q in reversed(lists[layer][path[-1]]))
    return out


def path_value_direct(model: OLMo2, obs: Observation, sur: Surrogates, graph: AttnGraph, path: Sequence[int],
                      mode: str = "reference") -> Tensor:
    """The value of one path: the per-layer maps applied one after another, head by head, to X_emb[s]."""
    cfg = model.config
    H, dh, rep = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    a, amax = graph.argmax.cpu().numpy(), graph.amax.cpu().numpy()
    v = obs.x_emb[path[0]]
    for layer in range(cfg.n_layers):
        j, q = path[layer], path[layer + 1]
        w_v, w_o, w_up, w_down = layer_weights(model, layer)
        heads = [h for h in range(H) if a[layer, h, q] == j]
        if mode == "reference":
            weight, skip = dict.fromkeys(range(H), 1.0), 1.0
        elif mode == "masked_heads":
            weight, skip = dict.fromkeys(heads, 1.0), float(j == q)
        else:
            weight, skip = {h: float(amax[layer, h, q]) for h in heads}, float(j == q)
        att = torch.zeros_like(v)
        for h, c in weight.items():
            kv = h // rep
            att += c * (w_o[:, h * dh : (h + 1) * dh] @ (w_v[kv * dh : (kv + 1) * dh] @ v))
        v = skip * v + sur.s_att[layer, q] * att
        v = v + sur.s_mlp[layer, q] * (w_down @ (sur.act_g[layer, q] * (w_up @ v)))
    return v


def trace_direct(model: OLMo2, ids: Tensor | Sequence[int], answer: int, cfg: PathConfig | None = None) -> PathResult:
    """`trace` computed path by path: enumerate, multiply out, read out with a full sort (as the reference)."""
    cfg = cfg or PathConfig()
    obs, sur, graph, sources, total = prepare(model, ids, answer, cfg)
    w_u = model.lm_head.weight
    toks, logits, ranks = [], [], []
    with torch.no_grad():
        for s in sources:
            for path in enumerate_paths(graph, s):
                z = w_u @ (sur.s_fin * path_value_direct(model, obs, sur, graph, path, cfg.mode))
                rank = int((torch.argsort(z, descending=True, stable=True) == answer).nonzero()) + 1
                if rank <= cfg.threshold:
                    toks.append(path)
                    logits.append(float(z[answer]))
                    ranks.append(rank)
    L = graph.shape[0]
    return PathResult(torch.tensor(toks, dtype=torch.long).reshape(-1, L + 1), torch.tensor(logits),
                      torch.tensor(ranks, dtype=torch.long), total, sources, answer, graph, cfg,
                      *model_rank(obs.logits, answer))


# ---------------------------------------------------------------------------------------------------- steering


@torch.no_grad()
def stolfo_vectors(model: OLMo2, with_ids: Sequence[Sequence[int]], without_ids: Sequence[Sequence[int]],
                   hook: str = "hook_resid_post") -> tuple[Tensor, Tensor]:
    """The authors' vectors, pair by pair: one full forward per prompt, the last token's activation at every
    layer, the mean of the differences, unit-normalised; z̄ the mean projection of the with-instruction runs."""
    L = model.config.n_layers
    names = [f"blocks.{l}.{hook}" for l in range(L)]
    diffs, withs = [], []
    for a, b in zip(with_ids, without_ids, strict=True):
        _, ca = model.run_with_cache(torch.tensor([list(a)]), names=names)
        _, cb = model.run_with_cache(torch.tensor([list(b)]), names=names)
        ha = torch.stack([ca[n][0, -1] for n in names]).double()
        hb = torch.stack([cb[n][0, -1] for n in names]).double()
        diffs.append(ha - hb)
        withs.append(ha)
    d = torch.stack(diffs).mean(0)
    u = d / d.norm(dim=-1, keepdim=True)
    zbar = torch.stack([(h * u).sum(-1) for h in withs]).mean(0)
    return u.float(), zbar.float()


@torch.no_grad()
def stolfo_generate(model: OLMo2, prompt: Sequence[int], layer: int, u: Tensor, *, mode: str = "adjust_rs",
                    coef: float = 1.0, zbar: float = 0.0, max_new_tokens: int = 16, stop_id: int | None = None,
                    hook: str = "hook_resid_post", all_logits: bool = False) -> list[int]:
    """The authors' steered greedy decoding: one prompt at a time, no cache; for every new token the whole sequence
    is run again with the hook editing every position at one layer. all_logits: unembed every position, as
    TransformerLens's forward returns them to the authors' loop (their cost); the next token is read from the
    last either way."""
    u = (u.float() / u.float().norm()).to(model.device)

    def edit(x: Tensor, name: str) -> Tensor:
        h = x.float()
        if mode == "add":
            return (h + coef * u).to(x.dtype)
        proj = h @ u
        return (h + (coef * ((zbar - proj) if mode == "adjust_rs" else -proj))[..., None] * u).to(x.dtype)

    ids = list(prompt)
    new: list[int] = []
    with model.hooks({f"blocks.{layer}.{hook}": edit}):
        for _ in range(max_new_tokens):
            x = torch.tensor([ids], device=model.device)
            logits = model(x)[0, -1] if all_logits else model(x, logits_at=-1)[0]
            nxt = int(logits.argmax())
            if nxt == stop_id:
                break
            new.append(nxt)
            ids.append(nxt)
    return new
