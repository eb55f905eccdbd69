"""
Evaluation: the scores of docs/method.md §5 for one model on a list of tasks, and the continual-learning
summary (AP, BWT, FWT, forgetting, GP, IP) over the reports written along a training sequence.

How prompts, answers and replies are formed and judged: ivft/prompts.py (train.py and extract_iv.py
use the same conventions). How the scores are computed fast and exactly: ivft/engine.py. Reports on
disk, tables and plots: ivft/report.py.

CLI: `python evaluate.py` evaluates the embedded SmolLM2-135M-Instruct on the general suite;
`python evaluate.py --help` lists the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ivft import chat
from ivft import tasks as task_lib
from ivft.engine import (Decoder, add_device_flags, autocast, eval_mode, model_device, resolve_precision,
                         run_prompts)
from ivft.errors import StageCacheError
from ivft.files import check_writable, write_json_atomic
from ivft.ivfile import config_hash, task_fingerprint, weight_fingerprint
from ivft.load import load_model
from ivft.prompts import REPLY_TOKENS  # noqa: F401 (evaluate.REPLY_TOKENS: reply_contains's budget)
from ivft.prompts import (answer_ids, choice_candidates, distinct_outputs, draw_shots, knowledge_ids,
                          render_prompt, reply_budgets, reply_verdicts, verdict_open)
from ivft.report import mean, print_cl, print_table, save_report

# ---------------------------------------------------------------------------------------------
# Metric names. The three chat metrics come zero-shot and, with k_shot > 0, in-context ("_kshot");
# knowledge_logprob has no chat prompt and so no k-shot form.

CHAT_METRICS = ("exact_match", "reply_contains", "choice_accuracy", "instruction_logprob")
KSHOT_SUFFIX = "_kshot"
METRICS = CHAT_METRICS + ("knowledge_logprob",) + tuple(m + KSHOT_SUFFIX for m in CHAT_METRICS)
# Prompts per batch, and rows per decoding step. On a 2-core CPU fewer, wider matrix products win
# (bench/bench_evaluate.py), and a task's 100 prompts prefill as one batch. Memory: for a 7B model
# a k-shot pool of 128 rows holds ~15 GB of KV cache; pass a smaller batch_size there.
BATCH_SIZE = 128
# Task.metric spellings -> our metric names (tasks.py says "choice")
METRIC_ALIASES = {"choice": "choice_accuracy"}


def canonical_metric(name: str) -> str:
    """Our name for a Task.metric value ("choice" -> "choice_accuracy")."""
    name = METRIC_ALIASES.get(name, name)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (aliases: {METRIC_ALIASES})")
    return name


# ---------------------------------------------------------------------------------------------
# Per-task metrics

def evaluate_task(model, tok, task, n: int | None = None, k_shot: int = 0, metrics=METRICS,
                  batch_size: int = BATCH_SIZE, seed: int = 0, progress: bool = True,
                  timings: dict | None = None, intervention=None) -> dict:
    """Scores of `model` on the first n test examples of `task` -> {metric: value, "n": count}.
    `_kshot` metrics are computed only when k_shot > 0; knowledge_logprob only over examples that
    have a knowledge prompt (absent when none has). `timings`, if given, collects seconds per phase.
    intervention (a model.Intervention, e.g. add_resid={layer: IV}): added at every chat prompt's last
    token (engine.run_prompts), so the scores are the model's with it; knowledge prompts run without."""
    return _evaluate_tasks(model, tok, [task], n=n, k_shot=k_shot, metrics=metrics, batch_size=batch_size,
                           seed=seed, progress=progress, timings=timings,
                           intervention=intervention)[task.name]


def _evaluate_tasks(model, tok, tasks, *, batch_size: int = BATCH_SIZE, progress: bool = True,
                    timings: dict | None = None, **kw) -> dict:
    """{task name: evaluate_task's scores}. The decoders are shared by all tasks: rows still
    decoding from one task step together with the next's. kw: n, k_shot, metrics, seed, intervention."""
    kw = {"n": None, "k_shot": 0, "metrics": METRICS, "seed": 0, "intervention": None, **kw}
    decoders = _decoders(model, tok, batch_size, timings, progress)
    finish = {}
    with eval_mode(model):
        for t in tqdm(tasks, desc="tasks", disable=not progress or len(tasks) == 1):
            finish[t.name] = _start_task(model, tok, t, decoders, batch_size=batch_size, progress=progress,
                                         timings=timings, **kw)
        for d in decoders.values():
            d.finish()
    return {name: f() for name, f in finish.items()}


def _decoders(model, tok, batch_size, timings, progress=False):
    # one pool per prompt kind: k-shot prompts are ~4x longer, and a pool pads every row to its
    # longest prompt
    return {suffix: Decoder(model, tok.stop_ids(), batch_size, timings, progress) for suffix in ("", KSHOT_SUFFIX)}


def _start_task(model, tok, task, decoders, *, n, k_shot, metrics, batch_size, seed, progress, timings,
                intervention=None):
    """evaluate_task up to its replies (the model already in eval mode): every score is computed,
    and the rows that need greedy decoding are queued in decoders[metric suffix]. -> a function
    that, once every decoder has finished, returns the task's scores."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    test = list(task.test)[:n] if n else list(task.test)
    if not test:
        raise ValueError(f"task {task.name!r} has no test examples")
    golds = _golds(tok, task, test)
    out = {"n": len(test)}
    variants = [("", ())]
    if k_shot > 0 and any(m.endswith(KSHOT_SUFFIX) for m in metrics):
        variants.append((KSHOT_SUFFIX, draw_shots(task, k_shot, seed)))
    labels = distinct_outputs(task)
    stop = set(tok.stop_ids())
    replies = []   # (metric suffix, gens, exact match's budget, reply_contains's), read once decoded
    for suffix, shots in variants:
        want = {m for m in CHAT_METRICS if m + suffix in metrics}
        if not want:
            continue
        prompts = [render_prompt(tok, ex, shots) for ex in test]
        if "choice_accuracy" in want:
            conts = _choice_conts(tok, task, test, golds, seed, labels)
        else:  # the gold alone: its log-prob, and the pass exact match's decoding starts from
            conts = [[g] for g in golds]
        # one greedy reply per prompt serves both generation metrics (ivft.prompts.reply_budgets);
        # engine.greedy_replies makes this same call for the IV check and the study's analyses
        em_budget, rc_budget = reply_budgets(golds, want)
        alive = verdict_open(tok, [ex.output for ex in test], stop, em_budget, rc_budget)
        scores, gens = run_prompts(model, prompts, conts, max_new_tokens=max(em_budget, rc_budget),
                                   stop_ids=stop, alive=alive, prune="choice_accuracy" in want,
                                   batch_size=batch_size, desc=f"{task.name}{suffix or ' 0-shot'}",
                                   progress=progress, timings=timings, tag=(suffix or "_0shot")[1:] + "/",
                                   decoder=decoders[suffix], intervention=intervention)
        if "choice_accuracy" in want:
            # strictly first: a tie with a wrong answer counts as wrong
            out["choice_accuracy" + suffix] = mean(float(all(s[0] > x for x in s[1:])) for s in scores)
        if "instruction_logprob" in want:
            out["instruction_logprob" + suffix] = mean(s[0] for s in scores)
        if em_budget or rc_budget:
            replies.append((suffix, gens, em_budget, rc_budget))
    if "knowledge_logprob" in metrics:
        score = _knowledge_logprob(model, tok, task, test, batch_size, progress, timings)
        if score is not None:
            out["knowledge_logprob"] = score

    def finish():
        for suffix, gens, em_budget, rc_budget in replies:
            out.update(_reply_scores(tok, test, gens, stop, suffix, em_budget, rc_budget))
        return {k: out[k] for k in ["n"] + [m for m in METRICS if m in out]}   # in METRICS order
    return finish


def _golds(tok, task, test) -> list:
    golds = []
    for i, ex in enumerate(test):
        try:
            golds.append(answer_ids(tok, ex.output))
        except ValueError as e:
            raise ValueError(f"task {task.name!r}, test example {i} (input {ex.input!r}): {e}") from None
    return golds


def _choice_conts(tok, task, test, golds, seed, labels) -> list:
    """Per example the answers to rank, as ids; gold first: run_prompts(prune=True) ranks the others
    against conts[i][0]."""
    conts = []
    for i, ex in enumerate(test):
        gold = ex.output.strip()
        others = [x for x in choice_candidates(task, ex, i, seed, labels) if x != gold]
        try:
            conts.append([golds[i]] + [answer_ids(tok, x) for x in others])
        except ValueError as e:
            raise ValueError(f"task {task.name!r}, test example {i}: choice {e}") from None
    return conts


def _knowledge_logprob(model, tok, task, test, batch_size, progress, timings):
    """Mean log-prob of the knowledge answers over the examples that have a knowledge prompt, None
    when none has."""
    pairs = []
    for i, ex in enumerate(test):
        if ex.knowledge_prompt and ex.knowledge_answer:
            try:
                pairs.append(knowledge_ids(tok, ex.knowledge_prompt, ex.knowledge_answer))
            except ValueError as e:
                raise ValueError(f"task {task.name!r}, test example {i}: {e}") from None
    if not pairs:
        return None
    scores, _ = run_prompts(model, [p for p, _ in pairs], [[c] for _, c in pairs],
                            batch_size=batch_size, desc=f"{task.name} knowledge",
                            progress=progress, timings=timings, tag="knowledge/")
    return mean(s[0] for s in scores)


def _reply_scores(tok, test, gens, stop, suffix, em_budget, rc_budget) -> dict:
    """exact_match and reply_contains (those with a budget) from the decoded greedy replies."""
    verdicts = reply_verdicts(tok, [ex.output for ex in test], gens, stop, em_budget, rc_budget)
    return {m + suffix: mean(v) for m, v in verdicts.items() if m != "text"}


# ---------------------------------------------------------------------------------------------
# Suites, reports and the continual-learning summary

def evaluate_suite(model, tok, tasks, *, model_name: str = "model", dtype="float32", progress: bool = True,
                   timings: dict | None = None, **kw) -> dict:
    """Evaluate every task -> {"model", "tasks": {name: {metric: value}}, "primary": {name: metric},
    "settings": {...}}. tasks: Tasks, names or task files (tasks.load_tasks; None = the general suite).
    kw go to evaluate_task (n, k_shot, metrics, batch_size, seed)."""
    tasks = task_lib.load_tasks(tasks)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    primary = {t.name: canonical_metric(t.metric) for t in tasks}  # fail before any work
    t0 = time.perf_counter()
    with autocast(dtype, model_device(model).type):
        results = _evaluate_tasks(model, tok, tasks, progress=progress, timings=timings, **kw)
    dtype = "bfloat16" if dtype in ("bfloat16", torch.bfloat16) else "float32"     # as the report says it
    settings = {"n": kw.get("n"), "k_shot": kw.get("k_shot", 0), "seed": kw.get("seed", 0),
                "batch_size": kw.get("batch_size", BATCH_SIZE), "dtype": dtype,
                "metrics": list(kw.get("metrics", METRICS)), "seconds": round(time.perf_counter() - t0, 1)}
    return {"model": str(model_name), "tasks": results, "primary": primary,
            "settings": settings}


def primary_score(report: dict, task_name: str, kshot: bool = False) -> float:
    """The value of the task's primary metric (Task.metric) in a report; kshot=True its k-shot form."""
    if task_name not in report["tasks"]:
        raise KeyError(f"task {task_name!r} is not in the report (it has: {', '.join(report['tasks'])})")
    metric = report.get("primary", {}).get(task_name)
    if metric is None:  # a report written without the "primary" table: ask the task registry
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
           "AP": mean(R[n][j] for j in range(n)),
           "BWT": mean(R[n][j] - R[j + 1][j] for j in range(n - 1)),
           "FWT": mean(R[j][j] - R[0][j] for j in range(1, n)),
           "forgetting": {t: (max(R[i][j] for i in range(n)) - R[n][j] if j < n - 1 else None)
                          for j, t in enumerate(train_tasks[:n])}}
    for name, kshot in (("GP", False), ("IP", True)):
        try:
            per_stage = [mean(primary_score(rep, g, kshot) for g in general_tasks) for rep in reports]
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
            out["general"][m] = [mean(rep["tasks"][g][m] for g in general_tasks) for rep in reports]
    return out


# ---------------------------------------------------------------------------------------------
# One stage of a continual-learning sequence (train.py): the training tasks zero-shot, the general
# suite zero-shot (GP) and k-shot (IP), each with what its scores need

def add_stage_flags(p: argparse.ArgumentParser):
    """train.py's flags of the evaluation after every stage (read into StageEval)."""
    g = p.add_argument_group("evaluation after every stage").add_argument
    g("--eval_n", type=int, default=40, help="test examples per task and stage; 0 = no evaluation")
    g("--eval_k_shot", type=int, default=3, help="demonstrations of the general suite's k-shot (IP) score")
    g("--eval_batch", type=int, default=BATCH_SIZE, help="prompts per forward pass and rows per decoding "
      "step (lower it for big models)")
    g("--stage0_cache", default=None, metavar="PATH", help="reuse the original model's evaluation from this "
      "JSON file when weights, task data and evaluation flags match (else written there)")
    g("--eval_metrics", default="needed", choices=["needed", "all"], help="needed: each task's primary score "
      "(+ k-shot for the general suite) and the instruction/knowledge log-probs; all: every metric")


@dataclass(frozen=True)
class StageEval:
    """How train.py evaluates a stage (its --eval_* flags)."""
    n: int                     # test examples per task
    k_shot: int                # demonstrations of the general suite's in-context (IP) scores; 0 = none
    batch_size: int = BATCH_SIZE
    metrics: str = "needed"    # "needed" (stage_metrics) or "all"


def stage_metrics(task, general: bool, ev: StageEval) -> tuple:
    """What a stage report needs of one task (--eval_metrics needed): its primary score and the
    instruction log-prob; for the general suite also choice accuracy, the knowledge log-prob
    (docs/method.md §1: instruction vs knowledge) and the k-shot scores. 'all' = every metric."""
    if ev.metrics == "all":
        return tuple(METRICS)
    primary = canonical_metric(task.metric)
    out = [primary, "instruction_logprob"]
    if general:
        out += ["choice_accuracy", "knowledge_logprob"]
        if ev.k_shot > 0:
            out += [primary + KSHOT_SUFFIX, "instruction_logprob" + KSHOT_SUFFIX]
    return tuple(dict.fromkeys(out))


def stage_cache_key(model, train_tasks, general, ev: StageEval, amp_dtype) -> dict:
    """What the original model's report depends on, by content: the weights and config, every task's
    data (a file task named like a registry task, or an edited task file, is another key), the
    evaluation settings and the compute dtype and device. --stage0_cache reuses a report only then."""
    settings = {k: v for k, v in asdict(ev).items() if k != "batch_size"}   # speed only
    return {"settings": settings, "dtype": str(amp_dtype), "device": model_device(model).type,
            "weights": weight_fingerprint(model), "config": config_hash(model),
            "train_tasks": [[t.name, task_fingerprint(t)] for t in train_tasks],
            "general": [[t.name, task_fingerprint(t)] for t in general]}


def read_stage_cache(path) -> dict | None:
    """The --stage0_cache file's content, None when it does not exist yet; anything else that is not
    such a file is a ValueError naming it (train.py calls this before it writes anything)."""
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = "a directory" if os.path.isdir(path) else f"not a JSON file ({type(e).__name__})"
        raise StageCacheError(f"--stage0_cache {path}: {kind}; give a JSON file (written if absent)") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("report"), dict):
        raise StageCacheError(f"--stage0_cache {path}: not a stage-0 cache (needs keys 'key' and 'report')")
    return saved


def evaluate_stage(model, tok, train_tasks, general, ev: StageEval, label: str, amp_dtype, cache=None,
                   write_cache: bool = True) -> dict:
    """One report for this stage. Tasks are grouped by the metrics they need (one evaluate_suite
    call per group): greedy decoding for a likelihood-scored task would only cost time. cache: a
    JSON file holding an earlier identical evaluation (reused when its key matches, else written
    when write_cache: one process of several writes it)."""
    key = stage_cache_key(model, train_tasks, general, ev, amp_dtype) if cache else None
    saved = read_stage_cache(cache) if cache else None
    if saved is not None and saved.get("key") == key:
        return saved["report"]
    groups = {}
    for task in train_tasks:
        groups.setdefault((stage_metrics(task, False, ev), 0), []).append(task)
    for task in general:
        groups.setdefault((stage_metrics(task, True, ev), ev.k_shot), []).append(task)
    dtype = "bfloat16" if amp_dtype == torch.bfloat16 else "float32"
    report = {"model": label, "tasks": {}, "primary": {}, "settings": {"seconds": 0.0, "groups": []}}
    for (metrics, k), tasks in groups.items():
        r = evaluate_suite(model, tok, tasks, n=ev.n, k_shot=k, metrics=metrics, dtype=dtype,
                           batch_size=ev.batch_size, model_name=label, progress=True)
        report["tasks"].update(r["tasks"])
        report["primary"].update(r["primary"])
        report["settings"]["seconds"] = round(report["settings"]["seconds"] + r["settings"]["seconds"], 1)
        report["settings"]["groups"].append(r["settings"])
    # keep the sequence's order (training tasks first, then the general suite)
    report["tasks"] = {t.name: report["tasks"][t.name] for t in [*train_tasks, *general]}
    if cache and write_cache:
        try:
            write_json_atomic(cache, {"key": key, "report": report})
        except OSError as e:
            raise StageCacheError(f"--stage0_cache {cache}: cannot write ({e})") from None
    return report


def run_results(settings: dict, state: dict | None, train_tasks, general) -> dict:
    """A run's results.json: empty for a fresh start; a resumed run's stage reports and training
    terms from its checkpoint's state, with the CL metrics recomputed from them."""
    results = {"config": settings, "stages": [], "metrics": {}, "training": []}
    if state is not None:
        results.update(stages=state["stages"], training=state.get("training", []))
        update_metrics(results, train_tasks, general)
    return results


def update_metrics(results: dict, train_tasks, general):
    """results["metrics"] and results["cl"] from the stage reports so far (none before stage 1)."""
    cl = cl_metrics(results["stages"], [t.name for t in train_tasks], [t.name for t in general]) \
        if len(results["stages"]) > 1 else {}
    results["metrics"] = {k: cl.get(k) for k in ("AP", "BWT", "FWT", "GP_drop", "IP_drop")} if cl else {}
    results["cl"] = cl


def record_stage(results: dict, report: dict, train_tasks, general):
    """Append a stage report to a run's results, recompute the CL metrics and print the tables."""
    results["stages"].append(report)
    update_metrics(results, train_tasks, general)
    cl = results["cl"]
    print(f"\n== {report['model']} ==")
    print_table(report, METRICS)
    if cl:
        print_cl(cl)


# ---------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a model on tasks (default: the embedded model on "
                                "the general suite) and print a table; optionally save a JSON report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("I/O")
    g.add_argument("--model", default=None, help="checkpoint: a .gguf file or an HF directory; "
                   "none = the embedded SmolLM2-135M-Instruct")
    g.add_argument("--chat_template", metavar="FILE", help=chat.FLAG_HELP)
    g.add_argument("--out", default=None, help="write the JSON report to this path")
    g = p.add_argument_group("data")
    g.add_argument("--tasks", default=None, help="comma-separated task names or task files; "
                   "none = the general suite")
    g.add_argument("--n", type=int, default=100, help="test examples per task, the first n (0 = all)")
    g.add_argument("--k_shot", type=int, default=3, help="demonstrations of the *_kshot metrics (0 = none)")
    g.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics to compute")
    g.add_argument("--seed", type=int, default=0, help="seed for the demonstrations and fallback distractors")
    g = p.add_argument_group("system")
    g.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="prompts per forward pass, and rows per"
                   " decoding step (lower it for big models: the k-shot replies' KV cache grows with it)")
    # --dtype bf16: a gain on GPUs and on CPUs with AMX/AVX512-BF16, on AVX2-only CPUs ~4x slower than
    # fp32; close choices can flip (bench/bench_evaluate.py --compare)
    add_device_flags(g)
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
        names = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
        tasks = task_lib.load_tasks(names)
        if args.out:
            try:
                check_writable(os.path.dirname(os.path.abspath(args.out)))   # not after a whole evaluation
            except OSError as e:
                raise OSError(f"{args.out}: {e}") from None
        device, amp, weights = resolve_precision(args)
        model, tok = load_model(args.model, dtype=weights, device=device, chat_template=args.chat_template)
        name = args.model or "SmolLM2-135M-Instruct (embedded)"
        report = evaluate_suite(model, tok, tasks, model_name=name, dtype=amp,
                                progress=not args.no_progress, n=args.n or None, k_shot=args.k_shot,
                                metrics=metrics, batch_size=args.batch_size, seed=args.seed)
    except (ValueError, KeyError, OSError) as e:
        # bad input (unknown task, unreadable checkpoint, empty task...): one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"evaluate.py: error: {msg}", file=sys.stderr)
        return 2
    print_table(report, METRICS)
    print(f"({report['settings']['seconds']} s)")
    if args.out:
        try:
            save_report(report, args.out)
        except OSError as e:
            print(f"evaluate.py: error: {args.out}: cannot write the report ({e.strerror or e})",
                  file=sys.stderr)
            return 2
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
