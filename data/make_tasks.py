"""Generate the project's instruction task suite: one JSONL file per task and split, plus tasks.json.

    python data/make_tasks.py                 # writes data/<task>.train.jsonl, data/<task>.test.jsonl
    python data/make_tasks.py --out_dir /tmp/x --seed 0

Two kinds of task (see data/README.md):
- "general": abilities the embedded SmolLM2-135M-Instruct already has zero-shot. Held out, never
  trained on; they measure forgetting. Built from the hand-compiled lists in data/lists.py.
- "train": short string-format tasks the model does poorly zero-shot but learns quickly. Generated
  procedurally from the seed; used as the stages of a continual instruction-tuning sequence.

Every record is {"instruction", "input", "output", "choices", "knowledge_prompt", "knowledge_answer"}.
`choices` always holds the gold output plus distractors, for likelihood-ranked scoring. The
knowledge_* fields ask the same fact as plain text with no instruction wording (docs/method.md §1); they are
null where a task has no such fact. knowledge_answer starts with a space because it continues a
sentence, while `output` is the first thing the assistant says.

Output is a pure function of --seed: one random.Random(f"{seed}/{task name}") per task, lists iterated in
their written order, JSON written with a fixed key order.
"""
import argparse
import json
import os
import random

import lists  # the sibling data/lists.py: this file is run as a script, so its own folder is on the path

N_TEST = 100          # test examples per task where the list is long enough
N_TRAIN_PROC = 400    # training examples for procedurally generated tasks


def record(instruction, inp, output, choices, kp=None, ka=None):
    assert output in choices, (output, choices)
    assert len(set(choices)) == len(choices), choices
    return {"instruction": instruction, "input": inp, "output": output, "choices": choices,
            "knowledge_prompt": kp, "knowledge_answer": ka}


def pick_distractors(rng, gold, pool, k, exclude=()):
    """k distinct values from pool, none equal to gold or in exclude (pool order is deterministic)."""
    cands = sorted({p for p in pool if p != gold and p not in exclude})
    return rng.sample(cands, k)


def with_shuffled(rng, gold, distractors):
    choices = [gold] + list(distractors)
    rng.shuffle(choices)  # gold's position carries no signal
    return choices


def split_pool(rng, items, n_test=N_TEST):
    """Shuffle a fact list and cut it into (train, test); train keeps at least a third (>= 30 items)
    for demonstrations and IV extraction, test gets up to n_test of the rest."""
    items = list(items)
    rng.shuffle(items)
    n_test = min(n_test, len(items) - max(30, len(items) // 3))
    return items[n_test:], items[:n_test]


# --- general suite ----------------------------------------------------------------------------

def make_antonym(rng):
    outs = [b for _, b in lists.ANTONYMS]
    def ex(a, b):
        # Distractors are other answers of the task, never the input word itself: the base model
        # ranks a bare copy of the input above everything (antonym choice accuracy 0.08 with it).
        return record("Give the opposite of the word. Answer with one word.", a, b,
                      with_shuffled(rng, b, pick_distractors(rng, b, outs, 3, {a})),
                      f"The opposite of {a} is", f" {b}")
    train, test = split_pool(rng, lists.ANTONYMS)
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_capital(rng):
    caps = [c for _, c in lists.CAPITALS]
    def ex(country, cap):
        the = "the " if country.startswith(("United", "Czech", "Dominican", "Central", "Bahamas",
                                             "Gambia", "Netherlands", "Philippines", "Maldives",
                                             "Solomon", "Comoros", "Seychelles")) else ""
        return record("What is the capital of this country? Answer with the city name.", country,
                      cap, with_shuffled(rng, cap, pick_distractors(rng, cap, caps, 3)),
                      f"The capital of {the}{country} is", f" {cap}")
    train, test = split_pool(rng, lists.CAPITALS)
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_plural(rng):
    outs = [b for _, b in lists.PLURALS]
    def ex(a, b):
        return record("Give the plural form of the word.", a, b,
                      with_shuffled(rng, b, pick_distractors(rng, b, outs, 3, {a})),
                      f"One {a}, two", f" {b}")
    train, test = split_pool(rng, lists.PLURALS)
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_past_tense(rng):
    outs = [b for _, b in lists.PAST_TENSE]
    def ex(a, b):
        return record("Give the past tense of the verb.", a, b,
                      with_shuffled(rng, b, pick_distractors(rng, b, outs, 3, {a})),
                      f"Every day I {a}. Yesterday I", f" {b}")
    train, test = split_pool(rng, lists.PAST_TENSE)
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_comparative(rng):
    outs = [b for _, b in lists.COMPARATIVES]
    def ex(a, b):
        return record("Give the comparative form of the adjective.", a, b,
                      with_shuffled(rng, b, pick_distractors(rng, b, outs, 3, {a})),
                      f"This one is {a}, but that one is even", f" {b}")
    train, test = split_pool(rng, lists.COMPARATIVES)
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_category(rng):
    labels = list(lists.CATEGORIES)
    items = [(w, c) for c, ws in lists.CATEGORIES.items() for w in ws]
    instr = "Which category does the word belong to: " + ", ".join(labels[:-1]) + f" or {labels[-1]}?"
    def ex(w, c):
        # Countable things take an article in the cloze; colours and sports read better without.
        if c in ("color", "sport"):
            kp = f"{w.capitalize()} is a kind of"
        else:
            kp = f"{'An' if w[0] in 'aeiou' else 'A'} {w} is a kind of"
        return record(instr, w, c, with_shuffled(rng, c, [l for l in labels if l != c]), kp, f" {c}")
    train, test = split_pool(rng, items)
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_sentiment(rng):
    templates = ["{S} was {A}.", "I thought {s} was {A}.", "Honestly, {s} was {A}."]
    items = []
    for adjs, label in ((lists.POSITIVE, "positive"), (lists.NEGATIVE, "negative")):
        for subj in lists.REVIEW_SUBJECTS:
            for adj in adjs:
                t = rng.choice(templates)
                items.append((t.format(S=subj, s=subj[0].lower() + subj[1:], A=adj), label))
    train, test = split_pool(rng, items)
    train = train[:200]  # the train split only supplies demonstrations; keep files small
    def ex(s, label):
        return record("Is the sentiment of this review positive or negative?", s, label,
                      with_shuffled(rng, label, ["negative" if label == "positive" else "positive"]))
    return [ex(*p) for p in train], [ex(*p) for p in test]


def make_language(rng):
    langs = [l for _, l in lists.LANGUAGES]
    def ex(country, lang):
        the = "the " if country.startswith(("United", "Czech", "Dominican", "Netherlands")) else ""
        return record("What is the main language spoken in this country?", country, lang,
                      with_shuffled(rng, lang, pick_distractors(rng, lang, langs, 3)),
                      f"The main language spoken in {the}{country} is", f" {lang}")
    train, test = split_pool(rng, lists.LANGUAGES)
    return [ex(*p) for p in train], [ex(*p) for p in test]


# --- training tasks ---------------------------------------------------------------------------

def unique_inputs(rng, gen, n):
    """Draw n examples with distinct inputs from gen(rng) -> (input, output, choices)."""
    seen, out = set(), []
    while len(out) < n:
        inp, outp, choices = gen(rng)
        if inp not in seen:
            seen.add(inp)
            out.append((inp, outp, choices))
    return out


def procedural(rng, instruction, gen):
    items = unique_inputs(rng, gen, N_TRAIN_PROC + N_TEST)
    test, train = items[:N_TEST], items[N_TEST:]
    return ([record(instruction, i, o, c) for i, o, c in train],
            [record(instruction, i, o, c) for i, o, c in test])


PHRASE_WORDS = sorted(set(lists.PHRASE_WORDS))


def phrase(rng, n):
    return rng.sample(PHRASE_WORDS, n)


def make_uppercase(rng):
    def gen(rng):
        ws = phrase(rng, rng.choice([2, 3]))
        s = " ".join(ws)
        gold = s.upper()
        other = " ".join(phrase(rng, len(ws))).upper()
        return s, gold, with_shuffled(rng, gold, [s, s.title(), other])
    return procedural(rng, "Rewrite the words in capital letters.", gen)


def make_reverse_words(rng):
    def gen(rng):
        ws = phrase(rng, rng.choice([3, 4]))
        gold = " ".join(reversed(ws))
        # Other orders of the same words: the answer must be the exact reversal, not a reshuffle.
        perms = set()
        while len(perms) < 3:
            p = ws[:]
            rng.shuffle(p)
            if p != ws[::-1]:
                perms.add(" ".join(p))
        return " ".join(ws), gold, with_shuffled(rng, gold, sorted(perms))
    return procedural(rng, "Write the words in reverse order.", gen)


def make_acronym(rng):
    def gen(rng):
        ws = phrase(rng, rng.choice([3, 4]))
        gold = "".join(w[0] for w in ws).upper()
        d = set()
        while len(d) < 3:
            x = "".join(w[0] for w in phrase(rng, len(ws))).upper()
            if x != gold:
                d.add(x)
        return " ".join(ws), gold, with_shuffled(rng, gold, sorted(d))
    return procedural(rng, "Write the first letter of each word as one capitalized word.", gen)


def make_date_iso(rng):
    def gen(rng):
        y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        gold = f"{y:04d}-{m:02d}-{d:02d}"
        # Distractors: day and month swapped (the classic error), a wrong month, a wrong year.
        d1 = f"{y:04d}-{d:02d}-{m:02d}" if d != m and d <= 12 else f"{y:04d}-{m:02d}-{(d % 28) + 1:02d}"
        d2 = f"{y:04d}-{(m % 12) + 1:02d}-{d:02d}"
        d3 = f"{y + 1:04d}-{m:02d}-{d:02d}"
        return f"{lists.MONTHS[m - 1]} {d}, {y}", gold, with_shuffled(rng, gold, [d1, d2, d3])
    return procedural(rng, "Write the date in YYYY-MM-DD format.", gen)


def make_name_swap(rng):
    def gen(rng):
        f, l = rng.choice(lists.FIRST_NAMES), rng.choice(lists.SURNAMES)
        gold = f"{l}, {f}"
        return f"{f} {l}", gold, with_shuffled(rng, gold, [f"{f} {l}", f"{l} {f}", f"{f}, {l}"])
    return procedural(rng, "Write the name as surname, comma, first name.", gen)


def make_spell(rng):
    # Every plain word of the lists with 3-6 letters; split by word so train and test share none.
    pool = sorted({w for w in PHRASE_WORDS + [a for a, _ in lists.ANTONYMS + lists.PLURALS + lists.PAST_TENSE]
                   + [w for ws in lists.CATEGORIES.values() for w in ws]
                   if w.isalpha() and w.islower() and 3 <= len(w) <= 6})
    words = sorted(pool)
    rng.shuffle(words)
    n_test = N_TEST
    def ex(w):
        gold = "-".join(w)
        d = pick_distractors(rng, gold, ["-".join(x) for x in pool], 3)
        return record("Spell the word with hyphens between the letters.", w, gold,
                      with_shuffled(rng, gold, d))
    return [ex(w) for w in words[n_test:]], [ex(w) for w in words[:n_test]]


def make_time_12h(rng):
    def gen(rng):
        h, m = rng.randint(0, 23), rng.randint(0, 59)
        h12 = h % 12 or 12
        gold = f"{h12}:{m:02d} {'AM' if h < 12 else 'PM'}"
        flip = f"{h12}:{m:02d} {'PM' if h < 12 else 'AM'}"
        return f"{h:02d}:{m:02d}", gold, with_shuffled(rng, gold, [flip, f"{h}:{m:02d}",
                                                                   f"{(h12 % 12) + 1}:{m:02d} {gold[-2:]}"])
    return procedural(rng, "Convert the time to 12-hour format with AM or PM.", gen)


# name -> (maker, kind, metric, description)
TASKS = {
    "antonym": (make_antonym, "general", "reply_contains", "word -> its opposite (hot -> cold)"),
    "capital": (make_capital, "general", "reply_contains", "country -> capital city (Japan -> Tokyo)"),
    "plural": (make_plural, "general", "reply_contains", "singular noun -> plural (child -> children)"),
    "past_tense": (make_past_tense, "general", "reply_contains", "verb -> simple past (go -> went)"),
    "comparative": (make_comparative, "general", "reply_contains", "adjective -> comparative (big -> bigger)"),
    "category": (make_category, "extra", "choice",
                 "word -> animal, fruit, color, sport or vehicle"),
    "sentiment": (make_sentiment, "extra", "choice", "short review -> positive or negative"),
    "language": (make_language, "general", "reply_contains", "country -> main language (Brazil -> Portuguese)"),
    "uppercase": (make_uppercase, "train", "exact_match", "2-3 words -> UPPER CASE"),
    "reverse_words": (make_reverse_words, "train", "exact_match", "3-4 words -> reversed order"),
    "acronym": (make_acronym, "train", "exact_match", "3-4 words -> first letters (RAR)"),
    "date_iso": (make_date_iso, "train", "exact_match", "March 5, 2021 -> 2021-03-05"),
    "name_swap": (make_name_swap, "train", "exact_match", "Anna Smith -> Smith, Anna"),
    "spell": (make_spell, "train", "exact_match", "cat -> c-a-t"),
    "time_12h": (make_time_12h, "train", "exact_match", "14:30 -> 2:30 PM"),
}
DEFAULT_SEQUENCE = ["uppercase", "date_iso", "reverse_words", "acronym"]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                   help="where to write <task>.<split>.jsonl and tasks.json (default: data/)")
    p.add_argument("--seed", type=int, default=1234, help="seed for splits, distractors and generated inputs")
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks (default: all)")
    args = p.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    registry = {}
    for name, (maker, kind, metric, desc) in TASKS.items():
        registry[name] = {"kind": kind, "metric": metric, "description": desc,
                          "train": f"{name}.train.jsonl", "test": f"{name}.test.jsonl"}
        if args.tasks and name not in args.tasks:
            continue
        # Seeded by name, so adding or reordering tasks leaves every other task's files unchanged.
        train, test = maker(random.Random(f"{args.seed}/{name}"))
        write_jsonl(os.path.join(args.out_dir, f"{name}.train.jsonl"), train)
        write_jsonl(os.path.join(args.out_dir, f"{name}.test.jsonl"), test)
        print(f"{name:14s} {kind:8s} train {len(train):4d}  test {len(test):4d}")
    with open(os.path.join(args.out_dir, "tasks.json"), "w", encoding="utf-8") as f:
        json.dump({"seed": args.seed, "default_sequence": DEFAULT_SEQUENCE, "tasks": registry}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
