"""Prompt conventions: how an example becomes token ids, and how a reply is judged. train.py,
extract_iv.py and evaluate.py all use these, so a prompt is the same list of ids whether it is
trained on, scored or patched.

- Prompt (render_prompt): the checkpoint's chat template with its default system prompt; k
  demonstrations as earlier user/assistant turns, each user turn = instruction + input
  (tasks.user_prompt); then the example's own user turn and the generation prompt
  ("<|im_start|>assistant\\n"). The "corrupted" prompt of IV extraction is the same with every user
  turn reduced to the input alone, so the two differ exactly by the instruction.
- Answer (answer_ids): the stripped output text encoded on its own, followed by the end-of-turn token
  (<|im_end|> for ChatML); in the plain format of a model without a chat template (ivft.chat
  PLAIN_TEMPLATE) it follows "A:" after one space (tok.answer_prefix). The end token is part of every score: it separates "cold" from
  "cold-blooded" when ranking choices, and emitting it is part of answering in the asked format.
- Knowledge prompt (knowledge_ids): plain text with no chat template; the answer follows after one
  space. Scores are sums of natural-log probabilities over the answer tokens.
- Exact match: greedy decoding, cut at the first stop token, compared after normalize_answer, which
  forgives presentation (whitespace, quotes, a final period, a capitalised first letter) but not
  format: the form of the answer is what an instruction asks for.
- k-shot: one fixed set of k demonstrations per task (a seeded sample of its own demos, else of its
  train split), shared by all test examples (the MMLU convention). Sharing is also what makes k-shot
  cheap: every prompt of a task then starts with the same ~130 tokens, which are run once.
"""
from __future__ import annotations

import random
import re

from ivft.tasks import user_prompt
import sys
import unicodedata

MAX_LABELS = 10          # a task with at most this many distinct outputs ranks all of them
N_DISTRACTORS = 9        # otherwise: gold + this many outputs of other examples (see choice_candidates)
QUOTES = "\"'`*“”‘’「」『』"   # stripped around an answer by normalize_answer (「」『』: Chinese, Japanese)
END_PUNCT = ".!?。"        # sentence ends dropped after it (。 the ideographic full stop; NFKC maps ！？ to !?)
# Scripts written without spaces between words (Thai, kana, CJK ideographs): a word's edge there is
# not a letter next to a non-letter, so reply_contains looks for no boundary beside them.
UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
SPACED_LETTER = rf"[^\W{UNSPACED}]"      # a word character of a script that separates words by spaces
# reply_contains: the greedy reply's budget. A chat model answers in a sentence ("The capital of
# Peru is Lima."); 32 tokens hold one, and decoding stops as soon as the answer has appeared.
REPLY_TOKENS = 32


# ---------------------------------------------------------------------------------------------
# Prompt and answer ids

def render_prompt(tok, ex, shots=(), with_instruction: bool = True, system: str | None = None) -> list[int]:
    """Chat prompt ids for example `ex`, ending with the generation prompt. `shots` are earlier
    user/assistant turns; with_instruction=False drops the instruction from every user turn (the
    corrupted prompt of IV extraction); system=None keeps the template's default system prompt."""
    def user(e):
        return user_prompt(e) if with_instruction else e.input

    messages = [{"role": "system", "content": system}] if system is not None else []
    for s in shots:
        messages += [{"role": "user", "content": user(s)}, {"role": "assistant", "content": s.output.strip()}]
    messages.append({"role": "user", "content": user(ex)})
    return tok.render_chat(messages, add_generation_prompt=True)


def end_of_turn_id(tok) -> int:
    """The token that closes an assistant turn in the template (not always the eos id: Llama-3
    Instruct ends turns with <|eot_id|>)."""
    if hasattr(tok, "end_of_turn_id"):  # read off the checkpoint's own template
        return tok.end_of_turn_id()
    special = getattr(tok, "special_tokens", {})
    for name in ("<|im_end|>", "<|eot_id|>"):
        if name in special:
            return special[name]
    return tok.eos_id


def answer_ids(tok, text: str) -> list[int]:
    """The answer as the assistant would write it right after the generation prompt: the stripped
    text encoded on its own, then the end-of-turn token (where the tokenizer has one)."""
    prefix = getattr(tok, "answer_prefix", "")
    ids = continuation_ids(tok, prefix + text.strip()) if prefix else tok.encode(text.strip())
    if not ids:
        raise ValueError(f"answer {text!r} tokenizes to nothing")
    eot = end_of_turn_id(tok)
    return ids + ([eot] if eot is not None else [])    # (None: a base tokenizer without an end token)


def bos_ids(tok) -> list[int]:
    """What a plain-text (non-chat) prompt starts with: bos where the tokenizer adds it to plain text
    (Llama-2/3, Mistral: tok.add_bos, as transformers does); ChatML models (SmolLM2, Qwen2) have none."""
    return [tok.bos_id] if getattr(tok, "add_bos", False) else []


def continuation_ids(tok, text: str) -> list[int]:
    """`text` tokenized as it reads after a prompt: a SentencePiece tokenizer (Llama-2, Mistral)
    would otherwise put its start-of-text "▁" before it (tok.encode_continuation)."""
    return tok.encode_continuation(text) if hasattr(tok, "encode_continuation") else tok.encode(text)


def knowledge_ids(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for a plain-text knowledge probe, no chat template, no end token.

    BPE attaches a space to the word after it (" Tokyo" is one token, "Tokyo" after a lone " " is
    not how text is ever tokenized), so the joining space goes with the answer: a prompt ending in a
    space gives it to the answer; one ending in a newline or an opening bracket/quote gets none."""
    if not prompt.strip() or not answer.strip():
        raise ValueError(f"empty knowledge prompt or answer: {prompt!r} -> {answer!r}")
    if prompt.endswith(" "):
        prompt = prompt.rstrip(" ")
    sep = "" if prompt[-1].isspace() or prompt[-1] in "([{\"'“‘" else " "
    bos = bos_ids(tok)
    cont = continuation_ids(tok, sep + answer.strip())
    if not cont:
        raise ValueError(f"knowledge answer {answer!r} tokenizes to nothing")
    return bos + tok.encode(prompt), cont


# ---------------------------------------------------------------------------------------------
# Judging a reply

def normalize_answer(text: str) -> str:
    """Exact-match normalisation: forgive presentation, keep format. NFKC; collapse whitespace; drop
    surrounding quotes, backticks and markdown stars and trailing sentence punctuation (. ! ? 。); lower
    the first character (a chat reply capitalises its first word: "Cold." = "cold").
    Deliberately not SQuAD's normalisation (lower case, no punctuation, no articles): the training
    tasks test the form of the answer ("TREE MORNING", "Young, Victor", "m-u-s-i-c", "1987-03-18"),
    and that would accept "tree morning", "Young Victor" or "m u s i c"."""
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    prev = None
    while prev != text:  # peel '"cold."' and 'cold."' alike, in any nesting
        prev = text
        text = text.strip(QUOTES).rstrip(END_PUNCT).strip()
    return text[:1].lower() + text[1:]


def may_still_match(partial: str, gold: str) -> bool:
    """False once no continuation of the partial generation can equal `gold` under normalize_answer,
    so decoding that row can stop (the verdict is already "no match"). Conservative: an undecodable
    partial character (U+FFFD from half a UTF-8 sequence) always keeps the row going."""
    if "\ufffd" in partial:
        return True
    target = normalize_answer(gold)
    # what normalize_answer would make of this prefix, leaving its end open: NFKC, collapsed
    # whitespace, leading quotes/stars stripped, first letter lowered
    t = " ".join(unicodedata.normalize("NFKC", partial).split()).lstrip(QUOTES + " ")
    t = t[:1].lower() + t[1:]
    if len(t) <= len(target):
        return target.startswith(t)
    # past the gold's length only the characters normalize_answer strips at the end may follow
    return t.startswith(target) and all(c in QUOTES + END_PUNCT + " " for c in t[len(target):])


def reply_contains(reply: str, gold: str, final: bool = True) -> bool:
    """Does the greedy reply state the gold answer? True when normalize_answer(gold) occurs in the
    reply as whole words ("London" in "The capital of the United Kingdom is London."), its first
    letter in either case, the rest case-sensitive (as exact match). This is the instruction-following
    score of the general suite: it accepts the model's own sentence style, and it fails a reply in
    some other task's format ("UNITED KINGDOM", "Kingdom United", "UK"), which is how fine-tuning
    on new formats shows up in a small chat model while the ranking of answers (choice_accuracy,
    knowledge) stays put. final=False is for a reply still being decoded: the match must then be
    followed by a character, so "London" in "... is London" does not count before the next token
    shows whether it was "Londoner"."""
    g = normalize_answer(gold)
    if not g:
        return False
    reply = " ".join(unicodedata.normalize("NFKC", reply).split())
    first = re.escape(g[0].lower()) + "|" + re.escape(g[0].upper())
    # whole words: no letter of a spaced script on either side ("London" not in "Londoner"), none
    # required beside a Chinese or Japanese character ("巴黎" in "首都是巴黎。", "apple" in "是apple")
    start = "" if re.match(f"[{UNSPACED}]", g[0]) else f"(?<!{SPACED_LETTER})"
    if re.match(f"[{UNSPACED}]", g[-1]):
        end = ""
    else:
        end = f"(?!{SPACED_LETTER})" if final else rf"(?=[\W{UNSPACED}])"
    return re.search(start + "(?:" + first + ")" + re.escape(g[1:]) + end, reply) is not None


def reply_budgets(golds, metrics) -> tuple[int, int]:
    """(exact match's, reply_contains's) token budgets, 0 for a metric not in `metrics`. One greedy
    reply serves both (greedy decoding is deterministic, so exact match's reply is the first tokens of
    reply_contains's). exact_match: room for the longest gold answer and its end token (a model that
    goes on past the gold shows at least one extra token, so a truncated ramble does not match,
    unless that token is one normalize_answer forgives: "cold." cut from "cold. It is ..." does);
    reply_contains: REPLY_TOKENS, a sentence."""
    em_budget = max(len(g) for g in golds) if "exact_match" in metrics else 0
    rc_budget = REPLY_TOKENS if "reply_contains" in metrics else 0
    return em_budget, rc_budget


def reply_text(tok, tokens, stop_ids, budget: int) -> str:
    """A greedy reply as text: its first `budget` tokens, up to (not including) the first stop token."""
    head = list(tokens[:budget])
    end = next((k for k, t in enumerate(head) if t in stop_ids), len(head))
    return tok.decode(head[:end])


def verdict_open(tok, golds_text, stop_ids, em_budget: int, rc_budget: int):
    """alive(i, tokens) for engine.run_prompts: row i decodes on while either metric's verdict is
    open: exact match until the reply can no longer match its gold golds_text[i] (a rambling "The
    opposite of hot is ..." would otherwise run the whole budget), reply_contains until the answer
    has appeared."""
    def alive(i, toks):
        text = tok.decode([t for t in toks if t not in stop_ids])
        return ((len(toks) < em_budget and may_still_match(text, golds_text[i]))
                or (len(toks) < rc_budget and not reply_contains(text, golds_text[i], final=False)))
    return alive


def reply_verdicts(tok, golds_text, replies, stop_ids, em_budget: int, rc_budget: int) -> dict:
    """Per example, 1.0 or 0.0 under exact_match and reply_contains (those with a budget), from the
    greedy replies (token lists, decoded under verdict_open); "text": each reply as decoded, which
    ends once both verdicts are settled."""
    out = {"text": [reply_text(tok, g, stop_ids, max(em_budget, rc_budget)) for g in replies]}
    if em_budget:
        out["exact_match"] = [float(normalize_answer(reply_text(tok, g, stop_ids, em_budget))
                                    == normalize_answer(x)) for g, x in zip(replies, golds_text)]
    if rc_budget:
        out["reply_contains"] = [float(reply_contains(reply_text(tok, g, stop_ids, rc_budget), x))
                                 for g, x in zip(replies, golds_text)]
    return out


# ---------------------------------------------------------------------------------------------
# Demonstrations and choices

def draw_shots(task, k: int, seed: int = 0) -> list:
    """The task's k demonstrations, fixed for all its test examples: a seeded sample of task.demos
    when the task ships its own (SuperNI's positive examples), topped up from its train split when
    it ships fewer than k (a real SuperNI task has 2); with fewer than k in all, all of them, and a
    note on stderr saying so."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    demos = list(getattr(task, "demos", None) or [])
    shots = rng.sample(demos, min(k, len(demos)))
    if len(shots) < k:
        shots += rng.sample(list(task.train), min(k - len(shots), len(task.train)))
    if len(shots) < k:
        print(f"note: task {task.name!r} has {len(shots)} demonstrations in all; k_shot={k} uses those "
              f"{len(shots)}", file=sys.stderr)
    return shots


def distinct_outputs(task) -> list[str]:
    # sorted, so the candidate list does not depend on example order
    return sorted({ex.output.strip() for ex in list(task.train) + list(task.test)})


def choice_candidates(task, ex, index: int = 0, seed: int = 0, labels: list[str] | None = None) -> list[str]:
    """Answers to rank for `ex` (gold included, duplicates removed, order fixed):
    1. ex.choices when the example has them (the gold must be one of them);
    2. else the task's distinct outputs (train + test) when there are at most MAX_LABELS of them
       (classification-like tasks: the label set);
    3. else the fallback: gold plus N_DISTRACTORS other outputs of the task drawn by (seed, index),
       i.e. a 10-way choice against plausible answers of the same form, in sorted order."""
    gold = ex.output.strip()
    if ex.choices:
        cands = list(dict.fromkeys(c.strip() for c in ex.choices))
        if gold not in cands:
            raise ValueError(f"task {task.name!r}, example {index}: gold {gold!r} is not among its choices {cands}")
        return cands
    labels = distinct_outputs(task) if labels is None else labels
    if len(labels) <= MAX_LABELS:
        return labels
    others = [x for x in labels if x != gold]
    rng = random.Random(seed * 1_000_003 + index)
    return sorted([gold] + rng.sample(others, min(N_DISTRACTORS, len(others))))
