"""`olmo-iv sae train | eval | inspect`: sparse autoencoders on OLMo-2 activations."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import typer
from olmo_iv.cli.app import OVERWRITE, app, bar_callback, out_option, progress_bar
from olmo_iv.cli.app import console as _console
from rich.console import Console
from rich.table import Table

from olmo_iv.errors import OlmoIVError

sae_app = typer.Typer(help="Sparse autoencoders: train on a model's activations, evaluate, inspect latents.",
                      no_args_is_help=True)
app.add_typer(sae_app, name="sae")


@contextmanager
def _flags(**renames: str):
    """Library errors name Python parameters (`k=`); say the command's flags instead (`--k`)."""
    try:
        yield
    except OlmoIVError as err:
        msg = str(err)
        for param, flag in renames.items():
            msg = re.sub(rf"(?<![\w.-]){re.escape(param)}=", f"{flag} ", msg)
        raise type(err)(msg) from err  # keep the type: RunFinished is not a failure


def _hook(layer: int | None, hook: str | None) -> str:
    if hook:
        return hook
    if layer is None:
        raise OlmoIVError("give --layer L (reads blocks.L.hook_resid_post) or --hook NAME")
    return f"blocks.{layer}.hook_resid_post"


TRAIN_FLAGS = {n: "--" + n.replace("_", "-") for n in (
    "architecture", "expansion", "d_sae", "k", "l1_coefficient", "auxk_alpha", "dead_tokens", "optimizer", "lr",
    "lr_warmup_steps", "lr_schedule", "batch_size", "steps", "b_dec_init", "seed", "log_every", "checkpoint_every",
    "context_size", "max_windows", "eval_windows", "windows_per_buffer", "source", "text_field", "hook_name",
    "model_batch", "cache_dir")}
TRAIN_FLAGS["hook_name"] = "--hook"


@sae_app.command("train")
def train(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name (toy), local folder or hub id."),
    layer: int = typer.Option(None, help="Train on blocks.LAYER.hook_resid_post."),
    hook: str = typer.Option(None, help="Any hook point instead of --layer, e.g. blocks.3.hook_mlp_out."),
    source: str = typer.Option("tasks", help="Text: a .txt/.jsonl file, a folder of them, 'tasks' (the vendored task prompts) or hub:owner/name."),
    text_field: str = typer.Option(None, help="JSONL field with the text (default: text, prompt or content)."),
    context_size: int = typer.Option(64, help="Tokens per window."),
    max_windows: int = typer.Option(None, help="Use at most this many windows of the source."),
    architecture: str = typer.Option("topk", help="topk, batchtopk or standard (ReLU + L1)."),
    expansion: float = typer.Option(8.0, help="Latents per input dimension."),
    d_sae: int = typer.Option(None, help="Number of latents (overrides --expansion)."),
    k: int = typer.Option(32, help="Active latents per token (topk; the batch average for batchtopk)."),
    l1_coefficient: float = typer.Option(5.0, help="L1 weight (standard)."),
    auxk_alpha: float = typer.Option(1 / 32, help="AuxK loss weight for dead latents."),
    dead_tokens: int = typer.Option(1_000_000, help="Tokens without firing after which a latent counts as dead."),
    optimizer: str = typer.Option("adam", help="adam or signum (sparsify's sign-SGD)."),
    lr: float = typer.Option(None, help="Learning rate (default: 2e-4 (adam) or 5e-3 (signum) / sqrt(latents / 16384))."),
    lr_warmup_steps: int = typer.Option(0, help="Linear LR warm-up steps."),
    lr_schedule: str = typer.Option("constant", help="constant, linear or cosine decay after warm-up."),
    batch_size: int = typer.Option(1024, help="Tokens per step."),
    steps: int = typer.Option(300, help="Training steps."),
    b_dec_init: str = typer.Option("geometric_median", help="geometric_median, mean or zeros."),
    seed: int = typer.Option(0, help="Seed of the initialisation and of the shuffle."),
    log_every: int = typer.Option(10, help="Steps between progress reports."),
    checkpoint_every: int = typer.Option(100, help="Steps between resumable checkpoints (0: none)."),
    eval_windows: int = typer.Option(32, help="Held-out windows for metrics.json (0: none)."),
    windows_per_buffer: int = typer.Option(64, help="Windows per shuffling buffer."),
    model_batch: int = typer.Option(16, help="Windows per forward pass while harvesting."),
    cache_dir: str = typer.Option(None, help="Keep harvested activations here (safetensors shards) for repeated runs."),
    out: Path = out_option("runs/sae"),
    overwrite: bool = OVERWRITE,
) -> None:
    """Train an SAE on one hook point's activations over a text source; writes the SAE (SAELens format),
    history, held-out metrics and a summary to --out. The same command on the same folder continues a killed
    run from its last checkpoint."""
    from olmo_iv.runs.sae import SAETrainSettings, train_run
    from olmo_iv.sae.train import TrainConfig

    console = _console()
    with _flags(**TRAIN_FLAGS):
        tc = TrainConfig(architecture=architecture, expansion=expansion, d_sae=d_sae, k=k, l1_coefficient=l1_coefficient,
                         auxk_alpha=auxk_alpha, dead_tokens=dead_tokens, optimizer=optimizer, lr=lr,
                         lr_warmup_steps=lr_warmup_steps, lr_schedule=lr_schedule, batch_size=batch_size, steps=steps,
                         b_dec_init=b_dec_init, seed=seed, log_every=log_every, checkpoint_every=checkpoint_every)
        settings = SAETrainSettings(model=model, hook_name=_hook(layer, hook), source=source, text_field=text_field,
                                    context_size=context_size, max_windows=max_windows, eval_windows=eval_windows,
                                    windows_per_buffer=windows_per_buffer, model_batch=model_batch, cache_dir=cache_dir,
                                    train=tc)
        with progress_bar(console) as bar:
            run = train_run(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    _print_metrics(console, run.get("metrics", {}))
    console.print(f"[green]wrote[/] {out}/sae (SAELens format), {out}/metrics.json, {out}/history.json, {out}/summary.json")


def _print_metrics(console: Console, metrics: dict) -> None:
    table = Table(title="SAE metrics")
    table.add_column("set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for group, values in metrics.items():
        for key, value in (values or {}).items():
            if isinstance(value, float):
                table.add_row(group, key, f"{value:.4f}")
    console.print(table)


@sae_app.command("eval")
def evaluate(
    sae: Path = typer.Argument(..., help="SAE folder (SAELens, sparsify) or Gemma Scope params.npz."),
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    source: str = typer.Option("tasks", help="Text source, as for `sae train`."),
    text_field: str = typer.Option(None, help="JSONL field with the text."),
    hook: str = typer.Option(None, help="Hook point (default: the one the SAE records)."),
    context_size: int = typer.Option(64, help="Tokens per window."),
    max_windows: int = typer.Option(64, help="Windows evaluated."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder for metrics.json (default: print only)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """FVU, mean L0 and dead fraction of an SAE, and the model's CE recovered and KL with it spliced in."""
    from olmo_iv.runs.sae import eval_run

    console = _console()
    with _flags(hook_name="--hook", context_size="--context-size", max_windows="--max-windows", source="--source",
                text_field="--text-field"):
        result = eval_run(sae, model=model, source=source, out=out, hook_name=hook, context_size=context_size,
                          max_windows=max_windows, text_field=text_field, overwrite=overwrite)
    _print_metrics(console, {"reconstruction": result["reconstruction"], "spliced": result["spliced"]})
    if out is not None:
        console.print(f"[green]wrote[/] {out}/metrics.json")


@sae_app.command("inspect")
def inspect(
    sae: Path = typer.Argument(..., help="SAE folder or params.npz."),
    latent: int = typer.Option(..., "--latent", "-l", help="Latent index."),
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    source: str = typer.Option("tasks", help="Text source searched for top activations."),
    text_field: str = typer.Option(None, help="JSONL field with the text."),
    context_size: int = typer.Option(64, help="Tokens per window."),
    max_windows: int = typer.Option(256, help="Windows searched."),
    top: int = typer.Option(10, help="How many contexts and tokens to show."),
) -> None:
    """A latent's top activating contexts in the source and its logit-lens tokens."""
    import olmo_iv
    from olmo_iv.sae import SAE
    from olmo_iv.sae.analysis import decode_ids, logit_lens, top_contexts
    from olmo_iv.sae.data import read_texts, token_windows

    console = _console()
    with _flags(latent="--latent", k="--top", context_size="--context-size", max_windows="--max-windows",
                source="--source"):
        s = SAE.load(sae)
        m = olmo_iv.load(model).eval()
        windows = token_windows(read_texts(source, text_field=text_field), m.tokenizer, context_size,
                                separator=m.config.eos_token_id, max_windows=max_windows)
        contexts = top_contexts(m, s, windows, latent, k=top)
        lens = logit_lens(m, s, latent, k=top)
    table = Table(title=f"latent {latent}: top activating contexts ({s.cfg.hook_name})")
    table.add_column("value", justify="right")
    table.add_column("context [token]")
    for c in contexts:
        before = decode_ids(m.tokenizer, c["context"][:-1])
        table.add_row(f"{c['value']:.3f}", f"{before}[bold]\\[{decode_ids(m.tokenizer, [c['token']])}][/bold]")
    console.print(table)
    lens_table = Table(title=f"latent {latent}: logit lens (W_dec row through the unembedding)")
    lens_table.add_column("promotes")
    lens_table.add_column("logit", justify="right")
    lens_table.add_column("suppresses")
    lens_table.add_column("logit", justify="right")
    for (ti, tv), (bi, bv) in zip(lens["top"], lens["bottom"]):
        lens_table.add_row(repr(decode_ids(m.tokenizer, [ti])), f"{tv:+.3f}", repr(decode_ids(m.tokenizer, [bi])), f"{bv:+.3f}")
    console.print(lens_table)
