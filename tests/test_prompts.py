"""Tests for ivft/prompts.py: the prompt and answer ids, the exact-match and reply_contains rules,
demonstrations and answer candidates."""
import pytest

from ivft import prompts as P
from ivft.tasks import Example
from toys import TOK, make_task


# ---- prompts and answers ---------------------------------------------------------------------------

def test_render_prompt_shots_and_corruption():
    ex = Example(instruction="Say the opposite.", input="hot", output="cold")
    shot = Example(instruction="Say the opposite.", input="up", output=" down ")
    text = TOK.decode(P.render_prompt(TOK, ex, shots=[shot]))
    turns = text.count("<|im_start|>")
    assert turns == 4 and text.endswith("<|im_start|>assistant\n"), text
    assert text.count("Say the opposite.") == 2 and "assistant\ndown<|im_end|>" in text, text
    corrupted = TOK.decode(P.render_prompt(TOK, ex, shots=[shot], with_instruction=False))
    assert "Say the opposite." not in corrupted and "user\nhot<|im_end|>" in corrupted, corrupted
    with_system = TOK.decode(P.render_prompt(TOK, ex, system="Be brief."))
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>"), with_system


def test_answer_and_knowledge_ids():
    assert P.answer_ids(TOK, " cold ") == TOK.encode("cold") + [2]
    assert P.knowledge_ids(TOK, "Japan: capital is", "Tokyo") == (TOK.encode("Japan: capital is"), TOK.encode(" Tokyo"))
    # a trailing space moves to the answer; after a newline no space is added
    assert P.knowledge_ids(TOK, "capital is ", "Tokyo") == (TOK.encode("capital is"), TOK.encode(" Tokyo"))
    assert P.knowledge_ids(TOK, "Q: capital?\n", "Tokyo") == (TOK.encode("Q: capital?\n"), TOK.encode("Tokyo"))
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        P.answer_ids(TOK, "")


def test_real_tokenizer_prompt_convention():
    from ivft import load
    try:
        _, tok = load.load_model(None)
    except Exception as e:  # noqa: BLE001 - no embedded model here: nothing to check
        pytest.skip(f"embedded model unavailable: {e}")
    from ivft.tasks import user_prompt
    ex = Example(instruction="What is the opposite of the word?", input="hot", output="cold")
    ids = P.render_prompt(tok, ex)
    assert ids == tok.chat_prompt(user_prompt(ex))
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert P.answer_ids(tok, "cold") == tok.encode("cold") + [tok.special_tokens["<|im_end|>"]]
    corrupted = tok.decode(P.render_prompt(tok, ex, with_instruction=False))
    assert "opposite" not in corrupted and "user\nhot<|im_end|>" in corrupted


# ---- judging a reply ------------------------------------------------------------------------------

def test_normalize_answer():
    n = P.normalize_answer
    # presentation is forgiven: whitespace, quotes, markdown stars, final punctuation, first capital
    assert n("  Cold. ") == n("cold") == "cold"
    assert n('"Young, Victor."') == n("Young,  Victor") and n("**Paris**!") == "paris"
    # format is not: case beyond the first letter, inner punctuation, extra words
    assert n("tree morning") != n("TREE MORNING") and n("Tree Morning") != n("TREE MORNING")
    assert n("Young Victor") != n("Young, Victor") and n("m u s i c") != n("m-u-s-i-c")
    assert n("1987/03/18") != n("1987-03-18") and n("cold") != n("colder") and n("the cold") != n("cold")


def test_may_still_match_never_stops_a_match():
    # soundness of the early stop: every prefix of a reply that matches must be kept going...
    golds = ["cold", "TREE MORNING", "Young, Victor", "m-u-s-i-c", "U.S.", '"ca"', "Zürich"]
    decor = ["{}", "{}.", " {} ", '"{}"', "**{}**!", "{}.\"", "  {}\n", "`{}`?"]
    for gold in golds:
        replies = [d.format(g) for d in decor for g in (gold, gold[:1].upper() + gold[1:])]
        for reply in replies:
            assert P.normalize_answer(reply) == P.normalize_answer(gold), (reply, gold)
            for k in range(len(reply) + 1):
                assert P.may_still_match(reply[:k], gold), f"stopped {reply[:k]!r} of {reply!r} (gold {gold!r})"
    # ...and a reply that went wrong is stopped
    for partial, gold in [("The", "cold"), ("cold and", "cold"), ("tree", "TREE MORNING"), ("Young V", "Young, Victor"),
                          ("m u", "m-u-s-i-c"), ("cold.x", "cold"), ("colder", "cold")]:
        assert not P.may_still_match(partial, gold), (partial, gold)
    assert P.may_still_match("Z\ufffd", "Zürich")  # half a character: cannot judge yet


def test_reply_contains_rule():
    assert P.reply_contains("The capital of the United Kingdom is London.", "London")
    assert P.reply_contains("london", "London") and P.reply_contains("Cold.", "cold")
    assert P.reply_contains('The plural of "soldier" is "soldiers."', "soldiers")
    assert P.reply_contains("it is more  boring now", "more boring")     # whitespace collapsed
    assert not P.reply_contains("UNITED KINGDOM", "London")            # another task's format
    assert not P.reply_contains("LONDON", "London")                    # case kept after the first letter
    assert not P.reply_contains("Londoner", "London") and not P.reply_contains("moreboring", "more boring")
    # while decoding, a match at the very end is not settled until a following character shows
    assert not P.reply_contains("is London", "London", final=False)
    assert P.reply_contains("is London.", "London", final=False)


# ---- demonstrations and choices -------------------------------------------------------------------

def test_choice_candidates_fallback():
    outputs = [f"w{i}" for i in range(30)]
    task = make_task([Example("i", o, o) for o in outputs])
    c1 = P.choice_candidates(task, task.test[4], index=4, seed=0)
    assert len(c1) == 1 + P.N_DISTRACTORS and "w4" in c1 and len(set(c1)) == len(c1)
    assert c1 == P.choice_candidates(task, task.test[4], index=4, seed=0)
    assert c1 != P.choice_candidates(task, task.test[4], index=4, seed=1)
    small = make_task([Example("i", "a", "yes"), Example("i", "b", "no")], [Example("i", "c", "maybe")])
    assert P.choice_candidates(small, small.test[0]) == ["maybe", "no", "yes"]


def test_draw_shots_fixed_and_from_the_tasks_own_demos():
    train = [Example("Copy.", w, w) for w in ("ab", "cd", "ef", "gh", "ij")]
    task = make_task([Example("Copy.", w, w) for w in ("kl", "mn")], train)
    shots = P.draw_shots(task, 2, seed=3)
    assert shots == P.draw_shots(task, 2, seed=3) and len(shots) == 2
    # a task that ships its own demonstrations (SuperNI) draws from those, not from train
    task.demos = [Example("Copy.", "zz", "zz"), Example("Copy.", "yy", "yy")]
    assert sorted(ex.input for ex in P.draw_shots(task, 2, seed=3)) == ["yy", "zz"]
    # a real SuperNI task ships 2: k = 3 takes both and one train example
    three = P.draw_shots(task, 3, seed=3)
    assert len(three) == 3 and {"yy", "zz"} <= {ex.input for ex in three}


def test_chinese_answers_are_judged_as_words_are():
    # Chinese writes no spaces between words, so a gold needs no word boundary beside a Chinese
    # character; its full stop 。 is forgiven as "." is; spaced scripts keep whole-word matching
    assert P.reply_contains("法国的首都是巴黎。", "巴黎") and P.reply_contains("答案是apple。", "apple")
    assert P.reply_contains("首都是巴黎", "巴黎", final=False)            # nothing can follow that undoes it
    assert not P.reply_contains("首都是东京。", "巴黎")
    assert not P.reply_contains("a pineapple", "apple") and not P.reply_contains("apples", "apple")
    assert not P.reply_contains("is London", "London", final=False)        # it may still become "Londoner"
    assert P.normalize_answer("巴黎。") == P.normalize_answer("「巴黎」") == "巴黎"
    assert P.may_still_match("巴黎。", "巴黎") and not P.may_still_match("巴黎人", "巴黎")
