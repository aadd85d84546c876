"""Synthesised IFEval responses: for each prompt, responses built from templates that pass or fail each of its
instructions, many of them exactly at a threshold or one step past it.

The text is plain English with unambiguous sentence and word boundaries (no abbreviations, no contractions, one
space after each sentence), so that any implementation of Punkt and of the word tokenizer splits it the same way;
that is the population on which our checkers are compared with the official ones (`ifeval_agreement.py`) and the
input of the speed benchmark (`bench_ifeval.py`). Standard library only; deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

INPUT_DATA = Path(__file__).resolve().parent.parent / "olmo_iv" / "data" / "ifeval" / "input_data.jsonl"

SUBJECTS = ["The river", "Our team", "The old library", "A small dog", "The city council", "My neighbor",
            "The morning train", "This garden", "The young painter", "Every student", "The quiet village",
            "The factory", "Her brother", "The museum", "A tall tree", "The new bridge"]
VERBS = ["runs past", "looks at", "talks about", "waits near", "builds", "paints", "visits", "remembers",
         "carries", "protects", "opens", "describes", "follows", "cleans", "finds", "studies"]
OBJECTS = ["the green hill", "a quiet street", "the wooden boat", "many old letters", "the summer market",
           "a bright window", "the stone wall", "the busy harbor", "a long road", "the warm kitchen",
           "the school garden", "a red kite", "the last page", "the open field", "a silver key", "the dark forest"]
ENDINGS = ["every day", "in the evening", "with great care", "before noon", "after the storm", "without a word",
           "for the first time", "at the weekend", "all year long", "near the station"]
# short texts in other languages, for language:response_language (our own sentences)
FOREIGN = {
    "de": "Der Fluss fliesst langsam durch das alte Dorf und die Kinder spielen am Ufer bis zum Abend.",
    "it": "Il fiume scorre lentamente attraverso il vecchio villaggio e i bambini giocano sulla riva fino a sera.",
    "pt": "O rio corre devagar pela velha aldeia e as criancas brincam na margem ate a noite chegar.",
    "fi": "Joki virtaa hitaasti vanhan kylan lapi ja lapset leikkivat rannalla iltaan asti joka paiva.",
    "ru": "Река медленно течёт через старую деревню, и дети играют на берегу до самого вечера.",
    "bg": "Реката тече бавно през старото село и децата играят на брега до вечерта.",
    "hi": "नदी धीरे धीरे पुराने गाँव से होकर बहती है और बच्चे शाम तक किनारे पर खेलते हैं।",
    "ko": "강은 오래된 마을을 천천히 흐르고 아이들은 저녁까지 강가에서 놀아요.",
    "th": "แม่น้ำไหลผ่านหมู่บ้านเก่าอย่างช้าๆ และเด็กๆ เล่นริมฝั่งจนถึงเย็น",
    "vi": "Dòng sông chảy chậm qua ngôi làng cũ và trẻ em chơi trên bờ cho đến tối.",
    "sw": "Mto unapita polepole katika kijiji cha zamani na watoto wanacheza ukingoni hadi jioni.",
    "ar": "يجري النهر ببطء عبر القرية القديمة ويلعب الأطفال على الضفة حتى المساء.",
}


class Writer:
    """Plain sentences and paragraphs from a seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def sentence(self) -> str:
        r = self.rng
        return f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(OBJECTS)} {r.choice(ENDINGS)}."

    def sentences(self, n: int) -> str:
        return " ".join(self.sentence() for _ in range(n))

    def words(self, n: int) -> str:
        """Exactly n words (\\w+ runs), as whole sentences plus one last fragment."""
        out: list[str] = []
        while len(out) < n:
            out += self.sentence().rstrip(".").split()
        text = " ".join(out[:n])
        return text + "." if text else text


def _near(rng: random.Random, n: int) -> int:
    """A count at the threshold, one either side, or further away."""
    return max(0, rng.choice([n - 1, n, n, n + 1, n + 1, n - 2, n + 3, 2 * n]))


def plan_response(example: dict[str, Any], rng: random.Random) -> str:
    """One synthesised response to `example`: for each instruction a block that passes or misses it, joined, then
    the whole-response transforms (case, quotes, JSON), then optional chatty first and last lines."""
    w = Writer(rng)
    head: list[str] = []
    body: list[str] = []
    tail: list[str] = []
    transforms: list[str] = []
    paragraphs_plan = None
    for instruction_id, kwargs in zip(example["instruction_id_list"], example["kwargs"]):
        kind = instruction_id.split(":")[1]
        kw = {k: v for k, v in kwargs.items() if v is not None}
        hit = rng.random() < 0.6
        if kind == "existence":
            words = list(kw["keywords"]) if hit else list(kw["keywords"])[1:]
            body.append(" ".join(f"{w.sentence()[:-1]} and {k} {rng.choice(ENDINGS)}." for k in words))
        elif kind == "frequency":
            n = _near(rng, kw["frequency"])
            body.append(" ".join(f"{w.sentence()[:-1]} with {kw['keyword']}." for _ in range(n)))
        elif kind == "forbidden_words":
            if not hit:
                word = rng.choice(kw["forbidden_words"])
                body.append(f"{w.sentence()[:-1]} and {rng.choice([word, word.capitalize(), word + 's', word.upper()])}.")
        elif kind == "letter_frequency":
            n = _near(rng, kw["let_frequency"])
            body.append(" ".join([kw["letter"] * 1] * n))
        elif kind == "response_language":
            lang = kw["language"]
            body.append(FOREIGN.get(lang, w.sentences(3)) if hit else w.sentences(3))
        elif kind == "number_sentences":
            body.append(w.sentences(max(1, _near(rng, kw["num_sentences"]))))
        elif kind == "number_words":
            body.append(w.words(_near(rng, kw["num_words"])))
        elif kind == "number_paragraphs":
            paragraphs_plan = ("***", _near(rng, kw["num_paragraphs"]))
        elif kind == "nth_paragraph_first_word":
            paragraphs_plan = ("nth", kw["num_paragraphs"] if hit else _near(rng, kw["num_paragraphs"]),
                               kw["nth_paragraph"], kw["first_word"])
        elif kind == "number_placeholders":
            body.append(" ".join(f"Write to [{rng.choice(['name', 'address', 'date', 'city'])}]."
                                 for _ in range(_near(rng, kw["num_placeholders"]))))
        elif kind == "postscript":
            marker = kw["postscript_marker"]
            if hit:
                tail.append(f"{marker} {w.sentence()}")
            elif rng.random() < 0.5:
                tail.append(f"{rng.choice(['PS:', 'Note:', 'P.S.', 'p.p.s'])} {w.sentence()}")
        elif kind == "number_bullet_lists":
            n = _near(rng, kw["num_bullets"])
            mark = rng.choice(["* ", "- ", "* ", "-"])
            body.append("\n".join(f"{mark}{w.sentence()}" for _ in range(n)))
        elif kind == "constrained_response":
            body.append(rng.choice(["My answer is yes.", "My answer is no.", "My answer is maybe."] if hit else
                                   ["my answer is yes.", "My answer is yes", "My answer: yes."]))
        elif kind == "number_highlighted_sections":
            n = _near(rng, kw["num_highlights"])
            style = rng.choice(["*{}*", "**{}**", "*{}*"])
            body.append(" ".join(style.format(f"Part {i + 1}") + " " + w.sentence() for i in range(n)))
        elif kind == "multiple_sections":
            n = _near(rng, kw["num_sections"])
            body.append("\n\n".join(f"{kw['section_spliter']} {i + 1}\n{w.sentences(2)}" for i in range(n)))
        elif kind == "json_format":
            transforms.append("json" if hit else "json_broken" if rng.random() < 0.5 else "")
        elif kind == "title":
            head.append(f"<<{w.sentence()[:-1].title()}>>" if hit else rng.choice(["<<>>", "Title: A Day", "<< >>"]))
        elif kind == "two_responses":
            a = w.sentences(2)
            b = w.sentences(2) if hit else a
            transforms.append(f"two:{rng.random() < 0.8}")
            body.append(f"{a}\n******\n{b}")
        elif kind == "repeat_prompt":
            prompt = kw["prompt_to_repeat"]
            head.insert(0, prompt if hit else prompt.upper() if rng.random() < 0.3 else "Sure. " + prompt)
        elif kind == "end_checker":
            phrase = kw["end_phrase"]
            tail.append(phrase if hit else phrase.rstrip(".?!") + " today.")
        elif kind == "quotation":
            transforms.append("quote" if hit else "")
        elif kind == "capital_word_frequency":
            n = _near(rng, kw["capital_frequency"])
            body.append(" ".join(rng.choice(["AND", "THE", "GREEN", "RIVER", "HOUSE", "BLUE"]) for _ in range(n)))
        elif kind == "english_capital":
            transforms.append("upper" if hit else "")
        elif kind == "english_lowercase":
            transforms.append("lower" if hit else "")
        elif kind == "no_comma":
            if not hit:
                body.append(f"{w.sentence()[:-1]}, {rng.choice(ENDINGS)}.")
    if not body:
        body.append(w.sentences(rng.randint(1, 4)))
    text = "\n\n".join(body)
    if paragraphs_plan and paragraphs_plan[0] == "***":
        parts = [w.sentences(2) for _ in range(paragraphs_plan[1])]
        parts[0:1] = [text + " " + parts[0]] if parts else [text]
        sep = rng.choice(["\n\n***\n\n", "\n***\n", " *** "])
        text = sep.join(parts)
        if rng.random() < 0.15:
            text = text + sep if rng.random() < 0.5 else sep + text
    elif paragraphs_plan:
        _, count, nth, first = paragraphs_plan
        parts = [w.sentences(2) for _ in range(max(1, count))]
        if nth <= len(parts):
            lead = rng.choice([first.capitalize(), first, f'"{first.capitalize()}"', f"**{first}**", first + ","])
            parts[nth - 1] = f"{lead} {parts[nth - 1]}"
        parts[0] = text + " " + parts[0]
        text = "\n\n".join(parts)
    text = "\n".join(head + [text] + tail)
    for t in transforms:
        if t == "upper":
            text = text.upper()
        elif t == "lower":
            text = text.lower()
        elif t == "quote":
            text = f'"{text}"'
        elif t == "json":
            text = json.dumps({"answer": text}, ensure_ascii=False)
            text = rng.choice(["{}", "```json\n{}\n```", "```JSON\n{}\n```", "```\n{}\n```"]).format(text)
        elif t == "json_broken":
            text = "{" + text
    if rng.random() < 0.3:  # a chatty first line and/or last line: what loose scoring forgives
        text = rng.choice(["Sure, here it is:", "**Answer**", "Here you go!"]) + "\n" + text
    if rng.random() < 0.3:
        text = text + "\n" + rng.choice(["Hope this helps, friend!", "*Let me know*", "Is there more?"])
    if rng.random() < 0.1:
        text = text.replace(". ", ". *", 1)
    return text


def load_inputs(path: Path = INPUT_DATA) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus(per_prompt: int, seed: int = 0, inputs: list[dict[str, Any]] | None = None) -> Iterator[tuple[dict, str]]:
    """(input row, response) pairs: `per_prompt` responses for each prompt."""
    rng = random.Random(seed)
    for example in inputs or load_inputs():
        for _ in range(per_prompt):
            yield example, plan_response(example, rng)


def write_response_files(folder: Path, n_files: int, seed: int = 0) -> list[Path]:
    """`n_files` responses files in the official format, one response per prompt each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        path = folder / f"responses_{i}.jsonl"
        rows = [json.dumps({"prompt": e["prompt"], "response": r}) for e, r in corpus(1, seed=seed + i)]
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
