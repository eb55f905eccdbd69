"""
How the instruction-vector defaults of extract_iv.py were chosen: on the dev split of every general
task and every default training task, the IV added after each block of the embedded model, for each
K of extract_iv.K_GRID, heads ranked by each effect (P(first token) and log P(answer)), and the
residual-stream task vector beside it. Dev examples only; the test split is extract_iv --check's.

    python experiments/iv_layers.py                # -> results/iv_layers.json, results/iv_layers.png
    python experiments/iv_layers.py --tasks antonym --threads 2

Per task, restored share of the dev log-P gap and first-token accuracy per (effect, kind, K, layer);
the summary averages the restored share over the general tasks and names the best setting.
Resumable: tasks already in the JSON are skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import extract_iv as X
from ivft import tasks as T
from ivft.ivsettings import KINDS, Settings
from ivft.load import load_model
from ivft.report import pyplot, save_report

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=None, help="comma-separated (default: general suite + default sequence)")
    ap.add_argument("--out", default=str(ROOT / "results" / "iv_layers.json"), help="JSON written here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap.parse_args(argv)


def summarize(per_task: dict, general: list[str]) -> dict:
    """Mean restored share and accuracy gain over the general tasks, per (effect, kind, K, layer)."""
    acc: dict = {}
    for name, r in per_task.items():
        if name not in general:
            continue
        for effect, sw in r["sweeps"].items():
            for row in sw["rows"]:
                key = (effect, row["kind"], row["k"] or 0, row["layer"])
                acc.setdefault(key, []).append((row["restored_logprob"], row["accuracy_gain"]))
    rows = [{"effect": e, "kind": k, "k": K, "layer": l, "n_tasks": len(v),
             "restored_logprob": sum(a for a, _ in v) / len(v), "accuracy_gain": sum(b for _, b in v) / len(v)}
            for (e, k, K, l), v in acc.items()]
    rows.sort(key=lambda r: -r["restored_logprob"])
    best = {kind: next((r for r in rows if r["kind"] == kind), None) for kind in KINDS}
    return {"rows": rows, "best": best}


def plot(summary: dict, path: Path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, effect in zip(axes, ("prob", "logprob")):
        series = sorted({(r["kind"], r["k"]) for r in summary["rows"] if r["effect"] == effect})
        for kind, k in series:
            rows = sorted((r for r in summary["rows"] if r["effect"] == effect and r["kind"] == kind and r["k"] == k),
                          key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in rows], [r["restored_logprob"] for r in rows], marker=".",
                    label=f"heads K={k}" if kind == "heads" else "resid (mean residual difference)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"heads ranked by {'P(first token)' if effect == 'prob' else 'log P(answer)'}", fontsize=9)
        ax.set_xlabel("vector added after block")
    axes[0].set_ylabel("restored share of the log-P gap\n(mean over the general tasks, dev split)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    general = T.general_suite()
    names = args.tasks.split(",") if args.tasks else general + T.default_sequence()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"tasks": {}}
    model, tok = load_model()
    model.eval()
    for name in names:
        if name in res["tasks"]:
            continue
        task = T.load_task(name)
        t0 = time.perf_counter()
        entry = {"sweeps": {}, "info": {}}
        for effect in ("prob", "logprob"):
            s = Settings(effect=effect).resolve(model)
            med = X.mediation(model, tok, task, s, progress=False)
            sw = X.sweep(model, tok, task, med, s, progress=False,
                         kinds=("heads", "resid") if effect == "prob" else ("heads",))
            entry["sweeps"][effect] = sw
            entry["info"][effect] = med["info"]
            b = X.best_row(sw)
            print(f"{name} [{effect}]: clean top1 {sw['clean']['top1']:.2f} lp {sw['clean']['logprob']:.2f}; "
                  f"corrupted top1 {sw['corrupted']['top1']:.2f} lp {sw['corrupted']['logprob']:.2f}; best "
                  f"{b['kind']} K={b['k']} layer {b['layer']}: restored {b['restored_logprob']:.2f} "
                  f"top1 {b['top1']:.2f}; P(first) clean {med['info']['clean_p_first']:.3f}", flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        res["tasks"][name] = entry
        res["summary"] = summarize(res["tasks"], general)
        save_report(res, out)
    res["summary"] = summarize(res["tasks"], general)
    save_report(res, out)
    plot(res["summary"], out.with_suffix(".png"))
    for kind, b in res["summary"]["best"].items():
        if b:
            print(f"best {kind}: effect {b['effect']} K={b['k']} after block {b['layer']}: mean restored "
                  f"{b['restored_logprob']:.2f}, accuracy gain {b['accuracy_gain']:+.2f} over {b['n_tasks']} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
