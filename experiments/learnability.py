"""
Can the embedded model learn each training format? (issue #3: < 30% zero-shot, >= 80% after a few
hundred steps of fine-tuning)

The default, 120 steps of 8 examples (3 epochs of train.py's default 320 training examples), is where
a screening run of the slowest format, acronym, first passed 0.8 (0.83 on its 100 test examples;
20 steps give 0.55, see results/study_v1/study.md).

    python experiments/learnability.py                      # the default sequence, 120 steps each
    python experiments/learnability.py --tasks name_swap --steps 200

Every task is fine-tuned alone, from the original model, by one `train.py` process (plain full
fine-tuning, lr 1e-4, batch 8, cosine schedule); its test split is scored before (stage 0) and after
(stage 1) by exact match. Resumable: a finished task is skipped. Raw per-task results go to
runs/learnability/<task>/results.json (checkpoints deleted afterwards), the summary to
results/learnability.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import run_train, stop_signals_to_children  # a sibling: a script's own folder is on its path
from ivft import tasks as T
from ivft.report import save_report

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "learnability"
OUT = ROOT / "results" / "learnability.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(T.default_sequence()), help="comma-separated training tasks")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per task (batch 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval_n", type=int, default=100, help="test examples scored per task")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    summary = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for name in args.tasks.split(","):
        key = f"{name}@{args.steps}"
        d = RUNS / key
        if key in summary:
            print(f"{key}: done before ({summary[key]['before']:.3f} -> {summary[key]['after']:.3f})")
            continue
        flags = ["--tasks", name, "--general", "none", "--max_steps", str(args.steps), "--lr", str(args.lr),
                 "--eval_n", str(args.eval_n), "--eval_k_shot", "0", "--out_dir", str(d), "--overwrite",
                 "--log_every", "25", "--num_threads", str(args.threads)]
        t0 = time.time()
        rc = run_train(flags, RUNS / "logs" / f"{name}.txt")
        if rc != 0:
            print(f"{key}: FAILED (exit {rc}; see {RUNS / 'logs' / f'{name}.txt'})")
            return rc
        r = json.loads((d / "results.json").read_text())
        R = r["cl"]["R"]                                   # R[stage][task]; one task here
        summary[key] = {"task": name, "steps": args.steps, "lr": args.lr, "batch": 8,
                        "eval_n": args.eval_n, "metric": "exact_match",
                        "before": R[0][0], "after": R[1][0], "seconds": round(time.time() - t0)}
        for c in d.glob("stage-*"):                        # 0.5 GB each; the numbers are kept
            shutil.rmtree(c, ignore_errors=True)
        save_report(summary, OUT)                        # atomic: a crash keeps the last summary
        print(f"{key}: {R[0][0]:.3f} -> {R[1][0]:.3f} ({time.time() - t0:.0f} s)")
    print(f"{'task':16s} {'steps':>5s} {'before':>7s} {'after':>7s}")
    for v in summary.values():
        print(f"{v['task']:16s} {v['steps']:5d} {v['before']:7.3f} {v['after']:7.3f}")
    return 0


if __name__ == "__main__":
    with stop_signals_to_children():     # Ctrl-C / SIGTERM: its train.py runs save and stop
        sys.exit(main())
