"""Task inference metrics: post-processing golden cases (both modes), EM, option IA, rule judges, the HTTP
judge against a local stub server, scoring, the `olmo-iv eval` command, and the shipped toy model's scores."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import olmo_iv
from olmo_iv.errors import OlmoIVError
from olmo_iv.evals import inference as ev
from olmo_iv.runs import eval as runs_eval
from olmo_iv.runs.eval import run_eval
from olmo_iv.runs.store import RunFinished, slug

# (raw generation, task, reference answer, faithful answer)
POSTPROCESS_GOLDEN = [
    (" bigger.\nAdjective: small", "adj_comp", "bigger", "bigger"),
    (" more dangerous.", "adj_comp", "moredangerous", "more dangerous"),
    (" More  Dangerous", "adj_comp", "moredangerous", "more dangerous"),
    (" Brown, white", "anim_color", "brownwhite", "brown white"),
    (" don't", "adj_ant", "dont", "don't"),
    (" well-known!", "adj_ant", "wellknown", "well-known"),
    (" 'Big'", "adj_ant", "big", "big"),
    (" yes<|im_end|>", "can_fly", "yes", "yes"),
    (" yes<|endoftext|>", "can_fly", "yesendoftext", "yes"),  # the reference strips only <|im_end|>
    ("\nbigger", "adj_comp", "", ""),  # the first line is empty
    (" Y", "implicatures", "Y", "Y"),
    (" y.", "implicatures", "y", "y"),  # BigBench answers are not lowercased
    (" B: the second", "snarks", "Bthesecond", "B the second"),
    (" 12,000.", "object_counting", "12000", "12 000"),
    (" more_dangerous", "adj_comp", "more_dangerous", "more_dangerous"),  # \w includes the underscore
    (" ?| big", "adj_comp", "big", "big"),
    ("", "adj_comp", "", ""),
]


@pytest.mark.parametrize("gen,task,ref,faithful", POSTPROCESS_GOLDEN)
def test_postprocess_golden(gen, task, ref, faithful):
    assert ev.postprocess_reference(gen, task) == ev.postprocess(gen, task, "reference") == ref
    assert ev.postprocess_faithful(gen, task) == ev.postprocess(gen, task, "faithful") == faithful


def test_exact_match_both_ways():
    # the reference can never match a multi-word gold label; faithful can
    assert not ev.exact_match(" more dangerous.", "more dangerous", "adj_comp", "reference")
    assert ev.exact_match(" more dangerous.", "more dangerous", "adj_comp", "faithful")
    assert ev.exact_match(" Bigger.", "bigger ", "adj_comp", "reference")  # lowercased prediction, stripped gold
    assert not ev.exact_match(" y", "Y", "implicatures", "reference")  # case-sensitive
    assert ev.exact_match(" 7\n", "7", "object_counting", "reference")
    assert ev.gold_label(" more  dangerous ", "adj_comp", "faithful") == "more dangerous"
    assert ev.gold_label(" more  dangerous ", "adj_comp", "reference") == "more  dangerous"
    with pytest.raises(OlmoIVError, match="unknown mode"):
        ev.postprocess("x", "adj_comp", "exact")


JUDGE_CASES = [
    ("adj_comp", "bigger", None, True), ("adj_comp", "better", None, True), ("adj_comp", "worse", None, True),
    ("adj_comp", "more dangerous", None, True), ("adj_comp", "moredangerous", None, True),
    ("adj_comp", "less careful", None, True), ("adj_comp", "happier", None, True),
    ("adj_comp", "big", None, False), ("adj_comp", "answer", None, False), ("adj_comp", "over", None, False),
    ("adj_comp", "more", None, True), ("adj_comp", "more the", None, False), ("adj_comp", "bigger than", None, False),
    ("adj_comp", "", None, False), ("adj_comp", "12er", None, False),
    ("adj_ant", "small", "big", True), ("adj_ant", "big", "big", False), ("adj_ant", "the", "big", False),
    ("adj_ant", "not big", "big", False), ("adj_ant", "well-known", "obscure", True), ("adj_ant", "7", "big", False),
    ("adj_ant", "guineapig", "guinea pig", False), ("adj_ant", "a", None, False),
    ("adj_ant", "bigger", "big", False), ("adj_ant", "moredangerous", "dangerous", False),
    ("adj_ant", "unhappy", "happy", True), ("adj_ant", "bigger", None, True), ("adj_ant", "happier", "happy", False),
    ("adj_ant", "sad", "happy", True), ("adj_ant", "dry", "wet", True),
    ("anim_color", "brown", None, True), ("anim_color", "light brown", None, True),
    ("anim_color", "lightbrown", None, True), ("anim_color", "blackandwhite", None, True),
    ("anim_color", "grey", None, True), ("anim_color", "reddish", None, True), ("anim_color", "bear", None, False),
    ("anim_color", "light", None, False), ("anim_color", "tangerine", None, False), ("anim_color", "", None, False),
    ("can_fly", "yes", None, True), ("can_fly", "No", None, True), ("can_fly", "maybe", None, False),
    ("implicatures", "Y", None, True), ("metaphor_boolean", "N", None, True), ("implicatures", "yes", None, False),
    ("implicatures", "y", None, False), ("snarks", "A", None, True), ("snarks", "C", None, False),
    ("object_counting", "0", None, True), ("object_counting", "21", None, True),
    ("object_counting", "-3", None, False), ("object_counting", "three", None, False),
    ("object_counting", "²", None, False),
]


@pytest.mark.parametrize("task,answer,query,expected", JUDGE_CASES)
def test_rule_judge(task, answer, query, expected):
    judge = ev.RuleJudge()
    assert isinstance(judge, ev.Judge)
    assert judge.judge(task, "instruction", answer, query=query) is expected


# --------------------------------------------------------------------------------------- HTTP judge stub


class Stub:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (a thread inside the test, never a real one)."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, payload = stub.reply(body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def completion(text):
    return 200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": text}, "finish_reason": "stop"}]}


@pytest.fixture
def stub():
    servers = []

    def start(reply):
        servers.append(Stub(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_http_judge_stub(stub, monkeypatch):
    def reply(body):  # accept comparatives only, in the chatty way real models answer
        prompt = body["messages"][0]["content"]
        return completion("Yes." if "Answer: bigger\n" in prompt else "No, it is not.")

    server = stub(reply)
    monkeypatch.setenv("STUB_JUDGE_KEY", "sk-test")
    judge = ev.HTTPJudge(server.url, "judge-1", api_key_env="STUB_JUDGE_KEY", timeout=5, retries=0)
    instr = "Given an adjective, state its comparative form."
    assert judge.judge("adj_comp", instr, "bigger") is True
    assert judge.judge("adj_comp", instr, "big") is False
    assert judge.judge("adj_comp", instr, "bigger") is True  # memoised: no third request
    assert len(server.requests) == 2
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1"
    assert req["body"]["messages"] == [{"role": "user", "content": ev.judge_prompt("adj_comp", instr, "bigger")}]
    assert "Instruction: " + instr in req["body"]["messages"][0]["content"]
    # the reference counts only an exact "yes"
    strict = ev.HTTPJudge(server.url, "judge-1", timeout=5, retries=0, exact_yes=True)
    assert strict.judge("adj_comp", instr, "bigger") is False
    assert server.requests[-1]["auth"] is None


def test_read_decision():
    assert ev.read_decision("yes", exact=True) and not ev.read_decision("Yes", exact=True)
    assert ev.read_decision("**Yes**, it is", exact=False) and not ev.read_decision("no", exact=False)
    assert not ev.read_decision("", exact=False) and not ev.read_decision("yesterday", exact=False)


def test_http_judge_errors(stub, monkeypatch):
    calls = []

    def flaky(body):
        calls.append(1)
        return (503, {"error": "busy"}) if len(calls) == 1 else completion("yes")

    server = stub(flaky)
    monkeypatch.setattr(ev.time, "sleep", lambda s: None)
    assert ev.HTTPJudge(server.url, "m", retries=1, timeout=5).judge("can_fly", "i", "yes") is True
    assert len(calls) == 2  # retried once after the 503

    bad = stub(lambda body: (401, {"error": {"message": "invalid key"}}))
    with pytest.raises(OlmoIVError, match="HTTP 401.*invalid key"):
        ev.HTTPJudge(bad.url, "m", retries=3).judge("can_fly", "i", "yes")
    assert len(bad.requests) == 1  # a client error is not retried
    junk = stub(lambda body: (200, "not json"))
    with pytest.raises(OlmoIVError, match="choices"):
        ev.HTTPJudge(junk.url, "m", retries=0).judge("can_fly", "i", "yes")

    def slow(body):
        threading.Event().wait(1.0)  # not time.sleep, which is patched out above
        return completion("yes")

    sleepy = stub(slow)
    with pytest.raises(OlmoIVError, match="could not reach.*timeout"):
        ev.HTTPJudge(sleepy.url, "m", timeout=0.2, retries=0).judge("can_fly", "i", "yes")
    with pytest.raises(OlmoIVError, match="could not reach"):
        ev.HTTPJudge("http://127.0.0.1:9/v1", "m", timeout=2, retries=0).judge("can_fly", "i", "yes")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(OlmoIVError, match="NO_SUCH_KEY_VAR"):
        ev.HTTPJudge(server.url, "m", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(OlmoIVError, match="http"):
        ev.HTTPJudge("localhost:8000", "m")


# ------------------------------------------------------------------------------------------------- scoring


def fake(task, rows):
    """Samples shaped like olmo_iv.tasks.Sample: (query, gold) pairs with the registry's instruction."""
    from olmo_iv.tasks import get_task

    t = get_task(task)
    return [SimpleNamespace(task=t.name, query=q, answer=a, instruction=t.instruction,
                            clean=f"{t.instruction} {t.field}: {q}. Answer:") for q, a in rows]


def test_score_task_golden():
    samples = fake("adj_comp", [("dangerous", "more dangerous"), ("big", "bigger"), ("good", "better"),
                                ("small", "smaller")])
    gens = [" more dangerous.\n", " Bigger\n", " good", " the\n"]
    rows, s = ev.score_task("adjectives/adj_comp", samples, gens, mode="reference")
    assert [r.answer_reference for r in rows] == ["moredangerous", "bigger", "good", "the"]
    assert [r.em_reference for r in rows] == [False, True, False, False]
    assert [r.em_faithful for r in rows] == [True, True, False, False]
    assert [r.judge for r in rows] == [True, True, False, False]
    assert [r.in_options for r in rows] == [None] * 4  # adjective tasks have no options: no option score, not 0
    assert (s.n, s.em, s.em_reference, s.em_faithful, s.option_ia, s.judge_ia, s.ia, s.ia_source) == (
        4, 25.0, 25.0, 50.0, None, 50.0, 50.0, "judge:rules")
    _, f = ev.score_task("adjectives/adj_comp", samples, gens, mode="faithful")
    assert (f.em, f.option_ia, f.ia) == (50.0, None, 50.0)  # faithful: no options, no option score

    fly = fake("can_fly", [("bear", "no"), ("crow", "yes"), ("bat", "yes"), ("cow", "no"), ("emu", "no")])
    gens = [" no\n", " Yes.", " it can", " yes<|im_end|>", ""]
    rows, s = ev.score_task("animals/can_fly", fly, gens, mode="reference")
    assert [r.in_options for r in rows] == [True, True, False, True, False]
    assert all(r.judge is None for r in rows)  # the reference never judges can_fly: IA = the option score
    assert (s.em, s.option_ia, s.judge_ia, s.ia, s.ia_source) == (40.0, 60.0, None, 60.0, "options")
    _, f = ev.score_task("animals/can_fly", fly, gens, mode="faithful")
    assert (f.em, f.option_ia, f.judge_ia, f.ia, f.ia_source) == (40.0, 60.0, 60.0, 60.0, "judge:rules")

    count = fake("object_counting", [("x", "3"), ("y", "12")])
    rows, s = ev.score_task("bigbench/object_counting", count, [" 3", " 25"], mode="reference")
    assert [r.in_options for r in rows] == [True, False] and [r.judge for r in rows] == [True, True]
    assert (s.em, s.option_ia, s.ia) == (50.0, 50.0, 100.0)

    with pytest.raises(OlmoIVError, match="2 samples but 1 generations"):
        ev.score_task("bigbench/object_counting", count, [" 3"])
    assert ev.task_options("bigbench/object_counting") == tuple(str(i) for i in range(21))
    assert ev.task_options("anim_color")[:3] == ("red", "orange", "yellow")


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer model with OLMo-2's vocabulary and an OLMo-2-equivalent tokenizer."""
    from tests.conftest import make_olmo2_vocab_checkpoint

    return make_olmo2_vocab_checkpoint(tmp_path_factory, n_layers=2)


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_eval_files_numbers_and_resume(tmp_path, checkpoint, monkeypatch):
    import olmo_iv
    from olmo_iv.generate import generate_text
    from olmo_iv.tasks import samples

    s = ev.EvalSettings(samples=6, max_new_tokens=4, batch_size=4)
    tasks = ["adj_comp", "animals/can_fly"]
    out = tmp_path / "run"
    summary = run_eval([checkpoint], tasks, s, out)
    assert [r["task"] for r in summary] == ["adjectives/adj_comp", "animals/can_fly"]
    model = olmo_iv.load(checkpoint)
    mdir = out / slug(checkpoint)
    for row in summary:
        data = samples(row["task"], n=6)
        per = read_csv(mdir / f"{slug(row['task'])}.csv")
        # the CSV holds what generation gives on these prompts, and the summary is the mean of its rows
        expect = generate_text(model, [d.clean for d in data], max_new_tokens=4, skip_special_tokens=True)
        assert [p["generation"] for p in per] == expect
        assert [p["prompt"] for p in per] == [d.clean for d in data]
        assert [p["gold"] for p in per] == [d.answer for d in data]
        for key in ("em_reference", "em_faithful"):
            assert row[key] == 100 * sum(p[key] == "True" for p in per) / 6
        if any(p["in_options"] for p in per):
            assert row["option_ia"] == 100 * sum(p["in_options"] == "True" for p in per) / 6
        else:  # a task without options has no option IA (empty, not 0)
            assert row["option_ia"] is None
        assert [p["answer_reference"] for p in per] == [ev.postprocess_reference(g, row["task"]) for g in expect]
    meta = json.loads((out / "summary.json").read_text())
    assert meta["settings"]["max_new_tokens"] == 4 and meta["settings"]["judge"] == "rules"
    assert "torch" in meta["versions"] and meta["scores"] == summary
    assert len(read_csv(out / "summary.csv")) == 2
    png = (out / "figure12.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the same run again: finished, nothing recomputed; other settings on a run with results: refused
    def boom(*a, **k):
        raise AssertionError("evaluate_task should not run")

    monkeypatch.setattr(runs_eval, "evaluate_task", boom)
    with pytest.raises(RunFinished):
        run_eval([checkpoint], tasks, s, out)
    with pytest.raises(OlmoIVError, match="other settings"):
        run_eval([checkpoint], tasks, ev.EvalSettings(samples=6, max_new_tokens=3), out)
    with pytest.raises(OlmoIVError, match="unknown task"):
        run_eval([checkpoint], ["adj_nope"], s, out)
    with pytest.raises(OlmoIVError, match="dtype"):
        run_eval([checkpoint], tasks, ev.EvalSettings(dtype="float33"), out)


def test_cli_with_http_judge(tmp_path, checkpoint, stub):
    from olmo_iv.cli.main import _typer_app
    from typer.testing import CliRunner

    server = stub(lambda body: completion("yes"))
    args = ["eval", "--model", checkpoint, "--task", "adj_ant", "--samples", "5", "--max-new-tokens", "3",
            "--judge", "http", "--judge-url", server.url, "--judge-model", "stub-judge", "--mode", "reference",
            "--out", str(tmp_path)]
    result = CliRunner().invoke(_typer_app, args)
    assert result.exit_code == 0, result.output
    assert "adj_ant" in result.output and "100.0" in result.output
    per = read_csv(tmp_path / slug(checkpoint) / "adjectives_adj_ant.csv")
    assert {p["judge"] for p in per} == {"True"}
    assert len(server.requests) == len({p["answer_reference"] for p in per})  # one call per distinct answer
    meta = json.loads((tmp_path / "summary.json").read_text())
    assert meta["settings"]["judge"] == f"http:stub-judge@{server.url}:exact-yes"

    bad = CliRunner().invoke(_typer_app, ["eval", "--model", checkpoint, "--judge", "http", "--out", str(tmp_path)])
    assert isinstance(bad.exception, OlmoIVError) and "--judge-url" in str(bad.exception)


# ------------------------------------------------------------------------------------------ the toy model

TOY = Path(olmo_iv.__file__).parent / "models" / "toy"


@pytest.mark.skipif(not (TOY / "training.json").exists(), reason="olmo_iv/models/toy is not built yet")
def test_toy_scores_match_its_training_report(tmp_path):
    """The shipped toy scores what its training report says, on the Table-1 instruction of each subtask: the
    report's protocol (first line, stripped, == label; 6 new tokens) recomputed from our generations."""
    report = json.loads((TOY / "training.json").read_text())
    expected = report["metrics"]["accuracy_table1"]
    s = ev.EvalSettings(max_new_tokens=6, batch_size=64)
    summary = run_eval(["toy"], list(expected), s, tmp_path / "run")
    for row in summary:
        per = read_csv(tmp_path / "run" / "toy" / f"{slug(row['task'])}.csv")
        strip_em = sum(p["generation"].split("\n")[0].strip() == p["gold"] for p in per) / len(per)
        want = expected.get(row["task"], expected.get(ev.short_name(row["task"])))
        assert strip_em == pytest.approx(want, abs=1e-12), row["task"]
        assert row["em_faithful"] >= 100 * strip_em - 1e-9  # faithful only forgives punctuation and case
