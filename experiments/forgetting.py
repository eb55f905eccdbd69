"""
Forgetting measured where it can be seen (experiments/study_protocol.md, amendment 3): every method over
its strength on the general evaluation of experiments/general_eval.py (verifiable instruction following,
knowledge by likelihood, drift KL), a regime off the floor chosen on the dev split, then a confirmation
on the test split. Runs in parts and resumes: every finished run leaves its record in
results/forgetting/, and a rerun skips it.

    python experiments/forgetting.py --sweep --workers 2     # dev split, stage 1 (uppercase): every method x strength
    python experiments/forgetting.py --regime --workers 2    # dev split, the whole sequence: plain at three lrs
    python experiments/forgetting.py --confirm --workers 2   # the registered confirmation (needs both above)
    python experiments/forgetting.py --replay --workers 2    # dev split, stages 1-2: replay over its share (3c)
    python experiments/forgetting.py --all --workers 2       # all three, in that order
    python experiments/forgetting.py --report                # results/forgetting.json, forgetting.md, PNGs
    python experiments/forgetting.py --sweep --dry_run       # print what would run

Every run is fp32 (`--dtype fp32`), one thread per run. The dev split: the new task is scored on its
training examples 320-399 (never trained on), the general evaluation on data/ifeval_dev.jsonl,
data/everyday_dev.jsonl and the general tasks' first 50 training examples (general_eval.py --split dev).
The test split: the tasks' test examples, data/ifeval.jsonl, data/everyday.jsonl.

Files: runs/forgetting/ (train.py's out_dirs, dev task files, logs; not in git);
results/forgetting/{base-dev,sweep/*,replay/*,regime/*,confirm/*}.json (each run's record, in git);
results/forgetting.json, results/forgetting.md, results/forgetting*.png (the report).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import STOPPING, read_json, run_child, stat, stop_signals_to_children  # a sibling: on the path
import forgetting_report as report
from forgetting_report import GRID, REFERENCE, REGIME_LRS, REPLAY, WISE
import general_eval as GE
from tradeoff import flags_of, key_of, machine, run_all, settings_of, train_run, write_split
from ivft import tasks as T
from ivft.files import FolderInUse, RunLock
from ivft.report import save_report
from train import parse_flags

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "forgetting"
RAW = ROOT / "results" / "forgetting"
SEQUENCE = ("uppercase", "date_iso", "reverse_words", "acronym")      # train.py's default sequence
N_TRAIN, N_DEV, N_KNOWLEDGE_DEV = 320, 80, 50
FP32 = ["--dtype", "fp32"]       # every run, on every machine (amendment 2c's lesson)
BASE = ["--general", "none", "--eval_k_shot", "0", "--log_every", "10", *FP32]   # general: general_eval.py

SEEDS = (0, 1, 2)


# ---- data ---------------------------------------------------------------------------------------------

def dev_task_files() -> dict[str, str]:
    """{task: its dev task file}: train = the first 320 training examples, test = examples 320-399."""
    return {n: write_split(RUNS / "dev", t, t.train[:N_TRAIN], t.train[N_TRAIN:N_TRAIN + N_DEV])
            for n in SEQUENCE for t in [T.load_task(n)]}


def general_record(model_dir, split: str, out: Path, threads: int) -> dict | None:
    """general_eval.py on a saved model (drift from the embedded original) -> its report, or None."""
    cmd = [sys.executable, str(ROOT / "experiments" / "general_eval.py"), "--split", split, "--out", str(out),
           "--threads", str(threads), *(["--model", str(model_dir)] if model_dir else []),
           *(["--n_knowledge", str(N_KNOWLEDGE_DEV)] if split == "dev" else [])]
    rc = run_child(cmd, RUNS / "logs" / f"general-{out.parent.name}-{out.stem}.txt")
    return read_json(out) if rc == 0 else None


def base_report(split: str, threads: int = 1) -> dict | None:
    """The original model's general evaluation on the split (made once; the test one is
    results/general_eval.json, every item)."""
    path = RAW / "base-dev.json" if split == "dev" else ROOT / "results" / "general_eval.json"
    return rescored(read_json(path) or general_record(None, split, path, threads))


# ---- one run: train.py, then the general evaluation of its last stage --------------------------------

def trained_record(raw: Path, flags: list[str], n_stages: int, split: str, threads: int, dry_run: bool,
                   labels: dict, keep: bool = False, extra=None) -> tuple[dict | None, str]:
    """train.py FLAGS, then general_eval.py on its last stage -> (record, "") once both ran, else (None,
    what happened). The record, written once: train.py's results.json (scores per stage), "general"
    (the report), "seconds", "machine" and labels. keep: the checkpoints outlive the record (WiSE-FT
    mixes them later); extra(out_dir, record): more measures made on the run's models before they are
    removed. A rerun after a kill resumes train.py and reuses a general evaluation that finished."""
    if raw.is_file():
        return None, f"{raw.relative_to(RAW)}: done"
    out = RUNS / raw.parent.name / raw.stem
    if dry_run:
        return None, "python train.py " + " ".join(flags + ["--out_dir", str(out)])
    t0, log = time.time(), RUNS / "logs" / f"{raw.parent.name}-{raw.stem}.txt"
    r = train_run(out, flags, threads, log)
    if r is None:
        return None, f"{raw.relative_to(RAW)}: FAILED or stopped (see {log})"
    gen_path = RUNS / raw.parent.name / f"{raw.stem}.general.json"
    gen = read_json(gen_path)      # general_eval.py writes after each part: a cut one lacks some
    if not (gen and all(k in gen for k in ("if", "knowledge", "drift"))):
        gen = general_record(out / f"stage-{n_stages}", split, gen_path, threads)
    if gen is None:
        return None, f"{raw.relative_to(RAW)}: general evaluation FAILED (see {RUNS / 'logs'})"
    r.update(general=gen, seconds=round(time.time() - t0), machine=machine(), **labels)
    if extra and (msg := extra(out, r)):
        return None, msg
    save_report(r, raw)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)       # checkpoints: 0.5 GB a stage, never read again
    return r, ""


def wise_record(src: Path, alpha: float, tasks: str, n: int, split: str, raw: Path, threads: int,
                labels: dict) -> str:
    """WiSE-FT (Wortsman et al. 2022) post hoc: the original and src's weights mixed at alpha, scored on
    the training tasks (first n test items) and by the general evaluation -> "" once raw (the report
    with labels) is written, else what failed. wise.py writes under runs/; raw is written once."""
    out = RUNS / "wise" / f"{raw.parent.name}-{raw.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "experiments" / "wise.py"), "--tuned", str(src), "--alpha", str(alpha),
           "--tasks", tasks, "--n", str(n), "--split", split, "--out", str(out), "--threads", str(threads),
           *(["--n_knowledge", str(N_KNOWLEDGE_DEV)] if split == "dev" else [])]
    rc = run_child(cmd, RUNS / "logs" / f"wise-{raw.parent.name}-{raw.stem}.txt")
    if rc != 0 or (r := read_json(out)) is None:
        return f"{raw.name}: FAILED (see {RUNS / 'logs'})"
    save_report({**r, **labels}, raw)
    return ""


# ---- the sweep (dev, stage 1) -------------------------------------------------------------------------

def dev_flags(n_tasks: int, cache: str, flags=()) -> list[str]:
    """train.py on the first n_tasks of the dev sequence, seed 0, with BASE, then FLAGS; its stage-0
    evaluation cached as runs/forgetting/dev/stage0-CACHE.json (one per task list)."""
    files = dev_task_files()
    return ["--tasks", ",".join(files[n] for n in SEQUENCE[:n_tasks]), "--eval_n", str(N_DEV), "--seed", "0",
            "--stage0_cache", str(RUNS / "dev" / f"stage0-{cache}.json"), *BASE, *flags]


def sweep_point(method: str, label: str, strength: float, flags: list[str], threads: int, dry_run=False) -> str:
    raw = RAW / "sweep" / f"{method}.{key_of(label)}.json"
    keep = (method, label) == REFERENCE
    extra = (lambda out, r: wise_points(out, threads)) if keep else None
    labels = {"method": method, "label": label, "strength": strength, "settings": settings_of(flags),
              "split": "dev", "task": "uppercase"}
    r, msg = trained_record(raw, dev_flags(1, "uppercase", flags), 1, "dev", threads, dry_run, labels, keep=keep, extra=extra)
    if r is None:
        return msg
    if keep:
        shutil.rmtree(RUNS / "sweep" / raw.stem, ignore_errors=True)
    return f"{raw.name}: new task {r['cl']['R'][1][0]:.2f} ({r['seconds']} s)"


def wise_points(out: Path, threads: int) -> str:
    """The WiSE-FT points on the reference run's stage-1 model -> "" or what failed."""
    for label, a in WISE:
        raw = RAW / "sweep" / f"wise.{key_of(label)}.json"
        if not raw.is_file() and (msg := wise_record(
                out / "stage-1", a, dev_task_files()["uppercase"], N_DEV, "dev", raw, threads,
                {"method": "wise", "label": label, "strength": a, "settings": {"alpha": a}, "split": "dev",
                 "task": "uppercase"})):
            return msg
    return ""


def sweep_jobs():
    """Every point; the reference first (the WiSE-FT points and the choice read it), then by rank."""
    order = [(m, *pt) for i in range(max(map(len, GRID.values()))) for m, v in GRID.items() if i < len(v)
             for pt in [v[i]]]
    return sorted(order, key=lambda j: (j[0], j[1]) != REFERENCE)


def replay_point(label: str, strength: float, flags: list[str], threads: int, dry_run=False) -> str:
    """Replay over its share on stages 1-2 of the dev sequence (amendment 3c: in stage 1 it has nothing
    to replay), at regime A's defaults, seed 0; the general evaluation on the stage-2 model."""
    raw = RAW / "replay" / f"{key_of(label)}.json"
    labels = {"method": "replay", "label": label, "strength": strength, "settings": settings_of(flags),
              "split": "dev", "tasks": list(SEQUENCE[:2])}
    r, msg = trained_record(raw, dev_flags(2, "stages12", flags), 2, "dev", threads, dry_run, labels)
    return msg if r is None else f"{raw.name}: date_iso {r['cl']['R'][2][1]:.2f} ({r['seconds']} s)"


# ---- the regime off the floor (dev, the whole sequence) ----------------------------------------------

def regime_run(lr: float, threads: int, dry_run=False) -> str:
    raw = RAW / "regime" / f"plain.lr_{lr:g}.json"
    r, msg = trained_record(raw, dev_flags(len(SEQUENCE), "sequence", ["--lr", str(lr)]), len(SEQUENCE), "dev", threads, dry_run,
                            {"method": "plain", "lr": lr, "split": "dev"})
    return msg if r is None else f"{raw.name}: done ({r['seconds']} s)"


# ---- the confirmation (test split) ---------------------------------------------------------------------

def confirm_flags(settings: dict, seed: int) -> list[str]:
    return [*flags_of(settings), "--seed", str(seed), "--eval_n", "50",
            "--stage0_cache", str(RUNS / "confirm" / "stage0.json"), "--save_every", "40", *BASE]


def confirm_run(regime: str, label: str, settings: dict, seed: int, threads: int, dry_run=False,
                wise_alpha: float | None = None) -> str:
    raw = RAW / "confirm" / f"{regime}.{key_of(label)}-s{seed}.json"
    extra = None
    if wise_alpha is not None:      # plain's final model, mixed with the original (post hoc, WiSE-FT)
        def extra(out, r):
            w = RAW / "confirm" / f"{regime}.wise-s{seed}.json"
            return "" if w.is_file() else wise_record(
                out / f"stage-{len(SEQUENCE)}", wise_alpha, ",".join(SEQUENCE), 50, "test", w, threads,
                {"label": "wise", "settings": {"alpha": wise_alpha}, "regime": regime, "seed": seed})
    r, msg = trained_record(raw, confirm_flags(settings, seed), len(SEQUENCE), "test", threads, dry_run,
                            {"label": label, "settings": settings, "regime": regime, "seed": seed}, extra=extra)
    return msg if r is None else f"{raw.name}: done ({r['seconds']} s)"


RUN_ONLY = ("out_dir", "num_threads", "code", "resume", "overwrite")   # where and how fast, not what is trained


def config_key(settings: dict) -> str:
    """The train.py configuration a confirmatory arm's settings resolve to (presets and defaults filled,
    as train.py does; not where or how fast it runs), as a key: two labels with one key are one run."""
    cfg = parse_flags(confirm_flags(settings, 0))
    return json.dumps({k: v for k, v in cfg.items() if k not in RUN_ONLY}, sort_keys=True, default=str)


def twins(plan: dict) -> dict[str, dict[str, list]]:
    """{regime: {label: [regime, label] of an earlier arm, in any regime, that trains the very same run}}."""
    out, seen = {}, {}
    for regime, arms in plan["arms"].items():
        for label, settings in arms.items():
            key = config_key(settings)
            if key in seen:
                out.setdefault(regime, {})[label] = list(seen[key])
            seen.setdefault(key, (regime, label))
    return out


def confirm_jobs(plan: dict) -> list:
    """(regime, label, settings, seed, wise α) in the order they start: seed by seed, the off-floor
    regime's arms first; an arm that trains the same run as an earlier one (twins) is not run again:
    the report shows the earlier arm's records under it too."""
    tw = twins(plan)
    return [(regime, label, settings, seed, plan["wise_alpha"] if label == "plain" else None)
            for seed in SEEDS for regime, arms in plan["arms"].items() for label, settings in arms.items()
            if label not in tw.get(regime, {})]


# ---- main -----------------------------------------------------------------------------------------------

def rescored(report: dict | None) -> dict | None:
    """A general-eval report with its IF part scored from its stored replies by the current checkers
    (amendment 3a's answer rule applies to the records made before it; a newer one is unchanged)."""
    return GE.rescore_if(report) if report else report


def records(part: str) -> list[dict]:
    out = [r for p in sorted((RAW / part).glob("*.json")) if (r := read_json(p))]
    return [{**r, "general": rescored(r["general"])} for r in out]


def write_report() -> str:
    base_dev = base_report("dev")
    p = report.plan(records("sweep"), records("regime"), base_dev) if base_dev else None
    return report.write(records("sweep"), records("regime"), records("confirm"), base_dev, base_report("test"),
                        twins(p) if p else {}, records("replay"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="run the dev sweep's missing points")
    p.add_argument("--regime", action="store_true", help="run the dev sequence runs that choose the off-floor regime")
    p.add_argument("--confirm", action="store_true", help="run the missing confirmatory runs (seed by seed)")
    p.add_argument("--replay", action="store_true", help="run replay's missing points (stages 1-2; amendment 3c)")
    p.add_argument("--all", action="store_true", help="--sweep, --regime, then --confirm")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the records")
    p.add_argument("--only", default=None, help="only points or arms of this method / label")
    p.add_argument("--workers", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if not (args.sweep or args.regime or args.confirm or args.replay or args.all):
        print(write_report())
        return 0
    if args.dry_run:       # prints only: no lock, nothing written
        return run_parts(args)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "logs").mkdir(exist_ok=True)
    try:
        with RunLock(RUNS, what="runs/forgetting (another forgetting.py)", name="driver.lock"):
            failed = run_parts(args)
    except FolderInUse as e:
        print(e, file=sys.stderr)
        return 1
    print(write_report())
    return 1 if failed else 0


def run_parts(args) -> int:
    failed, go = 0, lambda jobs, fn: run_all(jobs, 1 if args.dry_run else args.workers, fn)
    if not args.dry_run and base_report("dev", args.threads) is None:
        print("the base model's dev evaluation FAILED (see runs/forgetting/logs)", file=sys.stderr)
        return 1
    if args.sweep or args.all or args.regime:
        sweep = [j for j in sweep_jobs() if args.only in (None, j[0])] if (args.sweep or args.all) else []
        regime = [("regime", lr) for lr in REGIME_LRS] if (args.regime or args.all) and args.only is None else []
        jobs = sweep[:1] + regime + sweep[1:]     # right after the reference point, so that both finish early
        failed += go(jobs, lambda *j: regime_run(j[1], args.threads, args.dry_run) if j[0] == "regime"
                     else sweep_point(*j, args.threads, dry_run=args.dry_run))
    if args.replay:
        failed += go(REPLAY, lambda *j: replay_point(*j, args.threads, args.dry_run))
    if (args.confirm or args.all) and not STOPPING.is_set():
        plan = report.plan(records("sweep"), records("regime"), base_report("dev"))
        if plan is None:
            print("the dev sweep or the regime runs are not complete: the confirmatory points cannot be chosen",
                  file=sys.stderr)
            return failed + 1
        jobs = [j for j in confirm_jobs(plan) if args.only in (None, j[1])]
        failed += go(jobs, lambda regime, label, settings, seed, wise: confirm_run(
            regime, label, settings, seed, args.threads, args.dry_run, wise))
    return failed


if __name__ == "__main__":
    with stop_signals_to_children():     # Ctrl-C / SIGTERM: its train.py runs save and stop
        sys.exit(main())
