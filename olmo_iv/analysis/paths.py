"""Path tracing with locally-linear surrogates (paper §4.3, Figures 4 and 5; docs/paths.md).

At the observed input every block is, exactly, a sum of token-to-token linear maps: the RMSNorms are per-token
diagonals, the MLP with its gate frozen is W_down diag(act(g_t)) W_up, and attention is sum_h a^h_qj W_O^h W_V^h.
A path is a token sequence s = t_-1 -> t_0 -> ... -> t_{L-1} = T-1 through the argmax-attention graph; its value
is the product of the per-layer maps applied to the embedding of s, and its readout is W_U (s_fin * v).

    result = trace(model, ids, answer_id, PathConfig(mode="reference", threshold=100))
    result.kept_per_source()          # Figure 4: kept paths per source token
    result.head_activity()            # Figure 5: [T, L, H] fraction of kept paths whose layer-l edge uses head h

How it is fast (the authors' code enumerates paths in Python and builds a d x d matrix per (layer, token)):
- path counts by dynamic programming, and pruning to the nodes that can still reach (L-1, T-1);
- values by expanding a prefix trie depth-first in chunks: every shared prefix is computed once, and one
  `olmo_iv::path_step` call steps a whole chunk (each row gathers its own token's diagonals; no d x d matrix);
- the readout ranks by counting (rank = 1 + #(z > z_answer)) in chunks, with no sort.
The straightforward per-path implementation (`olmo_iv.reference.trace_direct`) is the oracle of the tests and
the baseline of benchmarks/bench_paths.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from olmo_iv.activations import answer_rank, locate_nonfinite
from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.kernels import frozen_mlp, norm_scale, path_step
from olmo_iv.model import OLMo2
from olmo_iv.progress import ProgressFn

MODES = ("reference", "masked_heads", "attn_weighted")


@dataclass
class PathConfig:
    """Settings of one trace; recorded with every result."""

    mode: str = "reference"
    """'reference' (the authors' code: all-heads OV and the identity on every edge), 'masked_heads' (only the
    heads whose argmax made the edge; identity only on self edges) or 'attn_weighted' (those heads weighted by
    their attention a^h_qj, paper Eq. 3; identity only on self edges). docs/paths.md gives the formulas."""
    threshold: int = 100
    """Keep paths whose answer rank is <= threshold (1 = top; the reference's `rank <= 100`, the paper says < 100)."""
    sources: str = "all"
    """Source token positions: 'all', 'A:' (A to the last token, the reference's start_pos), 'A:B' (B exclusive;
    negative counts from the end) or a comma list '3,7,8'."""
    chunk: int = 4096
    """Path vectors per step call; memory is about n_layers * chunk * d_model floats."""
    readout_chunk: int = 256
    """Path vectors per unembedding matmul; memory readout_chunk * vocab_size floats."""
    max_paths: int = 10**9
    """Refuse a trace with more complete paths than this (they are counted before any work is done)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OlmoIVError(f"path mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.threshold < 1:
            raise OlmoIVError(f"threshold={self.threshold}: ranks start at 1, use a threshold of at least 1")
        check_range("chunk", self.chunk, 1)
        check_range("readout_chunk", self.readout_chunk, 1)
        check_range("max_paths", self.max_paths, 1)
        if not re.fullmatch(r"all|-?\d*:-?\d*|-?\d+(,-?\d+)*", self.sources.strip().replace(" ", "")):
            raise OlmoIVError(f"sources={self.sources!r}: use 'all', 'A:', 'A:B' or a comma list such as '3,7,8'")

    def source_positions(self, n_tokens: int) -> list[int]:
        return parse_sources(self.sources, n_tokens)


def parse_sources(spec: str, n_tokens: int) -> list[int]:
    """'all' | 'A:' | 'A:B' | 'i,j,k' -> sorted positions in [0, n_tokens)."""
    spec = spec.strip()
    try:
        if spec == "all":
            return list(range(n_tokens))
        if ":" in spec:
            a, b = spec.split(":")
            return list(range(n_tokens)[slice(int(a) if a else None, int(b) if b else None)])
        picked = [int(x) for x in spec.split(",")]
    except ValueError as err:
        raise OlmoIVError(f"sources={spec!r}: use 'all', 'A:', 'A:B' or a comma list such as '3,7,8'") from err
    outside = [p for p in picked if not -n_tokens <= p < n_tokens]
    if outside:  # dropping them would report zero paths for tokens that do not exist
        raise OlmoIVError(f"sources={spec!r}: position {outside[0]} is outside a prompt of {n_tokens} tokens")
    return sorted({p % n_tokens for p in picked})


# ----------------------------------------------------------------------------------------------------------
# The observed point and its surrogates


@dataclass
class Observation:
    """What one forward pass records (batch 1, fp32, on the model's device)."""

    ids: Tensor
    """[T] token ids."""
    x_emb: Tensor
    """[T, d] embeddings (hook_embed)."""
    y_att: Tensor
    """[L, T, d] raw attention outputs before the post-norm (attn.hook_out)."""
    y_mlp: Tensor
    """[L, T, d] raw MLP outputs before the post-norm (mlp.hook_out)."""
    gate: Tensor
    """[L, T, F] gate pre-activations (mlp.hook_pre)."""
    x_fin: Tensor
    """[T, d] input of the final norm (last block's hook_resid_post)."""
    argmax: Tensor
    """[L, H, T] int64: the key each head attends to most from each query (first index on ties)."""
    amax: Tensor
    """[L, H, T] that head's attention weight on it."""
    logits: Tensor
    """[V] the model's logits at the last position."""


def observe(model: OLMo2, ids: Tensor | Sequence[int]) -> Observation:
    """One forward with hooks: everything the surrogates and the attention graph need."""
    if model.dtype != torch.float32:
        raise OlmoIVError(f"path tracing needs an fp32 model (the surrogates are exact only in fp32), got "
                          f"{model.dtype}: load it with dtype=torch.float32")
    ids = torch.as_tensor(ids).reshape(-1).to(model.device)
    if ids.numel() == 0:
        raise OlmoIVError("path tracing needs at least one token")
    L = model.config.n_layers
    store: dict[str, Tensor | tuple[Tensor, Tensor]] = {}

    def keep(x: Tensor, name: str) -> None:
        store[name] = x[0].detach()

    def pattern(x: Tensor, name: str) -> None:  # [1, H, Tq, Tk] -> argmax key per (head, query) and its weight
        p = x[0].detach().float()
        j = p.argmax(-1)  # torch.argmax returns the first maximal index
        store[name] = (j, p.gather(-1, j[..., None])[..., 0])

    hooks = [("hook_embed", keep), (f"blocks.{L - 1}.hook_resid_post", keep)]
    for layer in range(L):
        hooks += [(f"blocks.{layer}.attn.hook_out", keep), (f"blocks.{layer}.mlp.hook_out", keep),
                  (f"blocks.{layer}.mlp.hook_pre", keep), (f"blocks.{layer}.attn.hook_pattern", pattern)]
    with torch.no_grad(), model.hooks(hooks):
        logits = model(ids[None], logits_at=ids.numel() - 1)[0]

    if not all(bool(torch.isfinite(t).all()) for t in [logits, *(v for v in store.values() if isinstance(v, Tensor))]):
        locate_nonfinite(model, [ids], "activations in path tracing")

    def layers(short: str) -> Tensor:
        return torch.stack([store[f"blocks.{layer}.{short}"] for layer in range(L)])  # type: ignore[misc]

    pats = [store[f"blocks.{layer}.attn.hook_pattern"] for layer in range(L)]
    return Observation(ids, store["hook_embed"], layers("attn.hook_out"), layers("mlp.hook_out"),  # type: ignore[arg-type]
                       layers("mlp.hook_pre"), store[f"blocks.{L - 1}.hook_resid_post"],  # type: ignore[arg-type]
                       torch.stack([p[0] for p in pats]), torch.stack([p[1] for p in pats]), logits)


@dataclass
class Surrogates:
    """The per-token diagonals of the locally-linear model at the observed point."""

    s_att: Tensor
    """[L, T, d] post-attention norm as a diagonal: RMSNorm_attn(y) == s_att * y at y = y_att."""
    s_mlp: Tensor
    """[L, T, d] post-MLP norm as a diagonal."""
    act_g: Tensor
    """[L, T, F] the frozen gate act(g): silu(g) for SwiGLU, relu(g) = 1[g > 0] * g for a ReLU gate."""
    s_fin: Tensor
    """[d] final norm as a diagonal at the last token (the reference linearises it there only)."""


def linearize(model: OLMo2, obs: Observation) -> Surrogates:
    eps, blocks = model.config.rms_norm_eps, model.blocks
    with torch.no_grad():
        s_att = torch.stack([norm_scale(obs.y_att[i], b.ln_attn.weight, eps) for i, b in enumerate(blocks)])
        s_mlp = torch.stack([norm_scale(obs.y_mlp[i], b.ln_mlp.weight, eps) for i, b in enumerate(blocks)])
        act = F.silu if model.config.hidden_act == "silu" else F.relu
        s_fin = norm_scale(obs.x_fin[-1:], model.ln_final.weight, eps)[0]
        return Surrogates(s_att, s_mlp, act(obs.gate), s_fin)


@torch.no_grad()
def surrogate_errors(model: OLMo2, obs: Observation, sur: Surrogates) -> dict[str, float]:
    """How exact the surrogates are at the observed point: the largest |surrogate - model| of each, over every
    layer and token (fp32: about 1e-6). The norms as diagonals (after attention, after the MLP, final) and the MLP
    with its gate frozen (`olmo_iv::frozen_mlp`) against the model's own hook values."""
    L, T = model.config.n_layers, len(obs.ids)
    names = ["ln_final.hook_normalized"] + [f"blocks.{i}.{n}" for i in range(L)
                                            for n in ("hook_attn_out", "hook_resid_mid", "mlp.hook_out", "hook_mlp_out")]
    _, cache = model.run_with_cache(obs.ids[None], names=names)
    err = {"attn_norm": 0.0, "mlp_norm": 0.0, "frozen_mlp": 0.0, "final_norm": 0.0}
    for i, b in enumerate(model.blocks):
        err["attn_norm"] = max(err["attn_norm"], float((sur.s_att[i] * obs.y_att[i] - cache[names[1 + 4 * i]][0]).abs().max()))
        err["mlp_norm"] = max(err["mlp_norm"], float((sur.s_mlp[i] * obs.y_mlp[i] - cache[names[4 + 4 * i]][0]).abs().max()))
        m = frozen_mlp(cache[names[2 + 4 * i]][0], torch.arange(T, device=obs.ids.device), sur.act_g[i],
                       b.mlp.up_proj.weight, b.mlp.down_proj.weight)
        err["frozen_mlp"] = max(err["frozen_mlp"], float((m - cache[names[3 + 4 * i]][0]).abs().max()))
    err["final_norm"] = float((sur.s_fin * obs.x_fin[-1] - cache[names[0]][0, -1]).abs().max())
    return err


def layer_weights(model: OLMo2, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_V [H_kv*dh, d], W_O [d, H*dh], W_up [F, d], W_down [d, F]) of a block, as path_step takes them."""
    b = model.blocks[layer]
    return b.attn.v_proj.weight, b.attn.o_proj.weight, b.mlp.up_proj.weight, b.mlp.down_proj.weight


# ----------------------------------------------------------------------------------------------------------
# The attention graph


@dataclass
class AttnGraph:
    """Nodes (layer, token), layer -1 the embeddings. Edge (l-1, j) -> (l, q) iff some head of layer l attends
    from q to j as its argmax, or j == q (the residual self edge always exists)."""

    argmax: Tensor
    """[L, H, T] int64."""
    amax: Tensor
    """[L, H, T] attention weight at the argmax."""

    @property
    def shape(self) -> tuple[int, int, int]:
        L, H, T = self.argmax.shape
        return L, H, T

    def adjacency(self) -> Tensor:
        """[L, T, T] bool, [l, j, q]: the edge (l-1, j) -> (l, q)."""
        L, H, T = self.shape
        a = self.argmax.cpu()
        adj = torch.zeros(L, T, T, dtype=torch.bool)
        adj[torch.arange(L)[:, None, None], a, torch.arange(T)[None, None, :]] = True
        return adj | torch.eye(T, dtype=torch.bool)

    def reach(self) -> Tensor:
        """[L+1, T] bool: reach[l+1, q] iff node (l, q) can reach (L-1, T-1) (row 0 = the embeddings)."""
        adj = self.adjacency()
        L, _, T = adj.shape
        out = torch.zeros(L + 1, T, dtype=torch.bool)
        out[L, T - 1] = True
        for layer in range(L - 1, -1, -1):
            out[layer] = (adj[layer] & out[layer + 1][None, :]).any(1)
        return out

    def count_paths(self) -> list[int]:
        """Complete paths (ending at (L-1, T-1)) from each source token, exact (Python ints; they can pass 2^63)."""
        adj = self.adjacency().numpy().astype(object)
        L, _, T = adj.shape
        r = np.zeros(T, dtype=object)
        r[T - 1] = 1
        for layer in range(L - 1, -1, -1):
            r = adj[layer].dot(r)  # paths from (layer-1, j) = sum over its edges of paths from (layer, q)
        return [int(x) for x in r]

    def ordered_targets(self, layer: int, alive: Tensor) -> tuple[Tensor, Tensor]:
        """Out-edges of every (layer-1, j) that lead to a live node, in the reference DFS order.

        Returns order [T, T] (row j: targets first, then padding) and degree [T]. The reference lists edges by
        ascending target, and appends the self edge last when no head's argmax made it.
        """
        L, H, T = self.shape
        adj = self.adjacency()[layer] & alive.cpu()[None, :]
        key = torch.arange(T, dtype=torch.float64).expand(T, T).clone()
        head_self = (self.argmax[layer].cpu() == torch.arange(T)).any(0)  # [T]: some head's argmax from q is q
        key[torch.arange(T), torch.arange(T)] = torch.where(head_self, torch.arange(T).double(), float(T))
        key[~adj] = math.inf
        return key.argsort(dim=1, stable=True), adj.sum(1)

    def heads_on(self, layer: int, j: Tensor, q: Tensor) -> Tensor:
        """[n, H] bool: the heads of `layer` whose argmax from q is j, for the edges (j[i] -> q[i])."""
        return self.argmax[layer][:, q].T == j[:, None]


def edge_weights(graph: AttnGraph, layer: int, j: Tensor, q: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Per-edge identity weight [n] and per-head weights [n, H] of the attention step, for a tracing mode."""
    n, H = j.shape[0], graph.argmax.shape[1]
    if mode == "reference":
        return torch.ones(n, device=j.device), torch.ones(n, H, device=j.device)
    heads = graph.heads_on(layer, j, q)
    skip = (j == q).float()
    if mode == "masked_heads":
        return skip, heads.float()
    return skip, heads * graph.amax[layer][:, q].T  # attn_weighted


# ----------------------------------------------------------------------------------------------------------
# Fast tracing


@torch.no_grad()  # the decorator (unlike a `with` inside) restores the caller's grad mode at every yield
def iter_path_values(model: OLMo2, obs: Observation, sur: Surrogates, graph: AttnGraph, sources: Sequence[int],
                     mode: str = "reference", chunk: int = 4096) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (tokens [n, L+1], values [n, d]) for every complete path from `sources`, in the reference DFS order.

    tokens[i] = (s, t_0, ..., t_{L-1} = T-1). The prefix trie is expanded depth-first: a stack entry is a chunk of
    at most `chunk` children of one block, so at most one parent block per layer is alive (memory L * chunk * d).
    Children are produced in the reference's edge order and chunks are popped in order, so the yielded rows
    follow the reference's lexicographic DFS order.
    """
    L, _, T = graph.shape
    dev = obs.x_emb.device
    graph = AttnGraph(graph.argmax.to(dev), graph.amax.to(dev))
    reach = graph.reach()
    targets = [tuple(x.to(dev) for x in graph.ordered_targets(layer, reach[layer + 1])) for layer in range(L)]
    weights = [layer_weights(model, layer) for layer in range(L)]
    src = torch.tensor([s for s in sources if reach[0, s]], dtype=torch.long, device=dev)
    cols = torch.arange(T, device=dev)
    stack: list[tuple[Tensor, Tensor, int, Tensor, Tensor]] = []

    def push(tokens: Tensor, values: Tensor, layer: int) -> None:  # the children of a block, at `layer`
        order, degree = targets[layer]
        last = tokens[:, -1]
        deg = degree[last]
        parent = torch.repeat_interleave(torch.arange(len(last), device=dev), deg)
        q = order[last][cols[None, :] < deg[:, None]]  # row-major: parent by parent, each in edge order
        for a in reversed(range(0, len(q), chunk)):
            stack.append((tokens, values, layer, parent[a : a + chunk], q[a : a + chunk]))

    if len(src):
        push(src[:, None], obs.x_emb[src], 0)
    while stack:
        tokens, values, layer, parent, q = stack.pop()
        skip, coef = edge_weights(graph, layer, tokens[parent, -1], q, mode)
        v = path_step(values[parent], q, skip, coef, sur.s_att[layer], sur.s_mlp[layer], sur.act_g[layer],
                      *weights[layer])
        tokens = torch.cat([tokens[parent], q[:, None]], 1)
        if layer == L - 1:
            yield tokens, v
        else:
            push(tokens, v, layer + 1)


def readout(values: Tensor, s_fin: Tensor, w_u: Tensor, answer: int, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Answer logit z[answer] and rank 1 + #(z > z[answer]) of z = W_U (s_fin * v), per row; no sort."""
    logits, ranks = [], []
    for a in range(0, values.shape[0], chunk):
        z = (values[a : a + chunk] * s_fin) @ w_u.T
        za, rank = answer_rank(z, torch.full((z.shape[0],), answer, device=z.device), consume=True)
        logits.append(za)
        ranks.append(rank)
    if not logits:
        return values.new_zeros(0), torch.zeros(0, dtype=torch.long, device=values.device)
    return torch.cat(logits), torch.cat(ranks)


@dataclass
class PathResult:
    """Kept paths of one prompt, with the exact total number of paths per source token."""

    tokens: Tensor
    """[K, L+1] int64 kept paths (s, t_0, ..., t_{L-1}), in the reference DFS order (source by source)."""
    logit: Tensor
    """[K] the answer logit of each kept path (fp32)."""
    rank: Tensor
    """[K] the answer's rank among the path's logits (1 = top)."""
    total: list[int]
    """[T] number of complete paths per source token (all of them, kept or not; 0 for untraced tokens)."""
    sources: list[int]
    """The source tokens traced."""
    answer: int
    graph: AttnGraph
    config: PathConfig
    model_rank: int
    """Rank of the answer in the model's own last-position logits."""
    model_logit: float

    @property
    def n_tokens(self) -> int:
        return self.graph.shape[2]

    def kept_per_source(self) -> Tensor:
        """[T] kept paths per source token (Figure 4, one sample)."""
        return torch.bincount(self.tokens[:, 0], minlength=self.n_tokens)

    def head_activity(self, chunk: int = 65536) -> Tensor:
        """[T, L, H]: per source token, the fraction of its kept paths whose layer-l edge includes head h
        (head h's argmax from t_l is t_{l-1}); 0 for tokens without kept paths (Figure 5, one sample)."""
        L, H, T = self.graph.shape
        a = self.graph.argmax.cpu()
        sums = torch.zeros(T, L, H)
        for i in range(0, len(self.tokens), chunk):
            t = self.tokens[i : i + chunk]
            chosen = a[torch.arange(L)[None, :, None], torch.arange(H)[None, None, :], t[:, 1:, None]]  # [n, L, H]
            sums.index_add_(0, t[:, 0], (chosen == t[:, :-1, None]).float())
        return sums / self.kept_per_source().clamp(min=1)[:, None, None]


def model_rank(logits: Tensor, answer: int) -> tuple[int, float]:
    """The model's own (rank, logit) of the answer at the last position."""
    logit, rank = answer_rank(logits[None], torch.tensor([answer], device=logits.device))
    return int(rank[0]), float(logit[0])


def prepare(model: OLMo2, ids, answer: int, cfg: PathConfig):
    if not 0 <= answer < model.config.vocab_size:
        raise OlmoIVError(f"answer token {answer} is outside the vocabulary [0, {model.config.vocab_size})")
    obs = observe(model, ids)
    sur = linearize(model, obs)
    graph = AttnGraph(obs.argmax.cpu(), obs.amax.cpu())
    sources = cfg.source_positions(len(obs.ids))
    total = [0] * len(obs.ids)
    for s, n in enumerate(graph.count_paths()):
        if s in sources:
            total[s] = n
    if sum(total) > cfg.max_paths:
        raise OlmoIVError(f"{sum(total):,} paths to trace from sources {cfg.sources!r} (max_paths={cfg.max_paths:,}): "
                          "trace fewer source tokens (e.g. sources='7:'; early tokens such as an attention sink "
                          "have the most paths) or raise max_paths")
    return obs, sur, graph, sources, total


def trace(model: OLMo2, ids: Tensor | Sequence[int], answer: int, cfg: PathConfig | None = None, *,
          progress: ProgressFn | None = None) -> PathResult:
    """Trace every path from the chosen source tokens to the last token, keep those that rank the answer
    within the threshold. `progress("paths", advance, total)` is called after each chunk of complete paths."""
    cfg = cfg or PathConfig()
    obs, sur, graph, sources, total = prepare(model, ids, answer, cfg)
    n_total = sum(total)
    w_u = model.lm_head.weight
    kept: list[tuple[Tensor, Tensor, Tensor]] = []
    done = 0
    for tokens, values in iter_path_values(model, obs, sur, graph, sources, cfg.mode, cfg.chunk):
        with torch.no_grad():
            logit, rank = readout(values, sur.s_fin, w_u, answer, cfg.readout_chunk)
        keep = rank <= cfg.threshold
        kept.append((tokens[keep].cpu(), logit[keep].cpu(), rank[keep].cpu()))
        done += len(tokens)
        if progress:
            progress("paths", len(tokens), n_total)
    if done != n_total:  # the frontier and the DP count are two computations of the same number
        raise RuntimeError(f"internal error: traced {done} paths, dynamic programming counts {n_total}")
    L = graph.shape[0]
    cat = (lambda i, empty: torch.cat([k[i] for k in kept]) if kept else empty)  # noqa: E731
    return PathResult(cat(0, torch.zeros(0, L + 1, dtype=torch.long)), cat(1, torch.zeros(0)),
                      cat(2, torch.zeros(0, dtype=torch.long)), total, sources, answer, graph, cfg,
                      *model_rank(obs.logits, answer))


# ----------------------------------------------------------------------------------------------------------
# Figures 4 and 5: aggregation over samples, and plots


def mean_kept_per_token(kept: Sequence[Sequence[int]]) -> np.ndarray:
    """Figure 4: mean kept paths per source position over the samples given (a position a sample lacks counts
    0; the reference divides by the number of completed samples)."""
    n = max((len(k) for k in kept), default=0)
    out = np.zeros(n)
    for k in kept:
        out[: len(k)] += np.asarray(k, dtype=float)
    return out / max(len(kept), 1)


def mean_head_activity(activity: Sequence[np.ndarray], n_samples: int, reference_rounding: bool = False) -> np.ndarray:
    """Figure 5: per position, the sum over samples of the [L, H] head-activity fractions divided by n_samples
    (the reference divides by the requested number of samples, not the completed ones; a sample without kept
    paths at that position adds 0). reference_rounding rounds each sample's fractions and the mean to 2 decimals
    as the reference does."""
    n = max((a.shape[0] for a in activity), default=0)
    shape = activity[0].shape[1:] if activity else (0, 0)
    out = np.zeros((n, *shape))
    for a in activity:
        out[: a.shape[0]] += np.round(a, 2) if reference_rounding else a
    out /= max(n_samples, 1)
    return np.round(out, 2) if reference_rounding else out
