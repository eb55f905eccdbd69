"""Tests for ivft/ifeval.py (every checker passes and fails on hand-written replies; strict vs loose;
the four scores by hand) and data/make_ifeval.py (the committed files are current, big enough, and
share no prompt with each other or with the task suite). Fast: no model."""
import filecmp
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from ivft import ifeval

C = lambda kind, **args: {"kind": kind, "args": args}   # noqa: E731 (a constraint, as the file holds it)

# kind -> (constraint, replies that follow it, replies that do not)
CASES = {
    "lowercase": (C("lowercase"), ["tea is best with milk.\n\nreally."], ["Tea is best.", "123", ""]),
    "uppercase": (C("uppercase"), ["DRINK WATER, 2 LITRES!"], ["DRINK Water.", "..."]),
    "max_words": (C("max_words", n=5), ["One two three four five.", "Don't well-known x y z"],
                  ["One two three four five six.", ""]),
    "min_words": (C("min_words", n=4), ["a b c d", "Plant them deep in soil."], ["a b c", ""]),
    "max_sentences": (C("max_sentences", n=2), ["It rains. Stay in!", "Pi is 3.14 today."],
                      ["One. Two. Three.", "Hi?\nYes.\nNo.", ""]),
    "paragraphs": (C("paragraphs", n=2), ["First part.\n\nSecond part.", "A\n  \nB\n"],
                   ["One block\nstill one.", "A\n\nB\n\nC"]),
    "include_word": (C("include_word", word="light"), ["Sunlight is LIGHT, scattered.", "light"],
                     ["Sunlight scatters.", "lighter air"]),
    "avoid_word": (C("avoid_word", word="water"), ["Drink plenty of fluids.", "Watery soup."],
                   ["Boil the Water.", "water", ""]),
    "start_phrase": (C("start_phrase", phrase="Sure thing"), ["sure  thing! Here it is.", "\nSure thing"],
                     ["Well, sure thing.", "Sure"]),
    "end_phrase": (C("end_phrase", phrase="Hope this helps."), ["Boil it.\nHope this helps.  \n"],
                   ["Hope this helps. Bye.", "Hope this helps"]),
    "bullets": (C("bullets", n=3), ["Tips:\n* a\n* b\n- c", "• x\n• y\n• z"],
                ["* a\n* b", "**Bold**\n* a\n* b", "* a\n* b\n* c\n* d"]),
    "quoted": (C("quoted"), ['"Tea, then bed."', '  "x"\n'], ['Tea "then" bed.', '"', '"open']),
    "json": (C("json"), ['{"tips": ["a", "b"]}', '```json\n{"a": 1}\n```', "[1, 2]"],
             ["{tips: a}", "Here: {\"a\": 1}", ""]),
    "no_commas": (C("no_commas"), ["Salt and pepper."], ["Salt, pepper.", " "]),
    "title": (C("title"), ["<<Tea Time>>\nBoil water."], ["<Tea>", "<<>>", "<<Tea\nTime>>"]),
}


def test_every_kind_has_a_case():
    assert set(CASES) == set(ifeval.CHECKERS) and len(CASES) >= 10


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checker_passes_and_fails(kind):
    constraint, good, bad = CASES[kind]
    for reply in good:
        assert ifeval.check(reply, constraint), f"{kind} should accept {reply!r}"
    for reply in bad:
        assert not ifeval.check(reply, constraint), f"{kind} should reject {reply!r}"


def test_counters_by_hand():
    assert ifeval.count_words("Don't stop, well-known 3 cats!") == 5   # 3 is a word
    assert ifeval.count_sentences("It is 3.5 m. Why? Because!\n* a bullet") == 4
    assert ifeval.paragraphs("a\n\n\nb\n \nc") == ["a", "b", "c"]


def test_loose_forgives_an_opener_a_closer_and_markdown():
    title, lower = C("title"), C("lowercase")
    # an opening line in capitals fails lowercase strictly; without it the reply follows
    reply = "Sure! Here you go:\nboil the water.\nthen add tea."
    assert not ifeval.check(reply, lower) and ifeval.check_loose(reply, lower)
    # a title in bold is still a title, strictly (the stars sit outside the brackets)
    assert ifeval.check("**<<Tea>>**\ntext", title)
    ends = C("end_phrase", phrase="That is all.")
    assert not ifeval.check("Done. **That is all.**", ends) and ifeval.check_loose("Done. **That is all.**", ends)
    # a closing remark after the phrase: loose drops the last line
    assert ifeval.check_loose("Steps.\nThat is all.\nLet me know!", ends)
    # loose never accepts what no edit fixes
    assert not ifeval.check_loose("Nothing here.\nAt all.", title)
    assert ifeval.loose_variants("a\nb\nc")[:2] == ["a\nb\nc", "a\nb\nc"]


def test_scores_by_hand():
    records = [{"constraints": [C("no_commas"), C("title")]}, {"constraints": [C("uppercase")]},
               {"constraints": [C("lowercase")]}]
    pad = " and then some more words to make it an answer"      # 9 words: every reply answers (is_answer)
    replies = ["<<T>>\nno commas here" + pad, "YES." + pad.upper(), "Sure:\nok" + pad]
    v = ifeval.verdicts(records, replies)
    assert v["strict"] == [[True, True], [True], [False]]
    assert v["loose"] == [[True, True], [True], [True]]
    s = ifeval.scores(records, v)
    assert s["prompt_strict"] == pytest.approx(2 / 3) and s["inst_strict"] == pytest.approx(3 / 4)
    assert s["prompt_loose"] == 1.0 and s["inst_loose"] == 1.0
    assert s["per_kind"]["lowercase"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    # a reply of a few words answers nothing: it follows no constraint, however easy (amendment 3a)
    short = ifeval.verdicts(records, ["<<T>>\nno commas", "YES.", "ok"])
    assert short["strict"] == [[False, False], [False], [False]] and short["loose"] == short["strict"]
    assert ifeval.check("YES.", C("uppercase")) and not ifeval.is_answer("TOO LOWER CHAIR")
    assert ifeval.is_answer(" ".join(["word"] * ifeval.MIN_ANSWER_WORDS))
    assert not ifeval.is_answer(" ".join(["word"] * (ifeval.MIN_ANSWER_WORDS - 1)))
    with pytest.raises(ValueError, match="2 replies"):
        ifeval.verdicts(records, replies[:2])


def test_load_reports_bad_records(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"prompt": "p", "constraints": [{"kind": "rhyme", "args": {}}]}\n')
    with pytest.raises(ifeval.IFEvalError, match=r"x.jsonl:1: .*kind must be one of"):
        ifeval.load_ifeval(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ifeval.IFEvalError, match=r"x.jsonl:1: not JSON"):
        ifeval.load_ifeval(bad)
    with pytest.raises(ifeval.IFEvalError, match="make_ifeval"):
        ifeval.load_ifeval(tmp_path / "missing.jsonl")


# --- the data files ------------------------------------------------------------------------------

def test_committed_files_are_current_and_deterministic(tmp_path):
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "data" / "make_ifeval.py"), "--out_dir", str(tmp_path / out)],
                       check=True, capture_output=True)
    for name in ("ifeval.jsonl", "everyday.jsonl", "ifeval_dev.jsonl", "everyday_dev.jsonl"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False)
        assert filecmp.cmp(tmp_path / "a" / name, ROOT / "data" / name, shallow=False), \
            f"data/{name} is stale: run python data/make_ifeval.py"


def test_ifeval_file_size_kinds_and_wording():
    records = ifeval.load_ifeval()
    assert len(records) >= 200
    kinds = {c["kind"] for r in records for c in r["constraints"]}
    assert kinds == set(ifeval.CHECKERS) and len(kinds) >= 10
    assert all(1 <= len(r["constraints"]) <= 2 for r in records)
    assert len({r["prompt"] for r in records}) == len(records)
    # any per-stage subset (the first n) covers every kind
    assert {r["constraints"][0]["kind"] for r in records[:len(kinds)]} == kinds
    for r in records:
        assert r["prompt"].startswith(r["request"]) and len(r["prompt"]) > len(r["request"])


def test_everyday_prompts_are_held_out():
    everyday = [json.loads(line)["prompt"] for line in (ROOT / "data" / "everyday.jsonl").read_text().splitlines()]
    assert len(everyday) >= 200 and len(set(everyday)) == len(everyday)
    seen = {r["request"] for r in ifeval.load_ifeval()} | {r["prompt"] for r in ifeval.load_ifeval()}
    for path in sorted((ROOT / "data").glob("*.*.jsonl")):      # the task suite's splits
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            seen.add("\n".join(s for s in (r["instruction"], r["input"]) if s))
    assert not set(everyday) & seen


def test_dev_files_share_no_request_or_subject_with_the_test_files():
    # settings are chosen on the dev files (experiments/forgetting.py): no dev prompt may be a test one,
    # nor share its request (IF) or its subject (everyday)
    test, dev = ifeval.load_ifeval(), ifeval.load_ifeval(ROOT / "data" / "ifeval_dev.jsonl")
    assert len(dev) == 60 and {r["constraints"][0]["kind"] for r in dev} == set(ifeval.CHECKERS)
    assert not {r["request"] for r in dev} & {r["request"] for r in test}
    assert not {r["id"] for r in dev} & {r["id"] for r in test}
    read = lambda name: [json.loads(x)["prompt"] for x in (ROOT / "data" / name).read_text().splitlines()]  # noqa: E731
    ev_test, ev_dev = read("everyday.jsonl"), read("everyday_dev.jsonl")
    assert len(ev_dev) == len(set(ev_dev)) == 60
    # the generator's own lists (data/ is not a package): the dev subjects are none of the test ones
    spec = importlib.util.spec_from_file_location("make_ifeval", ROOT / "data" / "make_ifeval.py")
    M = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(M)
    assert not set(M.EVERYDAY_DEV_SUBJECTS) & set(M.EVERYDAY_SUBJECTS)
    assert all(any(s in p for s in M.EVERYDAY_DEV_SUBJECTS) for p in ev_dev)
    assert not set(ev_dev) & set(ev_test) and not set(ev_dev) & {r["prompt"] for r in test + dev}
