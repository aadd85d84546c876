"""SAIF data (olmo_iv.tasks.saif) and the judges of SAIF's types (olmo_iv.evals.judges)."""

import json
import re
import threading
from collections import Counter
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from olmo_iv.errors import OlmoIVError
from olmo_iv.evals import judges as J
from olmo_iv.tasks import saif as S
from olmo_iv.toy import steer as T

ALL = [(src, t) for src in S.SOURCES for t in S.saif_types(src)]


# ---------------------------------------------------------------------------------------------------- data


def test_deterministic_and_seeded():
    for src, t in [("saif", "keywords"), ("toy-steer", "language:response_language")]:
        a = S.build_samples(src, t, n=12, seed=3)
        assert a == S.build_samples(src, t, n=12, seed=3)
        assert [s.content for s in a] != [s.content for s in S.build_samples(src, t, n=12, seed=4)]


def test_golden_samples():
    s = S.build_samples("saif", "keywords", n=3, split="test")[2]
    assert (s.variant, s.kwargs) == ("fr/1", {"keyword": "pepper"})
    assert s.positive == ("Write a weird and short haiku about the state of Gujarat.\n\n"
                          "Veuillez inclure le mot pepper dans votre réponse.")
    s = S.build_samples("saif", "summarize", n=2, placement="pre", seed=1)[1]
    assert (s.variant, s.kwargs) == ("en/2", {})
    assert s.positive == ("Give a brief summary of the text.\n\n"
                          "Write an interesting and funny article about the biology of a banana peel.")
    s = S.build_samples("toy-steer", "keywords:existence", n=3, split="test")[2]
    assert (s.variant, s.kwargs) == ("en/19", {"keywords": ["banana"]})
    assert s.positive == ("Draft a clever review about the journey for Walter. "
                          "Use the keyword banana in your answer, please.")


def test_positive_negative_and_placement():
    for src, t in ALL:
        post = S.build_samples(src, t, n=10, placement="post", split="test")
        pre = S.build_samples(src, t, n=10, placement="pre", split="test")
        for a, b in zip(post, pre):
            # paired: the same content, variant and instruction, only the placement differs
            assert (a.content, a.instruction, a.variant, a.kwargs) == (b.content, b.instruction, b.variant, b.kwargs)
            assert a.negative == b.negative == a.content
            sep = " " if src == "toy-steer" else "\n\n"
            assert a.positive == a.content + sep + a.instruction
            assert b.positive == b.instruction + sep + b.content
            if src == "toy-steer":  # exactly the toy's own user message
                c = SimpleNamespace(text=a.content)
                assert a.positive == T.message(c, a.instruction, "post")
                assert b.positive == T.message(c, b.instruction, "pre")


def test_instruction_is_its_variant_and_variants_are_balanced():
    for src, t in ALL:
        table = S.phrasings(src, t, "train")
        samples = S.build_samples(src, t, n=len(table) * 2 + 3, seed=5)
        counts = Counter(s.variant for s in samples)
        assert set(counts) == set(table) and max(counts.values()) - min(counts.values()) <= 1
        for s in samples:
            assert s.type == t and s.variant.split("/")[0] == s.language
            kw = s.kwargs.get("keyword") or (s.kwargs.get("keywords") or [""])[0]
            assert s.instruction == table[s.variant].replace("{kw}", kw).replace("{end}", T.D.END_PHRASE)
            assert "{" not in s.instruction
        chosen = ["en/0" if "en/0" in table else next(iter(table))]
        one = S.build_samples(src, t, n=4, variants=chosen, seed=5)
        assert {s.variant for s in one} == set(chosen)
        assert [s.content for s in one] == [s.content for s in samples[:4]]  # variants do not change the draws


def test_variant_counts():
    for t in S.saif_types("saif"):
        langs = Counter(v.split("/")[0] for v in S.variant_names("saif", t))
        assert langs["en"] >= 8 and all(langs[lang] >= 2 for lang in ("fr", "de", "es", "zh"))
        train = Counter(v.split("/")[0] for v in S.variant_names("saif", t, "train"))
        assert train["en"] >= 8 and all(train[lang] >= 2 for lang in ("fr", "de", "es", "zh"))
        assert len(set(S.phrasings("saif", t).values())) == len(S.variant_names("saif", t))
    assert len(S.saif_types("toy-steer")) == 8
    for t in S.saif_types("toy-steer"):
        langs = Counter(v.split("/")[0] for v in S.variant_names("toy-steer", t, "train"))
        assert set(langs) == {"en", "fr", "de", "es"} and min(langs.values()) >= 8


def test_train_test_disjoint():
    _, cfg, split = S._toy()
    for src, t in ALL:
        train, test = set(S.variant_names(src, t, "train")), set(S.variant_names(src, t, "test"))
        assert train and test and not train & test and train | test == set(S.variant_names(src, t))
        tr = [s for seed in range(3) for s in S.build_samples(src, t, n=40, seed=seed)]
        te = [s for seed in range(3) for s in S.build_samples(src, t, n=40, split="test", seed=seed)]
        assert not {s.content for s in tr} & {s.content for s in te}
        assert not {s.variant for s in tr} & {s.variant for s in te}
        if src == "toy-steer":  # the split the shipped checkpoint was trained with
            lang_test = {p for lang in T.D.LANGUAGES for p in split.heldout[(t, lang)]}
            assert set(S.phrasings(src, t, "test").values()) == lang_test
            assert all(T.is_heldout(T.Content(*_parse_toy(s.content)), cfg) for s in te)
            assert not any(T.is_heldout(T.Content(*_parse_toy(s.content)), cfg) for s in tr)
    for t in S.SAIF_TYPES:
        assert not set(S.saif_contents(t, "train")) & set(S.saif_contents(t, "test"))


def _parse_toy(text):
    m = re.fullmatch(r"(.+?) a (\w+) (\w+) about the (\w+) for (\w+)\.", text)
    return m.groups()


def test_saif_contents():
    for t in S.SAIF_TYPES:
        low, high = S.CONTENT_WORDS[t]
        both = S.saif_contents(t, "train") + S.saif_contents(t, "test")
        assert len(both) >= 250 and len(set(both)) == len(both)
        assert 0.15 < len(S.saif_contents(t, "test")) / len(both) < 0.35
        for c in both:
            assert low <= len(re.findall(r"\w+", c)) <= high and not S.LEFTOVER.search(c)
    # the filter drops leftover constraints the stripping missed
    assert S.LEFTOVER.search("Write a song about vegetables. Please make sure it is in English.")
    assert S.LEFTOVER.search("Write a limerick about Rodney. Use less than 100 words.")
    # a keyword sample never asks for a word its content already has
    for s in S.build_samples("saif", "keywords", n=300):
        assert s.kwargs["keyword"].lower() not in s.content.lower() and s.kwargs["keyword"] in s.instruction


def test_bad_inputs():
    cases = [
        (dict(source="nope", itype="keywords", n=1), "source="),
        (dict(source="saif", itype="keywords:existence", n=1), "itype="),
        (dict(source="saif", itype="keywords", n=0), "n=0"),
        (dict(source="saif", itype="keywords", n=2.0), "n=2.0"),
        (dict(source="saif", itype="keywords", n=1, placement="middle"), "placement="),
        (dict(source="saif", itype="keywords", n=1, split="dev"), "split="),
        (dict(source="saif", itype="keywords", n=1, seed="0"), "seed="),
        (dict(source="saif", itype="keywords", n=1, variants=[]), "variants="),
        (dict(source="saif", itype="keywords", n=1, variants="en/0"), "variants="),
        (dict(source="saif", itype="keywords", n=1, variants=["xx/0"]), "variants="),
        (dict(source="saif", itype="keywords", n=1, variants=["en/0", "en/0"]), "twice"),
        (dict(source="saif", itype="keywords", n=1, variants=S.variant_names("saif", "keywords", "test")[:1]),
         "not train variants"),
    ]
    for kw, msg in cases:
        with pytest.raises(OlmoIVError, match=re.escape(msg)):
            S.build_samples(kw.pop("source"), kw.pop("itype"), **kw)
    with pytest.raises(OlmoIVError, match="split="):
        S.variant_names("saif", "keywords", "dev")


# ---------------------------------------------------------------------------------------------------- rule judge


def sample(itype, content="x", kwargs=None, instruction="i", source_sep="\n\n"):
    return S.SaifSample(itype, content, instruction, "en/0", "post", kwargs or {}, source_sep)


def verdicts(s, outputs):
    j = J.RuleJudge()
    return [(v.strict, v.loose) for v in (j.judge(s, o) for o in outputs)]


def test_rule_judge_translate():
    s = sample("translate_fr", "The cat sleeps in the sun every afternoon.", {"language": "fr"})
    assert verdicts(s, [
        "Le chat dort au soleil tous les après-midi.",
        # a long English preamble outweighs the French; without the first line it is French
        "Of course, here is my translation of your sentence about the cat into the French language for you today:\n"
        "Le chat dort au soleil.",
        "The cat sleeps in the sun, le chat dort au soleil tous les après-midi.",  # half translated
        "The cat sleeps in the sun every afternoon.",
        "   ",
    ]) == [(True, True), (False, True), (False, True), (False, False), (False, False)]


def test_rule_judge_summarize():
    content = ("The city council met on Monday to discuss the new bicycle lanes downtown, the budget for repairing "
               "old bridges, and a plan to plant two thousand trees along the river before next spring.")
    s = sample("summarize", content)
    assert verdicts(s, [
        "Council discussed bicycle lanes, bridge repairs and planting trees.",       # short, on topic
        "The council talked about several things, including bicycle lanes, a budget for bridges, and some "
        "trees, during a long meeting this week in the city.",                        # shorter, but not half
        "Football is a popular sport played around the globe.",                       # short, off topic
        content + " That is all.",                                                   # longer than the content
    ]) == [(True, True), (False, True), (False, False), (False, False)]


def test_rule_judge_keywords():
    s = sample("keywords", kwargs={"keyword": "lantern"})
    assert verdicts(s, ["A LANTERN glowed.", "The lantern's light.", "Two lanterns glowed.", "A lamp glowed.", ""]) \
        == [(True, True), (True, True), (False, True), (False, False), (False, False)]


def test_rule_judge_ifeval_types():
    cap = sample("change_case:english_capital")
    assert verdicts(cap, ["SURE, ANNA, HERE IS A SHORT POEM.", "Sure:\nSURE, ANNA, HERE IS A SHORT POEM.",
                          "Sure, Anna, here is a short poem."]) == [(True, True), (False, True), (False, False)]
    kw = sample("keywords:existence", kwargs={"keywords": ["banana"]})
    assert verdicts(kw, ["Bananas are here.", "No fruit."]) == [(True, True), (False, False)]
    end = sample("startend:end_checker", kwargs={"end_phrase": T.D.END_PHRASE})
    assert verdicts(end, [f"Sure. {T.D.END_PHRASE}", f"Sure. {T.D.END_PHRASE}\nBye."]) == [(True, True), (False, True)]
    # the same verdicts as the IFEval scorer on the same texts
    from olmo_iv.evals.ifeval import InputExample, score_example

    for o in ["SURE.", "Sure:\nSURE.", "sure."]:
        row = score_example(InputExample(0, cap.positive, (cap.type,), ({},)), o)
        assert verdicts(cap, [o]) == [(row.strict[0], row.loose[0])]


def test_rule_judge_on_built_samples():
    # negatives (the content itself) fail; hand-made followers pass, for every SAIF type and a few toy types
    j = J.RuleJudge()
    for t in S.SAIF_TYPES:
        for s in S.build_samples("saif", t, n=5, split="test"):
            assert not j.judge(s, s.content).strict
    for s in S.build_samples("saif", "keywords", n=5, split="test"):
        assert j.judge(s, f"{s.content} ({s.kwargs['keyword']})").strict
    for t in ["startend:quotation", "punctuation:no_comma", "language:response_language"]:
        for s in S.build_samples("toy-steer", t, n=5, split="test"):
            c = T.Content(*_parse_toy(s.content))
            target, _ = T.transform(t, c, "banana")
            assert j.judge(s, target).strict and not j.judge(s, c.default).strict


def test_rule_judge_errors():
    with pytest.raises(OlmoIVError, match="sample.type="):
        J.RuleJudge().judge(sample("uppercase"), "X")
    with pytest.raises(OlmoIVError, match="keyword"):
        J.RuleJudge().judge(sample("keywords"), "X")
    with pytest.raises(OlmoIVError, match="summary_ratio="):
        J.RuleJudge(summary_ratio=0)
    with pytest.raises(OlmoIVError, match="fr_loose_prob="):
        J.RuleJudge(fr_loose_prob=0.95)
    with pytest.raises(OlmoIVError, match="keywords:existence needs kwarg"):
        J.RuleJudge().judge(sample("keywords:existence"), "X")


def test_accuracy_and_judge_all():
    s = sample("keywords", kwargs={"keyword": "lantern"})
    v = J.judge_all(J.RuleJudge(), [s, s, s], ["lantern", "lanterns", "no"])
    assert J.accuracy(v) == {"n": 3, "strict": 1 / 3, "loose": 2 / 3}
    with pytest.raises(OlmoIVError, match="2 samples but 1 outputs"):
        J.judge_all(J.RuleJudge(), [s, s], ["x"])


# ---------------------------------------------------------------------------------------------------- HTTP judge

KEY = "sk-secret-123456"


class Fake:
    """A chat-completions endpoint on 127.0.0.1 that checks the Bearer key and answers from a list."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    code, out = 401, {"error": f"bad key {self.headers.get('Authorization')}"}  # echoes it
                else:
                    code, out = 200, {"choices": [{"message": {"role": "assistant", "content": fake.replies.pop(0)}}]}
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_judge_fake_server(monkeypatch):
    monkeypatch.setenv("SAIF_TEST_KEY", KEY)
    replies = ['{"label": "STRICT", "rationale": "all French"}',
               '```json\n{"label": "loose", "rationale": "half"}\n```',
               "Label: FAIL. It answered in English.",
               "I am not sure."]
    fake = Fake(replies)
    try:
        judge = J.HTTPJudge(fake.url, "judge-1", api_key_env="SAIF_TEST_KEY", timeout=5, retries=0)
        s = sample("translate_fr", "The cat sleeps.", {"language": "fr"}, instruction="Traduis le texte en français.")
        assert judge.judge(s, "Le chat dort.") == J.Verdict(True, True, "all French")
        assert judge.judge(s, "Le chat sleeps.") == J.Verdict(False, True, "half")
        v = judge.judge(s, "The cat sleeps.")
        assert (v.strict, v.loose) == (False, False) and "English" in v.rationale
        with pytest.raises(OlmoIVError, match="no single STRICT / LOOSE / FAIL"):
            judge.judge(s, "?")
        req = fake.requests[0]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
        assert req["body"]["model"] == "judge-1"
        prompt = req["body"]["messages"][0]["content"]
        assert prompt == J.rubric_prompt(s, "Le chat dort.")
        assert "Instruction: Translate the text into French." in prompt and "The cat sleeps." in prompt
        assert "Le chat dort." in prompt
        # the key is read when judging, never kept: not in repr, not in asdict
        assert KEY not in repr(judge) and KEY not in json.dumps(asdict(judge))
        # a wrong key: the server's 401 echoes it; the error names the URL and hides the key
        monkeypatch.setenv("SAIF_TEST_KEY", "sk-wrong-999")
        with pytest.raises(OlmoIVError) as err:
            judge.judge(s, "x")
        assert fake.url in str(err.value) and "401" in str(err.value) and "sk-wrong-999" not in str(err.value)
        monkeypatch.delenv("SAIF_TEST_KEY")
        with pytest.raises(OlmoIVError, match="SAIF_TEST_KEY"):
            judge.judge(s, "x")
    finally:
        fake.close()
    with pytest.raises(OlmoIVError, match=re.escape("127.0.0.1:9")):
        J.HTTPJudge("http://127.0.0.1:9/v1", "m", api_key_env=None, timeout=2, retries=0).judge(s, "x")
    with pytest.raises(OlmoIVError, match="base_url="):
        J.HTTPJudge("localhost:8000", "m")
    with pytest.raises(OlmoIVError, match="timeout="):
        J.HTTPJudge("http://x", "m", timeout=0)


def test_parse_verdict():
    assert J.parse_verdict('Sure! {"verdict": "Fail", "reason": "no"} done') == J.Verdict(False, False, "no")
    assert J.parse_verdict("STRICT").strict and J.parse_verdict("**LOOSE**").loose
    assert not J.parse_verdict("The response fails.").loose
    for bad in ["", "strictly loosely", "STRICT or LOOSE?", '{"label": "maybe"}']:
        with pytest.raises(OlmoIVError):
            J.parse_verdict(bad)
    kw = sample("keywords", kwargs={"keyword": "lantern"}, instruction="Inclus le mot lantern.")
    assert "Instruction: Include the word lantern in the response." in J.rubric_prompt(kw, "o")
    toy = sample("startend:quotation", instruction="Please wrap it in quotes.")
    assert "Instruction: Please wrap it in quotes." in J.rubric_prompt(toy, "o")
