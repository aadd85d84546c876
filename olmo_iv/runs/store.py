"""The run store: the one way a command writes a run folder, resumes it, and refuses to mix runs.

    store = RunStore.open(out, "patching", settings, models=["toy"])   # fingerprints the checkpoints
    for unit in units:
        if store.done(unit):
            continue
        store.complete(unit, {"rows.csv": text})                     # payload first, then the done marker
    store.write_text("patching.csv", merged)                          # outputs, atomically
    store.finish()

A folder holds `run.json` (kind, settings, checkpoint fingerprints, software versions, state) and `units/<id>/`.
A unit is done when its `done.json` exists; it is written after the unit's payload, with an atomic rename, so a
process killed at any moment leaves every unit either done (and whole) or not done. Units are independent and
their payloads are merged in a fixed order by the command, so a cluster runner can schedule the same units.

Opening a folder:
- empty or missing: a new run;
- a run with the same kind, settings and checkpoints: it continues, skipping done units;
- the same run, finished: `RunFinished`, which says where the results are (overwrite=True computes it again);
- other settings or other weights: refused, naming what differs, unless no unit was done yet (a start that
  failed, e.g. on a bad device, never blocks the corrected command) or overwrite=True;
- a non-empty folder that holds no run: refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError
from olmo_iv.io import atomic_write, versions, write_json, write_text

MANIFEST = "run.json"
UNITS = "units"
SAMPLE_BYTES = 1 << 16
"""Bytes read at each sampled offset of a weights file."""
SAMPLES_PER_FILE = 16
"""Offsets sampled per weights file: 1 MiB read per file, however large, yet any retraining changes them."""


class RunFinished(OlmoIVError):
    """The folder already holds this run, finished. Its message says where the results are."""


def slug(text: str) -> str:
    """The file-name-safe form of a model, task, position or unit name: the one used for every run folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_digest(path: Path) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets) and of 16 evenly spaced 64 KiB
    samples of its data: cheap for 7B (1 MiB per file), and a model rebuilt in place changes every sample."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        h.update(head + f.read(min(n, size)))
        start = 8 + n
        span = max(size - start - SAMPLE_BYTES, 0)
        for k in range(SAMPLES_PER_FILE):
            f.seek(start + span * k // max(SAMPLES_PER_FILE - 1, 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def fingerprint(model: str) -> dict[str, str]:
    """A checkpoint's identity: sha256 of config.json and tokenizer.json, and a sampled digest of every weights
    file. It changes when a model is rebuilt in place at the same path, and costs about 1 MiB of reading per file."""
    from olmo_iv.loading import resolve

    folder = resolve(model)
    out = {}
    for name in ("config.json", "tokenizer.json"):
        if (folder / name).exists():
            out[name] = _sha256(folder / name)[:16]
    weights = sorted(folder.glob("*.safetensors"))
    h = hashlib.sha256()
    for path in weights:
        h.update(path.name.encode() + _weights_digest(path).encode())
    out["weights"] = h.hexdigest()[:16]
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclass
class RunStore:
    """A run folder. Create it with `RunStore.open`."""

    root: Path
    kind: str
    settings: dict[str, Any]
    checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, out: str | Path, kind: str, settings: dict[str, Any], *, models: Sequence[str] = (),
             overwrite: bool = False) -> RunStore:
        """Open `out` for a run of `kind` with `settings` (JSON-able) on the checkpoints `models` (see module doc)."""
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise OlmoIVError(f"out={str(root)!r} is a file: give a folder for the run")
        if any(p.exists() and not p.is_dir() for p in root.parents):
            raise OlmoIVError(f"out={str(root)!r} lies inside a file: give a folder for the run")
        store = cls(root, kind, _jsonable(settings), {m: fingerprint(m) for m in dict.fromkeys(map(str, models))})
        manifest = root / MANIFEST
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError as err:
                raise OlmoIVError(f"{manifest} is not valid JSON ({err}): the folder is damaged; choose another "
                                  "out= or pass overwrite=True") from err
            if overwrite:
                store._clear(old)
            else:
                diff = _differences({"kind": old.get("kind"), "settings": old.get("settings", {})},
                                    {"kind": kind, "settings": store.settings})
                weights = _differences(old.get("checkpoints", {}), store.checkpoints)
                if (diff or weights) and store.units_done():
                    what = "; ".join(diff + [f"checkpoint {w}" for w in weights])
                    why = ("the weights or files of a checkpoint changed since this run started"
                           if weights and not diff else "it was made with other settings")
                    raise OlmoIVError(f"{root} holds a {old.get('kind')} run that cannot be continued: {why} "
                                      f"({what}). Choose another out=, or pass overwrite=True to start afresh.")
                if not diff and not weights and old.get("finished"):
                    files = ", ".join(old.get("outputs", [])) or "(none)"
                    raise RunFinished(f"{root} already holds this {kind} run, finished; its results are in {root}: "
                                      f"{files}. Pass overwrite=True to compute it again.")
                if diff or weights:  # nothing was done under the old settings: a failed start
                    store._clear(old)
        elif root.exists() and any(root.iterdir()):
            raise OlmoIVError(f"{root} is not empty and holds no olmo-iv run: choose another out=")
        try:
            root.mkdir(parents=True, exist_ok=True)
            store._write_manifest(finished=False)
        except OSError as err:  # a read-only file system, a full disk, a path through a file
            raise OlmoIVError(f"out={str(root)!r}: cannot write the run there ({err.strerror or err})") from None
        return store

    @classmethod
    def attach(cls, run_dir: str | Path) -> RunStore:
        """An existing run folder, opened to add derived outputs (e.g. statistics of a patching run)."""
        root = Path(run_dir)
        if not root.is_dir():
            raise OlmoIVError(f"no such run folder: {root}")
        manifest = root / MANIFEST
        try:
            old = json.loads(manifest.read_text()) if manifest.exists() else {}
        except json.JSONDecodeError as err:
            raise OlmoIVError(f"{manifest} is not valid JSON ({err}): the run folder is damaged") from None
        store = cls(root, old.get("kind", "unknown"), old.get("settings", {}), old.get("checkpoints", {}),
                    list(old.get("outputs", [])))
        store._attached = manifest.exists()
        return store

    def _clear(self, old: dict) -> None:
        """Remove what a previous run wrote (its manifest, units and recorded outputs), nothing else."""
        for name in old.get("outputs", []):
            (self.root / name).unlink(missing_ok=True)
        shutil.rmtree(self.root / UNITS, ignore_errors=True)
        (self.root / MANIFEST).unlink(missing_ok=True)

    def _write_manifest(self, finished: bool) -> None:
        write_json(self.root / MANIFEST, {"kind": self.kind, "settings": self.settings,
                                          "checkpoints": self.checkpoints, "versions": versions(),
                                          "finished": finished, "outputs": self.outputs})

    # ------------------------------------------------------------------------------------------------ units

    def unit_dir(self, unit: str) -> Path:
        return self.root / UNITS / slug(unit)

    def done(self, unit: str) -> bool:
        return (self.unit_dir(unit) / "done.json").exists()

    def units_done(self) -> list[str]:
        folder = self.root / UNITS
        return sorted(p.parent.name for p in folder.glob("*/done.json")) if folder.exists() else []

    def complete(self, unit: str, payload: dict[str, str | bytes | dict | list], meta: dict | None = None) -> None:
        """Write a unit's files (text, bytes, or JSON for dicts and lists), then mark it done."""
        folder = self.unit_dir(unit)
        for name, data in payload.items():
            if isinstance(data, (dict, list)):
                write_json(folder / name, data)
            elif isinstance(data, bytes):
                atomic_write(folder / name, lambda tmp, data=data: tmp.write_bytes(data))
            else:
                write_text(folder / name, data)
        write_json(folder / "done.json", {"unit": unit, "files": sorted(payload), **(meta or {})})

    def read(self, unit: str, name: str) -> str:
        return (self.unit_dir(unit) / name).read_text()

    def read_json(self, unit: str, name: str) -> Any:
        return json.loads(self.read(unit, name))

    # ---------------------------------------------------------------------------------------------- outputs

    def path(self, name: str) -> Path:
        return self.root / name

    def _record(self, paths: Iterable[Path]) -> list[Path]:
        for p in paths:
            rel = str(p.relative_to(self.root))
            if rel not in self.outputs:
                self.outputs.append(rel)
        return list(paths)

    def write_text(self, name: str, text: str) -> Path:
        return self._record([write_text(self.root / name, text)])[0]

    def write_json(self, name: str, obj: Any) -> Path:
        return self._record([write_json(self.root / name, obj)])[0]

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self._record([atomic_write(self.root / name, lambda tmp: tmp.write_bytes(data))])[0]

    def write_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return self.write_text(name, buf.getvalue())

    def save_figure(self, name: str, fig) -> list[Path]:
        """A figure as NAME.png (200 dpi) and NAME.pdf."""
        from olmo_iv.runs.figures import save_figure

        return self._record(save_figure(fig, self.root / name))

    def save_outputs(self) -> None:
        """Record outputs added to an attached run in its manifest (the run stays finished)."""
        if getattr(self, "_attached", False):
            old = json.loads((self.root / MANIFEST).read_text())
            write_json(self.root / MANIFEST, {**old, "outputs": self.outputs})

    def finish(self, prune_units: bool = False) -> None:
        """Mark the run finished (a rerun then says so). prune_units: delete the units' payloads, whose content
        the merged outputs now hold, keeping only their done markers."""
        if prune_units:
            for folder in (self.root / UNITS).glob("*"):
                for f in folder.iterdir():
                    if f.name != "done.json":
                        f.unlink()
        self._write_manifest(finished=True)
