"""Instruction tasks: the project's own suite (data/) and loaders for the formats users bring.

A task is a list of (instruction, input, output) examples split into train and test. The suite's
registry lives in data/tasks.json, written by data/make_tasks.py together with the JSONL files:
- kind "general": abilities the base model has zero-shot; held out, only evaluated (forgetting).
- kind "train": the stages of a continual instruction-tuning run; default_sequence() orders them.
- kind "extra": shipped but in neither list (label tasks the base model fails under bare
  likelihood ranking; see data/README.md).

User formats (each loader returns a Task; files without a split get a seeded random test fraction):
- TRACE (Wang et al. 2023, github.com/BeyonderXX/TRACE): a folder with train.json / test.json
  (eval.json ignored), or one such file, each a JSON list of {"prompt", "answer"}. A prompt holds
  the instruction and the input together; the leading lines that every prompt of the task shares
  ("What is the monetary policy stance ...") are the instruction, the rest is the input, so the
  prompt is unchanged (user_prompt joins them with the newline between) and the input alone is
  what IV extraction's corrupted prompt keeps. Prompts that share no line: all input.
- Super-NaturalInstructions (Wang et al. 2022): one task file, a JSON object with "Definition"
  (a string in older releases, a list of strings, joined by newlines, in newer ones), "Positive
  Examples" [{"input", "output"}] and "Instances" [{"input", "output": [str, ...] or str}] (an "id"
  per instance in newer releases, not used); the first reference output is the target, the
  positive examples become `demos`.
- Alpaca: a JSON list or JSONL of {"instruction", "input", "output"} (input may be missing/empty).
  The suite's own JSONL is this format plus the optional choices / knowledge_* fields.
- Function vectors (Todd et al. 2023): a JSON list of {"input", "output"}, no instruction.

Every malformed input raises TaskError (a ValueError) naming the file, the line (JSONL) or item
index (JSON list), and the field.
"""
import dataclasses
import json
import os
import random
from dataclasses import dataclass, field

from ivft.errors import TaskError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
REGISTRY = os.path.join(DATA_DIR, "tasks.json")


@dataclass
class Example:
    instruction: str
    input: str
    output: str
    choices: list[str] | None = None        # answer set for likelihood-ranked scoring (gold included)
    knowledge_prompt: str | None = None     # the same fact as plain text, no instruction wording...
    knowledge_answer: str | None = None     # ...and its continuation (starts with a space)


@dataclass
class Task:
    name: str
    kind: str            # "general" (held-out suite), "train" or "extra"
    metric: str          # primary score: "choice" (likelihood-ranked), "exact_match" or "reply_contains" (greedy)
    train: list[Example]
    test: list[Example]
    description: str = ""
    demos: list[Example] = field(default_factory=list)  # fixed demonstrations (SuperNI); else use train


def user_prompt(ex: Example) -> str:
    # One convention everywhere: the instruction, a newline, the input. Either may be empty
    # (TRACE prompts carry both in `instruction`; function-vector data has no instruction), and
    # the input alone is exactly the "corrupted" prompt of IV extraction (docs/method.md §2).
    return "\n".join(s for s in (ex.instruction, ex.input) if s)


# --- the project's suite ----------------------------------------------------------------------

METRICS = ("choice", "exact_match", "reply_contains")   # what evaluate.py can use as a task's score

def _registry():
    if not os.path.exists(REGISTRY):
        raise TaskError(f"{REGISTRY} not found; run `python data/make_tasks.py` to generate the suite")
    with open(REGISTRY, encoding="utf-8") as f:
        return json.load(f)


def list_tasks() -> dict[str, dict]:
    return _registry()["tasks"]


def default_sequence() -> list[str]:
    return list(_registry()["default_sequence"])


def general_suite() -> list[str]:
    return [n for n, t in list_tasks().items() if t["kind"] == "general"]


def load_task(name_or_path: str, test_fraction: float = 0.2, seed: int = 0) -> Task:
    """A registry name, or a path to a user file/folder in any format of this module."""
    tasks = list_tasks()
    if name_or_path in tasks:
        meta = tasks[name_or_path]
        if meta.get("metric") not in METRICS:
            raise TaskError(f"{REGISTRY}: task {name_or_path!r} has metric {meta.get('metric')!r}; "
                            f"expected one of {', '.join(METRICS)}")
        train = _read_jsonl(os.path.join(DATA_DIR, meta["train"]))
        test = _read_jsonl(os.path.join(DATA_DIR, meta["test"]))
        return Task(name_or_path, meta["kind"], meta["metric"], train, test, meta["description"])
    path = name_or_path
    if not os.path.exists(path):
        raise TaskError(f"unknown task {name_or_path!r}: not a file or folder, and not one of the "
                        f"known tasks: {', '.join(tasks)}")
    if os.path.isdir(path):
        return load_trace(path)
    if path.endswith(".jsonl"):
        if _is_fv_jsonl(path):
            return load_fv(path, test_fraction, seed)
        return load_alpaca(path, test_fraction, seed)
    data = _read_json(path)
    if isinstance(data, dict) and "Instances" in data:
        return load_superni(path, test_fraction, seed)
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = set(data[0])
        if {"prompt", "answer"} <= keys:
            return load_trace(path, test_fraction, seed)
        if "instruction" in keys:
            return load_alpaca(path, test_fraction, seed)
        if {"input", "output"} <= keys:
            return load_fv(path, test_fraction, seed)
    raise TaskError(f"{path}: format not recognised (expected TRACE, SuperNI, Alpaca or "
                    f"function-vector JSON, or JSONL)")


def load_tasks(names=None, default=general_suite, error=TaskError, what: str = "") -> list[Task]:
    """The one task loader of the scripts: a list mixing registry names, task files (load_task reads
    each) and Tasks (kept as they are), in order; None = default() (a list of names). A task that
    cannot be loaded (unknown name, unreadable or malformed file, no registry) raises `error` with
    one line, after `what`, so that each script reports it as its own (TrainError, ExtractError)."""
    try:
        names = default() if names is None else names
        return [t if hasattr(t, "test") else load_task(t) for t in names]
    except (KeyError, ValueError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e     # a KeyError's str() quotes it
        raise error(f"{what}{msg}") from None


def check_never_trained_on(train_tasks: list, general: list) -> None:
    """The general suite measures what a run never trains on: a task in both lists (the same name, or
    the same content under another name) would count learning as kept ability."""
    from ivft.ivfile import task_fingerprint    # lazily: ivft.ivfile imports this module
    trained = {t.name: t for t in train_tasks} | {task_fingerprint(t): t for t in train_tasks}
    for g in general:
        t = trained.get(g.name) or trained.get(task_fingerprint(g))
        if t is not None:
            raise TaskError(f"task {g.name!r} is in the general suite and trained on (as {t.name!r}): the general "
                            f"suite must hold tasks the run never trains on; drop it from --tasks or --general")


def unspellable_note(task: Task, tok) -> str | None:
    """A warning naming the characters of a task's text that the tokenizer cannot spell (no token
    holds one of their bytes: the tokenizer writes U+FFFD in their place, so a model would be
    trained and scored on the stand-in), or None when every character is spellable."""
    spellable = getattr(tok, "_spellable", None)
    if spellable is None:
        return None
    chars = set()
    for ex in [*task.train, *task.test, *task.demos]:
        for text in (ex.instruction, ex.input, ex.output, ex.knowledge_prompt, ex.knowledge_answer, *(ex.choices or [])):
            chars.update(text or "")
    missing = sorted(c for c in chars if not spellable(c))
    if not missing:
        return None
    shown = ", ".join(f"U+{ord(c):04X}" for c in missing[:8]) + (" ..." if len(missing) > 8 else "")
    return (f"warning: task {task.name!r}: {len(missing)} character(s) the tokenizer cannot spell ({shown}) "
            f"become U+FFFD in its prompts and answers")


# --- user formats -----------------------------------------------------------------------------

def load_trace(path, test_fraction=0.2, seed=0) -> Task:
    def read(p):
        return [(_text(r, "prompt", p, f"item {i}"), _text(r, "answer", p, f"item {i}", numbers_ok=True))
                for i, r in enumerate(_read_json_list(p))]
    if os.path.isdir(path):
        for split in ("train.json", "test.json"):
            if not os.path.exists(os.path.join(path, split)):
                raise TaskError(f"{path}: a TRACE folder needs train.json and test.json; {split} is missing")
        splits = [read(os.path.join(path, "train.json")), read(os.path.join(path, "test.json"))]
    else:
        splits = [read(path)]
    # the instruction: the leading lines all prompts share (train and test alike), each prompt keeping
    # a non-empty input of its own (an empty one would drop the newline before it from the prompt)
    lines = [p.split("\n") for rows in splits for p, _ in rows]
    k = min(len(x) for x in lines) - 1 if lines else 0
    while k and any(x[:k] != lines[0][:k] or not "\n".join(x[k:]) for x in lines):
        k -= 1
    splits = [[Example("\n".join(p.split("\n")[:k]), "\n".join(p.split("\n")[k:]), a) for p, a in rows]
              for rows in splits]
    train, test = splits if len(splits) == 2 else _split(splits[0], path, test_fraction, seed)
    return _task(path, train, test)


def load_superni(path, test_fraction=0.2, seed=0) -> Task:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a SuperNI task file is a JSON object")
    definition = _field(data, "Definition", path)
    if isinstance(definition, list) and definition and all(isinstance(d, str) for d in definition):
        definition = "\n".join(definition)      # newer releases: a list (of one string, as a rule)
    if not isinstance(definition, str):
        raise TaskError(f"{path}: field 'Definition' must be a string or a list of strings")
    def ex(r, where):
        out = _field(r, "output", path, where)
        if isinstance(out, list):
            if not out:
                raise TaskError(f"{path}: {where}: field 'output' is an empty list")
            out = out[0]  # SuperNI lists all acceptable references; the first is the target
        return Example(definition, _text(r, "input", path, where, empty_ok=True), _as_text(out, "output", path, where))
    instances = _field(data, "Instances", path)
    examples = [ex(r, f"Instances[{i}]") for i, r in enumerate(instances)]
    demos = [ex(r, f"Positive Examples[{i}]") for i, r in enumerate(data.get("Positive Examples", []))]
    # A small answer set (a classification task) doubles as the choices for likelihood scoring.
    labels = sorted({e.output for e in examples})
    if len(labels) <= 10:
        for e in examples:
            e.choices = labels
    train, test = _split(examples, path, test_fraction, seed)
    task = _task(path, train, test)
    task.demos = demos
    return task


def load_alpaca(path, test_fraction=0.2, seed=0) -> Task:
    rows = _read_jsonl(path) if path.endswith(".jsonl") else [
        _example(r, path, f"item {i}") for i, r in enumerate(_read_json_list(path))]
    # The suite's own layout: x.train.jsonl next to x.test.jsonl is one task with its fixed split.
    # An optional x.meta.json beside them sets the task's metric, kind and description as the registry does.
    stem = path[:-len(".train.jsonl")]
    if path.endswith(".train.jsonl") and os.path.exists(stem + ".test.jsonl"):
        task = _task(path, rows, _read_jsonl(stem + ".test.jsonl"))
        return _with_meta(task, stem + ".meta.json") if os.path.exists(stem + ".meta.json") else task
    return _task(path, *_split(rows, path, test_fraction, seed))


def _with_meta(task: Task, path: str) -> Task:
    """The task with the metric / kind / description of the JSON object in `path`."""
    meta = _read_json(path)
    allowed = {"metric": METRICS, "kind": ("general", "train", "extra"), "description": None}
    if not isinstance(meta, dict) or set(meta) - set(allowed):
        raise TaskError(f"{path}: expected a JSON object with some of the fields {', '.join(allowed)}")
    for key, values in allowed.items():
        if key in meta and (not isinstance(meta[key], str) or (values and meta[key] not in values)):
            raise TaskError(f"{path}: field {key!r} is {meta[key]!r}; expected "
                            + (f"one of {', '.join(values)}" if values else "a string"))
    return dataclasses.replace(task, **meta)


def load_fv(path, test_fraction=0.2, seed=0, instruction="") -> Task:
    examples = []
    records = ([r for _, r in _jsonl_records(path)] if str(path).endswith(".jsonl") else _read_json_list(path))
    for i, r in enumerate(records):
        out = _field(r, "output", path, f"item {i}")
        if isinstance(out, list):   # several acceptable answers: the first is the target
            out = out[0] if out else ""
        out = _as_text(out, "output", path, f"item {i}", numbers_ok=True)
        examples.append(Example(instruction, _text(r, "input", path, f"item {i}", numbers_ok=True), out))
    return _task(path, *_split(examples, path, test_fraction, seed))


# --- helpers ----------------------------------------------------------------------------------

def _field(record, key, path, where=None):
    at = f"{path}: {where}" if where is not None else path
    if not isinstance(record, dict):
        raise TaskError(f"{at}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise TaskError(f"{at}: missing field {key!r}")
    return record[key]


def _as_text(v, key, path, where=None, *, empty_ok=False, numbers_ok=False) -> str:
    """A field's value checked as text: a wrong type or an empty answer is one TaskError naming
    file, item and field, here, instead of an AttributeError deep in training."""
    if numbers_ok and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    at = f"{path}: {where}: " if where is not None else f"{path}: "
    if not isinstance(v, str):
        raise TaskError(f"{at}field {key!r} must be a string, got {type(v).__name__}")
    if not empty_ok and not v.strip():
        raise TaskError(f"{at}field {key!r} is empty")
    return v


def _text(record, key, path, where=None, **kw) -> str:
    return _as_text(_field(record, key, path, where), key, path, where, **kw)


def _example(r, path, where):
    ex = Example(
        instruction=_text(r, "instruction", path, where, empty_ok=True),   # first: checks r is an object
        input=_as_text(r.get("input") or "", "input", path, where, empty_ok=True),
        output=_text(r, "output", path, where),
        choices=_choices(r.get("choices"), path, where),
        knowledge_prompt=_optional_text(r, "knowledge_prompt", path, where),
        knowledge_answer=_optional_text(r, "knowledge_answer", path, where),
    )
    if ex.choices is not None and ex.output.strip() not in {c.strip() for c in ex.choices}:
        raise TaskError(f"{path}: {where}: field 'output' {ex.output!r} is not among its 'choices' (the gold "
                        f"answer must be one of them)")
    if (ex.knowledge_prompt is None) != (ex.knowledge_answer is None):
        raise TaskError(f"{path}: {where}: fields 'knowledge_prompt' and 'knowledge_answer' come together "
                        f"(one is missing)")
    return ex


def _optional_text(r, key, path, where) -> str | None:
    """An optional text field: absent or null is None, anything else must be non-empty text."""
    return None if r.get(key) is None else _as_text(r[key], key, path, where)


def _choices(v, path, where) -> list[str] | None:
    """The answer set of likelihood scoring: absent or null, or a non-empty list of non-empty strings."""
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise TaskError(f"{path}: {where}: field 'choices' must be a non-empty list of strings, got {v!r:.60}")
    return [_as_text(c, "choices", path, f"{where}: choice {i}") for i, c in enumerate(v)]


def _read_text(path) -> str:
    # utf-8-sig: a byte-order mark, as some editors write, is not part of the JSON
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None


def _jsonl_records(path) -> list[tuple[int, dict]]:
    out = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise TaskError(f"{path}:{lineno}: JSON nested too deeply to be a task") from None
    if not out:
        raise TaskError(f"{path}: no examples (empty task)")
    return out


def _read_jsonl(path):
    return [_example(r, path, f"line {lineno}") for lineno, r in _jsonl_records(path)]


def _is_fv_jsonl(path) -> bool:
    """{"input", "output"} lines with no "instruction": a function-vector task written as JSONL."""
    r = _jsonl_records(path)[0][1]
    return isinstance(r, dict) and "instruction" not in r and {"input", "output"} <= set(r)


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except RecursionError:      # json.loads recurses once per level of nesting
        raise TaskError(f"{path}: JSON nested too deeply to be a task") from None


def _read_json_list(path):
    data = _read_json(path)
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    return data


def _split(examples, path, test_fraction, seed):
    """Seeded random split; the test side gets round(fraction * n), at least 1 (and train keeps 1)."""
    if not examples:
        raise TaskError(f"{path}: no examples (empty task)")
    if len(examples) < 2:
        raise TaskError(f"{path}: only 1 example; need at least 2 to split train/test")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_test = min(max(1, round(test_fraction * len(examples))), len(examples) - 1)
    return [examples[i] for i in idx[n_test:]], [examples[i] for i in idx[:n_test]]


def _task(path, train, test):
    if not train or not test:
        raise TaskError(f"{path}: no examples (empty task)")
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".train.jsonl", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Task(name, "train", "exact_match", train, test, f"loaded from {path}")
