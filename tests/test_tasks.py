"""Tasks: vendored data, golden prompt strings in both modes, BIG-bench rewrites, token positions on an
OLMo-2-equivalent tokenizer (checked against tiktoken), answer tokens, sample selection, errors and the CLI."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from typer.testing import CliRunner

import olmo_iv.tasks.registry  # noqa: F401  (T.registry: the module whose state the fixture resets)
from olmo_iv import tasks as T
from olmo_iv.errors import OlmoIVError

PAPER_TASKS = ["adjectives/adj_comp", "adjectives/adj_ant", "animals/anim_color", "animals/can_fly",
               "bigbench/metaphor_boolean", "bigbench/implicatures", "bigbench/object_counting", "bigbench/snarks"]

# One sample of every task: (task, row, reference (clean, source, target), faithful target, label).
ADJ_COMP = "Given an adjective, state its comparative form."
ADJ_ANT = "Given an adjective, state its antonym."
COLOR = "Given an animal, state its most typical associated color."
FLY = "Given an animal, state whether or not it can fly. Print 'yes' or 'no'."
METAPHOR = ("For a given metaphorical sentence, identify if the second sentence is the correct interpretation. "
            "Print Y for yes and N for no.")
IMPLIC = "Predict whether Speaker 2's answer to Speaker 1 counts as a yes or as a no. Print Y for yes and N for no."
COUNT = "For the given sentence, count the number of objects listed and print it as a digit."
SNARKS = "Choose which of the two statements is sarcastic and print the corresponding letter:"
SPEAKERS = "Speaker 1: 'But aren't you afraid?' Speaker 2: 'Ma'am, sharks never attack anybody.'"
SHE1 = "She was ready to turn her hand and heart to anything that promised to yield safety."
SHE2 = "She was ready to act and to do anything that seemed to yield safety."
PROTEIN = "Protein supplements are way more expensive than $1 breakfast"
GOLDEN = [
    ("adjectives/adj_comp", 0, (f"{ADJ_COMP} Adjective: big. Answer:", ADJ_COMP, "big"), "Adjective: big. Answer:",
     "bigger"),
    ("adjectives/adj_ant", 0, (f"{ADJ_ANT} Adjective: big. Answer:", ADJ_ANT, "big"), "Adjective: big. Answer:",
     "small"),
    ("animals/anim_color", 0, (f"{COLOR} Animal: cardinal. Answer:", COLOR, "cardinal"),
     "Animal: cardinal. Answer:", "red"),
    ("animals/can_fly", 23, (f"{FLY} Animal: lobster. Answer:", FLY, "lobster"), "Animal: lobster. Answer:", "no"),
    ("bigbench/metaphor_boolean", 24,
     (f"{METAPHOR} Sentence 1: {SHE1} Sentence 2: {SHE2} Answer:", METAPHOR, f"Sentence 1: {SHE1} Sentence 2: {SHE2}"),
     f"Sentence 1: {SHE1} Sentence 2: {SHE2} Answer:", "Y"),
    ("bigbench/implicatures", 0, (f"{IMPLIC} {SPEAKERS} Answer:", IMPLIC, SPEAKERS), f"{SPEAKERS} Answer:", "N"),
    ("bigbench/object_counting", 0,
     (f"{COUNT} Sentence: I have a clarinet, a violin, and a flute. How many musical instruments do I have? Answer:",
      COUNT, "Sentence: I have a clarinet, a violin, and a flute. How many musical instruments do I have?"),
     "Sentence: I have a clarinet, a violin, and a flute. How many musical instruments do I have? Answer:", "3"),
    # the reference's "(a)" -> "A: " rewrite leaves a double space: kept in the reference mode only
    ("bigbench/snarks", 0,
     (f"{SNARKS} A:  {PROTEIN} gruel. B:  {PROTEIN} burritos. Answer:", SNARKS,
      f"A:  {PROTEIN} gruel. B:  {PROTEIN} burritos."),
     f"A: {PROTEIN} gruel. B: {PROTEIN} burritos. Answer:", "B"),
]


@pytest.fixture(scope="module")
def tok(olmo2_tokenizer):
    return olmo2_tokenizer


@pytest.fixture(scope="module")
def tok_dir(olmo2_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokdir")
    olmo2_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def all_encoded(tok) -> dict[tuple[str, str], list[T.Encoded]]:
    """Every sample of the 8 tasks in both modes, encoded once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.RewriteWarning)
        return {
            (name, mode): T.encode(T.samples(name, mode=mode), tok)
            for name in PAPER_TASKS
            for mode in T.MODES
        }


@pytest.fixture
def clean_registry(monkeypatch):
    """User registrations and $OLMO_IV_TASKS are undone after the test."""
    monkeypatch.setattr(T.registry, "_USER", {})
    monkeypatch.setattr(T.registry, "_env_loaded", [])
    monkeypatch.delenv(T.TASKS_ENV, raising=False)
    return monkeypatch


def tiny_tokenizer(merges=(), bos: str | None = None) -> Tokenizer:
    """A byte-level BPE over the whole string (merges may cross spaces), with one special token '<s>'."""
    from tests.olmo2_tokenizer import byte_alphabet

    vocab = {c: i for i, c in enumerate(byte_alphabet().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<s>", special=True)])
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    return tk


# ---------------------------------------------------------------------------------------------------------- data


def test_vendored_data_and_licences():
    d = T.DATA_DIR
    for folder in ("ukplab", "bigbench"):
        assert (d / folder / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
        assert (d / folder / "NOTICE.txt").is_file()
    assert (d / "README.md").is_file()
    assert T.list_tasks() == PAPER_TASKS
    rows = {name: T.n_samples(name) for name in PAPER_TASKS}
    assert rows == {"adjectives/adj_comp": 142, "adjectives/adj_ant": 142, "animals/anim_color": 193,
                    "animals/can_fly": 193, "bigbench/metaphor_boolean": 680, "bigbench/implicatures": 492,
                    "bigbench/object_counting": 1000, "bigbench/snarks": 181}
    for extra, n in (("math.csv", 149), ("mushrooms.csv", 196)):
        assert len((d / "ukplab" / extra).read_text().strip().splitlines()) == n + 1


def test_registry_entries():
    assert T.get_task("adj_comp") is T.get_task("adjectives/adj_comp")  # unique subtask names resolve
    t = T.get_task("animals/anim_color")
    assert (t.field, t.kind, len(t.options)) == ("Animal", "csv", 14) and "golden" in t.options
    assert T.get_task("can_fly").options == ("yes", "no")
    assert T.get_task("bigbench/object_counting").options == tuple(str(i) for i in range(21))
    assert T.get_task("snarks").options == ("A", "B") and T.get_task("snarks").field == ""
    assert T.get_task("adj_ant").options == ()
    with pytest.raises(
        OlmoIVError, match="unknown task 'nope'; known tasks: adjectives/adj_comp, .*bigbench/snarks"
    ):
        T.get_task("nope")


def test_rephrasings():
    for name in PAPER_TASKS:
        r = T.rephrasings(name)
        assert len(r) == 200 and all(r)
    assert T.rephrasings("adj_ant")[0] == "Provide the opposite of a given adjective."
    assert (
        T.rephrasings("snarks")[199] == "Of the two statements A and B, which one is sarcastic? Print A or B."
    )
    assert len(set(T.rephrasings("implicatures"))) == 198  # near-duplicates as shipped (reference doc §9)


# ------------------------------------------------------------------------------------------------------- prompts


@pytest.mark.filterwarnings("ignore::olmo_iv.tasks.RewriteWarning")  # metaphor's first 24 rows: tested below
@pytest.mark.parametrize("task,row,ref,faithful_target,label", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_prompts(task, row, ref, faithful_target, label):
    r = T.samples(task, n=row + 1)[row]
    f = T.samples(task, mode="faithful", n=row + 1)[row]
    assert (r.task, r.index, r.mode, f.mode) == (task, row, "reference", "faithful")
    assert (r.clean, r.source, r.target, r.answer) == (*ref, label)
    assert r.prompt == r.clean.removeprefix(r.source + " ")
    assert (f.target, f.answer, f.source) == (faithful_target, label, ref[1])
    assert f.clean == f"{f.source} {faithful_target}" and f.prompt == faithful_target
    if task.startswith(("adjectives", "animals")):
        assert f.clean == r.clean  # CSV tasks differ only in target (and answer token)


def test_reference_rewrite_rules_on_synthetic_inputs():
    cases = {
        "implicatures": ("Speaker 1: 'x?' Speaker 2: 'y.'", "Speaker 1: 'x?' Speaker 2: 'y.' Answer:"),
        "metaphor_boolean": ("P is Q. <-->  P is R.", "Sentence 1: P is Q. Sentence 2: P is R. Answer:"),
        "object_counting": ("I have a cat. How many?", "Sentence: I have a cat. How many? Answer:"),
        "snarks": ("Which statement is sarcastic? (a) Yes. (b) No.", "A:  Yes. B:  No. Answer:"),
    }
    for task, (raw, want) in cases.items():
        inputs = T.tasksource_inputs(task, raw)
        assert inputs == inputs.strip() and inputs.endswith("A:")  # the tasksource form: "...\nA:"
        assert T.reference_rewrite(task, inputs) == (want, [])
    # BIG-bench's formatting as tasksource holds it, written out for one task
    assert T.tasksource_inputs("implicatures", "S") == "Does Speaker 2's answer mean yes or no? \n\nQ: S \nA:"
    # a rule that matches nothing leaves the text as the reference did, and is reported
    prompt, noop = T.reference_rewrite(
        "metaphor_boolean", T.tasksource_inputs("metaphor_boolean", "P. <--> Q.")
    )
    assert prompt == "Sentence 1: P. <--> Q. Answer:" and noop == [(" <-->  ", " Sentence 2: ")]


def test_noop_rewrite_warns_and_can_raise():
    with pytest.warns(T.RewriteWarning, match=r"' <-->  ' matches nothing in 24 sample\(s\) \(0, 1, 2"):
        ss = T.samples("metaphor_boolean", n=30)
    assert ss[0].target == "Sentence 1: Krishna is an early bird. <--> Krishna wakes up early everyday."
    with warnings.catch_warnings():
        warnings.simplefilter("error", T.RewriteWarning)
        with pytest.raises(T.RewriteWarning):
            T.samples("metaphor_boolean", n=1)
        T.samples(
            "metaphor_boolean", mode="faithful", n=30
        )  # faithful builds from the raw fields: no warning
        T.samples("snarks")  # every rule applies to every snarks sample


# ------------------------------------------------------------------------------------------------------- tokens


def test_tokenizer_matches_tiktoken_cl100k(tok, all_encoded):
    from tests.olmo2_tokenizer import cl100k_encoding

    enc = cl100k_encoding()
    texts = ["Hello world's  test\n\n  x  ", "I have 12345 apples, éàü 日本語 🙂", " 8", "  leading", "tab\there",
             "it's THEY'LL we've", "a\r\nb", "$1,000.50!!", "Answer: more dangerous", " <-->  x", "(a)(b)"]
    for batch in all_encoded.values():
        for e in batch:
            texts += [e.sample.clean, e.sample.target, e.sample.answer, " " + e.sample.answer]
    texts = sorted(set(texts))
    ours = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert ours == enc.encode_ordinary_batch(texts)
    assert len(texts) > 5000
    assert tok.encode("<|endoftext|>A", add_special_tokens=False).ids == enc.encode(
        "<|endoftext|>A", allowed_special="all"
    )
    assert (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")) == (100257, 100277)
    assert T.adds_special_tokens(tok) == []  # no BOS, like OLMo-2's


def test_paper_token_positions(tok):
    want = {"adjectives/adj_comp": (8,), "adjectives/adj_ant": (8,), "animals/anim_color": (10,),
            "animals/can_fly": (11, 19)}
    for name, ends in want.items():
        for mode in T.MODES:
            e = T.encode(T.samples(name, mode=mode, n=3), tok)
            for x in e:
                assert (x.t_inst, x.sentence_ends) == (ends[-1], ends)
                assert tok.decode([x.clean_ids[0]]) == "Given"  # position 0 is the first word: no BOS
                assert x.clean_ids[: x.t_inst + 1] == x.source_ids
    e = T.encode(T.samples("can_fly", n=1), tok)[0]
    assert [tok.decode([e.clean_ids[i]]) for i in e.sentence_ends] == [".", "'."]  # the merged BPE token '.


def test_every_sample_has_instruction_prefix_and_positions(all_encoded):
    for (name, mode), batch in all_encoded.items():
        assert len(batch) == T.n_samples(name)
        for e in batch:
            assert e.clean_ids[: len(e.source_ids)] == e.source_ids and e.t_inst == len(e.source_ids) - 1
            assert e.sentence_ends[-1] == e.t_inst and list(e.sentence_ends) == sorted(set(e.sentence_ends))
            assert e.target_pos == 0 and e.sample.mode == mode
    # two-sentence instructions expose both ends
    imp = all_encoded[("bigbench/implicatures", "reference")][0]
    assert (
        len(imp.sentence_ends) == 2
        and len(all_encoded[("bigbench/snarks", "reference")][0].sentence_ends) == 1
    )


def test_reference_and_faithful_tokens(tok):
    ref = T.encode(T.samples("adj_comp", n=1), tok)[0]
    assert ref.target_ids == tuple(tok.encode("big", add_special_tokens=False).ids)
    bigger = tok.encode("bigger", add_special_tokens=False).ids
    assert (ref.answer_id, ref.answer_n_tokens, ref.answer_ids, ref.filler_id) == (
        bigger[0],
        len(bigger),
        tuple(bigger),
        None,
    )
    fai = T.encode(T.samples("adj_comp", mode="faithful", n=1), tok)[0]
    assert fai.target_ids == (100257, *tok.encode("Adjective: big. Answer:", add_special_tokens=False).ids)
    assert (fai.target_pos, fai.filler_id) == (0, 100257)
    assert (
        fai.answer_id == tok.encode(" bigger", add_special_tokens=False).ids[0]
        and fai.answer_id != ref.answer_id
    )
    assert fai.clean_ids == ref.clean_ids
    # cl100k never joins a space with a digit: " 3" is [" ", "3"]; the answer is the "3", not the shared space
    assert tok.encode(" 3", add_special_tokens=False).ids == [220, 18]
    cnt = T.encode(T.samples("object_counting", mode="faithful", n=1), tok)[0]
    assert (cnt.sample.answer, cnt.answer_id, cnt.answer_n_tokens) == ("3", 18, 1)
    # filler: another token string, an id, and clear errors
    ss = T.samples("adj_comp", mode="faithful", n=2)
    assert T.encode(ss, tok, filler="<|pad|>")[0].target_ids[0] == 100277
    assert T.encode(ss, tok, filler=100277)[1].target_ids[0] == 100277
    with pytest.raises(OlmoIVError, match="no token '<nope>' to use as the filler"):
        T.encode(ss, tok, filler="<nope>")
    with pytest.raises(OlmoIVError, match="filler id 999999 is not in the tokenizer"):
        T.encode(ss, tok, filler=999999)
    with pytest.raises(OlmoIVError, match="only used by the faithful mode"):
        T.encode(T.samples("adj_comp", n=1), tok, filler="<|pad|>")
    with pytest.raises(OlmoIVError, match="no token '<|endoftext|>'"):
        T.encode(ss, tiny_tokenizer())
    assert T.encode(ss, tiny_tokenizer(), filler="<s>")[0].target_ids[0] == tiny_tokenizer().token_to_id(
        "<s>"
    )


def test_answer_report_counts_multi_token_labels(tok, all_encoded):
    for batch in all_encoded.values():
        rep = T.answer_report(batch)
        recount = 0
        for e in batch:
            label = e.sample.answer if e.sample.mode == "reference" else " " + e.sample.answer
            ids = tok.encode(label, add_special_tokens=False).ids
            ids = ids[1:] if e.sample.mode == "faithful" and ids[0] == 220 else ids
            assert (e.answer_id, e.answer_n_tokens) == (ids[0], len(ids))
            recount += len(ids) > 1
        assert rep["n_samples"] == len(batch) and rep["n_multi_token"] == recount
    assert (
        "more dangerous" in T.answer_report(all_encoded[("adjectives/adj_comp", "faithful")])["multi_token"]
    )
    assert T.answer_report(all_encoded[("animals/can_fly", "reference")])["n_multi_token"] == 0


# ------------------------------------------------------------------------------------------- selection, errors


def test_sample_selection():
    first = T.samples("anim_color", n=7)
    assert [s.index for s in first] == list(range(7))
    assert [s.index for s in T.samples("anim_color")] == list(range(193))
    a, b = T.samples("anim_color", n=7, seed=3), T.samples("anim_color", n=7, seed=3)
    assert a == b and [s.index for s in a] == sorted({s.index for s in a}) and len(a) == 7
    assert [s.index for s in a] != list(range(7)) and a != T.samples("anim_color", n=7, seed=4)
    assert len(T.samples("anim_color", n=193, seed=0)) == 193
    for bad in (0, 194):
        with pytest.raises(OlmoIVError, match="has 193 samples"):
            T.samples("anim_color", n=bad)
    with pytest.raises(OlmoIVError, match="give n as well"):
        T.samples("anim_color", seed=1)
    with pytest.raises(OlmoIVError, match="unknown mode 'paper'"):
        T.samples("anim_color", mode="paper")


def test_user_csv_task(tmp_path, tok, clean_registry):
    p = tmp_path / "colors.csv"
    p.write_text("word,opposite\nhot,cold\nup,down\n")
    t = T.register_task("mine/opp", p, query_column="word", answer_column="opposite",
                        instruction="Give the opposite word. ", field="Word", options=("cold", "down"))
    assert (
        T.list_tasks()[-1] == "mine/opp"
        and T.get_task("opp") == t
        and t.instruction == "Give the opposite word."
    )
    s = T.samples("mine/opp")[1]
    assert (s.clean, s.target, s.answer, s.index) == (
        "Give the opposite word. Word: up. Answer:",
        "up",
        "down",
        1,
    )
    assert T.encode([s], tok)[0].t_inst == 4
    with pytest.raises(OlmoIVError, match="no rephrased instructions"):
        T.rephrasings("mine/opp")
    # a task file, as $OLMO_IV_TASKS names it, registers on first use of the registry
    (tmp_path / "tasks.json").write_text(json.dumps([{"name": "mine/file", "csv": "colors.csv", "query_column": "word",
                                                      "answer_column": "opposite", "instruction": "Flip it."}]))
    clean_registry.setenv(T.TASKS_ENV, str(tmp_path / "tasks.json"))
    assert "mine/file" in T.list_tasks() and T.samples("mine/file")[0].clean == "Flip it. Input: hot. Answer:"


def test_bad_csv_tasks_are_refused(tmp_path, clean_registry):
    def reg(text, **kw):
        p = tmp_path / "t.csv"
        p.write_text(text)
        args = dict(query_column="q", answer_column="a", instruction="Do it.") | kw
        return T.register_task("mine/t", p, **args)

    with pytest.raises(OlmoIVError, match=r"has no column\(s\) \['a'\]; its columns are \['q', 'b'\]"):
        reg("q,b\nx,y\n")
    with pytest.raises(OlmoIVError, match="holds no samples"):
        reg("q,a\n")
    with pytest.raises(OlmoIVError, match="row 1 .* has an empty 'a' cell"):
        reg("q,a\nx,y\nz,\n")
    with pytest.raises(OlmoIVError, match="does not exist"):
        T.register_task("mine/t", tmp_path / "none.csv", query_column="q", answer_column="a", instruction="x")
    with pytest.raises(OlmoIVError, match="is a built-in task"):
        T.register_task(
            "adjectives/adj_comp", tmp_path / "t.csv", query_column="q", answer_column="a", instruction="x"
        )
    with pytest.raises(OlmoIVError, match="instruction is empty"):
        reg("q,a\nx,y\n", instruction="  ")
    assert "mine/t" not in T.list_tasks()  # nothing half-registered
    (tmp_path / "bad.json").write_text('[{"name": "x"}]')
    with pytest.raises(OlmoIVError, match="entry 0: missing keys"):
        T.register_tasks_file(tmp_path / "bad.json")


def test_prefix_and_bos_errors(clean_registry, tmp_path):
    # a tokenizer that merges ". " makes the instruction's last token differ inside the prompt
    merged = tiny_tokenizer(merges=[(".", "Ġ")])
    with pytest.raises(OlmoIVError, match=r"adjectives/adj_comp sample 0 \(reference\): the tokenized instruction is "
                                          r"not a prefix .* at token 46"):
        T.encode(T.samples("adj_comp", n=1), merged)
    bos = tiny_tokenizer(bos="<s>")
    with pytest.raises(
        OlmoIVError, match=r"adds special token\(s\) \[256\] \(\['<s>'\]\); the reference mode"
    ):
        T.encode(T.samples("adj_comp", n=1), bos)
    e = T.encode(T.samples("adj_comp", mode="faithful", n=1), bos, filler="<s>")[
        0
    ]  # faithful: allowed, never added
    assert e.clean_ids[0] != 256 and e.target_ids[0] == 256
    with pytest.raises(OlmoIVError, match="no samples"):
        T.encode([], bos)


# ---------------------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    import typer
    from olmo_iv.cli.tasks import tasks_command

    # A group of its own, so the test does not depend on which other commands cli.app holds (a Typer app with
    # a single command would run it without its name).
    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    app.command("tasks")(tasks_command)
    return CliRunner().invoke(app, ["tasks", *args])


def test_cli_list():
    r = _cli()
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in PAPER_TASKS)
    rows = json.loads(_cli("--json").output)
    assert (
        [x["task"] for x in rows] == PAPER_TASKS
        and rows[3]["options"] == ["yes", "no"]
        and rows[0]["samples"] == 142
    )


def test_cli_show(tok_dir):
    r = _cli("can_fly", "--tokenizer", str(tok_dir), "-n", "2")
    assert r.exit_code == 0, r.output
    assert "T_inst=19 sentence ends=[11, 19]" in r.output and "Animal: bear. Answer:" in r.output
    assert "0 of 2 labels span several tokens" in r.output
    r = _cli("adj_comp", "--tokenizer", str(tok_dir), "--samples", "3", "--json", "--mode", "reference")
    rows = json.loads(r.output)
    need = {
        "task",
        "mode",
        "clean",
        "source",
        "target",
        "answer",
        "t_inst",
        "sentence_ends",
        "answer_token_id",
    }
    assert len(rows) == 3 and all(need <= set(x) for x in rows)
    assert (
        [x["t_inst"] for x in rows] == [8, 8, 8]
        and rows[0]["target"] == "big"
        and rows[0]["mode"] == "reference"
    )
    r = _cli(
        "snarks", "--tokenizer", str(tok_dir), "-n", "1", "--mode", "faithful", "--filler", "100277", "--json"
    )
    row = json.loads(r.output)[0]
    assert row["target_ids"][0] == 100277 and row["mode"] == "faithful" and row["answer"] == "B"


def test_cli_errors(tok_dir, tmp_path):
    def err(*args):
        r = _cli(*args)
        assert isinstance(r.exception, OlmoIVError), r.output
        return str(r.exception)

    assert "known tasks: adjectives/adj_comp" in err("nope", "--tokenizer", str(tok_dir))
    assert "not both" in err("adj_comp", "--model", "toy", "--tokenizer", str(tok_dir))
    assert "no tokenizer.json" in err("adj_comp", "--tokenizer", str(tmp_path))
    assert "no such directory" in err("adj_comp", "--model", str(tmp_path / "missing"))
    assert "unknown mode" in err("adj_comp", "--tokenizer", str(tok_dir), "--mode", "x")


def test_cli_entry_point_prints_errors_without_traceback(monkeypatch, capsys):
    from olmo_iv.cli import main

    monkeypatch.setattr(sys, "argv", ["olmo-iv", "tasks", "nope"])
    with pytest.raises(SystemExit) as ex:
        main.app()
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "error:" in err and "known tasks" in err and "Traceback" not in err
