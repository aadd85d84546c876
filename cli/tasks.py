"""`olmo-iv tasks`: list the tasks, or show a task's prompts, tokens, T_inst and answer token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from olmo_iv.cli.app import MODE_HELP, app, console
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from olmo_iv import tasks as T
from olmo_iv.errors import OlmoIVError


def _tokenizer(model: str | None, tokenizer_dir: Path | None):
    """The tokenizer of --tokenizer DIR, or of --model (default "toy")."""
    from olmo_iv.loading import load_tokenizer, resolve

    if model is not None and tokenizer_dir is not None:
        raise OlmoIVError("give --model or --tokenizer, not both")
    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise OlmoIVError(
                f"--tokenizer {tokenizer_dir}: not a directory (pass the folder holding tokenizer.json)"
            )
        folder, what = tokenizer_dir, f"--tokenizer {tokenizer_dir}"
    else:
        # The model's folder gives model.tokenizer without reading the weights (olmo_iv.load reads the same file).
        folder, what = resolve(model or "toy"), f"model {model or 'toy'!r}"
    tok = load_tokenizer(folder)
    if tok is None:
        raise OlmoIVError(f"{what}: no tokenizer.json in {folder}")
    return tok


def _print_json(objs: list[dict]) -> None:
    """A JSON list, one object per line (easy to read and to grep)."""
    sys.stdout.write("[\n" + ",\n".join(json.dumps(o, ensure_ascii=False) for o in objs) + "\n]\n")


def _filler(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def _tok_text(tokenizer, i: int) -> str:
    return (
        escape(tokenizer.decode([i], skip_special_tokens=False).replace(" ", "␣").replace("\n", "⏎")) or "∅"
    )


def _strip(tokenizer, ids, marks: dict[int, str]) -> str:
    """Tokens as `[i]text` separated by thin bars, with some positions styled."""
    parts = []
    for i, t in enumerate(ids):
        cell = f"[dim]{i}:[/]{_tok_text(tokenizer, t)}"
        parts.append(f"[{marks[i]}]{cell}[/]" if i in marks else cell)
    return " │ ".join(parts)


def _show(console: Console, tokenizer, enc: T.Encoded) -> None:
    s = enc.sample
    console.rule(f"[bold]{escape(s.task)}[/] sample {s.index} · {s.mode}")
    for label, text in (("clean", s.clean), ("source", s.source), ("target", s.target)):
        console.print(f"[bold]{label:>7}[/] {escape(repr(text))}", soft_wrap=True)
    marks = {i: "underline yellow" for i in enc.sentence_ends}
    marks[enc.t_inst] = "bold reverse green"
    console.print(f"[bold]{'tokens':>7}[/] {_strip(tokenizer, enc.clean_ids, marks)}", soft_wrap=True)
    console.print(f"[bold]{'target':>7}[/] {_strip(tokenizer, enc.target_ids, {enc.target_pos: 'bold reverse cyan'})}",
                  soft_wrap=True)
    more = (
        f" [yellow](label spans {enc.answer_n_tokens} tokens; the metric uses the first)[/]"
        if enc.answer_n_tokens > 1
        else ""
    )
    console.print(
        f"[bold]{'answer':>7}[/] {escape(repr(s.answer))} → token {enc.answer_id} "
        f"[bold reverse magenta]{_tok_text(tokenizer, enc.answer_id)}[/]{more}   "
        f"T_inst={enc.t_inst} sentence ends={list(enc.sentence_ends)} patch at target[{enc.target_pos}]",
        soft_wrap=True,
    )


@app.command("tasks")
def tasks_command(
    name: str | None = typer.Argument(None, help="Task to show (e.g. adjectives/adj_comp); none: list them."),
    model: str | None = typer.Option(None, "--model", help="Use this model's tokenizer (default: toy)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Folder holding a tokenizer.json."),
    mode: str = typer.Option("faithful", "--mode", help=MODE_HELP),
    n: int = typer.Option(5, "--samples", "-n", help="How many samples to show (the first N rows)."),
    seed: int | None = typer.Option(None, "--seed", help="Show a seeded random subset of N rows instead."),
    filler: str | None = typer.Option(None, "--filler", help="Faithful mode's filler: a token or an id."),
    tasks_file: Path | None = typer.Option(None, "--tasks-file", help="JSON file of your own CSV tasks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a rich view."),
) -> None:
    """List the tasks, or show a task's prompts with their tokens, T_inst and answer token."""
    if tasks_file is not None:
        T.register_tasks_file(tasks_file)
    if name is None:
        rows = []
        for tname in T.list_tasks():
            t = T.get_task(tname)
            rows.append({"task": t.name, "kind": t.kind, "samples": T.n_samples(tname), "field": t.field,
                         "instruction": t.instruction, "options": list(t.options)})
        if as_json:
            _print_json(rows)
            return
        table = Table(title="olmo-iv tasks")
        table.add_column("task", no_wrap=True)
        table.add_column("rows", justify="right")
        table.add_column("options")
        table.add_column("instruction", ratio=1)
        for r in rows:
            opts = (
                ", ".join(r["options"])
                if len(r["options"]) <= 4
                else f"{r['options'][0]} … {r['options'][-1]}"
            )
            table.add_row(r["task"], str(r["samples"]), escape(opts), escape(r["instruction"]))
        console().print(table)
        return

    chosen = T.samples(
        name, mode=mode, n=min(n, T.n_samples(name)), seed=seed
    )  # bad names fail before loading
    tok = _tokenizer(model, tokenizer)
    encoded = T.encode(chosen, tok, filler=_filler(filler))
    if as_json:
        _print_json([e.to_dict() for e in encoded])
        return
    con = console()
    for e in encoded:
        _show(con, tok, e)
    rep = T.answer_report(encoded)
    con.rule()
    con.print(f"{rep['n_multi_token']} of {rep['n_samples']} labels span several tokens"
                  + (f" ({escape(', '.join(rep['multi_token'][:8]))}{', …' if len(rep['multi_token']) > 8 else ''})"
                     if rep["multi_token"] else "") + "; the metric uses the first token, as the paper does.")
