"""Multi-layer activation patching (paper §5.1) that does only the necessary work.

A patched run of layer set K = {k1 < ... < kn} is the target run in which block l's output (hook_resid_post) at
`target_pos` is replaced, for every l in K, by the source run's block-l output at `source_pos`.

Two facts make the grid cheap:
- Run K equals run K \\ {kn} (its parent; the parent of a single layer is the unpatched target run) up to block
  kn. So each set starts from its parent's cached residual after block kn, with one position replaced, and runs
  only blocks kn+1 .. L-1: singles start from the target run, pairs from singles, triples from pairs. For the
  paper's 16-layer pair grid that is 680 block evaluations per sample instead of 2,176.
- Only the answer's logit and rank are needed: logits at the last position only, and rank = 1 + #(logits above the
  answer's), counted on the device; no softmax, no sort, one host transfer per batch.
Targets are grouped by length, so batched rows need no padding; the source run is done once per distinct source.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from olmo_iv.activations import NonFiniteError, answer_rank, extract, locate_nonfinite
from olmo_iv.errors import OlmoIVError
from olmo_iv.model import OLMo2
from olmo_iv.progress import ProgressFn

LayerSet = tuple[int, ...]

_LAYERS = re.compile(r"\d+(-\d+)*")


def format_layers(layers: LayerSet) -> str:
    """(3, 7) -> '3-7': sorted distinct layers joined by '-' ((5, 5), the diagonal, is the single layer '5')."""
    return "-".join(str(layer) for layer in sorted(set(layers)))


def parse_layers(text: str) -> LayerSet:
    """'5' -> (5,), '3-7' -> (3, 7), '2-5-9' -> (2, 5, 9); anything else is an error."""
    text = str(text).strip()
    if not _LAYERS.fullmatch(text):
        raise OlmoIVError(f"layer set {text!r}: write layers joined by '-', e.g. 3 or 0-5 or 2-5-9")
    return tuple(int(x) for x in text.split("-"))


def reciprocal_rank(rank: Tensor, max_rank: int = 1000, rr_sentinel: float = 0.0) -> Tensor:
    """RR = 1/rank for ranks <= max_rank, else `rr_sentinel` (float64): the one definition every result uses."""
    rank = rank.double()
    return torch.where(rank <= max_rank, 1.0 / rank, torch.full_like(rank, rr_sentinel))


@dataclass
class PatchResult:
    """Answer logits and ranks of the target-only, patched (and optionally clean) runs.

    Ranks are 1-based: 1 + the number of logits strictly above the answer's, over the full logits dimension.
    RR = 1/rank when rank <= max_rank, else `rr_sentinel` (-1 in the authors' code, 0 otherwise).
    """

    layer_sets: list[LayerSet]
    logit_target: Tensor  # [samples]
    rank_target: Tensor  # [samples]
    logit_patched: Tensor  # [samples, layer sets]
    rank_patched: Tensor  # [samples, layer sets]
    max_rank: int = 1000
    rr_sentinel: float = 0.0
    logit_clean: Tensor | None = None  # [samples], when clean prompts were given
    rank_clean: Tensor | None = None

    def rr(self, rank: Tensor) -> Tensor:
        return reciprocal_rank(rank, self.max_rank, self.rr_sentinel)

    @property
    def rr_target(self) -> Tensor:
        return self.rr(self.rank_target)

    @property
    def rr_patched(self) -> Tensor:
        return self.rr(self.rank_patched)

    @property
    def rr_clean(self) -> Tensor | None:
        return None if self.rank_clean is None else self.rr(self.rank_clean)

    @property
    def rr_diff(self) -> Tensor:
        return self.rr_patched - self.rr_target[:, None]

    @property
    def logit_diff(self) -> Tensor:
        return self.logit_patched - self.logit_target[:, None]


GRID_SIZES = (1, 2, 3)
"""Layer-set sizes `layer_grid` offers: singles, pairs (with the diagonal), triples."""


def check_grid_size(size: int) -> None:
    """The one check of a grid's set size (the CLI, the run settings and `layer_grid` all rely on it)."""
    if size not in GRID_SIZES:
        raise OlmoIVError(f"layer sets of size {size!r} are not offered: use 1, 2 or 3, or pass explicit sets")


def layer_grid(n_layers: int, size: int, *, diagonal: bool = True) -> list[LayerSet]:
    """The paper's layer sets, in the authors' order: size 1 -> (l,); size 2 -> all i<j then the diagonal (l, l)
    (136 for 16 layers); size 3 -> all i<j<k (560 for 16 layers)."""
    check_grid_size(size)
    if not isinstance(n_layers, int) or n_layers < size:
        raise OlmoIVError(f"n_layers={n_layers!r}: a grid of {size}-layer sets needs at least {size} layers")
    if size == 1:
        return [(layer,) for layer in range(n_layers)]
    if size == 2:
        return list(itertools.combinations(range(n_layers), 2)) + ([(l, l) for l in range(n_layers)] if diagonal else [])
    return list(itertools.combinations(range(n_layers), 3))


def canonical(layer_set: Sequence[int], n_layers: int) -> LayerSet:
    """Sorted distinct layers: (5, 5) is the single-layer patch (5,), as in the authors' code."""
    if len(layer_set) == 0:
        raise OlmoIVError("an empty layer set patches nothing: give at least one layer per set")
    for layer in layer_set:
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise OlmoIVError(f"layer {layer!r} is out of range: this model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layer_set)))


def _resolve(pos: int, length: int, what: str) -> int:
    p = pos if pos >= 0 else length + pos
    if not 0 <= p < length:
        raise OlmoIVError(f"{what} {pos} is outside a sequence of {length} tokens")
    return p


def _as_ids(seq, device: torch.device) -> Tensor:
    t = torch.as_tensor(seq, dtype=torch.long, device=device)
    if t.dim() != 1 or t.numel() == 0:
        raise OlmoIVError("each source, target and clean sequence must be a non-empty 1-D tensor of token ids")
    return t


def _answer_ids(model: OLMo2, answers: Sequence[int], device: torch.device) -> Tensor:
    """The answer ids as a tensor on `device`, each checked to lie in the vocabulary."""
    for a in answers:
        if not 0 <= int(a) < model.config.vocab_size:
            raise OlmoIVError(f"answer id {a} is outside the vocabulary [0, {model.config.vocab_size})")
    return torch.tensor([int(a) for a in answers], dtype=torch.long, device=device)


def _row_budget(model: OLMo2, length: int) -> int:
    """Rows per forward: activations of about 1/8 of the device's memory (total, not free, so the batching and
    with it the last bits of every result are the same on every run on a machine)."""
    cfg, elt = model.config, torch.finfo(model.dtype).bits // 8
    per_row = length * (6 * cfg.d_model + 3 * cfg.d_mlp + cfg.n_heads * length) * elt + 8 * cfg.vocab_size
    return max(1, min(8192, _memory(model) // 8 // per_row))


def _memory(model: OLMo2) -> int:
    """Bytes the engine plans with: the GPU's total memory, or 8 GiB on the CPU (larger batches gain nothing on a
    few cores). Total rather than free memory, so that batching, and with it every last bit, is reproducible."""
    if model.device.type == "cuda":
        return torch.cuda.get_device_properties(model.device).total_memory
    return 8 * 2**30


@torch.no_grad()
def last_logit_rank(model: OLMo2, seqs: Sequence[Tensor], answers: Tensor) -> tuple[Tensor, Tensor]:
    """Answer logit and rank at the last position of each sequence (clean and target-only runs)."""
    logit = torch.empty(len(seqs), dtype=torch.float32, device=model.device)
    rank = torch.empty(len(seqs), dtype=torch.long, device=model.device)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        by_len[len(s)].append(i)
    for length, rows in by_len.items():
        for chunk in _chunks(rows, _row_budget(model, length)):
            idx = torch.tensor(chunk, device=model.device)
            logits = model(torch.stack([seqs[i] for i in chunk]).to(model.device), logits_at=length - 1)
            logit[idx], rank[idx] = answer_rank(logits, answers[idx], consume=True)
    return logit, rank


@torch.no_grad()
def patch_vectors(model: OLMo2, targets: Sequence[Tensor], answers: Sequence[int], layer: int, vectors: Tensor, *,
                  target_pos: int | Sequence[int] = 0, progress: ProgressFn | None = None) -> tuple[Tensor, Tensor]:
    """Answer logit and rank at the last position of each target run whose block-`layer` output at `target_pos`
    is replaced by a given vector: `vectors` [samples, variants, d] holds one replacement per sample and variant
    (e.g. the source residual, or parts of it). Returns (logit, rank), each [samples, variants], on the CPU.

    `patch_layers` with one layer is the case vectors[i, 0] = the source residual. The target's blocks up to
    `layer` run once per sample; each variant runs only blocks layer+1 .. L-1, batched, length groups unpadded.
    """
    L, device = model.config.n_layers, model.device
    n = len(targets)
    if n == 0:
        raise OlmoIVError("no samples to patch")
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise OlmoIVError(f"layer={layer!r} is out of range: this model has layers 0..{L - 1}")
    if len(answers) != n or vectors.dim() != 3 or vectors.shape[0] != n or vectors.shape[2] != model.config.d_model:
        raise OlmoIVError(f"got {n} targets, {len(answers)} answers and vectors of shape {tuple(vectors.shape)}: "
                          f"give one answer and a [variants, {model.config.d_model}] block of vectors per target")
    if not bool(torch.isfinite(vectors).all()):
        raise OlmoIVError("vectors holds NaN or infinite values: a patched run would be meaningless")
    answers_t = _answer_ids(model, answers, device)
    targets = [_as_ids(t, device) for t in targets]
    positions = [target_pos] * n if isinstance(target_pos, int) else list(target_pos)
    if len(positions) != n:
        raise OlmoIVError(f"target_pos has {len(positions)} entries for {n} targets")
    positions = [_resolve(p, len(t), "target_pos") for p, t in zip(positions, targets)]
    m = vectors.shape[1]
    logit = torch.empty(n, m, dtype=torch.float32, device=device)
    rank = torch.empty(n, m, dtype=torch.long, device=device)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_len[len(t)].append(i)
    for length, rows in by_len.items():
        budget = _row_budget(model, length)
        for chunk in _chunks(rows, budget):
            ids = torch.stack([targets[i] for i in chunk])
            idx = torch.tensor(chunk, device=device)
            pos = torch.tensor([positions[i] for i in chunk], device=device)
            prefix = model(ids, stop_at_layer=layer + 1)  # [c, T, d]: the target run up to block `layer`
            for cols in _chunks(list(range(m)), max(1, budget // len(chunk))):
                x0 = prefix.repeat(len(cols), 1, 1)  # variant-major rows: row j*c + r is sample r, variant cols[j]
                patch = vectors[chunk][:, cols].transpose(0, 1).reshape(-1, vectors.shape[2])
                x0[torch.arange(len(x0), device=device), pos.repeat(len(cols))] = patch.to(device, prefix.dtype)
                logits = model(ids.repeat(len(cols), 1), start_at_layer=layer + 1, resid=x0, logits_at=length - 1)
                lg, rk = answer_rank(logits, answers_t[idx].repeat(len(cols)), consume=True)
                cols_t = torch.tensor(cols, device=device)
                logit[idx[:, None], cols_t[None]] = lg.view(len(cols), -1).T
                rank[idx[:, None], cols_t[None]] = rk.view(len(cols), -1).T
                if progress is not None:
                    progress("patched rows", len(chunk) * len(cols), n * m)
    return logit.cpu(), rank.cpu()


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _tree(sets: list[LayerSet]) -> dict[int, dict[LayerSet, list[int]]]:
    """Every set needed (the requested ones and all their prefixes), by size, with the layers their children
    start from: children[K] = layers k such that K + (k,) is needed."""
    by_size: dict[int, dict[LayerSet, list[int]]] = defaultdict(dict)
    for s in sets:
        for n in range(1, len(s) + 1):
            by_size[n].setdefault(s[:n], [])
    for n in sorted(by_size):
        for k in by_size.get(n + 1, {}):
            by_size[n][k[:-1]].append(k[-1])
    return by_size


@torch.no_grad()
def patch_layers(
    model: OLMo2,
    sources: Sequence[Tensor],
    targets: Sequence[Tensor],
    answers: Sequence[int],
    layer_sets: Sequence[Sequence[int]],
    *,
    source_pos: int = -1,
    target_pos: int | Sequence[int] = 0,
    max_rank: int = 1000,
    rr_sentinel: float = 0.0,
    cleans: Sequence[Tensor] | None = None,
    progress: ProgressFn | None = None,
) -> PatchResult:
    """Patch each sample's source residual (at `source_pos`) into its target run (at `target_pos`) for every
    layer set, and measure the answer's logit and rank at the target's last position.

    sources, targets (and cleans): lists of 1-D token-id tensors, one per sample; answers: one token id each;
    layer_sets: tuples of layer indices ((l, l) is the single layer l). `target_pos` may differ per sample.
    `progress("patched rows", advance, total)` is called as (sample, layer set) rows finish.
    Non-finite logits anywhere are an error that names the first hook point where they appear.
    """
    try:
        return _patch_layers(model, sources, targets, answers, layer_sets, source_pos=source_pos,
                             target_pos=target_pos, max_rank=max_rank, rr_sentinel=rr_sentinel, cleans=cleans,
                             progress=progress)
    except NonFiniteError as err:
        if "first appear at" in str(err):
            raise
        locate_nonfinite(model, [*(cleans or [])[:2], *sources[:2], *targets[:2]], "logits in patching")


def _patch_layers(model, sources, targets, answers, layer_sets, *, source_pos, target_pos, max_rank, rr_sentinel,
                  cleans, progress) -> PatchResult:
    L, device = model.config.n_layers, model.device
    n = len(targets)
    if not (len(sources) == len(answers) == n) or (cleans is not None and len(cleans) != n):
        raise OlmoIVError(f"got {len(sources)} sources, {n} targets, {len(answers)} answers"
                          + (f", {len(cleans)} cleans" if cleans is not None else "") + ": give one of each per sample")
    if n == 0:
        raise OlmoIVError("no samples to patch")
    if not layer_sets:
        raise OlmoIVError("the list of layer sets is empty: give at least one set, e.g. [(l,) for l in range(L)]")
    sets = [canonical(s, L) for s in layer_sets]
    column = {s: [] for s in sets}
    for j, s in enumerate(sets):
        column[s].append(j)
    answers_t = _answer_ids(model, answers, device)
    targets = [_as_ids(t, device) for t in targets]
    positions = [target_pos] * n if isinstance(target_pos, int) else list(target_pos)
    positions = [_resolve(p, len(t), "target_pos") for p, t in zip(positions, targets)]
    for t in targets:
        model.check_ids(t)

    # the source run once per distinct source sequence
    distinct: dict[tuple[int, ...], int] = {}
    src_index = [distinct.setdefault(tuple(int(x) for x in s), len(distinct)) for s in sources]
    src_vecs = extract(model, [_as_ids(s, device) for s in distinct], "hook_resid_post", positions=source_pos,
                       batch_size=lambda length: _row_budget(model, length), pad=False)[torch.tensor(src_index)]

    logit_t, rank_t = last_logit_rank(model, targets, answers_t)
    logit_p = torch.empty(n, len(sets), dtype=torch.float32, device=device)
    rank_p = torch.empty(n, len(sets), dtype=torch.long, device=device)
    tree = _tree(sets)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_len[len(t)].append(i)
    for length, samples in by_len.items():
        # samples per group: bounds the residuals cached for one level (sets with children x L x T x d each)
        cached_sets = 1 + max((sum(1 for ch in lvl.values() if ch) for lvl in tree.values()), default=0)
        per_sample = cached_sets * L * length * model.config.d_model * (torch.finfo(model.dtype).bits // 8)
        for chunk in _chunks(samples, max(1, _memory(model) // 4 // per_sample)):
            _patch_group(model, targets, chunk, positions, src_vecs, answers_t, tree, column, logit_p, rank_p,
                         progress)

    result = PatchResult(list(sets), logit_t.cpu(), rank_t.cpu(), logit_p.cpu(), rank_p.cpu(), max_rank, rr_sentinel)
    if cleans is not None:
        logit_c, rank_c = last_logit_rank(model, [_as_ids(c, device) for c in cleans], answers_t)
        result.logit_clean, result.rank_clean = logit_c.cpu(), rank_c.cpu()
    result.layer_sets = [tuple(s) for s in layer_sets]
    return result


def _patch_group(model, targets, samples, positions, src_vecs, answers, tree, column, logit_p, rank_p, progress):
    """All patched runs of a group of samples of equal target length, one size level of the set tree at a time."""
    L, device = model.config.n_layers, model.device
    T, m = len(targets[samples[0]]), len(samples)
    ids = torch.stack([targets[i] for i in samples])  # [m, T]
    sample_idx = torch.tensor(samples, device=device)
    pos = torch.tensor([positions[i] for i in samples], device=device)
    layer_inputs = model.attention_inputs(torch.arange(T, device=device)[None])  # (cos, sin, mask) per block

    # the unpatched target run, with every block's output kept: the parent of every single-layer set
    target_outputs = _staggered(model, [(0, model.embed(ids))], range(L), layer_inputs)[1]
    resid: dict[LayerSet, dict[int, Tensor]] = {(): {k: out for k, out in target_outputs.items()}}
    budget = _row_budget(model, T)
    for size in sorted(tree):
        nodes = tree[size]
        order = sorted(nodes, key=lambda node: node[-1])  # rows join the batch at the block after their last patch
        next_resid: dict[LayerSet, dict[int, Tensor]] = {}
        for chunk in _chunks(order, max(1, budget // m)):
            starts = []
            for node in chunk:
                x0 = resid[node[:-1]][node[-1]].clone()  # the parent's residual after block node[-1] ...
                x0[torch.arange(m, device=device), pos] = src_vecs[sample_idx, node[-1]]  # ... with one position patched
                starts.append((node[-1] + 1, x0))
            keep = sorted({k for node in chunk for k in nodes[node]})  # blocks the children start after
            logits, outputs = _staggered(model, starts, keep, layer_inputs, logits_at=T - 1)
            logit, rank = answer_rank(logits, answers[sample_idx].repeat(len(chunk)), consume=True)
            for j, node in enumerate(chunk):
                rows = slice(j * m, (j + 1) * m)
                for col in column.get(node, ()):
                    logit_p[sample_idx, col], rank_p[sample_idx, col] = logit[rows], rank[rows]
                if nodes[node]:  # node j's rows in each kept block's output (rows joined in chunk order)
                    next_resid[node] = {k: outputs[k][rows] for k in nodes[node]}
            if progress is not None:
                progress("patched rows", m * sum(len(column.get(node, ())) for node in chunk), len(targets) * len(logit_p[0]))
        resid = next_resid


def _staggered(model, starts, keep, layer_inputs, logits_at=None):
    """Run rows that start at different blocks in one pass over the blocks: `starts` is a list of
    (first block, residual [m, T, d] entering it), sorted by first block; each joins the batch when its first block
    comes. Returns (logits [rows, V] at `logits_at` or None, {block k in keep: output of block k for the rows that
    had joined by then}); rows are in the order of `starts`."""
    L = model.config.n_layers
    keep = set(keep)
    active: Tensor | None = None
    outputs: dict[int, Tensor] = {}
    joined = 0
    for layer in range(starts[0][0], L):
        new = []
        while joined < len(starts) and starts[joined][0] == layer:
            new.append(starts[joined][1])
            joined += 1
        if new:
            active = torch.cat(([active] if active is not None else []) + new)
        active = model.blocks[layer](active, *layer_inputs[layer], None)
        if layer in keep:
            outputs[layer] = active  # a fresh tensor per block: kept by reference, no copy
    rest = [x for _, x in starts[joined:]]  # rows patched at the last block run no block at all
    if rest:
        active = torch.cat(([active] if active is not None else []) + rest)
    if logits_at is None:
        return None, outputs
    return model.unembed(active[:, logits_at : logits_at + 1])[:, 0], outputs


def work_per_sample(layer_sets: Sequence[Sequence[int]], n_layers: int) -> dict[str, int]:
    """Block evaluations per sample: this engine's (prefix sharing) vs one full run per set."""
    sets = [canonical(s, n_layers) for s in layer_sets]
    shared = sum(n_layers - 1 - node[-1] for lvl in _tree(sets).values() for node in lvl)
    return {"shared": shared + n_layers, "naive": len(set(sets)) * n_layers + n_layers,
            "ratio": round((len(set(sets)) * n_layers + n_layers) / (shared + n_layers), 3)}


