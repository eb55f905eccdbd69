"""Instruction-vector (IV) extraction by causal mediation over attention heads, fast and exact.

    python extract_iv.py --task antonym --check         # -> ivs/<model-tag>/antonym.safetensors + a check
    python extract_iv.py --task antonym --sweep         # restored share per layer x K on a dev split (+ PNG)

Todd et al. 2023, "Function Vectors in Large Language Models", arXiv 2310.15213, code
ericwtodd/function_vectors; Jiang et al., arXiv 2406.12227. In four steps (details: docs/iv.md):
1. clean prompts = k demonstrations with the instruction, then the query; z̄[l, h] = head h's mean
   output z (its o_proj input slice) at the last prompt token;
2. corrupted prompts = the query alone, zero-shot: the form the IV has to repair;
3. AIE[l, h] = mean effect of z_lh := z̄_lh (last token) on P(first answer token) or on log P(answer);
4. IV = Σ over the top-K heads of z̄_lh through head h's W_O slice (no bias), added after block `layer`
   (`--kind resid`: the mean residual stream there, clean minus corrupted; Hendel et al. 2023).
Layer and K are chosen on a dev split of the training examples; `--check` scores test examples only.

Step 3 is fast and exact: patching z at the last position of layer l changes no earlier position
(causal attention) and nothing below l, so each corrupted prompt runs once with a KV cache and each
patched head recomputes only that position from layer l up, all heads as rows of one batch
(`aie_exact`; the sweep: `_steered_logits`). `--method attribution`: dP/dz · (z̄ - z), one backward
(Nanda 2023). Layers, heads (query heads) 0-indexed; "after block l" = what block l+1 reads.
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

from ivft import chat
from ivft.engine import add_device_flags, autocast, lm_head_fp32, model_device, resolve_precision
from ivft.errors import ExtractError, LoadError
from ivft.ivcheck import (check_iv, check_report, choose_kind, dev_advice, restored, sweep_all, swept_advice,
                          training_lines)
from ivft.ivfile import (cached_iv, check_iv_task, check_outputs, iv_filename, iv_meta, iv_out_path, load_iv,
                         model_tag, save_iv, scale_to_state, written)
from ivft.ivprompts import (Prompt, check_distinct, clean_prompts, corrupted_prompts, draw_examples,
                            load_task_by_name, mismatch_donor, pad_left, render, score_prompts, split_train,
                            state_norms)
from ivft.ivsettings import (CORRUPTIONS, EFFECTS, FORMATS, KINDS, METHODS, MIN_PROMPTS, Settings, check_layer,
                             layer_arg)
from ivft.load import load_model
from ivft.report import format_check, format_iv, format_sweep, plot_sweep, save_report
from model import Intervention, KVCache

K_GRID = (3, 5, 10, 20, 40)     # top-K values the sweep tries (those <= the model's head count)
# effect="auto" ranks heads by P(first answer token) when the clean prompts give it at least this much
# more mean probability than the corrupted ones (real mass that the corruption removes: a head's
# effect on a token nobody predicts, or one predicted anyway, is noise), else by log P(whole answer)
AUTO_PROB_MIN = 0.3


# ---- Average indirect effect, three ways. All return AIE [L, H] (float32), rows = layers ---------
# The metric: "prob" = P(answer[0]) after the last prompt token; "logprob" = sum of log P over the
# answer tokens (teacher-forced), so the patched last prompt position is also seen by the answer.
def _metric(logits, answer, effect) -> torch.Tensor:
    """logits (N, U, V) at the last prompt token and after it -> (N,) metric per row."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # fp32, or fp64 for tests
    if effect == "prob":
        return F.softmax(logits[:, 0], -1)[:, answer[0]]
    lp, dev = F.log_softmax(logits, -1), logits.device                    # (N, A, V)
    return lp[:, torch.arange(len(answer), device=dev), torch.tensor(answer, device=dev)].sum(-1)


def suffix_ids(prompt: Prompt, effect) -> list[int]:
    # the suffix: the tokens whose logits the metric reads, the last prompt token plus the answer for logprob
    return [prompt.ids[-1]] + (prompt.answer[:-1] if effect == "logprob" else [])


@torch.no_grad()
def aie_naive(model, prompts: list[Prompt], z_mean, *, effect="prob", progress=True) -> torch.Tensor:
    """Todd's loop, kept as the reference the fast path is tested against: one full forward per
    (layer, head) per prompt, z of that head set to z̄ at the last prompt token."""
    L, H, dev = model.n_layers, model.config.num_attention_heads, model_device(model)
    z_mean = z_mean.to(dev)
    total = torch.zeros(L, H, dtype=torch.float64)
    for p in tqdm(prompts, desc="AIE naive", disable=not progress, leave=False):
        T, suffix = len(p.ids), suffix_ids(p, effect)
        idx = torch.tensor([p.ids + suffix[1:]], device=dev)
        base = _metric(lm_head_fp32(model, model(idx, return_hidden=True)[:, T - 1:]), p.answer, effect)
        for l in range(L):
            for h in range(H):
                edit = Intervention(pos=torch.tensor([T - 1], device=dev),
                                    set_z={l: (torch.tensor([h], device=dev), z_mean[l, h][None])})
                hidden = model(idx, intervention=edit, return_hidden=True)[:, T - 1:]
                patched = _metric(lm_head_fp32(model, hidden), p.answer, effect)
                total[l, h] += (patched - base).item()
    return (total / len(prompts)).float()


@torch.no_grad()
def _corrupted_state(model, p: Prompt, effect) -> dict:
    """Run one corrupted prompt once and keep what every patch needs: the prefix K/V of all layers
    (positions 0..T-2), and at the suffix (the last prompt token, plus the answer tokens for
    logprob) every block's input, the last block's output and every layer's z."""
    L, T, dev = model.n_layers, len(p.ids), model_device(model)
    if T < 2:
        raise ExtractError("a prompt needs at least two tokens (a prefix to cache and a last token)")
    cache = KVCache(L)
    model(torch.tensor([p.ids[:-1]], device=dev), cache=cache, return_hidden=True)   # positions 0..T-2
    past_k, past_v = list(cache.k), list(cache.v)      # the suffix call below concatenates new tensors
    suffix = torch.tensor(suffix_ids(p, effect), device=dev)
    U = len(suffix)
    # embedding (1, U, C), RoPE tables and mask of the suffix after the cached prefix: what the blocks,
    # run one by one in _patched_metrics / _steered_logits, take as input
    x0, rope, mask = model.embed(suffix[None], T - 1)
    edit = Intervention(pos=torch.arange(T - 1, T - 1 + U, device=dev)[None], record_z=tuple(range(L)),
                        record_resid=tuple(range(L)))
    logits = lm_head_fp32(model, model(suffix[None], cache=cache, intervention=edit, return_hidden=True))
    resid = [x0[0]] + [edit.resid[l][0] for l in range(L)]                   # L+1 x (U, C): block i's input
    z = torch.stack([edit.z[l][0, 0] for l in range(L)])                     # (L, H, D) at position T-1
    return dict(past_k=past_k, past_v=past_v, rope=rope, mask=mask, start=T - 1, resid=resid,
                z=z, logits=logits[0], base=_metric(logits, p.answer, effect)[0])


@torch.no_grad()
def _patched_metrics(model, state: dict, heads: list[tuple[int, int]], z_mean, answer,
                     effect) -> torch.Tensor:
    """The metric with z of head (l, h) := z̄[l, h] at the last prompt token, one batch row per head.
    Rows are sorted by layer. At block i the rows patched at a layer <= i are "active": a row patched
    at layer l joins at block l with the recorded (unpatched) input of block l; before that its state
    equals the corrupted run's and costs nothing. Active rows attend to the cached prefix, shared by
    expand(). Rows patched at block i get z̄ - z added to their head, z being the recorded value,
    so z becomes z̄ up to float rounding (the same block recomputes the same z from the same input)."""
    L, H = model.n_layers, model.config.num_attention_heads
    heads, dev = sorted(heads), model_device(model)
    layers = torch.tensor([l for l, _ in heads], device=dev)
    hs = torch.tensor([h for _, h in heads], device=dev)
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
            edit = Intervention(pos=torch.full((n,), state["start"], device=dev),
                                add_z={i: (torch.arange(H, device=dev), delta)})
        # (n, G, T-1, D) views of the one prefix; the block's cache.update copies them once
        cache.k[i] = state["past_k"][i].expand(n, -1, -1, -1)
        cache.v[i] = state["past_v"][i].expand(n, -1, -1, -1)
        x[:n] = model.model.layers[i](x[:n], state["rope"], state["mask"], cache, i, edit, state["start"])
        cache.k[i] = cache.v[i] = None                                      # free this layer's copy
    logits = lm_head_fp32(model, model.model.norm(x))                       # (N, U, V)
    return _metric(logits, answer, effect)


@torch.no_grad()
def _steered_logits(model, state: dict, layers: list[int], vecs: torch.Tensor) -> torch.Tensor:
    """Logits (N, U, V) at the suffix with vecs[n] [C] added to the residual stream after block
    layers[n] at the last prompt token: the same as a full forward with Intervention(add_resid=...),
    but each row only recomputes the suffix from block layers[n] + 1 upward, on the cached prefix.
    `layers` must be sorted (rows join the batch in order, as in _patched_metrics)."""
    L = model.n_layers
    assert layers == sorted(layers)
    lay = torch.tensor(layers, device=model_device(model))
    vecs = vecs.to(lay.device)
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
    return lm_head_fp32(model, model.model.norm(x))                         # (N, U, V)


@torch.no_grad()
def aie_exact(model, prompts: list[Prompt], z_mean, *, effect="prob", max_rows=512, progress=True,
              heads: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Exact AIE (same numbers as aie_naive) at a fraction of its cost: see _patched_metrics."""
    L, H = model.n_layers, model.config.num_attention_heads
    heads = sorted(heads or [(l, h) for l in range(L) for h in range(H)])
    z_mean = z_mean.to(model_device(model))
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
    dev = model_device(model)
    z_mean = z_mean.to(dev)
    total = torch.zeros(L, H, dtype=torch.float64)
    for i in tqdm(range(0, len(prompts), batch_size), desc="AIE attribution", disable=not progress,
                  leave=False):
        batch = prompts[i:i + batch_size]
        seqs = [p.ids + suffix_ids(p, effect)[1:] for p in batch]
        idx, pad_mask = pad_left(seqs, dev)
        last = torch.tensor([idx.shape[1] - len(s) + len(p.ids) - 1 for s, p in zip(seqs, batch)],
                            device=dev)                                                         # (B)
        zeros = [torch.zeros(len(batch), H, D, device=dev, requires_grad=True) for _ in range(L)]
        edit = Intervention(pos=last, record_z=tuple(range(L)),
                            add_z={l: (torch.arange(H, device=dev), zeros[l]) for l in range(L)})
        with torch.enable_grad():
            hidden = model(idx, pad_mask=pad_mask, intervention=edit, return_hidden=True)
            # rows are independent, so the gradient of the sum is each row's own gradient
            at = [last[r] + torch.arange(len(suffix_ids(p, effect)), device=dev) for r, p in enumerate(batch)]
            m = sum(_metric(lm_head_fp32(model, hidden[r, at[r]])[None], p.answer, effect)[0]
                    for r, p in enumerate(batch))
            grads = torch.autograd.grad(m, zeros)
        for l in range(L):
            dz = z_mean[l][None] - edit.z[l][:, 0].detach().float()           # (B, H, D)
            total[l] += (grads[l].float() * dz).sum((0, 2)).double().cpu()
    return (total / len(prompts)).float()


# ---- From AIE to the IV --------------------------------------------------------------------------
def top_heads(aie: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k heads with the largest AIE, best first, as (layer, head)."""
    H = aie.shape[1]
    idx = aie.flatten().topk(k).indices.tolist()
    return [(i // H, i % H) for i in idx]


@torch.no_grad()
def build_iv(model, z_mean, heads) -> torch.Tensor:
    """θ = Σ_(l,h) W_O^(l)[:, slice h] z̄_lh: each head's mean through its own slice of the output
    projection, summed, with no o_proj bias (Todd's GPT-2 code adds the bias once per head: a bug)."""
    w = model.lm_head.weight
    iv = torch.zeros(model.config.hidden_size, dtype=torch.float32, device=w.device)
    for l, h in heads:
        iv += model.head_contributions(l, z_mean[l].to(w.device, w.dtype))[h].float()
    return iv.cpu()           # a result, like a loaded IV: on the CPU (users move it where they add it)


# ---- The pipeline --------------------------------------------------------------------------------
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
    order = sorted(range(len(picked)),
                   key=lambda j: (not bool(scores["top1"][j]), -float(scores["logprob"][j])))
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
            "corrupted_p_first": cor_p_first, "clean_top1_all": float(scores["top1"].float().mean()),
            "effect_used": effect, "mismatch_task": other.name if other is not None else None,
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


# ---- Choosing layer and K on the dev split -------------------------------------------------------
@torch.no_grad()
def sweep(model, tok, task, med: dict, s: Settings, *, progress=True, kinds=("heads",),
          k_grid=K_GRID) -> dict:
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
    rows = sorted([(v, l) for v in range(len(variants)) for l in range(L)], key=lambda r: r[1])
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
    out_rows = [{"kind": kind, "k": k, "layer": l, "logprob": float(lp[v, l] / n),
                 "top1": float(top1[v, l] / n)} for v, (kind, k, _) in enumerate(variants) for l in range(L)]
    for r in out_rows:
        r["restored_logprob"] = restored(r["logprob"], k0["logprob"], c["logprob"])
        r["accuracy_gain"] = r["top1"] - k0["top1"]
    return {"task": task.name, "clean": c, "corrupted": k0, "rows": out_rows, "n": n}


def best_row(sw: dict, kind: str | None = None) -> dict:
    """The sweep's choice: the largest restored share of the log-P gap (continuous, so far less noisy
    on a small dev split than accuracy), ties to the smaller K and the earlier layer."""
    rows = [r for r in sw["rows"] if kind is None or r["kind"] == kind]
    return max(rows, key=lambda r: (r["restored_logprob"], -(r["k"] or 0), -r["layer"]))


# ---- Extraction, and the cached entry point ------------------------------------------------------
def extract_iv(model, tok, task, *, model_id: str | None = None, progress=True, **settings) -> dict:
    """-> dict(iv [C], aie [L, H], heads [(l, h)] best first, layer, z_mean [L, H, D], meta, and
    with layer="auto" the sweep; then the kind too (ivcheck.choose_kind: a second call does nothing),
    its advice in meta["advice"]). task: a tasks.Task or its name; settings: the fields of Settings."""
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
    meta = iv_meta(model, task, key, s, heads, med["info"], model_id)
    out = {"iv": iv, "aie": med["aie"], "heads": heads, "layer": s.layer, "z_mean": med["z_mean"],
           "resid_diff": med["resid_diff"], "meta": meta}
    if sw is not None:         # the other kind, where it restores clearly more on the dev split
        out, advice = choose_kind(model, tok, task, {**out, "sweep": sw}, s, sweep=sweep, best_row=best_row,
                                  make_iv=make_iv, k_grid=K_GRID, progress=progress)
        out["meta"]["advice"] = advice
    return out


def extract_universal(model, tok, tasks, *, model_id: str | None = None, progress=True, **settings) -> dict:
    """One head set for all tasks (FvForgetting's practice): AIE averaged over the tasks, top-K of
    that, then each task's IV from its own z̄ through the shared heads. -> {task name: result}."""
    tasks = [load_task_by_name(t) if isinstance(t, str) else t for t in tasks]
    s = Settings(**settings).resolve(model)
    if s.layer == "auto" or s.kind != "heads":
        raise ExtractError("--universal shares a head set: it needs --kind heads and a fixed --layer")
    meds = {t.name: mediation(model, tok, t, s, progress)
            for t in tqdm(tasks, desc="tasks", disable=not progress)}
    aie = torch.stack([m["aie"] for m in meds.values()]).mean(0)
    heads = top_heads(aie, s.top_k)
    names, by_name = list(meds), {t.name: t for t in tasks}
    return {n: {"iv": build_iv(model, m["z_mean"], heads), "aie": aie, "aie_task": m["aie"],
                "heads": heads, "layer": s.layer, "z_mean": m["z_mean"],
                "meta": iv_meta(model, by_name[n], s.key(), s, heads, m["info"], model_id, universal=names)}
            for n, m in meds.items()}


def get_iv(model, tok, task, cache_path=None, *, model_id: str | None = None, progress=True,
           **settings) -> dict:
    """The IV for `task` (a name or a tasks.Task): loaded from cache_path when that file was made
    from these very weights, the same task data and the same settings, else extracted and saved
    there. cache_path None: ivs/<model_id>/<iv_filename(task)>. A heads IV cached for one layer
    serves every layer (Settings.key): r["layer"] is then the layer asked for. A fresh IV's
    meta["advice"]: what it can do on the dev split (ivft.ivcheck.dev_advice), for training_ivs."""
    task = load_task_by_name(task) if isinstance(task, str) else task
    s = Settings(**settings).resolve(model)
    path = Path(cache_path if cache_path is not None
                else Path("ivs") / (model_id or "model") / iv_filename(task))
    chat = hasattr(tok, "render_chat")     # a tokenizer without a chat template is never trained on
    if (r := cached_iv(path, task, s.key(), model)) is not None:
        r["layer"] = s.layer if s.layer != "auto" else r["layer"]
        if "state_norms" in r["meta"] or not chat:
            return r
    else:
        r = extract_iv(model, tok, task, model_id=model_id, progress=progress, **settings)
    if "advice" not in r["meta"]:      # (layer "auto" has choose_kind's) the cheap verdict, no sweep: three
        # scoring passes over the <= n_dev dev examples, about a third of the mediation's clean pass
        r["meta"]["advice"] = dev_advice(model, tok, task, r, s)
    if chat:        # one pass (an older cached file gets them too) over the chat prompts train.py trains on
        r["meta"]["state_norms"] = state_norms(model, tok, task)
    save_iv(r, path)
    return r


def training_ivs(model, tok, tasks, *, iv_dir, model_id: str, files: dict | None = None,
                 layer: int | None = None, norm_ratio: float = 0.0, progress=True, **settings) -> dict:
    """train.py's IVs: -> {task name: (iv (C,), injection layer, meta)} for every training task, from
    the model before any training: cached under iv_dir/<model_id>/ (get_iv), or files[task name]
    (--iv_file). layer: where the IVs are added (None = each IV's own): a use-time choice, checked
    here, that never changes which IV is extracted; so is norm_ratio (> 0: the IV rescaled to that
    fraction of the hidden-state norm at its layer). Each IV's stored advice is printed (training_lines)."""
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
            raise ExtractError(f"{where}: shape {tuple(iv.shape)}, the model needs "
                               f"({model.config.hidden_size},)")
        for line in training_lines(task, meta.get("advice") or []):
            print(line)
        if norm_ratio > 0 and "state_norms" not in meta:      # an --iv_file of an older version
            meta = {**meta, "state_norms": state_norms(model, tok, task)}
        out[task.name] = (scale_to_state(iv.detach().float().cpu(), meta, use, norm_ratio, where), use, meta)
    return out


# ---- Command line --------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Extract instruction vectors by causal mediation over heads.")
    arg = ap.add_argument_group("task and files").add_argument
    arg("--task", help="registry task name (see tasks.list_tasks()) or a task file / folder")
    arg("--universal", nargs="+", metavar="TASK", help="one head set from the AIE averaged over these tasks")
    arg("--out", help="IV file (default ivs/<model-tag>/<task>.safetensors, for a file task "
        "<name>-<data hash>.safetensors); with --universal a directory")
    arg("--model", help="a .gguf file or HF directory (default: embedded SmolLM2-135M-Instruct)")
    arg("--chat_template", metavar="FILE", help=chat.FLAG_HELP)
    arg("--reuse", action="store_true", help="load --out instead when it matches model, data and settings")
    arg = ap.add_argument_group("prompts").add_argument
    arg("--n_clean", type=int, default=50, help="clean prompts averaged into the mean head outputs")
    arg("--n_corrupt", type=int, default=25, help="corrupted prompts averaged into the AIE")
    arg("--n_dev", type=int, default=32, help="training examples held out for --sweep / --layer auto")
    arg("--shots", type=int, default=10, help="demonstrations per clean prompt, each with the instruction")
    arg("--format", default="plain", choices=FORMATS,
        help="plain: 'Q: ...\\nA: ...' text (the model answers with the answer); chat: chat turns")
    arg("--corrupt", default="query_only", choices=CORRUPTIONS,
        help="query_only: the input alone, zero-shot; shuffled: demonstrations with permuted answers; "
             "mismatched: another task's instruction")
    arg("--mismatch_task", help="task lending its instruction to --corrupt mismatched")
    arg("--seed", type=int, default=0, help="example selection seed")
    arg = ap.add_argument_group("mediation and the vector").add_argument
    arg("--method", default="exact", choices=METHODS,
        help="exact: fast patching; attribution: gradient estimate; naive: Todd's full-forward loop")
    arg("--effect", default="auto", choices=EFFECTS,
        help=f"prob: P(first answer token); logprob: log P(answer); auto: prob where the clean prompts "
             f"give the first token >= {AUTO_PROB_MIN} more mean probability than the corrupted ones, "
             f"else logprob")
    arg("--kind", default="heads", choices=KINDS,
        help="heads: top-K heads' mean outputs through W_O (the paper's IV); resid: mean residual stream "
             "after --layer, clean minus corrupted")
    arg("--top_k", type=int, default=None, help="heads in the IV (default: 40 per 270 heads, at least 3)")
    arg("--layer", type=layer_arg, default=None,
        help="block after which the IV is added (default: 0.57 of the depth); 'auto': the best layer and "
             "K on the dev split, and the other --kind where it restores clearly more and the IV so "
             "chosen restores little")
    arg = ap.add_argument_group("measurement").add_argument
    arg("--check", action="store_true",
        help="score held-out test prompts: clean, query alone, query alone + IV")
    arg("--n_check", type=int, default=50, help="held-out test examples for --check")
    arg("--report", help="with --check: write the check as JSON here")
    arg("--sweep", action="store_true", help="print restored shares per layer x K on the dev split (heads "
        "and resid) and plot them beside the IV file (<out>.sweep.png, with matplotlib)")
    arg = add_device_flags(ap.add_argument_group("system")).add_argument
    arg("--batch_size", type=int, default=16, help="prompts per forward")
    arg("--max_rows", type=int, default=512, help="patched rows per batch (exact method and sweep)")
    arg("--threads", type=int, default=None, help="torch CPU threads")
    arg("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if (args.task is None) == (args.universal is None):
        ap.error("give exactly one of --task or --universal")
    for flag, v in (("--n_check", args.n_check), ("--threads", args.threads)):
        if v is not None and v < 1:
            ap.error(f"{flag} {v}: must be >= 1")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    device, amp, weights = resolve_precision(args, ExtractError)
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}   # Settings' flags
    Settings(**settings)                                      # bad settings fail before the slow load
    tasks = [load_task_by_name(n) for n in args.universal or [args.task]]
    task, tag = tasks[0], model_tag(args.model)      # --task's, or --universal's first
    out = iv_out_path(args.out, tag, None if args.universal else task)   # checked before the slow load:
    check_outputs(out, bool(args.universal), "--out" if args.out else "IV file", args.report)
    try:
        model, tok = load_model(args.model, dtype=weights, device=device, chat_template=args.chat_template)
    except LoadError as e:
        raise ExtractError(str(e)) from None
    model.eval()
    with autocast(amp, device.type):
        return _extract_and_report(args, model, tok, tasks, task, tag, out, settings)


def _extract_and_report(args, model, tok, tasks, task, tag, out, settings) -> int:
    s = Settings(**settings).resolve(model)
    print("config:", json.dumps({"model": tag, "tasks": [t.name for t in tasks], **dataclasses.asdict(s), "device":
                                 str(model_device(model)), "dtype": args.dtype, "model_dtype": args.model_dtype}))
    progress = not args.quiet
    if args.universal:
        results = extract_universal(model, tok, tasks, model_id=tag, progress=progress, **settings)
        for name, r in results.items():
            r["path"] = written(out / f"{name}.safetensors", save_iv, r, out / f"{name}.safetensors")
    else:
        r = (written(out, get_iv, model, tok, task, out, model_id=tag, progress=progress, **settings)
             if args.reuse else extract_iv(model, tok, task, model_id=tag, progress=progress, **settings))
        if not r.get("reused"):
            for line in r["meta"]["advice"] if s.layer == "auto" else []:    # what choose_kind found
                print(line)
            written(out, save_iv, r, out)
        r["path"] = out
        results = {task.name: r}
    for name, r in results.items():
        print(format_iv(name, r))
    r = results[task.name]                           # --sweep and --check work on one task
    sw = r.get("sweep_all")                          # choose_kind's, where it ran one
    if args.sweep:
        sw = sw or sweep_all(model, tok, task, r, s, sweep=sweep, k_grid=K_GRID, progress=progress)
        print(format_sweep(sw, best_row(sw)))
        if png := written(out.with_suffix(".sweep.png"), plot_sweep, sw, out.with_suffix(".sweep.png")):
            print(f"sweep plot -> {png}")
    if args.check:
        res = check_iv(model, tok, task, r["iv"], r["layer"], n=args.n_check, settings=settings,
                       progress=progress)
        print(format_check(res))
        numbers = (res["clean"]["top1"], res["corrupted"]["top1"], res["iv"]["top1"],
                   res["restored_accuracy"])
        lines, sw = swept_advice(model, tok, task, r, s, numbers, where="held-out test examples", sw=sw,
                                 sweep=sweep, best_row=best_row, k_grid=K_GRID, progress=progress)
        for line in lines:
            print(line)
        if args.report:
            written(Path(args.report), save_report, check_report(res, r, task.name, lines, sw), args.report)
            print(f"report -> {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
