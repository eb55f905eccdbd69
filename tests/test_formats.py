"""Every command on every format users bring. Each file in tests/data/ (written for these tests) is
one shape: SuperNI of the older release ("Definition" a string, no instance ids) and the newer (a
list, ids, several reference answers), Alpaca in Chinese, Alpaca with a 3,000-character article,
TRACE as a folder and as one Chinese file. Each goes through the loading path of every command:
ivft.tasks.load_task, train.py's encoding (ivft.data.encode_task at --max_len 256), evaluate.py's
scores of one example, and extract_iv.py's clean and corrupted prompts scored on a tiny model. The
tokenizer is byte-level, so any text, Chinese included, has tokens."""
import math
import random
from pathlib import Path

import pytest

import evaluate as E
from ivft import tasks
from ivft.data import encode_task
from ivft.ivprompts import clean_prompts, corrupted_prompts, score_prompts
from ivft.ivsettings import Settings
from ivft.prompts import answer_ids, render_prompt
from ivft.tasks import Task
from toys import byte_tokenizer, tiny_model

DATA = Path(__file__).parent / "data"
FILES = ["superni_old.json", "superni_new.json", "alpaca_zh.json", "alpaca_long.jsonl", "trace_weather",
         "trace_stance_zh.json"]
TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=TOK.n_vocab)


def load(name):
    return tasks.load_task(str(DATA / name))


def examples(task):
    return list(task.train) + list(task.test)


def longest_first(task):
    """The task with its longest example as its only test example: evaluation sees the long input."""
    ex = sorted(examples(task), key=lambda e: -len(tasks.user_prompt(e)))
    return Task(task.name, task.kind, task.metric, ex[1:], ex[:1], demos=task.demos)


# ---- ivft.tasks.load_task: each shape read as its format means ------------------------------------------

def test_superni_old_release_definition_string_no_ids():
    t = load("superni_old.json")
    assert t.name == "superni_old" and len(examples(t)) == 10 and len(t.demos) == 2
    assert all(e.instruction.startswith("You are given the name of a thing.") for e in examples(t))
    assert {e.output for e in examples(t)} == {"living", "object"}      # a list of one, or a plain string
    assert all(e.choices == ["living", "object"] for e in examples(t))


def test_superni_new_release_definition_list_ids_several_answers():
    t = load("superni_new.json")
    # the list's strings are all kept; the first of several references is the target
    definition = "Given a word, write one English word that rhymes with it.\nAny rhyme is accepted."
    assert {e.instruction for e in examples(t)} == {definition}
    assert {(e.input, e.output) for e in examples(t)} >= {("bell", "well"), ("goat", "boat")}
    assert [d.output for d in t.demos] == ["hat", "spoon"]


def test_alpaca_chinese_text_is_kept_exactly():
    t = load("alpaca_zh.json")
    assert len(examples(t)) == 8
    ex = next(e for e in examples(t) if e.input == "法国")
    assert (ex.instruction, ex.output) == ("写出下面这个国家的首都。", "巴黎")
    assert any(e.input == "" for e in examples(t))                        # Alpaca leaves input empty
    for e in examples(t):
        assert TOK.decode(TOK.encode(tasks.user_prompt(e))) == tasks.user_prompt(e)


def test_long_article_is_loaded_whole():
    t = load("alpaca_long.jsonl")
    assert len(examples(t)) == 5 and max(len(e.input) for e in examples(t)) > 3000


def test_trace_folder_and_file_split_their_shared_instruction():
    folder = load("trace_weather")
    assert (len(folder.train), len(folder.test)) == (6, 2)               # eval.json is not read
    assert {e.instruction for e in examples(folder)} == {
        "Is the following sentence about the weather? Answer A for yes and B for no."}
    assert all(e.input.startswith("Sentence: ") and e.input.endswith("\nAnswer:") for e in examples(folder))
    zh = load("trace_stance_zh.json")
    assert {e.instruction for e in examples(zh)} == {"判断下面的文本对指定对象的态度，选择一项：支持，反对，中立。输出A，B或者C。"}
    assert {e.output for e in examples(zh)} == {"A", "B", "C"}


# ---- train.py: every example encoded, a too-long prompt cut from its start with a warning ------------------

@pytest.mark.parametrize("name", FILES)
def test_training_encodes_every_example_within_max_len(name, capsys):
    task = load(name)
    every = Task(task.name, task.kind, task.metric, examples(task), task.test)
    items = encode_task(TOK, every, 0, 256)
    assert len(items) == len(every.train)                                 # none dropped
    n_long = 0
    for ex, it in zip(every.train, items):
        full = render_prompt(TOK, ex, with_instruction=True)
        answer = answer_ids(TOK, ex.output)
        assert len(it.ids) <= 256 and it.ids[it.prompt_len:] == answer     # the whole answer, its end token
        assert it.ids[:it.prompt_len] == full[len(full) - it.prompt_len:]  # the prompt's end is kept
        n_long += len(full) + len(answer) > 256
    err = capsys.readouterr().err
    if n_long:
        assert f"training task {task.name!r}: {n_long} of {len(items)} examples are longer than " \
               f"--max_len 256 tokens" in err and err.count("warning:") == 1
    else:
        assert "warning" not in err
    assert (n_long > 0) == (name == "alpaca_long.jsonl")


# ---- evaluate.py: one example (the longest), every metric ------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_evaluate_scores_one_example(name, model):
    task = longest_first(load(name))
    out = E.evaluate_task(model, TOK, task, k_shot=1, progress=False)
    assert out["n"] == 1
    for m in E.CHAT_METRICS:
        for key in (m, m + E.KSHOT_SUFFIX):
            assert math.isfinite(out[key]) and (out[key] <= 0 if "logprob" in m else 0 <= out[key] <= 1), key


# ---- extract_iv.py: clean and corrupted prompts, scored, in both prompt formats ---------------------------

@pytest.mark.parametrize("fmt", ["plain", "chat"])
@pytest.mark.parametrize("name", FILES)
def test_extraction_prompts_score(name, fmt, model):
    task = longest_first(load(name))
    s = Settings(shots=2, format=fmt)
    rng = random.Random(0)
    queries = task.test + task.train[:1]
    clean = clean_prompts(TOK, task, queries, s, rng)
    corrupted = corrupted_prompts(TOK, task, queries, s, rng)
    for ex, c, k in zip(queries, clean, corrupted):
        text_clean, text_corrupted = TOK.decode(c.ids), TOK.decode(k.ids)
        assert ex.instruction in text_clean and ex.input in text_corrupted
        assert c.answer == k.answer and TOK.decode(c.answer[:-1]).strip() == ex.output   # then its end token
        if ex.instruction:                                                 # what the IV is to carry
            assert ex.instruction not in text_corrupted
    scores = score_prompts(model, clean + corrupted, record_z=True, batch_size=2)
    assert scores["z"].shape[:2] == (len(clean + corrupted), model.n_layers)
    assert all(math.isfinite(x) for x in scores["logprob"].tolist())
