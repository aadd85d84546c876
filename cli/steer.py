"""`olmo-iv steer`: difference-of-means steering vectors and steered generation (Stolfo et al.)."""

from __future__ import annotations

from pathlib import Path

import typer
from olmo_iv.cli.app import (
    DEVICE,
    DTYPE,
    OVERWRITE,
    app,
    bar_callback,
    console,
    int_list,
    out_option,
    progress_bar,
)
from rich.markup import escape

steer_app = typer.Typer(help="Steering vectors and steered generation (Stolfo et al., ICLR 2025).",
                        no_args_is_help=True)
app.add_typer(steer_app, name="steer")


# options shared by the experiments on format rows (format, layers, compose)
ROWS_MODEL = typer.Option("toy-steer", "--model", "-m", help="Built-in name, local folder or hub id (default: the steering toy, on its held-out format set).")
ROWS_DATA = typer.Option(None, help="JSONL rows as Stolfo's format set (key, prompt, prompt_without_instruction, instruction_id_list, kwargs). Default: the vendored 163 IFEval format prompts.")
ROWS_LAYERS = typer.Option(None, help="Candidate layers, comma-separated (default: the authors', L/5 to L-1 in steps of 2).")
ROWS_MODE = typer.Option("adjust_rs", help="adjust_rs (the authors' choice for format), add or ablate.")
ROWS_COEF = typer.Option(1.0, help="add: C; adjust_rs and ablate: a weight on the edit.")
ROWS_TOKENS = typer.Option(96, help="New tokens per response.")
STYLE = typer.Option("auto", help="Prompt style: auto (the chat template if any), chat, plain or qa.")
ROWS_BATCH = typer.Option(16, help="Prompts per batch and per unit of the run.")
VECTORS_FROM = typer.Option(None, help="Compute the vectors with this model and steer --model with them (cross-model transfer, e.g. instruct -> base; same width needed).")
VECTORS_STYLE = typer.Option("auto", help="Prompt style of the --vectors-from model's pairs.")
NLL = typer.Option(True, help="Also score the layer search's responses by their mean token NLL under the unsteered model (needed by --min-perplexity).")
MIN_PPL = typer.Option(2.5, help="Second degeneration filter: responses whose perplexity under the unsteered model is below this count as degenerate (Stolfo: GPT-2 perplexity < 2.5); 1 turns it off.")


@steer_app.command("vectors")
def vectors(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    pairs: Path = typer.Option(..., help='JSONL, one {"with": ..., "without": ...} user message pair per line.'),
    position: str = typer.Option("last", help="Where activations are read: last (the last prompt token, the authors'), instruction (mean over its tokens) or prompt (mean over all)."),
    style: str = typer.Option("auto", help="Prompt style: auto (the chat template if any), chat, plain or qa."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    out: Path = out_option("runs/steer-vectors"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Difference-of-means vectors for every layer: vectors.safetensors (u [n_layers, d_model], zbar [n_layers])."""
    from olmo_iv.runs.steer import VectorSettings, run_vectors

    con = console()
    settings = VectorSettings(model=model, pairs=str(pairs), position=position, style=style, batch_size=batch_size,
                              device=device, dtype=dtype)
    with progress_bar(con) as bar:
        vecs = run_vectors(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    con.print(f"{vecs.meta['n_pairs']} pairs, {vecs.u.shape[0]} layers; z̄ per layer: "
              + ", ".join(f"{z:.2f}" for z in vecs.zbar.tolist()))
    con.print(f"files: {escape(str(out))}/ (vectors.safetensors, vectors.json)")


@steer_app.command("generate")
def generate(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    vectors: Path = typer.Option(..., help="Folder written by `olmo-iv steer vectors`."),
    layer: int = typer.Option(..., help="Layer whose hook_resid_post is edited."),
    mode: str = typer.Option("add", help="add (h + C·u), adjust_rs (set h·u to z̄) or ablate (remove h·u)."),
    coef: float = typer.Option(1.0, help="add: C; adjust_rs and ablate: a weight on the edit (1 = full)."),
    prompts: Path = typer.Option(..., help='JSONL, one {"prompt": ...} user message per line.'),
    max_new_tokens: int = typer.Option(64, help="New tokens per prompt (a row also ends at EOS)."),
    positions: str = typer.Option("all", help="all (the authors'), prompt, generated or last_prompt."),
    decay: float = typer.Option(None, help="Weight the k-th generated token by decay**k (default: constant)."),
    style: str = typer.Option("auto", help="Prompt style: auto (the chat template if any), chat, plain or qa."),
    batch_size: int = typer.Option(16, help="Prompts per batch and per unit of the run."),
    seed: int = typer.Option(None, help="Sample with this seed instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="With --seed: softmax temperature."),
    also: list[str] = typer.Option(None, help="Compose another vector: VECTORS_DIR:LAYER:MODE:COEF (repeatable)."),
    out: Path = out_option("runs/steer-generate"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Steered generation with a KV cache: generations.jsonl, one {"prompt", "ids", "text"} per prompt."""
    from olmo_iv.runs.steer import GenerateSettings, run_generate

    con = console()
    settings = GenerateSettings(model=model, vectors=str(vectors), prompts=str(prompts), layer=layer, mode=mode,
                                coef=coef, positions=positions, decay=decay, max_new_tokens=max_new_tokens,
                                style=style, batch_size=batch_size, seed=seed, temperature=temperature,
                                also=also or [], device=device, dtype=dtype)
    with progress_bar(con) as bar:
        rows = run_generate(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    for r in rows[:5]:
        con.print(f"[bold]{escape(r['prompt'][:60])}[/] → {escape(r['text'][:100])!r}")
    con.print(f"files: {escape(str(out))}/ (generations.jsonl, summary.json)")


@steer_app.command("format")
def format_(
    model: str = ROWS_MODEL,
    data: Path = ROWS_DATA,
    layers: str = ROWS_LAYERS,
    mode: str = ROWS_MODE,
    coef: float = ROWS_COEF,
    folds: int = typer.Option(2, help="Vectors for a row come from the other folds of its instruction."),
    max_new_tokens: int = ROWS_TOKENS,
    style: str = STYLE,
    batch_size: int = ROWS_BATCH,
    seed: int = typer.Option(0, help="Seed of the folds."),
    vectors_from: str = VECTORS_FROM,
    vectors_style: str = VECTORS_STYLE,
    nll: bool = NLL,
    min_perplexity: float = MIN_PPL,
    out: Path = out_option("runs/steer-format"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Stolfo's format experiment: no instruction, no instruction + steering, instruction, instruction + steering,
    per instruction type, judged by the IFEval checkers (strict and loose)."""
    from olmo_iv.runs.steer import FormatSettings, run_format

    con = console()
    settings = FormatSettings(model=model, data=None if data is None else str(data),
                              layers=int_list(layers, "layers"), mode=mode, coef=coef,
                              folds=folds, seed=seed, max_new_tokens=max_new_tokens, style=style,
                              batch_size=batch_size, vectors_from=vectors_from, vectors_style=vectors_style, nll=nll, min_perplexity=min_perplexity,
                              device=device, dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_format(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    from rich.table import Table

    table = Table(title="IFEval strict accuracy (%) by condition")
    table.add_column("instruction")
    conds = list(summary["overall"])
    for c in conds:
        table.add_column(c.replace("_", " "), justify="right")
    for iid, e in [*summary["by_instruction"].items(), ("overall", summary["overall"])]:
        table.add_row(iid, *(f"{100 * e[c]['strict']:.0f} (n={e[c]['n']})" for c in conds))
    con.print(table)
    con.print(f"files: {escape(str(out))}/ (results.csv, layers.csv, summary.json, conditions.png/.pdf, layers.png/.pdf)")


@steer_app.command("layers")
def layers_(
    model: str = ROWS_MODEL,
    data: Path = ROWS_DATA,
    layers: str = ROWS_LAYERS,
    mode: str = ROWS_MODE,
    coef: float = ROWS_COEF,
    n_valid: int = typer.Option(10, help="Held-out validation rows per instruction (the authors': 10); the others build its vector."),
    max_new_tokens: int = ROWS_TOKENS,
    style: str = STYLE,
    batch_size: int = ROWS_BATCH,
    seed: int = typer.Option(0, help="Seed of the validation draw."),
    vectors_from: str = VECTORS_FROM,
    vectors_style: str = VECTORS_STYLE,
    nll: bool = NLL,
    min_perplexity: float = MIN_PPL,
    out: Path = out_option("runs/steer-layers"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Stolfo's layer selection on its own: per instruction, loose accuracy of steering its held-out rows without
    the instruction at each candidate layer, with the degeneration filter; layers.csv, a figure, the chosen layers."""
    from rich.table import Table

    from olmo_iv.runs.steer import LayerSearchSettings, run_layers

    con = console()
    settings = LayerSearchSettings(model=model, data=None if data is None else str(data), layers=int_list(layers, "layers"),
                                   mode=mode, coef=coef, n_valid=n_valid, seed=seed, max_new_tokens=max_new_tokens,
                                   style=style, batch_size=batch_size, vectors_from=vectors_from,
                                   vectors_style=vectors_style, nll=nll, min_perplexity=min_perplexity, device=device, dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_layers(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    table = Table(title="Loose accuracy (%) without the instruction, after the degeneration filter")
    table.add_column("instruction")
    for c in ["none", *map(str, summary["candidates"])]:
        table.add_column(c, justify="right")
    table.add_column("chosen", justify="right")
    for iid, scores in summary["by_instruction"].items():
        table.add_row(iid, *(f"{100 * s['kept']:.0f}" for s in scores),
                      "none" if summary["chosen"][iid] == -1 else str(summary["chosen"][iid]))
    con.print(table)
    over = summary["overall_layer"]
    con.print(f"one layer for all instructions: {'none (no layer beats no steering)' if over == -1 else over}")
    con.print(f"files: {escape(str(out))}/ (layers.csv, summary.json, layers.png/.pdf, vectors/<instruction>/)")


@steer_app.command("keywords")
def keywords(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    task: str = typer.Option("include", help="include (keywords:existence) or exclude (keywords:forbidden_words, the inclusion vector subtracted)."),
    layer: int = typer.Option(None, help="Steered layer (default: two thirds of the way up)."),
    coef: float = typer.Option(40.0, help="Multiple of u added (subtracted for exclude); Stolfo: 40 include, 150 exclude."),
    n_pairs: int = typer.Option(20, help="Validation questions per word vector."),
    limit: int = typer.Option(None, help="Only the first N test prompts."),
    max_new_tokens: int = typer.Option(96, help="New tokens per response."),
    style: str = typer.Option("auto", help="Prompt style: auto (the chat template if any), chat, plain or qa."),
    out: Path = out_option("runs/steer-keywords"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Stolfo's word experiments: a vector per word, added (inclusion) or subtracted (exclusion) with no instruction
    in the prompt; strict IFEval accuracy with and without steering."""
    from olmo_iv.runs.steer import KeywordSettings, run_keywords

    con = console()
    settings = KeywordSettings(model=model, task=task, layer=layer, coef=coef, n_pairs=n_pairs, limit=limit,
                               max_new_tokens=max_new_tokens, style=style, device=device, dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_keywords(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    con.print(f"{task}, layer {summary['layer']}, n={summary['n']}: strict accuracy without steering "
              f"{100 * summary['strict']['no_instruction']:.1f}%, with {100 * summary['strict']['no_instruction+steer']:.1f}%")
    con.print(f"files: {escape(str(out))}/ (results.csv, summary.json)")


@steer_app.command("length")
def length(
    model: str = typer.Option("toy", "--model", "-m", help="Built-in name, local folder or hub id."),
    layer: int = typer.Option(None, help="Steered layer (default: two thirds of the way up)."),
    coef: float = typer.Option(20.0, help="Multiple of each level vector added (Stolfo: 20, the conciseness vector)."),
    levels: str = typer.Option("0,1,2,3,4", help="Level vectors tested, comma-separated: 0 extremely concise (the conciseness vector), 1 concise, 2 moderate, 3 verbose, 4 extremely verbose."),
    n_pairs: int = typer.Option(50, help="Base queries per level vector (the first ones)."),
    n_test: int = typer.Option(50, help="Held-out queries for the test (the last ones)."),
    max_sentences: int = typer.Option(5, help="Test 'at most N sentences' for N = 1..this."),
    max_new_tokens: int = typer.Option(128, help="New tokens per response."),
    style: str = typer.Option("auto", help="Prompt style: auto (the chat template if any), chat, plain or qa."),
    batch_size: int = typer.Option(16, help="Prompts per batch."),
    seed: int = typer.Option(0, help="Seed of the phrasing drawn per query and level."),
    out: Path = out_option("runs/steer-length"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Stolfo's length experiment: a vector per level of vague length phrasing, each added while the prompt asks
    for at most N sentences; strict accuracy and mean sentence and word counts per N."""
    from rich.table import Table

    from olmo_iv.runs.steer import LengthSettings, run_length

    con = console()
    settings = LengthSettings(model=model, layer=layer, coef=coef, levels=int_list(levels, "levels") or [],
                              n_pairs=n_pairs, n_test=n_test, max_sentences=max_sentences,
                              max_new_tokens=max_new_tokens, style=style, batch_size=batch_size, seed=seed,
                              device=device, dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_length(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    table = Table(title=f"At most N sentences, layer {summary['layer']}: strict % / mean sentences / mean words")
    table.add_column("N")
    conds = list(summary["by_vector"])
    for c in conds:
        table.add_column(c.replace("instruction+", "+ ").replace("_", " "), justify="right")
    for n in range(1, settings.max_sentences + 1):
        table.add_row(str(n), *(f"{100 * e['strict']:.0f} / {e['mean_sentences']:.1f} / {e['mean_words']:.0f}"
                                for e in (summary["by_condition"][f"{n}/{c}"] for c in conds)))
    con.print(table)
    con.print(f"files: {escape(str(out))}/ (results.csv, summary.json, length.png/.pdf, vectors/level*/)")


@steer_app.command("compose")
def compose(
    model: str = ROWS_MODEL,
    data: Path = ROWS_DATA,
    layers: str = ROWS_LAYERS,
    mode: str = ROWS_MODE,
    coef: float = ROWS_COEF,
    folds: int = typer.Option(2, help="Format vectors for a row come from the other folds of its instruction."),
    length_level: int = typer.Option(0, help="The length vector: 0 extremely concise (the authors' conciseness vector) .. 4 extremely verbose."),
    length_layer: int = typer.Option(None, help="Layer of the length vector (default: two thirds of the way up)."),
    length_coef: float = typer.Option(20.0, help="Multiple of the unit length vector added (the authors: 20)."),
    n_pairs: int = typer.Option(50, help="Instruction-stripped IFEval queries that build the length vector (the first ones)."),
    max_sentences: int = typer.Option(5, help="Each row asks for at most N sentences, N drawn from 1..this."),
    length_instruction: bool = typer.Option(True, help="Append 'Answer using at most N sentences.' to every prompt (the authors' default)."),
    max_new_tokens: int = ROWS_TOKENS,
    style: str = STYLE,
    batch_size: int = ROWS_BATCH,
    seed: int = typer.Option(0, help="Seed of the folds, of N per row and of the length phrasings."),
    vectors_from: str = VECTORS_FROM,
    vectors_style: str = VECTORS_STYLE,
    nll: bool = NLL,
    min_perplexity: float = MIN_PPL,
    out: Path = out_option("runs/steer-compose"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Stolfo's composition: format and length vectors alone and together, with and without the format instruction,
    every prompt asking for at most N sentences; format, length and both accuracy per condition."""
    from rich.table import Table

    from olmo_iv.runs.steer import ComposeSettings, run_compose

    con = console()
    settings = ComposeSettings(model=model, data=None if data is None else str(data),
                               layers=int_list(layers, "layers"), mode=mode, coef=coef, folds=folds,
                               length_level=length_level, length_layer=length_layer, length_coef=length_coef,
                               n_pairs=n_pairs, max_sentences=max_sentences, length_instruction=length_instruction,
                               seed=seed, max_new_tokens=max_new_tokens, style=style, batch_size=batch_size,
                               vectors_from=vectors_from, vectors_style=vectors_style, nll=nll, min_perplexity=min_perplexity, device=device,
                               dtype=dtype)
    with progress_bar(con) as bar:
        summary = run_compose(settings, out, overwrite=overwrite, progress=bar_callback(bar))
    table = Table(title=f"Composition (length vector at layer {summary['length_layer']}): accuracy % and mean length")
    for name in ("condition", "format strict", "format loose", "length", "both", "sentences", "words", "n"):
        table.add_column(name, justify="left" if name == "condition" else "right")
    for c, e in summary["overall"].items():
        table.add_row(c.replace("_", " "), *(f"{100 * e[k]:.0f}" for k in ("format_strict", "format_loose", "length",
                                                                          "both")),
                      f"{e['mean_sentences']:.2f}", f"{e['mean_words']:.1f}", str(e["n"]))
    con.print(table)
    con.print(f"files: {escape(str(out))}/ (results.csv, layers.csv, summary.json, compose.png/.pdf, vectors/length/)")
