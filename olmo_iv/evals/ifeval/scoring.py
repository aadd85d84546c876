"""Strict and loose IFEval scoring, the official file formats, and the summary.

Inputs are IFEval's `input_data.jsonl` rows (key, prompt, instruction_id_list, kwargs); responses are either a list in
the inputs' order (`score_responses`, the seam for generating with a model) or a JSONL file of
`{"prompt": ..., "response": ...}` rows matched to the inputs by prompt text, as the official code does
(`score_file`). Every function returns data; `olmo_iv.runs.ifeval` writes the run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError
from olmo_iv.evals.ifeval.checkers import INSTRUCTIONS, validate_kwargs

MODES = ("strict", "loose")


@dataclass(frozen=True)
class InputExample:
    """One IFEval prompt with its instructions; `kwargs` are validated, one dict per instruction."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ScoredRow:
    """The verdicts on one response: one bool per instruction, strict and loose."""

    key: int
    prompt: str
    response: str
    instruction_id_list: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    def official(self, mode: str) -> dict[str, Any]:
        """The row as the official `eval_results_{mode}.jsonl` writes it (same fields, same order)."""
        follow = list(self.strict if mode == "strict" else self.loose)
        return {"instruction_id_list": list(self.instruction_id_list), "prompt": self.prompt,
                "response": self.response, "follow_all_instructions": all(follow),
                "follow_instruction_list": follow}


# --- reading ------------------------------------------------------------------------------------------------------
def default_input_data() -> Path:
    """The vendored IFEval input_data.jsonl (541 prompts, Apache-2.0; see olmo_iv/data/ifeval/)."""
    return Path(str(resources.files("olmo_iv") / "data" / "ifeval" / "input_data.jsonl"))


def read_jsonl(path: str | os.PathLike, param: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value) for each non-blank line; errors name the parameter `param`."""
    path = Path(path)
    if not path.is_file():
        raise OlmoIVError(f"{param}={str(path)!r}: no such file")
    try:
        # split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON allows raw in strings
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise OlmoIVError(f"{param}={str(path)!r} is not UTF-8 (byte {err.start}); give a UTF-8 JSONL file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise OlmoIVError(f"{param}={str(path)!r} is not JSONL: line {number}: {err.msg} (one JSON object per "
                              "line)") from None
    return rows


def parse_inputs(rows: Sequence[tuple[int, Any]], where: str = "input_data=") -> list[InputExample]:
    """Validate IFEval input rows (key, prompt, instruction_id_list, kwargs), as read by `read_jsonl`."""
    examples = []
    for number, row in rows:
        at = f"{where} line {number}:"
        if not isinstance(row, dict):
            raise OlmoIVError(f"{at} expected a JSON object, got {type(row).__name__}")
        missing = [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in row]
        if missing:
            raise OlmoIVError(f"{at} missing field(s) {missing}")
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not isinstance(row["prompt"], str):
            raise OlmoIVError(f"{at} 'prompt' must be a string")
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise OlmoIVError(f"{at} 'instruction_id_list' and 'kwargs' must be lists of the same length")
        checked = tuple(validate_kwargs(i, k, where=f"{at} key {row['key']}:") for i, k in zip(ids, kwargs))
        examples.append(InputExample(row["key"], row["prompt"], tuple(ids), checked))
    return examples


def load_input_data(input_data: str | os.PathLike | None = None) -> list[InputExample]:
    """IFEval inputs from a JSONL file; None reads the vendored IFEval."""
    path = default_input_data() if input_data is None else input_data
    examples = parse_inputs(read_jsonl(path, "input_data"))
    seen: set[str] = set()
    for example in examples:
        if example.prompt in seen:  # responses are matched by prompt text, so prompts must be unique
            raise OlmoIVError(f"input_data= holds the prompt of key {example.key} twice; responses could not be "
                              "matched to it")
        seen.add(example.prompt)
    return examples


def read_responses(responses: str | os.PathLike) -> dict[str, str]:
    """prompt -> response from a JSONL file of {"prompt": ..., "response": ...} rows. A prompt given twice keeps
    its last response, as the official reader does."""
    out: dict[str, str] = {}
    for number, row in read_jsonl(responses, "responses"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise OlmoIVError(f"responses= line {number}: expected an object with string fields 'prompt' and "
                              "'response'")
        out[row["prompt"]] = row["response"]
    return out


def match_responses(inputs: Sequence[InputExample], prompt_to_response: Mapping[str, str]) -> list[str]:
    """The response to each input, matched by exact prompt text. Every response must match a prompt and every
    prompt must have a response (the official scorer stops with a KeyError on a missing one)."""
    prompts = {example.prompt for example in inputs}
    unmatched = [p for p in prompt_to_response if p not in prompts]
    if unmatched:
        raise OlmoIVError(f"responses= {len(unmatched)} of {len(prompt_to_response)} responses match no prompt of "
                          f"input_data= (prompts are matched exactly); first: {unmatched[0][:80]!r}")
    missing = [e for e in inputs if e.prompt not in prompt_to_response]
    if missing:
        raise OlmoIVError(f"responses= has no response for {len(missing)} of {len(inputs)} prompts of input_data=; "
                          f"first: key {missing[0].key}")
    return [prompt_to_response[e.prompt] for e in inputs]


# --- scoring ------------------------------------------------------------------------------------------------------
def loose_variants(response: str) -> list[str]:
    """The texts loose scoring tries, in the official order: the response; without `*`; without its first line,
    its last line, or both (split on "\\n" only, then stripped); those three without `*`. Duplicates dropped."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    variants = [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]
    return list(dict.fromkeys(variants))


def _follows(instruction_id: str, kwargs: dict[str, Any], text: str) -> bool:
    return bool(text.strip()) and INSTRUCTIONS[instruction_id].check(text, **kwargs)


def score_example(example: InputExample, response: str) -> ScoredRow:
    """Strict and loose verdicts of one response on each of the example's instructions. An instruction passes
    loose if any non-blank variant passes it, so two instructions may pass on different variants."""
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(example.instruction_id_list, example.kwargs):
        s = _follows(instruction_id, kwargs, response)
        strict.append(s)
        loose.append(s or any(_follows(instruction_id, kwargs, v) for v in variants[1:]))
    return ScoredRow(example.key, example.prompt, response, example.instruction_id_list, tuple(strict), tuple(loose))


def score_responses(responses: Sequence[str], inputs: Sequence[InputExample] | None = None) -> list[ScoredRow]:
    """Score responses given in the inputs' order (the seam for responses generated by a model).
    `inputs` defaults to the vendored IFEval."""
    inputs = load_input_data() if inputs is None else inputs
    if len(responses) != len(inputs):
        raise OlmoIVError(f"responses= has {len(responses)} responses for {len(inputs)} prompts; give one per prompt, "
                          "in the inputs' order")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise OlmoIVError(f"responses= item {i} is a {type(response).__name__}, not a string")
    return [score_example(e, r) for e, r in zip(inputs, responses)]


def score_file(responses: str | os.PathLike, input_data: str | os.PathLike | None = None) -> list[ScoredRow]:
    """Score a responses JSONL file against IFEval inputs (default: the vendored IFEval), matched by prompt."""
    inputs = load_input_data(input_data)
    return score_responses(match_responses(inputs, read_responses(responses)), inputs)


# --- summary ------------------------------------------------------------------------------------------------------
def _accuracy(values: Sequence[bool]) -> dict[str, Any]:
    return {"n": len(values), "passed": sum(values), "accuracy": sum(values) / len(values) if values else None}


def summarize(rows: Sequence[ScoredRow]) -> dict[str, Any]:
    """Prompt-level and instruction-level accuracy, strict and loose, overall, per category and per instruction
    id (the official report's tiers 0 and 1)."""
    out: dict[str, Any] = {"n_prompts": len(rows), "n_instructions": sum(len(r.instruction_id_list) for r in rows)}
    for mode in MODES:
        by_id: dict[str, list[bool]] = {}
        by_category: dict[str, list[bool]] = {}
        for row in rows:
            for instruction_id, ok in zip(row.instruction_id_list, getattr(row, mode)):
                by_id.setdefault(instruction_id, []).append(ok)
                by_category.setdefault(instruction_id.split(":")[0], []).append(ok)
        everything = [ok for row in rows for ok in getattr(row, mode)]
        out[mode] = {
            "prompt_level": _accuracy([all(getattr(row, mode)) for row in rows]),
            "instruction_level": _accuracy(everything),
            "by_category": {k: _accuracy(v) for k, v in sorted(by_category.items())},
            "by_instruction": {k: _accuracy(v) for k, v in sorted(by_id.items())},
        }
    return out


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
