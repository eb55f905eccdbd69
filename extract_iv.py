"""
Instruction-vector (IV) extraction by causal mediation over attention heads, fast and exact.

    python extract_iv.py --task antonym                 # -> ivs/<model-tag>/antonym.safetensors
    python extract_iv.py --task antonym --check         # ... then measure how much the IV restores
    python extract_iv.py --universal antonym capital    # one head set for several tasks

What it computes (METHOD.md §2; Todd et al. 2023, "Function Vectors in Large Language Models",
arXiv 2310.15213, code ericwtodd/function_vectors; Jiang et al., arXiv 2406.12227):
1. clean prompts = instruction + input in the chat format; keep those the model answers (first answer
   token is the argmax), topped up with the lowest-NLL others; z̄[l, h] = mean per-head output z (the
   o_proj *input* slice of head h) at the last prompt token.
2. corrupted prompts = the instruction's signal removed (default: the input alone).
3. AIE[l, h] = mean over corrupted prompts of P(y_1 | z_lh := z̄_lh) - P(y_1), z replaced at the last
   prompt token only.
4. IV = sum over the top-K heads of z̄_lh pushed through head h's slice of W_O (no bias), added to the
   residual stream after block `layer` at the last prompt token.

The cost of step 3 is the point of this file. Todd's code runs one full forward per (layer, head) per
prompt. Patching z at the last position of layer l changes nothing at earlier positions (causal
attention) and nothing below layer l, so here each corrupted prompt runs once with a KV cache, and
every patched head only recomputes the last position from layer l upward, attending to the cached
prefix; all heads go through as rows of one batch (`aie_exact`). Same numbers as the loop (test:
tests/test_extract_iv.py) for ~2T times fewer token-layers (T = prompt length: H*L*T*L for the loop,
H*L*L/2 here) and T times fewer output-layer rows. `--method attribution` estimates all AIEs from one
forward and one backward per prompt: dP/dz · (z̄ - z) (attribution patching, Nanda 2023).

Conventions: layers and heads are 0-indexed; "after block l" = the residual stream that block l+1
reads (Intervention.add_resid={l: iv}); a head is a query head (under GQA several share k/v).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import answer_ids, normalize_answer, render_prompt
from model import Intervention, KVCache, Transformer

FORMAT_VERSION = 1
MIN_PROMPTS = 4       # fewer clean or corrupted prompts than this is not an average worth saving
CORRUPTIONS = ("no_instruction", "shuffled", "mismatched")


class ExtractError(ValueError):
    """Bad input (task, settings, IV file): the message is one line that says what to change."""


# ---------------------------------------------------------------------------------------------
# Settings. Model-dependent defaults (top_k, layer) stay None until a model is known.

def default_top_k(n_heads_total: int) -> int:
    # Todd / the IV paper keep 10 heads of a 32x32 = 1,024-head model: about 1% of all heads. Scale
    # that share to the model, but keep at least 3 so that a small model's IV is not one head's
    # idiosyncrasy. SmolLM2-135M (270 heads) -> 3, Llama-2-7B -> 10, Llama-2-13B (1,600) -> 16.
    return max(3, round(n_heads_total / 100))


def default_layer(n_layers: int) -> int:
    # Todd adds function vectors after layer 9 of 28- and 32-layer models: about 0.3 of the depth,
    # early enough that the later layers can act on it. 30 layers -> 9, 32 -> 9, 4 -> 1.
    return n_layers * 3 // 10


@dataclasses.dataclass
class Settings:
    n_clean: int = 100             # clean prompts averaged into z̄ (fewer if the train split is smaller)
    n_corrupt: int = 25            # corrupted prompts averaged into the AIE
    shots: int = 0                 # demonstrations in each clean prompt, each with the instruction
    corrupt: str = "no_instruction"  # how the instruction's signal is removed (see corrupted_prompts)
    mismatch_task: str | None = None  # task lending its instruction for corrupt="mismatched" (None: first other)
    effect: str = "prob"           # "prob": P(first answer token); "logprob": log P(whole answer)
    method: str = "exact"          # "exact" (fast patching), "attribution" (gradient), "naive" (Todd's loop)
    top_k: int | None = None       # heads in the IV; None = default_top_k(L * H)
    layer: int | None = None       # the IV is added after this block; None = default_layer(L)
    seed: int = 0                  # picks the examples; everything else is deterministic
    batch_size: int = 16           # prompts per forward when scoring / recording (speed only)
    max_rows: int = 512            # patched heads per batch in aie_exact (memory only)

    # settings that change speed or memory but not the result: left out of the cache key
    NOT_IN_KEY = ("batch_size", "max_rows")

    def __post_init__(self):
        if self.corrupt not in CORRUPTIONS:
            raise ExtractError(f"corrupt={self.corrupt!r}: expected one of {', '.join(CORRUPTIONS)}")
        if self.effect not in ("prob", "logprob"):
            raise ExtractError(f"effect={self.effect!r}: expected prob or logprob")
        if self.method not in ("exact", "attribution", "naive"):
            raise ExtractError(f"method={self.method!r}: expected exact, attribution or naive")
        if self.n_clean < MIN_PROMPTS or self.n_corrupt < MIN_PROMPTS:
            raise ExtractError(f"n_clean={self.n_clean}, n_corrupt={self.n_corrupt}: need at least "
                               f"{MIN_PROMPTS} prompts of each to average over")
        if self.shots < 0:
            raise ExtractError(f"shots={self.shots}: must be >= 0")
        if self.corrupt == "shuffled" and self.shots < 2:
            raise ExtractError("corrupt=shuffled permutes the demonstrations' answers: it needs shots >= 2")
        if self.top_k is not None and self.top_k < 1:
            raise ExtractError(f"top_k={self.top_k}: must be >= 1")
        if self.batch_size < 1 or self.max_rows < 1:
            raise ExtractError("batch_size and max_rows must be >= 1")

    def resolve(self, model: Transformer) -> "Settings":
        """Fill in the model-dependent defaults and check them against the model."""
        L, H = model.n_layers, model.config.num_attention_heads
        s = dataclasses.replace(self, top_k=self.top_k or default_top_k(L * H),
                                layer=default_layer(L) if self.layer is None else self.layer)
        if not 0 <= s.layer < L:
            raise ExtractError(f"layer={s.layer} is out of range: this model has blocks 0..{L - 1}")
        if s.top_k > L * H:
            raise ExtractError(f"top_k={s.top_k} exceeds the model's {L * H} heads")
        return s

    def key(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_IN_KEY}


# ---------------------------------------------------------------------------------------------
# Tasks and prompts. The chat rendering is evaluate.py's, so that a prompt is the same list of ids
# whether it is patched here, trained on or scored: render_prompt(..., with_instruction=False) is the
# input alone, our default corrupted prompt; answer_ids ends with the end-of-turn token.

def load_task_by_name(name: str):
    """A registry task or a user task file (tasks.load_task); its errors become one-line ExtractErrors."""
    from tasks import load_task
    try:
        return load_task(name)
    except (ValueError, OSError) as e:      # tasks.TaskError is a ValueError
        raise ExtractError(str(e)) from None


@dataclasses.dataclass
class Prompt:
    ids: list[int]        # the prompt, ending right before the answer
    answer: list[int]     # the answer's token ids (answer[0] = the "first answer token")
    text: str             # the answer as text, for exact match


def _prompt(tok, ex, shots=(), with_instruction=True) -> Prompt:
    try:
        ans = answer_ids(tok, ex.output)
    except ValueError as e:
        raise ExtractError(f"example {ex.input!r}: {e}") from None
    return Prompt(render_prompt(tok, ex, shots, with_instruction), ans, ex.output)


def _demos(rng: random.Random, pool: list, ex, k: int) -> list:
    return rng.sample([d for d in pool if d is not ex], k) if k else []


def clean_prompts(tok, task, examples, s: Settings, rng) -> list[Prompt]:
    """The instruction + input, k-shot with the instruction in every demonstration when shots > 0."""
    return [_prompt(tok, ex, _demos(rng, task.train, ex, s.shots)) for ex in examples]


def corrupted_prompts(tok, task, examples, s: Settings, rng, other_task=None) -> list[Prompt]:
    """The same inputs with the instruction's signal removed (the answers stay the task's):
    - no_instruction (default): the input alone, zero-shot, so the IV is exactly what the instruction
      (and any demonstrations) add to the bare input;
    - shuffled: Todd's corruption, k demonstrations whose answers are permuted among them, without
      the instruction, so no consistent input -> output mapping is left to infer the task from;
    - mismatched: the input under another task's instruction."""
    out = []
    for ex in examples:
        if s.corrupt == "no_instruction":
            out.append(_prompt(tok, ex, with_instruction=False))
        elif s.corrupt == "shuffled":
            demos = _demos(rng, task.train, ex, s.shots)
            # a cyclic shift guarantees that no demonstration keeps its own answer
            shift = rng.randrange(1, len(demos))
            demos = [dataclasses.replace(d, output=demos[(i + shift) % len(demos)].output)
                     for i, d in enumerate(demos)]
            out.append(_prompt(tok, ex, demos, with_instruction=False))
        else:
            other = rng.choice(other_task.train).instruction
            p = _prompt(tok, dataclasses.replace(ex, instruction=other))
            out.append(p)
    return out


def _other_task(task, s: Settings):
    if s.corrupt != "mismatched":
        return None
    if s.mismatch_task is not None:
        return load_task_by_name(s.mismatch_task)
    from tasks import list_tasks
    names = [n for n in list_tasks() if n != task.name]
    if not names:
        raise ExtractError("corrupt=mismatched needs a second task to borrow an instruction from")
    return load_task_by_name(names[0])


# ---------------------------------------------------------------------------------------------
# Plain batched scoring: answer probabilities and z at the last prompt token.

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
def score_prompts(model, prompts: list[Prompt], *, record_z=False, add=None, batch_size=16,
                  desc=None) -> dict:
    """One teacher-forced forward per batch over prompt + answer. Per prompt: p_first = P(answer[0]),
    top1 = whether answer[0] is the argmax, logprob = log P(whole answer); with record_z also z
    [n, L, H, D] at the last prompt token. add = (layer, vector) adds an IV there (the check)."""
    L = model.n_layers
    p_first, top1, logprob, zs = [], [], [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = prompts[i:i + batch_size]
        seqs = [p.ids + p.answer[:-1] for p in batch]
        idx, pad_mask = _pad_left(seqs)
        W = idx.shape[1]
        last = torch.tensor([W - len(s) + len(p.ids) - 1 for s, p in zip(seqs, batch)])   # (B)
        iv = Intervention(pos=last, record_z=tuple(range(L)) if record_z else (),
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
    out = {"p_first": torch.tensor(p_first), "top1": torch.tensor(top1), "logprob": torch.tensor(logprob)}
    if record_z:
        out["z"] = torch.cat(zs)
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
    """Run one corrupted prompt once and keep what every head patch needs: the prefix K/V of all
    layers (positions 0..T-2), and at the suffix (the last prompt token, plus the answer tokens for
    logprob) every block's input and every layer's z."""
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
    resid_pre = [x0[0]] + [iv.resid[l][0] for l in range(L - 1)]           # L x (U, C): block inputs
    z = torch.stack([iv.z[l][0, 0] for l in range(L)])                     # (L, H, D) at position T-1
    return dict(past_k=past_k, past_v=past_v, rope=rope, mask=mask, start=T - 1, resid_pre=resid_pre,
                z=z, base=_metric(logits, p.answer, effect)[0])


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
    U, C = st["resid_pre"][0].shape
    x = st["resid_pre"][0].new_empty(len(heads), U, C)                     # (N, U, C)
    cache = KVCache(L)
    for i in range(int(layers[0]), L):
        new = (layers == i).nonzero()[:, 0]                                 # rows patched at block i
        n = int((layers <= i).sum())                                        # active rows: a prefix
        iv = None
        if len(new):
            x[new] = st["resid_pre"][i]
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
    """Steps 1-3: z̄ from clean prompts, AIE from corrupted ones. -> dict(aie, z_mean, info)."""
    if len(task.train) < MIN_PROMPTS + s.shots:
        raise ExtractError(f"task {task.name!r} has {len(task.train)} training examples: too few to "
                           f"average over (need at least {MIN_PROMPTS + s.shots} with shots={s.shots})")
    rng = random.Random(s.seed)
    other = _other_task(task, s)
    # 1. clean: score a pool twice the size wanted, keep the answered ones (lowest NLL first), and top
    #    up with the lowest-NLL misses: training tasks are ones the model does poorly on, and guided
    #    training needs their IVs too
    pool = _pick(rng, task.train, min(len(task.train), 2 * s.n_clean))
    prompts = clean_prompts(tok, task, pool, s, rng)
    sc = score_prompts(model, prompts, record_z=True, batch_size=s.batch_size,
                       desc="clean prompts" if progress else None)
    order = sorted(range(len(pool)), key=lambda j: (not bool(sc["top1"][j]), -float(sc["logprob"][j])))
    keep = order[:s.n_clean]
    z_mean = sc["z"][keep].mean(0)                                          # (L, H, D)
    # 2-3. corrupted prompts, then the AIE of every head on them
    chosen = {id(pool[j]) for j in keep}
    cor_ex = _pick(rng, task.train, min(len(task.train), s.n_corrupt), avoid=chosen)
    cor = corrupted_prompts(tok, task, cor_ex, s, rng, other)
    t0 = time.perf_counter()
    if s.method == "exact":
        aie = aie_exact(model, cor, z_mean, effect=s.effect, max_rows=s.max_rows, progress=progress)
    elif s.method == "attribution":
        aie = aie_attribution(model, cor, z_mean, effect=s.effect, batch_size=s.batch_size, progress=progress)
    else:
        aie = aie_naive(model, cor, z_mean, effect=s.effect, progress=progress)
    info = {"n_pool": len(pool), "n_clean": len(keep), "n_clean_correct": int(sc["top1"][keep].sum()),
            "n_corrupt": len(cor), "clean_p_first": float(sc["p_first"][keep].mean()),
            "mismatch_task": other.name if other is not None else None,
            "aie_seconds": round(time.perf_counter() - t0, 2)}
    return {"aie": aie, "z_mean": z_mean, "info": info}


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


def _meta(model, task_name, s: Settings, heads, info, model_id, universal=None) -> dict:
    cfg = model.config
    return {"format": FORMAT_VERSION, "model": model_id, "config_hash": config_hash(model),
            "weights": weight_fingerprint(model), "n_layers": cfg.num_hidden_layers,
            "n_heads": cfg.num_attention_heads, "d_model": cfg.hidden_size, "task": task_name,
            "heads": [list(h) for h in heads], "layer": s.layer, "settings": s.key(),
            "universal": universal, **info}


def extract_iv(model, tok, task, *, model_id: str | None = None, progress=True, **settings) -> dict:
    """-> dict(iv [C], aie [L, H], heads [(l, h)] best first, layer, z_mean [L, H, D], meta).
    task: a tasks.Task or its name; settings: the fields of Settings."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**settings).resolve(model)
    med = mediation(model, tok, task, s, progress)
    heads = top_heads(med["aie"], s.top_k)
    return {"iv": build_iv(model, med["z_mean"], heads), "aie": med["aie"], "heads": heads,
            "layer": s.layer, "z_mean": med["z_mean"],
            "meta": _meta(model, task.name, s, heads, med["info"], model_id)}


def extract_universal(model, tok, tasks, *, model_id: str | None = None, progress=True,
                      **settings) -> dict:
    """One head set for all tasks (FvForgetting's practice): AIE averaged over the tasks, top-K of
    that, then each task's IV from its own z̄ through the shared heads. -> {task name: result}."""
    tasks = [load_task_by_name(t) if isinstance(t, str) else t for t in tasks]
    s = Settings(**settings).resolve(model)
    meds = {t.name: mediation(model, tok, t, s, progress) for t in tqdm(tasks, desc="tasks", disable=not progress)}
    aie = torch.stack([m["aie"] for m in meds.values()]).mean(0)
    heads = top_heads(aie, s.top_k)
    names = list(meds)
    return {n: {"iv": build_iv(model, m["z_mean"], heads), "aie": aie, "aie_task": m["aie"],
                "heads": heads, "layer": s.layer, "z_mean": m["z_mean"],
                "meta": _meta(model, n, s, heads, m["info"], model_id, universal=names)}
            for n, m in meds.items()}


# ---------------------------------------------------------------------------------------------
# Files: safetensors with the tensors, the metadata as one JSON string

def save_iv(result: dict, path) -> Path:
    """Write atomically (temp file in the same directory + rename), plus an AIE heatmap if matplotlib
    is installed."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: result[k].detach().float().contiguous() for k in ("iv", "aie", "z_mean", "aie_task")
               if k in result}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "iv_meta": json.dumps(result["meta"])})
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


def get_iv(model, tok, task_name: str, cache_path, *, model_id: str | None = None, progress=True,
           **settings) -> dict:
    """The IV for task_name: loaded from cache_path when that file was made from these very weights
    with the same settings, else extracted and saved there."""
    s = Settings(**settings).resolve(model)
    path = Path(cache_path)
    if path.is_file():
        try:
            r = read_iv(path)
            m = r["meta"]
            if (m.get("task") == task_name and m.get("settings") == s.key() and m.get("universal") is None
                    and m.get("config_hash") == config_hash(model) and m.get("weights") == weight_fingerprint(model)):
                return r
        except ExtractError:
            pass  # a damaged cache file is simply rebuilt
    r = extract_iv(model, tok, task_name, model_id=model_id, progress=progress, **dataclasses.asdict(s))
    save_iv(r, path)
    return r


def save_heatmap(aie, heads, path, title=""):
    """AIE [L, H] as an image, top heads boxed; skipped without matplotlib (an optional dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
# The check: does the IV restore the instruction on corrupted prompts?

@torch.no_grad()
def _exact_match(model, tok, prompts: list[Prompt], add=None, batch_size=16) -> float:
    """Greedy generation cut at the first stop token, compared after evaluate.normalize_answer (the
    project's one exact-match rule). The IV, if any, is added in the prefill at the last prompt token."""
    stop = set(tok.stop_ids())
    hits = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        idx, pad_mask = _pad_left([p.ids for p in batch])
        W = idx.shape[1]
        # left padding puts every prompt's last token in the last column
        iv = Intervention(pos=torch.full((len(batch),), W - 1), add_resid={add[0]: add[1]}) if add else None
        # room for the gold answer and its end token: a longer ramble shows at least one extra token
        out = model.generate(idx, max(len(p.answer) for p in batch), stop_ids=stop, pad_mask=pad_mask,
                             intervention=iv)
        for r, p in enumerate(batch):
            ids = out[r].tolist()
            ids = ids[:next((k for k, t in enumerate(ids) if t in stop), len(ids))]
            hits += normalize_answer(tok.decode(ids)) == normalize_answer(p.text)
    return hits / len(prompts)


def check_iv(model, tok, task, iv, layer, *, n=50, split="test", settings=None, sweep_layers=False,
             generate=True, progress=True) -> dict:
    """Zero-shot scores on `split` (held-out examples): clean prompts, corrupted prompts, corrupted
    prompts + IV after block `layer`. Scores: first-token accuracy, mean P(first answer token), mean
    log P(whole answer), greedy exact match; "restored" = the share of the clean - corrupted gap in
    log P(answer) that the IV closes (log-probabilities move even where a small model's greedy answer
    does not). sweep_layers: the same without generation for the IV added after every block."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**(settings or {}))
    rng = random.Random(s.seed + 1)
    examples = list(getattr(task, split)) or list(task.train)
    rng.shuffle(examples)
    examples = examples[:n]
    clean = [_prompt(tok, ex) for ex in examples]           # zero-shot with the instruction
    cor = corrupted_prompts(tok, task, examples, s, rng, _other_task(task, s))
    bs = s.batch_size

    def scores(prompts, add=None, gen=generate):
        sc = score_prompts(model, prompts, add=add, batch_size=bs)
        out = {"top1": float(sc["top1"].float().mean()), "p_first": float(sc["p_first"].mean()),
               "logprob": float(sc["logprob"].mean())}
        if gen:
            out["exact"] = _exact_match(model, tok, prompts, add, bs)
        return out

    conds = [("clean", clean, None), ("corrupted", cor, None), (f"corrupted+iv@{layer}", cor, (layer, iv))]
    res = {name: scores(p, add) for name, p, add in tqdm(conds, desc="check", disable=not progress, leave=False)}
    if sweep_layers:
        res["sweep"] = {l: scores(cor, (l, iv), gen=False)
                        for l in tqdm(range(model.n_layers), desc="layers", disable=not progress, leave=False)}
    gap = res["clean"]["logprob"] - res["corrupted"]["logprob"]
    for v in [res[f"corrupted+iv@{layer}"], *res.get("sweep", {}).values()]:
        v["restored"] = (v["logprob"] - res["corrupted"]["logprob"]) / gap if gap else float("nan")
    res["n"] = len(examples)
    return res


def format_check(res: dict) -> str:
    lines = [f"check on {res['n']} held-out examples",
             f"{'condition':<22} {'top1':>6} {'P(first)':>9} {'logP(ans)':>10} {'restored':>9} {'exact':>6}"]
    rows = [(k, v) for k, v in res.items() if isinstance(v, dict) and "top1" in v]
    rows += [(f"  corrupted+iv@{l}", v) for l, v in res.get("sweep", {}).items()]
    for name, v in rows:
        restored = f"{v['restored']:9.2f}" if "restored" in v else f"{'':>9}"
        exact = f"{v['exact']:6.2f}" if "exact" in v else f"{'':>6}"
        lines.append(f"{name:<22} {v['top1']:6.2f} {v['p_first']:9.3f} {v['logprob']:10.2f} {restored} {exact}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def model_tag(name_or_path) -> str:
    if name_or_path is None:
        return "SmolLM2-135M-Instruct"
    p = Path(name_or_path)
    return p.stem if p.suffix == ".gguf" else p.name


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Extract instruction vectors by causal mediation over heads.")
    # I/O
    ap.add_argument("--task", help="task name (see tasks.list_tasks())")
    ap.add_argument("--universal", nargs="+", metavar="TASK", help="one head set from the AIE averaged over these tasks")
    ap.add_argument("--out", help="IV file (default ivs/<model-tag>/<task>.safetensors); with --universal a directory")
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--reuse", action="store_true", help="load --out instead when it matches model and settings")
    # data
    ap.add_argument("--n_clean", type=int, default=100, help="clean prompts averaged into the mean head outputs")
    ap.add_argument("--n_corrupt", type=int, default=25, help="corrupted prompts averaged into the AIE")
    ap.add_argument("--shots", type=int, default=0, help="demonstrations per clean prompt, each with the instruction")
    ap.add_argument("--corrupt", default="no_instruction", choices=CORRUPTIONS, help="how the instruction is removed")
    ap.add_argument("--mismatch_task", help="task lending its instruction to --corrupt mismatched")
    ap.add_argument("--seed", type=int, default=0, help="example selection seed")
    # mediation
    ap.add_argument("--method", default="exact", choices=("exact", "attribution", "naive"),
                    help="exact: fast patching; attribution: gradient estimate; naive: Todd's full-forward loop")
    ap.add_argument("--effect", default="prob", choices=("prob", "logprob"),
                    help="P(first answer token) or log P(whole answer)")
    ap.add_argument("--top_k", type=int, default=None, help="heads in the IV (default max(3, round(L*H/100)))")
    ap.add_argument("--layer", type=int, default=None, help="block after which the IV is added (default L*3//10)")
    # check
    ap.add_argument("--check", action="store_true", help="score corrupted prompts with and without the IV")
    ap.add_argument("--sweep_layers", action="store_true", help="with --check: try the IV after every block")
    ap.add_argument("--n_check", type=int, default=50, help="held-out examples for --check")
    # system
    ap.add_argument("--batch_size", type=int, default=16, help="prompts per forward")
    ap.add_argument("--max_rows", type=int, default=512, help="patched heads per batch (exact method)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if (args.task is None) == (args.universal is None):
        ap.error("give exactly one of --task or --universal")
    if args.n_check < 1:
        ap.error(f"--n_check {args.n_check}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except ExtractError as e:
        print(f"extract_iv.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from load import LoadError, load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("n_clean", "n_corrupt", "shots", "corrupt", "mismatch_task",
                                              "effect", "method", "top_k", "layer", "seed", "batch_size",
                                              "max_rows")}
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
    print("config:", json.dumps({"model": tag, "tasks": names, **dataclasses.asdict(s)}))
    progress = not args.quiet
    if args.universal:
        out_dir = Path(args.out or Path("ivs") / tag / "universal")
        results = extract_universal(model, tok, tasks, model_id=tag, progress=progress, **settings)
        paths = {n: save_iv(r, out_dir / f"{n}.safetensors") for n, r in results.items()}
    else:
        path = Path(args.out or Path("ivs") / tag / f"{args.task}.safetensors")
        if args.reuse:
            r = get_iv(model, tok, args.task, path, model_id=tag, progress=progress, **settings)
        else:
            r = extract_iv(model, tok, tasks[0], model_id=tag, progress=progress, **settings)
            save_iv(r, path)
        results, paths = {args.task: r}, {args.task: path}
    for name, r in results.items():
        m = r["meta"]
        heads = ", ".join(f"({l},{h}) {float(r['aie'][l, h]):+.4f}" for l, h in r["heads"])
        print(f"{name}: heads {heads}; layer {r['layer']}; |iv| {float(r['iv'].norm()):.3f}; "
              f"clean {m.get('n_clean')} ({m.get('n_clean_correct')} correct), corrupt {m.get('n_corrupt')}; "
              f"-> {paths[name]}")
        if args.check:
            task = next(t for t in tasks if t.name == name)
            res = check_iv(model, tok, task, r["iv"], r["layer"], n=args.n_check, settings=settings,
                           sweep_layers=args.sweep_layers, progress=progress)
            print(format_check(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
