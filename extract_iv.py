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

This file is the method; the rest is in ivft/: ivsettings (Settings), ivprompts (clean and corrupted
prompts, score_prompts), ivfile (IV files, cache keys), ivcheck (--check), report (tables, plots).

Conventions: layers and heads are 0-indexed; "after block l" = the residual stream that block l+1
reads (Intervention.add_resid={l: iv}); a head is a query head (under GQA several share k/v).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ivft.ivcheck import SWEEP_MARGIN, check_iv, check_report, dev_accuracy, iv_advice, iv_verdict, restored
from ivft.ivfile import cache_matches, check_iv_task, iv_filename, iv_meta, load_iv, model_tag, read_iv, save_iv
from ivft.ivprompts import (Prompt, check_distinct, clean_prompts, corrupted_prompts, draw_examples,
                            load_task_by_name, mismatch_donor, pad_left, render, score_prompts, split_train)
from ivft.ivsettings import (CORRUPTIONS, EFFECTS, FORMATS, KINDS, METHODS, MIN_PROMPTS, ExtractError, Settings,
                             check_layer)
from ivft.report import format_check, format_sweep, plot_sweep, save_report
from model import Intervention, KVCache

K_GRID = (3, 5, 10, 20, 40)     # top-K values the sweep tries (those <= the model's head count)
# effect="auto" ranks heads by P(first answer token) when the clean prompts give it at least this much
# more mean probability than the corrupted ones (real mass that the corruption removes: a head's
# effect on a token nobody predicts, or one predicted anyway, is noise), else by log P(whole answer)
AUTO_PROB_MIN = 0.3


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


def suffix_ids(prompt: Prompt, effect) -> list[int]:
    # the suffix: the tokens whose logits the metric reads, the last prompt token plus the answer for logprob
    return [prompt.ids[-1]] + (prompt.answer[:-1] if effect == "logprob" else [])


@torch.no_grad()
def aie_naive(model, prompts: list[Prompt], z_mean, *, effect="prob", progress=True) -> torch.Tensor:
    """Todd's loop, kept as the reference the fast path is tested against: one full forward per
    (layer, head) per prompt, z of that head set to z̄ at the last prompt token."""
    L, H = model.n_layers, model.config.num_attention_heads
    total = torch.zeros(L, H, dtype=torch.float64)
    for p in tqdm(prompts, desc="AIE naive", disable=not progress, leave=False):
        T, suffix = len(p.ids), suffix_ids(p, effect)
        idx = torch.tensor([p.ids + suffix[1:]])
        base = _metric(model(idx)[:, T - 1:], p.answer, effect)
        for l in range(L):
            for h in range(H):
                edit = Intervention(pos=torch.tensor([T - 1]),
                                    set_z={l: (torch.tensor([h]), z_mean[l, h][None])})
                total[l, h] += (_metric(model(idx, intervention=edit)[:, T - 1:], p.answer, effect) - base).item()
    return (total / len(prompts)).float()


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
    suffix = torch.tensor(suffix_ids(p, effect))
    U = len(suffix)
    # embedding (1, U, C), RoPE tables and mask of the suffix after the cached prefix: what the blocks,
    # run one by one in _patched_metrics / _steered_logits, take as input
    x0, rope, mask = model.embed(suffix[None], T - 1)
    edit = Intervention(pos=torch.arange(T - 1, T - 1 + U)[None], record_z=tuple(range(L)),
                        record_resid=tuple(range(L)))
    logits = model.lm_head(model(suffix[None], cache=cache, intervention=edit, return_hidden=True))
    resid = [x0[0]] + [edit.resid[l][0] for l in range(L)]                   # L+1 x (U, C): block i's input
    z = torch.stack([edit.z[l][0, 0] for l in range(L)])                     # (L, H, D) at position T-1
    return dict(past_k=past_k, past_v=past_v, rope=rope, mask=mask, start=T - 1, resid=resid,
                z=z, logits=logits[0], base=_metric(logits, p.answer, effect)[0])


@torch.no_grad()
def _patched_metrics(model, state: dict, heads: list[tuple[int, int]], z_mean, answer, effect) -> torch.Tensor:
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
    U, C = state["resid"][0].shape
    x = state["resid"][0].new_empty(len(heads), U, C)                  # (N, U, C)
    cache = KVCache(L)
    for i in range(int(layers[0]), L):
        new = (layers == i).nonzero()[:, 0]                                 # rows patched at block i
        n = int((layers <= i).sum())                                        # active rows: a prefix
        edit = None
        if len(new):
            x[new] = state["resid"][i]
            delta = x.new_zeros(n, H, state["z"].shape[-1])                 # (n, H, D)
            delta[new, hs[new]] = z_mean[i, hs[new]].to(x.dtype) - state["z"][i, hs[new]]
            edit = Intervention(pos=torch.full((n,), state["start"]), add_z={i: (torch.arange(H), delta)})
        # (n, G, T-1, D) views of the one prefix; the block's cache.update copies them once
        cache.k[i] = state["past_k"][i].expand(n, -1, -1, -1)
        cache.v[i] = state["past_v"][i].expand(n, -1, -1, -1)
        x[:n] = model.model.layers[i](x[:n], state["rope"], state["mask"], cache, i, edit, state["start"])
        cache.k[i] = cache.v[i] = None                                      # free this layer's copy
    logits = model.lm_head(model.model.norm(x))                             # (N, U, V)
    return _metric(logits, answer, effect)


@torch.no_grad()
def _steered_logits(model, state: dict, layers: list[int], vecs: torch.Tensor) -> torch.Tensor:
    """Logits (N, U, V) at the suffix with vecs[n] [C] added to the residual stream after block
    layers[n] at the last prompt token: the same as a full forward with Intervention(add_resid=...),
    but each row only recomputes the suffix from block layers[n] + 1 upward, on the cached prefix.
    `layers` must be sorted (rows join the batch in order, as in _patched_metrics)."""
    L = model.n_layers
    assert layers == sorted(layers)
    lay = torch.tensor(layers)
    U, C = state["resid"][0].shape
    x = state["resid"][0].new_empty(len(layers), U, C)                     # (N, U, C)
    cache = KVCache(L)
    for i in range(layers[0] + 1, L + 1):
        new = (lay == i - 1).nonzero()[:, 0]                                # rows that join before block i
        if len(new):
            x[new] = state["resid"][i]
            x[new, 0] += vecs[new].to(x.dtype)
        if i == L:
            break
        n = int((lay <= i - 1).sum())
        cache.k[i] = state["past_k"][i].expand(n, -1, -1, -1)
        cache.v[i] = state["past_v"][i].expand(n, -1, -1, -1)
        x[:n] = model.model.layers[i](x[:n], state["rope"], state["mask"], cache, i, None, state["start"])
        cache.k[i] = cache.v[i] = None
    return model.lm_head(model.model.norm(x))                               # (N, U, V)


@torch.no_grad()
def aie_exact(model, prompts: list[Prompt], z_mean, *, effect="prob", max_rows=512, progress=True,
              heads: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Exact AIE (same numbers as aie_naive) at a fraction of its cost: see _patched_metrics."""
    L, H = model.n_layers, model.config.num_attention_heads
    heads = sorted(heads or [(l, h) for l in range(L) for h in range(H)])
    total = torch.zeros(L, H, dtype=torch.float64)
    for p in tqdm(prompts, desc="AIE exact", disable=not progress, leave=False):
        state = _corrupted_state(model, p, effect)
        for j in range(0, len(heads), max_rows):
            chunk = heads[j:j + max_rows]
            m = _patched_metrics(model, state, chunk, z_mean, p.answer, effect)
            for (l, h), v in zip(chunk, (m - state["base"]).tolist()):
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
        seqs = [p.ids + suffix_ids(p, effect)[1:] for p in batch]
        idx, pad_mask = pad_left(seqs)
        W = idx.shape[1]
        last = torch.tensor([W - len(s) + len(p.ids) - 1 for s, p in zip(seqs, batch)])   # (B)
        zeros = [torch.zeros(len(batch), H, D, requires_grad=True) for _ in range(L)]
        edit = Intervention(pos=last, record_z=tuple(range(L)),
                            add_z={l: (torch.arange(H), zeros[l]) for l in range(L)})
        with torch.enable_grad():
            hidden = model(idx, pad_mask=pad_mask, intervention=edit, return_hidden=True)
            # rows are independent, so the gradient of the sum is each row's own gradient
            m = sum(_metric(model.lm_head(hidden[r, last[r] + torch.arange(len(suffix_ids(p, effect)))])[None],
                            p.answer, effect)[0] for r, p in enumerate(batch))
            grads = torch.autograd.grad(m, zeros)
        for l in range(L):
            dz = z_mean[l][None] - edit.z[l][:, 0].detach().float()           # (B, H, D)
            total[l] += (grads[l].float() * dz).sum((0, 2)).double()
    return (total / len(prompts)).float()


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

def mediation(model, tok, task, s: Settings, progress=True) -> dict:
    """Steps 1-3: z̄ from clean prompts, AIE from corrupted ones, on the training examples left
    after the dev split. -> dict(aie, z_mean, resid_diff [L, C], effect, info)."""
    pool_ex, dev = split_train(task, s)
    if len(pool_ex) < MIN_PROMPTS + 1:
        raise ExtractError(f"task {task.name!r} has {len(task.train)} training examples: too few to "
                           f"average over (need at least {MIN_PROMPTS + 1} after the dev split)")
    rng = random.Random(s.seed)
    other = mismatch_donor(task, s)
    # 1. clean: score a pool twice the size wanted, keep the answered ones (lowest NLL first), and top
    #    up with the lowest-NLL misses: training tasks are ones the model does poorly on, and guided
    #    training needs their IVs too
    picked = draw_examples(rng, pool_ex, min(len(pool_ex), 2 * s.n_clean))
    prompts = clean_prompts(tok, task, picked, s, rng, pool=pool_ex)
    check_distinct(tok, picked, prompts, s, task.name)
    scores = score_prompts(model, prompts, record_z=True, record_resid=True, batch_size=s.batch_size,
                           desc="clean prompts" if progress else None)
    order = sorted(range(len(picked)), key=lambda j: (not bool(scores["top1"][j]), -float(scores["logprob"][j])))
    keep = order[:s.n_clean]
    z_mean = scores["z"][keep].mean(0)                                      # (L, H, D)
    # 2. corrupted prompts from other examples where the split allows
    chosen = {id(picked[j]) for j in keep}
    cor_ex = draw_examples(rng, pool_ex, min(len(pool_ex), s.n_corrupt), avoid=chosen)
    cor = corrupted_prompts(tok, task, cor_ex, s, rng, other, pool=pool_ex)
    # the residual-stream task vector's ingredients (cheap: the corrupted prompts are short)
    cor_scores = score_prompts(model, cor, record_resid=True, batch_size=s.batch_size)
    resid_diff = scores["resid"][keep].mean(0) - cor_scores["resid"].mean(0)   # (L, C)
    # 3. the AIE of every head; "auto" ranks by P(first token) only where the clean prompts put real
    #    mass on it that the corrupted ones lack (else a head's effect on it is noise or saturated),
    #    by log P(answer) otherwise
    clean_p_first, cor_p_first = float(scores["p_first"][keep].mean()), float(cor_scores["p_first"].mean())
    effect = choose_effect(s.effect, clean_p_first, cor_p_first)
    t0 = time.perf_counter()
    if s.method == "exact":
        aie = aie_exact(model, cor, z_mean, effect=effect, max_rows=s.max_rows, progress=progress)
    elif s.method == "attribution":
        aie = aie_attribution(model, cor, z_mean, effect=effect, batch_size=s.batch_size, progress=progress)
    else:
        aie = aie_naive(model, cor, z_mean, effect=effect, progress=progress)
    info = {"n_pool": len(picked), "n_clean": len(keep), "n_clean_correct": int(scores["top1"][keep].sum()),
            "n_corrupt": len(cor), "n_dev": len(dev), "clean_p_first": clean_p_first,
            "corrupted_p_first": cor_p_first,
            "clean_top1_all": float(scores["top1"].float().mean()), "effect_used": effect,
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
        state = _corrupted_state(model, p, "logprob")
        cor_lp.append(float(state["base"]))
        cor_top1.append(int(state["logits"][0].argmax()) == p.answer[0])
        for j in range(0, len(rows), s.max_rows):
            logits = _steered_logits(model, state, layers[j:j + s.max_rows], vecs[j:j + s.max_rows])
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


# ---------------------------------------------------------------------------------------------
# Extraction, and the cached entry point

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
           "resid_diff": med["resid_diff"], "meta": iv_meta(model, task, key, s, heads, med["info"], model_id)}
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
                "meta": iv_meta(model, by_name[n], s.key(), s, heads, m["info"], model_id, universal=names)}
            for n, m in meds.items()}


def get_iv(model, tok, task, cache_path=None, *, model_id: str | None = None, progress=True,
           **settings) -> dict:
    """The IV for `task` (a name or a tasks.Task): loaded from cache_path when that file was made
    from these very weights, the same task data and the same settings, else extracted and saved
    there. cache_path None: ivs/<model_id>/<iv_filename(task)>. A heads IV cached for one layer
    serves every layer (Settings.key): r["layer"] is then the layer asked for."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**settings).resolve(model)
    path = Path(cache_path) if cache_path is not None else Path("ivs") / (model_id or "model") / iv_filename(task)
    if path.is_file():
        try:
            r = read_iv(path)
            if cache_matches(r["meta"], task, s.key(), model):
                r["reused"] = True
                r["layer"] = s.layer if s.layer != "auto" else r["layer"]
                return r
        except ExtractError as e:     # a damaged cache file is rebuilt, and said so
            print(f"note: {e}; extracting it again", file=sys.stderr)
    r = extract_iv(model, tok, task, model_id=model_id, progress=progress, **settings)
    save_iv(r, path)
    return r


def training_ivs(model, tok, tasks, *, iv_dir, model_id: str, files: dict | None = None, layer: int | None = None,
                 progress=True, **settings) -> dict:
    """train.py's IVs: -> {task name: (iv (C,), injection layer, meta)} for every training task, from
    the model before any training: cached under iv_dir/<model_id>/ (get_iv), or files[task name]
    (--iv_file). layer: where the IVs are added (None = each IV's own): a use-time choice, checked
    here, that never changes which IV is extracted."""
    files = files or {}
    if unknown := sorted(set(files) - {t.name for t in tasks}):
        raise ExtractError(f"--iv_file names tasks not in the sequence: {unknown}")
    out = {}
    for task in tasks:
        where = files.get(task.name, f"IV of task {task.name!r}")
        try:
            if task.name in files:
                iv, own_layer, meta = load_iv(files[task.name], model)
                check_iv_task(meta, task, files[task.name])
            else:
                r = get_iv(model, tok, task, Path(iv_dir) / model_id / iv_filename(task), model_id=model_id,
                           progress=progress, **settings)
                iv, own_layer, meta = r["iv"], r["layer"], r.get("meta", {})
        except (ValueError, KeyError, OSError) as e:
            msg = str(e.args[0] if e.args else e)
            raise ExtractError(msg if where in msg else f"{where}: {msg}") from None
        use = check_layer(int(own_layer) if layer is None else layer, model.n_layers, "IV layer")
        if tuple(iv.shape) != (model.config.hidden_size,):
            raise ExtractError(f"{where}: shape {tuple(iv.shape)}, the model needs ({model.config.hidden_size},)")
        out[task.name] = (iv.detach().float().cpu(), use, meta)
    return out


# ---------------------------------------------------------------------------------------------
# Command line

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
    g.add_argument("--method", default="exact", choices=METHODS,
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
                        "layer and K on the dev split, and the other --kind where it restores clearly more "
                        "and the IV so chosen restores little")
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
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}   # every flag of that name
    Settings(**settings)                                      # bad settings fail before the slow load
    names = args.universal or [args.task]
    tasks = [load_task_by_name(n) for n in names]
    tag = model_tag(args.model)
    out = _out_path(args, tasks, tag)
    _check_outputs(args, out)                                 # before the minutes that a bad path would waste
    try:
        model, tok = load_model(args.model)
    except LoadError as e:
        raise ExtractError(str(e)) from None
    model.eval()
    s = Settings(**settings).resolve(model)
    print("config:", json.dumps({"model": tag, "tasks": [t.name for t in tasks], **dataclasses.asdict(s)}))
    progress = not args.quiet
    if args.universal:
        results = extract_universal(model, tok, tasks, model_id=tag, progress=progress, **settings)
        for name, r in results.items():
            r["path"] = _written(out / f"{name}.safetensors", save_iv, r, out / f"{name}.safetensors")
    else:
        task = tasks[0]
        if args.reuse:
            r = _written(out, get_iv, model, tok, task, out, model_id=tag, progress=progress, **settings)
        else:
            r = extract_iv(model, tok, task, model_id=tag, progress=progress, **settings)
        if s.layer == "auto" and not r.get("reused"):
            r, lines = auto_kind(model, tok, task, r, settings, progress=progress)
            for line in lines:
                print(line)
        if not r.get("reused"):
            _written(out, save_iv, r, out)
        r["path"] = out
        results = {task.name: r}
    for name, r in results.items():
        m = r["meta"]
        heads = ", ".join(f"({l},{h}) {float(r['aie'][l, h]):+.4f}" for l, h in r["heads"])
        print(f"{name}: {m['kind']} IV" + (f", heads {heads}" if m["kind"] == "heads" else "") +
              f"; layer {r['layer']}; |iv| {float(r['iv'].norm()):.3f}; AIE by {m.get('effect_used')}; "
              f"clean prompts {m.get('n_clean')} ({m.get('n_clean_correct')} answered, first-token accuracy "
              f"of all scored {m.get('clean_top1_all', float('nan')):.2f}, P(first) {m.get('clean_p_first', float('nan')):.3f}), "
              f"corrupted {m.get('n_corrupt')}{' (reused)' if r.get('reused') else ''} -> {r['path']}")
    task, r = tasks[0], results[tasks[0].name]       # --sweep and --check work on one task
    sw = r.get("sweep_all")                          # auto_kind's, where it ran one
    if args.sweep:
        sw = sw or _sweep_all(model, tok, task, r, s, progress)
        print(format_sweep(sw, best_row(sw)))
        png_path = out.with_suffix(".sweep.png")
        png = _written(png_path, plot_sweep, sw, png_path)
        if png:
            print(f"sweep plot -> {png}")
    if args.check:
        res = check_iv(model, tok, task, r["iv"], r["layer"], n=args.n_check, settings=settings, progress=progress)
        print(format_check(res))
        numbers = (res["clean"]["top1"], res["corrupted"]["top1"], res["iv"]["top1"],
                   res["restored_accuracy"])
        lines, sw = _advice(model, tok, task, r, s, numbers, where="held-out test examples", sw=sw,
                            progress=progress)
        for line in lines:
            print(line)
        if args.report:
            report = {**check_report(res, r, task.name), "advice": lines}
            if sw is not None:
                report["sweep"] = sw
            _written(Path(args.report), save_report, report, args.report)
            print(f"report -> {args.report}")
    return 0


# ---------------------------------------------------------------------------------------------
# Output files: checked before the work, every write error one line naming the file

def _out_path(args, tasks, tag) -> Path:
    """The IV file (--task) or folder (--universal) this run writes."""
    if args.universal:
        return Path(args.out or Path("ivs") / tag / "universal")
    return Path(args.out or Path("ivs") / tag / iv_filename(tasks[0]))


def _check_outputs(args, out: Path) -> None:
    """Every place this run writes (the IV file or folder, with the heatmap and sweep plot beside it,
    and --report) must be writable before the model is loaded. Nothing is created."""
    from ivft.files import check_writable
    targets = [("--out" if args.out else "IV file", out, bool(args.universal))]
    if args.report:
        targets.append(("--report", Path(args.report), False))
    for flag, path, is_folder in targets:
        if path.exists() and path.is_dir() != is_folder:
            raise ExtractError(f"{flag} {path}: is a {'file' if is_folder else 'folder'}, this needs a "
                               f"{'folder' if is_folder else 'file path'}")
        try:
            check_writable(path if is_folder else path.parent)
        except OSError as e:
            raise ExtractError(f"{flag} {path}: {e}") from None


def _written(path, write, *args, **kwargs):
    """write(*args, **kwargs), with a write error as one line naming `path`: a full disk raises an
    OSError without a file name, and safetensors its own SafetensorError, not an OSError."""
    from safetensors import SafetensorError
    try:
        return write(*args, **kwargs)
    except (OSError, SafetensorError) as e:
        detail = (e.strerror if isinstance(e, OSError) else None) or str(e)
        where = getattr(e, "filename", None) or path       # the heatmap beside the IV file, say
        raise ExtractError(detail if str(where) in detail else f"{where}: cannot write ({detail})") from None


# ---------------------------------------------------------------------------------------------
# What the IV can carry on the task (ivft.ivcheck.iv_advice): where it restores little although the
# clean prompts work, the dev sweep says whether another layer, K or kind does better

def _sweep_all(model, tok, task, r: dict, s: Settings, progress=True) -> dict:
    """The dev sweep over layers, K (K_GRID plus the IV's own) and both kinds, for the IV `r`."""
    own_k = r["meta"].get("top_k") if r["meta"].get("kind") == "heads" else None
    med = {"aie": r["aie"], "z_mean": r["z_mean"], "resid_diff": r.get("resid_diff")}
    kinds = KINDS if med["resid_diff"] is not None else ("heads",)   # an older file may lack resid_diff
    return sweep(model, tok, task, med, s, progress=progress, kinds=kinds,
                 k_grid=tuple(sorted(set(K_GRID) | ({own_k} if own_k else set()))))


def _own_row(sw: dict, r: dict) -> dict | None:
    """The sweep's row for the IV's own kind, K and layer."""
    kind, k = r["meta"].get("kind"), r["meta"].get("top_k")
    return next((row for row in sw["rows"] if row["kind"] == kind and row["layer"] == r["layer"]
                 and (kind == "resid" or row["k"] == k)), None)


def _advice(model, tok, task, r, s, numbers, *, where, sw=None, chosen=False, progress=True):
    """-> (iv_advice's lines for numbers = (clean, corrupted, +IV accuracy, restored share), the sweep
    or None); the dev sweep runs (unless given) only where the IV restores little."""
    if iv_verdict(numbers[0], numbers[3]) != "little" or len(split_train(task, s)[1]) < MIN_PROMPTS:
        return iv_advice(*numbers, where=where), sw
    sw = sw or _sweep_all(model, tok, task, r, s, progress)
    return iv_advice(*numbers, current=_own_row(sw, r), best=best_row(sw), chosen=chosen, where=where), sw


def advise(model, tok, task, r: dict, settings: dict | None = None, *, progress=True) -> list[str]:
    """What the IV r (an extract_iv / get_iv result, or read_iv of its file) can do on `task`,
    measured on the dev split: zero, one or two advice lines (ivft.ivcheck.iv_advice) for train.py to
    print after it extracts. settings: the extraction settings, as for get_iv."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**(settings or {})).resolve(model)
    numbers = dev_accuracy(model, tok, task, r["iv"], r["layer"], s)
    if numbers is None:      # no dev split to measure on: the clean accuracy of the extraction's prompts
        return iv_advice(r["meta"].get("clean_top1_all", 1.0), float("nan"), float("nan"), None,
                         where="extraction's training examples")
    return _advice(model, tok, task, r, s, numbers, where="dev split", progress=progress)[0]


def auto_kind(model, tok, task, r: dict, settings: dict | None = None, *,
              progress=True) -> tuple[dict, list[str]]:
    """layer "auto" chooses the layer and K on the dev split, for the kind asked for; where the IV so
    chosen restores little there although the clean prompts work, both kinds are swept and the best
    setting is taken when it restores SWEEP_MARGIN more of the log-P gap. -> (r, possibly rebuilt;
    the advice lines). The cache key stays the settings as asked for; meta["chosen_by_sweep"]["kind"]
    marks the choice as made, so a second call does nothing."""
    chosen = r["meta"].get("chosen_by_sweep") or {}
    if "kind" in chosen:
        return r, []
    s = Settings(**(settings or {})).resolve(model)
    numbers = dev_accuracy(model, tok, task, r["iv"], r["layer"], s)
    lines, sw = ([], None) if numbers is None else _advice(model, tok, task, r, s, numbers, where="dev split",
                                                             chosen=True, progress=progress)
    b, own = (best_row(sw), _own_row(sw, r)) if sw is not None else (None, None)
    if b is None or own is None or b["restored_logprob"] - own["restored_logprob"] < SWEEP_MARGIN:
        r["meta"]["chosen_by_sweep"] = {**chosen, "kind": r["meta"]["kind"]}
        return ({**r, "sweep_all": sw} if sw is not None else r), lines
    k = b["k"] or r["meta"]["top_k"]
    med = {"aie": r["aie"], "z_mean": r["z_mean"], "resid_diff": r.get("resid_diff")}
    iv, heads = make_iv(model, med, b["kind"], b["layer"], k)
    meta = {**r["meta"], "kind": b["kind"], "layer": b["layer"], "top_k": k,
            "heads": [list(h) for h in heads],
            "chosen_by_sweep": {"layer": b["layer"], "top_k": k, "kind": b["kind"],
                                "dev_restored_logprob": b["restored_logprob"], "instead_of": chosen}}
    return {**r, "iv": iv, "heads": heads, "layer": b["layer"], "meta": meta, "sweep_all": sw}, lines


if __name__ == "__main__":
    sys.exit(main())
