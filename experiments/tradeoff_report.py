"""
The report side of the trade-off study (results/tradeoff.json, written by experiments/tradeoff.py): the
Pareto front of new-task score against the general score kept, the registered choice rule, the plot and
results/tradeoff.md. Pure functions on the JSON: no model, no training.

Scores are fractions in [0, 1]; the plot and the tables show them in points (x 100).
"""
from __future__ import annotations

import numbers
from pathlib import Path

from ivft.files import write_atomic
from ivft.report import pyplot

SWEEP_KEYS = {"method": str, "settings": dict, "task": str, "split": str,
              "new_task": numbers.Real, "general_before": numbers.Real, "general_after": numbers.Real}
SCORES = ("new_task", "general_before", "general_after")
CONFIRM_KEYS = {"method": str, "regime": str, "settings": dict}
CONFIRM_STATS = ("GP_drop", "new_task", "general_stage_mean", "IP_drop", "BWT")


# ---------------------------------------------------------------------------------------------
# The numbers

def pareto_front(points: list[dict]) -> list[int]:
    """Indices (ascending) of the points that no other point dominates: >= in both new_task and
    general_after and > in one. Identical points do not dominate each other, so each is kept (once)."""
    def dominates(a, b):
        ge = a["new_task"] >= b["new_task"] and a["general_after"] >= b["general_after"]
        return ge and (a["new_task"] > b["new_task"] or a["general_after"] > b["general_after"])
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def retained(p: dict) -> float | None:
    """The share of the original model's general score kept after the stage; None when there was none."""
    if not p.get("general_before") or p.get("general_after") is None:
        return None
    return p["general_after"] / p["general_before"]


def choose_point(sweep: list[dict], task: str, method: str, plain_best_frac: float = 0.9) -> dict | None:
    """The registered choice rule: among `method`'s points on `task` that learn the task nearly as well
    as plain can (new_task >= plain_best_frac x plain's best new_task there), the one that keeps the
    most general score; ties go to the higher new_task, then to the first. None if none qualifies
    (or plain has no point on the task, so there is no bar to clear)."""
    plain = [r["new_task"] for r in sweep if r["task"] == task and r["method"] == "plain"]
    if not plain:
        return None
    bar = plain_best_frac * max(plain)
    ok = [r for r in sweep if r["task"] == task and r["method"] == method and r["new_task"] >= bar]
    return max(ok, key=lambda r: (r["general_after"], r["new_task"]), default=None)   # max keeps the first


def tasks_of(sweep: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in sweep))        # in the order the sweep ran them


def by_method(points: list[dict]) -> list[dict]:
    """Sorted by method, then by the method's knob (its points in order of strength)."""
    return sorted(points, key=lambda r: (r["method"], r.get("strength", 0.0)))


# ---------------------------------------------------------------------------------------------
# The file's shape

def check_tradeoff(d: dict) -> None:
    """Raise ValueError naming the first missing or ill-typed key of a tradeoff.json, so that the report
    fails on the sweep driver's mistake instead of drawing it."""
    def need(obj, key, kind, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"tradeoff.json: {where}{key} is missing")
        v, kinds = obj[key], kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds:   # True is no score
            raise ValueError(f"tradeoff.json: {where}{key} should be "
                             f"{' or '.join(k.__name__ for k in kinds)}, not {type(v).__name__}")
        return v
    number_or_none = (numbers.Real, type(None))
    for key, kind in (("sweep", list), ("confirm", dict), ("decision", dict)):
        need(d, key, kind, "")
    for i, r in enumerate(d["sweep"]):
        for key, kind in SWEEP_KEYS.items():
            need(r, key, kind, f"sweep[{i}].")
        for key in SCORES:
            if not 0 <= r[key] <= 1:
                raise ValueError(f"tradeoff.json: sweep[{i}].{key} = {r[key]} is not a fraction in [0, 1]")
    for label, c in d["confirm"].items():
        for key, kind in CONFIRM_KEYS.items():
            need(c, key, kind, f"confirm[{label!r}].")
        for key in CONFIRM_STATS:
            s = need(c, key, dict, f"confirm[{label!r}].")
            need(s, "mean", number_or_none, f"confirm[{label!r}].{key}.")
            need(s, "std", number_or_none, f"confirm[{label!r}].{key}.")
            need(s, "n", int, f"confirm[{label!r}].{key}.")
    need(d["decision"], "holds", (bool, type(None)), "decision.")
    need(d["decision"], "text", str, "decision.")


# ---------------------------------------------------------------------------------------------
# The plot

def plot_curves(sweep: list[dict], path) -> Path | None:
    """One panel per task: general score after the stage against the new-task score, one line per method
    through its points in order of strength (each labelled), the original model's general score dashed,
    and the Pareto front over all methods circled and joined by a grey staircase. None (and no file)
    without matplotlib or without points."""
    plt = pyplot()
    tasks = tasks_of(sweep)
    if plt is None or not tasks:
        return None
    methods = sorted({r["method"] for r in sweep})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = [r for r in sweep if r["task"] == task]
        before = sum(r["general_before"] for r in pts) / len(pts)     # one original model: all equal
        ax.axhline(100 * before, ls="--", color="black", lw=0.8, label="original")
        for i, m in enumerate(methods):
            mine = sorted((r for r in pts if r["method"] == m), key=lambda r: r.get("strength", 0.0))
            if not mine:
                continue
            xs, ys = [100 * r["new_task"] for r in mine], [100 * r["general_after"] for r in mine]
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", ms=4, lw=1, label=m)
            for x, y, r in zip(xs, ys, mine):
                ax.annotate(r.get("label", ""), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
        front = sorted((pts[i] for i in pareto_front(pts)), key=lambda r: r["new_task"])
        fx, fy = [100 * r["new_task"] for r in front], [100 * r["general_after"] for r in front]
        # steps-pre: right of a front point, the best general score still reachable is the next point's
        ax.plot(fx, fy, drawstyle="steps-pre", color="grey", lw=1.5, alpha=0.6, zorder=0)
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="grey", label="Pareto front")
        ax.set_title(f"{task} ({len(pts)} points, {pts[0]['split']} split)", fontsize=9)
        ax.set_xlabel("new-task score (points)")
        ax.set_ylabel("general score after the stage (points)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))   # tmp has no suffix
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# results/tradeoff.md

def points(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def nats(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def mean_std(s: dict | None, fmt=points) -> str:
    """'mean ± std' in fmt's units (points, or nats); "-" where the records carry no such endpoint."""
    if not s:
        return "-"
    return fmt(s["mean"]) + ("" if s["std"] is None else f" ± {fmt(s['std'])}")


def choice_line(sweep: list[dict], task: str, method: str) -> str:
    best = choose_point(sweep, task, method)
    if best is None:
        return f"- {method}: no point reaches 90% of plain's best new-task score"
    return (f"- {method}: {best.get('label', '')} (new task {points(best['new_task'])}, "
            f"general after {points(best['general_after'])})")


TASK_HEADER = "| method | label | new task | general after | retained % | on Pareto front |"


def markdown(d: dict, plots: list[str], protocol_note: str = "") -> str:
    """results/tradeoff.md: the sweep per task with its Pareto front and the choice rule's pick per method,
    the confirmatory runs over seeds, and the decision."""
    sweep = d["sweep"]
    L = ["# Trade-off: new-task score against general score kept", "",
         f"{len(sweep)} sweep points, generated by `experiments/tradeoff_report.py` from "
         "results/tradeoff.json; scores in points (x 100), retained = general after / general before.", ""]
    if protocol_note:
        L += [protocol_note, ""]
    L += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    for task in tasks_of(sweep):
        pts = by_method(r for r in sweep if r["task"] == task)
        front = set(pareto_front(pts))
        L += [f"## {task}", "", TASK_HEADER, "|---|---|---|---|---|---|"]
        for i, r in enumerate(pts):      # retained in % is one more fraction x 100
            cells = [r["method"], r.get("label", ""), points(r["new_task"]), points(r["general_after"]),
                     points(retained(r)), "yes" if i in front else "no"]
            L.append("| " + " | ".join(cells) + " |")
        L += ["", "Chosen point per method (new task >= 0.9 x plain's best, then the highest general after):",
              ""]
        L += [choice_line(sweep, task, m) for m in dict.fromkeys(r["method"] for r in pts)] + [""]
    if d["confirm"]:
        L += ["## Confirmatory runs (mean ± std over seeds)", "",
              "Scores in points; the instruction log P (the general suite's instructions, after the last "
              "stage) in nats, the higher the closer to a model that still reads them.", "",
              "| label | method | n seeds | new task | GP drop | stage-mean general | IP drop | BWT "
              "| instruction log P |",
              "|---|---|---|---|---|---|---|---|---|"]
        for label, c in d["confirm"].items():
            n = len(c["seeds"]) if "seeds" in c else c["GP_drop"]["n"]
            cells = [mean_std(c[k]) for k in ("new_task", "GP_drop", "general_stage_mean", "IP_drop", "BWT")]
            cells.append(mean_std(c.get("instruction_logprob"), nats))
            L.append(f"| {label} | {c['method']} | {n} | " + " | ".join(cells) + " |")
        L.append("")
    else:
        L += ["Confirmatory runs: not yet run.", ""]
    holds = d["decision"]["holds"]
    verdict = "not yet decided" if holds is None else ("holds" if holds else "does not hold")
    L += ["## Decision", "", f"**{verdict}.** {d['decision']['text']}", ""]
    return "\n".join(L)
