"""
Runs of train.py side by side: what each learned, what the general suite kept, at what cost.

    python train.py --quick && python train.py --guided --quick
    python experiments/compare.py runs/plain-quick runs/guided-quick     # table (+ compare.png)

Each RUN_DIR is a train.py out_dir (its results.json). Columns: new task = mean score of each task
right after its own stage; general before / after = the zero-shot general suite (GP) of the original
model and after the last stage; GP drop, IP drop (the k-shot suite), AP and BWT as in docs/method.md
§5. A run still going shows the stages it has.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ivft.files import write_atomic
from ivft.report import fmt_score, mean, new_task_scores, pyplot

COLUMNS = ("new task", "general before", "general after", "GP drop", "IP drop", "AP", "BWT", "stages")


def row(results: dict) -> dict:
    cl = results.get("cl") or {}
    if not cl:
        return {c: None for c in COLUMNS} | {"stages": len(results.get("stages", [])) - 1}
    gp = cl.get("GP") or [None]
    return {"new task": mean([after for _, after in new_task_scores(cl).values()]), "general before": gp[0],
            "general after": gp[-1], "GP drop": cl.get("GP_drop"), "IP drop": cl.get("IP_drop"),
            "AP": cl.get("AP"), "BWT": cl.get("BWT"), "stages": cl["stages"]}


def load(run_dir: Path) -> dict:
    """A run's results.json, checked to be one (a JSON object whose "cl" is an object, "stages" a
    list) and to give its table row: any other JSON (a list, a string) is one ValueError naming it."""
    path = run_dir / "results.json"
    try:
        res = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (is {run_dir} a train.py out_dir?)") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a results file ({type(e).__name__})") from None
    if not isinstance(res, dict) or not isinstance(res.get("cl") or {}, dict) \
            or not isinstance(res.get("stages", []), list):
        raise ValueError(f"{path}: not a results file (expected train.py's JSON object, got {type(res).__name__})")
    try:
        row(res)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: not a results file (its 'cl' is damaged: {type(e).__name__} {e})") from None
    return res


def plot(runs: dict, path: Path) -> str | None:
    """The general suite after every stage, one line per run (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in runs.items():
        gp = (res.get("cl") or {}).get("GP")
        if gp:
            ax.plot(range(len(gp)), gp, marker="o", label=f"{name} (new task {fmt_score(row(res)['new task'])})")
    ax.set_xlabel("stage (0 = the original model)")
    ax.set_ylabel("general suite, zero-shot")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="train.py out_dirs")
    p.add_argument("--png", type=Path, default=Path("compare.png"), help="the plot (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        runs = {str(r): load(r) for r in args.runs}
    except ValueError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    width = max(len(n) for n in runs) + 2
    print("run".ljust(width) + "".join(c.rjust(15) for c in COLUMNS))
    for name, res in runs.items():
        r = row(res)
        print(name.ljust(width) + "".join((fmt_score(r[c]) if c != "stages" else str(r[c])).rjust(15)
                                          for c in COLUMNS))
    try:
        png = plot(runs, args.png)
    except OSError as e:
        print(f"compare.py: error: {args.png}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    if png:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
