"""
Instruction-vector (IV) extraction by causal mediation over attention heads, fast and exact.

    python extract_iv.py --task antonym --check         # -> ivs/<model-tag>/antonym.safetensors + a check
    python extract_iv.py --task antonym --sweep         # restored share per layer x K on a dev split (+ PNG)
    python extract_iv.py --task my_pairs.json --check   # a function-vector file of {"input", "output"}
    python extract_iv.py --universal antonym capital    # one head set for several tasks

What it computes (Todd et al. 2023, "Function Vectors in Large Language Models", arXiv 2310.15213,
code ericwtodd/function_vectors; Jiang et al., arXiv 2406.12227):
1. clean prompts = k demonstrations, each with the instruction, then the query, in a form where the
   model starts its reply with the answer (default: plain "Q: ...\\nA: ..." text); keep those the
   model answers (first answer token is the argmax), topped up with the lowest-NLL others;
   z̄[l, h] = mean per-head output z (the o_proj *input* slice of head h) at the last prompt token.
2. corrupted prompts = the query alone, zero-shot, no instruction, no demonstrations: the form the IV
   has to repair when it is added in training and in the analyses.
3. AIE[l, h] = mean over corrupted prompts of the effect of z_lh := z̄_lh at the last prompt token on
   P(first answer token) or, where the clean prompts give that token little mass, log P(answer).
4. IV = sum over the top-K heads of z̄_lh pushed through head h's slice of W_O (no bias), added to the
   residual stream after block `layer` at the last prompt token. `--kind resid` instead takes the
   mean residual stream after `layer`, clean minus corrupted (a task vector, Hendel et al. 2023).

Layer and K are chosen on a dev split carved out of the training examples (`--sweep`, `--layer auto`);
`--check` scores held-out test examples only.

The cost of step 3 is the point of this file. Todd's code runs one full forward per (layer, head) per
prompt. Patching z at the last position of layer l changes nothing at earlier positions (causal
attention) and nothing below layer l, so here each corrupted prompt runs once with a KV cache, and
every patched head only recomputes the last position from layer l upward, attending to the cached
prefix; all heads go through as rows of one batch (`aie_exact`). The layer sweep reuses the same
trick for vectors added to the residual stream (`_steered_logits`). `--method attribution`
estimates all AIEs from one forward and one backward per prompt: dP/dz · (z̄ - z) (attribution
patching, Nanda 2023).

Conventions: layers and heads are 0-indexed; "after block l" = the residual stream that block l+1
reads (Intervention.add_resid={l: iv}); a head is a query head (under GQA several share k/v).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import answer_ids, bos_ids, normalize_answer, pyplot, render_prompt, reply_contains
from ivft.load import chmod_ordinary
from model import Intervention, KVCache, Transformer

FORMAT_VERSION = 2    # 2: k-shot plain-text clean prompts, query-only corruption, dev-chosen layer/K
MIN_PROMPTS = 4       # fewer clean or corrupted prompts than this is not an average worth saving
CORRUPTIONS = ("query_only", "shuffled", "mismatched")
FORMATS = ("plain", "chat")
KINDS = ("heads", "resid")
EFFECTS = ("auto", "prob", "logprob")
K_GRID = (3, 5, 10, 20, 40)     # top-K values the sweep tries (those <= the model's head count)
# effect="auto" ranks heads by P(first answer token) when the clean prompts give it at least this much
# more mean probability than the corrupted ones (real mass that the corruption removes: a head's
# effect on a token nobody predicts, or one predicted anyway, is noise), else by log P(whole answer)
AUTO_PROB_MIN = 0.3


class ExtractError(ValueError):
    """Bad input (task, settings, IV file): the message is one line that says what to change."""


# ---------------------------------------------------------------------------------------------
# Settings. Model-dependent defaults (top_k, layer) stay None until a model is known.

def default_top_k(n_heads_total: int) -> int:
    # Chosen by the dev-split sweep on SmolLM2-135M (experiments/iv_layers.py, README): K = 40 of its
    # 270 heads restores the most (K = 3, this code's old default, a third as much; 60-120 no more).
    # Todd keeps 10 of Llama-2-7B's 1,024. Other models get the same share of their heads, at least
    # 3 (1,024 heads -> 152): a guess from one model, so `--layer auto` sweeps K too.
    return max(3, round(n_heads_total * 40 / 270))


def default_layer(n_layers: int) -> int:
    # Chosen by the same sweep: after block 17 of SmolLM2's 30, i.e. 0.57 of the depth (Todd's 0.3,
    # block 9, carries about half as much here). Other models: the same share, or `--layer auto`.
    return int(n_layers * 0.57)


@dataclasses.dataclass
class Settings:
    n_clean: int = 50              # clean prompts averaged into z̄ (fewer if the train split is smaller)
    n_corrupt: int = 25            # corrupted prompts averaged into the AIE
    n_dev: int = 32                # training examples held out for the layer / K sweep (at most 1/4)
    shots: int = 10                # demonstrations in each clean prompt, each with the instruction
    format: str = "plain"          # "plain": "Q: <instruction + input>\nA: <answer>"; "chat": chat turns
    corrupt: str = "query_only"    # how the instruction's signal is removed (see corrupted_prompts)
    mismatch_task: str | None = None  # task lending its instruction for corrupt="mismatched" (None: first other)
    effect: str = "auto"           # "prob": P(first answer token); "logprob": log P(whole answer); "auto"
    method: str = "exact"          # "exact" (fast patching), "attribution" (gradient), "naive" (Todd's loop)
    kind: str = "heads"            # "heads": the paper's IV; "resid": mean residual difference
    top_k: int | None = None       # heads in the IV; None = default_top_k(L * H)
    layer: int | str | None = None  # the IV is added after this block; None = default_layer(L); "auto" = sweep
    seed: int = 0                  # picks the examples; everything else is deterministic
    batch_size: int = 16           # prompts per forward when scoring / recording (speed only)
    max_rows: int = 512            # patched rows per batch in aie_exact and the sweep (memory only)

    # settings that change speed or memory but not the result: left out of the cache key
    NOT_IN_KEY = ("batch_size", "max_rows")

    def __post_init__(self):
        choices = {"corrupt": CORRUPTIONS, "format": FORMATS, "kind": KINDS, "effect": EFFECTS,
                   "method": ("exact", "attribution", "naive")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ExtractError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.n_clean < MIN_PROMPTS or self.n_corrupt < MIN_PROMPTS:
            raise ExtractError(f"n_clean={self.n_clean}, n_corrupt={self.n_corrupt}: need at least "
                               f"{MIN_PROMPTS} prompts of each to average over")
        if self.shots < 0 or self.n_dev < 0:
            raise ExtractError(f"shots={self.shots}, n_dev={self.n_dev}: must be >= 0")
        if self.corrupt == "shuffled" and self.shots < 2:
            raise ExtractError("corrupt=shuffled permutes the demonstrations' answers: it needs shots >= 2")
        if self.top_k is not None and self.top_k < 1:
            raise ExtractError(f"top_k={self.top_k}: must be >= 1")
        if isinstance(self.layer, str) and self.layer != "auto":
            raise ExtractError(f"layer={self.layer!r}: expected a block number or 'auto'")
        if self.layer == "auto" and self.n_dev < MIN_PROMPTS:
            raise ExtractError(f"layer=auto sweeps on the dev split: it needs n_dev >= {MIN_PROMPTS}")
        if self.batch_size < 1 or self.max_rows < 1:
            raise ExtractError("batch_size and max_rows must be >= 1")

    def resolve(self, model: Transformer) -> "Settings":
        """Fill in the model-dependent defaults and check them against the model ("auto" stays)."""
        L, H = model.n_layers, model.config.num_attention_heads
        s = dataclasses.replace(self, top_k=self.top_k or default_top_k(L * H),
                                layer=default_layer(L) if self.layer is None else self.layer)
        if s.layer != "auto" and not 0 <= s.layer < L:
            raise ExtractError(f"layer={s.layer} is out of range: this model has blocks 0..{L - 1}")
        if s.top_k > L * H:
            raise ExtractError(f"top_k={s.top_k} exceeds the model's {L * H} heads")
        return s

    def key(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_IN_KEY}


# ---------------------------------------------------------------------------------------------
# Tasks and prompts

def load_task_by_name(name: str):
    """A registry task or a user task file (tasks.load_task); its errors become one-line ExtractErrors."""
    from ivft.tasks import load_task
    try:
        return load_task(name)
    except (ValueError, OSError) as e:      # tasks.TaskError is a ValueError
        raise ExtractError(str(e)) from None


def task_fingerprint(task) -> str:
    """A short hash of a task's examples: an IV cached for a task is reused only for the same data,
    and a task read from a file gets a cache name of its own (<name>-<hash>)."""
    h = hashlib.sha1()
    for ex in list(task.train) + list(task.test):
        h.update(json.dumps([ex.instruction, ex.input, ex.output]).encode())
    return h.hexdigest()[:8]


def is_registered(task) -> bool:
    from ivft.tasks import list_tasks
    try:
        meta = list_tasks().get(task.name)
    except ValueError:
        return False
    return meta is not None and task.description == meta.get("description")


def iv_filename(task) -> str:
    """ivs/<model>/<this>: the registry name for the project's tasks, name + data hash for files."""
    return f"{task.name}.safetensors" if is_registered(task) else f"{task.name}-{task_fingerprint(task)}.safetensors"


@dataclasses.dataclass
class Prompt:
    ids: list[int]        # the prompt, ending right before the answer
    answer: list[int]     # the answer's token ids (answer[0] = the "first answer token"), then an end token
    text: str             # the answer as text, for exact match


def _prompt(tok, ex, shots=(), with_instruction=True) -> Prompt:
    """The chat form (evaluate.py's rendering, so a prompt is the same ids whether it is patched
    here, trained on or scored): earlier turns as demonstrations, the answer then end-of-turn."""
    try:
        ans = answer_ids(tok, ex.output)
    except ValueError as e:
        raise ExtractError(f"example {ex.input!r}: {e}") from None
    return Prompt(render_prompt(tok, ex, shots, with_instruction), ans, ex.output)


def newline_id(tok) -> int:
    ids = tok.encode("\n")
    if len(ids) != 1:
        raise ExtractError("format=plain needs a tokenizer with a single-token newline; use --format chat")
    return ids[0]


def _plain_prompt(tok, ex, shots=(), with_instruction=True) -> Prompt:
    """"Q: <instruction>\\n<input>\\nA: <answer>" blocks separated by a blank line. A chat model
    answers a bare chat prompt in a sentence ("The opposite of hot is cold."), so the answer's first
    token is rarely its first; after k such blocks it writes the answer itself (README: clean
    first-token accuracy). The answer keeps its leading space, as it has inside the text, and ends
    with the newline that closes every demonstration."""
    from ivft.tasks import user_prompt

    def q(e):
        return user_prompt(e) if with_instruction else e.input
    text = "".join(f"Q: {q(d)}\nA: {d.output.strip()}\n\n" for d in shots) + f"Q: {q(ex)}\nA:"
    if not ex.output.strip():
        raise ExtractError(f"example {ex.input!r}: empty answer")
    ans = tok.encode(" " + ex.output.strip())
    return Prompt(bos_ids(tok) + tok.encode(text), ans + [newline_id(tok)], ex.output)


def render(tok, ex, s: Settings, shots=(), with_instruction=True) -> Prompt:
    fn = _plain_prompt if s.format == "plain" else _prompt
    return fn(tok, ex, shots, with_instruction)


def stop_ids(tok, s: Settings) -> set[int]:
    """Tokens that end a greedy reply: the chat template's, plus the newline in the plain form."""
    return set(tok.stop_ids()) | ({newline_id(tok)} if s.format == "plain" else set())


def _demos(rng: random.Random, pool: list, ex, k: int) -> list:
    others = [d for d in pool if d is not ex]
    return rng.sample(others, min(k, len(others))) if k else []


def split_train(task, s: Settings) -> tuple[list, list]:
    """(pool, dev): the training examples, shuffled by seed; up to n_dev (at most a quarter) are the
    dev split for choosing layer and K, the rest feed extraction and every prompt's demonstrations.
    Test examples are never used here: they are --check's."""
    ex = list(task.train)
    random.Random(f"dev-{s.seed}").shuffle(ex)
    n_dev = min(s.n_dev, len(ex) // 4)
    return ex[n_dev:], ex[:n_dev]


def clean_prompts(tok, task, examples, s: Settings, rng, pool=None) -> list[Prompt]:
    """k demonstrations from `pool` (default: the task's training examples), each with the
    instruction, then the example's instruction + input."""
    pool = task.train if pool is None else pool
    return [render(tok, ex, s, _demos(rng, pool, ex, s.shots)) for ex in examples]


def corrupted_prompts(tok, task, examples, s: Settings, rng, other_task=None, pool=None) -> list[Prompt]:
    """The same inputs with the instruction's signal removed (the answers stay the task's):
    - query_only (default): the input alone, zero-shot, so the IV is exactly what the instruction
      and the demonstrations add to the bare input, and the form it must repair when it is used;
    - shuffled: Todd's corruption, k demonstrations whose answers are permuted among them, without
      the instruction, so no consistent input -> output mapping is left to infer the task from;
    - mismatched: the input under another task's instruction, zero-shot."""
    pool = task.train if pool is None else pool
    out = []
    for ex in examples:
        if s.corrupt == "query_only":
            out.append(render(tok, ex, s, with_instruction=False))
        elif s.corrupt == "shuffled":
            demos = _demos(rng, pool, ex, s.shots)
            # a cyclic shift guarantees that no demonstration keeps its own answer
            shift = rng.randrange(1, len(demos))
            demos = [dataclasses.replace(d, output=demos[(i + shift) % len(demos)].output)
                     for i, d in enumerate(demos)]
            out.append(render(tok, ex, s, demos, with_instruction=False))
        else:
            other = rng.choice(other_task.train).instruction
            out.append(render(tok, dataclasses.replace(ex, instruction=other), s))
    return out


def _other_task(task, s: Settings):
    if s.corrupt != "mismatched":
        return None
    if s.mismatch_task is not None:
        return load_task_by_name(s.mismatch_task)
    from ivft.tasks import list_tasks
    names = [n for n in list_tasks() if n != task.name]
    if not names:
        raise ExtractError("corrupt=mismatched needs a second task to borrow an instruction from")
    return load_task_by_name(names[0])


def check_distinct(tok, examples, clean: list[Prompt], s: Settings, task_name: str):
    """Mediation needs the corrupted form to lack something the clean one has: with no instruction
    and no demonstrations (a function-vector file at shots=0) the two are the same prompt."""
    if s.corrupt == "query_only" and all(c.ids == render(tok, ex, s, with_instruction=False).ids
                                         for ex, c in zip(examples, clean)):
        raise ExtractError(f"task {task_name!r}: the clean and corrupted prompts are identical (no "
                           f"instruction and no demonstrations to remove); use --shots >= 1")


# ---------------------------------------------------------------------------------------------
# Plain batched scoring: answer probabilities, z and the residual stream at the last prompt token.

def _pad_left(seqs: list[list[int]]):
    """Left-pad to one width (pad id 0; padded keys are masked out). pad_mask None when nothing is
    padded, so equal-length batches take the model's plain causal fast path."""
    W = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), W, dtype=torch.long)
    mask = torch.zeros(len(seqs), W, dtype=torch.bool)
    for r, s in enumerate(seqs):
        idx[r, W - len(s):] = torch.tensor(s)
        mask[r, W - len(s):] = True
    return idx, (None if mask.all() else mask)


@torch.no_grad()
def score_prompts(model, prompts: list[Prompt], *, record_z=False, record_resid=False, add=None,
                  batch_size=16, desc=None) -> dict:
    """One teacher-forced forward per batch over prompt + answer. Per prompt: p_first = P(answer[0]),
    top1 = whether answer[0] is the argmax, logprob = log P(whole answer); with record_z also z
    [n, L, H, D], with record_resid the residual stream after every block [n, L, C], both at the
    last prompt token. add = (layer, vector) adds an IV there (the check)."""
    L = model.n_layers
    p_first, top1, logprob, zs, rs = [], [], [], [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = prompts[i:i + batch_size]
        seqs = [p.ids + p.answer[:-1] for p in batch]
        idx, pad_mask = _pad_left(seqs)
        W = idx.shape[1]
        last = torch.tensor([W - len(s) + len(p.ids) - 1 for s, p in zip(seqs, batch)])   # (B)
        iv = Intervention(pos=last, record_z=tuple(range(L)) if record_z else (),
                          record_resid=tuple(range(L)) if record_resid else (),
                          add_resid={add[0]: add[1]} if add is not None else {})
        hidden = model(idx, pad_mask=pad_mask, intervention=iv, return_hidden=True)   # (B, W, C)
        for r, p in enumerate(batch):
            # only the positions that predict answer tokens go through the 49k-wide output layer
            logits = model.lm_head(hidden[r, last[r] + torch.arange(len(p.answer))]).float()   # (A, V)
            lp = F.log_softmax(logits, -1)[torch.arange(len(p.answer)), torch.tensor(p.answer)]  # (A)
            p_first.append(lp[0].exp().item())
            top1.append(int(logits[0].argmax()) == p.answer[0])
            logprob.append(lp.sum().item())
        if record_z:
            zs.append(torch.stack([iv.z[l][:, 0] for l in range(L)], 1).float())      # (B, L, H, D)
        if record_resid:
            rs.append(torch.stack([iv.resid[l][:, 0] for l in range(L)], 1).float())  # (B, L, C)
    out = {"p_first": torch.tensor(p_first), "top1": torch.tensor(top1), "logprob": torch.tensor(logprob)}
    if record_z:
        out["z"] = torch.cat(zs)
    if record_resid:
        out["resid"] = torch.cat(rs)
    return out


# ---------------------------------------------------------------------------------------------
# Average indirect effect, three ways. All return AIE [L, H] (float32), rows = layers.
# The metric: "prob" = P(answer[0]) after the last prompt token; "logprob" = sum of log P over the
# answer tokens (teacher-forced), so the patched last prompt position is also seen by the answer.

def _metric(logits, answer, effect) -> torch.Tensor:
    """logits (N, U, V) at the last prompt token and after it -> (N,) metric per row."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # fp32, or fp64 for tests
    if effect == "prob":
        return F.softmax(logits[:, 0], -1)[:, answer[0]]
    lp = F.log_softmax(logits, -1)                                         # (N, A, V)
    return lp[:, torch.arange(len(answer)), torch.tensor(answer)].sum(-1)


def _suffix(prompt: Prompt, effect) -> list[int]:
    # the tokens whose logits the metric reads: the last prompt token, plus the answer for logprob
    return [prompt.ids[-1]] + (prompt.answer[:-1] if effect == "logprob" else [])


@torch.no_grad()
def aie_naive(model, prompts: list[Prompt], z_mean, *, effect="prob", progress=True) -> torch.Tensor:
    """Todd's loop, kept as the reference the fast path is tested against: one full forward per
    (layer, head) per prompt, z of that head set to z̄ at the last prompt token."""
    L, H = model.n_layers, model.config.num_attention_heads
    total = torch.zeros(L, H, dtype=torch.float64)
    for p in tqdm(prompts, desc="AIE naive", disable=not progress, leave=False):
        T, suffix = len(p.ids), _suffix(p, effect)
        idx = torch.tensor([p.ids + suffix[1:]])
        base = _metric(model(idx)[:, T - 1:], p.answer, effect)
        for l in range(L):
            for h in range(H):
                iv = Intervention(pos=torch.tensor([T - 1]),
                                  set_z={l: (torch.tensor([h]), z_mean[l, h][None])})
                total[l, h] += (_metric(model(idx, intervention=iv)[:, T - 1:], p.answer, effect) - base).item()
    return (total / len(prompts)).float()


def _suffix_inputs(model: Transformer, ids: torch.Tensor, start: int):
    """Embedding (1, U, C), RoPE tables and attention mask for tokens `ids` [U] at absolute positions
    start.. after a cached prefix of `start` tokens, so that blocks can be run one by one."""
    return model.embed(ids[None], start)


@torch.no_grad()
def _corrupted_state(model, p: Prompt, effect) -> dict:
    """Run one corrupted prompt once and keep what every patch needs: the prefix K/V of all layers
    (positions 0..T-2), and at the suffix (the last prompt token, plus the answer tokens for
    logprob) every block's input, the last block's output and every layer's z."""
    L, T = model.n_layers, len(p.ids)
    if T < 2:
        raise ExtractError("a prompt needs at least two tokens (a prefix to cache and a last token)")
    cache = KVCache(L)
    model(torch.tensor([p.ids[:-1]]), cache=cache, return_hidden=True)     # fills positions 0..T-2
    past_k, past_v = list(cache.k), list(cache.v)      # the suffix call below concatenates new tensors
    suffix = torch.tensor(_suffix(p, effect))
    U = len(suffix)
    x0, rope, mask = _suffix_inputs(model, suffix, T - 1)
    iv = Intervention(pos=torch.arange(T - 1, T - 1 + U)[None], record_z=tuple(range(L)),
                      record_resid=tuple(range(L)))
    logits = model.lm_head(model(suffix[None], cache=cache, intervention=iv, return_hidden=True))
    resid = [x0[0]] + [iv.resid[l][0] for l in range(L)]                   # L+1 x (U, C): block i's input
    z = torch.stack([iv.z[l][0, 0] for l in range(L)])                     # (L, H, D) at position T-1
    return dict(past_k=past_k, past_v=past_v, rope=rope, mask=mask, start=T - 1, resid=resid,
                z=z, logits=logits[0], base=_metric(logits, p.answer, effect)[0])


@torch.no_grad()
def _patched_metrics(model, st: dict, heads: list[tuple[int, int]], z_mean, answer, effect) -> torch.Tensor:
    """The metric with z of head (l, h) := z̄[l, h] at the last prompt token, one batch row per head.

    Rows are sorted by layer. At block i the rows patched at a layer <= i are "active": a row patched
    at layer l joins at block l with the recorded (unpatched) input of block l; before that its state
    equals the corrupted run's and costs nothing. Active rows attend to the cached prefix, shared by
    expand(). Rows patched at block i get z̄ - z added to their head, z being the recorded value,
    so z becomes z̄ up to float rounding (the same block recomputes the same z from the same input)."""
    L, H = model.n_layers, model.config.num_attention_heads
    heads = sorted(heads)
    layers = torch.tensor([l for l, _ in heads])
    hs = torch.tensor([h for _, h in heads])
    U, C = st["resid"][0].shape
    x = st["resid"][0].new_empty(len(heads), U, C)                     # (N, U, C)
    cache = KVCache(L)
    for i in range(int(layers[0]), L):
        new = (layers == i).nonzero()[:, 0]                                 # rows patched at block i
        n = int((layers <= i).sum())                                        # active rows: a prefix
        iv = None
        if len(new):
            x[new] = st["resid"][i]
            delta = x.new_zeros(n, H, st["z"].shape[-1])                    # (n, H, D)
            delta[new, hs[new]] = z_mean[i, hs[new]].to(x.dtype) - st["z"][i, hs[new]]
            iv = Intervention(pos=torch.full((n,), st["start"]), add_z={i: (torch.arange(H), delta)})
        # (n, G, T-1, D) views of the one prefix; the block's cache.update copies them once
        cache.k[i] = st["past_k"][i].expand(n, -1, -1, -1)
        cache.v[i] = st["past_v"][i].expand(n, -1, -1, -1)
        x[:n] = model.model.layers[i](x[:n], st["rope"], st["mask"], cache, i, iv, st["start"])
        cache.k[i] = cache.v[i] = None                                      # free this layer's copy
    logits = model.lm_head(model.model.norm(x))                             # (N, U, V)
    return _metric(logits, answer, effect)


@torch.no_grad()
def _steered_logits(model, st: dict, layers: list[int], vecs: torch.Tensor) -> torch.Tensor:
    """Logits (N, U, V) at the suffix with vecs[n] [C] added to the residual stream after block
    layers[n] at the last prompt token: the same as a full forward with Intervention(add_resid=...),
    but each row only recomputes the suffix from block layers[n] + 1 upward, on the cached prefix.
    `layers` must be sorted (rows join the batch in order, as in _patched_metrics)."""
    L = model.n_layers
    assert layers == sorted(layers)
    lay = torch.tensor(layers)
    U, C = st["resid"][0].shape
    x = st["resid"][0].new_empty(len(layers), U, C)                        # (N, U, C)
    cache = KVCache(L)
    for i in range(layers[0] + 1, L + 1):
        new = (lay == i - 1).nonzero()[:, 0]                                # rows that join before block i
        if len(new):
            x[new] = st["resid"][i]
            x[new, 0] += vecs[new].to(x.dtype)
        if i == L:
            break
        n = int((lay <= i - 1).sum())
        cache.k[i] = st["past_k"][i].expand(n, -1, -1, -1)
        cache.v[i] = st["past_v"][i].expand(n, -1, -1, -1)
        x[:n] = model.model.layers[i](x[:n], st["rope"], st["mask"], cache, i, None, st["start"])
        cache.k[i] = cache.v[i] = None
    return model.lm_head(model.model.norm(x))                               # (N, U, V)


@torch.no_grad()
def aie_exact(model, prompts: list[Prompt], z_mean, *, effect="prob", max_rows=512, progress=True,
              heads: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Exact AIE (same numbers as aie_naive) at ~1/30 of its cost: see _patched_metrics."""
    L, H = model.n_layers, model.config.num_attention_heads
    heads = sorted(heads or [(l, h) for l in range(L) for h in range(H)])
    total = torch.zeros(L, H, dtype=torch.float64)
    for p in tqdm(prompts, desc="AIE exact", disable=not progress, leave=False):
        st = _corrupted_state(model, p, effect)
        for j in range(0, len(heads), max_rows):
            chunk = heads[j:j + max_rows]
            m = _patched_metrics(model, st, chunk, z_mean, p.answer, effect)
            for (l, h), v in zip(chunk, (m - st["base"]).tolist()):
                total[l, h] += v
    return (total / len(prompts)).float()


def aie_attribution(model, prompts: list[Prompt], z_mean, *, effect="prob", batch_size=8,
                    progress=True) -> torch.Tensor:
    """First-order estimate: CE[l, h] ≈ dM/dz_lh · (z̄_lh - z_lh) at the last prompt token, all heads
    from one forward + one backward per batch of prompts. The gradient is taken with respect to a zero
    added to z (add_z), because recorded z is a copy outside the graph's path to the output."""
    L, H, D = model.n_layers, model.config.num_attention_heads, model.config.head_dim
    total = torch.zeros(L, H, dtype=torch.float64)
    for i in tqdm(range(0, len(prompts), batch_size), desc="AIE attribution", disable=not progress,
                  leave=False):
        batch = prompts[i:i + batch_size]
        seqs = [p.ids + _suffix(p, effect)[1:] for p in batch]
        idx, pad_mask = _pad_left(seqs)
        W = idx.shape[1]
        last = torch.tensor([W - len(s) + len(p.ids) - 1 for s, p in zip(seqs, batch)])   # (B)
        zeros = [torch.zeros(len(batch), H, D, requires_grad=True) for _ in range(L)]
        iv = Intervention(pos=last, record_z=tuple(range(L)),
                          add_z={l: (torch.arange(H), zeros[l]) for l in range(L)})
        with torch.enable_grad():
            hidden = model(idx, pad_mask=pad_mask, intervention=iv, return_hidden=True)
            # rows are independent, so the gradient of the sum is each row's own gradient
            m = sum(_metric(model.lm_head(hidden[r, last[r] + torch.arange(len(_suffix(p, effect)))])[None],
                            p.answer, effect)[0] for r, p in enumerate(batch))
            grads = torch.autograd.grad(m, zeros)
        for l in range(L):
            dz = z_mean[l][None] - iv.z[l][:, 0].detach().float()           # (B, H, D)
            total[l] += (grads[l].float() * dz).sum((0, 2)).double()
    return (total / len(prompts)).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties get their average rank), so no scipy is needed."""
    def ranks(x):
        x = x.flatten().double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():                          # average ranks over ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ---------------------------------------------------------------------------------------------
# From AIE to the IV

def top_heads(aie: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k heads with the largest AIE, best first, as (layer, head)."""
    H = aie.shape[1]
    idx = aie.flatten().topk(k).indices.tolist()
    return [(i // H, i % H) for i in idx]


@torch.no_grad()
def build_iv(model, z_mean, heads) -> torch.Tensor:
    """θ = Σ_(l,h) W_O^(l)[:, slice h] z̄_lh: each head's mean through its own slice of the output
    projection, summed, with no o_proj bias (Todd's GPT-2 code adds the bias once per head: a bug)."""
    iv = torch.zeros(model.config.hidden_size, dtype=torch.float32)
    for l, h in heads:
        iv += model.head_contributions(l, z_mean[l].to(model.lm_head.weight.dtype))[h].float()
    return iv


# ---------------------------------------------------------------------------------------------
# The pipeline

def _pick(rng, pool, n, avoid=()):
    # n examples from pool, those not in `avoid` first (so clean and corrupted prompts are different
    # examples when the split is large enough)
    first = [e for e in pool if id(e) not in avoid]
    rest = [e for e in pool if id(e) in avoid]
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[:n]


def mediation(model, tok, task, s: Settings, progress=True) -> dict:
    """Steps 1-3: z̄ from clean prompts, AIE from corrupted ones, on the training examples left
    after the dev split. -> dict(aie, z_mean, resid_diff [L, C], effect, info)."""
    pool_ex, dev = split_train(task, s)
    if len(pool_ex) < MIN_PROMPTS + 1:
        raise ExtractError(f"task {task.name!r} has {len(task.train)} training examples: too few to "
                           f"average over (need at least {MIN_PROMPTS + 1} after the dev split)")
    rng = random.Random(s.seed)
    other = _other_task(task, s)
    # 1. clean: score a pool twice the size wanted, keep the answered ones (lowest NLL first), and top
    #    up with the lowest-NLL misses: training tasks are ones the model does poorly on, and guided
    #    training needs their IVs too
    picked = _pick(rng, pool_ex, min(len(pool_ex), 2 * s.n_clean))
    prompts = clean_prompts(tok, task, picked, s, rng, pool=pool_ex)
    check_distinct(tok, picked, prompts, s, task.name)
    sc = score_prompts(model, prompts, record_z=True, record_resid=True, batch_size=s.batch_size,
                       desc="clean prompts" if progress else None)
    order = sorted(range(len(picked)), key=lambda j: (not bool(sc["top1"][j]), -float(sc["logprob"][j])))
    keep = order[:s.n_clean]
    z_mean = sc["z"][keep].mean(0)                                          # (L, H, D)
    # 2. corrupted prompts from other examples where the split allows
    chosen = {id(picked[j]) for j in keep}
    cor_ex = _pick(rng, pool_ex, min(len(pool_ex), s.n_corrupt), avoid=chosen)
    cor = corrupted_prompts(tok, task, cor_ex, s, rng, other, pool=pool_ex)
    # the residual-stream task vector's ingredients (cheap: the corrupted prompts are short)
    cor_sc = score_prompts(model, cor, record_resid=True, batch_size=s.batch_size)
    resid_diff = sc["resid"][keep].mean(0) - cor_sc["resid"].mean(0)       # (L, C)
    # 3. the AIE of every head; "auto" ranks by P(first token) only where the clean prompts put real
    #    mass on it that the corrupted ones lack (else a head's effect on it is noise or saturated),
    #    by log P(answer) otherwise
    clean_p_first, cor_p_first = float(sc["p_first"][keep].mean()), float(cor_sc["p_first"].mean())
    effect = choose_effect(s.effect, clean_p_first, cor_p_first)
    t0 = time.perf_counter()
    if s.method == "exact":
        aie = aie_exact(model, cor, z_mean, effect=effect, max_rows=s.max_rows, progress=progress)
    elif s.method == "attribution":
        aie = aie_attribution(model, cor, z_mean, effect=effect, batch_size=s.batch_size, progress=progress)
    else:
        aie = aie_naive(model, cor, z_mean, effect=effect, progress=progress)
    info = {"n_pool": len(picked), "n_clean": len(keep), "n_clean_correct": int(sc["top1"][keep].sum()),
            "n_corrupt": len(cor), "n_dev": len(dev), "clean_p_first": clean_p_first,
            "corrupted_p_first": cor_p_first,
            "clean_top1_all": float(sc["top1"].float().mean()), "effect_used": effect,
            "mismatch_task": other.name if other is not None else None,
            "aie_seconds": round(time.perf_counter() - t0, 2)}
    return {"aie": aie, "z_mean": z_mean, "resid_diff": resid_diff, "effect": effect, "info": info}


def choose_effect(effect: str, clean_p_first: float, cor_p_first: float) -> str:
    if effect != "auto":
        return effect
    return "prob" if clean_p_first - cor_p_first >= AUTO_PROB_MIN else "logprob"


def make_iv(model, med: dict, kind: str, layer: int, top_k: int) -> tuple[torch.Tensor, list]:
    """-> (iv [C], heads): the top-K heads' IV (any layer), or the residual difference at `layer`."""
    if kind == "resid":
        return med["resid_diff"][layer].clone(), []
    heads = top_heads(med["aie"], top_k)
    return build_iv(model, med["z_mean"], heads), heads


# ---------------------------------------------------------------------------------------------
# Choosing layer and K on the dev split

def restored(x_iv: float, x_cor: float, x_clean: float) -> float:
    """The share of the clean - corrupted gap that the IV closes (nan for no gap)."""
    gap = x_clean - x_cor
    return (x_iv - x_cor) / gap if gap else float("nan")


@torch.no_grad()
def sweep(model, tok, task, med: dict, s: Settings, *, progress=True, kinds=("heads",), k_grid=K_GRID) -> dict:
    """On the dev split: clean (the extraction form) and corrupted (query alone) prompts once, then
    the corrupted ones with each candidate IV added after each block: every K of k_grid for the heads
    IV (the heads from every layer, ranked by AIE) and, when med has it, the residual difference.
    -> {"clean": {logprob, top1}, "corrupted": {...}, "rows": [{kind, k, layer, logprob, top1,
    restored_logprob, accuracy_gain}], "n": dev size}."""
    L, H = model.n_layers, model.config.num_attention_heads
    pool_ex, dev = split_train(task, s)
    if len(dev) < MIN_PROMPTS:
        raise ExtractError(f"task {task.name!r}: the dev split has {len(dev)} examples (need "
                           f"{MIN_PROMPTS}; it is at most a quarter of the training examples)")
    rng = random.Random(s.seed + 2)
    clean = score_prompts(model, clean_prompts(tok, task, dev, s, rng, pool=pool_ex), batch_size=s.batch_size)
    cor_prompts = [render(tok, ex, s, with_instruction=False) for ex in dev]
    variants = []                                                           # (kind, k, vector per layer)
    if "heads" in kinds:
        for k in (k for k in k_grid if k <= L * H):
            iv = build_iv(model, med["z_mean"], top_heads(med["aie"], k))   # the same at every layer
            variants.append(("heads", k, iv[None].expand(L, -1)))
    if "resid" in kinds:
        variants.append(("resid", None, med["resid_diff"]))
    rows = [(v, l) for v in range(len(variants)) for l in range(L)]
    rows.sort(key=lambda r: r[1])
    layers = [l for _, l in rows]
    vecs = torch.stack([variants[v][2][l] for v, l in rows])               # (N, C)
    lp = torch.zeros(len(variants), L, dtype=torch.float64)
    top1 = torch.zeros(len(variants), L, dtype=torch.float64)
    cor_lp, cor_top1 = [], []
    for p in tqdm(cor_prompts, desc="sweep", disable=not progress, leave=False):
        st = _corrupted_state(model, p, "logprob")
        cor_lp.append(float(st["base"]))
        cor_top1.append(int(st["logits"][0].argmax()) == p.answer[0])
        for j in range(0, len(rows), s.max_rows):
            logits = _steered_logits(model, st, layers[j:j + s.max_rows], vecs[j:j + s.max_rows])
            m = _metric(logits, p.answer, "logprob")
            hit = logits[:, 0].argmax(-1) == p.answer[0]
            for (v, l), a, b in zip(rows[j:j + s.max_rows], m.tolist(), hit.tolist()):
                lp[v, l] += a
                top1[v, l] += b
    n = len(dev)
    c = {"logprob": float(clean["logprob"].mean()), "top1": float(clean["top1"].float().mean())}
    k0 = {"logprob": sum(cor_lp) / n, "top1": sum(cor_top1) / n}
    out_rows = []
    for v, (kind, k, _) in enumerate(variants):
        for l in range(L):
            r = {"kind": kind, "k": k, "layer": l, "logprob": float(lp[v, l] / n), "top1": float(top1[v, l] / n)}
            r["restored_logprob"] = restored(r["logprob"], k0["logprob"], c["logprob"])
            r["accuracy_gain"] = r["top1"] - k0["top1"]
            out_rows.append(r)
    return {"task": task.name, "clean": c, "corrupted": k0, "rows": out_rows, "n": n}


def best_row(sw: dict, kind: str | None = None) -> dict:
    """The sweep's choice: the largest restored share of the log-P gap (continuous, so far less noisy
    on a small dev split than accuracy), ties to the smaller K and the earlier layer."""
    rows = [r for r in sw["rows"] if kind is None or r["kind"] == kind]
    return max(rows, key=lambda r: (r["restored_logprob"], -(r["k"] or 0), -r["layer"]))


def format_sweep(sw: dict) -> str:
    kinds = sorted({(r["kind"], r["k"] or 0) for r in sw["rows"]}, key=lambda x: (x[0] != "heads", x[1]))
    L = max(r["layer"] for r in sw["rows"]) + 1
    cell = {(r["kind"], r["k"] or 0, r["layer"]): r for r in sw["rows"]}
    names = [f"K={k}" if kind == "heads" else "resid" for kind, k in kinds]
    lines = [f"sweep on {sw['n']} dev examples of {sw['task']}: restored share of the log-P gap "
             f"(clean {sw['clean']['logprob']:.2f}, corrupted {sw['corrupted']['logprob']:.2f}) / "
             f"first-token accuracy (clean {sw['clean']['top1']:.2f}, corrupted {sw['corrupted']['top1']:.2f})",
             "layer " + " ".join(f"{n:>12}" for n in names)]
    for l in range(L):
        lines.append(f"{l:5d} " + " ".join(f"{cell[(kd, k, l)]['restored_logprob']:6.2f}/{cell[(kd, k, l)]['top1']:.2f}"
                                           for kd, k in kinds))
    b = best_row(sw)
    lines.append(f"best: {b['kind']}" + (f" K={b['k']}" if b["k"] else "") +
                 f" after block {b['layer']}: restored {b['restored_logprob']:.2f}, accuracy {b['top1']:.2f}")
    return "\n".join(lines)


def plot_sweep(sw: dict, path) -> Path | None:
    """Restored share of the log-P gap against the layer, one line per K (and resid); skipped without
    matplotlib (an optional dependency)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, k in sorted({(r["kind"], r["k"] or 0) for r in sw["rows"]}):
        rows = [r for r in sw["rows"] if r["kind"] == kind and (r["k"] or 0) == k]
        ax.plot([r["layer"] for r in rows], [r["restored_logprob"] for r in rows], marker=".",
                label=f"heads K={k}" if kind == "heads" else "resid")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("IV added after block")
    ax.set_ylabel("restored share of log P gap")
    ax.set_title(f"{sw['task']}: {sw['n']} dev examples", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def extract_iv(model, tok, task, *, model_id: str | None = None, progress=True, **settings) -> dict:
    """-> dict(iv [C], aie [L, H], heads [(l, h)] best first, layer, z_mean [L, H, D], meta, and
    with layer="auto" the sweep). task: a tasks.Task or its name; settings: the fields of Settings."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**settings).resolve(model)
    key = s.key()          # the cache key: the settings as asked for ("auto" stays "auto")
    med = mediation(model, tok, task, s, progress)
    sw = None
    if s.layer == "auto":
        sw = sweep(model, tok, task, med, s, progress=progress, kinds=(s.kind,),
                   k_grid=K_GRID if s.kind == "heads" else (s.top_k,))
        b = best_row(sw, s.kind)
        s = dataclasses.replace(s, layer=b["layer"], top_k=b["k"] or s.top_k)
        med["info"]["chosen_by_sweep"] = {"layer": s.layer, "top_k": s.top_k,
                                          "dev_restored_logprob": b["restored_logprob"]}
    iv, heads = make_iv(model, med, s.kind, s.layer, s.top_k)
    out = {"iv": iv, "aie": med["aie"], "heads": heads, "layer": s.layer, "z_mean": med["z_mean"],
           "resid_diff": med["resid_diff"], "meta": _meta(model, task, key, s, heads, med["info"], model_id)}
    if sw is not None:
        out["sweep"] = sw
    return out


def extract_universal(model, tok, tasks, *, model_id: str | None = None, progress=True,
                      **settings) -> dict:
    """One head set for all tasks (FvForgetting's practice): AIE averaged over the tasks, top-K of
    that, then each task's IV from its own z̄ through the shared heads. -> {task name: result}."""
    tasks = [load_task_by_name(t) if isinstance(t, str) else t for t in tasks]
    s = Settings(**settings).resolve(model)
    if s.layer == "auto" or s.kind != "heads":
        raise ExtractError("--universal shares a head set: it needs --kind heads and a fixed --layer")
    meds = {t.name: mediation(model, tok, t, s, progress) for t in tqdm(tasks, desc="tasks", disable=not progress)}
    aie = torch.stack([m["aie"] for m in meds.values()]).mean(0)
    heads = top_heads(aie, s.top_k)
    names = list(meds)
    by_name = {t.name: t for t in tasks}
    return {n: {"iv": build_iv(model, m["z_mean"], heads), "aie": aie, "aie_task": m["aie"],
                "heads": heads, "layer": s.layer, "z_mean": m["z_mean"],
                "meta": _meta(model, by_name[n], s.key(), s, heads, m["info"], model_id, universal=names)}
            for n, m in meds.items()}


def config_hash(model) -> str:
    cfg = dataclasses.asdict(model.config)
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


@torch.no_grad()
def weight_fingerprint(model) -> str:
    """A cheap hash of the weights (4,096 evenly spaced values per tensor): tells the original model
    from a fine-tuned one without hashing all parameters."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().flatten()
        n = min(4096, flat.numel())
        # integer arithmetic: a float linspace rounds past the end of a 28M-element tensor
        pick = torch.arange(n, dtype=torch.int64) * (flat.numel() - 1) // max(n - 1, 1)
        h.update(name.encode())
        h.update(flat[pick].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _meta(model, task, key: dict, s: Settings, heads, info, model_id, universal=None) -> dict:
    cfg = model.config
    return {"format": FORMAT_VERSION, "model": model_id, "config_hash": config_hash(model),
            "weights": weight_fingerprint(model), "n_layers": cfg.num_hidden_layers,
            "n_heads": cfg.num_attention_heads, "d_model": cfg.hidden_size, "task": task.name,
            "task_hash": task_fingerprint(task), "heads": [list(h) for h in heads], "layer": s.layer,
            "top_k": s.top_k, "kind": s.kind, "settings": key, "universal": universal, **info}


# ---------------------------------------------------------------------------------------------
# Files: safetensors with the tensors, the metadata as one JSON string

def save_iv(result: dict, path) -> Path:
    """Write atomically (temp file in the same directory + rename), plus an AIE heatmap if matplotlib
    is installed."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: result[k].detach().float().contiguous() for k in ("iv", "aie", "z_mean", "aie_task", "resid_diff")
               if k in result}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "iv_meta": json.dumps(result["meta"])})
        chmod_ordinary(tmp)                 # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    save_heatmap(result["aie"], result["heads"], path.with_suffix(".png"),
                 f"AIE {result['meta']['task']} ({result['meta']['model']})")
    return path


def read_iv(path) -> dict:
    """The file's tensors and metadata, checked for completeness only (no model needed)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"{path}: no such IV file (run extract_iv.py to create it)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("iv_meta", "null"))
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own (unexported) error type on a damaged file
        raise ExtractError(f"{path}: not a readable IV file ({e})") from None
    if not isinstance(meta, dict) or "iv" not in out or "aie" not in out or "layer" not in meta:
        raise ExtractError(f"{path}: not an IV file (needs tensors iv, aie and iv_meta metadata)")
    out["meta"] = meta
    out["layer"] = meta["layer"]
    out["heads"] = [tuple(h) for h in meta.get("heads", [])]
    return out


def load_iv(path, model) -> tuple[torch.Tensor, int, dict]:
    """-> (iv [C], layer, meta), checked against `model`'s architecture. The weights may differ (a
    fine-tuned copy of the model the IV came from is the normal case in training)."""
    r = read_iv(path)
    meta, cfg = r["meta"], model.config
    if r["iv"].shape != (cfg.hidden_size,) or tuple(r["aie"].shape) != (cfg.num_hidden_layers, cfg.num_attention_heads):
        raise ExtractError(f"{path}: IV of shape {tuple(r['iv'].shape)} / AIE {tuple(r['aie'].shape)} "
                           f"does not fit this model (d_model {cfg.hidden_size}, "
                           f"{cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads)")
    if meta.get("config_hash") != config_hash(model):
        raise ExtractError(f"{path}: extracted from model {meta.get('model')!r} with config hash "
                           f"{meta.get('config_hash')}, this model's is {config_hash(model)}")
    if not 0 <= r["layer"] < cfg.num_hidden_layers:
        raise ExtractError(f"{path}: layer {r['layer']} is out of range for {cfg.num_hidden_layers} layers")
    return r["iv"], r["layer"], meta


def get_iv(model, tok, task, cache_path=None, *, model_id: str | None = None, progress=True,
           **settings) -> dict:
    """The IV for `task` (a name or a tasks.Task): loaded from cache_path when that file was made
    from these very weights, the same task data and the same settings, else extracted and saved
    there. cache_path None: ivs/<model_id>/<iv_filename(task)>."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    key = Settings(**settings).resolve(model).key()         # as extract_iv writes it
    path = Path(cache_path) if cache_path is not None else Path("ivs") / (model_id or "model") / iv_filename(task)
    if path.is_file():
        try:
            r = read_iv(path)
            m = r["meta"]
            if (m.get("format") == FORMAT_VERSION and m.get("task") == task.name
                    and m.get("task_hash") == task_fingerprint(task) and m.get("settings") == key
                    and m.get("universal") is None and m.get("config_hash") == config_hash(model)
                    and m.get("weights") == weight_fingerprint(model)):
                r["reused"] = True
                return r
        except ExtractError:
            pass  # a damaged cache file is simply rebuilt
    r = extract_iv(model, tok, task, model_id=model_id, progress=progress, **settings)
    save_iv(r, path)
    return r


def save_heatmap(aie, heads, path, title=""):
    """AIE [L, H] as an image, top heads boxed; skipped without matplotlib (an optional dependency)."""
    plt = pyplot()
    if plt is None:
        return None
    L, H = aie.shape
    fig, ax = plt.subplots(figsize=(2 + 0.35 * H, 1.5 + 0.22 * L))
    im = ax.imshow(aie.numpy(), cmap="RdBu_r", aspect="auto",
                   vmin=-float(aie.abs().max()), vmax=float(aie.abs().max()))
    for l, h in heads:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="AIE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The check: on held-out test examples, does the IV bring back what the demonstrations give?

@torch.no_grad()
def replies(model, tok, prompts: list[Prompt], s: Settings, add=None, max_new=24, batch_size=16) -> list[str]:
    """Greedy replies cut at the first stop token. The IV, if any, is added in the prefill at the
    last prompt token (left padding puts it in the last column of every row)."""
    stop = stop_ids(tok, s)
    out_text = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        idx, pad_mask = _pad_left([p.ids for p in batch])
        W = idx.shape[1]
        iv = Intervention(pos=torch.full((len(batch),), W - 1), add_resid={add[0]: add[1]}) if add else None
        out = model.generate(idx, max_new, stop_ids=stop, pad_mask=pad_mask, intervention=iv)
        for r in range(len(batch)):
            ids = out[r].tolist()
            out_text.append(tok.decode(ids[:next((k for k, t in enumerate(ids) if t in stop), len(ids))]))
    return out_text


def gap_or_none(clean: torch.Tensor, cor: torch.Tensor, x_iv: torch.Tensor) -> tuple[float | None, str]:
    """restored = (x_iv - x_cor) / (x_clean - x_cor) on per-example paired scores, or None when the
    clean - corrupted gap is not above twice its standard error (a ratio of noise says nothing)."""
    d = (clean - cor).double()
    gap = float(d.mean())
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("inf")
    if not gap > 2 * se:
        return None, f"gap {gap:+.3f} is within noise (2 x se = {2 * se:.3f})"
    ratio = restored(float(x_iv.double().mean()), float(cor.double().mean()), float(clean.double().mean()))
    return ratio, f"gap {gap:+.3f} ± {se:.3f} (se)"


def check_iv(model, tok, task, iv, layer, *, n=50, settings=None, generate=True, progress=True,
             chat=True) -> dict:
    """Scores on n held-out test examples (demonstrations from the training examples) under three
    conditions: clean (the extraction form: k-shot with the instruction), corrupted (the query alone,
    zero-shot, whatever corruption ranked the heads) and corrupted + IV after block `layer`.
    Per condition: first-token accuracy, P(first answer token), log P(answer), greedy exact match
    and reply_contains; then the restored shares of the log-P and accuracy gaps (None when a gap is
    within noise). chat: also the zero-shot chat prompt with the instruction, without and with the
    IV: the form train.py adds it to and evaluate.py scores (a model that answers it in a sentence
    is right by reply_contains, not by first-token accuracy)."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**(settings or {}))
    if not task.test:
        raise ExtractError(f"task {task.name!r} has no test examples to check on")
    pool_ex, _ = split_train(task, s)
    rng = random.Random(s.seed + 1)
    examples = list(task.test)
    rng.shuffle(examples)
    examples = examples[:n]
    conds = {"clean": (clean_prompts(tok, task, examples, s, rng, pool=pool_ex), None),
             "corrupted": ([render(tok, ex, s, with_instruction=False) for ex in examples], None)}
    conds["iv"] = (conds["corrupted"][0], (layer, iv))
    if chat and getattr(tok, "chat_format", None) is not None:
        conds["chat"] = ([_prompt(tok, ex) for ex in examples], None)
        conds["chat_iv"] = (conds["chat"][0], (layer, iv))
    res, raw = {}, {}
    for name, (prompts, add) in tqdm(conds.items(), desc="check", disable=not progress, leave=False):
        sc = score_prompts(model, prompts, add=add, batch_size=s.batch_size)
        raw[name] = sc
        res[name] = {"top1": float(sc["top1"].float().mean()), "p_first": float(sc["p_first"].mean()),
                     "logprob": float(sc["logprob"].mean())}
        if generate:
            form = dataclasses.replace(s, format="chat") if name.startswith("chat") else s
            reps = replies(model, tok, prompts, form, add, batch_size=s.batch_size)
            res[name]["exact"] = sum(normalize_answer(r) == normalize_answer(ex.output)
                                     for r, ex in zip(reps, examples)) / len(examples)
            res[name]["contains"] = sum(reply_contains(r, ex.output) for r, ex in zip(reps, examples)) / len(examples)
            res[name]["examples"] = [[ex.input, ex.output, r] for ex, r in list(zip(examples, reps))[:3]]
    for metric, key in (("logprob", "logprob"), ("accuracy", "top1")):
        c, k, v = (raw[x][key].float() for x in ("clean", "corrupted", "iv"))
        res[f"restored_{metric}"], res[f"gap_{metric}"] = gap_or_none(c, k, v)
    res.update(n=len(examples), layer=layer)
    return res


def check_report(res: dict, r: dict, task_name: str) -> dict:
    """The check as flat JSON (extract_iv.py --report): the IV's identity, then the scores."""
    m = r["meta"]
    out = {"task": task_name, "layer": res["layer"], "heads": [list(h) for h in r["heads"]],
           "kind": m.get("kind"), "top_k": m.get("top_k"), "effect": m.get("effect_used"),
           "format": m["settings"].get("format"), "shots": m["settings"].get("shots"), "n": res["n"],
           "clean_accuracy": res["clean"]["top1"], "corrupted_accuracy": res["corrupted"]["top1"],
           "iv_accuracy": res["iv"]["top1"], "accuracy_gain": res["iv"]["top1"] - res["corrupted"]["top1"],
           "restored_accuracy": res["restored_accuracy"], "restored_logprob": res["restored_logprob"],
           "gap_accuracy": res["gap_accuracy"], "gap_logprob": res["gap_logprob"],
           "iv_norm": float(r["iv"].norm())}
    for cond in ("clean", "corrupted", "iv", "chat", "chat_iv"):
        for k, v in res.get(cond, {}).items():
            if k != "top1":
                out[f"{cond}_{k}"] = v
    return out


def format_check(res: dict) -> str:
    lines = [f"check on {res['n']} held-out test examples (IV after block {res['layer']})",
             f"{'condition':<18} {'top1':>6} {'P(first)':>9} {'logP(ans)':>10} {'exact':>6} {'contains':>9}"]
    labels = {"clean": "clean (k-shot)", "corrupted": "query alone", "iv": "query alone + IV",
              "chat": "chat, 0-shot", "chat_iv": "chat, 0-shot + IV"}
    for name in (c for c in labels if c in res):
        v = res[name]
        gen = f"{v['exact']:6.2f} {v['contains']:9.2f}" if "exact" in v else ""
        lines.append(f"{labels[name]:<18} {v['top1']:6.2f} {v['p_first']:9.3f} {v['logprob']:10.2f} {gen}")
    for metric in ("logprob", "accuracy"):
        r = res[f"restored_{metric}"]
        lines.append(f"restored share of the {metric} gap: " + (f"{r:.2f} ({res[f'gap_{metric}']})" if r is not None
                                                                else f"not measurable: {res[f'gap_{metric}']}"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def model_tag(name_or_path) -> str:
    if name_or_path is None:
        return "SmolLM2-135M-Instruct"
    p = Path(name_or_path)
    return p.stem if p.suffix == ".gguf" else p.name


def _layer_arg(v: str):
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block number or 'auto', got {v!r}") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Extract instruction vectors by causal mediation over heads.")
    g = ap.add_argument_group("task and files")
    g.add_argument("--task", help="registry task name (see tasks.list_tasks()) or a task file / folder")
    g.add_argument("--universal", nargs="+", metavar="TASK", help="one head set from the AIE averaged over these tasks")
    g.add_argument("--out", help="IV file (default ivs/<model-tag>/<task>.safetensors, for a file task "
                   "<name>-<data hash>.safetensors); with --universal a directory")
    g.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--reuse", action="store_true", help="load --out instead when it matches model, data and settings")
    g = ap.add_argument_group("prompts")
    g.add_argument("--n_clean", type=int, default=50, help="clean prompts averaged into the mean head outputs")
    g.add_argument("--n_corrupt", type=int, default=25, help="corrupted prompts averaged into the AIE")
    g.add_argument("--n_dev", type=int, default=32, help="training examples held out for --sweep / --layer auto")
    g.add_argument("--shots", type=int, default=10, help="demonstrations per clean prompt, each with the instruction")
    g.add_argument("--format", default="plain", choices=FORMATS,
                   help="plain: 'Q: ...\\nA: ...' text (the model answers with the answer); chat: chat turns")
    g.add_argument("--corrupt", default="query_only", choices=CORRUPTIONS,
                   help="query_only: the input alone, zero-shot; shuffled: demonstrations with permuted "
                        "answers; mismatched: another task's instruction")
    g.add_argument("--mismatch_task", help="task lending its instruction to --corrupt mismatched")
    g.add_argument("--seed", type=int, default=0, help="example selection seed")
    g = ap.add_argument_group("mediation and the vector")
    g.add_argument("--method", default="exact", choices=("exact", "attribution", "naive"),
                   help="exact: fast patching; attribution: gradient estimate; naive: Todd's full-forward loop")
    g.add_argument("--effect", default="auto", choices=EFFECTS,
                   help=f"prob: P(first answer token); logprob: log P(answer); auto: prob where the clean "
                        f"prompts give the first token >= {AUTO_PROB_MIN} more mean probability than the "
                        f"corrupted ones, else logprob")
    g.add_argument("--kind", default="heads", choices=KINDS,
                   help="heads: top-K heads' mean outputs through W_O (the paper's IV); resid: mean residual "
                        "stream after --layer, clean minus corrupted")
    g.add_argument("--top_k", type=int, default=None, help="heads in the IV (default: 40 per 270 heads, at least 3)")
    g.add_argument("--layer", type=_layer_arg, default=None,
                   help="block after which the IV is added (default: 0.57 of the depth); 'auto': the best "
                        "layer and K on the dev split")
    g = ap.add_argument_group("measurement")
    g.add_argument("--check", action="store_true", help="score held-out test prompts: clean, query alone, query alone + IV")
    g.add_argument("--n_check", type=int, default=50, help="held-out test examples for --check")
    g.add_argument("--report", help="with --check: write the check as JSON here")
    g.add_argument("--sweep", action="store_true", help="print restored shares per layer x K on the dev "
                   "split (heads and resid) and plot them beside the IV file (<out>.sweep.png, with matplotlib)")
    g = ap.add_argument_group("system")
    g.add_argument("--batch_size", type=int, default=16, help="prompts per forward")
    g.add_argument("--max_rows", type=int, default=512, help="patched rows per batch (exact method and sweep)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if (args.task is None) == (args.universal is None):
        ap.error("give exactly one of --task or --universal")
    if args.n_check < 1:
        ap.error(f"--n_check {args.n_check}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: must be >= 1")
    if args.report and not args.check:
        ap.error("--report writes the check: add --check")
    if args.universal and (args.check or args.sweep):
        ap.error("--check and --sweep work on one --task")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except ExtractError as e:
        print(f"extract_iv.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ivft.load import LoadError, load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("n_clean", "n_corrupt", "n_dev", "shots", "format", "corrupt",
                                              "mismatch_task", "effect", "method", "kind", "top_k", "layer",
                                              "seed", "batch_size", "max_rows")}
    Settings(**settings)                                      # bad settings fail before the slow load
    names = args.universal or [args.task]
    tasks = [load_task_by_name(n) for n in names]
    try:
        model, tok = load_model(args.model)
    except LoadError as e:
        raise ExtractError(str(e)) from None
    model.eval()
    tag = model_tag(args.model)
    s = Settings(**settings).resolve(model)
    print("config:", json.dumps({"model": tag, "tasks": [t.name for t in tasks], **dataclasses.asdict(s)}))
    progress = not args.quiet
    if args.universal:
        out_dir = Path(args.out or Path("ivs") / tag / "universal")
        results = extract_universal(model, tok, tasks, model_id=tag, progress=progress, **settings)
        for name, r in results.items():
            r["path"] = save_iv(r, out_dir / f"{name}.safetensors")
    else:
        task = tasks[0]
        path = Path(args.out or Path("ivs") / tag / iv_filename(task))
        if args.reuse:
            r = get_iv(model, tok, task, path, model_id=tag, progress=progress, **settings)
        else:
            r = extract_iv(model, tok, task, model_id=tag, progress=progress, **settings)
            save_iv(r, path)
        r["path"] = path
        results = {task.name: r}
    for name, r in results.items():
        m = r["meta"]
        heads = ", ".join(f"({l},{h}) {float(r['aie'][l, h]):+.4f}" for l, h in r["heads"])
        print(f"{name}: {m['kind']} IV" + (f", heads {heads}" if m["kind"] == "heads" else "") +
              f"; layer {r['layer']}; |iv| {float(r['iv'].norm()):.3f}; AIE by {m.get('effect_used')}; "
              f"clean prompts {m.get('n_clean')} ({m.get('n_clean_correct')} answered, first-token accuracy "
              f"of all scored {m.get('clean_top1_all', float('nan')):.2f}, P(first) {m.get('clean_p_first', float('nan')):.3f}), "
              f"corrupted {m.get('n_corrupt')}{' (reused)' if r.get('reused') else ''} -> {r['path']}")
    if args.sweep:
        task = tasks[0]
        r = results[task.name]
        med = {"aie": r["aie"], "z_mean": r["z_mean"], "resid_diff": r["resid_diff"]}
        sw = sweep(model, tok, task, med, s, progress=progress, kinds=KINDS)
        print(format_sweep(sw))
        png = plot_sweep(sw, Path(str(r["path"])).with_suffix(".sweep.png"))
        if png:
            print(f"sweep plot -> {png}")
    if args.check:
        task = tasks[0]
        r = results[task.name]
        res = check_iv(model, tok, task, r["iv"], r["layer"], n=args.n_check, settings=settings, progress=progress)
        print(format_check(res))
        if args.report:
            from evaluate import save_report
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            save_report(check_report(res, r, task.name), args.report)
            print(f"report -> {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
