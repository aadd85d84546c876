"""The SAEs shipped with the package, for the built-in toy models, so that SAE methods (SAIF) run offline:

    from olmo_iv.sae.builtin import builtin_saes, builtin_sae, resolve_sae
    builtin_saes()                         # [("toy", "blocks.0.hook_resid_post"), ..., ("toy-steer", ...)]
    sae = builtin_sae("toy-steer", 3)      # olmo_iv/saes/toy-steer/blocks.3.hook_resid_post (SAELens v6)
    sae = resolve_sae(None, "toy-steer", 3)            # None or "builtin": the shipped one
    sae = resolve_sae("runs/sae/sae", "toy-steer", 3)  # else a local SAELens / sparsify / Gemma Scope folder

Each folder also holds training.json (settings, held-out metrics, the model fingerprint, the reproducing call);
`olmo_iv.toy.saes.train_builtin_saes` regenerates them.
"""

from __future__ import annotations

import re
from pathlib import Path

from olmo_iv.errors import OlmoIVError
from olmo_iv.sae.arch import SAE

SAES_DIR = Path(__file__).resolve().parents[1] / "saes"
"""olmo_iv/saes/<model>/<hook_name>/: the shipped SAEs."""


def _hook_order(hook: str) -> tuple[int, str]:
    m = re.match(r"blocks\.(\d+)\.(.*)", hook)
    return (int(m.group(1)), m.group(2)) if m else (-1, hook)


def builtin_saes() -> list[tuple[str, str]]:
    """(model, hook_name) of every shipped SAE, by model name then layer."""
    found = [(p.parent.parent.name, p.parent.name) for p in SAES_DIR.glob("*/*/cfg.json")]
    return sorted(found, key=lambda mh: (mh[0], _hook_order(mh[1])))


def _shipped_summary() -> str:
    by_model: dict[str, list[str]] = {}
    for model, hook in builtin_saes():
        by_model.setdefault(model, []).append(hook)
    return "; ".join(f"{m}: {', '.join(h)}" for m, h in by_model.items()) or "none"


def builtin_sae_path(model: str, layer: int, hook: str = "hook_resid_post") -> Path:
    """The folder of the shipped SAE of `model` at blocks.<layer>.<hook>; raises, listing what exists, if none."""
    name = f"blocks.{layer}.{hook}"
    folder = SAES_DIR / str(model) / name
    if not (folder / "cfg.json").is_file():
        raise OlmoIVError(f"no built-in SAE for model={model!r} at layer={layer} ({name}); shipped: "
                          f"{_shipped_summary()}. Train one with `olmo-iv sae train` and pass its folder as sae=")
    return folder


def builtin_sae(model: str, layer: int, hook: str = "hook_resid_post") -> SAE:
    """The shipped SAE of built-in model `model` ('toy', 'toy-steer') at blocks.<layer>.<hook>."""
    return SAE.load(builtin_sae_path(model, layer, hook))


def resolve_sae(sae: str | Path | None, model: str, layer: int) -> SAE:
    """The SAE a method should use at blocks.<layer>.hook_resid_post of `model`: None or "builtin" -> the shipped
    one; otherwise a local SAE folder (SAELens, sparsify) or Gemma Scope params.npz, read by `SAE.load`. An SAE
    recording another layer's hook is refused; one recording none (a sparsify folder of another name) gets this
    layer's resid_post."""
    if sae is None or (isinstance(sae, str) and sae == "builtin"):
        return builtin_sae(model, layer)
    path = Path(sae).expanduser()
    if not path.exists():
        raise OlmoIVError(f"sae={str(sae)!r} is neither 'builtin' nor an existing SAE folder or params.npz file")
    loaded = SAE.load(path)
    hook = loaded.cfg.hook_name
    if hook is None:
        loaded.cfg.hook_name = f"blocks.{layer}.hook_resid_post"
    elif _hook_order(hook)[0] != layer:
        raise OlmoIVError(f"sae={str(sae)!r} reads {hook!r}, not layer={layer}")
    return loaded
