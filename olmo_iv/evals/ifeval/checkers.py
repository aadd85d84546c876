"""The 25 IFEval instruction checkers, under their official ids and with their official kwargs.

Each checker is a plain function `check(response, **kwargs) -> bool` that follows the public definition of
Zhou et al. (2023) as the official code applies it: its comparison relations ("less than" is <, "at least" is >=),
its regexes (keywords are regexes, matched case-insensitively), its counting and its case handling. Behaviours a
reader might not expect are noted where they happen; docs/ifeval.md has the full list.

`INSTRUCTIONS` maps each id to an `Instruction` (its parameters and checker); `check_instruction` validates the kwargs
and runs the checker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from olmo_iv.errors import OlmoIVError
from olmo_iv.evals.ifeval import text as _text

RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# --- keywords -----------------------------------------------------------------------------------------------------
def keyword_existence(response: str, keywords: list[str]) -> bool:
    # a regex search, no word boundaries: "cat" is found in "category"
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(keyword, response, flags=re.IGNORECASE)), relation, frequency)


def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    # whole words only: "computers" does not contain the forbidden "computer", "Computer's" does
    return not any(re.search(r"\b" + word + r"\b", response, flags=re.IGNORECASE) for word in forbidden_words)


def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    # Counts the given symbol, case-insensitively. lm-eval replaces a symbol that is not a-z by a random letter;
    # the current google-research code counts the symbol itself, which is what the prompt asks for.
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


# --- language -----------------------------------------------------------------------------------------------------
def response_language(response: str, language: str) -> bool:
    detected = _text.detect_language(response)
    return detected is None or detected == language  # text langdetect cannot read passes


# --- length constraints -------------------------------------------------------------------------------------------
def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(_text.count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    # paragraphs are separated by a *** divider; an empty paragraph fails unless it is the first or the last
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for index, part in enumerate(parts):
        if not part.strip():
            if index in (0, len(parts) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(_text.count_words(response), relation, num_words)


_FIRST_WORD_STOP = frozenset(".,?!'\"")


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    # Paragraphs split on exactly "\n\n"; blank ones do not count, but the n-th is indexed among all of them.
    paragraphs = response.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for char in word:  # the word ends at the first . , ? ! ' or "
        if char in _FIRST_WORD_STOP:
            break
        found += char.lower()
    return count == num_paragraphs and found == first_word.lower()


# --- detectable content -------------------------------------------------------------------------------------------
def number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders  # "[ ]" counts


def postscript(response: str, postscript_marker: str) -> bool:
    # Lower-cased, searched anywhere in a line. The two official markers allow optional spaces: "p. p. s" is a
    # P.P.S; "P.P.S." also satisfies "P.S." (it contains "p.s."). Any other marker is used as a regex, as officially.
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + postscript_marker.lower() + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


# --- detectable format --------------------------------------------------------------------------------------------
def number_bullet_lists(response: str, num_bullets: int) -> bool:
    # "* item" lines (not "**bold**" lines) and "- item" lines, including "---"; exactly num_bullets of them
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    stripped = response.strip()
    return any(option in stripped for option in CONSTRAINED_OPTIONS)  # case and final period matter


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    # *x* and **x** with non-blank text on one line; "**bold**" counts once, "***x***" twice
    singles = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(singles) + len(doubles) >= num_highlights


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    # case-sensitive splitter followed by a number, the space between them optional ("Section1" counts)
    parts = re.split(r"\s?" + section_spliter + r"\s?\d+\s?", response)
    return len(parts) - 1 >= num_sections


def json_format(response: str) -> bool:
    value = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # each removed in turn, as officially
        value = value.removeprefix(fence)
    value = value.removesuffix("```")
    try:
        json.loads(value.strip())
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# --- combination --------------------------------------------------------------------------------------------------
def two_responses(response: str) -> bool:
    parts = response.split("******")
    valid = []
    for index, part in enumerate(parts):
        if part.strip():
            valid.append(part)
        elif index not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# --- start and end ------------------------------------------------------------------------------------------------
def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    stripped = response.strip()
    return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'


# --- change case --------------------------------------------------------------------------------------------------
def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(_text.count_capital_words(response), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    if not response.isupper():
        return False
    detected = _text.detect_language(response)
    return detected is None or detected == "en"


def english_lowercase(response: str) -> bool:
    if not response.islower():
        return False
    detected = _text.detect_language(response)
    return detected is None or detected == "en"


# --- punctuation --------------------------------------------------------------------------------------------------
def no_comma(response: str) -> bool:
    return "," not in response  # the ASCII comma only


# --- registry -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One kwarg of a checker: its name, JSON type, and for relations and regexes what else must hold."""

    name: str
    kind: type  # int, str or list (of str)
    choices: tuple[str, ...] = ()
    regex: bool = False  # used as a regular expression by the official checker: must compile
    positive: bool = False


@dataclass(frozen=True)
class Instruction:
    id: str
    check: Callable[..., bool]
    params: tuple[Param, ...] = ()

    @property
    def category(self) -> str:
        return self.id.split(":")[0]


def _count(name: str) -> Param:
    return Param(name, int)


def _relation(name: str) -> Param:
    return Param(name, str, choices=RELATIONS)


INSTRUCTIONS: dict[str, Instruction] = {
    i.id: i
    for i in (
        Instruction("keywords:existence", keyword_existence, (Param("keywords", list, regex=True),)),
        Instruction("keywords:frequency", keyword_frequency,
                    (Param("keyword", str, regex=True), _count("frequency"), _relation("relation"))),
        Instruction("keywords:forbidden_words", forbidden_words, (Param("forbidden_words", list, regex=True),)),
        Instruction("keywords:letter_frequency", letter_frequency,
                    (Param("letter", str), _count("let_frequency"), _relation("let_relation"))),
        Instruction("language:response_language", response_language, (Param("language", str),)),
        Instruction("length_constraints:number_sentences", number_sentences,
                    (_count("num_sentences"), _relation("relation"))),
        Instruction("length_constraints:number_paragraphs", number_paragraphs, (_count("num_paragraphs"),)),
        Instruction("length_constraints:number_words", number_words, (_count("num_words"), _relation("relation"))),
        Instruction("length_constraints:nth_paragraph_first_word", nth_paragraph_first_word,
                    (_count("num_paragraphs"), Param("nth_paragraph", int, positive=True), Param("first_word", str))),
        Instruction("detectable_content:number_placeholders", number_placeholders, (_count("num_placeholders"),)),
        Instruction("detectable_content:postscript", postscript, (Param("postscript_marker", str, regex=True),)),
        Instruction("detectable_format:number_bullet_lists", number_bullet_lists, (_count("num_bullets"),)),
        Instruction("detectable_format:constrained_response", constrained_response),
        Instruction("detectable_format:number_highlighted_sections", number_highlighted_sections,
                    (_count("num_highlights"),)),
        Instruction("detectable_format:multiple_sections", multiple_sections,
                    (Param("section_spliter", str, regex=True), _count("num_sections"))),
        Instruction("detectable_format:json_format", json_format),
        Instruction("detectable_format:title", title),
        Instruction("combination:two_responses", two_responses),
        Instruction("combination:repeat_prompt", repeat_prompt, (Param("prompt_to_repeat", str),)),
        Instruction("startend:end_checker", end_checker, (Param("end_phrase", str),)),
        Instruction("startend:quotation", quotation),
        Instruction("change_case:capital_word_frequency", capital_word_frequency,
                    (_count("capital_frequency"), _relation("capital_relation"))),
        Instruction("change_case:english_capital", english_capital),
        Instruction("change_case:english_lowercase", english_lowercase),
        Instruction("punctuation:no_comma", no_comma),
    )
}


def validate_kwargs(instruction_id: str, kwargs: Mapping[str, Any] | None, where: str = "kwargs=") -> dict[str, Any]:
    """The checker's kwargs for one instruction, checked: every parameter present with the right type, no
    unknown names. Keys whose value is null are dropped first (the Hugging Face copy of IFEval lists every
    parameter of every instruction, null where unused). `where` names the argument the kwargs came from."""
    instruction = INSTRUCTIONS.get(instruction_id)
    if instruction is None:
        raise OlmoIVError(f"{where} unknown instruction id {instruction_id!r}; the 25 official ids are listed in "
                          "olmo_iv.evals.ifeval.INSTRUCTIONS")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise OlmoIVError(f"{where} kwargs of {instruction_id} must be a JSON object, got {type(kwargs).__name__}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    names = {p.name for p in instruction.params}
    unknown = sorted(set(given) - names)
    if unknown:
        raise OlmoIVError(f"{where} {instruction_id} takes {sorted(names) or 'no kwargs'}, not {unknown}")
    for param in instruction.params:
        if param.name not in given:
            raise OlmoIVError(f"{where} {instruction_id} needs kwarg {param.name!r}")
        value = given[param.name]
        ok = isinstance(value, param.kind) and not isinstance(value, bool)
        if ok and param.kind is list:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            kind = "a list of strings" if param.kind is list else param.kind.__name__
            raise OlmoIVError(f"{where} {instruction_id} kwarg {param.name!r} must be {kind}, got {value!r}")
        if param.choices and value not in param.choices:
            raise OlmoIVError(f"{where} {instruction_id} kwarg {param.name!r} must be one of {list(param.choices)}, "
                              f"got {value!r}")
        if param.positive and value < 1:
            raise OlmoIVError(f"{where} {instruction_id} kwarg {param.name!r} must be >= 1, got {value!r}")
        if param.regex:
            for pattern in value if isinstance(value, list) else [value]:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise OlmoIVError(f"{where} {instruction_id} kwarg {param.name!r}: {pattern!r} is used as a "
                                      f"regular expression and does not compile ({err})") from None
    if instruction_id == "length_constraints:nth_paragraph_first_word" and given["nth_paragraph"] > given["num_paragraphs"]:
        raise OlmoIVError(f"{where} {instruction_id} kwarg 'nth_paragraph' ({given['nth_paragraph']}) is more than "
                          f"'num_paragraphs' ({given['num_paragraphs']})")
    if instruction_id == "keywords:letter_frequency" and len(given["letter"]) != 1:
        raise OlmoIVError(f"{where} {instruction_id} kwarg 'letter' must be one character, got {given['letter']!r}")
    return given


def check_instruction(instruction_id: str, response: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether `response` follows one instruction (strict: the response as given). An empty or blank response
    follows nothing, as officially."""
    checked = validate_kwargs(instruction_id, kwargs)
    return bool(response.strip()) and INSTRUCTIONS[instruction_id].check(response, **checked)
