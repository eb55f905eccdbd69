"""Reports: evaluate.py's JSON reports on disk, tables and plots; and the pictures and tables of IV results
(AIE heatmaps, layer sweeps, the held-out check)."""
from __future__ import annotations

import os

from ivft.files import write_atomic, write_json_atomic


# ---------------------------------------------------------------------------------------------
# Reports on disk

def save_report(report: dict, path) -> None:
    """Write the report as JSON (write_json_atomic: a reader never sees half a report, and a crash
    leaves the old one)."""
    write_json_atomic(path, report, indent=1)


# ---------------------------------------------------------------------------------------------
# Printing and plotting

def mean(xs):
    """The mean of xs, None when there are none (a score over no examples, a column with no values)."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def fmt_score(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}"


def print_table(report: dict, metrics, file=None) -> None:
    """One row per task, one column per metric; the primary metric is marked with *. metrics: the
    columns, in order (evaluate.METRICS); one that no task has is left out."""
    cols = [m for m in ("n",) + tuple(metrics) if any(m in r for r in report["tasks"].values())]
    names = list(report["tasks"])
    w = max([len("task")] + [len(x) for x in names]) + 2
    widths = [max(len(c) + 1, 8) for c in cols]
    print("task".ljust(w) + "".join(c.rjust(x + 1) for c, x in zip(cols, widths)), file=file)
    for name in names:
        r, primary = report["tasks"][name], report.get("primary", {}).get(name)
        cells = [(fmt_score(r.get(c)) + ("*" if c == primary else " ")).rjust(x + 1) for c, x in zip(cols, widths)]
        print(name.ljust(w) + "".join(cells), file=file)
    means = [(fmt_score(mean(r[c] for r in report["tasks"].values() if r.get(c) is not None)) + " ").rjust(x + 1)
             if c != "n" else "".rjust(x + 1) for c, x in zip(cols, widths)]
    print("mean".ljust(w) + "".join(means), file=file)


def print_cl(cl: dict, file=None) -> None:
    tasks = cl["train_tasks"]
    w = max(len(t) for t in tasks) + 2
    print("R (rows: stage, 0 = original; columns: train task)", file=file)
    print("stage".ljust(8) + "".join(t.rjust(w) for t in tasks), file=file)
    for i, row in enumerate(cl["R"]):
        print(str(i).ljust(8) + "".join(fmt_score(v).rjust(w) for v in row), file=file)
    for k in ("AP", "BWT", "FWT", "GP_drop", "IP_drop"):
        print(f"{k:8s}{fmt_score(cl.get(k))}", file=file)
    print("forgetting " + ", ".join(f"{t}={fmt_score(v)}" for t, v in cl["forgetting"].items()), file=file)


def pyplot():
    """matplotlib.pyplot drawing to files only (never a window), or None when matplotlib is not
    installed: every plot of the project is optional."""
    try:
        # lazily: heavy to import (a second per process) and optional
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt     # only after use("Agg"), which it reads
    except ImportError:
        return None
    return plt


def term_means(task: str, term_log: list) -> dict:
    """One stage's loss terms (weights included) and gradient shares, averaged over its log steps
    (results.json "training"): whether each regulariser was active, and how strongly."""
    def avg(key):
        names = dict.fromkeys(k for rec in term_log for k in rec[key])
        return {k: mean([rec[key][k] for rec in term_log if k in rec[key]]) for k in names}
    return {"task": task, "log_steps": len(term_log), "terms": avg("terms"), "grad_share": avg("grad_share")}


def new_task_scores(cl: dict) -> dict:
    """{task: (score before any training, score right after its own stage)}: what was learned."""
    return {t: (cl["R"][0][j], cl["R"][j + 1][j]) for j, t in enumerate(cl["train_tasks"]) if j + 1 < len(cl["R"])}


def general_scores(cl: dict) -> list | None:
    """The general suite's score per stage, or None when the run had none (--general none, "", ","):
    cl_metrics then gives GP = [None, ...], a list of no scores, which must not be formatted."""
    gp = cl.get("GP")
    return gp if gp and all(isinstance(v, (int, float)) for v in gp) else None


def run_summary(cl: dict, preset: str) -> list[str]:
    """The end of a run in plain words: what was learned, what the general suite kept, what to look at."""
    learned = new_task_scores(cl)
    lines = ["learned (right after its stage): " + ", ".join(f"{t} {a:.2f} -> {b:.2f}" for t, (a, b) in learned.items())]
    mean_new = mean([b for _, b in learned.values()])
    if general_scores(cl) is None:
        lines.append("general suite: none (--general), so forgetting of general ability was not measured")
    else:
        gp = cl["GP"]
        lines.append(f"general suite (zero-shot, never trained on): {gp[0]:.2f} before -> {gp[-1]:.2f} after "
                     f"(drop {cl['GP_drop']:.2f}; lowest {min(gp[1:]):.2f}, after stage {gp.index(min(gp[1:]))})")
        forgot = cl["GP_drop"] > 0.05
        lines.append("look at: " + (f"the tasks were learned (mean {mean_new:.2f}) while the general suite "
                                    f"{'fell' if forgot else 'held'}: " if mean_new >= 0.5 else
                                    f"the tasks were barely learned (mean {mean_new:.2f}): ")
                     + ("that drop is the forgetting this project is about; " if forgot else "")
                     + ("run the same with --guided and compare the two with experiments/compare.py"
                        if preset != "guided" else "compare with plain training (the same flags without "
                        "--guided) with experiments/compare.py"))
    return lines


def plot_summary(cl: dict, path, title: str = "") -> str | None:
    """PNG: the general suite's score and each training task's score after every stage. Returns the
    path, or None (and draws nothing) when matplotlib is not installed: plots are optional."""
    plt = pyplot()
    if plt is None:
        return None
    stages = range(len(cl["R"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if general_scores(cl) is not None:
        ax.plot(stages, cl["GP"], "k-o", lw=2.5, label=f"general suite (drop {fmt_score(cl['GP_drop'])})")
    for j, t in enumerate(cl["train_tasks"]):
        ax.plot(stages, [row[j] for row in cl["R"]], "--", marker=".", label=f"{t} (trained in stage {j + 1})")
    ax.set_xticks(list(stages), ["orig"] + [f"after {cl['train_tasks'][i - 1]}" for i in stages if i])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("score")
    ax.set_title(title or f"AP {fmt_score(cl['AP'])}, BWT {fmt_score(cl['BWT'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# Instruction vectors (extract_iv.py): the AIE heatmap, the layer x K sweep, the check

def save_heatmap(aie, heads, path, title=""):
    """AIE [L, H] as an image, top heads boxed; skipped without matplotlib (an optional dependency)."""
    plt = pyplot()
    if plt is None:
        return None
    L, H = aie.shape
    fig, ax = plt.subplots(figsize=(2 + 0.35 * H, 1.5 + 0.22 * L))
    im = ax.imshow(aie.numpy(), cmap="RdBu_r", aspect="auto",
                   vmin=-float(aie.abs().max()), vmax=float(aie.abs().max()))
    for l, h in heads:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="AIE")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))   # never half a PNG
    plt.close(fig)
    return path


def format_iv(name: str, r: dict) -> str:
    """One line per IV that extract_iv.py made or reused (r: its result, with r["path"])."""
    m, nan = r["meta"], float("nan")
    heads = ", ".join(f"({l},{h}) {float(r['aie'][l, h]):+.4f}" for l, h in r["heads"])
    return (f"{name}: {m['kind']} IV" + (f", heads {heads}" if m["kind"] == "heads" else "")
            + f"; layer {r['layer']}; |iv| {float(r['iv'].norm()):.3f}; AIE by {m.get('effect_used')}; "
            f"clean prompts {m.get('n_clean')} ({m.get('n_clean_correct')} answered, first-token accuracy "
            f"of all scored {m.get('clean_top1_all', nan):.2f}, P(first) {m.get('clean_p_first', nan):.3f}), "
            f"corrupted {m.get('n_corrupt')}{' (reused)' if r.get('reused') else ''} -> {r['path']}")


def format_sweep(sw: dict, best: dict) -> str:
    """extract_iv.sweep as a table, layers by K; best: the sweep's choice (extract_iv.best_row)."""
    kinds = sorted({(r["kind"], r["k"] or 0) for r in sw["rows"]}, key=lambda x: (x[0] != "heads", x[1]))
    L = max(r["layer"] for r in sw["rows"]) + 1
    cell = {(r["kind"], r["k"] or 0, r["layer"]): r for r in sw["rows"]}
    names = [f"K={k}" if kind == "heads" else "resid" for kind, k in kinds]
    lines = [f"sweep on {sw['n']} dev examples of {sw['task']}: restored share of the log-P gap "
             f"(clean {sw['clean']['logprob']:.2f}, corrupted {sw['corrupted']['logprob']:.2f}) / "
             f"first-token accuracy (clean {sw['clean']['top1']:.2f}, corrupted {sw['corrupted']['top1']:.2f})",
             "layer " + " ".join(f"{n:>12}" for n in names)]
    for l in range(L):
        lines.append(f"{l:5d} " + " ".join(f"{cell[(kd, k, l)]['restored_logprob']:6.2f}/{cell[(kd, k, l)]['top1']:.2f}"
                                           for kd, k in kinds))
    lines.append(f"best: {best['kind']}" + (f" K={best['k']}" if best["k"] else "") +
                 f" after block {best['layer']}: restored {best['restored_logprob']:.2f}, accuracy {best['top1']:.2f}")
    return "\n".join(lines)


def plot_sweep(sw: dict, path) -> str | None:
    """Restored share of the log-P gap against the layer, one line per K (and resid); skipped without
    matplotlib (an optional dependency)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, k in sorted({(r["kind"], r["k"] or 0) for r in sw["rows"]}):
        rows = [r for r in sw["rows"] if r["kind"] == kind and (r["k"] or 0) == k]
        ax.plot([r["layer"] for r in rows], [r["restored_logprob"] for r in rows], marker=".",
                label=f"heads K={k}" if kind == "heads" else "resid")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("IV added after block")
    ax.set_ylabel("restored share of log P gap")
    ax.set_title(f"{sw['task']}: {sw['n']} dev examples", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def format_check(res: dict) -> str:
    """ivft.ivcheck.check_iv's scores as a table, one row per condition."""
    lines = [f"check on {res['n']} held-out test examples (IV after block {res['layer']})",
             f"{'condition':<18} {'top1':>6} {'P(first)':>9} {'logP(ans)':>10} {'exact':>6} {'contains':>9}"]
    labels = {"clean": "clean (k-shot)", "corrupted": "query alone", "iv": "query alone + IV",
              "chat": "chat, 0-shot", "chat_iv": "chat, 0-shot + IV"}
    for name in (c for c in labels if c in res):
        v = res[name]
        gen = f"{v['exact']:6.2f} {v['contains']:9.2f}" if "exact" in v else ""
        lines.append(f"{labels[name]:<18} {v['top1']:6.2f} {v['p_first']:9.3f} {v['logprob']:10.2f} {gen}")
    for metric in ("logprob", "accuracy"):
        r = res[f"restored_{metric}"]
        lines.append(f"restored share of the {metric} gap: " + (f"{r:.2f} ({res[f'gap_{metric}']})" if r is not None
                                                                else f"not measurable: {res[f'gap_{metric}']}"))
    return "\n".join(lines)
