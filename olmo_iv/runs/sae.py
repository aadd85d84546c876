"""Every folder `olmo-iv sae train` and `olmo-iv sae eval` write, in one module, through the run store
(`olmo_iv.runs.store.RunStore`): the same command on the same folder continues where it stopped, a finished run
says where its results are, other settings or changed weights are refused.

A train run folder:
    run.json            the store's manifest: kind, settings, checkpoint fingerprints, versions, outputs
    units/checkpoint-NNNNNNNNN/checkpoint.safetensors   the latest resumable state (SAE, optimiser, data position,
                        dead-latent counters), one safetensors file with the JSON state in its header; the payload
                        is pruned when the run finishes
    sae/                the trained SAE in SAELens v6 format (cfg.json + sae_weights.safetensors)
    history.json        FVU, L0, dead fraction and LR at every report
    metrics.json        held-out FVU / L0 / dead fraction and CE recovered / KL with the SAE spliced in
    summary.json        timings, token and window counts, the step a resumed run restarted from
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from olmo_iv.errors import OlmoIVError
from olmo_iv.io import atomic_write
from olmo_iv.progress import ProgressFn
from olmo_iv.runs.store import RunStore
from olmo_iv.sae.data import (
    MemoryCache,
    ModelStream,
    hook_layer,
    model_fingerprint,
    read_texts,
    special_ids,
    token_windows,
)
from olmo_iv.sae.train import TrainConfig, TrainState, state_from_files, state_to_files, train_sae

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_UNIT = "checkpoint-{:09d}"


@dataclass
class SAETrainSettings:
    model: str = "toy"
    """Built-in name, local folder or hub id."""
    hook_name: str = "blocks.3.hook_resid_post"
    """TransformerLens hook point to train on."""
    source: str = "tasks"
    """Text source: a .txt/.jsonl file, a folder, 'tasks', 'hub:owner/name' (see olmo_iv.sae.data.read_texts)."""
    text_field: str | None = None
    """JSONL field holding the text (default: text, prompt or content)."""
    context_size: int = 64
    """Tokens per window."""
    max_windows: int | None = None
    """Use at most this many windows of the source."""
    eval_windows: int = 32
    """Windows held out (the source's last ones) for metrics.json; 0 skips the held-out metrics."""
    windows_per_buffer: int = 64
    """Windows per shuffling buffer."""
    model_batch: int = 16
    """Windows per forward pass when harvesting."""
    exclude_special: bool = True
    """Leave BOS / <|endoftext|> / padding positions (attention sinks) out of training."""
    cache_dir: str | None = None
    """Keep harvested buffers here as safetensors shards for repeated runs (None: in memory only)."""
    dtype: str = "float32"
    """Model dtype while harvesting."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The SAE and optimiser settings (olmo_iv.sae.train.TrainConfig)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiskActivationCache:
    """Unshuffled harvested buffers as safetensors shards, `buffer_{i:06d}.safetensors`, in a folder whose name
    is a hash of everything that determines them (model weights, hook, windows, exclusions)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, index: int) -> Path:
        return self.folder / f"buffer_{index:06d}.safetensors"

    def get(self, index: int) -> torch.Tensor | None:
        p = self._path(index)
        return load_file(str(p))["acts"] if p.exists() else None

    def put(self, index: int, acts: torch.Tensor) -> None:
        atomic_write(self._path(index), lambda tmp: save_file({"acts": acts.contiguous()}, str(tmp)))


def checkpoint_bytes(state: TrainState) -> bytes:
    """A TrainState as one safetensors file: tensors, and the JSON part in the header."""
    tensors, meta = state_to_files(state)
    return save(tensors, metadata={"state": json.dumps(meta)})


def read_checkpoint(path: Path, cfg: TrainConfig) -> TrainState:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    return state_from_files(load_file(str(path)), meta, cfg)


def _latest_checkpoint(store: RunStore) -> Path | None:
    units = [u for u in store.units_done() if u.startswith("checkpoint-")]
    return store.unit_dir(max(units)) / CHECKPOINT if units else None


def _save_checkpoint(store: RunStore, state: TrainState) -> None:
    """The new checkpoint becomes a done unit first; only then are older ones dropped, each done marker before
    its payload, so a kill at any moment leaves at least one whole checkpoint marked done."""
    name = CHECKPOINT_UNIT.format(state.step)
    store.complete(name, {CHECKPOINT: checkpoint_bytes(state)}, meta={"step": state.step})
    for old in store.units_done():
        if old.startswith("checkpoint-") and old != name:
            folder = store.unit_dir(old)
            (folder / "done.json").unlink(missing_ok=True)
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()


def _load_model(name: str, dtype: str):
    import olmo_iv

    return olmo_iv.load(name, dtype=getattr(torch, dtype)).eval()


def _windows(settings: SAETrainSettings, model) -> list[list[int]]:
    texts = read_texts(settings.source, text_field=settings.text_field)
    return token_windows(texts, model.tokenizer, settings.context_size, separator=model.config.eos_token_id,
                         max_windows=settings.max_windows)


def train_run(settings: SAETrainSettings, out: str | Path, *, overwrite: bool = False,
              progress: ProgressFn | None = None, harvest_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train an SAE and write the run folder `out`. Run again on the same folder, it continues from its last
    checkpoint; the final weights equal those of an uninterrupted run bit for bit (on CPU, same thread count).
    A finished run raises `RunFinished` (saying where the results are) unless overwrite=True."""
    from olmo_iv.sae.io import saelens_config, saelens_tensors
    from olmo_iv.sae.metrics import reconstruction_metrics, spliced_metrics

    settings.train.validate()
    hook_layer(settings.hook_name)
    if settings.eval_windows < 0:
        raise OlmoIVError(f"eval_windows={settings.eval_windows} must be >= 0")
    store = RunStore.open(out, "sae train", settings.to_dict(), models=[settings.model], overwrite=overwrite)
    t0 = time.perf_counter()
    model = _load_model(settings.model, settings.dtype)
    if settings.hook_name not in model.hook_names():
        raise OlmoIVError(f"hook_name={settings.hook_name!r} is not a hook point of {settings.model} "
                          f"({model.config.n_layers} layers)")
    windows = _windows(settings, model)
    n_eval = min(settings.eval_windows, len(windows) // 5)
    train_windows, eval_windows = (windows[:-n_eval], windows[-n_eval:]) if n_eval else (windows, [])
    exclude = special_ids(model.tokenizer, model.config) if settings.exclude_special else ()
    fingerprint = model_fingerprint(model)
    stream = ModelStream(model, train_windows, settings.hook_name, windows_per_buffer=settings.windows_per_buffer,
                         exclude=exclude, seed=settings.train.seed, model_batch=settings.model_batch,
                         progress=harvest_progress)
    if settings.cache_dir:
        stream.cache = DiskActivationCache(Path(settings.cache_dir) / stream.cache_key(fingerprint))
    else:
        stream.cache = MemoryCache()
    ckpt = _latest_checkpoint(store)
    state = read_checkpoint(ckpt, settings.train) if ckpt is not None else None
    resumed_at = state.step if state is not None else 0
    meta = {"hook_name": settings.hook_name, "model_name": settings.model, "context_size": settings.context_size,
            "metadata": {"dataset_path": settings.source, "exclude_special_token_ids": list(exclude),
                         "model_fingerprint": fingerprint}}
    t_train = time.perf_counter()
    result = train_sae(stream, settings.train, state=state, progress=progress,
                       on_checkpoint=lambda s: _save_checkpoint(store, s), **meta)
    t_done = time.perf_counter()
    sae = result.sae
    store.write_json("history.json", result.history)
    store.write_bytes("sae/sae_weights.safetensors", save(saelens_tensors(sae)))
    store.write_json("sae/cfg.json", saelens_config(sae))
    metrics: dict[str, Any] = {"train": result.final}
    if eval_windows:
        from olmo_iv.sae.data import window_activations

        acts = window_activations(model, eval_windows, settings.hook_name, exclude=exclude,
                                  batch_size=settings.model_batch)
        metrics["heldout"] = reconstruction_metrics(sae, acts)
        metrics["spliced"] = spliced_metrics(model, sae, eval_windows, exclude=exclude,
                                             batch_size=settings.model_batch)
    store.write_json("metrics.json", metrics)
    summary = {"kind": "sae train", "model_fingerprint": fingerprint, "n_windows": len(train_windows),
               "n_eval_windows": len(eval_windows), "tokens_trained": result.final.get("tokens"),
               "resumed_at_step": resumed_at, "seconds": {"setup": t_train - t0, "train": t_done - t_train,
                                                         "total": time.perf_counter() - t0},
               "sae": str(store.path("sae")), "metrics": metrics}
    store.write_json("summary.json", summary)
    store.finish(prune_units=True)  # the checkpoints' payloads: sae/ holds the result
    return summary


def eval_run(sae_path: str | Path, *, model: str = "toy", source: str = "tasks", out: str | Path | None = None,
             hook_name: str | None = None, context_size: int = 64, max_windows: int | None = 64,
             text_field: str | None = None, dtype: str = "float32", batch_size: int = 16,
             overwrite: bool = False, progress: ProgressFn | None = None) -> dict[str, Any]:
    """FVU, L0, dead fraction and spliced CE / KL of a saved SAE on a text source; written to out/metrics.json
    (a run folder of the store) when `out` is given."""
    from olmo_iv.sae.arch import SAE
    from olmo_iv.sae.data import window_activations
    from olmo_iv.sae.metrics import reconstruction_metrics, spliced_metrics

    sae = SAE.load(sae_path)
    name = hook_name or sae.cfg.hook_name
    if not name:
        raise OlmoIVError("the SAE records no hook point: pass hook_name=")
    store = None
    if out is not None:
        settings = {"sae": str(sae_path), "model": model, "source": source, "hook_name": name,
                    "context_size": context_size, "max_windows": max_windows, "text_field": text_field, "dtype": dtype}
        store = RunStore.open(out, "sae eval", settings, models=[model, str(sae_path)], overwrite=overwrite)
    m = _load_model(model, dtype)
    windows = token_windows(read_texts(source, text_field=text_field), m.tokenizer, context_size,
                            separator=m.config.eos_token_id, max_windows=max_windows)
    exclude = special_ids(m.tokenizer, m.config)
    acts = window_activations(m, windows, name, exclude=exclude, batch_size=batch_size)
    result = {"sae": str(sae_path), "model": model, "hook_name": name, "source": source,
              "reconstruction": reconstruction_metrics(sae, acts),
              "spliced": spliced_metrics(m, sae, windows, hook_name=name, exclude=exclude, batch_size=batch_size,
                                         progress=progress),
              "model_fingerprint": model_fingerprint(m)}
    if store is not None:
        store.write_json("metrics.json", result)
        store.finish()
    return result
