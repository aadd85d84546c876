"""Judges of SAIF samples: did an output follow its sample's instruction, strictly (fully) or loosely (at least
partly)? SAIF labels outputs STRICT / LOOSE / FAIL with an LLM judge (GPT-4o-mini); `RuleJudge` is the offline
proxy (the default), `HTTPJudge` asks an OpenAI-compatible endpoint the user configures.

    judge = RuleJudge()
    verdicts = judge_all(judge, samples, outputs)     # samples from olmo_iv.tasks.saif.build_samples
    accuracy(verdicts)                                # {"n": ..., "strict": ..., "loose": ...}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from olmo_iv.errors import OlmoIVError, check_range
from olmo_iv.progress import ProgressFn
from olmo_iv.tasks.saif import SAIF_TYPES, SaifSample


@dataclass(frozen=True)
class Verdict:
    """One judged output. loose is True wherever strict is."""

    strict: bool
    loose: bool
    rationale: str


@runtime_checkable
class Judge(Protocol):
    def judge(self, sample: SaifSample, output: str) -> Verdict: ...


# ------------------------------------------------------------------------------------------------- rules

_WORD = re.compile(r"\w+")
STOPWORDS = frozenset(
    """a an the this that these those it its is are was were be been being am do does did has have had not no
    and or but if then so of to in on at by for from with as into than too very i you he she we they me him her us
    them my your his our their what which who whom how why when where can could would should will shall may might
    must about there here also just all any some more most such only own same other""".split()
)
"""Left out of the summary overlap: words any text shares with any other."""


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def _drop_lines(output: str) -> list[str]:
    """The output without its first line, its last line, or both (IFEval's loose texts, without the `*` ones)."""
    lines = output.split("\n")
    return ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]


@dataclass
class RuleJudge:
    """Offline rules, deterministic. A blank output fails everything. Per type:

    - IFEval ids (the toy types): the IFEval checker of the sample's type with its kwargs, strict and loose exactly
      as IFEval defines them (`olmo_iv.evals.ifeval.score_example`).
    - translate_fr: strict when langdetect (seed 0) reads the whole output as French with probability >=
      `fr_strict_prob` (a half-translated output reads as French with less). Loose when it reads French in the
      output without its first line, its last line, or both ("Here is the translation:" around a French text),
      or gives French a probability >= `fr_loose_prob` on the whole output (a partly French output).
      Whether the French says what the content says is not checked.
    - summarize: words are `\\w+` runs; overlap is the share of the output's distinct non-stopwords that occur in
      the content. Strict: at most `summary_ratio` times the content's words and overlap >= `summary_overlap`.
      Loose: fewer words than the content and at least one shared non-stopword, on the output or on it without
      its first and/or last line. Whether it keeps the content's main point is not checked.
    - keywords: strict when the keyword occurs as a whole word, any case ("Banana" counts for banana, "bananas"
      does not); loose when it occurs anywhere, any case ("bananas" counts).
    """

    fr_strict_prob: float = 0.9
    """translate_fr strict: langdetect's least probability of French on the whole output."""
    fr_loose_prob: float = 0.2
    """translate_fr loose: langdetect's least probability of French on the whole output (its floor is 0.1)."""
    summary_ratio: float = 0.5
    """summarize strict: the most words an output may have, as a share of the content's."""
    summary_overlap: float = 0.4
    """summarize strict: the least share of the output's non-stopwords found in the content (θ)."""

    def __post_init__(self) -> None:
        check_range("fr_strict_prob", self.fr_strict_prob, 0.1, 1)
        check_range("fr_loose_prob", self.fr_loose_prob, 0.1, self.fr_strict_prob)
        check_range("summary_ratio", self.summary_ratio, 0, 1, low_open=True)
        check_range("summary_overlap", self.summary_overlap, 0, 1, low_open=True)

    def judge(self, sample: SaifSample, output: str) -> Verdict:
        from olmo_iv.evals.ifeval import INSTRUCTIONS

        if sample.type in INSTRUCTIONS:
            return _ifeval(sample, output)
        if sample.type not in SAIF_TYPES:
            raise OlmoIVError(f"sample.type={sample.type!r}: the rule judge knows the IFEval ids and "
                              f"{', '.join(SAIF_TYPES)}")
        if not output.strip():
            return Verdict(False, False, "blank output")
        if sample.type == "translate_fr":
            return self._french(output)
        if sample.type == "summarize":
            return self._summary(sample.content, output)
        return _keyword(sample, output)

    def _french(self, output: str) -> Verdict:
        from olmo_iv.evals.ifeval.text import detect_language, language_probabilities

        whole = detect_language(output)
        p_fr = dict(language_probabilities(output)).get("fr", 0.0)
        if whole == "fr" and p_fr >= self.fr_strict_prob:
            return Verdict(True, True, f"langdetect: fr (p={p_fr:.2f})")
        cut = next((c for c in _drop_lines(output) if c and detect_language(c) == "fr"), None)
        loose = cut is not None or p_fr >= self.fr_loose_prob
        why = "French without the first/last line" if cut is not None else f"p(fr)={p_fr:.2f}"
        return Verdict(False, loose, f"langdetect: {whole} (p(fr)={p_fr:.2f}) on the whole output; {why}")

    def _summary(self, content: str, output: str) -> Verdict:
        n_content = len(_WORD.findall(content))
        if n_content == 0:
            raise OlmoIVError("sample.content has no words: nothing to summarize")
        source = _content_words(content)

        def measure(text: str) -> tuple[int, float, int]:
            words = _content_words(text)
            shared = len(words & source)
            return len(_WORD.findall(text)), shared / len(words) if words else 0.0, shared

        n, overlap, _ = measure(output)
        strict = 0 < n <= self.summary_ratio * n_content and overlap >= self.summary_overlap
        loose = strict or any(m[0] < n_content and m[2] > 0
                              for m in map(measure, [output, *(c for c in _drop_lines(output) if c)]))
        return Verdict(strict, loose, f"{n} words vs the content's {n_content} (ratio {n / n_content:.2f}), "
                                      f"overlap {overlap:.2f}")


def _ifeval(sample: SaifSample, output: str) -> Verdict:
    from olmo_iv.evals.ifeval import InputExample, score_example, validate_kwargs

    kwargs = validate_kwargs(sample.type, sample.kwargs, where="sample.kwargs:")
    row = score_example(InputExample(0, sample.positive, (sample.type,), (kwargs,)), output)
    return Verdict(row.strict[0], row.loose[0], f"IFEval {sample.type}: strict {row.strict[0]}, loose {row.loose[0]}")


def _keyword(sample: SaifSample, output: str) -> Verdict:
    kw = sample.kwargs.get("keyword")
    if not isinstance(kw, str) or not kw.strip():
        raise OlmoIVError(f"sample.kwargs={sample.kwargs!r}: a keywords sample needs a non-empty 'keyword'")
    word = re.search(rf"(?<!\w){re.escape(kw)}(?!\w)", output, flags=re.IGNORECASE) is not None
    anywhere = kw.lower() in output.lower()
    why = "as a word" if word else "inside a word" if anywhere else "absent"
    return Verdict(word, anywhere, f"keyword {kw!r}: {why}")


# ------------------------------------------------------------------------------------------------- LLM judge

TASKS = {
    "translate_fr": "Translate the text into French.",
    "summarize": "Summarize the text.",
    "keywords": "Include the word {keyword} in the response.",
}
"""The instruction the judge is shown for SAIF's types (a plain English form of every variant); IFEval types
show the sample's own instruction."""

RUBRIC = """You judge whether a language model's response follows an instruction. Judge only that, not the \
quality or correctness of the content. Give exactly one label:
- STRICT: the response fully follows the instruction.
- LOOSE: the response follows it only partly (for example: part of it translated, a summary that is too long, \
the instruction followed among unrelated text).
- FAIL: the response does not follow the instruction.

Instruction: {instruction}

Text the instruction applies to:
<<<
{content}
>>>

Response:
<<<
{output}
>>>

Answer with a JSON object and nothing else: {{"label": "STRICT" | "LOOSE" | "FAIL", "rationale": "<one sentence>"}}"""
"""Our own wording of SAIF's three classes (the paper's judge prompt is not available to us)."""

LABELS = {"STRICT": (True, True), "LOOSE": (False, True), "FAIL": (False, False)}
_LABEL_WORD = re.compile(r"\b(STRICT|LOOSE|FAIL(?:ED|URE|S)?)\b", re.IGNORECASE)


def rubric_prompt(sample: SaifSample, output: str) -> str:
    """The judge's prompt for one output."""
    instruction = TASKS[sample.type].format(**sample.kwargs) if sample.type in TASKS else sample.instruction
    return RUBRIC.format(instruction=instruction, content=sample.content, output=output)


def _label(word: str) -> str:
    word = word.strip().upper()
    return "FAIL" if word.startswith("FAIL") else word


def parse_verdict(reply: str) -> Verdict:
    """The judge's reply as a Verdict: a JSON object with "label" (also in a ``` fence or amid text), else the
    one label word the reply contains. Raises when neither is there, or different labels are."""
    start, end = reply.find("{"), reply.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(reply[start : end + 1])
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            label = next((obj[k] for k in ("label", "verdict", "class") if isinstance(obj.get(k), str)), "")
            if _label(label) in LABELS:
                strict, loose = LABELS[_label(label)]
                return Verdict(strict, loose, str(obj.get("rationale", obj.get("reason", ""))))
    found = {_label(m) for m in _LABEL_WORD.findall(reply)}
    if len(found) == 1:
        strict, loose = LABELS[found.pop()]
        return Verdict(strict, loose, reply.strip()[:500])
    raise OlmoIVError(f"the judge's reply has no single STRICT / LOOSE / FAIL label: {reply[:300]!r}")


@dataclass
class HTTPJudge:
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint (POST {base_url}/chat/completions), with
    SAIF's three labels (RUBRIC). The API key is read from the environment variable `api_key_env` at each call and
    kept nowhere; errors name the URL, never the key. Transport, retries and error messages are those of
    `olmo_iv.evals.inference.HTTPJudge`."""

    base_url: str
    """e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM, llama.cpp, Ollama)."""
    model: str
    """The judge model at that endpoint (SAIF used gpt-4o-mini)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (sent as a Bearer token); None sends none."""
    timeout: float = 60.0
    """Seconds to wait for one response."""
    retries: int = 2
    """Further attempts after a timeout, a connection error, HTTP 429 or 5xx."""
    extra_body: dict = field(default_factory=dict)
    """Extra request fields, e.g. {"temperature": 0} where the model accepts it."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise OlmoIVError(f"base_url={self.base_url!r} must start with http:// or https://")
        if not self.model:
            raise OlmoIVError("model='': give the judge model's name at the endpoint")
        check_range("timeout", self.timeout, 0, low_open=True)
        check_range("retries", self.retries, 0)

    def judge(self, sample: SaifSample, output: str) -> Verdict:
        from olmo_iv.evals.inference import HTTPJudge as Transport

        # built per call: it checks that the key's variable is set now, and reads the key only when sending
        transport = Transport(self.base_url, self.model, api_key_env=self.api_key_env, timeout=self.timeout,
                              retries=self.retries, extra_body=dict(self.extra_body))
        try:
            reply = transport.complete(rubric_prompt(sample, output))
        except OlmoIVError as err:  # the error quotes the server's answer, which might echo the key
            key = os.environ.get(self.api_key_env or "")
            if key and key in str(err):
                raise OlmoIVError(str(err).replace(key, "<key>")) from None
            raise
        return parse_verdict(reply)


# ------------------------------------------------------------------------------------------------- many


def judge_all(judge: Judge, samples: Sequence[SaifSample], outputs: Sequence[str], *,
              progress: ProgressFn | None = None) -> list[Verdict]:
    """One verdict per (sample, output), in order."""
    if len(samples) != len(outputs):
        raise OlmoIVError(f"{len(samples)} samples but {len(outputs)} outputs")
    out = []
    for sample, output in zip(samples, outputs):
        out.append(judge.judge(sample, output))
        if progress is not None:
            progress("judging", 1, len(samples))
    return out


def accuracy(verdicts: Sequence[Verdict]) -> dict:
    """Strict and loose accuracy (fractions) and n; SAIF's FAIL rate is 1 - loose."""
    if not verdicts:
        raise OlmoIVError("verdicts=[]: nothing to score")
    n = len(verdicts)
    return {"n": n, "strict": sum(v.strict for v in verdicts) / n, "loose": sum(v.loose for v in verdicts) / n}


__all__ = ["HTTPJudge", "Judge", "RUBRIC", "RuleJudge", "Verdict", "accuracy", "judge_all", "parse_verdict",
           "rubric_prompt"]
