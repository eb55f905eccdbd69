"""
The general evaluation that sees forgetting in degrees (issue 38, item 1), for one model:
  a. verifiable instruction following on data/ifeval.jsonl (ivft/ifeval.py): IFEval's four scores;
  b. knowledge by likelihood: choice accuracy on every general task, per item, by evaluate.py's own
     conventions (the gold strictly first among the task's choices);
  c. drift: KL(original || model) per token on the original's greedy replies to data/everyday.jsonl
     (ivft/drift.py; 0 for the original itself, whose replies this run caches);
each with a bootstrap SE over items (ivft/retention.py). general_eval() returns the per-item results
too, so that endpoints() can compare a tuned model with the base one (per-task retention, median
retention, tasks keeping >= 50%, drift) with paired SEs.

    python experiments/general_eval.py --threads 1                       # the embedded model, every item
    python experiments/general_eval.py --n_if 60 --n_drift 60 --threads 1 # the per-stage subset
    python experiments/general_eval.py --model runs/x/stage-1 --out results/x_general.json
    python experiments/general_eval.py --run runs/x --threads 1          # each stage: runs/x/general_stages.json
    python experiments/general_eval.py --rescore results/general_eval.json   # the IF part, from its stored replies

Files: reads the model(s) and data/; writes --out (JSON, atomically) and the original's replies under
--cache_dir (named by weights, prompts and budget; reused when they match).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import evaluate as E
from ivft import drift, ifeval
from ivft import retention as R
from ivft import tasks as T
from ivft.engine import autocast, eval_mode, run_prompts
from ivft.files import check_writable, write_json_atomic
from ivft.load import load_model
from ivft.prompts import choice_candidates, distinct_outputs, render_prompt
from ivft.runtime import code_version

ROOT = Path(__file__).resolve().parents[1]
IF_TOKENS = 192       # reply budget of the IF prompts: room for the longest asked length (80 words)
IF_ENDPOINT = "prompt_strict"   # the per-prompt IF verdict the retention endpoints use (IFEval's headline)
STAGE_N = 60          # the per-stage subset (--n_if, --n_drift): every IF kind 4 times
# split -> (IF prompts, everyday prompts); the knowledge part reads the general tasks' test items for
# "test" and their training items (never trained on) for "dev"
SPLITS = {"test": (ifeval.IFEVAL_FILE, drift.EVERYDAY_FILE),
          "dev": (ROOT / "data" / "ifeval_dev.jsonl", ROOT / "data" / "everyday_dev.jsonl")}


# ---------------------------------------------------------------------------------------------
# The three parts, each -> a summary with SEs and the per-item results it came from

def if_part(model, tok, records, *, max_new_tokens=IF_TOKENS, batch_size=32, n_boot=R.N_BOOT, seed=0):
    """IFEval's scores of the model's greedy replies to the IF prompts (if_summary), and the share of
    replies that hit the token budget."""
    stop = tok.stop_ids()
    with eval_mode(model):
        _, replies = drift.chat_replies(model, tok, [r["prompt"] for r in records], max_new_tokens, batch_size)
    text = [tok.decode([t for t in r if t not in stop]) for r in replies]
    out = if_summary(records, text, n_boot, seed)
    out["unfinished"] = sum(not r or r[-1] not in stop for r in replies) / len(replies)   # hit the budget
    return out


def if_summary(records, text, n_boot=R.N_BOOT, seed=0) -> dict:
    """IFEval's four scores of the replies `text`, each with its SE, the share of replies that answer
    at all (ifeval.is_answer), per kind, and per prompt (id, strict and loose verdicts per
    constraint, the reply)."""
    v = ifeval.verdicts(records, text)
    s = ifeval.scores(records, v)
    out = {"n": len(records)}
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = R.mean_se(ifeval.prompt_level(v[mode]), n_boot, seed, f"if/prompt_{mode}")
        out[f"inst_{mode}"] = R.ratio_se([sum(x) for x in v[mode]], [len(x) for x in v[mode]], n_boot, seed,
                                         f"if/inst_{mode}")
        assert abs(out[f"prompt_{mode}"]["value"] - s[f"prompt_{mode}"]) < 1e-12   # one definition
    out["answers"] = R.mean_se([float(ifeval.is_answer(t)) for t in text], n_boot, seed, "if/answers")
    out["per_kind"] = s["per_kind"]
    out["items"] = [{"id": r["id"], "strict": a, "loose": b, "reply": t}
                    for r, a, b, t in zip(records, v["strict"], v["loose"], text)]
    return out


def rescore_if(report: dict) -> dict:
    """The report with its IF part scored again from its stored replies by the current checkers (the
    same numbers a new run gives: the replies are greedy), on the IF file of its split."""
    st = report.get("settings", {})
    records = {r["id"]: r for r in ifeval.load_ifeval(SPLITS[st.get("split", "test")][0])}
    items = report["if"]["items"]
    new = if_summary([records[i["id"]] for i in items], [i["reply"] for i in items], st.get("n_boot", R.N_BOOT),
                     st.get("seed", 0))
    return {**report, "if": {**new, "unfinished": report["if"].get("unfinished")}, "if_scored_by": code_version()}


def choice_verdicts(model, tok, task, n=None, seed=0, batch_size=E.BATCH_SIZE, split="test") -> tuple[list, list]:
    """Per test item of the task (the first n; its training items for split "dev": a general task is
    never trained on): 1.0 when the gold is strictly first among its choices by summed log-prob, as
    evaluate.py's choice_accuracy scores it (its mean), and 1 / (choices), the item's chance level."""
    items = task.test if split == "test" else task.train
    test = list(items)[:n] if n else list(items)
    golds = E._golds(tok, task, test)              # evaluate's own gold and distractor ids: one scoring
    conts = E._choice_conts(tok, task, test, golds, seed, distinct_outputs(task))
    with eval_mode(model):
        scores, _ = run_prompts(model, [render_prompt(tok, ex) for ex in test], conts, prune=True,
                                batch_size=batch_size, progress=False)
    labels = distinct_outputs(task)
    chance = [1.0 / len(choice_candidates(task, ex, i, seed, labels)) for i, ex in enumerate(test)]
    return [float(all(s[0] > x for x in s[1:])) for s in scores], chance


def knowledge_part(model, tok, tasks, *, n=None, seed=0, batch_size=E.BATCH_SIZE, n_boot=R.N_BOOT, split="test"):
    out = {}
    for task in tasks:
        items, chance = choice_verdicts(model, tok, task, n, seed, batch_size, split)
        out[task.name] = {"n": len(items), "chance": sum(chance) / len(chance),
                          "choice_accuracy": R.mean_se(items, n_boot, seed, f"knowledge/{task.name}"),
                          "items": items}
    return out


def drift_part(original, model, tok, prompts, cache_dir, *, n=None, max_new_tokens=drift.REPLY_TOKENS,
               batch_size=32, n_boot=R.N_BOOT, seed=0):
    """KL(original || model) per token on the original's replies to the first n prompts, with its SE
    over prompts; the original itself scores 0 without a forward. The replies to *all* the prompts are
    generated once into cache_dir, so a stage's subset and the full set read the same replies."""
    rep = drift.original_replies(original, tok, prompts, cache_dir, max_new_tokens, batch_size)
    rep = {**rep, "prompt_ids": rep["prompt_ids"][:n or None], "reply_ids": rep["reply_ids"][:n or None]}
    prompts = prompts[:n or None]
    stop = tok.stop_ids()
    out = {"n": len(prompts), "reply_cache": str(drift.reply_cache_path(cache_dir, rep["key"])),
           "reply_tokens": sum(len(r) for r in rep["reply_ids"]) / len(prompts),
           "unfinished": sum(r[-1] not in stop for r in rep["reply_ids"]) / len(prompts)}
    if model is original:
        kl = {"kl_sum": [0.0] * len(prompts), "tokens": [len(r) for r in rep["reply_ids"]]}
    else:
        kl = drift.drift_kl(original, model, rep["prompt_ids"], rep["reply_ids"], batch_size=16)
    out["kl_per_token"] = R.ratio_se(kl["kl_sum"], kl["tokens"], n_boot, seed, "drift")
    out["items"] = {"kl_sum": kl["kl_sum"], "tokens": kl["tokens"]}
    return out


def general_eval(model, tok, *, original=None, parts=("if", "knowledge", "drift"), n_if=None, n_drift=None,
                 n_knowledge=None, cache_dir=None, if_tokens=IF_TOKENS, drift_tokens=drift.REPLY_TOKENS,
                 batch_size=64, n_boot=R.N_BOOT, seed=0, dtype="float32", split="test") -> dict:
    """Every part for one model -> {part: summary with SEs and per-item results, "seconds": {part: s}}.
    original: the model drift is measured from (None = this model, i.e. the base run); n_*: the first
    n items of each part (None = all); *_tokens: the reply budgets; split: "test" (the results) or
    "dev" (SPLITS: other prompts, and the general tasks' training items, for choosing settings)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if_file, everyday_file = SPLITS[split]
    original = model if original is None else original
    out, seconds = {}, {}
    with autocast(dtype):
        for part in parts:
            t0 = time.perf_counter()
            if part == "if":
                out["if"] = if_part(model, tok, ifeval.load_ifeval(if_file, n=n_if), max_new_tokens=if_tokens,
                                    batch_size=batch_size, n_boot=n_boot, seed=seed)
            elif part == "knowledge":
                tasks = [T.load_task(name) for name in T.general_suite()]
                out["knowledge"] = knowledge_part(model, tok, tasks, n=n_knowledge, seed=seed, n_boot=n_boot,
                                                  split=split)
            elif part == "drift":
                out["drift"] = drift_part(original, model, tok, drift.load_everyday(everyday_file),
                                          cache_dir or ROOT / "runs" / "drift_replies", n=n_drift,
                                          max_new_tokens=drift_tokens, batch_size=batch_size, n_boot=n_boot,
                                          seed=seed)
            else:
                raise ValueError(f"unknown part {part!r}; known: if, knowledge, drift")
            seconds[part] = round(time.perf_counter() - t0, 1)
    out["seconds"] = seconds
    return out


# ---------------------------------------------------------------------------------------------
# A tuned model against the base: retention endpoints and drift

def endpoints(base: dict, tuned: dict, *, keep=R.KEEP, n_boot=R.N_BOOT, seed=0) -> dict:
    """Per-task retention over the knowledge tasks and IF (IF_ENDPOINT per prompt), chance-corrected
    for the choice tasks (a collapsed model still ranks 1 in 4 golds first), the robust endpoints over
    those tasks, and the tuned model's drift; every number with a paired bootstrap SE. Both reports
    must hold the same items (the same n_* settings)."""
    b_items, t_items, chance = {}, {}, {}
    for name, k in base.get("knowledge", {}).items():
        b_items[name], t_items[name], chance[name] = k["items"], tuned["knowledge"][name]["items"], k["chance"]
    if "if" in base:
        per = lambda rep, mode: [float(all(i[mode])) for i in rep["if"]["items"]]   # noqa: E731
        mode = IF_ENDPOINT.split("_")[1]
        b_items["ifeval"], t_items["ifeval"] = per(base, mode), per(tuned, mode)
    out = R.retention_report(b_items, t_items, chance, keep=keep, n_boot=n_boot, seed=seed)
    if "drift" in tuned:
        out["drift_kl_per_token"] = tuned["drift"]["kl_per_token"]
    return out


def summary(report: dict) -> dict:
    """The report without its per-item lists (what a table needs)."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "items"}
    return strip(report)


# ---------------------------------------------------------------------------------------------
# A run's stages: the per-stage subset after each stage, every item after the last

def first_items(report: dict, n_if=None, n_drift=None, n_knowledge=None) -> dict:
    """The report's per-item results cut to the first n IF prompts, everyday prompts and items per
    knowledge task (None = all): the base a stage's subset is paired with (endpoints() reads items)."""
    out = dict(report)
    if "if" in report:
        out["if"] = {**report["if"], "items": report["if"]["items"][:n_if or None]}
    if "knowledge" in report:
        out["knowledge"] = {name: {**k, "items": k["items"][:n_knowledge or None]}
                            for name, k in report["knowledge"].items()}
    if "drift" in report:
        out["drift"] = {**report["drift"], "items": {key: v[:n_drift or None]
                                                     for key, v in report["drift"]["items"].items()}}
    return out


def stage_dirs(run_dir) -> list[tuple[int, Path]]:
    """[(k, run_dir/stage-k)] in stage order: the checkpoints train.py keeps after each task."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"--run {run}: not a folder (a train.py --out_dir)")
    dirs = sorted((int(p.name[6:]), p) for p in run.glob("stage-*") if p.name[6:].isdigit() and p.is_dir())
    if not dirs:
        raise ValueError(f"--run {run}: no stage-<k> folders (train.py writes one after each task)")
    return dirs


def check_base(base: dict, path, parts, split: str, n_knowledge) -> None:
    """The base report a run is compared with must be of the same split, hold every part asked for,
    and every IF and everyday prompt (the last stage is scored on all of them)."""
    st = base.get("settings", {})
    if st.get("split", "test") != split:
        raise ValueError(f"--base {path}: its split is {st.get('split')!r}, the run's evaluation is {split!r}")
    if missing := [q for q in parts if q not in base]:
        raise ValueError(f"--base {path}: lacks the part(s) {missing} (general_eval.py --parts)")
    for key, want in (("n_if", 0), ("n_drift", 0), ("n_knowledge", n_knowledge or 0)):
        if st.get(key, 0) != want:
            raise ValueError(f"--base {path}: settings.{key} is {st.get(key)}, needs {want} (every item)")


def stage_curve(dirs, base: dict, original, *, out, parts=("if", "knowledge", "drift"), n_stage=STAGE_N,
                n_knowledge=None, split="test", load=None, header=None, **kw) -> dict:
    """Every stage of a run against the base report: the first n_stage IF and everyday prompts after
    each stage but the last, every one after the last (issue 38's per-stage budget: bench_general_eval.py).
    dirs: [(k, checkpoint)] (stage_dirs); original: the model drift is measured from; load(path) ->
    (model, tok). The report is written to `out` after each stage, and a rerun keeps the stages it
    holds under the same header (what the CLI ran: run, base, settings). kw: general_eval()'s budgets,
    batch size, n_boot and seed."""
    load = load or load_model
    header = header or {}
    prior = _read(out)
    done = {s["stage"]: s for s in prior.get("stages", [])} if {k: prior.get(k) for k in header} == header else {}
    report = {**header, "code": code_version(), "stages": []}
    for k, path in dirs:
        last = k == dirs[-1][0]
        n = None if last else n_stage
        if k in done and done[k]["subset"] == (not last):
            report["stages"].append(done[k])
            continue
        model, tok = load(path)
        r = general_eval(model, tok, original=original, parts=parts, n_if=n, n_drift=n,
                         n_knowledge=n_knowledge, split=split, **kw)
        e = endpoints(first_items(base, n, n, n_knowledge), r, n_boot=kw.get("n_boot", R.N_BOOT),
                      seed=kw.get("seed", 0))
        report["stages"].append({"stage": k, "model": repo_path(path), "subset": not last, "endpoints": summary(e),
                                 "scores": summary({q: r[q] for q in parts}), "seconds": r["seconds"]})
        write_json_atomic(out, report)
        print(stage_line(report["stages"][-1]), flush=True)
        del model          # before the next stage's load: one tuned model in memory at a time
    return report


def stage_line(s: dict) -> str:
    """One log line per stage: IF retention, median retention, tasks kept, drift."""
    e, per = s["endpoints"], s["endpoints"].get("per_task", {})
    fmt = lambda x: "-" if x is None or x.get("value") is None else f"{x['value']:.3f}"   # noqa: E731
    return (f"stage {s['stage']} ({'subset' if s['subset'] else 'every item'}): IF retention "
            f"{fmt(per.get('ifeval', {}).get('retention'))} | median retention "
            f"{fmt(e['endpoints']['median_retention'])} | tasks kept {fmt(e['endpoints']['tasks_kept'])} | "
            f"drift {fmt(e.get('drift_kl_per_token'))} | {sum(s['seconds'].values()):.0f} s")


def repo_path(path) -> str:
    """The path relative to the repository where it lies inside it (a report stays true when the
    clone moves), else absolute."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _read(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("I/O")
    g.add_argument("--model", default=None, help="checkpoint (.gguf or HF folder); none = the embedded "
                   "SmolLM2-135M-Instruct")
    g.add_argument("--original", default=None, help="the model drift is measured from; none = the embedded "
                   "model (the base run measures itself: KL 0, and caches its replies)")
    g.add_argument("--out", default=None, help="JSON report (default: results/general_eval.json; with --run, "
                   "RUN/general_stages.json)")
    g.add_argument("--run", default=None, help="a train.py --out_dir: every stage-k in it against --base, the "
                   f"first --n_if / --n_drift prompts ({STAGE_N} if 0) after each stage, every one after the last")
    g.add_argument("--base", default=str(ROOT / "results" / "general_eval.json"), help="with --run: the "
                   "original model's report on every item of the split (this script without --model)")
    g.add_argument("--cache_dir", default=str(ROOT / "runs" / "drift_replies"), help="the original's replies")
    g.add_argument("--rescore", metavar="REPORT", default=None, help="score a report's stored IF replies again "
                   "with the current checkers and rewrite it (no model is run)")
    g = p.add_argument_group("data")
    g.add_argument("--parts", default="if,knowledge,drift", help="comma-separated parts: if, knowledge, drift")
    g.add_argument("--split", default="test", choices=list(SPLITS), help="test: the results' items; dev: other "
                   "prompts and the general tasks' training items, for choosing settings")
    g.add_argument("--n_if", type=int, default=0, help=f"first n IF prompts (0 = all; {STAGE_N} per stage)")
    g.add_argument("--n_drift", type=int, default=0, help=f"first n everyday prompts (0 = all; {STAGE_N} per stage)")
    g.add_argument("--n_knowledge", type=int, default=0, help="first n test items per general task (0 = all)")
    g.add_argument("--n_boot", type=int, default=R.N_BOOT, help="bootstrap replicates of every SE")
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the choice distractors")
    g = p.add_argument_group("system")
    g.add_argument("--batch_size", type=int, default=64, help="prompts per forward pass / rows per decoding step")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; 1 on a "
                   "shared machine)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parts = tuple(s.strip() for s in args.parts.split(",") if s.strip())
    if bad := [s for s in parts if s not in ("if", "knowledge", "drift")]:
        print(f"general_eval.py: error: --parts: unknown part(s) {bad}; known: if, knowledge, drift", file=sys.stderr)
        return 2
    if args.rescore:
        try:
            report = rescore_if(json.loads(Path(args.rescore).read_text()))
        except (OSError, ValueError, KeyError) as e:
            print(f"general_eval.py: error: --rescore {args.rescore}: {e}", file=sys.stderr)
            return 2
        write_json_atomic(args.rescore, report)
        print(json.dumps(summary({"if": report["if"]}), indent=1))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print("config: " + json.dumps(vars(args)))
    if args.run:
        return main_run(args, parts)
    args.out = args.out or str(ROOT / "results" / "general_eval.json")
    report = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "original": args.original or "embedded",
              "settings": {k: getattr(args, k) for k in ("split", "n_if", "n_drift", "n_knowledge", "n_boot", "seed",
                                                          "dtype", "batch_size")}
              | {"if_tokens": IF_TOKENS, "drift_tokens": drift.REPLY_TOKENS, "threads": torch.get_num_threads()},
              "code": code_version(), "seconds": {}}
    try:
        check_writable(Path(args.out).resolve().parent)
        model, tok = load_model(args.model, device=args.device)
        original = model if args.original == args.model else load_model(args.original, device=args.device)[0]
        for part in parts:      # the report is written after each part: a long run keeps what it finished
            r = general_eval(model, tok, original=original, parts=(part,), n_if=args.n_if or None,
                             n_drift=args.n_drift or None, n_knowledge=args.n_knowledge or None,
                             cache_dir=args.cache_dir, batch_size=args.batch_size, n_boot=args.n_boot,
                             seed=args.seed, dtype=args.dtype, split=args.split)
            report["seconds"].update(r.pop("seconds"))
            report.update(r)
            write_json_atomic(args.out, report)
            print(json.dumps(summary({part: r[part], "seconds": report["seconds"]}), indent=1), flush=True)
    except (ValueError, OSError) as e:          # LoadError, IFEvalError, DriftError, TaskError are ValueErrors
        print(f"general_eval.py: error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {args.out}")
    return 0


def main_run(args, parts) -> int:
    """--run: the run's stage curve (stage_curve), checked before anything is loaded or written."""
    try:
        dirs = stage_dirs(args.run)
        try:
            base = json.loads(Path(args.base).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--base {args.base}: not a readable JSON report ({e})") from None
        check_base(base, args.base, parts, args.split, args.n_knowledge)
        if (args.n_if or STAGE_N) != (args.n_drift or STAGE_N):
            raise ValueError(f"--n_if {args.n_if} and --n_drift {args.n_drift}: a stage's subset takes one size")
        out = Path(args.out or Path(args.run) / "general_stages.json")
        check_writable(out.resolve().parent)
        header = {"run": repo_path(args.run), "base": repo_path(args.base),
                  "original": args.original or "embedded",
                  "settings": {"split": args.split, "parts": list(parts), "n_stage": args.n_if or STAGE_N,
                               "n_knowledge": args.n_knowledge,
                               "n_boot": args.n_boot, "seed": args.seed, "dtype": args.dtype}}
        original = load_model(args.original, device=args.device)[0]
        stage_curve(dirs, base, original, out=out, parts=parts, n_stage=args.n_if or STAGE_N,
                    n_knowledge=args.n_knowledge or None, split=args.split, header=header,
                    load=lambda path: load_model(path, device=args.device), batch_size=args.batch_size,
                    n_boot=args.n_boot, seed=args.seed, dtype=args.dtype)
    except (ValueError, OSError) as e:
        print(f"general_eval.py: error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
