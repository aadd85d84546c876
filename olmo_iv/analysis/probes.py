"""Geometry of instruction vectors (paper §5.2, Figure 13): are the vectors of different tasks linearly separable?

An instruction vector is the residual stream after block l (`blocks.{l}.hook_resid_post`) at T_inst, the last
token of an instruction run alone (no query, no BOS), as in the authors' probe. For each task we take its 200
rephrased instructions, so each layer gives a labelled point cloud X[task, rephrasing, d].

    X = instruction_vectors(model, texts)            # [N, n_layers, d]: one batched forward per batch, all layers
    res = probe_layers(X, labels, ProbeConfig())     # a logistic-regression probe per layer, accuracy + CI
    lda = lda_projection(X[:, layer], labels, train, test)   # fitted on the training split only

The authors extracted one layer per forward pass and probed on an unseeded split; their LDA was fitted on every
point. Here: one forward for all layers, one seeded stratified split shared by every layer, LDA fitted on the
training split with the held-out points drawn on top (docs/statistics.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from olmo_iv.activations import extract
from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.progress import ProgressFn

# ----------------------------------------------------------------------------------------------------------------
# Extraction


def last_token_resid(model, ids: Sequence[Sequence[int]], *, layers: Sequence[int] | None = None,
                     batch_size: int = 64, progress: ProgressFn | None = None) -> torch.Tensor:
    """resid_post of every requested layer at the last token of each id sequence: float32 [N, len(layers), d] (CPU).

    One forward per batch of length-sorted, right-padded rows serves every layer (olmo_iv.activations.extract).
    """
    if any(len(s) == 0 for s in ids):
        raise OlmoIVError("an instruction tokenizes to no tokens; remove empty instructions")
    return extract(model, ids, "hook_resid_post", layers=layers, positions=-1, batch_size=batch_size,
                   dtype=torch.float32, device="cpu", progress=progress)


def instruction_vectors(model, texts: Sequence[str], *, tokenizer=None, layers: Sequence[int] | None = None,
                        batch_size: int = 64, progress: ProgressFn | None = None) -> torch.Tensor:
    """Instruction vectors of `texts` (each run alone, no special tokens, as the reference): [N, n_layers, d]."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise OlmoIVError("the model has no tokenizer.json; pass tokenizer= (a tokenizers.Tokenizer)")
    ids = [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    return last_token_resid(model, ids, layers=layers, batch_size=batch_size, progress=progress)


@dataclass
class VectorSet:
    """Instruction vectors of several tasks' rephrasings."""

    X: np.ndarray
    """[N, n_layers, d] float32."""
    labels: np.ndarray
    """[N] task name of each row."""
    texts: list[str]
    """The instruction of each row."""
    index: np.ndarray
    """[N] position of the rephrasing within its task's file."""


def task_vectors(model, tasks: Sequence[str], *, batch_size: int = 64,
                 progress: ProgressFn | None = None) -> VectorSet:
    """Vectors of the 200 rephrasings of each task (olmo_iv.tasks.rephrasings), all layers."""
    from olmo_iv.tasks import get_task, rephrasings

    names, texts, index = [], [], []
    for task in tasks:
        name = get_task(task).name
        phr = rephrasings(name)
        names += [name] * len(phr)
        texts += phr
        index += list(range(len(phr)))
    X = instruction_vectors(model, texts, batch_size=batch_size, progress=progress).numpy()
    return VectorSet(X, np.array(names), texts, np.array(index))


# ----------------------------------------------------------------------------------------------------------------
# Probe


@dataclass
class ProbeConfig:
    seed: int = 0
    """Seed of the stratified train/test split and of the solver."""
    test_size: float = 0.2
    """Held-out fraction (the authors: 0.2, unseeded and unstratified)."""
    standardize: bool = True
    """Z-score features on the training split first (the authors: raw features)."""
    C: float = 1.0
    """Inverse L2 strength of LogisticRegression (sklearn's default, as the authors)."""
    max_iter: int = 1000
    """lbfgs iterations (the authors: sklearn's default 100, which often stops before convergence)."""
    confidence: float = 0.95
    """Level of the accuracy intervals (Wilson)."""

    def __post_init__(self) -> None:
        check_range("test_size", self.test_size, 0, 1, low_open=True, high_open=True)
        check_range("C", self.C, 0, low_open=True)
        check_range("max_iter", self.max_iter, 1)
        check_range("confidence", self.confidence, 0, 1, low_open=True, high_open=True)


@dataclass
class ProbeResult:
    layer: int
    accuracy: float
    """Held-out accuracy."""
    n_correct: int
    n_test: int
    ci_lo: float
    ci_hi: float
    """Wilson interval of the held-out accuracy."""
    chance: float
    """Accuracy of always guessing the most frequent training class."""
    train_accuracy: float
    converged: bool
    """False when lbfgs hit max_iter."""


def split(labels: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """One seeded stratified train/test split (indices), shared by every layer and by the LDA."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise OlmoIVError(f"the probe needs at least two tasks; got {list(classes)}")
    try:
        return train_test_split(np.arange(len(labels)), test_size=cfg.test_size, stratify=labels,
                                random_state=cfg.seed)
    except ValueError as err:
        raise OlmoIVError(f"cannot split {len(labels)} vectors ({dict(zip(classes, counts, strict=True))}) with test_size="
                          f"{cfg.test_size}: {err}") from err


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def probe_layers(X: np.ndarray, labels: np.ndarray, cfg: ProbeConfig | None = None, *,
                 layers: Sequence[int] | None = None, progress: ProgressFn | None = None) -> list[ProbeResult]:
    """A multinomial logistic-regression probe per layer of X [N, L, d], trained and tested on one seeded split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = cfg or ProbeConfig()
    labels = np.asarray(labels)
    if X.ndim != 3 or len(X) != len(labels):
        raise OlmoIVError(f"X must be [N, n_layers, d] with N = len(labels); got {X.shape} and {len(labels)}")
    train, test = split(labels, cfg)
    classes, counts = np.unique(labels[train], return_counts=True)
    chance = float(np.mean(labels[test] == classes[np.argmax(counts)]))
    layers = range(X.shape[1]) if layers is None else layers
    out = []
    for layer in layers:
        clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, random_state=cfg.seed)
        model = make_pipeline(StandardScaler(), clf) if cfg.standardize else clf
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X[train, layer], labels[train])
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        k = int(np.sum(model.predict(X[test, layer]) == labels[test]))
        lo, hi = proportion_ci(k, len(test), cfg.confidence)
        train_acc = float(np.mean(model.predict(X[train, layer]) == labels[train]))
        out.append(ProbeResult(int(layer), k / len(test), k, len(test), lo, hi, chance, train_acc, converged))
        if progress is not None:
            progress("probe", 1, len(layers))
    return out


# ----------------------------------------------------------------------------------------------------------------
# LDA


@dataclass
class LdaResult:
    coords: np.ndarray
    """[N, n_components] projection of every vector by the LDA fitted on the training split."""
    is_test: np.ndarray
    """[N] bool: held-out point (never seen by the fit)."""
    labels: np.ndarray
    explained_variance_ratio: np.ndarray
    test_accuracy: float
    """Accuracy of the LDA classifier itself on the held-out points."""


def lda_projection(X: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> LdaResult:
    """LinearDiscriminantAnalysis (svd solver, as the authors) fitted on X[train] [n, d]; every point projected."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    labels = np.asarray(labels)
    lda = LinearDiscriminantAnalysis(solver="svd").fit(X[train], labels[train])
    is_test = np.zeros(len(X), dtype=bool)
    is_test[test] = True
    acc = float(np.mean(lda.predict(X[test]) == labels[test])) if len(test) else float("nan")
    return LdaResult(lda.transform(X), is_test, labels, np.asarray(lda.explained_variance_ratio_), acc)
