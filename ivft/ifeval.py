"""Verifiable instruction following: a checker per constraint kind and IFEval's four scores.

The idea is IFEval's (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"):
a request carries constraints a program can check, and a reply is scored
- per prompt (all of its constraints followed) and per constraint (the fraction followed), and
- strict (the reply as it is) or loose (also accepted when some light edit of the reply follows it:
  its first line removed, its last line removed, or its markdown asterisks stripped; see
  loose_variants), which forgives a chat model's "Sure! Here it is:" opener or a bold title.
The prompts are this project's (data/make_ifeval.py writes data/ifeval.jsonl), and so is every checker:
each kind's wording in make_ifeval.INSTRUCTIONS asks for exactly what its checker here tests.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

IFEVAL_FILE = Path(__file__).resolve().parent.parent / "data" / "ifeval.jsonl"
# A word: letters or digits, with an inner apostrophe or hyphen ("don't", "well-known" count once)
WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
# A sentence ends at . ! or ? (a run of them) followed by a space, a line break or the end of the
# text; a line of its own (a bullet, a title) also ends one
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n")
BULLET = re.compile(r"^\s*(?:[*-]|\u2022)\s+\S", re.M)   # "* x", "- x", "• x"; "**bold**" is no bullet
TITLE = re.compile(r"<<[^<>\n]+>>")
MIN_ANSWER_WORDS = 10   # a reply shorter than this answers nothing (is_answer)


class IFEvalError(ValueError):
    """A record of an ifeval file that cannot be scored: one line naming the file and the field."""


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def count_sentences(text: str) -> int:
    return sum(1 for part in SENTENCE_END.split(text) if WORD.search(part))


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _has_word(text: str, word: str) -> bool:
    # whole word, any case: "Light" and "light," count for "light", "lighter" does not
    return re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, re.I) is not None


def _squash(text: str) -> str:
    return " ".join(text.split()).lower()


def _json_body(text: str) -> str:
    # a fenced block (```json ... ```) is how chat models usually write JSON: its content is the answer
    t = text.strip()
    m = re.fullmatch(r"```[A-Za-z]*\s*\n?(.*?)\n?\s*```", t, re.S)
    return m.group(1) if m else t


def _is_json(text: str) -> bool:
    try:
        json.loads(_json_body(text))
    except ValueError:
        return False
    return True


# kind -> checker(reply, **args) -> bool. Case checks need a letter, so an empty reply follows neither.
CHECKERS = {
    "lowercase": lambda r: any(c.isalpha() for c in r) and r == r.lower(),
    "uppercase": lambda r: any(c.isalpha() for c in r) and r == r.upper(),
    "max_words": lambda r, n: 0 < count_words(r) <= n,
    "min_words": lambda r, n: count_words(r) >= n,
    "max_sentences": lambda r, n: 0 < count_sentences(r) <= n,
    "paragraphs": lambda r, n: len(paragraphs(r)) == n,
    "include_word": lambda r, word: _has_word(r, word),
    "avoid_word": lambda r, word: bool(r.strip()) and not _has_word(r, word),
    "start_phrase": lambda r, phrase: _squash(r).startswith(_squash(phrase)),
    "end_phrase": lambda r, phrase: _squash(r).endswith(_squash(phrase)),
    "bullets": lambda r, n: len(BULLET.findall(r)) == n,
    "quoted": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "json": _is_json,
    "no_commas": lambda r: bool(r.strip()) and "," not in r,
    "title": lambda r: TITLE.search(r) is not None,
}


def check(reply: str, constraint: dict) -> bool:
    """Does the reply follow one constraint {"kind", "args"} as it stands (strict)?"""
    return CHECKERS[constraint["kind"]](reply, **constraint.get("args", {}))


def loose_variants(reply: str) -> list[str]:
    """The reply and its light edits, as IFEval's loose score takes them: with its first line removed,
    its last line removed, or both; each of these also with every '*' removed."""
    lines = reply.split("\n")
    cuts = [reply, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [v for c in cuts for v in (c, c.replace("*", "")) if v.strip()]


def check_loose(reply: str, constraint: dict) -> bool:
    return any(check(v, constraint) for v in loose_variants(reply))


def is_answer(reply: str) -> bool:
    """The reply answers at all: at least MIN_ANSWER_WORDS words. Every constraint of the set can be
    followed by an answer that long (the tightest asks for at most 15 words), while a reply of a few
    words ("TOO LOWER CHAIR", after training on uppercase) would follow the length, case and
    no-comma constraints without answering the request."""
    return count_words(reply) >= MIN_ANSWER_WORDS


def verdicts(records: list, replies: list[str]) -> dict:
    """Per prompt, the per-constraint verdicts {"strict": [[bool, ...], ...], "loose": [...]}, in
    the order of each record's constraints; a constraint counts as followed only in a reply that
    answers (is_answer)."""
    if len(records) != len(replies):
        raise ValueError(f"{len(records)} ifeval records but {len(replies)} replies")
    ok = [is_answer(r) for r in replies]
    return {"strict": [[a and check(r, c) for c in rec["constraints"]] for rec, r, a in zip(records, replies, ok)],
            "loose": [[a and check_loose(r, c) for c in rec["constraints"]]
                      for rec, r, a in zip(records, replies, ok)]}


def prompt_level(v: list) -> list[float]:
    """1.0 for a prompt whose every constraint is followed, else 0.0 (one verdict list per prompt)."""
    return [float(all(x)) for x in v]


def instruction_level(v: list) -> float:
    """The fraction of all constraints followed, pooled over prompts (IFEval's instruction-level)."""
    flat = [x for row in v for x in row]
    return sum(flat) / len(flat) if flat else float("nan")


def scores(records: list, v: dict) -> dict:
    """IFEval's four scores and each kind's strict/loose rate from verdicts(): {"prompt_strict",
    "prompt_loose", "inst_strict", "inst_loose", "per_kind": {kind: {"n", "strict", "loose"}}}."""
    out = {}
    for mode in ("strict", "loose"):
        per_prompt = prompt_level(v[mode])
        out[f"prompt_{mode}"] = sum(per_prompt) / len(per_prompt)
        out[f"inst_{mode}"] = instruction_level(v[mode])
    kinds = {}
    for rec, s, lo in zip(records, v["strict"], v["loose"]):
        for c, a, b in zip(rec["constraints"], s, lo):
            k = kinds.setdefault(c["kind"], {"n": 0, "strict": 0.0, "loose": 0.0})
            k["n"] += 1
            k["strict"] += a
            k["loose"] += b
    out["per_kind"] = {k: {"n": d["n"], "strict": d["strict"] / d["n"], "loose": d["loose"] / d["n"]}
                       for k, d in sorted(kinds.items())}
    return out


def load_ifeval(path=IFEVAL_FILE, n: int | None = None) -> list:
    """The first n records (all when None) of an ifeval JSONL file, each checked against CHECKERS."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise IFEvalError(f"{path}: cannot read ({e.strerror or e}); run `python data/make_ifeval.py`") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise IFEvalError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec.get("constraints"):
            raise IFEvalError(f"{path}:{i}: a record needs a 'prompt' string and a 'constraints' list")
        for c in rec["constraints"]:
            if not isinstance(c, dict) or c.get("kind") not in CHECKERS:
                raise IFEvalError(f"{path}:{i}: constraint {c!r}: kind must be one of {', '.join(CHECKERS)}")
        records.append(rec)
    return records[:n] if n else records
