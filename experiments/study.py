"""
The study of issue #6 on the embedded model, end to end and resumable:

    python experiments/study.py            # runs what is missing, then writes the report
    python experiments/study.py --report   # only rebuild results/study.md, study.json and plots

1. Continual instruction tuning on the default sequence with four methods x three seeds:
   plain fine-tuning, KL-only (KL to the original model, no IV), IV-only (progressive IV
   intervention, no KL) and IV-guided (both). Every run is one `train.py` process.
2. Knowledge vs instruction (docs/method.md §1): the general suite's knowledge_logprob and
   instruction_logprob after every stage, from the runs' own stage reports.
3. IV analyses (docs/method.md §3) on the plain and guided seed-0 runs: cosine between the last-prompt-token
   hidden state after layer l and the task's IV vs the task's score along the stages; IVs re-extracted
   from the fine-tuned model vs the original ones (cosine, head overlap; noise floor: the original
   model's IVs extracted again from other prompts); the original IV added back
   into the fine-tuned model and the share of the lost score it recovers; the general suite's replies
   along the stages scored with and without case (format overlay or lost content?).
4. Sensitivity of guided training to lambda, layer l and alpha0 (one seed).

Size: 160 training examples per task (20 steps of 8), 20 test examples per task and stage, chosen for
a 2-core CPU with two 1-thread workers: the 12 method runs and the analyses took 106 minutes, the 6 grid
runs 75 more (measured with other work sharing the machine). Everything lands in
runs/study/ (checkpoints, logs; not in git) and results/ (raw JSON, report, plots). A run that was cut
off resumes from its last checkpoint (train.py --resume); a finished one is skipped. Larger runs:
change the SIZE flags below (and delete runs/study) - nothing else depends on them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = ROOT / "runs" / "study"
OUT = ROOT / "results"
RAW = OUT / "study"                       # raw JSON per run and analysis, plots
SEEDS = (0, 1, 2)
SIZE = ["--max_train", "160", "--lr", "1e-4", "--eval_n", "20", "--eval_k_shot", "3"]
METHODS = {                                # docs/method.md §4 and the baselines of issue #5
    "plain": [],
    "kl_only": ["--kl_weight", "1", "--no-kl_iv"],
    "iv_only": ["--iv_alpha0", "1"],
    "guided": ["--guided"],
}
GRID = {                                   # one knob at a time around the guided defaults (λ=1, l=9, α0=1),
    "guided_lambda3": ["--guided", "--kl_weight", "3"],       # in the order they run: each knob once
    "guided_layer14": ["--guided", "--iv_layer", "14"],       # before any gets its second value
    "guided_alpha2": ["--guided", "--iv_alpha0", "2"],
    "guided_lambda0.3": ["--guided", "--kl_weight", "0.3"],
    "guided_layer5": ["--guided", "--iv_layer", "5"],
    "guided_alpha0.5": ["--guided", "--iv_alpha0", "0.5"],
}
KEEP_CHECKPOINTS = {"plain-s0", "guided-s0"}   # the IV analyses read their stage checkpoints
# IVs of the general tasks for the analyses: fewer prompts than training's IVs (100 / 25), the same
# settings for the original and the fine-tuned model so that the two are comparable
ANALYSIS_IV = {"n_clean": 50, "n_corrupt": 16}
N_ANALYSIS = 20                            # test examples per task in the analyses
ALPHAS = (1.0, 4.0)                        # IV add-back strengths, both reported (no choosing on test)


def run_names() -> list[str]:
    names = [f"{m}-s{s}" for s in SEEDS for m in METHODS]
    return names + [f"{g}-s0" for g in GRID]


def run_flags(name: str) -> list[str]:
    method, seed = name.rsplit("-s", 1)
    flags = METHODS.get(method, GRID.get(method))
    return [*SIZE, *flags, "--seed", seed]


def finished(name: str) -> bool:
    p = RUNS / name / "results.json"
    if not p.is_file():
        return False
    r = json.loads(p.read_text())
    return len(r.get("stages", [])) == 1 + len(r["cl"]["train_tasks"]) if r.get("cl") else False


def do_run(name: str, threads: int) -> str:
    d = RUNS / name
    if finished(name):
        return f"{name}: done before"
    has_ckpt = d.is_dir() and any(d.glob("stage-*")) or (d / "last").exists()
    cmd = [sys.executable, str(ROOT / "train.py"), "--out_dir", str(d), *run_flags(name),
           "--num_threads", str(threads), "--stage0_cache", str(RUNS / "stage0.json"), "--log_every", "5",
           "--resume" if has_ckpt else "--overwrite"]
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(d / "stdout.txt", "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        return f"{name}: FAILED (exit {rc}; see {d / 'stdout.txt'})"
    RAW.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "results.json", RAW / f"run_{name}.json")
    if name not in KEEP_CHECKPOINTS:            # 0.5 GB per stage; the numbers are in results.json
        for c in d.glob("stage-*"):
            shutil.rmtree(c, ignore_errors=True)
    return f"{name}: {time.time() - t0:.0f} s"


# ---------------------------------------------------------------------------------------------
# IV analyses (run in a worker process of their own: `study.py --job analysis`)

def analysis(threads: int) -> str:
    import torch
    import evaluate as E
    import extract_iv as X
    from ivft import tasks as T
    from ivft.prompts import normalize_answer, reply_contains
    from ivft.report import save_report
    from ivft.ivcheck import replies as greedy_replies
    from ivft.ivfile import model_tag
    from ivft.ivprompts import chat_prompt, pad_left, score_prompts
    from ivft.ivsettings import Settings
    from ivft.load import load_model
    from model import Intervention

    torch.set_num_threads(threads)
    out_path = RAW / "analysis.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}

    def save():
        RAW.mkdir(parents=True, exist_ok=True)
        save_report(res, out_path)

    train_names = T.default_sequence()
    general = list(T.general_suite())
    orig, tok = load_model(None)
    ivdir = RAW / "ivs"

    def iv_for(model, name, tag, **settings):
        return X.get_iv(model, tok, name, ivdir / tag / f"{name}.safetensors", model_id=tag, progress=False,
                        **settings)

    # IVs of the original model: the training tasks' are train.py's (ivs/, 50 clean / 25 corrupted
    # prompts), the general tasks' are made here
    train_iv = {n: X.get_iv(orig, tok, n, ROOT / "ivs" / model_tag(None) / f"{n}.safetensors", progress=False,
                            method="exact", n_clean=50, n_corrupt=25) for n in train_names}
    gen_iv = {n: iv_for(orig, n, "original", **ANALYSIS_IV) for n in general}
    layer = next(iter(train_iv.values()))["layer"]

    @torch.no_grad()
    def last_hidden(model, task, n):
        """Mean over n test prompts of cos(h after block `layer` at the last prompt token, task IV)."""
        iv = (train_iv | gen_iv)[task.name]["iv"]
        prompts = [chat_prompt(tok, ex) for ex in task.test[:n]]
        cos = []
        for i in range(0, len(prompts), 16):
            idx, mask = pad_left([p.ids for p in prompts[i:i + 16]])
            rec = Intervention(pos=torch.full((idx.shape[0],), idx.shape[1] - 1), record_resid=(layer,))
            model(idx, pad_mask=mask, intervention=rec, return_hidden=True)
            h = rec.resid[layer][:, 0].float()                                      # (B, C)
            cos += torch.nn.functional.cosine_similarity(h, iv[None].float(), dim=-1).tolist()
        return sum(cos) / len(cos)

    @torch.no_grad()
    def add_back(model, task, iv, alpha, n):
        """reply_contains / exact match and the gold's log-prob with alpha * IV added after `layer`
        at the last prompt token (zero-shot test prompts)."""
        prompts = [chat_prompt(tok, ex) for ex in task.test[:n]]
        add = (layer, alpha * iv) if alpha else None
        lp = float(score_prompts(model, prompts, add=add)["logprob"].mean())
        hits = 0
        for p, reply in zip(prompts, replies(model, prompts, add)):
            hits += (reply_contains(reply, p.text) if task.kind == "general"
                     else normalize_answer(reply) == normalize_answer(p.text))
        return {"score": hits / len(prompts), "logprob": lp}

    def replies(model, prompts, add=None):
        """Greedy chat replies (up to evaluate.REPLY_TOKENS tokens), optionally with add = (layer,
        vector) added to the residual stream at the last prompt token."""
        return greedy_replies(model, tok, prompts, Settings(format="chat"), add, max_new=E.REPLY_TOKENS)

    all_tasks = {n: T.load_task(n) for n in train_names + general}
    # the noise floor of (b): the same extraction from the original model on other prompts (seed 1)
    key = "reextracted/original-seed1"
    if key not in res:
        rows = {}
        for n in general:
            rows[n] = compare_ivs(iv_for(orig, n, "original-seed1", seed=1, **ANALYSIS_IV), gen_iv[n])
        res[key] = rows
        save()
    for run in ("plain-s0", "guided-s0"):
        d = RUNS / run
        if not (d / "stage-4").is_dir():
            return f"analysis: {d}/stage-4 is missing (run the study's training runs first)"
        stages = json.loads((d / "results.json").read_text())["stages"]
        # (a) cosine(hidden, IV) vs score along the stages
        key = f"cosine/{run}"
        if key not in res:
            rows = []
            for s in range(len(stages)):
                model = orig if s == 0 else load_model(str(d / f"stage-{s}"))[0]
                for n, t in all_tasks.items():
                    rows.append({"stage": s, "task": n, "cos": last_hidden(model, t, N_ANALYSIS),
                                 "score": E.primary_score(stages[s], n)})
            res[key] = rows
            save()
        final, _ = load_model(str(d / "stage-4"))
        # (b) the IVs re-extracted from the fine-tuned model
        key = f"reextracted/{run}"
        if key not in res and run == "plain-s0":   # the paper's claim is about plain fine-tuning
            rows = {}
            for n in general + train_names:
                settings = ANALYSIS_IV if n in general else {"method": "exact", "n_clean": 100, "n_corrupt": 25}
                new = iv_for(final, n, run, **settings)
                old = (train_iv | gen_iv)[n]
                rows[n] = compare_ivs(new, old) | {"heads_original": [list(h) for h in old["heads"]],
                                                   "heads_finetuned": [list(h) for h in new["heads"]]}
            res[key] = rows
            save()
        # (c) the original IV added back into the fine-tuned model
        key = f"addback/{run}"
        if key not in res:
            rows = {}
            for n, t in all_tasks.items():
                iv = (train_iv | gen_iv)[n]["iv"]
                rows[n] = {"original": add_back(orig, t, iv, 0, N_ANALYSIS),
                           "finetuned": add_back(final, t, iv, 0, N_ANALYSIS)}
                for a in ALPHAS:
                    rows[n][f"finetuned+iv*{a:g}"] = add_back(final, t, iv, a, N_ANALYSIS)
            res[key] = rows
            save()
        # (d) format or content? The general suite's replies along the stages, scored by
        # reply_contains and by the same rule ignoring case: a reply in the training task's
        # capitals ("SOLDIER") states the answer in the wrong format
        key = f"format/{run}"
        if key not in res:
            rows = []
            for s in range(len(stages)):
                model = orig if s == 0 else load_model(str(d / f"stage-{s}"))[0]
                for n in general:
                    t = all_tasks[n]
                    prompts = [chat_prompt(tok, ex) for ex in t.test[:N_ANALYSIS]]
                    reps = replies(model, prompts)
                    rows.append({"stage": s, "task": n,
                                 "reply_contains": mean(reply_contains(r, p.text) for r, p in zip(reps, prompts)),
                                 "ignoring_case": mean(reply_contains(r.lower(), p.text.lower())
                                                       for r, p in zip(reps, prompts)),
                                 "examples": [[p.text.strip(), r] for p, r in list(zip(prompts, reps))[:3]]})
            res[key] = rows
            save()
    return "analysis: done"


def compare_ivs(new: dict, old: dict) -> dict:
    """Two extractions of one task's IV (extract_iv.get_iv dicts): cosine, norm ratio, the share of
    the old top heads among the new ones, and the Spearman correlation of their AIE maps."""
    import torch
    from ivft.ivcheck import spearman
    shared = set(map(tuple, new["heads"])) & set(map(tuple, old["heads"]))
    return {"cos": float(torch.nn.functional.cosine_similarity(new["iv"], old["iv"], dim=0)),
            "norm_ratio": float(new["iv"].norm() / old["iv"].norm()),
            "head_overlap": len(shared) / len(old["heads"]),
            "aie_corr": spearman(new["aie"].flatten(), old["aie"].flatten())}


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# Report

def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(r: dict) -> dict:
    cl = r["cl"]
    R, n = cl["R"], len(cl["train_tasks"])
    g = cl.get("general", {})
    delta = lambda k: g[k][-1] - g[k][0] if g.get(k) else None     # final stage - original model
    return {"AP": cl["AP"], "BWT": cl["BWT"], "FWT": cl["FWT"], "GP_drop": cl["GP_drop"], "IP_drop": cl["IP_drop"],
            "new_task": sum(R[j + 1][j] for j in range(n)) / n,
            "instr_lp_change": delta("instruction_logprob"), "knowl_lp_change": delta("knowledge_logprob"),
            "choice_change": delta("choice_accuracy"),
            "GP": cl["GP"], "IP": cl["IP"], "general": g, "R": R}


def fmt(m, sd=None, pct=True):
    if m is None:
        return "-"
    k = 100 if pct else 1
    return f"{k * m:+.1f}" + (f" ± {k * sd:.1f}" if sd is not None else "")


def report() -> str:
    runs = {}
    for name in run_names():
        p = RAW / f"run_{name}.json"
        if p.is_file():
            runs[name] = summarise(json.loads(p.read_text()))
    if not runs:
        return "report: no finished runs yet"
    keys = ("GP_drop", "IP_drop", "AP", "BWT", "FWT", "new_task", "choice_change", "instr_lp_change", "knowl_lp_change")
    study = {"size": SIZE, "seeds": list(SEEDS), "methods": {}, "grid": {}}
    for m in METHODS:
        rs = [runs[f"{m}-s{s}"] for s in SEEDS if f"{m}-s{s}" in runs]
        if rs:
            study["methods"][m] = {"n_seeds": len(rs)} | {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rs])))
                                                         for k in keys}
    for g in GRID:
        if f"{g}-s0" in runs:
            study["grid"][g] = {k: runs[f"{g}-s0"][k] for k in keys}
    meth = study["methods"]
    verdict = None
    if "plain" in meth and "guided" in meth:
        gp, gg = meth["plain"]["GP_drop"]["mean"], meth["guided"]["GP_drop"]["mean"]
        nt = meth["guided"]["new_task"]["mean"] - meth["plain"]["new_task"]["mean"]
        verdict = {"guided_GP_drop": gg, "plain_GP_drop": gp, "forgetting_ratio": gg / gp if gp else None,
                   "new_task_diff": nt, "forgetting_halved": bool(gp > 0 and gg <= gp / 2),
                   "new_task_within_2_points": bool(nt >= -0.02), "goal_holds": bool(gp > 0 and gg <= gp / 2 and nt >= -0.02)}
    study["goal"] = verdict
    analysis = json.loads((RAW / "analysis.json").read_text()) if (RAW / "analysis.json").is_file() else {}
    study["analysis_summary"] = summarise_analysis(analysis)
    from ivft.report import save_report
    save_report(study, OUT / "study.json")
    plots = make_plots(runs, analysis)
    (OUT / "study.md").write_text(markdown(study, runs, analysis, plots))
    return f"report: {OUT / 'study.md'} ({len(runs)} runs, {len(plots)} plots)"


def pearson(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return sxy / (sx * sy) if sx and sy else None


def summarise_analysis(a: dict) -> dict:
    out = {}
    for run in ("plain-s0", "guided-s0"):
        rows = a.get(f"cosine/{run}")
        if rows:
            out[f"cos_score_pearson/{run}"] = pearson([r["cos"] for r in rows], [r["score"] for r in rows])
        re_ = a.get(f"reextracted/{run}")
        if re_:
            out[f"reextracted_cos_mean/{run}"] = sum(v["cos"] for v in re_.values()) / len(re_)
            out[f"head_overlap_mean/{run}"] = sum(v["head_overlap"] for v in re_.values()) / len(re_)
        ab = a.get(f"addback/{run}")
        if ab:
            for alpha in ALPHAS:
                rec = recovery(ab, f"finetuned+iv*{alpha:g}")
                out[f"recovery_alpha{alpha:g}/{run}"] = rec
    floor = a.get("reextracted/original-seed1")
    re_ = a.get("reextracted/plain-s0")
    if floor and re_:
        gen = list(floor)
        for k in ("cos", "head_overlap"):
            out[f"general_{k}/original-seed1"] = sum(floor[n][k] for n in gen) / len(gen)
            out[f"general_{k}/plain-s0"] = sum(re_[n][k] for n in gen) / len(gen)
    return out


def recovery(ab: dict, cond: str) -> dict:
    """Per task with a loss (original - fine-tuned > 0): (with IV - fine-tuned) / (original - fine-tuned);
    and pooled over those tasks: sum of gains / sum of losses."""
    per, gain, loss = {}, 0.0, 0.0
    for n, v in ab.items():
        lost = v["original"]["score"] - v["finetuned"]["score"]
        if lost > 0:
            g = v[cond]["score"] - v["finetuned"]["score"]
            per[n] = g / lost
            gain, loss = gain + g, loss + lost
    return {"pooled": gain / loss if loss else None, "per_task": per}


def make_plots(runs: dict, a: dict) -> list[str]:
    from ivft.report import pyplot
    plt = pyplot()
    if plt is None:
        return []
    RAW.mkdir(parents=True, exist_ok=True)
    made = []
    colors = {"plain": "C3", "kl_only": "C1", "iv_only": "C2", "guided": "C0"}
    # 1. forgetting per stage: GP (general suite, reply_contains) and mean train-task score
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for m, c in colors.items():
        rs = [runs[f"{m}-s{s}"] for s in SEEDS if f"{m}-s{s}" in runs]
        if not rs:
            continue
        for ax, get, title in ((axes[0], lambda r: r["GP"], "general suite, zero-shot (GP)"),
                               (axes[1], lambda r: r["IP"], "general suite, 3-shot (IP)"),
                               (axes[2], lambda r: r["general"].get("choice_accuracy"), "general suite, choice accuracy")):
            curves = [get(r) for r in rs if get(r)]
            if not curves:
                continue
            xs = range(len(curves[0]))
            mean = [sum(v[i] for v in curves) / len(curves) for i in xs]
            for v in curves:
                ax.plot(xs, v, color=c, alpha=0.25, lw=1)
            ax.plot(xs, mean, color=c, lw=2, label=m)
            ax.set_title(title)
            ax.set_xlabel("stage (0 = original)")
    axes[0].legend()
    fig.tight_layout()
    made.append(_save(fig, "forgetting_per_stage.png"))
    # 2. knowledge vs instruction log-prob along the stages (mean over seeds)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, c in colors.items():
        rs = [runs[f"{m}-s{s}"] for s in SEEDS if f"{m}-s{s}" in runs]
        for metric, ls in (("instruction_logprob", "-"), ("knowledge_logprob", "--")):
            curves = [r["general"].get(metric) for r in rs if r["general"].get(metric)]
            if curves:
                xs = range(len(curves[0]))
                ax.plot(xs, [sum(v[i] for v in curves) / len(curves) for i in xs], ls, color=c,
                        label=f"{m} {metric.split('_')[0]}")
    ax.set_xlabel("stage (0 = original)")
    ax.set_ylabel("mean log P(gold answer)")
    ax.set_title("general suite: instruction (solid) vs knowledge (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(_save(fig, "knowledge_vs_instruction.png"))
    # 3. cosine(hidden, IV) vs score
    for run in ("plain-s0", "guided-s0"):
        rows = a.get(f"cosine/{run}")
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        for i, n in enumerate(dict.fromkeys(r["task"] for r in rows)):
            pts = [r for r in rows if r["task"] == n]
            ax.plot([r["cos"] for r in pts], [r["score"] for r in pts], "o-", color=f"C{i}", label=n, ms=4, lw=0.8)
        ax.set_xlabel("cos(hidden after layer l, task IV), last prompt token")
        ax.set_ylabel("task score")
        ax.set_title(f"{run}: stages 0-4")
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(_save(fig, f"cosine_vs_score_{run}.png"))
    # 4. recovery by adding the original IV back
    for run in ("plain-s0", "guided-s0"):
        ab = a.get(f"addback/{run}")
        if not ab:
            continue
        names = list(ab)
        conds = ["original", "finetuned"] + [f"finetuned+iv*{x:g}" for x in ALPHAS]
        fig, ax = plt.subplots(figsize=(10, 4))
        w = 0.8 / len(conds)
        for k, cnd in enumerate(conds):
            ax.bar([i + k * w for i in range(len(names))], [ab[n][cnd]["score"] for n in names], w, label=cnd)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=30, fontsize=7)
        ax.set_ylabel("score")
        ax.set_title(f"{run}: the original IV added back into the final model")
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, f"iv_addback_{run}.png"))
    # 5. AIE heat maps: original vs fine-tuned, for two general tasks
    from ivft.ivfile import read_iv
    for n in ("capital", "plural"):
        paths = [RAW / "ivs" / "original" / f"{n}.safetensors", RAW / "ivs" / "plain-s0" / f"{n}.safetensors"]
        if all(p.is_file() for p in paths):
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for ax, p, t in zip(axes, paths, ("original", "after plain fine-tuning")):
                r = read_iv(p)
                im = ax.imshow(r["aie"].numpy(), aspect="auto", cmap="viridis")
                ax.set_title(f"AIE {n}: {t}")
                ax.set_xlabel("head")
                ax.set_ylabel("layer")
                fig.colorbar(im, ax=ax)
            fig.tight_layout()
            made.append(_save(fig, f"aie_{n}.png"))
    return made


def _save(fig, name) -> str:
    import matplotlib.pyplot as plt
    path = RAW / name
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path.relative_to(OUT))


def markdown(study: dict, runs: dict, a: dict, plots: list[str]) -> str:
    from ivft.tasks import default_sequence, general_suite
    L = ["# Study: does fine-tuning erase instruction following, and does IV guidance help?", "",
         "Regenerate: `python experiments/study.py` (resumable; `--report` only rewrites this file).",
         f"Embedded SmolLM2-135M-Instruct, default sequence {' → '.join(default_sequence())}, general suite "
         f"{', '.join(general_suite())}. Size: `{' '.join(SIZE)}` (batch 8, so 20 steps per task), "
         f"seeds {', '.join(map(str, SEEDS))}. Scores: training tasks by exact match; the general suite "
         "(GP, IP) by `reply_contains` (the greedy reply states the gold answer), next to choice accuracy "
         "(ranking of answers, the knowledge side). All numbers in points (×100); ± is the std over seeds.", ""]
    L += ["## Methods (mean ± std over seeds)", "",
          "| method | seeds | GP drop ↓ | IP drop ↓ | AP | BWT | FWT | new_task |", "|---|---|---|---|---|---|---|---|"]
    for m, v in study["methods"].items():
        L.append(f"| {m} | {v['n_seeds']} | " + " | ".join(fmt(v[k]["mean"], v[k]["std"]) for k in
                                                          ("GP_drop", "IP_drop", "AP", "BWT", "FWT", "new_task")) + " |")
    L += ["", "new_task = mean over tasks of the score right after learning it (R[j][j]); AP = mean final score.", "",
          "Knowledge vs instruction on the general suite, final stage minus original model (mean ± std over seeds):", "",
          "| method | choice accuracy (points) | instruction_logprob (nats) | knowledge_logprob (nats) |", "|---|---|---|---|"]
    for m, v in study["methods"].items():
        if v.get("instr_lp_change", {}).get("mean") is not None:
            L.append(f"| {m} | {fmt(v['choice_change']['mean'], v['choice_change']['std'])} | "
                     f"{fmt(v['instr_lp_change']['mean'], v['instr_lp_change']['std'], pct=False)} | "
                     f"{fmt(v['knowl_lp_change']['mean'], v['knowl_lp_change']['std'], pct=False)} |")
    L.append("")
    g = study.get("goal")
    if g:
        L += ["## The goal", "",
              f"Guided GP drop {fmt(g['guided_GP_drop'])} vs plain {fmt(g['plain_GP_drop'])} "
              f"(ratio {g['forgetting_ratio']:.2f}; goal ≤ 0.5: {'met' if g['forgetting_halved'] else 'not met'}); "
              f"new-task score difference {fmt(g['new_task_diff'])} points (goal ≥ −2: "
              f"{'met' if g['new_task_within_2_points'] else 'not met'}). "
              f"**The goal {'holds' if g['goal_holds'] else 'does not hold'} on this benchmark.**", ""]
    # per-stage general-suite view
    L += ["## General suite along the stages (seed 0)", "",
          "| run | metric | " + " | ".join(f"stage {i}" for i in range(5)) + " |", "|---|---|" + "---|" * 5]
    for m in METHODS:
        r = runs.get(f"{m}-s0")
        if not r:
            continue
        rows = [("reply_contains (GP)", r["GP"], True), ("reply_contains 3-shot (IP)", r["IP"], True)]
        rows += [(k, r["general"].get(k), k == "choice_accuracy") for k in
                 ("choice_accuracy", "instruction_logprob", "knowledge_logprob")]
        for label, vals, pct in rows:
            if vals:
                L.append(f"| {m} | {label} | " + " | ".join(f"{100 * v:.1f}" if pct else f"{v:.2f}" for v in vals) + " |")
    L += ["", "Knowledge vs instruction (docs/method.md §1): log-probs are natural-log sums over the gold answer.", ""]
    fm = {run: a.get(f"format/{run}") for run in ("plain-s0", "guided-s0") if a.get(f"format/{run}")}
    if fm:
        L += ["## Format or content? (seed 0, general suite, greedy replies)", "",
              "`reply_contains` requires the answer in the model's own casing; ignoring case also accepts a "
              f"reply in a training format's capitals. Mean over the general tasks, {N_ANALYSIS} test prompts each.", "",
              "| run | score | " + " | ".join(f"stage {i}" for i in range(5)) + " |", "|---|---|" + "---|" * 5]
        for run, rows in fm.items():
            for k in ("reply_contains", "ignoring_case"):
                per = [mean(r[k] for r in rows if r["stage"] == st) for st in range(5)]
                L.append(f"| {run} | {k} | " + " | ".join(f"{100 * v:.1f}" for v in per) + " |")
        L += ["", "Replies of plain-s0 (first test prompt of each general task) after each stage:", "",
              "| task | gold | " + " | ".join(f"stage {i}" for i in range(5)) + " |", "|---|---|" + "---|" * 5]
        rows = fm.get("plain-s0", [])
        for n in general_suite():
            ex = [r["examples"][0] for r in sorted((r for r in rows if r["task"] == n), key=lambda r: r["stage"])]
            if ex:
                cell = lambda t: "`" + t.replace("|", "/").replace("\n", " ")[:40] + "`"
                L.append(f"| {n} | {ex[0][0]} | " + " | ".join(cell(e[1]) for e in ex) + " |")
        L.append("")
    if study["grid"]:
        L += ["## Sensitivity of guided training (seed 0)", "",
              "| setting | GP drop | IP drop | AP | BWT | new_task |", "|---|---|---|---|---|---|"]
        if "guided-s0" in runs:
            r = runs["guided-s0"]
            L.append("| default (λ=1, l=9, α0=1) | " + " | ".join(fmt(r[k]) for k in ("GP_drop", "IP_drop", "AP", "BWT", "new_task")) + " |")
        for name, v in study["grid"].items():
            L.append(f"| {name.replace('guided_', '')} | " + " | ".join(fmt(v[k]) for k in ("GP_drop", "IP_drop", "AP", "BWT", "new_task")) + " |")
        L.append("")
    s = study["analysis_summary"]
    if s:
        L += ["## IV analyses (docs/method.md §3)", ""]
        for run in ("plain-s0", "guided-s0"):
            if f"cos_score_pearson/{run}" in s:
                L.append(f"- {run}: Pearson r between cos(hidden, IV) and score over tasks × stages: "
                         f"{s[f'cos_score_pearson/{run}']:.2f}")
            if f"reextracted_cos_mean/{run}" in s:
                L.append(f"- {run}: IV re-extracted from the final model vs the original: mean cosine "
                         f"{s[f'reextracted_cos_mean/{run}']:.2f}, mean top-head overlap {s[f'head_overlap_mean/{run}']:.2f}")
                if "general_cos/original-seed1" in s:
                    L.append(f"  - general tasks only: cosine {s['general_cos/plain-s0']:.2f}, head overlap "
                             f"{s['general_head_overlap/plain-s0']:.2f}; noise floor, the original model's IV "
                             f"extracted again from other prompts (seed 1): cosine {s['general_cos/original-seed1']:.2f}, "
                             f"head overlap {s['general_head_overlap/original-seed1']:.2f}")
            for alpha in ALPHAS:
                rec = s.get(f"recovery_alpha{alpha:g}/{run}")
                if rec and rec["pooled"] is not None:
                    L.append(f"- {run}: the original IV ×{alpha:g} added back recovers {100 * rec['pooled']:.0f}% of the "
                             f"lost score (pooled over tasks that lost any)")
        L.append("")
        for run in ("plain-s0", "guided-s0"):
            re_ = a.get(f"reextracted/{run}")
            ab = a.get(f"addback/{run}")
            if not (re_ and ab):
                continue
            conds = ["original", "finetuned"] + [f"finetuned+iv*{x:g}" for x in ALPHAS]
            L += [f"### {run}", "", "| task | IV cos (re-extracted vs original) | head overlap | " +
                  " | ".join(conds) + " |", "|---|---|---|" + "---|" * len(conds)]
            for n in ab:
                rv = re_.get(n, {})
                L.append(f"| {n} | {rv.get('cos', float('nan')):.2f} | {rv.get('head_overlap', float('nan')):.2f} | " +
                         " | ".join(f"{100 * ab[n][c]['score']:.0f} ({ab[n][c]['logprob']:.1f})" for c in conds) + " |")
            L += ["", "Cells: score (mean log P of the gold answer). General tasks: reply_contains; training "
                  "tasks: exact match.", ""]
    if plots:
        L += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each on --threads threads")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--report", action="store_true", help="only rebuild the report from what has finished")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)   # one job in this process (internal)
    args = p.parse_args(argv)
    if args.job == "analysis":
        print(analysis(args.threads))
        return 0
    if not args.report:
        RUNS.mkdir(parents=True, exist_ok=True)
        names = run_names()
        # plain-s0 first (it writes the shared stage-0 evaluation and the analyses need it), the
        # analyses once seeds 0 and 1 are queued, the grid last
        jobs = [names[0], "analysis:wait", *names[1:2 * len(METHODS)], "analysis", *names[2 * len(METHODS):]]
        jobs.remove("analysis:wait")

        def job(j):
            if j == "analysis":
                cmd = [sys.executable, __file__, "--job", "analysis", "--threads", str(args.threads)]
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                return (r.stdout.strip().splitlines() or [""])[-1] if r.returncode == 0 else \
                    f"analysis: FAILED (exit {r.returncode})\n{r.stderr[-2000:]}"
            return do_run(j, args.threads)

        t0 = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for msg in pool.map(job, jobs):
                print(f"[{(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
