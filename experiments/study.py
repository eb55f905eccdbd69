"""
The pre-registered study of experiments/study_protocol.md, run in parts and resumable.

Archived: the study has run (results/study.md, results/study.json) and this file is kept as it ran,
to rerun or audit it, not to build on. What later experiments share with it (running train.py as a
child, a run's summary, mean and std over seeds, the analyses' IV settings) is in
experiments/common.py; tradeoff.py and reinject.py import that, not this file.

Question: does IV-guided training (train.py --preset guided) reduce forgetting of general abilities
compared with plain sequential fine-tuning, at no cost to learning the new tasks? Six methods
(plain, replay, lwf, iv_only, guided, fvg: train.py --preset NAME) x two regimes (A: --regime full,
B: --regime lora) x seeds 0, 1, 2 = 36 train.py runs, each on the default sequence with 50 test
examples per task and stage; then four analyses (the protocol's findings a-d) per regime on the
seed-0 runs of plain and guided. The decision rule, the measures and the analyses are the protocol's;
this file only carries them out.

    python experiments/study.py --list          # every part, its status and minutes, and the next one
    python experiments/study.py                 # runs the next unfinished part, then writes the report
    python experiments/study.py --part B-s0a --workers 2   # one part (finished runs are skipped, a cut one resumes)
    python experiments/study.py --part A-s1 --dry_run   # prints the part's train.py commands only
    python experiments/study.py --run B-fvg-s2  # only that run of its part (a long one first)
    python experiments/study.py --report        # only rebuilds results/study.md and results/study.json

Parts, in the order a bare `study.py` takes them. On the 2-core CPU a regime-A part takes about
75 min one run at a time (40 with --workers 2), a regime-B part 1.6-1.8 h with --workers 2, except
the ones with fvg: 3.2 h, longer than a 3-hour working session. Start such a run first (--run) or
let it be cut: a cut part resumes where it stopped and loses at most 100 steps of a run.
  A-s0              the six method runs of regime A, seed 0 (A-plain-s0 ... A-fvg-s0)
  B-s0a             B-plain-s0 and B-guided-s0 (regime B's runs are long: two per part, --workers 2)
  analysis-A, -B    findings (b)-(d) on <regime>-plain-s0 and <regime>-guided-s0 (needs their stage
                    checkpoints); finding (a) comes from the runs' own stage reports
  B-s0b, B-s0c      replay and lwf; iv_only and fvg
  A-s1, B-s1a, B-s1b, B-s1c, A-s2, B-s2a, B-s2b, B-s2c
How long each part takes on the 2-core CPU: measured times: results/study/timings.json, shown by
--list (until a part has run, --list estimates it from the measured runs of the same regime, or
gives a rough guess marked as such). --workers N runs N train.py processes at a time, each on
--threads threads (default: the CPU count / N).

Files: runs/study/<name>/ (train.py's out_dir: checkpoints, log.txt, results.json; not in git;
checkpoints are deleted after a run except for {A,B}-plain-s0 and {A,B}-guided-s0, which the
analyses read), runs/study/logs/<name>.txt (train.py's output), runs/study/stage0.json (the
original model's evaluation, shared by all runs), results/study/run_<name>.json (raw copy of each
finished run's results.json), results/study/analysis_<A|B>.json (the analyses, one key per item),
results/study/timings.json, results/study.md and results/study.json (the report; plots beside the
raw files when matplotlib is installed); IV files: the original model's in ivs/<model>/ (train.py's
cache, where extract_iv.py puts them), the re-extracted ones in results/study/ivs/ (not in git).
The analyses run in this process on --workers x --threads threads. A run that was cut off resumes
from its last checkpoint (train.py --resume); a finished one (its raw copy is complete: what --list,
a bare study.py and --report all count) is skipped; an analysis item that is in its file is not redone.
One study.py at a time per part and per run: a second one is refused with one line (the locks
runs/study/logs/<name>.lock; train.py locks its own out_dir as well). A study.py killed outright
(SIGKILL) takes its train.py runs with it (the kernel sends them SIGTERM: they save and stop), and
the next study.py of such a run adds the killed session's minutes to timings.json, up to the run's
last log line.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import evaluate as E
import extract_iv as X
# siblings: a script's own folder is on its path
from common import (IV_SETTINGS, STOPPING, mean_std, read_json, run_train, stat, stop_signals_to_children,
                    summarise)
from ivft import tasks as T
from ivft.engine import autocast, greedy_replies, model_device
from ivft.files import FolderInUse, RunLock, write_atomic, write_json_atomic
from ivft.ivcheck import gap_or_none, spearman
from ivft.ivfile import iv_filename, model_tag
from ivft.ivprompts import chat_prompt, score_prompts
from ivft.load import load_model
from ivft.report import mean, pyplot, save_report
from ivft.runtime import STOP_SIGNALS
from lora_pilot import EXTENDED
from model import Intervention
from train import PRESETS              # the methods' and regimes' presets are train.py's

ROOT = Path(__file__).resolve().parent.parent

PROTOCOL = ROOT / "experiments" / "study_protocol.md"
RUNS = ROOT / "runs" / "study"
OUT = ROOT / "results"
RAW = OUT / "study"                        # raw JSON per run and analysis, timings, plots

REGIMES = {"A": ["--regime", "full"], "B": ["--regime", "lora"]}
METHODS = {m: ["--preset", m] for m in ("plain", "replay", "lwf", "iv_only", "guided", "fvg")}
SEEDS = (0, 1, 2)
# everything else is train.py's defaults and the regime's preset (train.py's PRESETS)
SIZE = ["--eval_n", "50", "--eval_k_shot", "3"]
ANALYSED = ("plain", "guided")             # the analyses use seed 0 of these (protocol: findings)
KEEP_CHECKPOINTS = {f"{r}-{m}-s0" for r in REGIMES for m in ANALYSED}
# A regime-B run trains 16 epochs of LoRA (the pilot's choice) and takes 1.3-3.2 h on one core, so
# regime B's seeds come in three parts of two runs each (--workers 2; the fvg run alone is 3.2 h,
# results/study/timings.json); "a" holds the two runs the analyses read.
B_GROUPS = {"a": ("plain", "guided"), "b": ("replay", "lwf"), "c": ("iv_only", "fvg")}
PART_ORDER = ("A-s0", "B-s0a", "analysis-A", "analysis-B", "B-s0b", "B-s0c",
              "A-s1", "B-s1a", "B-s1b", "B-s1c", "A-s2", "B-s2a", "B-s2b", "B-s2c")
N_ANALYSIS = 50                            # test examples per task in the analyses (c) and (d)
NOISE_SEED = 1                             # (b)'s noise floor: the original model's IV from other prompts
# Decision rule (protocol): guided's mean GP_drop <= 0.5 x plain's, and guided's mean new_task >=
# plain's - 2 points, over all 3 seeds; plain's GP_drop <= 0 means nothing was forgotten (false).
NEW_TASK_MARGIN = 0.02
EPS = 1e-9                                 # slack for float rounding at the boundaries (scores are k/50)
KEYS = ("GP_drop", "IP_drop", "AP", "BWT", "FWT", "new_task")
# --list's guess for a run or analysis before anything of its kind was measured (minutes, 2-core CPU,
# one worker): the README's measured train.py times are ~8-12 min for full fine-tuning; LoRA here
# trains more epochs. Replaced by measured numbers as soon as one run of the regime has finished.
GUESS_MINUTES = {"A": 10.0, "B": 15.0, "analysis": 60.0}


# ---------------------------------------------------------------------------------------------
# Runs and parts

def run_name(regime: str, method: str, seed: int) -> str:
    return f"{regime}-{method}-s{seed}"


def parse_name(name: str) -> tuple[str, str, int]:
    """'A-guided-s0' -> ('A', 'guided', 0); ValueError for anything else."""
    regime, _, rest = name.partition("-")
    method, _, seed = rest.rpartition("-s")
    if regime not in REGIMES or method not in METHODS or not seed.isdigit() or int(seed) not in SEEDS:
        raise ValueError(f"not a run of the study: {name!r}")
    return regime, method, int(seed)


def run_names() -> list[str]:
    return [run_name(r, m, s) for s in SEEDS for r in REGIMES for m in METHODS]


def run_flags(name: str) -> list[str]:
    regime, method, seed = parse_name(name)
    return [*REGIMES[regime], *METHODS[method], *SIZE, "--seed", str(seed)]


def parts() -> dict[str, dict]:
    """{part name: {"kind": "runs", "runs": [...]} or {"kind": "analysis", "regime", "needs", "items"}}, in order."""
    out = {}
    for p in PART_ORDER:
        if p.startswith("analysis-"):
            r = p.split("-", 1)[1]
            out[p] = {"kind": "analysis", "regime": r, "needs": [run_name(r, m, 0) for m in ANALYSED],
                      "items": analysis_items(r)}
        else:
            r, seed = p.split("-s")
            methods = B_GROUPS[seed[1:]] if seed[1:] else METHODS
            out[p] = {"kind": "runs", "regime": r, "runs": [run_name(r, m, int(seed[0])) for m in methods]}
    return out


def analysis_items(regime: str) -> list[str]:
    """The keys of results/study/analysis_<regime>.json, cheapest first; each is done once."""
    runs = [run_name(regime, m, 0) for m in ANALYSED]
    return ["c/original", *(f"c/{r}" for r in runs), *(f"d/{r}" for r in runs),
            "b/noise_floor", *(f"b/{r}" for r in runs)]


def complete(r: dict | None) -> bool:
    """A results.json of a finished run: one stage report per training task plus the original's."""
    try:
        return len(r["stages"]) == 1 + len(r["cl"]["train_tasks"])
    except (TypeError, KeyError):
        return False


def run_done(name: str) -> bool:
    """The one notion of a finished run, for --list, a bare study.py and --report alike: its raw copy
    results/study/run_<name>.json is complete (what the report reads). A run whose own results.json
    is finished but not yet copied is not done: the next study.py of its part copies it, no training."""
    return complete(read_json(RAW / f"run_{name}.json"))


def run_started(name: str) -> bool:
    d = RUNS / name
    return d.is_dir() and any(d.iterdir())


def load_analysis(regime: str) -> dict:
    return read_json(RAW / f"analysis_{regime}.json") or {}


def part_status(part: str) -> tuple[str, int, int]:
    """-> ("done" | "partly" | "not started", items done, items in all)."""
    p = parts()[part]
    if p["kind"] == "runs":
        done = sum(run_done(n) for n in p["runs"])
        total = len(p["runs"])
        started = done or any(run_started(n) for n in p["runs"])
    else:
        a = load_analysis(p["regime"])
        done = sum(k in a for k in p["items"])
        total = len(p["items"])
        started = done
    return ("done" if done == total else "partly" if started else "not started"), done, total


def next_part() -> str | None:
    return next((p for p in PART_ORDER if part_status(p)[0] != "done"), None)


# ---------------------------------------------------------------------------------------------
# Timings (results/study/timings.json): {name: {"seconds", "complete", "sessions", "threads", "workers"}}

def load_timings() -> dict:
    return read_json(RAW / "timings.json") or {}


def add_timing(name: str, seconds: float, complete_: bool, threads: int, workers: int):
    RAW.mkdir(parents=True, exist_ok=True)
    # a file lock keeps read-modify-writes apart, between the worker threads of one part and between
    # two parts run side by side (each open() is its own lock holder, so threads exclude each other too)
    with open(RAW / "timings.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        t = load_timings()
        old = t.get(name, {})
        t[name] = {"seconds": round(old.get("seconds", 0.0) + seconds, 1), "complete": complete_,
                   "sessions": old.get("sessions", 0) + 1, "threads": threads, "workers": workers}
        write_json_atomic(RAW / "timings.json", t)


def run_minutes(name: str, timings: dict) -> tuple[float, str]:
    """A run's wall minutes: measured, else the mean of measured runs of the same regime and method
    (or regime), else the guess."""
    t = timings.get(name)
    if t and t.get("complete"):
        return t["seconds"] / 60, "measured"
    regime, method, _ = parse_name(name)
    measured = {k: v["seconds"] for k, v in timings.items() if v.get("complete") and not k.startswith("analysis")}
    by_kind: dict[tuple[str, str], list[float]] = {}
    for k, v in measured.items():
        by_kind.setdefault(parse_name(k)[:2], []).append(v)
    cost = {kind: sum(v) / len(v) for kind, v in by_kind.items()}      # mean seconds per (regime, method)
    if (regime, method) in cost:
        return cost[regime, method] / 60, "estimated"
    # no run of this method in this regime yet: each measured run of the regime, scaled by the two
    # methods' cost ratio in the other regime, else the mean of the regime's runs
    other = "B" if regime == "A" else "A"
    same_regime = [(m, v) for (reg, m), vs in by_kind.items() if reg == regime for v in vs]
    scaled = [v * cost[other, method] / cost[other, m] for m, v in same_regime
              if cost.get((other, method)) and cost.get((other, m))]
    if scaled or same_regime:
        got = scaled or [v for _, v in same_regime]
        return sum(got) / len(got) / 60, "estimated"
    # regime B before any of its runs: the LoRA pilot's plain run at the chosen lr and epochs, times
    # the method's cost relative to plain in regime A
    grid = read_json(OUT / "lora_pilot.json") or {}
    choice = grid.get("choice") or {}
    pilot = grid.get(f"lr{choice.get('lr', 0):g}-ep{choice.get('epochs')}", {})
    a_plain, a_same = measured.get(run_name("A", "plain", 0)), measured.get(run_name("A", method, 0))
    if regime == "B" and pilot.get("seconds") and a_plain and a_same:
        return pilot["seconds"] * a_same / a_plain / 60, "estimated"
    return GUESS_MINUTES[regime], "guess"


def part_minutes(part: str, timings: dict, workers: int = 1) -> tuple[float, float, str]:
    """-> (minutes of the whole part, minutes still to run, "measured" | "estimated" | "guess")."""
    p = parts()[part]
    if p["kind"] == "analysis":
        t = timings.get(part)
        if t and t.get("complete"):
            return t["seconds"] / 60, 0.0, "measured"
        other = [v["seconds"] / 60 for k, v in timings.items() if k.startswith("analysis") and v.get("complete")]
        m, kind = (other[0], "estimated") if other else (GUESS_MINUTES["analysis"], "guess")
        return m, (0.0 if part_status(part)[0] == "done" else m), kind
    rows = [(n, *run_minutes(n, timings)) for n in p["runs"]]
    kinds = {k for _, _, k in rows}
    kind = "measured" if kinds == {"measured"} else "guess" if "guess" in kinds else "estimated"
    total = wall_minutes([m for _, m, _ in rows], workers)
    # a cut run resumes from its checkpoint: only what it has not yet spent is left
    left = wall_minutes([max(0.0, m - timings.get(n, {}).get("seconds", 0.0) / 60) for n, m, _ in rows
                         if not run_done(n)], workers)
    return total, left, kind


def wall_minutes(minutes: list[float], workers: int) -> float:
    """Wall time of runs shared out over `workers` processes in their order, each next run to the
    first free one (as run_part's pool does): a part is as long as its busiest worker."""
    busy = [0.0] * max(1, workers)
    for m in minutes:
        busy[busy.index(min(busy))] += m
    return max(busy)


def list_parts(workers: int = 1) -> str:
    timings = load_timings()
    lines = [f"{'part':<12}{'status':<16}{'minutes':<28}what"]
    for name, p in parts().items():
        status, done, total = part_status(name)
        m, left, kind = part_minutes(name, timings, workers)
        st = status if status != "partly" else f"partly {done}/{total}"
        mins = f"{m:.0f} ({kind})" + (f", ~{left:.0f} left" if 0 < left < m else "")
        if p["kind"] == "runs":
            what = f"{len(p['runs'])} runs, {' '.join(REGIMES[p['regime']])}: " + ", ".join(p["runs"])
        else:
            missing = [n for n in p["needs"] if not run_done(n)]
            what = f"findings b-d on {' and '.join(p['needs'])}" + (f" (waits for {', '.join(missing)})" if missing else "")
        lines.append(f"{name:<12}{st:<16}{mins:<28}{what}")
    nxt = next_part()
    lines.append(f"next: {nxt}" if nxt else "all parts done")
    lines.append(f"(minutes: wall time per part with --workers {workers}; measured ones are in {RAW / 'timings.json'})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One study.py per run and per part: the lock runs/study/logs/<name>.lock (ivft.files.RunLock),
# taken by main for the part or run it was asked for and by do_run for each run, so a second
# study.py on the same part or run is refused with one line and no run is trained or timed twice.
# (train.py's own lock on its out_dir keeps out every other writer of a run folder.)

_HELD: dict[str, RunLock] = {}     # the locks this process holds, by run or part name


def claim(key: str, threads: int, workers: int) -> contextlib.AbstractContextManager:
    """Take `key`'s lock now (a run's or a part's name; FolderInUse if another study.py holds it)
    and hold it until the with block that the result opens ends; a key this process holds already
    is not taken again (main's --run NAME, then do_run's). The lock file notes when this claim
    began: a file left by a study.py that was killed (SIGKILL: no handler runs, nothing recorded)
    is how its minutes are accounted for (killed_session)."""
    if key in _HELD:
        return contextlib.nullcontext()
    stamp = {"started": round(time.time(), 1), "threads": threads, "workers": workers}
    lock = RunLock(RUNS / "logs", f"{key}.lock", note=json.dumps(stamp),
                   what=f"study {'run' if key in run_names() else 'part'} {key}")
    lock.acquire()
    _HELD[key] = lock
    if lock.found:
        msg = killed_session(key, lock.found)
        if msg:
            print(msg, flush=True)

    @contextlib.contextmanager
    def held():
        try:
            yield
        finally:
            del _HELD[key]
            lock.release()
    return held()


def last_activity(key: str) -> Path | None:
    """The file whose modification time is the last sign of life of what `key` ran: a run's log
    (train.py's output, to its last line), an analysis's file (saved after each item); None for
    a part of runs (its runs are timed one by one)."""
    if key in run_names():
        return RUNS / "logs" / f"{key}.txt"
    if key.startswith("analysis-"):
        return RAW / f"analysis_{key.split('-', 1)[1]}.json"
    return None


def killed_session(key: str, found: str) -> str | None:
    """A study.py killed while it held `key` (its lock file `found` is left, "<pid> <host> <note>")
    recorded nothing: its minutes go into timings.json now as an unfinished session, counted from
    its claim to the last sign of life of its work (last_activity): a killed run's train.py still
    writes to its log until it has saved and stopped. Not counted: what ran after that last write
    (at most a log interval of train.py, or one analysis item). -> the line saying so, or None."""
    try:
        pid, _, note = found.split(" ", 2)
        stamp = json.loads(note)
        seconds = last_activity(key).stat().st_mtime - float(stamp["started"])
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None            # no note (not a study.py's lock), or nothing of its work on disk
    if seconds <= 0:
        return None
    add_timing(key, seconds, False, int(stamp.get("threads", 0)), int(stamp.get("workers", 0)))
    return f"{key}: {seconds / 60:.1f} min of a study.py that was killed (PID {pid}) added to its timings"


# ---------------------------------------------------------------------------------------------
# Running a part

def train_flags(name: str, threads: int) -> list[str]:
    d = RUNS / name
    has_ckpt = d.is_dir() and (any(d.glob("stage-*")) or (d / "last").exists())
    return ["--out_dir", str(d), *run_flags(name), "--num_threads", str(threads),
            "--stage0_cache", str(RUNS / "stage0.json"), "--log_every", "10",
            "--save_every", "100",     # a run cut off at a session's end loses at most 100 steps
            "--resume" if has_ckpt else "--overwrite"]


# A run that ends on a stop signal (train.py saves `last` and exits 128 + signal, see
# ivft/runtime.run_cli, or dies of the signal) sets common.STOPPING, as a signal to this script does:
# someone is stopping the study, so the part starts no further run.
CUT_CODES = {code for sig in STOP_SIGNALS for code in (128 + sig, -sig)}


def do_run(name: str, threads: int, workers: int = 1) -> tuple[bool, str]:
    """One train.py process (skipped when finished, resumed when cut off); then the raw copy, the
    timing, and the checkpoints removed unless the analyses need them. Not started while another
    study.py holds the run (claim)."""
    if run_done(name):
        return True, f"{name}: done before"
    if STOPPING.is_set():
        return False, f"{name}: not started (a run of this part was cut)"
    try:
        held = claim(name, threads, workers)
    except FolderInUse as e:
        return False, f"{name}: not started: {e}"
    with held:
        return claimed_run(name, threads, workers)


def claimed_run(name: str, threads: int, workers: int) -> tuple[bool, str]:
    d = RUNS / name
    if run_done(name):                            # the study.py that held it before finished it
        return True, f"{name}: done before"
    if not complete(read_json(d / "results.json")):
        t0, rc = time.time(), None
        try:
            rc = run_train(train_flags(name, threads), RUNS / "logs" / f"{name}.txt")
        finally:                                 # a Ctrl-C still records the time spent
            ok = rc == 0 and complete(read_json(d / "results.json"))
            add_timing(name, time.time() - t0, ok, threads, workers)
        if not ok and rc in CUT_CODES:
            STOPPING.set()
            return False, f"{name}: cut by a signal (exit {rc}); the same command resumes it from its checkpoint"
        if not ok:
            return False, f"{name}: FAILED (exit {rc}; see {RUNS / 'logs' / f'{name}.txt'})"
        msg = f"{name}: {(time.time() - t0) / 60:.1f} min"
    else:
        msg = f"{name}: finished before, raw copy made now"
    write_atomic(RAW / f"run_{name}.json", (d / "results.json").read_bytes())
    if name not in KEEP_CHECKPOINTS:            # 0.5 GB per stage; the numbers are in results.json
        for c in [*d.glob("stage-*"), d / "last"]:
            shutil.rmtree(c, ignore_errors=True)
    return True, msg


def lora_unsettled() -> str | None:
    """Regime B runs only with the lr and epochs that experiments/lora_pilot.py chose on the dev split
    (the protocol): None when train.py's lora preset holds them, else why not."""
    choice = (read_json(OUT / "lora_pilot.json") or {}).get("choice")
    if not choice:
        return "experiments/lora_pilot.py has not chosen lr and epochs yet (results/lora_pilot.json)"
    if not choice.get("all_learned") and not set(EXTENDED) <= set(choice.get("epochs_tried", [])):
        return (f"the pilot's choice (lr {choice['lr']}, epochs {choice['epochs']}) does not learn every task and "
                f"amendment 1's epochs {EXTENDED} have not all been tried (experiments/lora_pilot.py)")
    preset = PRESETS["regime"]["lora"]
    if (preset["lr"], preset["epochs"]) != (choice["lr"], choice["epochs"]):
        return (f"train.py's lora preset has lr {preset['lr']}, epochs {preset['epochs']}; the pilot chose "
                f"lr {choice['lr']}, epochs {choice['epochs']}")
    return None


def part_of(name: str) -> str:
    return next(p for p, v in parts().items() if name in v.get("runs", ()))


def run_part(part: str, workers: int, threads: int, dry_run: bool = False, only: str | None = None) -> bool:
    """Runs the part's unfinished runs (`only`: just that one of them) or its analysis."""
    p = parts()[part]
    t0 = time.time()
    say = lambda msg: print(f"[{(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)
    if p["kind"] == "analysis":
        missing = [n for n in p["needs"] if not run_done(n)]
        if missing or dry_run:
            say(f"{part}: " + (f"needs the runs {', '.join(missing)} first" if missing else
                                f"would analyse {', '.join(p['needs'])} on {threads * workers} threads"))
            return not missing
        try:
            held = claim(part, threads * workers, 1)
        except FolderInUse as e:
            say(f"{part}: not started: {e}")
            return False
        with held:
            try:
                msg = analysis(p["regime"], threads * workers, say)
            finally:
                add_timing(part, time.time() - t0, part_status(part)[0] == "done", threads * workers, 1)
        say(msg)
        return part_status(part)[0] == "done"
    names = [only] if only else p["runs"]
    pending = [n for n in names if not run_done(n)]
    problem = lora_unsettled() if p["regime"] == "B" and pending else None
    if problem and not dry_run:
        say(f"{part}: not started: {problem}")
        return False
    if dry_run:
        for n in pending:
            print(" ".join(["python", "train.py", *train_flags(n, threads)]))
        return True
    RUNS.mkdir(parents=True, exist_ok=True)
    ok = True
    if pending and workers > 1 and not (RUNS / "stage0.json").is_file():
        good, msg = do_run(pending.pop(0), threads, workers)   # writes the shared stage-0 evaluation
        ok &= good
        say(msg)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for good, msg in pool.map(lambda n: do_run(n, threads, workers), pending):
            ok &= good
            say(msg)
    return ok


# ---------------------------------------------------------------------------------------------
# The analyses of one regime (findings b-d; (a) is read from the runs' stage reports)

def analysis(regime: str, threads: int, say=print) -> str:
    torch.set_num_threads(threads)
    path = RAW / f"analysis_{regime}.json"
    res = load_analysis(regime)
    runs = [run_name(regime, m, 0) for m in ANALYSED]
    raw = {r: read_json(RAW / f"run_{r}.json") or read_json(RUNS / r / "results.json") for r in runs}
    for r in runs:
        n_stages = len(raw[r]["stages"]) - 1
        missing = [s for s in range(1, n_stages + 1) if not (RUNS / r / f"stage-{s}").is_dir()]
        if missing:
            return f"analysis-{regime}: {RUNS / r} lacks the checkpoints stage-{missing} (rerun {r})"

    def save(key, value):
        res[key] = value
        RAW.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, res, indent=1)
        say(f"analysis-{regime}: {key} saved")

    train_names, general = T.default_sequence(), list(T.general_suite())
    tasks = {n: T.load_task(n) for n in train_names + general}
    tag = model_tag(None)
    orig, tok = load_model(None)

    def iv_of(model, name, folder, model_id, **extra):
        return X.get_iv(model, tok, tasks[name], Path(folder) / iv_filename(tasks[name]), model_id=model_id,
                        progress=False, **IV_SETTINGS, **extra)

    # the original IVs: the training tasks' are train.py's own files in ivs/ (same settings), the
    # general tasks' are extract_iv.py's default files there (made now if missing)
    orig_iv = {n: iv_of(orig, n, ROOT / "ivs" / tag, tag) for n in tasks}
    prompts = {n: [chat_prompt(tok, ex) for ex in t.test[:N_ANALYSIS]] for n, t in tasks.items()}
    metric = {n: E.canonical_metric(t.metric) for n, t in tasks.items()}
    stage_model = {}

    def model_at(run, s):
        if s == 0:
            return orig
        key = (run, s)
        if key not in stage_model:
            stage_model.clear()                          # one fine-tuned model in memory at a time
            stage_model[key] = load_model(str(RUNS / run / f"stage-{s}"))[0]
        return stage_model[key]

    # the dtype the runs' stage reports were evaluated in: bf16 and fp32 greedy replies differ on a
    # few examples (capital 0.34 against 0.36), so the analyses score in the same one
    groups = [g for r in runs for g in raw[r]["stages"][0].get("settings", {}).get("groups", [])]
    dtype = groups[0]["dtype"] if groups else "float32"

    def scores(model, name, add=None) -> list[int]:
        """Per test example: the greedy zero-shot chat reply scored by the task's primary metric
        (reply_contains for the general suite, exact match for the training tasks), by evaluate.py's
        own reply path (engine.greedy_replies), so these are the stage reports' scores."""
        ps = prompts[name]
        edit = Intervention(add_resid={add[0]: add[1]}) if add else None
        with autocast(dtype, model_device(model).type):
            reps = greedy_replies(model, tok, [p.ids for p in ps], [p.answer for p in ps],
                                  [p.text for p in ps], (metric[name],), intervention=edit,
                                  batch_size=E.BATCH_SIZE)
        return [int(v) for v in reps[metric[name]]]

    # (c) re-injection: the original IV (own layer, scale 1) added to the final model; the original
    # model's scores are the same in both regimes (greedy replies)
    if "c/original" not in res:
        other = [load_analysis(r).get("c/original") for r in REGIMES if r != regime]
        other = next((o for o in other if o and set(o) == set(tasks)
                      and all(len(o[n]) == len(prompts[n]) for n in tasks)), None)
        save("c/original", other or {n: scores(orig, n) for n in tasks})
    for r in runs:
        if f"c/{r}" not in res:
            final = model_at(r, len(raw[r]["stages"]) - 1)
            rows = {}
            for n in tasks:
                iv = orig_iv[n]
                rows[n] = {"layer": int(iv["layer"]), "final": scores(final, n),
                           "with_iv": scores(final, n, (int(iv["layer"]), iv["iv"]))}
            save(f"c/{r}", rows)

    # (d) cos(hidden after the IV's layer at the last prompt token, task IV) vs score, tasks x stages
    for r in runs:
        if f"d/{r}" not in res:
            rows = []
            for s, rep in enumerate(raw[r]["stages"]):
                model = model_at(r, s)
                for n in tasks:
                    iv = orig_iv[n]
                    h = score_prompts(model, prompts[n], record_resid=True)["resid"][:, int(iv["layer"])]
                    cos = torch.nn.functional.cosine_similarity(h, iv["iv"][None].float(), dim=-1)
                    rows.append({"stage": s, "task": n, "layer": int(iv["layer"]), "cos": float(cos.mean()),
                                 "score": E.primary_score(rep, n)})
            save(f"d/{r}", rows)

    # (b) IV stability: the general tasks' IVs re-extracted from the final model vs the original's,
    # next to the noise floor (the original model's IVs from other prompts, seed 1)
    if "b/noise_floor" not in res:
        save("b/noise_floor", {n: compare_ivs(iv_of(orig, n, RAW / "ivs" / f"original-seed{NOISE_SEED}",
                                                     f"{tag}-seed{NOISE_SEED}", seed=NOISE_SEED), orig_iv[n])
                               for n in general})
    for r in runs:
        if f"b/{r}" not in res:
            stages = raw[r]["stages"]
            final = model_at(r, len(stages) - 1)
            rows = {}
            for n in general:
                new = iv_of(final, n, RAW / "ivs" / r, r)
                rows[n] = compare_ivs(new, orig_iv[n]) | {
                    "score_drop": E.primary_score(stages[0], n) - E.primary_score(stages[-1], n),
                    "heads_original": [list(h) for h in orig_iv[n]["heads"]],
                    "heads_final": [list(h) for h in new["heads"]]}
            save(f"b/{r}", rows)
    return f"analysis-{regime}: done"


def compare_ivs(new: dict, old: dict) -> dict:
    """Two extractions of one task's IV (extract_iv.get_iv dicts): cosine, norm ratio, the share of
    the old top heads among the new ones, and the Spearman correlation of their AIE maps."""
    shared = set(map(tuple, new["heads"])) & set(map(tuple, old["heads"]))
    return {"cos": float(torch.nn.functional.cosine_similarity(new["iv"].float(), old["iv"].float(), dim=0)),
            "norm_ratio": float(new["iv"].norm() / old["iv"].norm()),
            "head_overlap": len(shared) / len(old["heads"]),
            "aie_corr": spearman(new["aie"].flatten(), old["aie"].flatten())}


# ---------------------------------------------------------------------------------------------
# Numbers of the report

def load_runs() -> dict[str, dict]:
    return {name: summarise(read_json(RAW / f"run_{name}.json")) for name in run_names() if run_done(name)}


def by_seed(runs: dict, regime: str, method: str) -> dict[int, dict]:
    return {s: runs[run_name(regime, method, s)] for s in SEEDS if run_name(regime, method, s) in runs}


def paired(plain: dict[int, dict], guided: dict[int, dict]) -> dict:
    """guided - plain per seed (same seed = same data order) for GP_drop and new_task, and their
    mean ± std over the seeds that have both."""
    seeds = sorted(set(plain) & set(guided))
    per = {str(s): {k: guided[s][k] - plain[s][k] for k in ("GP_drop", "new_task")} for s in seeds}
    return {"per_seed": per, **{k: stat([v[k] for v in per.values()]) for k in ("GP_drop", "new_task")}}


def decide(plain: dict[int, dict], guided: dict[int, dict]) -> tuple[bool | None, dict]:
    """The protocol's decision rule on per-seed summaries ({seed: {"GP_drop", "new_task"}}): None
    (not decided) until all seeds of both methods are in; the numbers are given either way."""
    seeds = sorted(set(plain) & set(guided))
    nums = {"seeds_done": len(seeds), "seeds_needed": len(SEEDS)}
    if not seeds:
        return None, nums
    p_gp, g_gp = (mean(x[s]["GP_drop"] for s in seeds) for x in (plain, guided))
    p_nt, g_nt = (mean(x[s]["new_task"] for s in seeds) for x in (plain, guided))
    forgot = p_gp > EPS
    halved = forgot and g_gp <= 0.5 * p_gp + EPS
    kept = g_nt >= p_nt - NEW_TASK_MARGIN - EPS
    nums |= {"plain_GP_drop": p_gp, "guided_GP_drop": g_gp, "GP_drop_limit": 0.5 * p_gp,
             "GP_ratio": g_gp / p_gp if forgot else None, "GP_halved": halved, "plain_forgets": forgot,
             "plain_new_task": p_nt, "guided_new_task": g_nt, "new_task_limit": p_nt - NEW_TASK_MARGIN,
             "new_task_diff": g_nt - p_nt, "new_task_kept": kept}
    if not all(s in plain and s in guided for s in SEEDS):
        return None, nums
    return bool(halved and kept), nums


def learnability(runs: dict, regime: str) -> dict:
    """Plain training's new-task score right after each task's own stage (R[j+1][j]), over seeds."""
    rs = list(by_seed(runs, regime, "plain").values())
    if not rs:
        return {}
    tasks = rs[0]["train_tasks"]
    return {t: stat([r["R"][j + 1][j] for r in rs]) for j, t in enumerate(tasks)}


def finding_a(runs: dict, regime: str) -> dict | None:
    """(a) the general suite's mean instruction and knowledge log-prob per stage (and GP beside)."""
    out = {}
    for m in ANALYSED:
        r = runs.get(run_name(regime, m, 0))
        if r:
            out[run_name(regime, m, 0)] = {"instruction_logprob": r["general"].get("instruction_logprob"),
                                           "knowledge_logprob": r["general"].get("knowledge_logprob"),
                                           "GP": r["GP"]}
    return out or None


def finding_b(a: dict, regime: str) -> dict | None:
    keys = ("cos", "head_overlap", "norm_ratio", "aie_corr")
    floor = a.get("b/noise_floor")
    rs = {r: a[f"b/{r}"] for r in (run_name(regime, m, 0) for m in ANALYSED) if f"b/{r}" in a}
    if not floor and not rs:
        return None
    means = {label: {k: mean(v[k] for v in rows.values() if v.get(k) is not None) for k in keys}
             for label, rows in (({"noise_floor": floor} if floor else {}) | rs).items()}
    runs_out = {r: {n: {k: v.get(k) for k in (*keys, "score_drop")} for n, v in rows.items()} for r, rows in rs.items()}
    return {"noise_floor": floor, "runs": runs_out, "means": means}


def recovery(original: list, final: list, with_iv: list) -> dict:
    """(c) per-example scores of the original model, the final one and the final one with the
    original IV: the loss original - final with its standard error (paired), and the recovered share
    (with IV - final) / (original - final) only where the loss exceeds 2 standard errors
    (ivft.ivcheck.gap_or_none), else None, with a note saying why: the loss is within noise, or the
    final model is better (a trained task: nothing was lost)."""
    o, f, w = (torch.tensor(x, dtype=torch.float64) for x in (original, final, with_iv))
    share, note = gap_or_none(o, f, w)
    d = o - f
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else None
    if share is None:
        note = "gained, nothing lost" if se is not None and float(d.mean()) < -2 * se else "within noise"
    return {"original": float(o.mean()), "final": float(f.mean()), "with_iv": float(w.mean()),
            "loss": float(d.mean()), "se": se, "recovered": share, "note": note,
            "n": len(d)}


def finding_c(a: dict, regime: str) -> dict | None:
    orig = a.get("c/original")
    rs = {r: a[f"c/{r}"] for r in (run_name(regime, m, 0) for m in ANALYSED) if f"c/{r}" in a}
    if not orig or not rs:
        return None
    general = set(T.general_suite())
    out = {"runs": {}, "pooled_general": {}}
    for r, rows in rs.items():
        out["runs"][r] = {n: recovery(orig[n], v["final"], v["with_iv"]) for n, v in rows.items()}
        gen = [n for n in rows if n in general]
        if gen:   # all general examples together: one paired loss over 6 x 50 examples
            out["pooled_general"][r] = recovery(*([x for n in gen for x in src[n]] for src in
                                                  (orig, {n: rows[n]["final"] for n in gen},
                                                   {n: rows[n]["with_iv"] for n in gen})))
    return out


def spearman_rows(rows: list[dict]) -> float | None:
    if len(rows) < 3:
        return None
    rho = spearman(torch.tensor([r["cos"] for r in rows]), torch.tensor([float(r["score"]) for r in rows]))
    return None if math.isnan(rho) else rho


def finding_d(a: dict, regime: str) -> dict | None:
    rs = {r: a[f"d/{r}"] for r in (run_name(regime, m, 0) for m in ANALYSED) if f"d/{r}" in a}
    if not rs:
        return None
    return {"runs": {r: {"spearman": spearman_rows(rows), "n": len(rows), "rows": rows} for r, rows in rs.items()}}


def regime_summary(runs: dict, regime: str) -> dict:
    methods = {}
    for m in METHODS:
        rs = list(by_seed(runs, regime, m).values())
        if rs:
            methods[m] = {k: stat([r[k] for r in rs]) for k in KEYS}
    plain, guided = by_seed(runs, regime, "plain"), by_seed(runs, regime, "guided")
    verdict, nums = decide(plain, guided)
    a = load_analysis(regime)
    # regime B's lr and epochs: the LoRA pilot's dev-split grid and its choice (protocol, amendment 1)
    pilot = (read_json(OUT / "lora_pilot.json") or None) if regime == "B" else None
    return {"flags": REGIMES[regime], "runs_done": sorted(n for n in runs if n.startswith(f"{regime}-")),
            "pilot": pilot,
            "methods": methods, "paired": paired(plain, guided), "decision": verdict, "decision_numbers": nums,
            "learnability": learnability(runs, regime),
            "findings": {"a": finding_a(runs, regime), "b": finding_b(a, regime), "c": finding_c(a, regime),
                         "d": finding_d(a, regime)}}


def rel(path: Path) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def protocol_commit() -> tuple[str | None, bool]:
    """(short hash of the last commit that touched the protocol, whether the file differs from it);
    (None, True) without git or before the protocol is committed."""
    try:
        h = subprocess.run(["git", "log", "-1", "--format=%h", "--", rel(PROTOCOL)], cwd=ROOT, capture_output=True,
                           text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", rel(PROTOCOL)], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return (h or None), bool(dirty) or not h
    except (OSError, ValueError, subprocess.SubprocessError):
        return None, True


def report() -> str:
    runs = load_runs()
    regimes = {r: regime_summary(runs, r) for r in REGIMES}
    a_methods = {}
    for m in METHODS:                          # regime A in the schema of the earlier study
        rs = list(by_seed(runs, "A", m).values())
        if rs:
            a_methods[m] = {"n_seeds": len(rs)} | {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rs])))
                                                   for k in (*KEYS, "choice_change", "instr_lp_change", "knowl_lp_change")}
    commit, dirty = protocol_commit()
    timings = load_timings()
    study = {"protocol": {"file": rel(PROTOCOL), "commit": commit, "differs_from_commit": dirty},
             "size": SIZE, "seeds": list(SEEDS), "methods": a_methods, "regimes": regimes,
             "parts": {p: {"status": part_status(p)[0], "minutes": round(part_minutes(p, timings)[0], 1),
                           "minutes_kind": part_minutes(p, timings)[2]} for p in PART_ORDER}}
    OUT.mkdir(parents=True, exist_ok=True)
    save_report(study, OUT / "study.json")
    plots = make_plots(runs, regimes)
    write_atomic(OUT / "study.md", markdown(study, runs, plots))
    return f"report: {OUT / 'study.md'} ({len(runs)} of {len(run_names())} runs, {len(plots)} plots)"


# ---------------------------------------------------------------------------------------------
# Plots (optional: none without matplotlib)

COLORS = {"plain": "C3", "replay": "C1", "lwf": "C4", "iv_only": "C2", "guided": "C0", "fvg": "C5"}


def make_plots(runs: dict, regimes: dict) -> list[str]:
    plt = pyplot()
    if plt is None or not runs:
        return []
    RAW.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name):
        path = RAW / name
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # tmp has no suffix
        plt.close(fig)
        made.append(str(path.relative_to(OUT)))

    for regime, summ in regimes.items():
        if not summ["runs_done"]:
            continue
        # 1. the general suite along the stages, mean over seeds per method
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m, c in COLORS.items():
            rs = list(by_seed(runs, regime, m).values())
            for ax, key, title in ((axes[0], "GP", "general suite, zero-shot (GP)"), (axes[1], "IP", "general suite, 3-shot (IP)")):
                curves = [r[key] for r in rs if r[key]]
                if curves:
                    xs = range(len(curves[0]))
                    ax.plot(xs, [100 * mean(v[i] for v in curves) for i in xs], "o-", color=c, label=f"{m} ({len(curves)})")
                ax.set_title(f"regime {regime}: {title}")
                ax.set_xlabel("stage (0 = original)")
                ax.set_ylabel("points")
        axes[0].legend(fontsize=7)
        save(fig, f"{regime}_general_per_stage.png")
        f = summ["findings"]
        # 2. (a) instruction vs knowledge log-prob
        if f["a"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for run, v in f["a"].items():
                c = COLORS[parse_name(run)[1]]
                for metric, ls in (("instruction_logprob", "-"), ("knowledge_logprob", "--")):
                    if v[metric]:
                        ax.plot(range(len(v[metric])), v[metric], ls, color=c, marker="o", label=f"{run} {metric.split('_')[0]}")
            ax.set_xlabel("stage (0 = original)")
            ax.set_ylabel("mean log P(gold answer)")
            ax.set_title(f"regime {regime} (a): instruction (solid) vs knowledge (dashed)")
            ax.legend(fontsize=7)
            save(fig, f"{regime}_a_instruction_vs_knowledge.png")
        # 3. (c) re-injection
        if f["c"]:
            fig, axes = plt.subplots(1, len(f["c"]["runs"]), figsize=(7 * len(f["c"]["runs"]), 4), squeeze=False)
            for ax, (run, rows) in zip(axes[0], f["c"]["runs"].items()):
                names = list(rows)
                for k, (cond, col, label) in enumerate((("original", "C7", "original model"), ("final", "C3", "final model"),
                                                       ("with_iv", "C0", "final + original IV"))):
                    ax.bar([i + k * 0.27 for i in range(len(names))], [100 * rows[n][cond] for n in names], 0.27,
                           color=col, label=label)
                ax.set_xticks([i + 0.27 for i in range(len(names))], names, rotation=30, fontsize=7)
                ax.set_ylabel("points")
                ax.set_title(f"{run} (c): the original IV added to the final model")
                ax.legend(fontsize=7)
            save(fig, f"{regime}_c_reinjection.png")
        # 4. (d) cos(hidden, IV) vs score
        if f["d"]:
            fig, axes = plt.subplots(1, len(f["d"]["runs"]), figsize=(6 * len(f["d"]["runs"]), 4), squeeze=False)
            for ax, (run, v) in zip(axes[0], f["d"]["runs"].items()):
                for i, n in enumerate(dict.fromkeys(r["task"] for r in v["rows"])):
                    pts = [r for r in v["rows"] if r["task"] == n]
                    ax.plot([r["cos"] for r in pts], [100 * r["score"] for r in pts], "o-", color=f"C{i % 10}",
                            label=n, ms=4, lw=0.8)
                rho = v["spearman"]
                ax.set_title(f"{run} (d): Spearman ρ = {rho:.2f}" if rho is not None else f"{run} (d)")
                ax.set_xlabel("cos(hidden after the IV's layer, task IV)")
                ax.set_ylabel("score (points)")
                ax.legend(fontsize=6)
            save(fig, f"{regime}_d_cos_vs_score.png")
    return made


# ---------------------------------------------------------------------------------------------
# study.md

def pts(m, sd=None, sign=True):
    """A fraction in points (x 100), with ± std."""
    if m is None:
        return "-"
    s = f"{100 * m:+.1f}" if sign else f"{100 * m:.1f}"
    return s + (f" ± {100 * sd:.1f}" if sd is not None else "")


def num(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def decision_text(regime: str, verdict, nums: dict) -> str:
    if not nums.get("seeds_done"):
        return f"**Decision, regime {regime}: not yet decided: 0 of {len(SEEDS)} seeds** of plain and guided are done."
    body = (f"guided's mean GP_drop {pts(nums['guided_GP_drop'], sign=False)} vs the limit 0.5 × plain's "
            f"{pts(nums['plain_GP_drop'], sign=False)} = {pts(nums['GP_drop_limit'], sign=False)} points "
            f"({'met' if nums['GP_halved'] else 'not met'}"
            + ("" if nums["plain_forgets"] else "; plain forgets nothing (GP_drop ≤ 0), so the rule cannot hold")
            + f"); guided's mean new_task {pts(nums['guided_new_task'], sign=False)} vs the limit plain's "
            f"{pts(nums['plain_new_task'], sign=False)} − 2 = {pts(nums['new_task_limit'], sign=False)} "
            f"({'met' if nums['new_task_kept'] else 'not met'}).")
    if verdict is None:
        return (f"**Decision, regime {regime}: not yet decided: {nums['seeds_done']} of {nums['seeds_needed']} "
                f"seeds** of plain and guided are done. Provisional numbers on those seeds: {body}")
    return f"**Decision, regime {regime}: {'true' if verdict else 'false'}.** {body}"


def markdown(study: dict, runs: dict, plots: list[str]) -> str:
    protocol = PROTOCOL.read_text().rstrip("\n") if PROTOCOL.is_file() else f"({PROTOCOL} is missing)"
    pc = study["protocol"]
    where = (f"pre-registered in commit {pc['commit']}" if pc["commit"] else "not yet committed (no commit found)")
    if pc["commit"] and pc["differs_from_commit"]:
        where += "; **the file has changed since that commit**"
    L = [protocol, "", "---", "",
         f"The protocol above is copied verbatim from `{pc['file']}`, {where}. Everything below is generated by "
         "`python experiments/study.py --report` from the runs that have finished.", "",
         "# Results", "",
         f"Runs finished: {len(runs)} of {len(run_names())}. Flags of every run: the regime's and the method's "
         f"preset, `{' '.join(SIZE)}`, `--seed S` (train.py's defaults otherwise). Sequence "
         f"{' → '.join(T.default_sequence())}; general suite {', '.join(T.general_suite())}. Scores in points "
         "(× 100); ± is the standard deviation over seeds.", "",
         "| part | status | minutes |", "|---|---|---|"]
    for p, v in study["parts"].items():
        L.append(f"| {p} | {v['status']} | {v['minutes']:.0f} ({v['minutes_kind']}) |")
    L.append("")
    for regime, s in study["regimes"].items():
        L += [f"## Regime {regime} (`{' '.join(s['flags'])}`)", ""]
        L += pilot_md(s.get("pilot"))
        if not s["runs_done"]:
            L += ["No run of this regime has finished yet.", ""]
            continue
        if s["learnability"]:
            L += ["### Learnability of plain training", "",
                  "New-task test score right after the task's own stage (mean ± std over seeds):", "",
                  "| task | score | seeds |", "|---|---|---|"]
            L += [f"| {t} | {pts(v['mean'], v['std'], sign=False)} | {v['n']} |" for t, v in s["learnability"].items()]
            L.append("")
        L += ["### Methods", "", "| method | seeds | GP_drop ↓ | IP_drop ↓ | AP | BWT | FWT | new_task |",
              "|---|---|---|---|---|---|---|---|"]
        for m, v in s["methods"].items():
            L.append(f"| {m} | {max(v[k]['n'] for k in KEYS)} | " +
                     " | ".join(pts(v[k]["mean"], v[k]["std"], sign=k not in ("AP", "new_task")) for k in KEYS) + " |")
        L += ["", "GP_drop / IP_drop: the general suite's score (zero-shot / 3-shot) of the original model minus the "
              "final model's; new_task: mean over tasks of the score right after its own stage.", ""]
        pr = s["paired"]
        if pr["per_seed"]:
            L += ["### Paired differences, guided − plain (same seed, same data order)", "",
                  "| seed | Δ GP_drop | Δ new_task |", "|---|---|---|"]
            L += [f"| {seed} | {pts(v['GP_drop'])} | {pts(v['new_task'])} |" for seed, v in pr["per_seed"].items()]
            L += [f"| mean ± std (n {pr['GP_drop']['n']}) | {pts(pr['GP_drop']['mean'], pr['GP_drop']['std'])} | "
                  f"{pts(pr['new_task']['mean'], pr['new_task']['std'])} |", ""]
        L += ["### Decision rule", "", decision_text(regime, s["decision"], s["decision_numbers"]), ""]
        L += findings_md(s["findings"])
        mine = [p for p in plots if Path(p).name.startswith(f"{regime}_")]
        if mine:
            L += ["### Plots", ""] + [f"![{p}]({p})" for p in mine] + [""]
    return "\n".join(L)


def pilot_md(pilot: dict | None) -> list[str]:
    """The LoRA pilot's grid (plain training, dev split: new-task score per task) and its choice."""
    if not pilot or "choice" not in pilot:
        return []
    c = pilot["choice"]
    points = sorted((v for k, v in pilot.items() if k != "choice"), key=lambda v: (v["lr"], v["epochs"]))
    tasks = list(points[0]["new_task"]) if points else []
    L = ["### lr and epochs: the LoRA pilot (`experiments/lora_pilot.py`, dev split)", "",
         "Plain training; new-task dev score right after each task's stage (points; training examples "
         "320-399 of each task, never trained on).", "",
         "| lr | epochs | " + " | ".join(tasks) + " | minutes |", "|---|---|" + "---|" * len(tasks) + "---|"]
    L += [f"| {v['lr']:g} | {v['epochs']} | " + " | ".join(f"{100 * v['new_task'][t]:.1f}" for t in tasks) +
          f" | {v['seconds'] / 60:.0f} |" for v in points]
    learned = ("every task reaches 80" if c.get("all_learned") else
               f"no epoch count tried ({', '.join(map(str, c.get('epochs_tried', [])))}) reaches 80 on every task, "
               "so the largest is used (amendment 1)")
    return L + ["", f"Chosen: lr {c['lr']:g}, {c['epochs']} epochs; {learned}.", ""]


def findings_md(f: dict) -> list[str]:
    L = ["### Findings (seed 0 of plain and guided)", ""]
    if f["a"]:
        n = max(len(v["GP"] or []) for v in f["a"].values())
        L += ["**(a) instruction vs knowledge.** The general suite's mean log P of the gold answer, after the "
              "instruction (chat prompt) and as a plain-text fact, per stage; GP beside for reference.", "",
              "| run | measure | " + " | ".join(f"stage {i}" for i in range(n)) + " |", "|---|---|" + "---|" * n]
        for run, v in f["a"].items():
            for k, label, fmt_ in (("instruction_logprob", "instruction log P (nats)", lambda x: f"{x:.2f}"),
                                   ("knowledge_logprob", "knowledge log P (nats)", lambda x: f"{x:.2f}"),
                                   ("GP", "GP (points)", lambda x: f"{100 * x:.1f}")):
                if v.get(k):
                    L.append(f"| {run} | {label} | " + " | ".join(fmt_(x) for x in v[k]) + " |")
        L.append("")
    else:
        L += ["(a) not yet available.", ""]
    b = f["b"]
    if b:
        L += ["**(b) IV stability.** Each general task's IV re-extracted from the final model vs the original "
              "model's IV (cosine, share of the original top heads among the new ones, norm ratio, Spearman ρ of "
              "the AIE maps), against the noise floor (the original model's IV extracted again from other "
              f"prompts, seed {NOISE_SEED}), next to the task's score drop (original − final, points).", "",
              "| run | task | cos | head overlap | norm ratio | AIE ρ | noise cos | noise overlap | noise ratio | noise ρ | score drop |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        floor = b["noise_floor"] or {}
        for run, rows in b["runs"].items():
            for n, v in rows.items():
                fl = floor.get(n, {})
                L.append(f"| {run} | {n} | {num(v['cos'])} | {num(v['head_overlap'])} | {num(v['norm_ratio'])} | "
                         f"{num(v['aie_corr'])} | {num(fl.get('cos'))} | {num(fl.get('head_overlap'))} | "
                         f"{num(fl.get('norm_ratio'))} | {num(fl.get('aie_corr'))} | {pts(v['score_drop'])} |")
        for label, v in b["means"].items():
            L.append(f"| {label} | mean | {num(v['cos'])} | {num(v['head_overlap'])} | {num(v['norm_ratio'])} | "
                     f"{num(v['aie_corr'])} | | | | | |")
        L.append("")
    else:
        L += ["(b) not yet available.", ""]
    c = f["c"]
    if c:
        L += ["**(c) re-injection.** The original IV (each task's, at its own layer, scale 1) added to the final "
              f"model on the zero-shot chat test prompts ({N_ANALYSIS} per task; general tasks by reply_contains, "
              "training tasks by exact match). Recovered = (with IV − final) / (original − final), given only where "
              "the loss exceeds 2 standard errors of the paired per-example difference.", "",
              "| run | task | original | final | final + IV | loss ± se | recovered |", "|---|---|---|---|---|---|---|"]
        for run, rows in c["runs"].items():
            items = list(rows.items()) + ([("**general, pooled**", c["pooled_general"][run])]
                                          if run in c["pooled_general"] else [])
            for n, v in items:
                # recovery() ran at report time, so a missing share's note is this run's own
                rec = f"{100 * v['recovered']:.0f}%" if v["recovered"] is not None else v["note"]
                L.append(f"| {run} | {n} | {pts(v['original'], sign=False)} | {pts(v['final'], sign=False)} | "
                         f"{pts(v['with_iv'], sign=False)} | {pts(v['loss'], v['se'])} | {rec} |")
        L.append("")
    else:
        L += ["(c) not yet available.", ""]
    d = f["d"]
    if d:
        L += ["**(d) cos(hidden state, IV) vs score.** Cosine between the hidden state after the IV's layer at the "
              f"last prompt token ({N_ANALYSIS} test prompts per task, mean) and the task's original IV, against the "
              "task's score at that stage (the run's own stage report), over all tasks × stages (stage 0 = the "
              "original model).", ""]
        for run, v in d["runs"].items():
            L.append(f"- {run}: Spearman ρ = {num(v['spearman'])} over {v['n']} task × stage pairs")
        for run, v in d["runs"].items():
            stages = sorted({r["stage"] for r in v["rows"]})
            L += ["", f"{run}, cells cos / score (points):", "",
                  "| task | " + " | ".join(f"stage {s}" for s in stages) + " |", "|---|" + "---|" * len(stages)]
            for n in dict.fromkeys(r["task"] for r in v["rows"]):
                cell = {r["stage"]: f"{r['cos']:.3f} / {100 * r['score']:.0f}" for r in v["rows"] if r["task"] == n}
                L.append(f"| {n} | " + " | ".join(cell.get(s, "-") for s in stages) + " |")
        L.append("")
    else:
        L += ["(d) not yet available.", ""]
    return L


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--list", action="store_true", help="print every part with its status and minutes, and the next one")
    p.add_argument("--part", choices=PART_ORDER, help="run this part (default: the next unfinished one)")
    p.add_argument("--run", choices=run_names(), metavar="NAME",
                   help="run only this run of its part, e.g. B-fvg-s2: to start a long run first when a session's "
                        "time is short")
    p.add_argument("--report", action="store_true", help="only rebuild the report from what has finished")
    p.add_argument("--dry_run", action="store_true", help="print what the part would run, run nothing")
    p.add_argument("--workers", type=int, default=1, help="train.py processes at a time (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPUs / workers)")
    args = p.parse_args(argv)
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        p.error("--workers and --threads must be >= 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    if args.list:
        print(list_parts(args.workers))
        return 0
    if args.report:
        print(report())
        return 0
    home = part_of(args.run) if args.run else None
    if home and args.part and home != args.part:
        p.error(f"--run {args.run} is not a run of part {args.part} (it is in {home})")
    part = args.part or home or next_part()
    if part is None:
        print("all parts are done")
        print(report())
        return 0
    if args.dry_run:
        run_part(part, args.workers, threads, dry_run=True, only=args.run)
        return 0
    analysing = parts()[part]["kind"] == "analysis"
    try:      # before anything is printed: a second study.py of this part or run stops here, one line
        held = claim(args.run or part, threads * args.workers if analysing else threads,
                     1 if analysing else args.workers)
    except FolderInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with held:
        print(f"part {part}: {part_status(part)[0]}", flush=True)
        ok = run_part(part, args.workers, threads, only=args.run)
    print(report())
    nxt = next_part()
    print(f"part {part}: {part_status(part)[0]}; next: {nxt or 'none, the study is complete'}")
    return 0 if ok else 1


if __name__ == "__main__":
    with stop_signals_to_children():     # Ctrl-C / SIGTERM: its train.py runs save and stop
        sys.exit(main())
