"""
Evaluation: the scores of docs/method.md §5 for one model on a list of tasks, and the continual-learning
summary (AP, BWT, FWT, forgetting, GP, IP) over the reports written along a training sequence.

Conventions, used everywhere (train.py and extract_iv.py import these, so a prompt is the same list
of ids whether it is trained on, scored or patched):
- Prompt (render_prompt): the checkpoint's chat template with its default system prompt; k
  demonstrations as earlier user/assistant turns, each user turn = instruction + input
  (tasks.user_prompt); then the example's own user turn and the generation prompt
  ("<|im_start|>assistant\\n"). The "corrupted" prompt of IV extraction is the same with every user
  turn reduced to the input alone, so the two differ exactly by the instruction.
- Answer (answer_ids): the stripped output text encoded on its own, followed by the end-of-turn token
  (<|im_end|> for ChatML). The end token is part of every score: it separates "cold" from
  "cold-blooded" when ranking choices, and emitting it is part of answering in the asked format.
- Knowledge prompt (knowledge_ids): plain text with no chat template; the answer follows after one
  space. Scores are sums of natural-log probabilities over the answer tokens.
- Exact match: greedy decoding, cut at the first stop token, compared after normalize_answer, which
  forgives presentation (whitespace, quotes, a final period, a capitalised first letter) but not
  format: the form of the answer is what an instruction asks for.
- k-shot: one fixed set of k demonstrations per task (a seeded sample of its own demos, else of its
  train split), shared by all test examples (the MMLU convention). Sharing is also what makes k-shot
  cheap: every prompt of a task then starts with the same ~130 tokens, which are run once.

Speed (all exact: the numbers equal a plain per-example loop; tests check each shortcut):
- Prompts of one task share a long prefix (system prompt, demonstrations, instruction). It runs
  once and its KV cache serves every row; a batch then runs only its rows' own suffixes, and that
  one prefill serves choice ranking, the gold's log-prob and greedy decoding.
- Answers are scored on top of the prompt cache, all (prompt, answer) pairs of a batch sorted by
  length; only positions whose next token is scored go through the 49k-wide output layer, in fp32
  even under bf16 autocast (bf16 logits are off by ~0.1 nats, enough to flip close choices).
- Ranking prunes: log-probs only fall as tokens are added, so an answer whose first token is
  already less likely than the whole gold cannot outrank it and is not scored further.
- Greedy decoding starts from the gold's teacher-forced pass: while the argmax agrees with the gold
  the reply is the gold; at the first disagreement the reply usually can no longer match
  (may_still_match) and needs no decoding at all. Rows still open decode token by token and stop
  as soon as every verdict is settled. One greedy reply serves both exact_match and reply_contains.
- Decoding is continuously batched (_Decoder): rows of all tasks wait in one pool and step
  together, so the few that ramble to the budget never step alone; the KV cache grows in place.

CLI: `python evaluate.py` evaluates the embedded SmolLM2-135M-Instruct on the general suite;
`python evaluate.py --help` lists the flags.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass

import torch
from tqdm import tqdm

from model import KVCache

# ---------------------------------------------------------------------------------------------
# Metric names. The three chat metrics come zero-shot and, with k_shot > 0, in-context ("_kshot");
# knowledge_logprob has no chat prompt and so no k-shot form.

CHAT_METRICS = ("exact_match", "reply_contains", "choice_accuracy", "instruction_logprob")
KSHOT_SUFFIX = "_kshot"
METRICS = CHAT_METRICS + ("knowledge_logprob",) + tuple(m + KSHOT_SUFFIX for m in CHAT_METRICS)
MAX_LABELS = 10          # a task with at most this many distinct outputs ranks all of them
N_DISTRACTORS = 9        # otherwise: gold + this many outputs of other examples (see choice_candidates)
QUOTES = "\"'`*“”‘’"   # stripped around an answer by normalize_answer
# reply_contains: the greedy reply's budget. A chat model answers in a sentence ("The capital of
# Peru is Lima."); 32 tokens hold one, and decoding stops as soon as the answer has appeared.
REPLY_TOKENS = 32
# Prompts per batch, and rows per decoding step. On a 2-core CPU fewer, wider matrix products win
# (bench/bench_evaluate.py: 64 -> 128 saves ~10%), and a task's 100 prompts prefill as one batch. Memory:
# for a 7B model a k-shot pool of 128 rows holds ~15 GB of KV cache; pass a smaller batch_size there.
BATCH_SIZE = 128
# Task.metric spellings -> our metric names (tasks.py says "choice")
METRIC_ALIASES = {"choice": "choice_accuracy"}


# ---------------------------------------------------------------------------------------------
# Prompt and answer ids: the one convention (see the module docstring)

def _user_prompt(ex) -> str:
    # imported here, not at module level, so that evaluate.py can be imported (e.g. by tests that
    # build their own Task) without loading the task registry and its data files
    from ivft.tasks import user_prompt
    return user_prompt(ex)


def canonical_metric(name: str) -> str:
    """Our name for a Task.metric value ("choice" -> "choice_accuracy")."""
    name = METRIC_ALIASES.get(name, name)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (aliases: {METRIC_ALIASES})")
    return name


def render_prompt(tok, ex, shots=(), with_instruction: bool = True, system: str | None = None) -> list[int]:
    """Chat prompt ids for example `ex`, ending with the generation prompt. `shots` are earlier
    user/assistant turns; with_instruction=False drops the instruction from every user turn (the
    corrupted prompt of IV extraction); system=None keeps the template's default system prompt."""
    def user(e):
        return _user_prompt(e) if with_instruction else e.input

    messages = [{"role": "system", "content": system}] if system is not None else []
    for s in shots:
        messages += [{"role": "user", "content": user(s)}, {"role": "assistant", "content": s.output.strip()}]
    messages.append({"role": "user", "content": user(ex)})
    return tok.render_chat(messages, add_generation_prompt=True)


def end_of_turn_id(tok) -> int:
    """The token that closes an assistant turn in the template (not always the eos id: Llama-3
    Instruct ends turns with <|eot_id|>)."""
    special = getattr(tok, "special_tokens", {})
    for name in ("<|im_end|>", "<|eot_id|>"):
        if name in special:
            return special[name]
    return tok.eos_id


def answer_ids(tok, text: str) -> list[int]:
    """The answer as the assistant would write it right after the generation prompt: the stripped
    text encoded on its own, then the end-of-turn token."""
    ids = tok.encode(text.strip())
    if not ids:
        raise ValueError(f"answer {text!r} tokenizes to nothing")
    return ids + [end_of_turn_id(tok)]


def bos_ids(tok) -> list[int]:
    """What a plain-text (non-chat) prompt starts with: Llama-2/3 checkpoints expect their bos token
    before any text; ChatML models (SmolLM2, Qwen2) have none outside the template."""
    return [tok.bos_id] if getattr(tok, "chat_format", None) in ("llama2", "llama3") and tok.bos_id is not None else []


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
    cont = tok.encode(sep + answer.strip())
    if not cont:
        raise ValueError(f"knowledge answer {answer!r} tokenizes to nothing")
    return bos + tok.encode(prompt), cont


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: forgive presentation, keep format. NFKC; collapse whitespace; drop
    surrounding quotes, backticks and markdown stars and trailing sentence punctuation (. ! ?); lower
    the first character (a chat reply capitalises its first word: "Cold." = "cold").
    Deliberately not SQuAD's normalisation (lower case, no punctuation, no articles): the training
    tasks test the form of the answer ("TREE MORNING", "Young, Victor", "m-u-s-i-c", "1987-03-18"),
    and that would accept "tree morning", "Young Victor" or "m u s i c"."""
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    prev = None
    while prev != text:  # peel '"cold."' and 'cold."' alike, in any nesting
        prev = text
        text = text.strip(QUOTES).rstrip(".!?").strip()
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
    return t.startswith(target) and all(c in QUOTES + ".!? " for c in t[len(target):])


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
    end = r"(?!\w)" if final else r"(?=\W)"
    return re.search(r"(?<!\w)(?:" + first + ")" + re.escape(g[1:]) + end, reply) is not None


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


def _distinct_outputs(task) -> list[str]:
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
    labels = _distinct_outputs(task) if labels is None else labels
    if len(labels) <= MAX_LABELS:
        return labels
    others = [x for x in labels if x != gold]
    rng = random.Random(seed * 1_000_003 + index)
    return sorted([gold] + rng.sample(others, min(N_DISTRACTORS, len(others))))


# ---------------------------------------------------------------------------------------------
# The engine: batched prompts with a shared prefix, continuation scoring, greedy decoding

def _device(model):
    return next(model.parameters()).device


def _logits(model, h):
    """Output-layer logits for hidden states h (N, C) -> (N, V), fp32. Autocast is turned off for
    the output layer: see the module docstring."""
    w = model.lm_head.weight
    with torch.autocast(h.device.type, enabled=False):
        return model.lm_head(h.to(w.dtype)).float()


def _logprobs(model, h):
    """log-softmax over the vocabulary for hidden states h (N, C) -> (N, V), fp32. (Greedy decoding
    needs only the argmax, which the logits have: it skips the softmax.)"""
    return _logits(model, h).log_softmax(-1)


def _fork(cache: KVCache, rows=None) -> KVCache:
    """A cache that shares the tensors of `cache` (rows=None) or holds a copy of some rows. Updating
    it concatenates into new tensors, so the original is never changed."""
    new = KVCache(len(cache.k))
    for i in range(len(cache.k)):
        if cache.k[i] is not None:
            new.k[i] = cache.k[i] if rows is None else cache.k[i][rows]
            new.v[i] = cache.v[i] if rows is None else cache.v[i][rows]
    return new


def _common_prefix_len(seqs) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _prefill(model, suffixes, prefix_cache, prefix_len, pad_side):
    """Run a batch of prompt suffixes after a shared prefix (already in prefix_cache, batch 1).
    -> (cache, pad_mask (B, prefix_len + T), hidden at each row's last prompt token (B, C)).
    Padding sits between the prefix and a left-padded suffix: the model takes positions from the
    mask, so a row's numbers are those of its unpadded prompt wherever the pads are."""
    dev = _device(model)
    B, T = len(suffixes), max(len(s) for s in suffixes)
    idx = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, prefix_len + T, dtype=torch.bool)
    mask[:, :prefix_len] = True
    last = torch.empty(B, dtype=torch.long)
    for r, s in enumerate(suffixes):
        if pad_side == "left":
            idx[r, T - len(s):] = torch.tensor(s)
            mask[r, prefix_len + T - len(s):] = True
            last[r] = T - 1
        else:
            idx[r, :len(s)] = torch.tensor(s)
            mask[r, prefix_len:prefix_len + len(s)] = True
            last[r] = len(s) - 1
    cache = KVCache(model.n_layers)
    if prefix_len:
        # expand() is a view; the first update concatenates into per-row tensors
        for i in range(model.n_layers):
            cache.k[i] = prefix_cache.k[i].expand(B, -1, -1, -1)
            cache.v[i] = prefix_cache.v[i].expand(B, -1, -1, -1)
    mask = mask.to(dev)
    h = model(idx.to(dev), pad_mask=mask, cache=cache, return_hidden=True)      # (B, T, C)
    return cache, mask, h[torch.arange(B, device=dev), last.to(dev)]             # (B, C)


def _score_pairs(model, cache, mask, first_lp, prow, cs):
    """Sum log P(cs[k] | prompt of batch row prow[k]) for a chunk of (row, continuation) pairs.
    first_lp (B, V) scores every continuation's first token; the rest need one forward of cont[:-1]
    on top of a copy of the prompt's cache rows (the last token's output predicts nothing we score).
    -> (float64 tensor (len(cs),), per pair the argmax token at each of its positions: what greedy
    decoding would pick there, given the continuation so far)."""
    dev = first_lp.device
    prow_t = torch.tensor(prow, device=dev)
    total = first_lp[prow_t, torch.tensor([c[0] for c in cs], device=dev)].double()
    greedy = [[t] for t in first_lp[prow_t].argmax(-1).tolist()]
    long = [k for k, c in enumerate(cs) if len(c) > 1]      # one-token answers are done already
    if not long:
        return total, greedy
    Tc = max(len(cs[k]) for k in long) - 1
    inp = torch.zeros(len(long), Tc, dtype=torch.long)
    tgt = torch.zeros(len(long), Tc, dtype=torch.long)
    cmask = torch.zeros(len(long), Tc, dtype=torch.bool)
    for q, k in enumerate(long):
        c = cs[k]
        inp[q, :len(c) - 1] = torch.tensor(c[:-1])
        tgt[q, :len(c) - 1] = torch.tensor(c[1:])
        cmask[q, :len(c) - 1] = True
    inp, tgt, cmask = inp.to(dev), tgt.to(dev), cmask.to(dev)
    rows = torch.tensor([prow[k] for k in long], device=dev)
    # copying the rows' cache (a few MB per row) costs far less than the forward itself
    sub = _fork(cache, rows)
    pad_mask = torch.cat([mask[rows], cmask], dim=1)         # (N, prefix + T + Tc): right-padded answers
    h = model(inp, pad_mask=pad_mask, cache=sub, return_hidden=True)               # (N, Tc, C)
    logp = _logprobs(model, h[cmask])                                              # (M, V) M scored tokens
    lp = logp.gather(1, tgt[cmask][:, None])[:, 0]                                 # (M,)
    which = torch.tensor(long, device=dev)[:, None].expand(-1, Tc)[cmask]          # (M,) pair index
    for k, t in zip(which.tolist(), logp.argmax(-1).tolist()):                     # in position order
        greedy[k].append(t)
    return total.index_add_(0, which, lp.double()), greedy


class _Decoder:
    """Greedy decoding of rows from many prompt batches at once (continuous batching).

    A decoding step of the embedded model on a 2-core CPU costs about 100 ms + 3.5 ms per row: the
    fixed part (every weight read once, ~30 x 20 small ops) dominates small batches. Decoding each
    prompt batch alone, the few rows that ramble to the budget would step alone for many steps. So
    rows wait in a pool, from any batch or task, and step together once there are min_rows of
    them (finish() steps the rest). Rows of different prompt lengths share one left-padded cache
    (KVCache.stack); positions come from the pad mask, so each row computes what it would alone.

    Like Transformer.generate, but starting from our prefilled caches, with the fp32 output layer,
    and ending each row at its first stop token, at its budget, or once alive(tokens) is False
    (its verdict is settled). The reply (token list) goes to sink[index]."""

    @dataclass
    class Row:
        tokens: list            # the reply so far; its last token is the row's next input
        budget: int             # most tokens to generate
        alive: object           # callable(tokens) -> False once the verdict is settled, or None
        sink: list              # where the reply goes when done: sink[index] = tokens
        index: int
        done: bool = False

    def __init__(self, model, stop_ids, min_rows: int, timings=None, progress: bool = False):
        self.model, self.stop, self.min_rows, self.timings = model, set(stop_ids), max(1, min_rows), timings
        self.progress = progress
        self.cache = self.mask = self.nxt = None    # pooled rows: cache (A, G, S, D), mask (A, S), next input (A,)
        self.rows = []                              # a Row per pooled row (done ones ride along: see step)
        self.queued = []                            # batches waiting to join: (cache, batch rows, mask, Rows)

    def _ends(self, row) -> bool:
        t = row.tokens
        return t[-1] in self.stop or len(t) >= row.budget or (row.alive is not None and not row.alive(t))

    def _deliver(self, row):
        row.sink[row.index] = row.tokens
        row.done = True

    @torch.no_grad()
    def add(self, cache, mask, last_h, rows, sel):
        """Queue batch rows sel (LongTensor) of a prefilled batch: cache, its pad mask, and the hidden
        state of each selected row's last prompt token last_h (len(sel), C); rows[k] = (budget,
        alive or None, sink, index) for sel[k]. Steps while min_rows or more rows wait."""
        t0 = time.perf_counter()
        first = _logits(self.model, last_h).argmax(-1).tolist()
        new, keep = [], []
        for k, ((budget, alive, sink, index), t) in enumerate(zip(rows, first)):
            row = self.Row([t], budget, alive, sink, index)
            if self._ends(row):
                self._deliver(row)      # answered in one token: never enters the pool
            else:
                new.append(row)
                keep.append(k)
        if new:
            # joined to the pool only when it steps: batches queued in between are copied once
            self.queued.append((cache, sel.to(mask.device)[torch.tensor(keep, device=mask.device)], mask, new))
        _add_time(self.timings, "generate", t0)
        while self._live() >= self.min_rows:
            self.step()

    def _join(self):
        """Move the queued rows into the pool (one copy of the pool, dropping its finished rows)."""
        live = [k for k, r in enumerate(self.rows) if not r.done]
        parts, masks, nxts, rows = [], [], [], []
        if live:
            lt = torch.tensor(live, device=self.mask.device)
            parts.append((self.cache, lt))
            masks.append(self.mask[lt])
            nxts.append(self.nxt[lt])
            rows += [self.rows[k] for k in live]
        for cache, sel, mask, new in self.queued:
            parts.append((cache, sel))
            masks.append(mask[sel])
            nxts.append(torch.tensor([r.tokens[-1] for r in new], device=mask.device))
            rows += new
        S = max(m.shape[1] for m in masks)
        # room for the longest budget: every later step writes in place
        self.cache = KVCache.stack(parts, headroom=max(r.budget for r in rows))
        self.mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], S - m.shape[1]), m], 1) for m in masks])
        self.nxt = torch.cat(nxts)
        self.rows, self.queued = rows, []

    def _live(self) -> int:
        return sum(not r.done for r in self.rows) + sum(len(q[3]) for q in self.queued)

    @torch.no_grad()
    def step(self):
        """One token for every pooled row."""
        t0 = time.perf_counter()
        if self.queued:
            self._join()
        dev = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.bool, device=dev)], 1)
        h = self.model(self.nxt[:, None], pad_mask=self.mask, cache=self.cache, return_hidden=True)[:, -1]
        self.nxt = _logits(self.model, h).argmax(-1)                     # (A,)
        for row, t in zip(self.rows, self.nxt.tolist()):
            if not row.done:
                row.tokens.append(t)
                if self._ends(row):
                    self._deliver(row)
        # finished rows ride along (their tokens are ignored) until a quarter of the pool has
        # finished: dropping rows copies the whole cache
        live = [k for k, r in enumerate(self.rows) if not r.done]
        if len(live) <= 3 * len(self.rows) // 4:
            if live:
                lt = torch.tensor(live, device=dev)
                self.cache.select_rows(lt)
                self.mask, self.nxt = self.mask[lt], self.nxt[lt]
                self.rows = [self.rows[k] for k in live]
            else:
                self.cache = self.mask = self.nxt = None
                self.rows = []
        _add_time(self.timings, "generate", t0)

    def finish(self):
        """Decode every pooled row to its end."""
        steps = max([r.budget - len(r.tokens) for r in self.rows if not r.done] +
                    [r.budget - 1 for q in self.queued for r in q[3]] + [0])
        with tqdm(total=steps, desc="last replies", disable=not self.progress or not steps, leave=False) as bar:
            while self._live():
                self.step()
                bar.update()


def _add_time(timings, key, t0):
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return time.perf_counter()


def _score_many(model, cache, mask, first_lp, rows, pairs, conts, scores, chunk, greedy=None):
    """Score (batch row, continuation index) pairs into scores[rows[r]][j], sorted by length and
    chunked so that a forward pads little; greedy[rows[r]] gets the argmax tokens along conts[.][0]."""
    pairs = sorted(pairs, key=lambda rj: len(conts[rows[rj[0]]][rj[1]]))
    for c0 in range(0, len(pairs), chunk):
        part = pairs[c0:c0 + chunk]
        s, g = _score_pairs(model, cache, mask, first_lp, [r for r, _ in part],
                            [conts[rows[r]][j] for r, j in part])
        for (r, j), v, gj in zip(part, s.tolist(), g):
            scores[rows[r]][j] = v
            if j == 0 and greedy is not None:
                greedy[rows[r]] = gj


def _greedy_from_gold(gold, argmax, max_new, stop_ids, alive):
    """Greedy decoding read off the gold's teacher-forced pass: argmax[k] is the greedy token after
    gold[:k]. While greedy agrees with the gold it walks the gold; at the first disagreement its
    reply is gold[:k] + argmax[k]. -> the reply when that settles it (it reproduced the gold through
    its end token, hit a stop token, ran out of budget, or can no longer match), else None: the row
    needs real decoding (e.g. "Cold" where the gold says "cold")."""
    toks = []
    for want, got in zip(gold, argmax):
        toks.append(got)
        if got in stop_ids or len(toks) >= max_new or (alive is not None and not alive(toks)):
            return toks
        if got != want:
            return None
    return None  # a gold without a stop token (not produced by answer_ids): decode for real


@torch.no_grad()
def _run_prompts(model, prompts, conts, *, max_new_tokens=0, stop_ids=(), alive=None, prune=False,
                 batch_size=32, pad_side="left", desc=None, progress=True, timings=None, tag="", decoder=None):
    """For each prompt i: the summed log-prob of each continuation in conts[i], and (max_new_tokens
    > 0) its greedy continuation, cut short where alive(i, tokens) returns False.
    -> (scores: list[list[float]], gens: list[list[int]] | None).
    With a shared `decoder` (_Decoder), rows that need decoding may still be in its pool on return:
    their gens[i] are filled in by decoder.finish().

    prune=True is for ranking against conts[i][0] (the gold): that one is scored exactly, and so is
    every other that might beat it; one whose first token's log-prob is already below the gold's
    total cannot (log-probs only fall as tokens are added), so its score is left at that bound.
    Confident models then score little more than the gold.
    With max_new_tokens and conts[i][0] given, greedy decoding starts from the gold's teacher-forced
    pass (_greedy_from_gold); only rows it leaves open are decoded token by token.

    The prompts' longest common prefix runs once (batch 1); prompts are then sorted by length (less
    padding) and batched; per batch one prefill of the suffixes serves every continuation and the
    decoding. The batch's (prompt, continuation) pairs are sorted by length and scored in chunks of
    up to 2 * batch_size rows: few forwards, little padding, wide matrix products."""
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: there is no position to predict the first answer token from")
    if any(len(c) == 0 for cs in conts for c in cs):
        raise ValueError("empty continuation")
    n = len(prompts)
    scores = [[None] * len(cs) for cs in conts]
    gens = [None] * n if max_new_tokens else None
    if n == 0:
        return scores, gens
    dev = _device(model)
    t0 = time.perf_counter()
    # keep at least one token per row outside the prefix: its hidden state predicts the answer
    plen = min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
    prefix_cache = None
    if plen:
        prefix_cache = KVCache(model.n_layers)
        model(torch.tensor([prompts[0][:plen]], device=dev), cache=prefix_cache, return_hidden=True)
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    stop_ids = set(stop_ids)
    own_decoder = max_new_tokens and decoder is None
    if own_decoder:
        decoder = _Decoder(model, stop_ids, batch_size, timings)
    for rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        t0 = _add_time(timings, tag + "prefill", t0)
        cache, mask, last_h = _prefill(model, [prompts[i][plen:] for i in rows], prefix_cache, plen, pad_side)
        t0 = _add_time(timings, tag + "prefill", t0)
        greedy = {}   # prompt index -> argmax tokens along its gold (conts[i][0])
        if any(conts[i] for i in rows):
            first_lp = _logprobs(model, last_h)                                  # (B, V)
            pairs = [(r, j) for r, i in enumerate(rows) for j in range(len(conts[i]))]
            if prune:
                _score_many(model, cache, mask, first_lp, rows, [(r, j) for r, j in pairs if j == 0],
                            conts, scores, 2 * batch_size, greedy)
                rest = []
                for r, j in pairs:
                    if j > 0:
                        c = conts[rows[r]][j]
                        bound = first_lp[r, c[0]].item()
                        if len(c) == 1 or bound < scores[rows[r]][0]:
                            scores[rows[r]][j] = bound   # exact (one token) or already beaten
                        else:
                            rest.append((r, j))
                pairs = rest
            _score_many(model, cache, mask, first_lp, rows, pairs, conts, scores, 2 * batch_size, greedy)
        t0 = _add_time(timings, tag + "score", t0)
        if max_new_tokens:
            todo, todo_rows = [], []   # batch rows that need token-by-token decoding
            for r, i in enumerate(rows):
                row_alive = None if alive is None else (lambda toks, i=i: alive(i, toks))
                g = None
                if i in greedy:
                    g = _greedy_from_gold(conts[i][0], greedy[i], max_new_tokens, stop_ids, row_alive)
                if g is None:
                    todo.append(r)
                    todo_rows.append((max_new_tokens, row_alive, gens, i))
                gens[i] = g
            if todo:
                sel = torch.tensor(todo, device=dev)
                decoder.add(cache, mask, last_h[sel], todo_rows, sel)
            t0 = time.perf_counter()
    if own_decoder:
        decoder.finish()
    return scores, gens


def _eval_mode(model):
    # a context that puts the model in eval mode and restores the caller's mode (train.py evaluates
    # mid-training; adapters may have dropout)
    @contextlib.contextmanager
    def ctx():
        was = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was)
    return ctx()


def score_continuations(model, prompts, conts, batch_size: int = 32, pad_side: str = "left",
                        progress: bool = False) -> list[float]:
    """Sum log P(conts[i] | prompts[i]) for each pair (natural log), batched. Pairs sharing a prompt
    share its forward pass, so many answers to one prompt cost one prompt plus their own tokens."""
    if len(prompts) != len(conts):
        raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
    uniq, groups, where = {}, [], []
    for p, c in zip(prompts, conts):
        key = tuple(p)
        if key not in uniq:
            uniq[key] = len(groups)
            groups.append([])
        where.append((uniq[key], len(groups[uniq[key]])))
        groups[uniq[key]].append(list(c))
    with _eval_mode(model):
        scores, _ = _run_prompts(model, [list(k) for k in uniq], groups, batch_size=batch_size,
                                 pad_side=pad_side, progress=progress, desc="scoring")
    return [scores[g][j] for g, j in where]


def greedy_generate(model, prompts, max_new_tokens: int, stop_ids=(), batch_size: int = 32,
                    progress: bool = False) -> list[list[int]]:
    """Greedy continuations of prompts (lists of ids), up to and including the first stop id."""
    with _eval_mode(model):
        _, gens = _run_prompts(model, prompts, [[] for _ in prompts], max_new_tokens=max_new_tokens,
                               stop_ids=stop_ids, batch_size=batch_size, progress=progress, desc="generating")
    return [_cut(g, stop_ids) for g in gens]


def _cut(ids, stop_ids):
    for k, t in enumerate(ids):
        if t in stop_ids:
            return ids[:k + 1]
    return ids


# ---------------------------------------------------------------------------------------------
# Per-task metrics

def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def evaluate_task(model, tok, task, n: int | None = None, k_shot: int = 0, metrics=METRICS,
                  batch_size: int = BATCH_SIZE, seed: int = 0, progress: bool = True, timings: dict | None = None) -> dict:
    """Scores of `model` on the first n test examples of `task` -> {metric: value, "n": count}.
    `_kshot` metrics are computed only when k_shot > 0; knowledge_logprob only over examples that
    have a knowledge prompt (absent when none has). `timings`, if given, collects seconds per phase."""
    return _evaluate_tasks(model, tok, [task], n=n, k_shot=k_shot, metrics=metrics, batch_size=batch_size,
                           seed=seed, progress=progress, timings=timings)[task.name]


def _evaluate_tasks(model, tok, tasks, *, batch_size: int = BATCH_SIZE, progress: bool = True,
                    timings: dict | None = None, **kw) -> dict:
    """{task name: evaluate_task's scores}. The decoders are shared by all tasks: rows still
    decoding from one task step together with the next's. kw: n, k_shot, metrics, seed."""
    kw = {"n": None, "k_shot": 0, "metrics": METRICS, "seed": 0, **kw}
    decoders = _decoders(model, tok, batch_size, timings, progress)
    finish = {}
    with _eval_mode(model):
        for t in tqdm(tasks, desc="tasks", disable=not progress or len(tasks) == 1):
            finish[t.name] = _start_task(model, tok, t, decoders, batch_size=batch_size, progress=progress,
                                         timings=timings, **kw)
        for d in decoders.values():
            d.finish()
    return {name: f() for name, f in finish.items()}


def _decoders(model, tok, batch_size, timings, progress=False):
    # one pool per prompt kind: k-shot prompts are ~4x longer, and a pool pads every row to its
    # longest prompt
    return {suffix: _Decoder(model, tok.stop_ids(), batch_size, timings, progress) for suffix in ("", KSHOT_SUFFIX)}


def _start_task(model, tok, task, decoders, *, n, k_shot, metrics, batch_size, seed, progress, timings):
    """evaluate_task up to its replies (the model already in eval mode): every score is computed,
    and the rows that need greedy decoding are queued in decoders[metric suffix]. -> a function
    that, once every decoder has finished, returns the task's scores."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    test = list(task.test)[:n] if n else list(task.test)
    if not test:
        raise ValueError(f"task {task.name!r} has no test examples")
    golds = []
    for i, ex in enumerate(test):
        try:
            golds.append(answer_ids(tok, ex.output))
        except ValueError as e:
            raise ValueError(f"task {task.name!r}, test example {i} (input {ex.input!r}): {e}") from None
    out = {"n": len(test)}
    variants = [("", ())]
    if k_shot > 0 and any(m.endswith(KSHOT_SUFFIX) for m in metrics):
        variants.append((KSHOT_SUFFIX, draw_shots(task, k_shot, seed)))
    labels = _distinct_outputs(task)
    stop = set(tok.stop_ids())
    replies = []   # (metric suffix, gens, exact match's budget, reply_contains's), read once decoded
    for suffix, shots in variants:
        want = {m for m in CHAT_METRICS if m + suffix in metrics}
        if not want:
            continue
        prompts = [render_prompt(tok, ex, shots) for ex in test]
        if "choice_accuracy" in want:
            # gold first: _run_prompts(prune=True) ranks the others against conts[i][0]
            conts = []
            for i, ex in enumerate(test):
                gold = ex.output.strip()
                others = [x for x in choice_candidates(task, ex, i, seed, labels) if x != gold]
                try:
                    conts.append([golds[i]] + [answer_ids(tok, x) for x in others])
                except ValueError as e:
                    raise ValueError(f"task {task.name!r}, test example {i}: choice {e}") from None
        else:  # the gold alone: its log-prob, and the pass exact match's decoding starts from
            conts = [[g] for g in golds]
        # One greedy reply per prompt serves both generation metrics: greedy decoding is
        # deterministic, so exact match's reply is the first tokens of reply_contains's.
        # exact_match: room for the longest gold answer and its end token (a model that goes on
        # past the gold shows at least one extra token, so a truncated ramble never matches);
        # reply_contains: REPLY_TOKENS, a sentence.
        em_budget = max(len(g) for g in golds) if "exact_match" in want else 0
        rc_budget = REPLY_TOKENS if "reply_contains" in want else 0
        max_new = max(em_budget, rc_budget)

        def alive(i, toks):
            # a row decodes on while either metric's verdict is open: exact match until the
            # reply can no longer match its gold (a rambling "The opposite of hot is ..." would
            # otherwise run the whole budget), reply_contains until the answer has appeared
            text = tok.decode([t for t in toks if t not in stop])
            return ((len(toks) < em_budget and may_still_match(text, test[i].output))
                    or (len(toks) < rc_budget and not reply_contains(text, test[i].output, final=False)))

        scores, gens = _run_prompts(model, prompts, conts, max_new_tokens=max_new, stop_ids=stop, alive=alive,
                                    prune="choice_accuracy" in want,
                                    batch_size=batch_size, desc=f"{task.name}{suffix or ' 0-shot'}",
                                    progress=progress, timings=timings, tag=(suffix or "_0shot")[1:] + "/",
                                    decoder=decoders[suffix])
        if "choice_accuracy" in want:
            # strictly first: a tie with a wrong answer counts as wrong
            out["choice_accuracy" + suffix] = _mean(float(all(s[0] > x for x in s[1:])) for s in scores)
        if "instruction_logprob" in want:
            out["instruction_logprob" + suffix] = _mean(s[0] for s in scores)
        if em_budget or rc_budget:
            replies.append((suffix, gens, em_budget, rc_budget))
    if "knowledge_logprob" in metrics:
        pairs = []
        for i, ex in enumerate(test):
            if ex.knowledge_prompt and ex.knowledge_answer:
                try:
                    pairs.append(knowledge_ids(tok, ex.knowledge_prompt, ex.knowledge_answer))
                except ValueError as e:
                    raise ValueError(f"task {task.name!r}, test example {i}: {e}") from None
        if pairs:
            scores, _ = _run_prompts(model, [p for p, _ in pairs], [[c] for _, c in pairs],
                                     batch_size=batch_size, desc=f"{task.name} knowledge",
                                     progress=progress, timings=timings, tag="knowledge/")
            out["knowledge_logprob"] = _mean(s[0] for s in scores)

    def text(g, budget):
        return tok.decode([t for t in _cut(g[:budget], stop) if t not in stop])

    def finish():
        for suffix, gens, em_budget, rc_budget in replies:
            if em_budget:
                out["exact_match" + suffix] = _mean(
                    float(normalize_answer(text(g, em_budget)) == normalize_answer(ex.output)) for g, ex in zip(gens, test))
            if rc_budget:
                out["reply_contains" + suffix] = _mean(float(reply_contains(text(g, rc_budget), ex.output))
                                                       for g, ex in zip(gens, test))
        return {k: out[k] for k in ["n"] + [m for m in METRICS if m in out]}   # in METRICS order
    return finish


# ---------------------------------------------------------------------------------------------
# Suites and reports

def autocast(dtype, device_type: str = "cpu"):
    """Context for --dtype: float32 = plain, bfloat16 = torch.autocast (weights stay fp32)."""
    if dtype in (None, "float32", torch.float32):
        return contextlib.nullcontext()
    if dtype in ("bfloat16", torch.bfloat16):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")


def resolve_tasks(tasks) -> list:
    """Task objects from a mix of Tasks and names/paths (tasks.load_task lists the known names when
    one is unknown). None = the general suite."""
    from ivft import tasks as task_lib
    if tasks is None:
        tasks = task_lib.general_suite()
    return [t if hasattr(t, "test") else task_lib.load_task(t) for t in tasks]


def evaluate_suite(model, tok, tasks, *, model_name: str = "model", dtype="float32", progress: bool = True,
                   timings: dict | None = None, **kw) -> dict:
    """Evaluate every task -> {"model", "tasks": {name: {metric: value}}, "primary": {name: metric},
    "settings": {...}}. kw go to evaluate_task (n, k_shot, metrics, batch_size, seed)."""
    tasks = resolve_tasks(tasks)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    primary = {t.name: canonical_metric(t.metric) for t in tasks}  # fail before any work
    t0 = time.perf_counter()
    with autocast(dtype, _device(model).type):
        results = _evaluate_tasks(model, tok, tasks, progress=progress, timings=timings, **kw)
    settings = {"n": kw.get("n"), "k_shot": kw.get("k_shot", 0), "seed": kw.get("seed", 0),
                "batch_size": kw.get("batch_size", BATCH_SIZE), "dtype": str(dtype),
                "metrics": list(kw.get("metrics", METRICS)), "seconds": round(time.perf_counter() - t0, 1)}
    return {"model": str(model_name), "tasks": results, "primary": primary,
            "settings": settings}


def save_report(report: dict, path) -> None:
    """Write JSON atomically: a temp file in the same folder, then os.replace, so a reader never sees
    half a report and a crash leaves the old one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".report-", suffix=".json.tmp")
    from ivft.load import chmod_ordinary
    chmod_ordinary(tmp)             # mkstemp makes 0600; a report is an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_writable(folder) -> None:
    """Raise OSError unless files can be written in `folder` (which need not exist yet): its
    nearest existing ancestor must take a file (a test file, created and removed at once; nothing
    else is created). The message names that ancestor."""
    p = os.path.abspath(os.fspath(folder))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        if not os.path.isdir(p):
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise OSError(f"cannot write in {p} ({e.strerror or e})") from None


def load_report(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def primary_score(report: dict, task_name: str, kshot: bool = False) -> float:
    """The value of the task's primary metric (Task.metric) in a report; kshot=True its k-shot form."""
    if task_name not in report["tasks"]:
        raise KeyError(f"task {task_name!r} is not in the report (it has: {', '.join(report['tasks'])})")
    metric = report.get("primary", {}).get(task_name)
    if metric is None:  # a report written without the "primary" table: ask the task registry
        from ivft import tasks as task_lib
        metric = task_lib.load_task(task_name).metric
    key = canonical_metric(metric) + (KSHOT_SUFFIX if kshot else "")
    if key not in report["tasks"][task_name]:
        raise KeyError(f"task {task_name!r}: metric {key!r} was not evaluated")
    return report["tasks"][task_name][key]


def cl_metrics(reports: list, train_tasks: list, general_tasks: list = ()) -> dict:
    """Continual-learning summary (docs/method.md §5) from reports[0] = original model and reports[i] =
    after stage i (which trained train_tasks[i-1]); fewer stages than tasks = a run in progress.

    R[i][j]: primary score of train task j after stage i (row 0 = original), all train tasks.
    With n stages and tasks numbered 1..n as learned:
      AP = mean_{j<=n} R[n][j]
      BWT = mean_{j<n} (R[n][j] - R[j][j])                        None when n = 1 (nothing before)
      forgetting[j] = max_{0<=i<n} R[i][j] - R[n][j] for j < n     None for the task just learned
      FWT = mean_{2<=j<=n} (R[j-1][j] - R[0][j])                   None when n = 1
    FWT skips j = 1, whose term is 0 by definition (R[0] is both the stage before and the baseline),
    as in GEM (Lopez-Paz & Ranzato 2017). GP[i] / IP[i]: mean zero-shot / k-shot primary score over
    the general tasks after stage i; GP_drop = GP[0] - GP[n] (positive = lost ability)."""
    if len(reports) < 2:
        raise ValueError("cl_metrics needs the original model's report and at least one stage's")
    n = len(reports) - 1
    if n > len(train_tasks):
        raise ValueError(f"{n} stages but only {len(train_tasks)} train tasks")
    R = [[primary_score(rep, t) for t in train_tasks] for rep in reports]
    out = {"stages": n, "train_tasks": list(train_tasks), "general_tasks": list(general_tasks), "R": R,
           "AP": _mean(R[n][j] for j in range(n)),
           "BWT": _mean(R[n][j] - R[j + 1][j] for j in range(n - 1)),
           "FWT": _mean(R[j][j] - R[0][j] for j in range(1, n)),
           "forgetting": {t: (max(R[i][j] for i in range(n)) - R[n][j] if j < n - 1 else None)
                          for j, t in enumerate(train_tasks[:n])}}
    for name, kshot in (("GP", False), ("IP", True)):
        try:
            per_stage = [_mean(primary_score(rep, g, kshot) for g in general_tasks) for rep in reports]
        except KeyError:
            per_stage = None  # e.g. IP when the reports have no k-shot scores
        out[name] = per_stage
        out[name + "_drop"] = (per_stage[0] - per_stage[n]) if per_stage and per_stage[0] is not None else None
    # the general suite under every other metric the reports share (docs/method.md §1: e.g.
    # choice_accuracy and knowledge_logprob, the knowledge side, next to the primary score)
    out["general"] = {}
    if general_tasks:
        shared = set.intersection(*(set(rep["tasks"][g]) for rep in reports for g in general_tasks)) - {"n"}
        for m in sorted(shared):
            out["general"][m] = [_mean(rep["tasks"][g][m] for g in general_tasks) for rep in reports]
    return out


# ---------------------------------------------------------------------------------------------
# Printing and plotting

def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}"


def print_table(report: dict, file=None) -> None:
    """One row per task, one column per metric; the primary metric is marked with *."""
    cols = [m for m in ("n",) + METRICS if any(m in r for r in report["tasks"].values())]
    names = list(report["tasks"])
    w = max([len("task")] + [len(x) for x in names]) + 2
    widths = [max(len(c) + 1, 8) for c in cols]
    print("task".ljust(w) + "".join(c.rjust(x + 1) for c, x in zip(cols, widths)), file=file)
    for name in names:
        r, primary = report["tasks"][name], report.get("primary", {}).get(name)
        cells = [(_fmt(r.get(c)) + ("*" if c == primary else " ")).rjust(x + 1) for c, x in zip(cols, widths)]
        print(name.ljust(w) + "".join(cells), file=file)
    means = [(_fmt(_mean(r[c] for r in report["tasks"].values() if r.get(c) is not None)) + " ").rjust(x + 1)
             if c != "n" else "".rjust(x + 1) for c, x in zip(cols, widths)]
    print("mean".ljust(w) + "".join(means), file=file)


def print_cl(cl: dict, file=None) -> None:
    tasks = cl["train_tasks"]
    w = max(len(t) for t in tasks) + 2
    print("R (rows: stage, 0 = original; columns: train task)", file=file)
    print("stage".ljust(8) + "".join(t.rjust(w) for t in tasks), file=file)
    for i, row in enumerate(cl["R"]):
        print(str(i).ljust(8) + "".join(_fmt(v).rjust(w) for v in row), file=file)
    for k in ("AP", "BWT", "FWT", "GP_drop", "IP_drop"):
        print(f"{k:8s}{_fmt(cl.get(k))}", file=file)
    print("forgetting " + ", ".join(f"{t}={_fmt(v)}" for t, v in cl["forgetting"].items()), file=file)


def pyplot():
    """matplotlib.pyplot drawing to files only (never a window), or None when matplotlib is not
    installed: every plot of the project is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_cl(cl: dict, path) -> str | None:
    """PNG: heat map of R and the GP/IP curves over stages. Returns the path, or None (and draws
    nothing) when matplotlib is not installed: plots are optional."""
    plt = pyplot()
    if plt is None:
        return None
    R = cl["R"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    im = a1.imshow(R, aspect="auto", cmap="viridis")
    a1.set_xticks(range(len(cl["train_tasks"])), cl["train_tasks"], rotation=30, ha="right")
    a1.set_yticks(range(len(R)), ["orig"] + [f"after {i}" for i in range(1, len(R))])
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            a1.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=a1)
    a1.set_title(f"R  (AP {_fmt(cl['AP'])}, BWT {_fmt(cl['BWT'])})")
    for name in ("GP", "IP"):
        if cl.get(name):
            a2.plot(range(len(cl[name])), cl[name], marker="o", label=f"{name} (drop {_fmt(cl[name + '_drop'])})")
    a2.set_xlabel("stage (0 = original)")
    a2.set_title("general suite")
    a2.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a model on tasks (default: the embedded model on "
                                "the general suite) and print a table; optionally save a JSON report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("I/O")
    g.add_argument("--model", default=None, help="checkpoint: a .gguf file or an HF directory; "
                   "none = the embedded SmolLM2-135M-Instruct")
    g.add_argument("--out", default=None, help="write the JSON report to this path")
    g = p.add_argument_group("data")
    g.add_argument("--tasks", default=None, help="comma-separated task names or task files; "
                   "none = the general suite")
    g.add_argument("--n", type=int, default=100, help="test examples per task, the first n (0 = all)")
    g.add_argument("--k_shot", type=int, default=3, help="demonstrations for the *_kshot metrics (0 = skip them)")
    g.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics to compute")
    g.add_argument("--seed", type=int, default=0, help="seed for the demonstrations and fallback distractors")
    g = p.add_argument_group("system")
    g.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="prompts per forward pass, and rows per "
                   "decoding step (lower it for big models: the k-shot replies' KV cache grows with it)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype: bfloat16 = autocast with fp32 weights and fp32 output layer (a "
                   "gain on GPUs and on CPUs with AMX/AVX512-BF16; on AVX2-only CPUs ~4x slower than fp32; "
                   "close choices can flip, see bench/bench_evaluate.py --compare)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default). On a "
                   "machine shared with other jobs use 1: OpenMP threads spin-wait for each other")
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.n < 0 or args.k_shot < 0 or args.batch_size < 1:
        p.error("--n and --k_shot must be >= 0, --batch_size >= 1")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if bad := [m for m in metrics if m not in METRICS]:
        p.error(f"unknown metric(s) {bad}; known: {', '.join(METRICS)}")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    print("config: " + json.dumps(vars(args)))
    try:
        # tasks first: a typo in a task name should fail in a second, not after loading the model
        tasks = resolve_tasks(None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()])
        if args.out:
            try:
                check_writable(os.path.dirname(os.path.abspath(args.out)))   # not after a whole evaluation
            except OSError as e:
                raise OSError(f"{args.out}: {e}") from None
        from ivft.load import load_model
        model, tok = load_model(args.model, device=args.device)
        report = evaluate_suite(model, tok, tasks, model_name=args.model or "SmolLM2-135M-Instruct (embedded)",
                                dtype=args.dtype, progress=not args.no_progress, n=args.n or None,
                                k_shot=args.k_shot, metrics=metrics, batch_size=args.batch_size, seed=args.seed)
    except (ValueError, KeyError, OSError) as e:
        # bad input (unknown task, unreadable checkpoint, empty task...): one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"evaluate.py: error: {msg}", file=sys.stderr)
        return 2
    print_table(report)
    print(f"({report['settings']['seconds']} s)")
    if args.out:
        try:
            save_report(report, args.out)
        except OSError as e:
            print(f"evaluate.py: error: {args.out}: cannot write the report ({e.strerror or e})", file=sys.stderr)
            return 2
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
