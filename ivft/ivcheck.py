"""Measuring an IV rather than extracting it: on held-out test examples, how much of what the
demonstrations give does the IV bring back (check_iv, extract_iv.py --check, experiments/iv_check.py)?
Also the restored share that extract_iv's sweep ranks layers and K by, greedy replies, a rank
correlation for comparing two AIE maps, and the advice on what an IV can carry (with extract_iv's
dev sweep, passed in, where it restores little; --layer auto's choice of kind)."""
from __future__ import annotations

import dataclasses
import math
import random

import torch
from tqdm import tqdm

from ivft.engine import greedy_replies, model_device
from ivft.ivprompts import (Prompt, chat_prompt, clean_prompts, load_task_by_name, render, score_prompts,
                            split_train, stop_ids)
from ivft.errors import ExtractError
from ivft.ivfile import is_registered
from ivft.ivsettings import KINDS, MIN_PROMPTS, Settings
from model import Intervention


# ---------------------------------------------------------------------------------------------
# The restored share of a gap

def restored(x_iv: float, x_cor: float, x_clean: float) -> float:
    """The share of the clean - corrupted gap that the IV closes (nan for no gap)."""
    gap = x_clean - x_cor
    return (x_iv - x_cor) / gap if gap else float("nan")


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


# ---------------------------------------------------------------------------------------------
# The check: on held-out test examples, does the IV bring back what the demonstrations give?

def replies(model, tok, prompts: list[Prompt], s: Settings, add=None, batch_size=16) -> dict:
    """Greedy replies and their verdicts by evaluate.py's path (engine.greedy_replies: the same
    budgets, early stop and scoring), so the check and evaluate give one model and one example one
    score. The IV, if any (add = (layer, vector)), is added at the last prompt token in the prefill.
    -> {"text": [reply], "exact_match": [1.0 / 0.0], "reply_contains": [1.0 / 0.0]}"""
    edit = Intervention(add_resid={add[0]: add[1].to(model_device(model))}) if add else None
    return greedy_replies(model, tok, [p.ids for p in prompts], [p.answer for p in prompts],
                          [p.text for p in prompts], stop_ids=stop_ids(tok, s), intervention=edit,
                          batch_size=batch_size)


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
        conds["chat"] = ([chat_prompt(tok, ex) for ex in examples], None)
        conds["chat_iv"] = (conds["chat"][0], (layer, iv))
    res, raw = {}, {}
    for name, (prompts, add) in tqdm(conds.items(), desc="check", disable=not progress, leave=False):
        scores = score_prompts(model, prompts, add=add, batch_size=s.batch_size)
        raw[name] = scores
        res[name] = {"top1": float(scores["top1"].float().mean()), "p_first": float(scores["p_first"].mean()),
                     "logprob": float(scores["logprob"].mean())}
        if generate:
            form = dataclasses.replace(s, format="chat") if name.startswith("chat") else s
            reps = replies(model, tok, prompts, form, add, batch_size=s.batch_size)
            res[name]["exact"] = sum(reps["exact_match"]) / len(examples)
            res[name]["contains"] = sum(reps["reply_contains"]) / len(examples)
            res[name]["examples"] = [[ex.input, ex.output, r] for ex, r in zip(examples[:3], reps["text"])]
    for metric, key in (("logprob", "logprob"), ("accuracy", "top1")):
        c, k, v = (raw[x][key].float() for x in ("clean", "corrupted", "iv"))
        res[f"restored_{metric}"], res[f"gap_{metric}"] = gap_or_none(c, k, v)
    res.update(n=len(examples), layer=layer)
    return res


def check_report(res: dict, r: dict, task_name: str, advice: list[str] | None = None,
                 sweep: dict | None = None) -> dict:
    """The check as flat JSON (extract_iv.py --report): the IV's identity, then the scores, then
    (where given) the advice lines and the dev sweep behind them."""
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
    if advice is not None:
        out["advice"] = advice
    if sweep is not None:
        out["sweep"] = sweep
    return out


# ---------------------------------------------------------------------------------------------
# Comparing two AIE maps (attribution against exact, two extractions of one task)

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
# What the IV can carry on this task: advice from the check's numbers (extract_iv.py --check and
# extract_iv.advise). Accuracies are first-token accuracies, restored shares those of check_iv.

# Below this clean first-token accuracy (k-shot, each demonstration with the instruction) the model
# does not do the task even in context, and z̄ averages mostly wrong answers: no vector can carry what
# the demonstrations do not make the model do. 0.3: under every project task whose IV carries it on
# SmolLM2-135M (the lowest, acronym: clean 0.38, 0.84 of its gap restored; results/iv_check.json), and
# clear of chance for a free-form answer; at 50 check examples its standard error is about 0.065.
CLEAN_ACCURACY_MIN = 0.3
# Below this share of the clean - query-alone accuracy gap brought back, the IV "restores little":
# it gives less than half of what the demonstrations give. Of the project's tasks, 7 of 10 restore
# 0.68-0.91 of it; comparative 0.45, capital (recall) and uppercase about 0.2 (results/iv_check.json).
RESTORED_ACCURACY_MIN = 0.5
# A setting of the dev-split sweep is suggested only when it restores at least this much more of the
# log-P gap than the IV's own: dev splits hold 7-32 examples, and neighbouring layers of one K already
# differ by about 0.05 (results/iv_layers.json).
SWEEP_MARGIN = 0.1
RESTORES_LITTLE = "advice: the IV restores little"     # how the "little" verdict's line starts


def iv_verdict(clean_accuracy: float, restored_accuracy: float | None) -> str | None:
    """"cannot": the model does not do the task even in context; "little": the clean prompts work but
    the IV restores under RESTORED_ACCURACY_MIN of the gap; None: neither (also when the gap is within
    noise, restored_accuracy None: the query alone does about as well, nothing is left to restore)."""
    if clean_accuracy < CLEAN_ACCURACY_MIN:
        return "cannot"
    if restored_accuracy is not None and restored_accuracy < RESTORED_ACCURACY_MIN:
        return "little"
    return None


def setting_flags(row: dict) -> str:
    """A sweep row (extract_iv.sweep) as the extract_iv.py flags that build that IV."""
    if row["kind"] == "resid":
        return f"--kind resid --layer {row['layer']}"
    return f"--kind heads --layer {row['layer']} --top_k {row['k']}"


def iv_advice(clean_accuracy: float, corrupted_accuracy: float, iv_accuracy: float,
              restored_accuracy: float | None, *, current: dict | None = None, best: dict | None = None,
              chosen: bool = False, where: str = "held-out test examples") -> list[str]:
    """Zero, one or two lines saying what the IV can do on the task. current, best: the dev sweep's
    rows for the IV's own setting and for the best one (extract_iv.best_row), given when the verdict
    is "little"; they add the line that says whether the layer, K or kind is what limits it, and
    which setting to use (chosen: it has already been used, under --layer auto). where: what the
    accuracies were measured on."""
    verdict = iv_verdict(clean_accuracy, restored_accuracy)
    if verdict == "cannot":
        return [f"advice: the model does not do this task even in context (clean first-token accuracy on "
                f"the {where} {clean_accuracy:.2f} < {CLEAN_ACCURACY_MIN}): no vector can carry what the "
                f"model cannot do; guidance by this IV will not help"]
    if verdict is None:
        return []
    lines = [f"{RESTORES_LITTLE} although the clean prompts work (first-token accuracy on "
             f"the {where}: clean {clean_accuracy:.2f}, query alone {corrupted_accuracy:.2f}, query alone + "
             f"IV {iv_accuracy:.2f}: {restored_accuracy:.2f} of the gap < {RESTORED_ACCURACY_MIN})"]
    if current is None or best is None:
        return lines
    def said(r):
        return (f"{r['restored_logprob']:.2f} of the log-P gap "
                f"(first-token accuracy {r['accuracy_gain']:+.2f})")
    if best["restored_logprob"] - current["restored_logprob"] >= SWEEP_MARGIN:
        lines.append(f"advice: on the dev split {setting_flags(best)} restores {said(best)}, the IV's own "
                     f"setting ({setting_flags(current)}) {said(current)}: "
                     + ("chosen (--layer auto)" if chosen else f"rerun with {setting_flags(best)}"))
    else:
        lines.append(f"advice: on the dev split no layer, K or kind restores clearly more (best: "
                     f"{setting_flags(best)}, {said(best)}; the IV's own {said(current)}): what limits it is "
                     f"the model, not the setting")
    return lines


@torch.no_grad()
def dev_accuracy(model, tok, task, iv, layer, s: Settings) -> tuple[float, float, float, float | None] | None:
    """First-token accuracy on the dev split (extract_iv's sweep split, with the sweep's
    demonstrations): clean, query alone, query alone + IV after block `layer`, and the restored
    share of that gap (None within noise). None when the dev split is too small to say."""
    pool_ex, dev = split_train(task, s)
    if len(dev) < MIN_PROMPTS:
        return None
    rng = random.Random(s.seed + 2)           # extract_iv.sweep's seed: its rows and these numbers agree
    clean = score_prompts(model, clean_prompts(tok, task, dev, s, rng, pool=pool_ex), batch_size=s.batch_size)
    query = [render(tok, ex, s, with_instruction=False) for ex in dev]
    cor = score_prompts(model, query, batch_size=s.batch_size)
    with_iv = score_prompts(model, query, add=(layer, iv), batch_size=s.batch_size)
    c, k, v = (x["top1"].float() for x in (clean, cor, with_iv))
    return float(c.mean()), float(k.mean()), float(v.mean()), gap_or_none(c, k, v)[0]


# ---------------------------------------------------------------------------------------------
# The advice with the dev sweep behind it (extract_iv.py --check, --layer auto), and the cheap one
# without (an IV file's meta["advice"], printed by extract_iv.training_ivs). The sweep, its best_row,
# K grid and make_iv are extract_iv.py's, passed in: the library never imports the scripts.

def sweep_all(model, tok, task, r: dict, s: Settings, *, sweep, k_grid, progress=True) -> dict:
    """The dev sweep (extract_iv.sweep) over layers, K (k_grid plus the IV's own) and both kinds, for
    the IV r (an extraction's result, or read_iv of its file)."""
    own_k = r["meta"].get("top_k") if r["meta"].get("kind") == "heads" else None
    med = {"aie": r["aie"], "z_mean": r["z_mean"], "resid_diff": r.get("resid_diff")}
    kinds = KINDS if med["resid_diff"] is not None else ("heads",)   # an older file may lack resid_diff
    return sweep(model, tok, task, med, s, progress=progress, kinds=kinds,
                 k_grid=tuple(sorted(set(k_grid) | ({own_k} if own_k else set()))))


def own_row(sw: dict, r: dict) -> dict | None:
    """The sweep's row for the IV's own kind, K and layer."""
    kind, k = r["meta"].get("kind"), r["meta"].get("top_k")
    return next((row for row in sw["rows"] if row["kind"] == kind and row["layer"] == r["layer"]
                 and (kind == "resid" or row["k"] == k)), None)


def swept_advice(model, tok, task, r: dict, s: Settings, numbers, *, where: str, sweep=None,
                 best_row=None, k_grid=(), sw=None, chosen=False,
                 progress=True) -> tuple[list[str], dict | None]:
    """-> (iv_advice's lines for numbers = (clean, corrupted, +IV accuracy, restored share), the sweep
    or None). Only where the IV restores little does the dev sweep run (sweep_all, unless sw is given;
    never without `sweep`), to say whether the layer, K or kind limits it."""
    if (iv_verdict(numbers[0], numbers[3]) != "little" or sweep is None
            or len(split_train(task, s)[1]) < MIN_PROMPTS):
        return iv_advice(*numbers, where=where), sw
    sw = sw or sweep_all(model, tok, task, r, s, sweep=sweep, k_grid=k_grid, progress=progress)
    return iv_advice(*numbers, current=own_row(sw, r), best=best_row(sw), chosen=chosen, where=where), sw


def dev_advice(model, tok, task, r: dict, s: Settings, *, sweep=None, best_row=None, k_grid=(),
               progress=True) -> list[str]:
    """What the IV r can do on `task`, measured on the dev split: zero, one or two iv_advice lines.
    Without `sweep`, the cheap verdict: three scoring passes over the dev split (dev_accuracy)."""
    numbers = dev_accuracy(model, tok, task, r["iv"], r["layer"], s)
    if numbers is None:      # no dev split to measure on: the clean accuracy of the extraction's prompts
        return iv_advice(r["meta"].get("clean_top1_all", 1.0), float("nan"), float("nan"), None,
                         where="extraction's training examples")
    return swept_advice(model, tok, task, r, s, numbers, where="dev split", sweep=sweep,
                        best_row=best_row, k_grid=k_grid, progress=progress)[0]


def choose_kind(model, tok, task, r: dict, s: Settings, *, sweep, best_row, make_iv, k_grid,
                progress=True) -> tuple[dict, list[str]]:
    """layer "auto" chooses the layer and K on the dev split, for the kind asked for; where the IV so
    chosen restores little there although the clean prompts work, both kinds are swept and the best
    setting is taken when it restores SWEEP_MARGIN more of the log-P gap. -> (r, possibly rebuilt by
    make_iv(model, mediation, kind, layer, k); the advice lines). The cache key stays the settings as
    asked for; meta["chosen_by_sweep"]["kind"] marks the choice as made, so a second call does nothing."""
    chosen = r["meta"].get("chosen_by_sweep") or {}
    if "kind" in chosen:
        return r, []
    numbers = dev_accuracy(model, tok, task, r["iv"], r["layer"], s)
    lines, sw = ([], None) if numbers is None else swept_advice(
        model, tok, task, r, s, numbers, where="dev split", sweep=sweep, best_row=best_row, k_grid=k_grid,
        chosen=True, progress=progress)
    b, own = (best_row(sw), own_row(sw, r)) if sw is not None else (None, None)
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


def training_lines(task, advice: list[str]) -> list[str]:
    """An IV's stored advice (meta["advice"]) as train.py says it, each line naming the task; where the
    IV restores little and no sweep has said why, one more line with the command that runs it."""
    lines = [f"IV of {task.name}: {line}" for line in advice]
    if len(advice) == 1 and advice[0].startswith(RESTORES_LITTLE):
        name = task.name if is_registered(task) else "<its task file>"
        lines.append(f"IV of {task.name}: `python extract_iv.py --task {name} --check` sweeps layers, K "
                     f"and kinds on the dev split and says whether another setting restores more")
    return lines
