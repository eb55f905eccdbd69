"""
The registered rules of amendment 3 (experiments/study_protocol.md) and the report of
experiments/forgetting.py: each record's endpoints against the base model, each method's chosen point
(choose), the off-floor regime (choose_regime), the confirmation's arms (plan), the table over seeds
and the decision (decide); results/forgetting.json, forgetting.md and the curves' PNG (write).

Endpoints of a model (experiments/general_eval.endpoints, against the base model on the same items):
median retention over the seven general tasks (IF prompt-level strict and the six knowledge tasks'
choice accuracy, each chance-corrected), tasks keeping >= 50%, mean retention, drift KL per token, IF
prompt-level strict; each with its bootstrap SE.
"""
from __future__ import annotations

import json
from pathlib import Path

import general_eval as GE  # a sibling: on the script's path
from common import stat
from ivft.files import write_atomic
from ivft.report import save_report

ROOT = Path(__file__).resolve().parent.parent
QUALIFY = 0.9          # a strength qualifies at >= 0.9 x the reference's new-task dev score
BAND = (0.2, 0.6)      # the off-floor regime: plain keeps this much (IF retention) after the sequence
MARGIN = 0.02          # the goal's "new task within 2 points of plain's"
NON_IV = ("plain", "lora", "lwf", "free_kl", "other_kl")      # plain's chosen point is "plain-less"
PROMPT_KL = ("free_kl", "other_kl")                             # regularisers that combine with guided's KL

# method -> [(label, strength, train.py flags)] on stage 1 of the dev split, seed 0. strength orders a
# method's points (more training for plain and LoRA, the regulariser's weight for the others); all but
# plain's and LoRA's own grids train at regime A's defaults (lr 1e-4, one epoch, cosine, batch 8).
GRID = {
    "plain": [(f"lr={lr:g}" + ("" if ep == 1 else f",ep={ep:g}"), lr * ep, ["--lr", str(lr), "--epochs", str(ep)])
              for lr, ep in ((1e-5, 1), (3e-5, 1), (1e-4, 0.5), (1e-4, 1))],
    "lora": [(f"r=8,lr={lr:g}", lr, ["--regime", "lora", "--lr", str(lr), "--epochs", "1"]) for lr in (3e-4, 1e-3)],
    "lwf": [(f"λ={w:g}", w, ["--preset", "lwf", "--kl_weight", str(w)]) for w in (1, 10)],
    "guided": [("λ=1,as extracted", 0.0, ["--preset", "guided"])]
              + [(f"λ={w:g},r={r:g}", w + r, ["--preset", "guided", "--kl_weight", str(w), "--iv_norm_ratio", str(r)])
                 for w, r in ((1, 0.5), (10, 0.5), (10, 0.25))],
    "free_kl": [(f"λ_free={w:g}", w, ["--free_kl_weight", str(w)]) for w in (1, 10, 30)],
    "other_kl": [(f"λ_other={w:g}", w, ["--other_kl_weight", str(w)]) for w in (1, 10, 30)],
}
REFERENCE = ("plain", "lr=0.0001")        # plain at regime A's defaults: the reference point of the sweep
WISE = [(f"α={a:g}", a) for a in (0.25, 0.5, 0.75)]   # θ = (1 - α)·θ_original + α·θ_tuned, on REFERENCE's model
HARSH_LR = 1e-4                           # regime A's lr: today's harsh regime
REGIME_LRS = (HARSH_LR, 3e-5, 1e-5)           # plain over the whole dev sequence: the off-floor regime's candidates
# replay has nothing to replay in stage 1 (amendment 3c): its curve is stages 1-2 of the dev sequence
# (uppercase, then date_iso) at regime A's defaults, over the share of earlier examples mixed in (0: plain)
REPLAY = [(f"replay={f:g}", f, ["--replay", str(f)]) for f in (0.0, 0.1, 0.25, 0.5)]


def endpoints(base: dict, general: dict) -> dict:
    """The model's endpoints, each {"value", "se"}, and per-task retention (the IF parts as
    forgetting.py loads them: scored from their stored replies by the current checkers)."""
    e = GE.endpoints(base, general)
    out = {k: e["endpoints"][k] for k in ("median_retention", "tasks_kept", "mean_retention")}
    out["drift_kl"] = e["drift_kl_per_token"]
    out["if_strict"] = general["if"]["prompt_strict"]
    out["if_retention"] = e["per_task"]["ifeval"]["retention"]
    out["answers"] = general["if"].get("answers")
    out["per_task"] = {t: v["retention"]["value"] for t, v in e["per_task"].items()}
    return out


def new_task_of(rec: dict) -> float:
    """The new task's dev score right after stage 1 (a WiSE-FT point: its mixed model's)."""
    return rec["tasks"]["uppercase"] if "tasks" in rec else rec["cl"]["R"][1][0]


def sweep_rows(sweep: list[dict], base: dict) -> list[dict]:
    rows = [{"method": r["method"], "label": r["label"], "strength": r["strength"], "settings": r["settings"],
             "new_task": new_task_of(r), **endpoints(base, r["general"]),
             "grad_share": {k: v for t in r.get("training") or [] for k, v in (t.get("grad_share") or {}).items()},
             "seconds": r.get("seconds")} for r in sweep]
    return sorted(rows, key=lambda r: (r["method"], r["strength"]))


def replay_rows(recs: list[dict], base: dict) -> list[dict]:
    """Replay's points (stages 1-2): the new task is date_iso right after stage 2; "earlier" is
    uppercase right after its own stage and after stage 2, the task replay protects; the general
    endpoints are the stage-2 model's."""
    rows = [{"method": "replay", "label": r["label"], "strength": r["strength"], "settings": r["settings"],
             "new_task": r["cl"]["R"][2][1], "earlier_before": r["cl"]["R"][1][0], "earlier_after": r["cl"]["R"][2][0],
             **endpoints(base, r["general"]), "seconds": r.get("seconds")} for r in recs]
    return sorted(rows, key=lambda r: r["strength"])


def better(a: dict, b: dict) -> bool:
    """a beats b (amendment 3a): a lower drift KL; equal drift: a higher median retention, then a
    higher new-task score."""
    da, db = a["drift_kl"]["value"], b["drift_kl"]["value"]
    if da != db:
        return da < db
    ma, mb = a["median_retention"]["value"], b["median_retention"]["value"]
    return ma > mb if ma != mb else a["new_task"] > b["new_task"]


def best_of(rows: list[dict]) -> dict:
    out = rows[0]
    for r in rows[1:]:
        out = r if better(r, out) else out
    return out


def best_chosen(chosen: list[dict]) -> dict:
    """The best of methods' chosen points (amendment 3b): among those that qualified (learned the new
    task at matched cost) by better(); none qualified: the one that learned most."""
    ok = [c for c in chosen if c["qualified"]]
    return best_of(ok) if ok else max(chosen, key=lambda c: c["new_task"])


def choose(rows: list[dict], method: str, reference: dict) -> dict | None:
    """The registered rule: among the method's points with new task >= QUALIFY x the reference's, the
    best (better()); none qualifies -> the highest new task, marked. None while the method has no point."""
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return None
    ok = [r for r in mine if r["new_task"] >= QUALIFY * reference["new_task"] - 1e-9]
    pick = best_of(ok) if ok else max(mine, key=lambda r: r["new_task"])
    return {**pick, "qualified": bool(ok)}


def choose_regime(regime: list[dict], base: dict) -> dict | None:
    """The highest lr at which plain's IF retention (amendment 3a) after the dev sequence is within
    BAND; none -> the one closest to the band's middle. None until every candidate ran."""
    if len(regime) < len(REGIME_LRS):
        return None
    rows = sorted(({"lr": r["lr"], "new_task": sum(r["cl"]["R"][i + 1][i] for i in range(4)) / 4,
                    **endpoints(base, r["general"])} for r in regime), key=lambda r: -r["lr"])
    inside = [r for r in rows if BAND[0] <= r["if_retention"]["value"] <= BAND[1]]
    mid = sum(BAND) / 2
    pick = max(inside, key=lambda r: r["lr"]) if inside else \
        min(rows, key=lambda r: abs(r["if_retention"]["value"] - mid))
    return {"lr": pick["lr"], "in_band": bool(inside), "rows": rows}


def plan(sweep: list[dict], regime: list[dict], base: dict) -> dict | None:
    """The confirmation's arms per regime ({"arms": {regime: {label: train.py settings}}, "wise_alpha",
    "chosen", "regime"}), or None until the sweep and the regime runs are complete."""
    rows = sweep_rows(sweep, base)
    need = {(m, lab) for m, pts in GRID.items() for lab, _, _ in pts} | {("wise", lab) for lab, _ in WISE}
    if not need <= {(r["method"], r["label"]) for r in rows}:
        return None
    reg = choose_regime(regime, base)
    if reg is None:
        return None
    ref = next(r for r in rows if (r["method"], r["label"]) == REFERENCE)
    chosen = {m: choose(rows, m, ref) for m in [*GRID, "wise"]}
    best_non_iv = best_chosen([chosen[m] for m in NON_IV if m != "plain"] + [chosen["plain"]])
    best_prompt_kl = best_chosen([chosen[m] for m in PROMPT_KL])
    best_any = best_chosen([chosen[m] for m in chosen if m not in ("plain", "wise")])
    lr = {"lr": reg["lr"]}
    # an arm trains at the regime's lr unless its point sets its own (plain's "do less", LoRA)
    at = lambda pt: {**lr, **pt["settings"]} if "lr" not in pt["settings"] else dict(pt["settings"])  # noqa: E731
    off = {"plain": dict(lr), "plain-less": at(chosen["plain"]), "best-non-iv": at(best_non_iv),
           "guided-paper": {**lr, "preset": "guided"}, "guided-chosen": at(chosen["guided"]),
           "free_kl": at(chosen["free_kl"]), "guided+prompt-kl": {**at(chosen["guided"]), **best_prompt_kl["settings"]}}
    harsh = {"plain": {}, "guided-paper": {"preset": "guided"}, "best": dict(best_any["settings"])}
    # the harsh regime itself off the floor: one regime, every arm in it
    arms = {"off-floor": off, "harsh": harsh} if reg["lr"] != HARSH_LR else {"harsh": {**off, **harsh}}
    names = {"best-non-iv": f"{best_non_iv['method']} {best_non_iv['label']}",
             "guided+prompt-kl": f"guided {chosen['guided']['label']} + {best_prompt_kl['method']} "
                                 f"{best_prompt_kl['label']}", "best": f"{best_any['method']} {best_any['label']}"}
    return {"arms": arms, "wise_alpha": chosen["wise"]["settings"]["alpha"], "regime": reg, "names": names,
            "chosen": {m: {k: c[k] for k in ("label", "settings", "qualified", "new_task")}
                       | {"median_retention": c["median_retention"]["value"], "drift_kl": c["drift_kl"]["value"]}
                       for m, c in chosen.items()}}


# ---- the confirmation -----------------------------------------------------------------------------------

ENDPOINTS = ("median_retention", "tasks_kept", "mean_retention", "drift_kl", "if_strict", "if_retention", "answers")


def run_endpoints(rec: dict, base: dict) -> dict:
    """One confirmatory run's endpoints (values) and per-task retentions."""
    e = endpoints(base, rec["general"])
    out = {k: (e[k] or {}).get("value") for k in ENDPOINTS} | {"per_task": e["per_task"]}
    if "cl" in rec:
        R, n = rec["cl"]["R"], len(rec["cl"]["train_tasks"])
        out |= {"new_task": sum(R[i + 1][i] for i in range(n)) / n, "AP": sum(R[n]) / n}
    else:     # WiSE-FT on a final model: the training tasks' scores of the mixed model
        out |= {"AP": sum(rec["tasks"].values()) / len(rec["tasks"])}
    return out


def stat_se(xs) -> dict:
    """{"mean", "std", "n", "se"} over seeds (se = std / sqrt(n); None under two seeds)."""
    st = stat(xs)
    return {**st, "se": st["std"] / st["n"] ** 0.5 if st["n"] >= 2 and st["std"] is not None else None}


def confirm_table(confirm: list[dict], base: dict, twins: dict | None = None, arms: dict | None = None) -> dict:
    """{regime: {label: {endpoint: {"mean", "std", "n", "se"}, "per_task": {task: mean}, "seeds"}}}.
    twins ({regime: {label: [regime, label]}}, forgetting.twins): an arm that is the same run as an
    earlier one shows that one's records, marked "same_as". arms (the plan's {regime: {label:
    settings}}): a record whose settings differ from its arm's is refused (a stale record)."""
    runs = {}
    for r in confirm:
        want = (arms or {}).get(r["regime"], {}).get(r["label"])
        if arms is not None and r["label"] != "wise" and want != r["settings"]:
            raise ValueError(f"confirmatory record {r['regime']}/{r['label']} seed {r['seed']}: settings "
                             f"{r['settings']} but the plan's arm is {want}: move the stale record away")
        runs.setdefault(r["regime"], {}).setdefault(r["label"], {})[r["seed"]] = run_endpoints(r, base)
    for regime, pairs in (twins or {}).items():
        for label, (g, first) in pairs.items():
            if first in runs.get(g, {}):
                runs.setdefault(regime, {})[label] = runs[g][first]
    out = {}
    for regime, labels in runs.items():
        for label, per in labels.items():
            keys = [k for k in next(iter(per.values())) if k != "per_task"]
            tasks = next(iter(per.values()))["per_task"]
            same = (twins or {}).get(regime, {}).get(label)
            out.setdefault(regime, {})[label] = {
                "seeds": sorted(per), **({"same_as": "/".join(same)} if same else {}),
                **{k: stat_se([e.get(k) for e in per.values()]) for k in keys},
                "per_task": {t: stat([e["per_task"][t] for e in per.values()])["mean"] for t in tasks}}
    return out


def decide(table: dict, plan_: dict | None, n_seeds: int = 3) -> dict:
    """The goal, per regime and method: new task within MARGIN of plain's, median retention >= 2 x
    plain's (plain's <= 0: >= 0.5), drift KL <= 0.5 x plain's; means over n_seeds seeds."""
    if plan_ is None:
        return {"holds": None, "text": "not yet decided: the dev sweep or the regime runs are not complete"}
    missing = [f"{g}/{label}" for g, arms in plan_["arms"].items() for label in arms
               if table.get(g, {}).get(label, {}).get("median_retention", {}).get("n", 0) < n_seeds]
    if missing:
        done = sum(len(v["seeds"]) for g in table.values() for v in g.values() if "same_as" not in v)
        return {"holds": None, "text": f"not yet decided: {done} confirmatory runs recorded; fewer than "
                                       f"{n_seeds} seeds in {', '.join(missing)}"}
    verdicts, lines = {}, []
    for regime, arms in table.items():
        m = lambda label, k: arms[label][k]["mean"]  # noqa: E731
        for label in arms:
            if label == "plain" or arms[label]["median_retention"]["n"] < n_seeds or "new_task" not in arms[label]:
                continue
            keep_ok = m(label, "new_task") >= m("plain", "new_task") - MARGIN - 1e-9
            need = 2 * m("plain", "median_retention") if m("plain", "median_retention") > 0 else 0.5
            ret_ok = m(label, "median_retention") >= need - 1e-9
            drift_ok = m(label, "drift_kl") <= 0.5 * m("plain", "drift_kl") + 1e-12
            verdicts[f"{regime}/{label}"] = keep_ok and ret_ok and drift_ok
            lines.append(f"{regime}/{label}: new task {100 * m(label, 'new_task'):.1f} vs plain "
                         f"{100 * m('plain', 'new_task'):.1f} (kept: {keep_ok}); median retention "
                         f"{m(label, 'median_retention'):.2f} vs plain {m('plain', 'median_retention'):.2f} "
                         f"(doubled: {ret_ok}); drift {m(label, 'drift_kl'):.4f} vs plain "
                         f"{m('plain', 'drift_kl'):.4f} (halved: {drift_ok})")
    # an arm is guided by its label or, for "best" / "best-non-iv", by the method its point belongs to
    is_guided = lambda label: label.startswith("guided") or plan_["names"].get(label, "").startswith("guided")  # noqa: E731
    guided = [v for k, v in verdicts.items() if is_guided(k.split("/")[1])]
    return {"holds": any(guided) if guided else None, "per_arm": verdicts, "text": "; ".join(lines)}


# ---- the report ------------------------------------------------------------------------------------------

def write(sweep: list[dict], regime: list[dict], confirm: list[dict], base_dev: dict | None,
          base_test: dict | None, twins: dict | None = None, replay: list[dict] = ()) -> str:
    if base_dev is None:
        return "no report yet: the base model's dev evaluation is missing"
    rows = sweep_rows(sweep, base_dev)
    p = plan(sweep, regime, base_dev)
    table = confirm_table(confirm, base_test, twins, p["arms"] if p else None) if base_test and confirm else {}
    d = {"sweep": rows, "replay": replay_rows(list(replay), base_dev), "regime": choose_regime(regime, base_dev),
         "plan": p, "confirm": table,
         "per_task": {g: {lab: v["per_task"] for lab, v in arms.items()} for g, arms in table.items()},
         "decision": decide(table, p)}
    out = ROOT / "results"
    save_report(d, out / "forgetting.json")
    plots = plot_curves(rows, out / "forgetting.png")
    md = markdown(d, plots)
    write_atomic(out / "forgetting.md", lambda tmp: Path(tmp).write_text(md))
    return f"wrote results/forgetting.json ({len(rows)} sweep points, {len(confirm)} confirmatory runs), " \
           "results/forgetting.md"


def pareto(rows: list[dict], y: str, higher: bool = True) -> list[dict]:
    """The points no other point beats in both new task (higher) and y (higher, or lower)."""
    s = 1 if higher else -1
    return [r for r in rows if not any(o is not r and o["new_task"] >= r["new_task"] and s * o[y]["value"] >= s * r[y]["value"]
                                       and (o["new_task"] > r["new_task"] or s * o[y]["value"] > s * r[y]["value"])
                                       for o in rows)]


def plot_curves(rows: list[dict], path: Path) -> list[str]:
    """New task vs each general endpoint, one curve per method over its strength, the Pareto front
    ringed -> the PNG's name (none without matplotlib or points)."""
    try:
        import matplotlib  # optional: a report without plots is still a report
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): no display needed
    except ImportError:
        return []
    if not rows:
        return []
    ys = (("median_retention", "median retention (7 tasks)", True), ("drift_kl", "drift KL per token", False),
          ("if_strict", "IF prompt-level strict", True))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (y, name, higher) in zip(axes, ys):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = [r for r in rows if r["method"] == m]
            ax.plot([r["new_task"] for r in pts], [r[y]["value"] for r in pts], "o-", label=m)
        front = pareto(rows, y, higher)
        ax.scatter([r["new_task"] for r in front], [r[y]["value"] for r in front], s=160, facecolors="none",
                   edgecolors="k", label="Pareto front")
        ax.set_xlabel("new task (uppercase, dev, after stage 1)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def fmt(e: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not e or e.get("value", e.get("mean")) is None:
        return "—"
    v = e.get("value", e.get("mean"))
    sd = e.get("std", e.get("se"))      # over seeds: the std (as the tables say); one run: the bootstrap SE
    sd = None if e.get("n", 2) < 2 else sd      # one seed has no spread to show
    return f"{scale * v:.{digits}f}" + (f" ± {scale * sd:.{digits}f}" if sd is not None else "")


def markdown(d: dict, plots: list[str]) -> str:
    L = ["# Forgetting measured where it can be seen (amendment 3)", "",
         "Generated by `python experiments/forgetting.py --report` from the records in results/forgetting/; "
         "the protocol is experiments/study_protocol.md, amendment 3. Retention = the fraction of the base "
         "model's above-chance score kept; median over 7 tasks (IF prompt-level strict, antonym, capital, "
         "plural, past_tense, comparative, language by choice accuracy). ± = bootstrap SE over items (sweep) "
         "or std over seeds (confirmation).", "",
         "## Dev sweep (stage 1: uppercase, seed 0, fp32)", "",
         "| method | point | new task | drift KL | IF retention | IF strict | answers | median retention | tasks kept |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in d["sweep"]:
        L.append(f"| {r['method']} | {r['label']} | {100 * r['new_task']:.1f} | {fmt(r['drift_kl'], digits=4)} | "
                 f"{fmt(r['if_retention'])} | {fmt(r['if_strict'], 100, 1)} | {fmt(r['answers'], 100, 1)} | "
                 f"{fmt(r['median_retention'])} | {fmt(r['tasks_kept'], digits=1)} |")
    L += [""] + [f"![curves]({p})" for p in plots] + [""]
    if d.get("replay"):
        L += ["## Replay (dev, stages 1-2: uppercase, then date_iso; seed 0, fp32; amendment 3c)", "",
              "| point | new task (date_iso) | uppercase after its stage → after stage 2 | drift KL | IF retention | "
              "answers | median retention |", "|---|---|---|---|---|---|---|"]
        L += [f"| {r['label']} | {100 * r['new_task']:.1f} | {100 * r['earlier_before']:.1f} → "
              f"{100 * r['earlier_after']:.1f} | {fmt(r['drift_kl'], digits=4)} | {fmt(r['if_retention'])} | "
              f"{fmt(r['answers'], 100, 1)} | {fmt(r['median_retention'])} |" for r in d["replay"]]
        L.append("")
    reg = d.get("regime")
    if reg:
        L += ["## The off-floor regime (dev, the whole sequence, plain)", "",
              "| lr | mean new task | IF retention | drift KL | median retention |", "|---|---|---|---|---|"]
        L += [f"| {r['lr']:g} | {100 * r['new_task']:.1f} | {fmt(r['if_retention'])} | {fmt(r['drift_kl'], digits=4)} | "
              f"{fmt(r['median_retention'])} |" for r in reg["rows"]]
        L += ["", f"Chosen: lr {reg['lr']:g} ({'in' if reg['in_band'] else 'none in'} the band {BAND}).", ""]
    if d.get("plan"):
        L += ["## Chosen points (registered rule)", "", "| method | chosen | qualifies | new task | drift KL | median retention |",
              "|---|---|---|---|---|---|"]
        L += [f"| {m} | {c['label']} | {'yes' if c['qualified'] else 'no: the best learner'} | "
              f"{100 * c['new_task']:.1f} | {c['drift_kl']:.4f} | {c['median_retention']:.2f} |"
              for m, c in d["plan"]["chosen"].items()]
        L += ["", "Arms: " + json.dumps(d["plan"]["arms"]) + "; " + json.dumps(d["plan"]["names"]), ""]
    for regime, arms in d["confirm"].items():
        L += [f"## Confirmation, {regime} regime (test split, mean ± std over seeds)", "",
              "| arm | seeds | new task | AP | median retention | tasks kept | drift KL | IF retention | answers |",
              "|---|---|---|---|---|---|---|---|---|"]
        for lab, v in arms.items():
            name = lab + (f" (= {v['same_as']})" if "same_as" in v else "")     # the same run as that arm
            L.append(f"| {name} | {len(v['seeds'])} | {fmt(v.get('new_task'), 100, 1)} | {fmt(v['AP'], 100, 1)} | "
                     f"{fmt(v['median_retention'])} | {fmt(v['tasks_kept'], digits=1)} | {fmt(v['drift_kl'], digits=4)} | "
                     f"{fmt(v['if_retention'])} | {fmt(v['answers'], 100, 1)} |")
        tasks = list(next(iter(arms.values()))["per_task"])
        L += ["", "Per-task retention (mean over seeds):", "", "| arm | " + " | ".join(tasks) + " |",
              "|---|" + "---|" * len(tasks)]
        L += [f"| {lab} | " + " | ".join(f"{v['per_task'][t]:.2f}" for t in tasks) + " |" for lab, v in arms.items()]
        L.append("")
    L += ["## Decision", "", d["decision"]["text"], ""]
    return "\n".join(L)
