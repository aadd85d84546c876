"""Load OLMo-2 and OLMo-3 checkpoints: the built-in toy models, local folders and hub ids; safetensors only.

Weights are created on the meta device and filled tensor by tensor from the files, so a 7B model is never
randomly initialised first and never held twice. Nothing is unpickled and no remote code is run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from olmo_iv.chat import read_chat_config
from olmo_iv.errors import OlmoIVError
from olmo_iv.io import atomic_write, write_text
from olmo_iv.model import ModelConfig, OLMo2

MODELS_DIR = Path(__file__).parent / "models"
BUILTIN = {"toy": MODELS_DIR / "toy", "toy-base": MODELS_DIR / "toy-base",
           "toy-steer": MODELS_DIR / "toy-steer", "toy-steer-base": MODELS_DIR / "toy-steer-base"}
"""Models shipped inside the package, loaded through the same path as any local folder."""
_RETRAIN = {"toy-steer": "train-steer-toy", "toy-steer-base": "train-steer-toy --control"}

HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
]


# ours <-> transformers' tensor names: prefix rules first, then the sub-module renames inside a block
PREFIXES = [("embed.", "model.embed_tokens."), ("ln_final.", "model.norm."), ("blocks.", "model.layers.")]
INFIXES = [
    (".attn.", ".self_attn."),
    (".ln_attn.", ".post_attention_layernorm."),
    (".ln_mlp.", ".post_feedforward_layernorm."),
]


def hf_name(ours: str) -> str:
    """Our parameter name -> its tensor name in a transformers checkpoint ('blocks.0.ln_attn.weight' ->
    'model.layers.0.post_attention_layernorm.weight'); names without a rule (lm_head.weight) are the same."""
    for a, b in PREFIXES:
        if ours.startswith(a):
            ours = b + ours.removeprefix(a)
            break
    for a, b in INFIXES:
        ours = ours.replace(a, b)
    return ours


def our_name(hf: str) -> str:
    """The inverse of hf_name."""
    for a, b in INFIXES:
        hf = hf.replace(b, a)
    for a, b in PREFIXES:
        if hf.startswith(b):
            return a + hf.removeprefix(b)
    return hf


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A folder holding the checkpoint: a built-in name, an existing folder, or a hub id (downloaded or cached)."""
    name = str(name_or_path)
    if name in BUILTIN:
        path = BUILTIN[name]
        if not (path / "config.json").exists():
            raise OlmoIVError(
                f"the built-in model {name!r} is missing from {path}: rebuild it with `olmo-iv {_RETRAIN.get(name, 'train-toy')}`"
            )
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise OlmoIVError(
            f"{name} is a file; pass the folder that holds config.json and the safetensors files"
        )
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep + os.sep in name
    if looks_like_path:
        raise OlmoIVError(f"no such directory: {name} (built-in models: {', '.join(BUILTIN)})")
    return _snapshot(name, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise OlmoIVError(
            f"{repo_id!r} is not in the local Hugging Face cache and {why}. Download it on a machine with "
            f"network access (`hf download {repo_id}`), copy the cache, or pass a local folder."
        ) from err
    except RepositoryNotFoundError as err:
        raise OlmoIVError(f"no model {repo_id!r} on the Hugging Face hub (or it is private)") from err
    except (HfHubHTTPError, OSError) as err:
        raise OlmoIVError(f"could not fetch {repo_id!r} from the Hugging Face hub: {err}") from err


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise OlmoIVError(f"{folder} has no config.json: is this an OLMo-2/OLMo-3 checkpoint folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise OlmoIVError(f"{path} is not valid JSON: {err}") from err
    return ModelConfig.from_hf(raw)


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (one file, or shards listed in the index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise OlmoIVError(f"{index} is not a valid safetensors index (needs a 'weight_map')") from err
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise OlmoIVError(f"shard {shard.name} listed in {index.name} is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise OlmoIVError(
            f"{folder} holds only pickle weights (.bin/.pt): olmo-iv reads safetensors only, "
            "for safety; convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    raise OlmoIVError(f"{folder} has no model.safetensors and no model.safetensors.index.json")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise OlmoIVError(
            f"{path} is not a readable safetensors file ({err}); re-download or re-save it"
        ) from err


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device, or a clear error for a malformed name or a device this machine does not have."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise OlmoIVError(
            f"device={device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1', 'mps', ..."
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OlmoIVError(
            f"device='{device}': this torch has no CUDA device ({torch.__version__}); use "
            "device='cpu' or install a CUDA build of torch"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OlmoIVError(f"device='{device}': only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OlmoIVError("device='mps': MPS is not available on this machine")
    return device


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating torch.dtype from a dtype or its name ('float32', 'bf16', 'torch.float16', ...)."""
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name not in DTYPES:
            raise OlmoIVError(
                f"dtype={dtype!r} is not supported: use 'float32', 'bfloat16' or 'float16' "
                "(or fp32, bf16, fp16)"
            )
        return DTYPES[name]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise OlmoIVError(
            f"dtype={dtype!r} is not supported: use torch.float32, torch.bfloat16 or torch.float16"
        )
    return dtype


def load(
    name_or_path: str | os.PathLike = "toy",
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> OLMo2:
    """Load an OLMo-2 or OLMo-3 checkpoint (by config.json's model_type): 'toy' / 'toy-base' (shipped), a local
    folder, or a hub id such as 'allenai/OLMo-2-0425-1B' or 'allenai/Olmo-3-1025-7B' (through huggingface_hub,
    honouring HF_HUB_OFFLINE and the local cache).

    The folder needs config.json and model.safetensors (or shards with model.safetensors.index.json); a
    tokenizer.json, when present, is loaded as `model.tokenizer`. Every tensor name and shape is checked, and
    every tensor is checked for NaN/inf as it is read. dtype: a torch dtype or a name ('bfloat16', 'bf16', ...).
    """
    dtype = check_dtype(dtype)
    device = check_device(device)
    folder = resolve(name_or_path, revision)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = OLMo2(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}
    files = weight_files(folder)
    wanted = {hf_name(name): name for name in expected}
    if cfg.tie_word_embeddings and "lm_head.weight" not in files:
        wanted.pop("lm_head.weight")  # tied: lm_head is the embedding
    missing = sorted(set(wanted) - set(files))
    unexpected = sorted(set(files) - set(wanted))
    if missing or unexpected:
        raise OlmoIVError(
            f"{folder} does not match its config.json ({cfg.n_layers} layers): "
            + (f"missing tensors {_few(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected tensors {_few(unexpected)}" if unexpected else "")
        )
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for hf in wanted:
        by_file.setdefault(files[hf], []).append(hf)
    for path, names in sorted(by_file.items()):
        with _open(path) as f:
            for hf in names:
                ours = wanted[hf]
                shape = tuple(f.get_slice(hf).get_shape())
                if shape != tuple(expected[ours]):
                    raise OlmoIVError(
                        f"tensor {hf} in {path.name} has shape {shape}, but config.json implies "
                        f"{tuple(expected[ours])}"
                    )
                try:
                    raw = f.get_tensor(hf)
                except (SafetensorError, RuntimeError) as err:
                    raise OlmoIVError(
                        f"could not read tensor {hf} from {path} ({err}): the file is corrupt"
                    ) from err
                state[ours] = raw.to(device=device, dtype=dtype)
                if not bool(torch.isfinite(state[ours]).all()):
                    why = (
                        "its values overflow " + str(dtype).removeprefix("torch.") + ": load in a wider dtype"
                        if bool(torch.isfinite(raw).all())
                        else "the checkpoint is corrupt or diverged"
                    )
                    raise OlmoIVError(f"tensor {hf} in {path.name} holds NaN or inf values ({why})")
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.tokenizer = load_tokenizer(folder)
    model.chat_template, model.special_tokens = read_chat_config(folder)
    model.name_or_path = str(name_or_path)
    return model


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, or None when there is none."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise OlmoIVError(f"{path} is not a valid tokenizer.json: {err}") from err


def save(model: OLMo2, folder: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Write the model in the standard layout (config.json, model.safetensors or shards + index, tokenizer.json).

    Files are written under temporary names and renamed, so a killed save never leaves a half-written checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(n): p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, fname in zip(shards, names):
        atomic_write(
            folder / fname, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"})
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {n: fname for shard, fname in zip(shards, names) for n in shard},
        }
        write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    write_text(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    if model.tokenizer is not None:
        atomic_write(folder / "tokenizer.json", lambda tmp: model.tokenizer.save(str(tmp)))
    if model.chat_template is not None or model.special_tokens:
        write_text(folder / "tokenizer_config.json", json.dumps(
            {**model.special_tokens, "chat_template": model.chat_template}, indent=2, ensure_ascii=False))
    return folder
