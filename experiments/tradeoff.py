"""
Where IV guidance helps: trade-off curves of new-task learning against general forgetting, on a dev
split, then a pre-registered confirmation on the test split (experiments/study_protocol.md,
amendment 2). Runs in parts and resumes: every finished train.py run leaves a raw JSON file in
results/tradeoff/, and a rerun skips it.

    python experiments/tradeoff.py --sweep --workers 2     # stage 1 on the dev split: every method x strength
    python experiments/tradeoff.py --sweep --dry_run       # prints the train.py commands only
    python experiments/tradeoff.py --confirm --workers 2   # the registered confirmation (needs the sweep)
    python experiments/tradeoff.py --report                # results/tradeoff.json, tradeoff.md, tradeoff.png

The sweep: stage 1 only (one task: uppercase, or date_iso), regime A (full fine-tuning, batch 8, one
epoch of the first 320 training examples = 40 steps, cosine lr with 10% warmup), seed 0. Each
method at several strengths (GRID): plain ("do less": lower lr or fewer steps), lwf (λ), guided
(λ x the IV's norm as a fraction r of the hidden state's, --iv_norm_ratio), the instruction-free
KL (beyond the paper, --free_kl_weight) and fvg (its weights x a factor). The dev split: the new task
is scored on its training examples 320-399 (never trained on), the general suite zero-shot on its
tasks' training examples (no test number uses them: the suite is never trained on). Each point
scores the new task and the general suite after the stage. The sweep ran with --dtype auto, which
was bf16 autocast on the AMX machine that ran it; every confirmatory run is pinned to fp32, so that
runs from sessions on different machines compare (amendment 2c).

Files: runs/tradeoff/ (train.py's out_dirs, dev task files, stage-0 caches; not in git),
results/tradeoff/sweep/<task>.<key>.json and results/tradeoff/confirm/<label>-s<seed>.json (each
run's record, in git), results/tradeoff.json, results/tradeoff.md, results/tradeoff.png.
One tradeoff.py at a time (runs/tradeoff/driver.lock).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

from common import (STOPPING, read_json, run_child, run_train, stat,  # a sibling: on the script's path
                    stop_signals_to_children, summarise)
import tradeoff_report as report
from ivft import tasks as T
from ivft.checkpoint import read_finished
from ivft.files import FolderInUse, RunLock, write_atomic
from ivft.report import save_report
from train import parse_flags

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "tradeoff"
RAW = ROOT / "results" / "tradeoff"
SWEEP_TASKS = ("uppercase", "date_iso")
N_TRAIN, N_DEV, EVAL_N = 320, 80, 30

# method -> [(label, strength, train.py flags)]; strength orders a method's points: plain's is its
# lr x epochs (more training), the others' their regulariser's weight. Every point trains at the
# defaults of regime A (lr 1e-4) except plain's own grid.
FVG = {"kl_weight": 20.0, "kl_all_weight": 0.1, "head_mse_weight": 1.0}
GRID = {
    "plain": [(f"lr={lr:g}" + ("" if ep == 1 else f",ep={ep:g}"), lr * ep,
               ["--lr", str(lr), "--epochs", str(ep)])
              for lr, ep in ((1e-5, 1), (3e-5, 1), (1e-4, 0.5), (1e-4, 1))],
    "lwf": [(f"λ={w:g}", w, ["--preset", "lwf", "--kl_weight", str(w)]) for w in (1, 10, 30)],
    "guided": [("λ=1,as extracted", 0.0, ["--preset", "guided"])]
              + [(f"λ={w:g},r={r:g}", w + r, ["--preset", "guided", "--kl_weight", str(w), "--iv_norm_ratio", str(r)])
                 for w, r in ((1, 0.25), (1, 0.5), (1, 1.0), (3, 0.5), (10, 0.5), (10, 0.25))],
    "free_kl": [(f"λ_free={w:g}", w, ["--free_kl_weight", str(w)]) for w in (1, 10, 30)],
    "fvg": [(f"x{f:g}", f, ["--preset", "fvg", *[a for k, v in FVG.items() for a in (f"--{k}", str(v * f))]])
            for f in (0.1, 0.3, 1.0)],
}


def key_of(label: str) -> str:
    """A file-name form of a point's label."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label.replace("λ", "l"))


# ---- the dev split ------------------------------------------------------------------------------------

def write_split(folder: Path, task, train, test) -> str:
    """The task in the suite's layout (<name>.train.jsonl + .test.jsonl + .meta.json: its registry
    metric and kind) with these splits -> the train file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    # a description of its own: with the registry's, the copy would share the registry task's IV cache name
    meta = json.dumps({"metric": task.metric, "kind": task.kind, "description": f"dev split of {task.name}"})
    for split, rows in (("train", train), ("test", test), ("meta", None)):
        text = meta if rows is None else "".join(json.dumps(
            {"instruction": e.instruction, "input": e.input, "output": e.output, "choices": e.choices,
             "knowledge_prompt": e.knowledge_prompt, "knowledge_answer": e.knowledge_answer}) + "\n" for e in rows)
        path = folder / (f"{task.name}.{split}.json" + ("" if rows is None else "l"))
        if not path.is_file() or path.read_text() != text:    # unchanged files keep the IV cache's hash
            write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return str(folder / f"{task.name}.train.jsonl")


def dev_files() -> tuple[dict, str]:
    """-> ({task: its dev task file}, the general suite's dev files, comma-separated). A training task:
    train = its first 320 training examples, test = examples 320-399. A general task: test = its
    training examples (zero-shot scoring needs no demonstrations; train repeats them for the loader)."""
    folder = RUNS / "dev"
    new = {n: write_split(folder, t, t.train[:N_TRAIN], t.train[N_TRAIN:N_TRAIN + N_DEV])
           for n in SWEEP_TASKS for t in [T.load_task(n)]}
    general = [write_split(folder / "general", t, t.train, t.train) for t in map(T.load_task, T.general_suite())]
    return new, ",".join(general)


# ---- one run -------------------------------------------------------------------------------------------

def train_run(out_dir: Path, flags: list[str], threads: int, log: Path) -> dict | None:
    """train.py FLAGS into out_dir (resumed where a cut run left a checkpoint) -> its results.json, or
    None when it failed or was stopped (its log says why)."""
    resume = (out_dir / "last").exists() or any(out_dir.glob("stage-*"))
    rc = run_train([*flags, "--out_dir", str(out_dir), "--num_threads", str(threads),
                    "--resume" if resume else "--overwrite"], log)
    return read_json(out_dir / "results.json") if rc == 0 and read_finished(out_dir) else None


def one_run(raw: Path, out: Path, full: list[str], threads: int, dry_run: bool) -> tuple[dict | None, str]:
    """train.py FULL into out unless raw (the run's record) exists -> (results.json with "seconds" added,
    "") when it ran, else (None, what happened: done, the command of a dry run, or the failure)."""
    if raw.is_file():
        return None, f"{raw.name}: done"
    if dry_run:
        return None, "python train.py " + " ".join(full + ["--out_dir", str(out)])
    t0, log = time.time(), RUNS / "logs" / f"{out.parent.name}-{out.name}.txt"
    r = train_run(out, full, threads, log)
    if r is None:
        return None, f"{raw.name}: FAILED or stopped (see {log})"
    return {**r, "seconds": round(time.time() - t0)}, ""


def sweep_point(task: str, method: str, label: str, strength: float, flags: list[str], files, threads: int,
                dry_run: bool = False) -> str:
    raw = RAW / "sweep" / f"{task}.{method}.{key_of(label)}.json"
    new, general = files
    full = ["--regime", "full", "--tasks", new[task], "--general", general, "--eval_n", str(EVAL_N),
            "--eval_k_shot", "0", "--stage0_cache", str(RUNS / "dev" / f"stage0-{task}.json"),
            "--log_every", "10", "--seed", "0", *flags]
    r, msg = one_run(raw, RUNS / "sweep" / raw.stem, full, threads, dry_run)
    if r is None:
        return msg
    cl = r["cl"]
    record = {"method": method, "label": label, "strength": strength, "settings": settings_of(flags), "task": task,
              "split": "dev", "new_task": cl["R"][1][0], "general_before": cl["GP"][0],
              "general_after": cl["GP"][1], "general_tasks": {g: [s["tasks"][g][s["primary"][g]] for s in r["stages"]]
                                                               for g in cl["general_tasks"]},
              "terms": r.get("training", []), "seconds": r["seconds"], "code": r["config"].get("code")}
    save_report(record, raw)
    shutil.rmtree(RUNS / "sweep" / raw.stem, ignore_errors=True)   # checkpoints: 0.5 GB, never read again
    return f"{raw.name}: new task {record['new_task']:.2f}, general {record['general_before']:.3f} -> " \
           f"{record['general_after']:.3f} ({record['seconds']} s)"


def sweep_jobs():
    """Every point, the two tasks' points interleaved and the costly methods spread out."""
    return [(t, m, *pt) for i in range(max(len(v) for v in GRID.values())) for m, v in GRID.items()
            if i < len(v) for t in SWEEP_TASKS for pt in [v[i]]]


def run_all(jobs, workers: int, fn) -> int:
    failed = 0
    with ThreadPoolExecutor(workers) as pool:
        for msg in pool.map(lambda j: "skipped (stopping)" if STOPPING.is_set() else fn(*j), jobs):
            print(msg, flush=True)
            failed += "FAILED" in msg
    return failed


def settings_of(flags: list[str]) -> dict:
    """["--preset", "lwf", "--kl_weight", "10"] -> {"preset": "lwf", "kl_weight": 10.0}"""
    def value(v):
        try:
            return float(v)
        except ValueError:
            return v
    return {k[2:]: value(v) for k, v in zip(flags[::2], flags[1::2])}


def flags_of(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k}", f"{v:g}" if isinstance(v, float) else str(v))]


def sweep_records() -> list[dict]:
    """The finished points; settings as {flag: value} (the flags of the run are flags_of(settings))."""
    recs = [r for p in (RAW / "sweep").glob("*.json") if (r := read_json(p))]
    for r in recs:
        r["settings"] = settings_of(r["settings"]) if isinstance(r["settings"], list) else r["settings"]
    return sorted(recs,
                  key=lambda r: (r["task"], list(GRID).index(r["method"]) if r["method"] in GRID else 99,
                                 r["strength"]))


# ---- the registered choice and the confirmation (protocol, amendment 2) ------------------------------

QUALIFY = 0.9          # a strength qualifies at >= 0.9 x plain's best new-task dev score, on both tasks
SEEDS = (0, 1, 2)
TEST_SIZE = ["--eval_n", "50", "--eval_k_shot", "3"]        # the study's test-split evaluation
# fp32 on every machine (amendment 2c): --dtype auto is bf16 autocast on a CPU with AMX and fp32 on an
# AVX2 one, and the two give different runs of one configuration (plain seed 0: GP drop 34.0 vs 35.3)
DTYPE, DTYPE_RAN = ["--dtype", "fp32"], "float32"
NON_IV, IV_METHODS = ("plain-less", "replay", "lwf", "free_kl"), ("guided", "guided+replay", "fvg")
KEEP = {"plain-s0", "guided-s0"}     # the re-injection analysis runs on their final models
MARGIN = 0.02                        # new_task within 2 points of plain's


def choose_setting(sweep: list[dict], method: str) -> dict | None:
    """The registered rule: among the method's strengths that reach >= QUALIFY x plain's best new-task
    score on every sweep task, the highest mean general score after the stage (ties: higher new task);
    none qualifies -> the highest mean new task, marked. -> {label, settings, qualified, new_task,
    general_after} or None before the sweep has the method's points on every task."""
    tasks = sorted({r["task"] for r in sweep})
    best = {t: max((r["new_task"] for r in sweep if r["task"] == t and r["method"] == "plain"), default=None)
            for t in tasks}
    by_label = {}
    for r in sweep:
        if r["method"] == method:
            by_label.setdefault(r["label"], {})[r["task"]] = r
    rows = []
    for label, per in by_label.items():
        if set(per) != set(tasks) or None in best.values():
            continue
        nt = sum(p["new_task"] for p in per.values()) / len(per)
        ga = sum(p["general_after"] for p in per.values()) / len(per)
        ok = all(per[t]["new_task"] >= QUALIFY * best[t] - 1e-9 for t in tasks)
        rows.append({"label": label, "settings": next(iter(per.values()))["settings"], "qualified": ok,
                     "new_task": nt, "general_after": ga})
    if not rows or len(rows) < len({r["label"] for r in sweep if r["method"] == method}):
        return None
    ok = [r for r in rows if r["qualified"]]
    return max(ok, key=lambda r: (r["general_after"], r["new_task"])) if ok else max(rows, key=lambda r: r["new_task"])


def confirm_plan(sweep: list[dict]) -> dict[str, list[str]] | None:
    """label -> the settings of the 8 confirmatory methods; None until every chosen point is known."""
    chosen = {m: choose_setting(sweep, m) for m in ("plain", "lwf", "guided", "free_kl", "fvg")}
    if any(c is None for c in chosen.values()):
        return None
    c = {m: v["settings"] for m, v in chosen.items()}
    # the order runs are started in (within a seed): the reference, then the dev curves' best, then the rest
    return {"plain": {}, "free_kl": c["free_kl"], "guided": c["guided"], "plain-less": c["plain"],
            "replay": {"preset": "replay"}, "lwf": c["lwf"], "fvg": c["fvg"],
            "guided+replay": {**c["guided"], "replay": 0.25}}


def machine() -> dict:
    """Where a run ran: the CPU's model, which of the instruction sets that change its numbers it has,
    and torch's version (fp32 kernels differ a little between AVX2 and AVX-512 machines)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda name: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(name)), "")
    flags = field("flags").split()
    return {"cpu": field("model name") or platform.machine(), "torch": version("torch"),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def confirm_flags(settings: dict, seed: int) -> list[str]:
    return ["--regime", "full", *flags_of(settings), "--seed", str(seed), *TEST_SIZE, *DTYPE, "--stage0_cache",
            str(RUNS / "confirm" / "stage0.json"), "--log_every", "10", "--save_every", "40"]


RUN_ONLY = ("out_dir", "num_threads", "code", "resume", "overwrite")   # where and how fast, not what is trained


def resolved(settings: dict) -> dict:
    """The train.py configuration a label's settings resolve to (presets and defaults filled, as train.py
    does), without the fields that do not change what is trained."""
    cfg = parse_flags(confirm_flags(settings, 0))
    return {k: v for k, v in cfg.items() if k not in RUN_ONLY}


def twins(plan: dict) -> dict[str, str]:
    """label -> the earlier label of the plan that trains the very same run (amendment 2b)."""
    out, seen = {}, {}                                  # seen: a configuration -> the first label with it
    for label, settings in plan.items():
        key = json.dumps(resolved(settings), sort_keys=True)
        if key in seen:
            out[label] = seen[key]
        seen.setdefault(key, label)
    return out


SCORED = ("stages", "training", "metrics", "cl")      # a record's scores and losses (not its timing or config)


def scores(rec: dict):
    """rec's SCORED parts without the wall-clock "seconds" inside them, which differ between any two runs."""
    drop = lambda x: ({k: drop(v) for k, v in x.items() if k != "seconds"} if isinstance(x, dict)
                      else [drop(v) for v in x] if isinstance(x, list) else x)
    return drop({k: rec.get(k) for k in SCORED})


def reuse_twin(label: str, settings: dict, seed: int, twin: str) -> str | None:
    """Write label's record at seed from twin's, when both ran identically at seed 0 and twin has this
    seed's record -> the message, else None (then the run is trained)."""
    rec = lambda lab, s: confirm_record(RAW / "confirm" / f"{key_of(lab)}-s{s}.json")
    mine0, twin0, theirs = rec(label, 0), rec(twin, 0), rec(twin, seed)
    if seed == 0 or not (mine0 and twin0 and theirs) or scores(mine0) != scores(twin0):
        return None
    raw = RAW / "confirm" / f"{key_of(label)}-s{seed}.json"
    save_report({**theirs, "label": label, "settings": settings, "same_as": f"{key_of(twin)}-s{seed}"}, raw)
    return f"{raw.name}: the same run as {key_of(twin)}-s{seed} (identical at seed 0; amendment 2b)"


def confirm_run(label: str, settings: dict, seed: int, threads: int, dry_run: bool = False,
                twin: str | None = None) -> str:
    raw = RAW / "confirm" / f"{key_of(label)}-s{seed}.json"
    if twin and not raw.is_file() and not dry_run and (msg := reuse_twin(label, settings, seed, twin)):
        return msg
    full, out = confirm_flags(settings, seed), RUNS / "confirm" / raw.stem
    r, msg = one_run(raw, out, full, threads, dry_run)
    if r is None:
        return msg + (f"   # or {key_of(twin)}-s{seed}'s record (amendment 2b)" if dry_run and twin and seed else "")
    r["label"], r["settings"], r["machine"] = label, settings, machine()
    if raw.stem in KEEP:       # re-injection reads the final model now: its checkpoints do not outlive a session
        rc = run_child([sys.executable, str(ROOT / "experiments" / "reinject.py"), "--final", str(out), "--out",
                        str(RAW / "reinject" / f"{raw.stem}.json"), "--threads", str(threads)],
                       RUNS / "logs" / f"reinject-{raw.stem}.txt")
        if rc != 0:
            return f"{raw.name}: re-injection FAILED (see {RUNS / 'logs' / f'reinject-{raw.stem}.txt'})"
    save_report(r, raw)
    shutil.rmtree(out, ignore_errors=True)
    return f"{raw.name}: GP_drop {r['cl']['GP_drop']:.3f} ({r['seconds']} s)"


def confirm_jobs(plan: dict) -> list:
    """(label, settings, seed, twin) in the order they start: seed 0 of all first; a twin's later seeds
    last, so that its twin's record of that seed is there to be reused."""
    tw = twins(plan)
    jobs = [(label, settings, seed, tw.get(label)) for seed in SEEDS for label, settings in plan.items()]
    return sorted(jobs, key=lambda j: bool(j[3]) and j[2] > 0)      # a stable sort keeps the rest's order


def endpoints(r: dict) -> dict:
    """One confirmatory run's endpoints (fractions; instruction log P in nats), from the study's summary."""
    sm = summarise(r)
    lp = sm["general"].get("instruction_logprob")
    return {k: sm[k] for k in ("GP_drop", "IP_drop", "BWT", "new_task")} | {
        "general_stage_mean": sum(sm["GP"][1:]) / len(sm["train_tasks"]), "instruction_logprob": lp[-1] if lp else None}


def ran_in(r: dict) -> set[str]:
    """The dtypes a run's stage evaluations were computed in (training used the same autocast)."""
    return {g["dtype"] for st in r["stages"] for g in st.get("settings", {}).get("groups", [])}


def confirm_record(path: Path) -> dict | None:
    """A confirmatory run's record, None when it has not run; one that did not run in fp32 is refused."""
    r = read_json(path)
    if r and ran_in(r) != {DTYPE_RAN}:
        raise SystemExit(f"{path}: evaluated in {', '.join(sorted(ran_in(r)))}, not {DTYPE_RAN} (amendment 2c): "
                         "move it out of results/tradeoff/confirm/ and run it again")
    return r


def confirm_table(plan: dict | None) -> dict:
    out = {}
    for label, settings in (plan or {}).items():
        runs = {s: confirm_record(RAW / "confirm" / f"{key_of(label)}-s{s}.json") for s in SEEDS}
        runs = {s: endpoints(r) for s, r in runs.items() if r}
        if runs:
            out[label] = {"method": label, "regime": "A", "settings": settings, "seeds": sorted(runs),
                          **{k: stat([e[k] for e in runs.values()]) for k in next(iter(runs.values()))}}
    return out


def decide(table: dict) -> dict:
    """The registered rule for guided (and, reported beside it, the other IV methods)."""
    need = ("plain", "guided", *NON_IV)
    if any(table.get(m, {}).get("GP_drop", {}).get("n", 0) < len(SEEDS) for m in need):
        done = sum(len(t["seeds"]) for t in table.values())
        return {"holds": None, "text": f"not yet decided: {done} of {len(SEEDS) * 8} confirmatory runs done"}
    mean = lambda m, k: table[m][k]["mean"]
    nt_ok = lambda m: mean(m, "new_task") >= mean("plain", "new_task") - MARGIN - 1e-9
    base = min((m for m in NON_IV if nt_ok(m)), key=lambda m: mean(m, "GP_drop"), default=None)
    lines, verdicts = [], {}
    for m in [m for m in IV_METHODS if m in table]:
        halved = mean(m, "GP_drop") <= 0.5 * mean("plain", "GP_drop") + 1e-9
        beats = base is not None and mean(m, "GP_drop") <= mean(base, "GP_drop") - 0.03 + 1e-9
        verdicts[m] = bool(halved and nt_ok(m) and beats)
        lines.append(f"{m}: GP drop {100 * mean(m, 'GP_drop'):.1f} vs plain {100 * mean('plain', 'GP_drop'):.1f} "
                     f"(halved: {halved}), new task {100 * mean(m, 'new_task'):.1f} vs plain "
                     f"{100 * mean('plain', 'new_task'):.1f} (kept: {nt_ok(m)}), best non-IV method at matched "
                     f"learning {base} ({100 * mean(base, 'GP_drop'):.1f} GP drop; beaten by >= 3 points: {beats})"
                     if base else f"{m}: no non-IV method learned within 2 points of plain")
    return {"holds": verdicts.get("guided"), "text": "; ".join(lines), "per_method": verdicts}


def choice_note(chosen: dict, sweep: list[dict]) -> str:
    """The registered choice over both tasks (amendment 2), and how active each point's regulariser
    was: the mean gradient-norm share of its terms against the cross-entropy's over the stage."""
    lines = ["Dev split: each task's training examples 320-399 (new task) and the general suite's training "
             "examples (general, zero-shot, the suite's metric); stage 1 of regime A, seed 0. The choice "
             "registered in experiments/study_protocol.md (amendment 2): a strength qualifies when its "
             f"new-task score is >= {QUALIFY} x plain's best on *both* tasks; the qualifying one with the "
             "highest mean general score is the method's point for the confirmation.", "",
             "| method | chosen | qualifies | mean new task | mean general after |", "|---|---|---|---|---|"]
    for m, c in chosen.items():
        lines.append(f"| {m} | not yet (sweep incomplete) | | | |" if c is None else
                     f"| {m} | {c['label']} | {'yes' if c['qualified'] else 'no: the best learner'} | "
                     f"{100 * c['new_task']:.1f} | {100 * c['general_after']:.1f} |")
    lines += ["", "Gradient-norm share of each regulariser (‖∇ term‖ / ‖∇ CE‖, mean over the stage's log steps):", "",
              "| task | method | label | shares |", "|---|---|---|---|"]
    for r in sweep:
        shares = {k: v for t in r.get("terms") or [] for k, v in (t.get("grad_share") or {}).items()}
        if shares:
            lines.append(f"| {r['task']} | {r['method']} | {r['label']} | "
                         + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()) + " |")
    return "\n".join(lines)


def reinjection_md(found: dict) -> str:
    """The re-injection analysis of each finished run it was made for (experiments/reinject.py)."""
    if not found:
        return ""
    L = ["", "## Re-injection (amendment 2; the original general-suite IVs added to the final model)", "",
         "Scores × 100, means over the six general tasks; shares are means over the tasks where the gap "
         "exceeds 2 binomial standard errors.", "",
         "| run | original | original + IV | final | final + IV | + random | + other IV | recovered vs original "
         "| vs original + IV | random | other IV |", "|---|" + "---|" * 10]
    for name, r in found.items():
        m = r["mean"]
        cells = [m[k] for k in ("original", "original_iv", "final", "final_iv", "final_random", "final_other_iv")]
        shares = [m[k] for k in ("recovery_vs_original", "recovery_vs_original_iv", "recovery_random",
                                 "recovery_other_iv")]
        L.append(f"| {name} | " + " | ".join(f"{100 * x:.1f}" for x in cells) + " | "
                 + " | ".join("—" if x is None else f"{x:.2f}" for x in shares) + " |")
    return "\n".join(L) + "\n"


def write_report() -> str:
    sweep = sweep_records()
    plan = confirm_plan(sweep)
    table = confirm_table(plan)
    chosen = {m: choose_setting(sweep, m) for m in GRID}
    d = {"sweep": sweep, "chosen": chosen, "confirm": table, "decision": decide(table),
         "reinjection": {p.stem: read_json(p) for p in sorted((RAW / "reinject").glob("*.json"))}}
    report.check_tradeoff(d)
    note = choice_note(chosen, sweep)
    out = ROOT / "results"
    save_report(d, out / "tradeoff.json")
    plots = [p.name for p in [report.plot_curves(d["sweep"], out / "tradeoff.png")] if p]
    md = report.markdown(d, plots, protocol_note=note) + reinjection_md(d["reinjection"])
    write_atomic(out / "tradeoff.md", lambda tmp: Path(tmp).write_text(md))
    return f"wrote results/tradeoff.json ({len(d['sweep'])} sweep points), results/tradeoff.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="run the dev sweep's missing points")
    p.add_argument("--confirm", action="store_true", help="run the missing confirmatory runs (seed 0 of all first)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the raw files")
    p.add_argument("--only", default=None, help="only points (sweep) or runs (confirm) of this method")
    p.add_argument("--workers", type=int, default=1, help="train.py runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.sweep:
        files = dev_files()
        jobs = [j for j in sweep_jobs() if args.only in (None, j[1])]
        fn = lambda *j: sweep_point(*j, files, args.threads, dry_run=args.dry_run)
    elif args.confirm:
        plan = confirm_plan(sweep_records())
        if plan is None:
            print("the dev sweep is not complete: the confirmatory points cannot be chosen yet", file=sys.stderr)
            return 1
        jobs = [j for j in confirm_jobs(plan) if args.only in (None, j[0])]
        fn = lambda label, settings, seed, twin: confirm_run(label, settings, seed, args.threads,
                                                                 dry_run=args.dry_run, twin=twin)
    else:
        print(write_report())
        return 0
    if args.dry_run:
        for j in jobs:
            print(fn(*j))
        return 0
    RUNS.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(RUNS, what="runs/tradeoff (another tradeoff.py)", name="driver.lock"):
            failed = run_all(jobs, args.workers, fn)
    except FolderInUse as e:
        print(e, file=sys.stderr)
        return 1
    print(write_report())
    return 1 if failed else 0


if __name__ == "__main__":
    with stop_signals_to_children():     # Ctrl-C / SIGTERM: its train.py runs save and stop
        sys.exit(main())
