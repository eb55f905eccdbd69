"""Tests for ivft/ivprompts.py: the corruptions and the plain prompt form. score_prompts is tested
through the extraction (tests/test_extract_iv.py)."""
import random

from toys import PAIRS, SMALL, TEXT_TOK as TOK, standin_task
from ivft.ivprompts import corrupted_prompts, plain_prompt
from ivft.ivsettings import Settings
from ivft.tasks import Example


def test_corruptions():
    task = standin_task()
    s = Settings(shots=3, corrupt="shuffled", format="chat", **SMALL)
    cor = corrupted_prompts(TOK, task, task.train[:4], s, random.Random(0))
    text = TOK.decode(cor[0].ids)
    assert "opposite" not in text          # no instruction
    pairs = dict(PAIRS)
    # every demonstration's answer was moved to another input
    demos = text.split("user\n")[1:-1]
    assert len(demos) == 3 and all(pairs[d.split("\n")[0]] != d.split("assistant\n")[1].split("\n")[0]
                                   for d in (x + "" for x in demos))
    s = Settings(corrupt="mismatched", format="chat", **SMALL)
    other = standin_task("t2", "Spell the word.")
    cor = corrupted_prompts(TOK, task, task.train[:2], s, random.Random(0), other)
    assert "Spell the word." in TOK.decode(cor[0].ids) and cor[0].answer == TOK.encode("cold") + [2]


def test_plain_prompt_form():
    ex = Example(instruction="Say the opposite.", input="hot", output="cold")
    demo = Example(instruction="Say the opposite.", input="up", output="down")
    p = plain_prompt(TOK, ex, [demo])
    assert TOK.decode(p.ids) == "Q: Say the opposite.\nup\nA: down\n\nQ: Say the opposite.\nhot\nA:"
    assert p.answer == TOK.encode(" cold\n")
    q = plain_prompt(TOK, ex, with_instruction=False)
    assert TOK.decode(q.ids) == "Q: hot\nA:"
    s = Settings()
    assert (s.format, s.corrupt, s.shots, s.effect) == ("plain", "query_only", 10, "auto")
