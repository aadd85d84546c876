"""The paper's task suite: data, prompts, and the token positions every experiment patches and reads.

    from olmo_iv import tasks
    ss = tasks.samples("adjectives/adj_comp", mode="reference", n=100)   # the first 100 rows, as the paper
    enc = tasks.encode(ss, model.tokenizer)                             # ids, T_inst, answer token
    enc[0].clean_ids[enc[0].t_inst]                                     # the instruction's last token

Two prompt modes, recorded in every Sample (docs/tasks.md):
  reference  what the authors' code runs: target = the bare query, patched at its first token; answer token =
             first token of the label without a leading space; no BOS.
  faithful   what the paper's text describes: target = filler token + "{Field}: {query}. Answer:", patched at
             the filler; answer token = first token of " " + label.
The BIG-bench prompts of the reference mode are rebuilt from the raw BIG-bench `input` fields in the form the
`tasksource/bigbench` conversion gives them, then rewritten with the reference's literal replacements.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError

MODES = ("reference", "faithful")
DATA_DIR = Path(__file__).parent.parent / "data"
DEFAULT_FILLER = "<|endoftext|>"
TASKS_ENV = "OLMO_IV_TASKS"
"""Environment variable: task files (JSON, os.pathsep-separated) registered on first use of the registry."""


@dataclass(frozen=True)
class Task:
    """A registry entry: where the rows come from and how they become prompts."""

    name: str
    """Canonical name, "group/subtask" ("adjectives/adj_comp", "bigbench/snarks")."""
    instruction: str
    """The instruction (paper Table 1), without a trailing space."""
    field: str
    """Field name before the query ("Adjective"); "" for BIG-bench, whose queries carry their own prefixes."""
    kind: str
    """"csv" or "bigbench"."""
    options: tuple[str, ...]
    """Answer options for option-based instructional accuracy; () when open-ended."""
    path: str = ""
    """Data file: relative to olmo_iv/data for built-in tasks, absolute for user tasks."""
    query_column: str = "query"
    """CSV column holding the query."""
    answer_column: str = ""
    """CSV column holding the gold label."""
    rephrased: str = ""
    """File of the 200 rephrased instructions (relative to olmo_iv/data); "" when there is none."""

    @property
    def data_path(self) -> Path:
        return DATA_DIR / self.path if not Path(self.path).is_absolute() else Path(self.path)


@dataclass(frozen=True)
class Sample:
    """One prompt triple of a task, as strings. Build with `samples()`."""

    task: str
    index: int
    """Row in the source file (0-based, header excluded)."""
    mode: str
    instruction: str
    query: str
    """The query: the raw CSV value, or for BIG-bench the rewritten input without "Answer:"."""
    answer: str
    """The gold label string."""
    clean: str
    """Full prompt: instruction + " " + prompt."""
    source: str
    """Source-run prompt: the instruction alone (its states at T_inst equal the clean run's, by causality)."""
    target: str
    """Target-run text: the bare query (reference) or the prompt (faithful; the filler is prepended at encode)."""
    prompt: str = ""
    """The query in its prompt form, ending in "Answer:"."""


@dataclass(frozen=True)
class Encoded:
    """A sample tokenized, with the positions patching and path tracing use."""

    sample: Sample
    clean_ids: tuple[int, ...]
    source_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    """Faithful mode: target_ids[0] is the filler."""
    t_inst: int
    """Index of the instruction's last token, in clean_ids and source_ids."""
    sentence_ends: tuple[int, ...]
    """Token indices of every sentence end inside the instruction; the last one is t_inst."""
    target_pos: int
    """Patch position in target_ids: 0 (reference: the query's first token; faithful: the filler)."""
    answer_id: int
    """First token of the label: without a leading space (reference), with one (faithful)."""
    answer_n_tokens: int
    """How many tokens the label spans in that form; the metric uses only the first."""
    answer_ids: tuple[int, ...] = ()
    """All tokens of the label in that form."""
    filler_id: int | None = None
    """The filler token (faithful mode), else None."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready record (what `olmo-iv tasks --json` prints)."""
        s = self.sample
        return {"task": s.task, "mode": s.mode, "index": s.index, "instruction": s.instruction,
                "query": s.query, "clean": s.clean, "source": s.source, "target": s.target, "answer": s.answer,
                "t_inst": self.t_inst, "sentence_ends": list(self.sentence_ends), "target_pos": self.target_pos,
                "answer_token_id": self.answer_id, "answer_n_tokens": self.answer_n_tokens,
                "answer_ids": list(self.answer_ids), "filler_id": self.filler_id,
                "clean_ids": list(self.clean_ids), "source_ids": list(self.source_ids),
                "target_ids": list(self.target_ids)}


# ----------------------------------------------------------------------------------------------------------
# Registry

_COLORS = ("red", "orange", "yellow", "golden", "green", "blue", "purple", "pink", "brown", "black", "white",
           "gray", "silver", "tan")
_BUILTIN: dict[str, Task] = {
    t.name: t
    for t in [
        Task("adjectives/adj_comp", "Given an adjective, state its comparative form.", "Adjective", "csv", (),
             "ukplab/adjectives.csv", "query", "adj_comp", "ukplab/varied_instructions/adj_comp_rephrased.csv"),
        Task("adjectives/adj_ant", "Given an adjective, state its antonym.", "Adjective", "csv", (),
             "ukplab/adjectives.csv", "query", "adj_ant", "ukplab/varied_instructions/adj_ant_rephrased.csv"),
        Task("animals/anim_color", "Given an animal, state its most typical associated color.", "Animal", "csv",
             _COLORS, "ukplab/animals.csv", "query", "anim_color",
             "ukplab/varied_instructions/anim_color_rephrased.csv"),
        Task("animals/can_fly", "Given an animal, state whether or not it can fly. Print 'yes' or 'no'.", "Animal",
             "csv", ("yes", "no"), "ukplab/animals.csv", "query", "can_fly",
             "ukplab/varied_instructions/can_fly_rephrased.csv"),
        Task("bigbench/metaphor_boolean", "For a given metaphorical sentence, identify if the second sentence is "
             "the correct interpretation. Print Y for yes and N for no.", "", "bigbench", ("Y", "N"),
             "bigbench/metaphor_boolean.json", rephrased="ukplab/varied_instructions/metaphor_boolean_rephrased.csv"),
        Task("bigbench/implicatures", "Predict whether Speaker 2's answer to Speaker 1 counts as a yes or as a no. "
             "Print Y for yes and N for no.", "", "bigbench", ("Y", "N"), "bigbench/implicatures.json",
             rephrased="ukplab/varied_instructions/implicatures_rephrased.csv"),
        Task("bigbench/object_counting", "For the given sentence, count the number of objects listed and print it "
             "as a digit.", "", "bigbench", tuple(str(i) for i in range(21)), "bigbench/object_counting.json",
             rephrased="ukplab/varied_instructions/object_counting_rephrased.csv"),
        Task("bigbench/snarks", "Choose which of the two statements is sarcastic and print the corresponding "
             "letter:", "", "bigbench", ("A", "B"), "bigbench/snarks.json",
             rephrased="ukplab/varied_instructions/snarks_rephrased.csv"),
    ]
}
_USER: dict[str, Task] = {}
_env_loaded: list[str] = []  # task files already read from $OLMO_IV_TASKS


def _registry() -> dict[str, Task]:
    for path in filter(None, os.environ.get(TASKS_ENV, "").split(os.pathsep)):
        if path not in _env_loaded:
            register_tasks_file(path)  # a bad file raises on every use, never skipped silently
            _env_loaded.append(path)
    return {**_BUILTIN, **_USER}


def list_tasks() -> list[str]:
    """Names of every registered task: the paper's 8, then user tasks in registration order."""
    return list(_registry())


def get_task(name: str) -> Task:
    """The task called `name`; a unique subtask name ("adj_comp", "snarks") works too."""
    reg = _registry()
    if name in reg:
        return reg[name]
    by_short = [t for n, t in reg.items() if n.rsplit("/", 1)[-1] == name]
    if len(by_short) == 1:
        return by_short[0]
    raise OlmoIVError(f"unknown task {name!r}; known tasks: {', '.join(reg)}")


def register_task(name: str, csv_path: str | os.PathLike, *, query_column: str, answer_column: str,
                  instruction: str, field: str = "Input", options=()) -> Task:
    """Add a contrastive task from a CSV file (one row per sample). The file is read and checked now.

    Prompts follow the CSV tasks of the paper: "{instruction} {field}: {query}. Answer:". Re-registering a
    user task replaces it; the paper's tasks cannot be replaced.
    """
    if name in _BUILTIN:
        raise OlmoIVError(f"{name!r} is a built-in task; register yours under another name")
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise OlmoIVError(f"task name {name!r} must be non-empty and contain no whitespace")
    if not instruction.strip():
        raise OlmoIVError(f"task {name!r}: the instruction is empty")
    if not field.strip():
        raise OlmoIVError(f"task {name!r}: the field name is empty (it is the label before the query)")
    path = Path(csv_path).expanduser().resolve()
    task = Task(name, instruction.strip(), field.strip(), "csv", tuple(str(o) for o in options), str(path),
                query_column, answer_column)
    _rows.cache_clear()  # the file may have changed since an earlier registration
    _rows(task)  # fail now, before the task is registered
    _USER[name] = task
    return task


def register_tasks_file(path: str | os.PathLike) -> list[Task]:
    """Register the tasks of a JSON file: a list of objects with the keys of `register_task`
    (name, csv, query_column, answer_column, instruction, optional field and options). Relative CSV paths
    are read from the JSON file's folder."""
    path = Path(path).expanduser()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise OlmoIVError(f"task file {path} is not UTF-8 text: save it as UTF-8") from None
    except FileNotFoundError as err:
        raise OlmoIVError(f"task file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise OlmoIVError(f"task file {path} is not valid JSON: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise OlmoIVError(f"task file {path} must hold a JSON list of objects")
    out = []
    need = ("name", "csv", "query_column", "answer_column", "instruction")
    for i, e in enumerate(entries):
        missing = [k for k in need if k not in e]
        unknown = sorted(set(e) - {*need, "field", "options"})
        if missing or unknown:
            raise OlmoIVError(f"task file {path}, entry {i}: missing keys {missing}, unknown keys {unknown}")
        out.append(register_task(e["name"], path.parent / e["csv"], query_column=e["query_column"],
                                 answer_column=e["answer_column"], instruction=e["instruction"],
                                 field=e.get("field", "Input"), options=tuple(e.get("options", ()))))
    return out


# ----------------------------------------------------------------------------------------------------------
# Rows: (index, query or raw BIG-bench input, gold label)


@cache
def _rows(task: Task) -> tuple[tuple[int, str, str], ...]:
    path = task.data_path
    if not path.is_file():
        raise OlmoIVError(f"task {task.name!r}: data file {path} does not exist")
    try:
        rows = _csv_rows(task, path) if task.kind == "csv" else _bigbench_rows(task, path)
    except UnicodeDecodeError as err:
        raise OlmoIVError(f"task {task.name!r}: {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "save it as UTF-8") from None
    if not rows:
        raise OlmoIVError(f"task {task.name!r}: {path} holds no samples")
    return rows


def _csv_rows(task: Task, path: Path) -> tuple[tuple[int, str, str], ...]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (task.query_column, task.answer_column) if c not in header]
        if missing:
            raise OlmoIVError(
                f"task {task.name!r}: {path} has no column(s) {missing}; its columns are {header}"
            )
        out = []
        for i, row in enumerate(reader):
            q, a = (row.get(task.query_column) or "").strip(), (row.get(task.answer_column) or "").strip()
            if not q or not a:
                raise OlmoIVError(f"task {task.name!r}: {path} row {i} (line {reader.line_num}) has an empty "
                                  f"{task.query_column if not q else task.answer_column!r} cell")
            out.append((i, q, a))
    return tuple(out)


# Gold label of a BIG-bench multiple-choice example = the option with the top score, named as the
# reference names it (Y/N for yes/no and True/False, A/B for (a)/(b)).
_BB_LABELS = {"implicatures": {"yes": "Y", "no": "N"}, "metaphor_boolean": {"True": "Y", "False": "N"},
              "snarks": {"(a)": "A", "(b)": "B"}}


def _bigbench_rows(task: Task, path: Path) -> tuple[tuple[int, str, str], ...]:
    short = task.name.rsplit("/", 1)[-1]
    examples = json.loads(path.read_text())["examples"]
    out = []
    for i, ex in enumerate(examples):
        if short == "object_counting":
            label = str(int(ex["target"][1]))  # targets are [word, digit]; the reference uses the digit
        else:
            scores = ex["target_scores"]
            best = max(scores, key=scores.get)
            if best not in _BB_LABELS[short] or sorted(scores.values()).count(scores[best]) != 1:
                raise OlmoIVError(f"task {task.name!r}: example {i} has unexpected target_scores {scores}")
            label = _BB_LABELS[short][best]
        out.append((i, ex["input"], label))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# BIG-bench prompts. The reference read `inputs` from tasksource/bigbench, i.e. BIG-bench's JSON formatting:
# task_prefix + example_input_prefix ("\nQ: " unless the task sets one) + input + appended choices
# ("\n  choice: ..." when append_choices_to_input) + example_output_prefix ("\nA: "), whitespace-stripped.
# It then rewrote them with literal replacements (reference doc §2.3), reproduced here.

_METAPHOR_PREFIX = ("The essence of the task: Given a metaphoric sentence, identify if the second sentence is the "
                    "correct paraphrase of the first.")
_BB_FORMAT: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    # task: (text before input, text after input, reference rewrite rules in order)
    "implicatures": ("Does Speaker 2's answer mean yes or no? \n\nQ: ", " \nA:",
                     (("Does Speaker 2's answer mean yes or no? \n\nQ: ", ""), (" \nA:", " Answer:"))),
    # BIG-bench permutes the two choices per example with its own RNG; we write them in the order the
    # reference's rewrite expects (for the examples where tasksource has "False" first, the reference left
    # the choice lines in the prompt).
    "metaphor_boolean": (_METAPHOR_PREFIX + "\nQ: ", "\n  choice: True\n  choice: False\nA:",
                         ((_METAPHOR_PREFIX + "\nQ: ", "Sentence 1: "), (" <-->  ", " Sentence 2: "),
                          ("\n  choice: True\n  choice: False\nA:", " Answer:"))),
    "object_counting": ("Q: ", "\nA:", (("Q: ", "Sentence: "), ("\nA:", " Answer:"))),
    "snarks": ("Q: ", "\nA:", (("Q: Which statement is sarcastic? ", ""), ("\nA:", " Answer:"), ("(a)", "A: "),
                               ("(b)", "B: "))),
}


class RewriteWarning(UserWarning):
    """A reference rewrite rule matched nothing in a prompt (the reference code leaves such text in place).
    Turn it into an error with `warnings.simplefilter("error", RewriteWarning)`."""


def tasksource_inputs(task: str, raw_input: str) -> str:
    """What tasksource/bigbench's `inputs` string looks like for a raw BIG-bench `input` (reconstructed)."""
    before, after, _ = _BB_FORMAT[task]
    return before + raw_input + after


def reference_rewrite(task: str, inputs: str) -> tuple[str, list[tuple[str, str]]]:
    """Apply the reference's replacements to a tasksource `inputs` string -> (prompt, rules that did nothing)."""
    noop = []
    for old, new in _BB_FORMAT[task][2]:
        if old not in inputs:
            noop.append((old, new))
        inputs = inputs.replace(old, new)
    return inputs, noop


def _faithful_bigbench_query(task: str, raw: str) -> str:
    """The query as the paper describes it: the reference's field prefixes, single-spaced, choice lines gone."""
    if task == "metaphor_boolean":
        first, sep, second = raw.partition("<-->")
        if not sep:
            raise OlmoIVError(f"bigbench/metaphor_boolean: input without '<-->': {raw!r}")
        q = f"Sentence 1: {first} Sentence 2: {second}"
    elif task == "object_counting":
        q = f"Sentence: {raw}"
    elif task == "snarks":
        q = re.sub(
            r"\(([ab])\)",
            lambda m: f"{m.group(1).upper()}:",
            raw.removeprefix("Which statement is sarcastic?"),
        )
    else:
        q = raw
    return " ".join(q.split())


# ----------------------------------------------------------------------------------------------------------
# Samples


def n_samples(name: str) -> int:
    """How many rows the task's data file holds."""
    return len(_rows(get_task(name)))


def samples(
    name: str, *, mode: str = "reference", n: int | None = None, seed: int | None = None
) -> list[Sample]:
    """The task's samples as strings. Default: every row; `n`: the first n rows in file order (the paper's
    choice); `n` and `seed`: a seeded random subset of n rows, returned in file order."""
    if mode not in MODES:
        raise OlmoIVError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    task = get_task(name)
    rows = _rows(task)
    if n is None:
        if seed is not None:
            raise OlmoIVError("a seed selects a random subset of n samples: give n as well")
        chosen = rows
    else:
        if n < 1 or n > len(rows):
            raise OlmoIVError(
                f"task {task.name!r} has {len(rows)} samples; n={n} is out of range 1..{len(rows)}"
            )
        if seed is None:
            chosen = rows[:n]
        else:
            import numpy as np

            pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
            chosen = tuple(rows[i] for i in sorted(pick.tolist()))
    out = [_make_sample(task, mode, *row) for row in chosen]
    if task.kind == "bigbench" and mode == "reference":
        _warn_noops(task, chosen)
    return out


def _make_sample(task: Task, mode: str, index: int, query: str, answer: str) -> Sample:
    if task.kind == "csv":
        prompt = f"{task.field}: {query}. Answer:"
    else:
        short = task.name.rsplit("/", 1)[-1]
        if mode == "reference":
            prompt, _ = reference_rewrite(short, tasksource_inputs(short, query))
            if not prompt.endswith(" Answer:"):
                raise OlmoIVError(f"{task.name} sample {index}: the rewritten prompt does not end in ' Answer:': "
                                  f"{prompt!r}")
            query = prompt.removesuffix("Answer:").rstrip()
        else:
            query = _faithful_bigbench_query(short, query)
            prompt = f"{query} Answer:"
    target = query if mode == "reference" else prompt
    return Sample(task.name, index, mode, task.instruction, query, answer,
                  clean=f"{task.instruction} {prompt}", source=task.instruction, target=target, prompt=prompt)


def _warn_noops(task: Task, rows) -> None:
    short = task.name.rsplit("/", 1)[-1]
    hits: dict[str, list[int]] = {}
    for index, raw, _ in rows:
        for old, _new in reference_rewrite(short, tasksource_inputs(short, raw))[1]:
            hits.setdefault(old, []).append(index)
    for old, idx in hits.items():
        shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
        warnings.warn(f"{task.name}: the reference replacement of {old!r} matches nothing in {len(idx)} "
                      f"sample(s) ({shown}); as in the reference code, that text stays in the prompt",
                      RewriteWarning, stacklevel=3)


def rephrasings(name: str) -> list[str]:
    """The 200 rephrased instructions of a paper task (probe / LDA), in file order."""
    task = get_task(name)
    if not task.rephrased:
        raise OlmoIVError(
            f"task {task.name!r} has no rephrased instructions (only the paper's 8 tasks ship them)"
        )
    with open(DATA_DIR / task.rephrased, newline="", encoding="utf-8") as f:
        out = [row["instruction"].strip() for row in csv.DictReader(f)]
    if len(out) != 200 or not all(out):
        raise OlmoIVError(
            f"{DATA_DIR / task.rephrased}: expected 200 non-empty instructions, found {len(out)}"
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokens


def adds_special_tokens(tokenizer) -> list[int]:
    """Ids the tokenizer's post-processor adds around a text (a BOS, an EOS), [] when none."""
    with_specials = tokenizer.encode("x", add_special_tokens=True).ids
    plain = tokenizer.encode("x", add_special_tokens=False).ids
    return [i for i in with_specials if i not in plain] if with_specials != plain else []


def filler_id(tokenizer, filler: str | int | None = None) -> int:
    """Id of the faithful mode's filler token: a token string (default "<|endoftext|>") or an id."""
    filler = DEFAULT_FILLER if filler is None else filler
    if isinstance(filler, int) and not isinstance(filler, bool):
        if tokenizer.id_to_token(filler) is None:
            raise OlmoIVError(f"filler id {filler} is not in the tokenizer (vocabulary of "
                              f"{tokenizer.get_vocab_size(with_added_tokens=True)} tokens)")
        return filler
    tid = tokenizer.token_to_id(str(filler))
    if tid is None:
        raise OlmoIVError(f"the tokenizer has no token {filler!r} to use as the filler; pass filler= another "
                          f"token string or an id (e.g. the tokenizer's EOS or pad token)")
    return tid


def encode(samples: list[Sample], tokenizer, *, filler: str | int | None = None) -> list[Encoded]:
    """Tokenize samples (`tokenizers.Tokenizer`, never adding special tokens) and locate T_inst, the sentence
    ends of the instruction, the patch position and the answer token.

    Raises when the tokenized instruction is not a prefix of the tokenized clean prompt (T_inst would not be
    the same token in both runs), and in reference mode when the tokenizer would add a BOS."""
    if not samples:
        raise OlmoIVError("no samples to encode")
    modes = {s.mode for s in samples}
    if unknown := modes - set(MODES):
        raise OlmoIVError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if "reference" in modes and (extra := adds_special_tokens(tokenizer)):
        raise OlmoIVError(
            f"this tokenizer's post-processor adds special token(s) {extra} "
            f"({[tokenizer.id_to_token(i) for i in extra]}); the reference mode reproduces runs without a BOS. "
            "Use a tokenizer without that post-processor (OLMo-2's adds nothing), or mode='faithful'."
        )
    if filler is not None and "faithful" not in modes:
        raise OlmoIVError("a filler is only used by the faithful mode; these samples are all 'reference'")
    fid = filler_id(tokenizer, filler) if "faithful" in modes else None

    def ids(texts: list[str]) -> list:
        return tokenizer.encode_batch(texts, add_special_tokens=False)

    cleans = ids([s.clean for s in samples])
    targets = ids([s.target for s in samples])
    labels = ids([s.answer if s.mode == "reference" else " " + s.answer for s in samples])
    uniq = sorted({s.source for s in samples})
    sources = dict(zip(uniq, ids(uniq), strict=True))

    out = []
    for s, clean, target, label in zip(samples, cleans, targets, labels, strict=True):
        src = sources[s.source]
        src_ids, clean_ids = tuple(src.ids), tuple(clean.ids)
        where = f"{s.task} sample {s.index} ({s.mode})"
        if not src_ids:
            raise OlmoIVError(f"{where}: the instruction tokenizes to nothing")
        if clean_ids[: len(src_ids)] != src_ids:
            k = next(
                (i for i, (a, b) in enumerate(zip(src_ids, clean_ids, strict=False)) if a != b),
                len(clean_ids),
            )
            raise OlmoIVError(
                f"{where}: the tokenized instruction is not a prefix of the tokenized prompt (they differ at "
                f"token {k}: instruction {tokenizer.decode(list(src_ids[k : k + 2]))!r} vs prompt "
                f"{tokenizer.decode(list(clean_ids[k : k + 2]))!r}), so T_inst is not one token of the prompt. "
                f"Prompt: {s.clean!r}"
            )
        label_ids = list(label.ids)
        if s.mode == "faithful":
            # The space before a label can be a token of its own (cl100k never joins " " with a digit): the
            # answer is then the first token that carries text, not the space every label shares.
            while label_ids and not tokenizer.decode([label_ids[0]]).strip():
                label_ids.pop(0)
        if not label_ids:
            raise OlmoIVError(f"{where}: the label {s.answer!r} tokenizes to nothing")
        t_inst = len(src_ids) - 1
        target_ids = (fid, *target.ids) if s.mode == "faithful" else tuple(target.ids)
        if not target_ids:
            raise OlmoIVError(f"{where}: the target {s.target!r} tokenizes to nothing")
        out.append(Encoded(s, clean_ids, src_ids, target_ids, t_inst, _sentence_ends(s.source, src, t_inst),
                           target_pos=0, answer_id=label_ids[0], answer_n_tokens=len(label_ids),
                           answer_ids=tuple(label_ids), filler_id=fid if s.mode == "faithful" else None))
    return out


_SENTENCE_END = re.compile(r"[.!?]+[\"'’”)\]]*(?=\s|$)")


def _sentence_ends(text: str, enc, t_inst: int) -> tuple[int, ...]:
    """Tokens holding a sentence-final mark ("." "!" "?", possibly with closing quotes), plus T_inst."""
    ends = set()
    for m in _SENTENCE_END.finditer(text):
        tok = enc.char_to_token(m.start())  # the mark itself (a quote after it may be merged into one token)
        if tok is not None:
            ends.add(tok)
    ends = sorted(e for e in ends if e < t_inst)
    return (*ends, t_inst)


def answer_report(encoded: list[Encoded]) -> dict[str, Any]:
    """How many labels span several tokens (the metric uses the first token, as the paper does)."""
    multi = [e for e in encoded if e.answer_n_tokens > 1]
    return {"n_samples": len(encoded), "n_multi_token": len(multi),
            "multi_token": sorted({e.sample.answer for e in multi})}
