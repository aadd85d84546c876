"""Task inference scores: exact-match accuracy (EM) and instructional accuracy (IA), paper §3 / Figure 12.

Post-processing comes in two labelled modes (docs/eval.md):
- "reference" reproduces the authors' `basic_inference.py` step by step, bugs included: every non-word character
  is removed, so "more dangerous" becomes "moredangerous" and multi-word gold labels can never match.
- "faithful" keeps the words of the answer (and their single spaces) and normalises the gold label the same way.
EM is computed both ways for every sample. IA is either option-based (% of answers among the task's options) or
judged (% of answers a `Judge` accepts as the requested form, right or wrong). The default judge is rule-based;
`HTTPJudge` asks any OpenAI-compatible chat-completions endpoint the user configures.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.progress import ProgressFn

Mode = Literal["reference", "faithful"]
MODES: tuple[str, ...] = ("reference", "faithful")

CONTRASTIVE_TASKS = ("adj_comp", "adj_ant", "anim_color", "can_fly")
"""The four CSV subtasks of the paper (adjectives, animals): the default tasks of `olmo-iv eval`."""
LOWERCASED_TASKS = frozenset(CONTRASTIVE_TASKS)
"""Step 7 of the reference post-processing lowercases predictions for the adjective and animal tasks only."""
REFERENCE_OPTION_IA = frozenset({"anim_color", "can_fly"})
"""Tasks whose IA the reference takes from the options: it never calls its judge for them (§7, §11.16)."""
COUNT_OPTIONS = tuple(str(i) for i in range(21))
"""object_counting's options in the reference: the strings "0".."20" replace the task's random mod_options."""


def short_name(task: str) -> str:
    """"adjectives/adj_comp" -> "adj_comp": the rule tables below are keyed by subtask."""
    return task.rsplit("/", 1)[-1]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise OlmoIVError(f"unknown mode {mode!r}: use 'reference' (the authors' code) or 'faithful'")


# ------------------------------------------------------------------------------------------- post-processing


def postprocess_reference(text: str, task: str) -> str:
    """The authors' post-processing (`basic_inference.py:91-105`), in their order, bugs included."""
    s = text.split("\n")[0]  # 1. first line
    s = s.strip()  # 2.
    for ch in (".", "\n", ","):  # 3.
        s = s.replace(ch, "")
    s = s.replace("<|im_end|>", "")  # 4.
    s = re.sub(r"\W", "", s)  # 5. every non-word character, spaces inside "more dangerous" included
    s = s.replace("?| ", "")  # 6. a no-op after step 5, kept for fidelity
    if short_name(task) in LOWERCASED_TASKS:  # 7.
        s = s.lower()
    return s.strip()  # 8.


_SPECIAL = re.compile(r"<\|[^|<>]*\|>")  # <|endoftext|>, <|im_end|>, ...
_WORD = re.compile(r"\w+(?:['\-]\w+)*")  # a word with inner apostrophes or hyphens: "don't", "well-known"


def postprocess_faithful(text: str, task: str) -> str:
    """First line, special tokens dropped, the words joined by single spaces (punctuation around them dropped).

    "more dangerous." -> "more dangerous"; " 'Big'" -> "big" (adjective/animal tasks are lowercased as in the
    reference, the BigBench answers Y/N/A/B keep their case).
    """
    s = _SPECIAL.sub(" ", text.split("\n")[0])
    if short_name(task) in LOWERCASED_TASKS:
        s = s.lower()
    return " ".join(_WORD.findall(s))


def postprocess(text: str, task: str, mode: Mode = "reference") -> str:
    _check_mode(mode)
    return postprocess_reference(text, task) if mode == "reference" else postprocess_faithful(text, task)


def gold_label(label: str, task: str, mode: Mode = "reference") -> str:
    """The string a prediction must equal: the reference strips the label only (`accuracy_score(target.strip(),
    pred)`); faithful normalises it exactly as it normalises predictions."""
    _check_mode(mode)
    return label.strip() if mode == "reference" else postprocess_faithful(label, task)


def exact_match(generation: str, label: str, task: str, mode: Mode = "reference") -> bool:
    """EM of one raw generation against its gold label: a case-sensitive string equality after post-processing."""
    return postprocess(generation, task, mode) == gold_label(label, task, mode)


def task_options(task: str) -> tuple[str, ...]:
    """The options the option-based IA counts: the task registry's, except object_counting -> "0".."20"."""
    if short_name(task) == "object_counting":
        return COUNT_OPTIONS
    from olmo_iv.tasks import get_task

    return tuple(get_task(task).options)


# ------------------------------------------------------------------------------------------------- judges


@runtime_checkable
class Judge(Protocol):
    """Decides whether an answer has the form the instruction asks for (not whether it is right).

    `answer` is the post-processed prediction, as in the reference; `query` is the sample's input (e.g. the
    adjective), for rules that need it; judges may ignore it.
    """

    name: str

    def judge(self, task: str, instruction: str, answer: str, *, query: str | None = None) -> bool: ...


JUDGE_KIND = {
    "adj_comp": "comparative", "adj_ant": "adjective", "anim_color": "colour", "can_fly": "yes_no",
    "m_color": "colour", "m_edible": "yes_no", "basic_ans": "integer",
    "implicatures": "y_n", "metaphor_boolean": "y_n", "snarks": "a_b", "object_counting": "integer",
}
"""What form each task's instruction asks for; tasks not listed are judged by their options, if they have any."""

IRREGULAR_COMPARATIVES = frozenset("better worse more less fewer lesser farther further elder".split())
# Common words that end in -er but are not comparatives; the rule is a heuristic and this list keeps it honest
# on the words a small model is likely to emit after "Answer:".
NOT_COMPARATIVES = frozenset(
    """answer other either neither whether rather never ever over under after however together water number
    paper letter order power matter corner summer winter river silver copper flower finger tiger spider butter
    dinner monster mother father brother sister master computer player teacher member user owner leader
    adjective""".split()
)
FUNCTION_WORDS = frozenset(
    """a an the this that these those it its is are was were be been am do does did has have had not no yes
    and or but if then so of to in on at by for from with as into than too very i you he she we they me him her
    us them my your his our their what which who whom how why when where answer adjective antonym opposite
    comparative word none nothing""".split()
)
COLOURS = frozenset(
    """red orange yellow golden gold green blue purple pink brown black white gray grey silver tan beige cream
    ivory maroon crimson scarlet navy teal turquoise cyan magenta violet lavender lilac amber bronze copper
    chestnut rust olive khaki ochre tawny fawn buff russet charcoal ebony emerald indigo azure coral salmon
    peach rose ruby lime mint sand chocolate caramel cinnamon mahogany auburn blond blonde ginger
    multicolored multicoloured""".split()
)
COLOUR_MODIFIERS = ("light", "dark", "pale", "bright", "deep", "dull", "and", "or", "ish", "dish", "with", "spotted",
                    "striped")
# A colour, possibly modified or combined, with or without the spaces the reference removes:
# "brown", "light brown", "lightbrown", "black and white", "blackandwhite", "reddish".
_COLOUR_RE = re.compile("(?:" + "|".join(sorted(COLOURS | set(COLOUR_MODIFIERS), key=len, reverse=True)) + ")+")
_COLOUR_ANY = re.compile("|".join(sorted(COLOURS, key=len, reverse=True)))


def is_comparative(answer: str) -> bool:
    """'bigger', 'better', 'more careful', and the reference's 'morecareful'. Rule: an irregular comparative,
    'more'/'less' + one word, or one word in -er (4+ letters) that is not a common non-comparative -er word."""
    words = answer.lower().split()
    if len(words) == 2:
        return words[0] in ("more", "less") and words[1].isalpha() and words[1] not in FUNCTION_WORDS
    if len(words) != 1 or not words[0].replace("-", "").isalpha():
        return False
    w = words[0]
    if w in IRREGULAR_COMPARATIVES:
        return True
    if w.startswith(("more", "less")) and len(w) > 6 and w[4:] not in FUNCTION_WORDS and w != "moreover":
        return True  # the reference post-processing glues "more dangerous" into "moredangerous"
    return w.endswith("er") and len(w) >= 4 and w not in NOT_COMPARATIVES


def is_adjective_like(answer: str, query: str | None = None) -> bool:
    """An antonym answer: one alphabetic word (inner hyphens allowed) of 2+ letters that is not a function word
    and not the input or an inflection of it ("big" -> "big", "bigger", "biggest", "more big" glued). Echoing or
    grading the query are the typical failures of a model that ignores this instruction. Without a lexicon it
    accepts nouns too: a format check, as the paper's judge is."""
    words = answer.lower().split()
    if len(words) != 1 or not words[0].replace("-", "").isalpha() or len(words[0]) < 2:
        return False
    w = words[0]
    if w in FUNCTION_WORDS:
        return False
    q = (query or "").strip().lower().replace(" ", "")
    if not q:
        return True
    stems = {q, q[:-1] + "i"} if q.endswith("y") and len(q) > 2 else {q}  # happy -> happier
    return not (any(w.startswith(st) for st in stems) or w in {p + q for p in ("more", "less", "most", "least")})


def is_colour(answer: str) -> bool:
    """One or more colour words, optionally with light/dark/pale/... or 'and' (spaces optional)."""
    s = answer.lower().replace(" ", "").replace("-", "")
    return bool(s) and _COLOUR_RE.fullmatch(s) is not None and _COLOUR_ANY.search(s) is not None


def _rule(kind: str, answer: str, query: str | None) -> bool:
    a = answer.strip()
    if kind == "comparative":
        return is_comparative(a)
    if kind == "adjective":
        return is_adjective_like(a, query)
    if kind == "colour":
        return is_colour(a)
    if kind == "yes_no":
        return a.lower() in ("yes", "no")
    if kind == "y_n":
        return a in ("Y", "N")
    if kind == "a_b":
        return a in ("A", "B")
    if kind == "integer":
        return a.isascii() and a.isdigit()  # an integer >= 0 written in digits
    raise OlmoIVError(f"unknown judge rule {kind!r}")


@dataclass
class RuleJudge:
    """Rule-based judge, one rule per task (see JUDGE_KIND and docs/eval.md); no network, deterministic."""

    name: str = "rules"

    def judge(self, task: str, instruction: str, answer: str, *, query: str | None = None) -> bool:
        kind = JUDGE_KIND.get(short_name(task))
        if kind is not None:
            return _rule(kind, answer, query)
        options = task_options(task)
        if not options:
            raise OlmoIVError(f"the rule judge has no rule for task {task!r} and the task lists no options: "
                              "use an HTTP judge (HTTPJudge) or give the task options")
        return answer.strip() in options


# Judge prompts. Table 15 of the paper gives the templates of adj_comp, adj_ant and anim_color; its wording is not
# in our notes, so every template here is our own, asking the same question: does the answer have the requested
# form? The model must reply "yes" or "no".
JUDGE_QUESTIONS = {
    "comparative": "Is the answer an adjective in its comparative form (for example 'bigger', 'better' or "
                   "'more careful')?",
    "adjective": "Is the answer a single adjective?",
    "colour": "Is the answer a colour?",
    "yes_no": "Is the answer exactly 'yes' or 'no'?",
    "y_n": "Is the answer the letter Y or the letter N?",
    "a_b": "Is the answer the letter A or the letter B?",
    "integer": "Is the answer an integer greater than or equal to 0?",
    "options": "Is the answer one of the following: {options}?",
}
JUDGE_TEMPLATE = (
    "You check whether a language model followed the format an instruction asks for. Do not judge whether the "
    "answer is correct, only whether it has the requested form.\n\n"
    "Instruction: {instruction}\nAnswer: {answer}\n\n{question}\nReply with one word: yes or no."
)


def judge_prompt(task: str, instruction: str, answer: str) -> str:
    """The judge prompt of one sample (filled with the task's instruction and the post-processed answer)."""
    kind = JUDGE_KIND.get(short_name(task), "options")
    question = JUDGE_QUESTIONS[kind]
    if kind == "options":
        question = question.format(options=", ".join(task_options(task)))
    return JUDGE_TEMPLATE.format(instruction=instruction.strip(), answer=answer, question=question)


def read_decision(text: str, exact: bool) -> bool:
    """exact (reference): the reply must be exactly "yes"; otherwise its first word, lowercased and stripped of
    punctuation, must be "yes" ("Yes.", "yes, it is" count)."""
    if exact:
        return text == "yes"
    words = text.strip().lower().split()
    return bool(words) and words[0].strip(".,;:!?\"'*`()") == "yes"


@dataclass
class HTTPJudge:
    """A judge behind an OpenAI-compatible endpoint: POST {base_url}/chat/completions, one call per distinct
    (task, instruction, answer), reading choices[0].message.content. Only endpoints the user configures."""

    base_url: str
    """e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM, llama.cpp, Ollama)."""
    model: str
    """The judge model's name at that endpoint (the paper used gpt-5-nano)."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (sent as a Bearer token); None sends none."""
    timeout: float = 60.0
    """Seconds to wait for one response."""
    retries: int = 2
    """Further attempts after a timeout, a connection error, HTTP 429 or 5xx, with 1 s, 2 s, ... back-off."""
    exact_yes: bool = False
    """Count a decision only when the reply is exactly "yes" (the reference's rule)."""
    extra_body: dict = field(default_factory=dict)
    """Extra request fields, e.g. {"temperature": 0} where the model accepts it."""
    name: str = "http"
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise OlmoIVError(f"judge URL {self.base_url!r} must start with http:// or https://")
        if not self.model:
            raise OlmoIVError("the HTTP judge needs a model name (judge model=)")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise OlmoIVError(f"environment variable {self.api_key_env} (the judge's API key) is not set")

    def judge(self, task: str, instruction: str, answer: str, *, query: str | None = None) -> bool:
        key = (task, instruction, answer)
        if key not in self._memo:
            self._memo[key] = read_decision(self.complete(judge_prompt(task, instruction, answer)), self.exact_yes)
        return self._memo[key]

    def complete(self, prompt: str) -> str:
        """The endpoint's reply to one user message."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], **self.extra_body}
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode(errors="replace")
                if last or not (err.code == 429 or err.code >= 500):
                    raise OlmoIVError(f"judge endpoint {url} answered HTTP {err.code}: {detail}") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:  # socket.timeout is TimeoutError
                if last:
                    reason = getattr(err, "reason", err)
                    raise OlmoIVError(f"could not reach the judge endpoint {url} ({reason}); check the judge's base_url= "
                                      f"(timeout {self.timeout:g} s)") from err
            time.sleep(2**attempt)
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise OlmoIVError(f"judge endpoint {url} did not return an OpenAI chat completion "
                              f"(choices[0].message.content): {raw[:300]!r}") from err


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class SampleScore:
    """One row of the per-sample CSV."""

    index: int
    task: str
    query: str | None
    prompt: str
    gold: str
    generation: str
    answer_reference: str
    answer_faithful: str
    em_reference: bool
    em_faithful: bool
    in_options: bool | None
    """The mode's answer is among the task's options (None when the task has none, in faithful mode)."""
    judge: bool | None
    """The judge's decision on the mode's answer (None where the mode does not call the judge)."""


@dataclass
class TaskScore:
    """Scores of one model on one task, in percent."""

    task: str
    n: int
    mode: str
    em: float
    """EM of the chosen mode (= em_reference or em_faithful)."""
    em_reference: float
    em_faithful: float
    option_ia: float | None
    judge_ia: float | None
    ia: float | None
    """The IA Figure 12 shows: judged, except where the reference takes it from the options (ia_source)."""
    ia_source: str


def _pct(flags: Sequence[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else float("nan")


def score_task(task: str, samples: Sequence, generations: Sequence[str], *, mode: Mode = "reference",
               judge: Judge | None = None) -> tuple[list[SampleScore], TaskScore]:
    """Score generations against samples (objects with .clean, .answer, .instruction, optional .query).

    Option IA exists only where the task has options (the reference scores 0 for the adjective tasks, which have
    none; that 0 is no measurement, so it is left empty here). reference mode: IA from the judge for every task
    but anim_color/can_fly, whose IA is the option score (§11.16). faithful mode: IA from the judge everywhere.
    """
    _check_mode(mode)
    if len(samples) != len(generations):
        raise OlmoIVError(f"{len(samples)} samples but {len(generations)} generations for task {task!r}")
    if not samples:
        raise OlmoIVError(f"task {task!r} has no samples to score")
    judge = judge if judge is not None else RuleJudge()
    options = task_options(task)
    use_judge = not (mode == "reference" and short_name(task) in REFERENCE_OPTION_IA)
    rows = []
    for i, (s, gen) in enumerate(zip(samples, generations, strict=True)):
        a_ref, a_fai = postprocess_reference(gen, task), postprocess_faithful(gen, task)
        answer = a_ref if mode == "reference" else a_fai
        query = getattr(s, "query", None)
        rows.append(SampleScore(
            index=i, task=task, query=query, prompt=s.clean, gold=s.answer, generation=gen,
            answer_reference=a_ref, answer_faithful=a_fai,
            em_reference=a_ref == gold_label(s.answer, task, "reference"),
            em_faithful=a_fai == gold_label(s.answer, task, "faithful"),
            in_options=(answer in options) if options else None,
            judge=judge.judge(task, s.instruction, answer, query=query) if use_judge else None,
        ))
    em_ref, em_fai = _pct([r.em_reference for r in rows]), _pct([r.em_faithful for r in rows])
    option_ia = _pct([bool(r.in_options) for r in rows]) if options else None  # no options: no option IA, not 0
    judge_ia = _pct([bool(r.judge) for r in rows]) if use_judge else None
    ia, source = (judge_ia, f"judge:{judge.name}") if use_judge else (option_ia, "options")
    score = TaskScore(task=task, n=len(rows), mode=mode, em=em_ref if mode == "reference" else em_fai,
                      em_reference=em_ref, em_faithful=em_fai, option_ia=option_ia, judge_ia=judge_ia, ia=ia,
                      ia_source=source)
    return rows, score


@dataclass
class EvalSettings:
    """Everything that determines a task-inference result; recorded with it and compared on resume."""

    mode: str = "reference"
    """Post-processing and IA rules: 'reference' (the authors' code) or 'faithful'."""
    samples: int | None = None
    """First N samples of each task (None: all, as the reference's basic inference)."""
    max_new_tokens: int = 5
    """Generation budget (the reference's --max_tokens default)."""
    batch_size: int = 32
    """Prompts per generation batch (greedy results do not depend on it)."""
    stop_at_eos: bool = True
    """End a row at the model's eos_token_id too (vLLM does; the first line is kept either way)."""
    judge: str = "rules"
    """'rules' or 'http:{model}@{url}'."""
    dtype: str = "float32"
    """Weights' dtype."""

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if self.samples is not None:
            check_range("samples", self.samples, 1)
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("batch_size", self.batch_size, 1)


def evaluate_task(model, task: str, settings: EvalSettings, judge: Judge | None = None,
                  progress: ProgressFn | None = None) -> tuple[list[SampleScore], TaskScore]:
    """Generate greedily on the task's prompts (no BOS, no chat template, as the paper) and score them."""
    from olmo_iv.generate import generate_text
    from olmo_iv.tasks import samples as task_samples

    if model.tokenizer is None:
        raise OlmoIVError(f"model {model.name_or_path!r} has no tokenizer.json: task inference needs one")
    data = task_samples(task, mode=settings.mode, n=settings.samples)
    eos = model.config.eos_token_id
    stop_ids = (eos,) if settings.stop_at_eos and eos is not None else ()
    gens = generate_text(model, [s.clean for s in data], max_new_tokens=settings.max_new_tokens, stop_ids=stop_ids,
                         batch_size=settings.batch_size, skip_special_tokens=True, progress=progress)
    return score_task(task, data, gens, mode=settings.mode, judge=judge)  # type: ignore[arg-type]


def sample_rows(rows: Sequence[SampleScore]) -> list[dict]:
    return [asdict(r) for r in rows]
