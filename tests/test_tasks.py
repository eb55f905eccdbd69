"""Tests for tasks.py and data/make_tasks.py. Fast: no model, small fixtures written into tmp_path."""
import filecmp
import json
import os
import subprocess
import sys

import pytest

from ivft import tasks
from ivft.errors import TaskError
from ivft.tasks import Example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(path)


# --- loaders ----------------------------------------------------------------------------------

def test_trace_folder(tmp_path):
    write(tmp_path / "train.json", [{"prompt": "Classify: good movie", "answer": "A"}] * 3)
    write(tmp_path / "test.json", [{"prompt": "Classify: bad movie", "answer": "B"}])
    write(tmp_path / "eval.json", [{"prompt": "ignored", "answer": "C"}])
    t = tasks.load_task(str(tmp_path))
    assert (len(t.train), len(t.test)) == (3, 1)
    assert t.test[0] == Example("", "Classify: bad movie", "B")     # one-line prompts share no line
    assert tasks.user_prompt(t.test[0]) == "Classify: bad movie"


def test_trace_prompts_split_into_their_shared_instruction_and_input(tmp_path):
    # the leading lines every prompt shares, train and test alike, are the instruction; the prompt
    # itself is unchanged, and the input alone is what IV extraction's corrupted prompt keeps
    head = "What is the stance of the text? Answer A, B or C.\nBe brief."
    rows = [{"prompt": f"{head}\nText: {t}\nStance:", "answer": a} for t, a in (("up", "A"), ("down", "B"))]
    write(tmp_path / "train.json", rows)
    write(tmp_path / "test.json", [{"prompt": f"{head}\nText: flat\nStance:", "answer": "C"}])
    t = tasks.load_task(str(tmp_path))
    assert t.test[0] == Example(head, "Text: flat\nStance:", "C")
    assert [tasks.user_prompt(e) for e in t.train] == [r["prompt"] for r in rows]
    # every prompt keeps an input of its own: identical prompts are all input, a final newline stays
    for prompt in ("Say A.", "Say A.\n"):
        p = write(tmp_path / "same.json", [{"prompt": prompt, "answer": "A"}] * 3)
        assert {(e.instruction, e.input) for e in tasks.load_task(p).train} == {("", prompt)}


def test_trace_file_is_split_by_seed(tmp_path):
    p = write(tmp_path / "t.json", [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    a, b = tasks.load_trace(p, test_fraction=0.3, seed=1), tasks.load_trace(p, test_fraction=0.3, seed=1)
    assert len(a.test) == 3 and len(a.train) == 7
    assert [e.input for e in a.test] == [e.input for e in b.test]
    assert not {e.input for e in a.test} & {e.input for e in a.train}
    c = tasks.load_trace(p, test_fraction=0.3, seed=2)
    assert [e.input for e in c.test] != [e.input for e in a.test]


def superni(n=6):
    return {
        "Definition": ["Answer yes or no."],
        "Positive Examples": [{"input": "Is fire hot?", "output": "yes", "explanation": "."}],
        "Negative Examples": [],
        "Instances": [{"id": f"t-{i}", "input": f"q{i}", "output": ["yes" if i % 2 else "no", "y"]}
                      for i in range(n)],
    }


def test_superni(tmp_path):
    p = write(tmp_path / "task001_yesno.json", superni())
    t = tasks.load_task(p)
    assert t.name == "task001_yesno"
    assert len(t.train) + len(t.test) == 6
    e = (t.train + t.test)[0]
    assert e.instruction == "Answer yes or no." and e.output in ("yes", "no")  # first reference
    assert e.choices == ["no", "yes"]  # small label set becomes the answer set
    assert t.demos == [Example("Answer yes or no.", "Is fire hot?", "yes")]


def test_alpaca_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Add one.", "input": str(i), "output": str(i + 1)} for i in range(5)]
    rows.append({"instruction": "Say hi.", "output": "hi"})  # Alpaca omits or empties input
    t1 = tasks.load_task(write(tmp_path / "a.json", rows))
    t2 = tasks.load_task(write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"))
    for t in (t1, t2):
        assert len(t.train) + len(t.test) == 6
        assert Example("Say hi.", "", "hi") in t.train + t.test
    assert tasks.user_prompt(Example("Add one.", "4", "5")) == "Add one.\n4"


def test_suite_layout_pairs_train_and_test(tmp_path):
    row = {"instruction": "Copy.", "input": "x", "output": "x", "choices": ["x", "y"]}
    write(tmp_path / "copy.train.jsonl", json.dumps(row) + "\n" + json.dumps(row) + "\n")
    write(tmp_path / "copy.test.jsonl", json.dumps({**row, "input": "z", "output": "z", "choices": ["z", "y"]}) + "\n")
    t = tasks.load_task(str(tmp_path / "copy.train.jsonl"))
    assert t.name == "copy" and len(t.train) == 2 and t.test[0].input == "z"
    assert t.train[0].choices == ["x", "y"]
    assert (t.metric, t.kind) == ("exact_match", "train")


def test_suite_layout_meta_sets_metric_and_kind(tmp_path):
    row = json.dumps({"instruction": "Name it.", "input": "x", "output": "x"}) + "\n"
    for split in ("train", "test"):
        write(tmp_path / f"g.{split}.jsonl", row)
    write(tmp_path / "g.meta.json", json.dumps({"metric": "reply_contains", "kind": "general"}))
    t = tasks.load_task(str(tmp_path / "g.train.jsonl"))
    assert (t.name, t.metric, t.kind) == ("g", "reply_contains", "general")
    for meta, what in (({"metric": "bleu"}, "field 'metric' is 'bleu'"), ({"colour": "red"}, "some of the fields"),
                       ([1], "some of the fields"), ({"kind": 3}, "field 'kind' is 3")):
        write(tmp_path / "g.meta.json", json.dumps(meta))
        with pytest.raises(tasks.TaskError, match=f"g.meta.json: .*{what}"):
            tasks.load_task(str(tmp_path / "g.train.jsonl"))


def test_fv(tmp_path):
    p = write(tmp_path / "antonym.json", [{"input": f"w{i}", "output": f"o{i}"} for i in range(5)])
    t = tasks.load_task(p)
    assert t.name == "antonym" and len(t.test) == 1 and len(t.train) == 4
    e = t.test[0]
    assert e.instruction == "" and tasks.user_prompt(e) == e.input


# --- bad input: one clear TaskError naming file, line/item and field -------------------------

def test_malformed_jsonl_line(tmp_path):
    good = json.dumps({"instruction": "a", "input": "b", "output": "c"})
    p = write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{not json\n")
    with pytest.raises(TaskError, match=r"bad\.jsonl:3: malformed JSON"):
        tasks.load_task(p)


def test_missing_field_jsonl(tmp_path):
    p = write(tmp_path / "m.jsonl", json.dumps({"instruction": "a", "input": "b", "output": "c"}) + "\n"
              + json.dumps({"instruction": "a", "input": "b"}) + "\n")
    with pytest.raises(TaskError, match=r"m\.jsonl: line 2: missing field 'output'"):
        tasks.load_task(p)


@pytest.mark.parametrize("loader,rows,field,where", [
    (tasks.load_trace, [{"prompt": "p", "answer": "a"}, {"prompt": "p"}], "answer", "item 1"),
    (tasks.load_alpaca, [{"input": "x", "output": "y"}], "instruction", "item 0"),
    (tasks.load_fv, [{"input": "x", "output": "y"}, {"output": "y"}], "input", "item 1"),
])
def test_missing_field_json(tmp_path, loader, rows, field, where):
    p = write(tmp_path / "f.json", rows)
    with pytest.raises(TaskError, match=rf"f\.json: {where}: missing field '{field}'"):
        loader(p)


def test_superni_missing_field(tmp_path):
    d = superni()
    del d["Instances"][2]["output"]
    with pytest.raises(TaskError, match=r"s\.json: Instances\[2\]: missing field 'output'"):
        tasks.load_superni(write(tmp_path / "s.json", d))
    del d["Definition"]
    with pytest.raises(TaskError, match=r"s\.json: missing field 'Definition'"):
        tasks.load_superni(write(tmp_path / "s.json", d))


def test_malformed_json_names_line(tmp_path):
    p = write(tmp_path / "j.json", '[\n{"input": "x",\n "output": }\n]')
    with pytest.raises(TaskError, match=r"j\.json:3: malformed JSON"):
        tasks.load_fv(p)


@pytest.mark.parametrize("name,content,loader", [
    ("e.jsonl", "\n", tasks.load_alpaca),
    ("e.json", "[]", tasks.load_fv),
    ("e.json", json.dumps({"Definition": ["d"], "Instances": []}), tasks.load_superni),
])
def test_empty_task(tmp_path, name, content, loader):
    with pytest.raises(TaskError, match=r"e\.jsonl?: no examples"):
        loader(write(tmp_path / name, content))


def test_unknown_name_lists_known_tasks():
    with pytest.raises(TaskError) as e:
        tasks.load_task("no_such_task")
    msg = str(e.value)
    assert "no_such_task" in msg
    for name in tasks.list_tasks():
        assert name in msg


def test_unrecognised_format(tmp_path):
    with pytest.raises(TaskError, match=r"x\.json: format not recognised"):
        tasks.load_task(write(tmp_path / "x.json", [{"question": "q"}]))


def test_task_error_is_value_error():
    assert issubclass(TaskError, ValueError)


def test_load_tasks_is_every_scripts_loader(tmp_path):
    # one loader under train.py's flags (TrainError), extraction (ExtractError) and evaluate.py
    # (TaskError): names, files and Tasks in order, None = the default list, and a failure is one
    # error of the caller's class, its message after the caller's prefix
    from ivft.data import load_task_list
    from ivft.errors import ExtractError, TrainError
    from ivft.ivprompts import load_task_by_name
    path = write(tmp_path / "a.json", [{"instruction": "Add one.", "input": str(i), "output": str(i + 1)}
                                       for i in range(5)])
    capital = tasks.load_task("capital")
    got = tasks.load_tasks(["antonym", path, capital])
    assert [t.name for t in got] == ["antonym", tasks.load_task(path).name, "capital"] and got[2] is capital
    assert [t.name for t in tasks.load_tasks()] == tasks.general_suite()
    assert [t.name for t in tasks.load_tasks(None, tasks.default_sequence)] == tasks.default_sequence()
    for call, error, prefix in [(lambda n: tasks.load_tasks([n]), TaskError, "unknown task"),
                                (lambda n: load_task_by_name(n), ExtractError, "unknown task"),
                                (lambda n: load_task_list(n, "default_sequence", "training"), TrainError,
                                 "training tasks: unknown task")]:
        with pytest.raises(error) as e:
            call("no_such_task")
        assert str(e.value).startswith(f"{prefix} 'no_such_task'"), str(e.value)
    with pytest.raises(TrainError, match=r"^general tasks: .*b\.json: format not recognised"):
        load_task_list(write(tmp_path / "b.json", []), "general_suite", "general")


# --- the registry and the shipped suite -------------------------------------------------------

REGISTRY = tasks.list_tasks()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_task(name):
    t = tasks.load_task(name)
    assert t.name == name and t.kind in ("general", "train", "extra") and t.metric in tasks.METRICS
    assert t.train and t.test
    for e in t.train + t.test:
        assert e.instruction and e.input and e.output
        assert e.choices and e.output in e.choices and len(set(e.choices)) == len(e.choices)
        assert (e.knowledge_prompt is None) == (e.knowledge_answer is None)
        if e.knowledge_answer is not None:
            assert e.knowledge_answer.startswith(" ") and e.knowledge_answer.strip() == e.output
    # Held-out means held out: no test input appears among the task's training inputs.
    assert not {e.input for e in t.test} & {e.input for e in t.train}
    assert len({e.input for e in t.test}) == len(t.test)


def test_suite_sizes():
    general = tasks.general_suite()
    assert len(general) >= 6
    # Two lists are domain-limited: ~90 countries with one main language, ~100 adjectives.
    assert all(len(tasks.load_task(n).test) >= (60 if n in ("language", "comparative") else 100)
               for n in general)
    train_tasks = [n for n, t in REGISTRY.items() if t["kind"] == "train"]
    assert len(train_tasks) >= 4
    for n in train_tasks:
        t = tasks.load_task(n)
        assert len(t.train) >= 300 and len(t.test) >= 100 and t.metric == "exact_match"
    seq = tasks.default_sequence()
    assert len(seq) == 4 and len(set(seq)) == 4
    assert all(REGISTRY[n]["kind"] == "train" for n in seq)


def test_generator_is_deterministic_and_matches_shipped_files(tmp_path):
    script = os.path.join(ROOT, "data", "make_tasks.py")
    for d in ("a", "b"):
        subprocess.run([sys.executable, script, "--out_dir", str(tmp_path / d)], check=True,
                       capture_output=True)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "tasks.json" in names
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert not mismatch and not errors
    # The committed data/ is exactly what the default seed generates.
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tasks.DATA_DIR, names, shallow=False)
    assert not mismatch and not errors, f"data/ is stale; rerun data/make_tasks.py: {mismatch + errors}"
    # A different seed gives different splits.
    subprocess.run([sys.executable, script, "--out_dir", str(tmp_path / "c"), "--seed", "7"],
                   check=True, capture_output=True)
    assert not filecmp.cmp(tmp_path / "a" / "antonym.test.jsonl", tmp_path / "c" / "antonym.test.jsonl",
                           shallow=False)


# ---- users' files: wrong types, encodings, FV lines (one TaskError naming file, item and field) -----

@pytest.mark.parametrize("name,content,where,what", [
    ("a.json", [{"instruction": "Say it.", "input": "x", "output": 5}] * 3, "item 0", "must be a string, got int"),
    ("a.json", [{"instruction": "Say it.", "input": "x", "output": "  "}] * 3, "item 0", "'output' is empty"),
    ("a.jsonl", [{"instruction": "Say it.", "input": ["x"], "output": "y"}] * 3, "line 1", "'input' must be a string"),
    ("t.json", [{"prompt": "2+2?", "answer": ["4"]}] * 3, "item 0", "'answer' must be a string, got list"),
    ("fv.json", [{"input": "x", "output": {"a": 1}}] * 3, "item 0", "'output' must be a string, got dict"),
])
def test_wrong_types_name_file_item_and_field(tmp_path, name, content, where, what):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in content) if name.endswith(".jsonl") else json.dumps(content))
    with pytest.raises(TaskError) as e:
        tasks.load_task(str(p))
    msg = str(e.value)
    assert str(p) in msg and where in msg and what in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("extra,what", [
    ({"choices": "x"}, "'choices' must be a non-empty list of strings"),
    ({"choices": []}, "'choices' must be a non-empty list of strings"),
    ({"choices": ["y", 3]}, "choice 1: field 'choices' must be a string, got int"),
    ({"choices": ["y", "z"]}, "'output' 'y!' is not among its 'choices'"),
    ({"knowledge_prompt": 5, "knowledge_answer": " x"}, "'knowledge_prompt' must be a string, got int"),
    ({"knowledge_prompt": "A is", "knowledge_answer": ["x"]}, "'knowledge_answer' must be a string, got list"),
    ({"knowledge_prompt": "A is"}, "'knowledge_prompt' and 'knowledge_answer' come together"),
    ({"knowledge_prompt": "A is", "knowledge_answer": "  "}, "'knowledge_answer' is empty"),
])
def test_choices_and_knowledge_fields_are_checked_at_load(tmp_path, extra, what):
    # these used to pass loading and crash at stage 0's evaluation
    p = tmp_path / "k.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": "Say it.", "input": f"x{i}", "output": "y!", **extra})
                           for i in range(3)))
    with pytest.raises(TaskError) as e:
        tasks.load_task(str(p))
    assert str(e.value).startswith(f"{p}: line 1: ") and what in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deeply_nested_json_is_one_line(tmp_path, name):
    p = tmp_path / name
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(TaskError, match=f"^{p}(:1)?: JSON nested too deeply"):
        tasks.load_task(str(p))


def test_encodings(tmp_path):
    rows = [{"instruction": "Say it.", "input": f"x{i}", "output": "y"} for i in range(3)]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert len(tasks.load_task(str(bom)).train) == 2                 # a byte-order mark is accepted
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(rows).replace("x0", "caf\u00e9").encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin\.json: not UTF-8 text"):
        tasks.load_task(str(latin))


def test_fv_jsonl(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps({"input": f"w{i}", "output": f"W{i}"}) for i in range(10)) + "\n")
    t = tasks.load_task(str(p))
    assert len(t.train) + len(t.test) == 10 and all(e.instruction == "" for e in t.train)
    assert {e.output for e in t.train + t.test} == {f"W{i}" for i in range(10)}
