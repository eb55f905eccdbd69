"""Generate the general evaluation's two prompt sets (data/README.md, "Instruction following and drift"):

    python data/make_ifeval.py                 # writes data/ifeval.jsonl and data/everyday.jsonl
    python data/make_ifeval.py --out_dir /tmp/x --seed 0

- ifeval.jsonl: verifiable instruction following (the idea of IFEval, Zhou et al. 2023; the prompts,
  wording and checkers are this project's own). Each record is a plain everyday request followed by one
  or two constraints a program can check: {"id", "prompt", "request", "constraints": [{"kind", "args"}]}.
  The checkers are in ivft/ifeval.py (CHECKERS); the constraint wording is INSTRUCTIONS below.
- everyday.jsonl: plain requests with no constraint, the prompts of the drift measure (ivft/drift.py):
  {"id", "prompt"}. Built from other requests than ifeval.jsonl's, so the two sets share no prompt.

- ifeval_dev.jsonl, everyday_dev.jsonl: 60 prompts each, built the same way from other requests
  (DEV_REQUESTS) and subjects (EVERYDAY_DEV_SUBJECTS): the dev split that settings are chosen on
  (experiments/forgetting.py), so that no choice reads a test prompt.

All four are pure functions of --seed (random.Random(f"{seed}/ifeval") and (f"{seed}/everyday")), lists
iterated in their written order, JSON written with a fixed key order. The first constraint of prompt i
cycles through KINDS, so any first n prompts (the per-stage subset) cover the kinds evenly.
"""
import argparse
import json
import os
import random

N_IFEVAL = 240
N_EVERYDAY = 240
N_DEV = 60        # each dev file: prompts for choosing settings (experiments/forgetting.py), never scored as results

# (request, a word the reply is asked to include, a word it is asked to avoid). The avoided word is
# one a reply to the request would naturally use, so avoiding it takes attention; the included one
# fits the topic but is not the obvious word.
REQUESTS = [
    ("Give me some tips for saving money on groceries.", "budget", "food"),
    ("Explain why the sky looks blue during the day.", "light", "blue"),
    ("Write a short note to a neighbour asking to borrow a ladder.", "weekend", "ladder"),
    ("Describe how to make a cup of tea.", "kettle", "water"),
    ("Suggest a few ways to fall asleep faster.", "routine", "sleep"),
    ("Tell me why regular exercise is good for you.", "heart", "health"),
    ("Write a thank-you message to a friend who helped me move house.", "pizza", "thank"),
    ("Explain what a rainbow is.", "droplets", "colors"),
    ("Give advice to someone starting their first job.", "questions", "work"),
    ("Describe a relaxing Sunday morning.", "coffee", "morning"),
    ("Explain how to plant tomato seeds.", "soil", "seeds"),
    ("Write a short invitation to a birthday party.", "cake", "party"),
    ("Suggest some fun things to do on a rainy day.", "board", "rain"),
    ("Explain why people should drink enough water.", "energy", "water"),
    ("Give tips for keeping a room tidy.", "basket", "clean"),
    ("Describe what makes a good friend.", "trust", "friend"),
    ("Explain how a bicycle works.", "chain", "wheels"),
    ("Write a short review of a cozy neighbourhood cafe.", "pastries", "coffee"),
    ("Give some advice for learning a new language.", "practice", "words"),
    ("Explain why the moon changes shape during the month.", "sunlight", "moon"),
    ("Suggest a simple dinner that can be cooked in twenty minutes.", "garlic", "pasta"),
    ("Describe the sound of the ocean.", "waves", "water"),
    ("Give tips for taking care of a houseplant.", "window", "water"),
    ("Explain what recycling is and why it matters.", "plastic", "waste"),
    ("Write a short apology to a colleague for missing a meeting.", "calendar", "sorry"),
    ("Suggest ways to make a long train journey more pleasant.", "snacks", "train"),
    ("Explain how to change a flat bicycle tyre.", "pump", "tyre"),
    ("Describe a walk through a forest in autumn.", "leaves", "trees"),
    ("Give advice on preparing for a job interview.", "research", "interview"),
    ("Explain why cats purr.", "vibration", "happy"),
    ("Write a short message cancelling a dentist appointment.", "reschedule", "appointment"),
    ("Suggest some healthy snacks for children.", "apple", "healthy"),
    ("Explain how to make a paper airplane.", "fold", "paper"),
    ("Describe the perfect picnic.", "blanket", "food"),
    ("Give tips for studying for an exam.", "breaks", "study"),
    ("Explain why leaves change colour in autumn.", "chlorophyll", "green"),
    ("Write a short welcome message for a new member of a book club.", "novel", "book"),
    ("Suggest ways to reduce stress after a busy day.", "music", "relax"),
    ("Explain how to boil an egg.", "timer", "water"),
    ("Describe a busy city street at night.", "lights", "people"),
    ("Give tips for writing a clear email.", "subject", "email"),
    ("Explain what causes thunder.", "lightning", "sound"),
    ("Write a short post announcing a lost cat.", "reward", "cat"),
    ("Suggest some ways to save electricity at home.", "switch", "energy"),
    ("Explain why dogs wag their tails.", "emotion", "happy"),
    ("Describe how to pack a suitcase for a weekend trip.", "socks", "clothes"),
    ("Give advice for running a first five kilometre race.", "shoes", "run"),
    ("Explain how bees make honey.", "nectar", "flowers"),
    ("Write a short note for a colleague's farewell card.", "adventure", "luck"),
    ("Suggest ideas for a small vegetable garden on a balcony.", "pots", "plants"),
    ("Explain why it is important to wash your hands.", "germs", "soap"),
    ("Describe the smell of fresh bread.", "oven", "warm"),
    ("Give tips for keeping a conversation going.", "listen", "questions"),
    ("Explain how a refrigerator keeps food cold.", "gas", "cold"),
    ("Write a short reminder to a roommate to take out the rubbish.", "tonight", "rubbish"),
    ("Suggest ways to stay warm in winter without turning up the heating.", "layers", "warm"),
    ("Explain why we have seasons.", "tilt", "sun"),
    ("Describe what a good teacher does.", "patience", "students"),
    ("Give tips for a first visit to a museum.", "map", "art"),
    ("Explain how to make a simple salad dressing.", "vinegar", "oil"),
]

START_PHRASES = ["Here is my answer", "Sure thing", "Good question", "Let me explain", "In short"]
END_PHRASES = ["Hope this helps.", "That is all.", "Have a nice day.", "Any other questions?", "Thank you."]

# The constraint kinds and their wording. {} fields come from the record's args. Each wording asks
# for exactly what ivft/ifeval.py checks.
INSTRUCTIONS = {
    "lowercase": "Write your whole answer in lowercase letters; do not use any capital letters.",
    "uppercase": "Write your whole answer in capital letters only.",
    "max_words": "Answer in no more than {n} words.",
    "min_words": "Answer in at least {n} words.",
    "max_sentences": "Answer in at most {n} sentences.",
    "paragraphs": "Write exactly {n} paragraphs, separated from each other by a blank line.",
    "include_word": "Use the word \"{word}\" somewhere in your answer.",
    "avoid_word": "Do not use the word \"{word}\" anywhere in your answer.",
    "start_phrase": "Begin your answer with the words \"{phrase}\".",
    "end_phrase": "Finish your answer with the exact phrase \"{phrase}\" and write nothing after it.",
    "bullets": "Format your answer as exactly {n} bullet points, each on its own line starting with \"* \".",
    "quoted": "Put your whole answer inside double quotation marks.",
    "json": "Give your whole answer as valid JSON.",
    "no_commas": "Do not use any commas in your answer.",
    "title": "Give your answer a title wrapped in double angular brackets, like <<my title>>.",
}
KINDS = list(INSTRUCTIONS)

# Pairs that contradict (or make each other's check meaningless): never in one prompt. Anything with
# json stands alone, since JSON syntax fixes the layout, quotes and commas.
CONFLICTS = {frozenset(p) for p in [
    ("lowercase", "uppercase"), ("max_words", "min_words"), ("paragraphs", "bullets"),
    ("max_sentences", "paragraphs"), ("max_sentences", "bullets"), ("quoted", "start_phrase"),
    ("quoted", "end_phrase"), ("quoted", "title"), ("quoted", "bullets"), ("quoted", "paragraphs"),
    ("start_phrase", "title"), ("start_phrase", "bullets"), ("end_phrase", "bullets"),
    ("lowercase", "title"), ("uppercase", "title"), ("lowercase", "start_phrase"),
    ("lowercase", "end_phrase"), ("uppercase", "start_phrase"), ("uppercase", "end_phrase"),
    ("max_words", "paragraphs"), ("max_words", "bullets"),
]} | {frozenset(("json", k)) for k in INSTRUCTIONS if k != "json"}


def draw_args(rng, kind, request):
    """The arguments of one constraint (a dict; empty for kinds that take none)."""
    _, include, avoid = request
    if kind == "max_words":
        return {"n": rng.choice([15, 25, 40])}
    if kind == "min_words":
        return {"n": rng.choice([40, 60, 80])}
    if kind == "max_sentences":
        return {"n": rng.choice([2, 3])}
    if kind in ("paragraphs", "bullets"):
        return {"n": rng.choice([2, 3, 4])}
    if kind == "include_word":
        return {"word": include}
    if kind == "avoid_word":
        return {"word": avoid}
    if kind == "start_phrase":
        return {"phrase": rng.choice(START_PHRASES)}
    if kind == "end_phrase":
        return {"phrase": rng.choice(END_PHRASES)}
    return {}


# The dev split's requests: other topics than REQUESTS, so no dev prompt shares a request with a test one.
DEV_REQUESTS = [
    ("Explain how to fold a fitted sheet.", "corners", "sheet"),
    ("Give tips for keeping a sourdough starter alive.", "flour", "starter"),
    ("Describe a quiet evening at a lake.", "reflection", "water"),
    ("Write a short note asking a friend to water your plants.", "watering", "plants"),
    ("Suggest ways to keep warm in a cold flat.", "blanket", "cold"),
    ("Explain why bread goes stale.", "moisture", "bread"),
    ("Give advice for a first night of camping.", "torch", "tent"),
    ("Describe the view from the top of a hill.", "valley", "view"),
    ("Explain how to sharpen a pencil without a sharpener.", "knife", "pencil"),
    ("Write a short message congratulating a cousin on a new baby.", "family", "baby"),
    ("Suggest some games to play on a long car journey.", "license", "car"),
    ("Explain why owls are active at night.", "hunting", "night"),
    ("Give tips for choosing a good umbrella.", "frame", "rain"),
    ("Describe a market stall selling fresh fruit.", "baskets", "fruit"),
    ("Explain how to wrap a present neatly.", "tape", "paper"),
]


def make_ifeval(seed: int, n: int = N_IFEVAL, requests=REQUESTS, stream: str = "ifeval", prefix: str = "if") -> list:
    rng = random.Random(f"{seed}/{stream}")
    order = list(range(len(requests)))
    rng.shuffle(order)
    records = []
    for i in range(n):
        request = requests[order[i % len(order)]]
        # each pass over the requests shifts the kinds by one: no request meets the same first kind twice
        kinds = [KINDS[(i + i // len(order)) % len(KINDS)]]
        second = [k for k in KINDS if k != kinds[0] and frozenset((k, kinds[0])) not in CONFLICTS]
        if rng.random() < 0.5 and second:   # about half the prompts carry a second constraint
            kinds.append(rng.choice(second))
        constraints = [{"kind": k, "args": draw_args(rng, k, request)} for k in kinds]
        wording = " ".join(INSTRUCTIONS[c["kind"]].format(**c["args"]) for c in constraints)
        records.append({"id": f"{prefix}{i:03d}", "prompt": f"{request[0]} {wording}", "request": request[0],
                        "constraints": constraints})
    return records


# Everyday requests for the drift measure: templates x subjects, none of them a REQUESTS topic.
EVERYDAY_TEMPLATES = [
    "What is a good way to {}?", "Can you give me a few ideas to {}?", "How should a beginner {}?",
    "What mistakes do people often make when they {}?", "Why might someone want to {}?",
    "Explain briefly how to {}.",
]
EVERYDAY_SUBJECTS = [
    "organise a small kitchen", "choose a good book to read", "start a morning walking habit",
    "plan a weekly family menu", "learn to play the guitar", "keep track of monthly bills",
    "make new friends in a new city", "clean a pair of white trainers", "take better photos with a phone",
    "remember people's names", "prepare for a long flight", "teach a child to ride a bike",
    "store fresh herbs", "write a shopping list", "decorate a small bedroom", "look after a goldfish",
    "spend less time on social media", "host a dinner for friends", "choose a gift for a grandparent",
    "fix a squeaky door", "start journaling", "pick a ripe melon", "get ready for a camping trip",
    "care for a wooden table", "learn to cook rice", "plan a day at the beach", "keep a car clean inside",
    "start a small savings jar", "read a map", "make a simple bird feeder", "practise public speaking",
    "get rid of clutter in a garage", "choose running shoes", "write a birthday card", "keep bread fresh",
    "pick a name for a pet", "plan a picnic in the park", "learn basic first aid", "help a friend who is sad",
    "water a garden in summer",
]


# The dev split's subjects (10 x 6 templates = 60 prompts), none of them a test subject.
EVERYDAY_DEV_SUBJECTS = [
    "iron a shirt", "plan a surprise party", "keep a houseplant alive in winter", "sort laundry",
    "choose a board game for a family", "start learning to draw", "pack a school lunch",
    "organise digital photos", "make a cup of hot chocolate", "prepare a bike for winter",
]


def make_everyday(seed: int, n: int = N_EVERYDAY, subjects=EVERYDAY_SUBJECTS, stream: str = "everyday",
                  prefix: str = "ev") -> list:
    rng = random.Random(f"{seed}/{stream}")
    pairs = [(t, s) for s in subjects for t in EVERYDAY_TEMPLATES]
    rng.shuffle(pairs)
    return [{"id": f"{prefix}{i:03d}", "prompt": t.format(s)} for i, (t, s) in enumerate(pairs[:n])]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="where to write")
    p.add_argument("--seed", type=int, default=1234, help="seed of both prompt sets")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "ifeval.jsonl"), make_ifeval(args.seed))
    write_jsonl(os.path.join(args.out_dir, "everyday.jsonl"), make_everyday(args.seed))
    # the dev split: other requests and subjects, other random streams; the test files above are unchanged by it
    write_jsonl(os.path.join(args.out_dir, "ifeval_dev.jsonl"),
                make_ifeval(args.seed, N_DEV, DEV_REQUESTS, "ifeval_dev", "ifdev"))
    write_jsonl(os.path.join(args.out_dir, "everyday_dev.jsonl"),
                make_everyday(args.seed, N_DEV, EVERYDAY_DEV_SUBJECTS, "everyday_dev", "evdev"))
    print(f"wrote ifeval.jsonl ({N_IFEVAL}), everyday.jsonl ({N_EVERYDAY}) and their dev files ({N_DEV} each) "
          f"to {args.out_dir}")


if __name__ == "__main__":
    main()
