"""Activations for SAE training: text sources -> token windows -> activations at one hook -> a shuffling buffer.

    texts = read_texts("corpus.jsonl")                    # or a .txt file, a folder, "tasks", "hub:owner/name"
    windows = token_windows(texts, model.tokenizer, context_size=128)
    stream = ModelStream(model, windows, "blocks.3.hook_resid_post")   # runs blocks 0..3 only
    x = stream.next_batch(4096)                           # [4096, d_model], shuffled within a buffer

The stream is a pure function of its settings and its position: `state()` is a small dict (which buffer, how
far into it), and `restore(state)` recomputes that buffer (or reads it from a cache) and reshuffles it with the
same seed. That is what makes a resumed training run see exactly the tokens an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from olmo_iv.errors import OlmoIVError
from olmo_iv.progress import ProgressFn

TEXT_SUFFIXES = (".txt", ".jsonl")
TEXT_FIELDS = ("text", "prompt", "content")
"""JSONL fields tried, in order, when `text_field` is not given."""

_SOURCES: dict[str, Callable[[str], Iterator[str]]] = {}


def register_text_source(name: str, fn: Callable[[str], Iterator[str]]) -> None:
    """Make `read_texts(f"{name}")` or `read_texts(f"{name}:ARG")` call `fn(ARG)`. The seam for vendored sets
    (IFEval prompts, when they land) and for user corpora."""
    _SOURCES[name] = fn


def _task_texts(arg: str) -> Iterator[str]:
    from olmo_iv import tasks

    names = [arg] if arg else tasks.list_tasks()
    for name in names:
        for s in tasks.samples(name, mode="faithful"):
            yield s.clean


register_text_source("tasks", _task_texts)


def _ifeval_texts(arg: str) -> Iterator[str]:
    """The vendored IFEval prompts (olmo_iv/data/ifeval/input_data.jsonl, 541 prompts), as plain text."""
    path = Path(__file__).resolve().parents[1] / "data" / "ifeval" / "input_data.jsonl"
    if not path.exists():
        raise OlmoIVError(f"source='ifeval': the vendored prompts are missing ({path})")
    yield from read_texts(path, text_field="prompt")


register_text_source("ifeval", _ifeval_texts)


def _toy_steer_texts(arg: str) -> Iterator[str]:
    """'toy-steer[:train|heldout[:N]]': toy-steer's chat conversations as it saw them in training (see
    olmo_iv.toy.saes.steer_examples); each document is one whole conversation, best read with pack=False."""
    from olmo_iv.toy.saes import source_texts

    yield from source_texts("toy-steer", arg)


def _toy_tasks_texts(arg: str) -> Iterator[str]:
    """'toy-tasks[:train|heldout[:N]]': the toy's four subtasks in its training layouts, with answers (see
    olmo_iv.toy.saes.toy_task_examples)."""
    from olmo_iv.toy.saes import source_texts

    yield from source_texts("toy-tasks", arg)


register_text_source("toy-steer", _toy_steer_texts)
register_text_source("toy-tasks", _toy_tasks_texts)


def _hub_texts(repo_id: str) -> Iterator[str]:
    """A hub dataset's .txt/.jsonl files, downloaded through huggingface_hub (needs a network or the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if not repo_id:
        raise OlmoIVError("source='hub:' needs a dataset id, e.g. 'hub:owner/name'")
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.txt", "*.jsonl"])
    except LocalEntryNotFoundError as err:
        raise OlmoIVError(f"dataset {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
                          "reached: pass a local file or folder as source=") from err
    except (RepositoryNotFoundError, HfHubHTTPError) as err:
        raise OlmoIVError(f"dataset {repo_id!r} could not be downloaded: {err}") from err
    yield from read_texts(folder)


register_text_source("hub", _hub_texts)


def read_texts(source: str | os.PathLike, *, text_field: str | None = None) -> Iterator[str]:
    """Documents from a source: a .txt file (documents separated by blank lines), a .jsonl file (one object per
    line; `text_field`, else the first of text/prompt/content), a folder of those (sorted, recursive),
    "tasks" / "tasks:NAME" (the vendored task prompts), "ifeval" (the vendored IFEval prompts), "toy-steer" and
    "toy-tasks" (the built-in toys' training text, olmo_iv.toy.saes), "hub:owner/name", or a registered source
    name."""
    src = str(source)
    name, _, arg = src.partition(":")
    if name in _SOURCES and not Path(src).exists():
        yield from _SOURCES[name](arg)
        return
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise OlmoIVError(f"source={src!r}: the folder holds no .txt or .jsonl files")
        for f in files:
            yield from read_texts(f, text_field=text_field)
        return
    if not path.is_file():
        known = ", ".join(sorted(_SOURCES))
        raise OlmoIVError(f"source={src!r} is neither a file, a folder nor a known source ({known})")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise OlmoIVError(f"{path}:{i} is not valid JSON: {err}") from err
                fields = [text_field] if text_field else TEXT_FIELDS
                text = next((obj[k] for k in fields if isinstance(obj, dict) and isinstance(obj.get(k), str)), None)
                if text is None:
                    raise OlmoIVError(f"{path}:{i} has no string field {' / '.join(fields)}: set text_field=")
                yield text
        return
    text = path.read_text(encoding="utf-8")
    for doc in re.split(r"\n\s*\n", text):
        if doc.strip():
            yield doc.strip()


def special_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """Token ids excluded from SAE training by default: BOS, <|endoftext|> and padding. The first position and
    every <|endoftext|> act as an attention sink whose residual norm is orders of magnitude above the rest."""
    ids: set[int] = set()
    if model_config is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(model_config, key, None)
            if isinstance(v, int):
                ids.add(v)
    if tokenizer is not None and hasattr(tokenizer, "token_to_id"):
        for tok in ("<|endoftext|>", "<|pad|>", "<s>", "</s>", "<pad>"):
            i = tokenizer.token_to_id(tok)
            if i is not None:
                ids.add(int(i))
    return tuple(sorted(ids))


def token_windows(texts: Iterable[str], tokenizer: Any, context_size: int, *, separator: int | None = None,
                  max_windows: int | None = None, pack: bool = True) -> list[list[int]]:
    """Concatenate the documents (each followed by `separator`, e.g. <|endoftext|>) and cut windows of
    `context_size` tokens. A final shorter window (>= 2 tokens) is kept.

    pack=False: one window per document (its tokens and the separator, truncated to `context_size`; documents
    of fewer than 2 tokens are dropped), so that every document starts at position 0 as a chat model saw its
    conversations in training."""
    if context_size < 2:
        raise OlmoIVError(f"context_size={context_size} must be >= 2")
    if max_windows is not None and max_windows < 1:
        raise OlmoIVError(f"max_windows={max_windows} must be >= 1")
    if tokenizer is None:
        raise OlmoIVError("the model has no tokenizer (tokenizer.json): text sources need one")
    windows: list[list[int]] = []
    buf: list[int] = []
    for text in texts:
        enc = tokenizer.encode(text, add_special_tokens=False) if _is_hf_tokenizers(tokenizer) else tokenizer.encode(text)
        ids = list(enc.ids) if hasattr(enc, "ids") else list(enc)
        if separator is not None:
            ids.append(separator)
        if not pack:
            if len(ids) >= 2:
                windows.append(ids[:context_size])
                if max_windows is not None and len(windows) >= max_windows:
                    return windows
            continue
        buf.extend(ids)
        while len(buf) >= context_size:
            windows.append(buf[:context_size])
            buf = buf[context_size:]
            if max_windows is not None and len(windows) >= max_windows:
                return windows
    if len(buf) >= 2:
        windows.append(buf)
    if not windows:
        raise OlmoIVError("the text source produced no tokens")
    return windows


def _is_hf_tokenizers(tok: Any) -> bool:
    return type(tok).__module__.startswith("tokenizers")


def hook_layer(hook_name: str) -> int | None:
    """The block a hook point lives in (None for hook_embed); the forward can stop right after it."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if m:
        return int(m.group(1))
    if hook_name == "hook_embed":
        return None
    raise OlmoIVError(f"hook_name={hook_name!r}: SAEs read a block's hook point (blocks.L.*) or hook_embed")


def window_activations(model: Any, windows: Sequence[Sequence[int]], hook_name: str, *,
                       exclude: Sequence[int] = (), batch_size: int = 16) -> Tensor:
    """Activations at `hook_name` [n_tokens, d] for every token of `windows` except those in `exclude`, in
    window order. Runs only the blocks up to the hooked one."""
    try:
        from olmo_iv.activations import iter_token_activations
    except ImportError:  # the shared extractor has not landed on this branch yet
        iter_token_activations = None
    if iter_token_activations is not None:
        parts = list(iter_token_activations(model, [list(w) for w in windows], hook_name, batch_size=batch_size,
                                            exclude=tuple(exclude)))
        return torch.cat(parts) if parts else torch.empty(0, model.config.d_model)
    layer = hook_layer(hook_name)
    stop = 0 if layer is None else layer + 1
    out: list[Tensor] = []
    excl = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for r, w in enumerate(chunk):
                ids[r, :len(w)] = torch.tensor(w)
                mask[r, :len(w)] = True
            _, cache = model.run_with_cache(ids, [hook_name], stop_at_layer=stop)  # right padding needs no mask
            acts = cache[hook_name]
            keep = mask & ~torch.isin(ids, excl) if excl.numel() else mask
            out.append(acts[keep].float())
    return torch.cat(out)


def model_fingerprint(model: Any) -> str:
    """A short hash of the model's config and weights (shapes, sums and a few values of every tensor): what
    an activation cache and a run record to tell checkpoints apart."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_hf"):
        h.update(json.dumps(cfg.to_hf(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{float(flat.double().sum()):.10e}".encode())
            h.update(flat[:16].double().numpy().tobytes())
    return h.hexdigest()[:16]


class ActivationStream(Protocol):
    """What the trainer reads: fixed-size batches of activations, and a position that can be saved."""

    d_in: int

    def next_batch(self, n: int) -> Tensor: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class BlockCache(Protocol):
    """An on-disk store of unshuffled buffers (see `olmo_iv.runs.sae.DiskActivationCache`)."""

    def get(self, index: int) -> Tensor | None: ...

    def put(self, index: int, acts: Tensor) -> None: ...


def _shuffled(acts: Tensor, seed: int, index: int) -> Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    return acts[torch.randperm(acts.shape[0], generator=gen)]


class _BufferedStream:
    """Shared logic: a sequence of buffers (index 0, 1, 2, ... cycling over n_buffers per epoch), each shuffled
    with a seed derived from (seed, index); a batch may span two buffers."""

    d_in: int
    n_buffers: int

    def __init__(self, seed: int, shuffle: bool) -> None:
        self.seed, self.shuffle = seed, shuffle
        self._index, self._offset = 0, 0
        self._current: Tensor | None = None

    def _raw_buffer(self, local: int) -> Tensor:
        raise NotImplementedError

    def _buffer(self, index: int) -> Tensor:
        raw = self._raw_buffer(index % self.n_buffers)
        return _shuffled(raw, self.seed, index) if self.shuffle else raw

    def next_batch(self, n: int) -> Tensor:
        parts, need = [], n
        empty_run = 0
        while need > 0:
            if self._current is None:
                self._current = self._buffer(self._index)
            avail = self._current.shape[0] - self._offset
            if avail <= 0:
                empty_run = empty_run + 1 if self._current.shape[0] == 0 else 0
                if empty_run > self.n_buffers:
                    raise OlmoIVError("the activation source has no usable tokens (all excluded?)")
                self._index, self._offset, self._current = self._index + 1, 0, None
                continue
            take = min(avail, need)
            parts.append(self._current[self._offset:self._offset + take])
            self._offset += take
            need -= take
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def state(self) -> dict[str, Any]:
        return {"buffer": self._index, "offset": self._offset}

    def restore(self, state: dict[str, Any]) -> None:
        self._index, self._offset, self._current = int(state["buffer"]), int(state["offset"]), None

    @property
    def epoch(self) -> int:
        return self._index // self.n_buffers


class TensorStream(_BufferedStream):
    """Batches from activations already in memory [N, d] (synthetic data, a harvested cache), reshuffled each
    epoch."""

    def __init__(self, acts: Tensor, *, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(seed, shuffle)
        if acts.dim() != 2 or acts.shape[0] == 0:
            raise OlmoIVError(f"acts must be a non-empty [n_tokens, d] tensor, got shape {tuple(acts.shape)}")
        self.acts, self.d_in, self.n_buffers = acts, acts.shape[1], 1

    def _raw_buffer(self, local: int) -> Tensor:
        return self.acts


class ModelStream(_BufferedStream):
    """Activations of `model` at `hook_name` over token windows, computed a buffer of `windows_per_buffer`
    windows at a time (only the blocks up to the hook run), shuffled within the buffer, optionally cached."""

    def __init__(self, model: Any, windows: Sequence[Sequence[int]], hook_name: str, *, windows_per_buffer: int = 32,
                 exclude: Sequence[int] | None = None, seed: int = 0, shuffle: bool = True, model_batch: int = 16,
                 cache: BlockCache | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(seed, shuffle)
        if windows_per_buffer < 1:
            raise OlmoIVError(f"windows_per_buffer={windows_per_buffer} must be >= 1")
        if model_batch < 1:
            raise OlmoIVError(f"model_batch={model_batch} must be >= 1")
        if not windows:
            raise OlmoIVError("windows is empty: the text source produced no token windows")
        hook_layer(hook_name)
        self.model, self.windows, self.hook_name = model, windows, hook_name
        self.exclude = tuple(special_ids(getattr(model, "tokenizer", None), model.config) if exclude is None else exclude)
        self.wpb, self.model_batch, self.cache, self.progress = windows_per_buffer, model_batch, cache, progress
        self.d_in = model.config.d_model
        self.n_buffers = (len(windows) + windows_per_buffer - 1) // windows_per_buffer

    def _raw_buffer(self, local: int) -> Tensor:
        if self.cache is not None:
            hit = self.cache.get(local)
            if hit is not None:
                return hit
        chunk = self.windows[local * self.wpb:(local + 1) * self.wpb]
        acts = window_activations(self.model, chunk, self.hook_name, exclude=self.exclude, batch_size=self.model_batch)
        if self.cache is not None:
            self.cache.put(local, acts)
        if self.progress is not None:
            self.progress("harvesting", 1, self.n_buffers, {"harvested_tokens": acts.shape[0]})
        return acts

    def cache_key(self, fingerprint: str) -> str:
        """Everything that determines the buffers' contents (not their shuffle): the cache folder's name."""
        h = hashlib.sha256()
        h.update(json.dumps([fingerprint, self.hook_name, self.exclude, self.wpb]).encode())
        for w in self.windows:
            h.update(torch.tensor(list(w), dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


class MemoryCache:
    """Keeps every harvested buffer in memory, so that later epochs do not run the model again."""

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}

    def get(self, index: int) -> Tensor | None:
        return self.buffers.get(index)

    def put(self, index: int, acts: Tensor) -> None:
        self.buffers[index] = acts
