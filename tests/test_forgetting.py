"""experiments/forgetting_report.py, forgetting.py and wise.py: amendment 3's registered rules, as
amendment 3a changed them, by hand (endpoints, choice, regime, plan, decision), the confirmation's table
and jobs, WiSE-FT's mixing, the IF part scored again from stored replies, and the keys of
results/forgetting.json, on synthetic general-eval reports (no model)."""
import json

import pytest
import torch
from torch import nn

import forgetting as F
import forgetting_report as FR
import general_eval as GE
import wise as W
from ivft import ifeval
from tradeoff import settings_of

KNOW = ("antonym", "capital", "plural", "past_tense", "comparative", "language")
N = 20
N_IF = 10          # IF prompts of general(): IF retention (chance 0) moves in steps of 0.1


def report(knowledge, if_items, kl=0.0, kl_se=0.0, answers=(1.0, 0.0)):
    # what general_eval.general_eval writes, as far as general_eval.endpoints and forgetting_report read it;
    # answers=None: a report from before amendment 3a (no "answers" in its IF part)
    per = [float(all(s)) for s in if_items]
    out = {"if": {"prompt_strict": {"value": sum(per) / len(per), "se": 0.0},
                  "items": [{"strict": s, "loose": s} for s in if_items]},
           "knowledge": {t: {"chance": c, "items": list(items)} for t, (c, items) in knowledge.items()},
           "drift": {"kl_per_token": {"value": kl, "se": kl_se}}}
    if answers is not None:
        out["if"]["answers"] = {"value": answers[0], "se": answers[1]}
    return out


def general(k, kl=0.05, if_ok=N_IF, answers=(1.0, 0.0)):
    # every knowledge task k of N right against a base of N of N at chance 0.25: retention (k - 5) / 15;
    # if_ok of N_IF IF prompts followed against a base of all: IF retention if_ok / N_IF. The median over
    # the seven tasks is (k - 5) / 15 whatever IF keeps (six of the seven share it)
    return report({t: (0.25, [1] * k + [0] * (N - k)) for t in KNOW},
                  [[True]] * if_ok + [[True, False]] * (N_IF - if_ok), kl, answers=answers)


BASE = general(N, 0.0)


def ret(k):
    return (k - 5) / 15


# ---- endpoints --------------------------------------------------------------------------------------------

def test_endpoints_are_chance_corrected_retentions_and_their_median_by_hand():
    # base: five tasks at chance 0.25 score 6/8, "language" at chance 0.5 scores 8/8; IF 3 of 4 prompts
    def know(ks):
        return {t: (0.5 if t == "language" else 0.25, [1] * k + [0] * (8 - k)) for t, k in zip(KNOW, ks)}
    base = report(know([6, 6, 6, 6, 6, 8]), [[True, True], [True], [True, False], [True]])
    tuned = report(know([6, 4, 3, 2, 1, 7]), [[True, False], [True], [False], [True, True]], kl=0.031, kl_se=0.002,
                   answers=(0.75, 0.2))
    e = FR.endpoints(base, tuned)
    # (k/8 - 0.25) / (0.75 - 0.25) = (k - 2) / 4; language (7/8 - 0.5) / 0.5 = 0.75 (uncorrected: 0.875);
    # IF (chance 0) 0.5 / 0.75
    want = {"antonym": 1.0, "capital": 0.5, "plural": 0.25, "past_tense": 0.0, "comparative": -0.25,
            "language": 0.75, "ifeval": 2 / 3}
    assert e["per_task"].keys() == want.keys()
    for t, v in want.items():
        assert e["per_task"][t] == pytest.approx(v), t
    # sorted: -0.25, 0, 0.25, [0.5], 2/3, 0.75, 1; kept (>= 0.5): 0.5, 2/3, 0.75, 1
    assert e["median_retention"]["value"] == pytest.approx(0.5)
    assert e["tasks_kept"]["value"] == 4
    assert e["mean_retention"]["value"] == pytest.approx(5 / 12)
    assert e["drift_kl"] == {"value": 0.031, "se": 0.002}
    assert e["if_strict"]["value"] == pytest.approx(0.5)
    assert e["median_retention"]["se"] > 0        # the tuned items vary: the bootstrap sees it
    # IF retention: the per-prompt strict verdicts (all of a prompt's constraints), chance 0: 0.5 / 0.75
    assert e["if_retention"]["value"] == pytest.approx(2 / 3) and e["if_retention"]["se"] > 0
    assert e["answers"] == {"value": 0.75, "se": 0.2}            # the tuned report's own, passed on
    tuned["if"].pop("answers")
    assert FR.endpoints(base, tuned)["answers"] is None            # a report from before amendment 3a


# ---- the choice rule -----------------------------------------------------------------------------------------

def row(med, kl, new, label="", method="m"):
    return {"method": method, "label": label, "median_retention": {"value": med}, "drift_kl": {"value": kl},
            "new_task": new}


def test_better_prefers_lower_drift_then_retention_then_new_task():
    # a lower drift wins outright, however much more the other keeps and learns
    a, b = row(0.10, 0.01, 0.1), row(0.90, 0.02, 0.9)
    assert FR.better(a, b) and not FR.better(b, a)
    a, b = row(0.10, 0.0300, 0.1), row(0.90, 0.0301, 0.9)               # no tie margin on drift
    assert FR.better(a, b) and not FR.better(b, a)
    # drift exactly equal: the higher median retention, however small the gap (no tie margin)
    c, d = row(0.505, 0.02, 0.5), row(0.50, 0.02, 0.9)
    assert FR.better(c, d) and not FR.better(d, c)
    # drift and retention exactly equal: the higher new task
    e, f = row(0.50, 0.02, 0.6), row(0.50, 0.02, 0.5)
    assert FR.better(e, f) and not FR.better(f, e)
    assert not FR.better(e, dict(e)), "a point does not beat its equal"
    # lowest drift 0.01 is shared by x and v: v keeps more; w (drift 0.0) would beat both
    pts = [row(0.3, 0.01, 0.9, "x"), row(0.9, 0.05, 1.0, "y"), row(0.35, 0.01, 0.2, "v"), row(0.8, 0.02, 0.9, "z")]
    assert FR.best_of(pts)["label"] == "v" and FR.best_of(pts[::-1])["label"] == "v"
    assert FR.best_of(pts + [row(0.0, 0.0, 0.0, "w")])["label"] == "w"


def test_choose_qualifies_at_point_nine_of_the_reference_and_marks_a_fallback():
    ref = {"new_task": 0.8}                                     # the bar: 0.72
    rows = [row(0.9, 0.0, 0.7199, "below"), row(0.5, 0.01, 0.72, "at"), row(0.95, 0.02, 0.8, "keeps"),
            row(0.3, 0.03, 0.9, "high"), row(1.0, 0.0, 0.9, "other", method="o")]
    c = FR.choose(rows, "m", ref)
    assert c["label"] == "at" and c["qualified"] is True, "just below the bar drifts least but does not qualify"
    c = FR.choose([r for r in rows if r["label"] != "at"], "m", ref)
    assert c["label"] == "keeps" and c["qualified"] is True      # drift 0.02 < 0.03: not the best learner
    c = FR.choose([r for r in rows if r["label"] not in ("at", "keeps")], "m", ref)
    assert c["label"] == "high" and c["qualified"] is True
    low = [row(0.9, 0.0, 0.5, "a"), row(0.1, 0.5, 0.6, "b"), row(0.8, 0.01, 0.55, "c")]
    c = FR.choose(low, "m", ref)
    assert c["label"] == "b" and c["qualified"] is False        # none qualifies: the best learner, drift aside
    assert FR.choose(rows, "nobody", ref) is None


def test_best_chosen_takes_the_best_qualified_point_else_the_best_learner():
    def pt(med, kl, new, label, qualified):
        return {**row(med, kl, new, label), "qualified": qualified}
    # amendment 3b: "fallback" drifts least (0.01) and keeps most but did not qualify; of the qualified,
    # "lwf" drifts less (0.03) than "other" (0.04), though "other" keeps and learns more
    pts = [pt(0.9, 0.01, 0.6, "fallback", False), pt(0.4, 0.03, 0.75, "lwf", True), pt(0.6, 0.04, 0.8, "other", True)]
    assert FR.best_of(pts)["label"] == "fallback", "better() alone would take the point that did not qualify"
    assert FR.best_chosen(pts)["label"] == "lwf" and FR.best_chosen(pts[::-1])["label"] == "lwf"
    # the only qualified point wins whatever it drifts
    assert FR.best_chosen([pts[0], pt(0.1, 0.5, 0.72, "only", True)])["label"] == "only"
    # none qualified: the one that learned most (0.65), not the one that drifts least
    low = [pt(0.9, 0.0, 0.5, "a", False), pt(0.1, 0.5, 0.65, "b", False), pt(0.8, 0.01, 0.6, "c", False)]
    assert FR.best_chosen(low)["label"] == "b" and FR.best_chosen(low[::-1])["label"] == "b"


# ---- the off-floor regime ----------------------------------------------------------------------------------------

DIAG = [[0.0] * 4, [0.8, 0, 0, 0], [0.1, 0.6, 0, 0], [0.1, 0.1, 0.4, 0], [0.1, 0.1, 0.1, 0.2]]


def regime_rec(lr, if_ok, k=N, kl=0.1):
    # IF retention if_ok / N_IF (what choose_regime reads); median retention (k - 5) / 15 (not read)
    return {"method": "plain", "lr": lr, "split": "dev", "cl": {"R": DIAG}, "general": general(k, kl, if_ok)}


def test_choose_regime_takes_the_highest_lr_whose_if_retention_is_in_the_band_else_the_closest_to_its_middle():
    # IF retentions 1e-4: 0.1 (below), 3e-5: 0.3, 1e-5: 0.5 (both in [0.2, 0.6]); by the median
    # retentions (0.0, 0.0, 0.4) only 1e-5 would be in the band
    r = FR.choose_regime([regime_rec(1e-4, 1, k=5), regime_rec(3e-5, 3, k=5), regime_rec(1e-5, 5, k=11)], BASE)
    assert r["lr"] == 3e-5 and r["in_band"] is True
    assert [x["lr"] for x in r["rows"]] == [1e-4, 3e-5, 1e-5]
    assert r["rows"][0]["new_task"] == pytest.approx(0.5)              # (0.8 + 0.6 + 0.4 + 0.2) / 4
    assert [x["if_retention"]["value"] for x in r["rows"]] == pytest.approx([0.1, 0.3, 0.5])
    assert r["rows"][1]["median_retention"]["value"] == pytest.approx(0.0)   # (5 - 5) / 15: out of the band
    # the band's edge 0.6 is inside; the median retention (1e-4 keeps all its knowledge: 1.0) is not read
    r = FR.choose_regime([regime_rec(1e-4, 6), regime_rec(3e-5, 7, k=11), regime_rec(1e-5, 8, k=11)], BASE)
    assert r["lr"] == 1e-4 and r["in_band"] is True
    # IF 0.7 (median 0.4, inside the band: not read) is outside
    r = FR.choose_regime([regime_rec(1e-4, 7, k=11), regime_rec(3e-5, 8, k=11), regime_rec(1e-5, 5)], BASE)
    assert r["lr"] == 1e-5
    # none in the band: IF 0.0, 0.1, 0.8 -> distances to 0.4: 0.4, 0.3, 0.4; the medians (0.4, 1.0, 0.4)
    # would have chosen 1e-4
    r = FR.choose_regime([regime_rec(1e-4, 0, k=11), regime_rec(3e-5, 1), regime_rec(1e-5, 8, k=11)], BASE)
    assert r["lr"] == 3e-5 and r["in_band"] is False
    assert FR.choose_regime([regime_rec(1e-4, 3), regime_rec(3e-5, 3)], BASE) is None


# ---- the plan ---------------------------------------------------------------------------------------------------

# (method, label) -> (new task, k of N[, drift KL[, IF prompts followed of N_IF, answers (value, se)]]);
# every other point learns 0.8, keeps 0.2 (k 8) and drifts 0.05. The bar: 0.9 x plain lr=1e-4's 0.8 = 0.72
POINTS = {
    ("plain", "lr=1e-05"): (0.3, 20), ("plain", "lr=3e-05"): (0.7, 20),    # keeps all, misses the bar 0.72
    ("plain", "lr=0.0001,ep=0.5"): (0.75, 14), ("plain", "lr=0.0001"): (0.8, 8),   # equal drift: retention
    # none qualifies; the chosen (the best learner) drifts least of the chosen points but does not qualify
    ("lora", "r=8,lr=0.0003"): (0.5, 20), ("lora", "r=8,lr=0.001"): (0.6, 8, 0.02),
    ("lwf", "λ=1"): (0.8, 14, 0.05), ("lwf", "λ=10"): (0.78, 11, 0.04),  # keeps 0.4 < 0.6, drifts less: wins
    ("guided", "λ=1,as extracted"): (0.8, 8), ("guided", "λ=1,r=0.5"): (0.79, 17),   # keeps 0.8, drift 0.05
    ("guided", "λ=10,r=0.5"): (0.5, 20, 0.05, 0, (0.3, 0.05)),                       # misses the bar
    ("guided", "λ=10,r=0.25"): (0.75, 11, 0.03),                                      # keeps 0.4, drifts least
    ("free_kl", "λ_free=30"): (0.74, 14),
    ("other_kl", "λ_other=10"): (0.76, 15),
    ("other_kl", "λ_other=30"): (0.6, 20, 0.0),               # drifts least of all but misses the bar
    ("wise", "α=0.25"): (0.3, 20, 0.0), ("wise", "α=0.5"): (0.73, 14), ("wise", "α=0.75"): (0.78, 11),
}


def sweep_rec(method, label, strength, settings, new, k, kl=0.05, if_ok=N_IF, answers=(1.0, 0.0)):
    rec = {"method": method, "label": label, "strength": strength, "settings": settings,
           "general": general(k, kl, if_ok, answers), "split": "dev", "task": "uppercase"}
    if method == "wise":
        rec["tasks"] = {"uppercase": new}
    else:
        rec["cl"] = {"R": [[0.0], [new]], "train_tasks": ["uppercase"]}
    return rec


def full_sweep():
    recs = [sweep_rec(m, lab, s, settings_of(flags), *POINTS.get((m, lab), (0.8, 8)))
            for m, pts in FR.GRID.items() for lab, s, flags in pts]
    return recs + [sweep_rec("wise", lab, a, {"alpha": a}, *POINTS[("wise", lab)]) for lab, a in FR.WISE]


def off_floor_regime():
    # IF retention 0.1, 0.4, 0.8: only 3e-5 in the band (by the median retentions 0.0, 1.0, 0.4: only 1e-5)
    return [regime_rec(1e-4, 1, k=5), regime_rec(3e-5, 4), regime_rec(1e-5, 8, k=11)]


def test_plan_waits_for_every_grid_and_wise_point_and_the_regime_runs():
    s, reg = full_sweep(), off_floor_regime()
    assert FR.plan(s, reg, BASE) is not None
    assert FR.plan([r for r in s if r["label"] != "λ_other=30"], reg, BASE) is None
    assert FR.plan([r for r in s if r["label"] != "α=0.75"], reg, BASE) is None
    assert FR.plan(s, reg[:2], BASE) is None


def test_plan_arms_follow_amendment_3a():
    p = FR.plan(full_sweep(), off_floor_regime(), BASE)
    assert p["regime"]["lr"] == 3e-5 and p["wise_alpha"] == 0.5     # wise: equal drift, α=0.5 keeps 0.6 > 0.4
    ch = p["chosen"]
    assert ch["plain"]["label"] == "lr=0.0001,ep=0.5" and ch["plain"]["qualified"]
    assert ch["lora"]["label"] == "r=8,lr=0.001" and ch["lora"]["qualified"] is False
    assert ch["lwf"]["label"] == "λ=10" and ch["guided"]["label"] == "λ=10,r=0.25"
    assert ch["free_kl"]["label"] == "λ_free=30" and ch["other_kl"]["label"] == "λ_other=10"
    assert ch["guided"]["median_retention"] == pytest.approx(ret(11)) and ch["guided"]["new_task"] == 0.75
    assert ch["guided"]["drift_kl"] == 0.03 and ch["lwf"]["drift_kl"] == 0.04 and ch["lora"]["drift_kl"] == 0.02
    guided = {"preset": "guided", "kl_weight": 10.0, "iv_norm_ratio": 0.25}
    assert list(p["arms"]) == ["off-floor", "harsh"]
    assert p["arms"]["off-floor"] == {
        "plain": {"lr": 3e-5},
        "plain-less": {"lr": 1e-4, "epochs": 0.5},          # the point sets its own lr: kept
        # amendment 3b: among the qualified chosen points lwf λ=10 drifts least (0.04; the others 0.05, other_kl
        # keeps the most: 0.667); lora's chosen point drifts 0.02 but did not qualify (by drift alone: lora)
        "best-non-iv": {"lr": 3e-5, "preset": "lwf", "kl_weight": 10.0},
        "guided-paper": {"lr": 3e-5, "preset": "guided"},
        "guided-chosen": {"lr": 3e-5, **guided},
        "free_kl": {"lr": 3e-5, "free_kl_weight": 30.0},
        # the prompt KLs drift alike (0.05): other_kl's 0.667 beats free_kl's 0.6
        "guided+prompt-kl": {"lr": 3e-5, **guided, "other_kl_weight": 10.0}}
    # the best method: guided λ=10,r=0.25 drifts least (0.03) of the qualified chosen points but plain's and
    # wise's (lora's 0.02 did not qualify)
    assert p["arms"]["harsh"] == {"plain": {}, "guided-paper": {"preset": "guided"}, "best": guided}
    assert p["names"] == {"best-non-iv": "lwf λ=10", "guided+prompt-kl": "guided λ=10,r=0.25 + other_kl "
                          "λ_other=10", "best": "guided λ=10,r=0.25"}


def test_plan_with_the_harsh_lr_off_the_floor_is_one_regime_holding_every_arm():
    # IF retention 0.4, 0.5, 0.9: 1e-4 (and 3e-5) in the band; by the median retentions (1.0, 0.4, 0.4)
    # it would be 3e-5
    reg = [regime_rec(1e-4, 4), regime_rec(3e-5, 5, k=11), regime_rec(1e-5, 9, k=11)]
    p = FR.plan(full_sweep(), reg, BASE)
    assert p["regime"]["lr"] == FR.HARSH_LR and list(p["arms"]) == ["harsh"]
    arms = p["arms"]["harsh"]
    assert list(arms) == ["plain", "plain-less", "best-non-iv", "guided-paper", "guided-chosen", "free_kl",
                          "guided+prompt-kl", "best"]
    assert arms["plain"] == {} and arms["guided-paper"] == {"preset": "guided"}
    assert arms["guided-chosen"]["lr"] == 1e-4 and arms["plain-less"] == {"lr": 1e-4, "epochs": 0.5}


# ---- the confirmation -----------------------------------------------------------------------------------------

def stat(mean, n=3):
    return {"mean": mean, "std": 0.0, "n": n}


def arm(new, med, kl, n=3):
    out = {"seeds": list(range(n)), "median_retention": stat(med, n), "drift_kl": stat(kl, n)}
    return out | ({"new_task": stat(new, n)} if new is not None else {})


NAMES = {"best-non-iv": "lwf λ=10", "guided+prompt-kl": "guided λ=10,r=0.25 + other_kl λ_other=10",
         "best": "guided λ=10,r=0.25"}


def plan_of(table, names=NAMES):
    # the plan whose arms are the table's (wise is no arm of the plan: plain's records carry it)
    return {"arms": {g: {lab: {} for lab in arms if lab != "wise"} for g, arms in table.items()}, "names": names}


def test_decide_needs_all_three_conditions_over_three_seeds():
    table = {"off-floor": {"plain": arm(0.90, 0.2, 0.1),
                           "guided-chosen": arm(0.885, 0.4, 0.05),      # each condition met at its edge
                           "free_kl": arm(0.90, 0.5, 0.06),             # drift not halved
                           "guided-paper": arm(0.87, 0.6, 0.01),        # learns 3 points less
                           "best-non-iv": arm(0.90, 0.39, 0.01),        # retention not doubled
                           "wise": arm(None, 0.9, 0.0)}}                # post hoc: no new task, not judged
    d = FR.decide(table, plan_of(table))
    assert d["per_arm"] == {"off-floor/guided-chosen": True, "off-floor/free_kl": False,
                            "off-floor/guided-paper": False, "off-floor/best-non-iv": False}
    assert d["holds"] is True and "halved: False" in d["text"]
    # only a non-guided arm meets it: the goal does not hold
    t2 = {"off-floor": {"plain": arm(0.9, 0.2, 0.1), "free_kl": arm(0.9, 0.5, 0.04), "guided-paper": arm(0.8, 0.5, 0.04)}}
    assert FR.decide(t2, plan_of(t2))["holds"] is False
    # plain keeps nothing: the bar is 0.5 retention
    t3 = {"off-floor": {"plain": arm(0.9, -0.1, 0.1), "guided-chosen": arm(0.9, 0.45, 0.01),
                        "guided-paper": arm(0.9, 0.5, 0.01)}}
    assert FR.decide(t3, plan_of(t3))["per_arm"] == {"off-floor/guided-chosen": False, "off-floor/guided-paper": True}


def test_decide_counts_best_as_guided_when_its_point_is_guided():
    # harsh: only "best" meets the goal; guided-paper learns 10 points less, best-non-iv keeps too little
    table = {"harsh": {"plain": arm(0.9, 0.2, 0.1), "guided-paper": arm(0.8, 0.5, 0.01),
                       "best-non-iv": arm(0.9, 0.3, 0.01), "best": arm(0.9, 0.5, 0.04)}}
    d = FR.decide(table, plan_of(table))                       # best: "guided λ=10,r=0.25"
    assert d["per_arm"] == {"harsh/guided-paper": False, "harsh/best-non-iv": False, "harsh/best": True}
    assert d["holds"] is True
    # the same verdicts with "best" a prompt KL's point: no guided arm meets the goal
    d = FR.decide(table, plan_of(table, {**NAMES, "best": "free_kl λ_free=30"}))
    assert d["per_arm"]["harsh/best"] is True and d["holds"] is False
    # best-non-iv meeting it instead (a non-IV method's point) does not make the goal hold either
    t2 = {"harsh": {**table["harsh"], "best-non-iv": arm(0.9, 0.5, 0.04), "best": arm(0.9, 0.3, 0.01)}}
    d = FR.decide(t2, plan_of(t2))
    assert d["per_arm"]["harsh/best-non-iv"] is True and d["holds"] is False


def test_decide_holds_none_until_every_arm_of_the_plan_has_three_seeds():
    table = {"off-floor": {"plain": arm(0.9, 0.2, 0.1), "guided-chosen": arm(0.9, 0.5, 0.01)},
             "harsh": {"plain": arm(0.9, 0.2, 0.1, n=2), "guided-paper": arm(0.9, 0.5, 0.01, n=2)}}
    d = FR.decide(table, plan_of(table))
    assert d["holds"] is None and "not yet decided" in d["text"]
    assert "10 confirmatory runs" in d["text"] and "seeds in harsh/plain, harsh/guided-paper" in d["text"]
    # plain has three seeds everywhere; an arm that is not plain has two: still not decided
    table["harsh"] = {"plain": arm(0.9, 0.2, 0.1), "guided-paper": arm(0.9, 0.5, 0.01, n=2)}
    d = FR.decide(table, plan_of(table))
    assert d["holds"] is None and d["text"].endswith("fewer than 3 seeds in harsh/guided-paper")
    # an arm of the plan with no records at all
    table["harsh"]["guided-paper"] = arm(0.9, 0.5, 0.01)
    arms = plan_of(table)
    arms["arms"]["off-floor"]["free_kl"] = {}
    d = FR.decide(table, arms)
    assert d["holds"] is None and d["text"].endswith("seeds in off-floor/free_kl")
    # a twin shows its first arm's runs: it has their seeds but adds no runs to the count
    table["harsh"]["best"] = arm(0.9, 0.5, 0.01) | {"same_as": "off-floor/guided-chosen"}
    arms = plan_of(table)
    arms["arms"]["harsh"]["free_kl"] = {}
    d = FR.decide(table, arms)
    assert d["text"] == "not yet decided: 12 confirmatory runs recorded; fewer than 3 seeds in harsh/free_kl"
    d = FR.decide(table, plan_of(table))
    assert d["holds"] is True and set(d["per_arm"]) == {"off-floor/guided-chosen", "harsh/guided-paper", "harsh/best"}


def confirm_rec(label, seed, k, kl, new=(0.8, 0.6, 0.4, 0.2), final=(0.1, 0.1, 0.1, 0.2), regime="off-floor",
                if_ok=N_IF, answers=(1.0, 0.0), settings=None):
    # settings: the arm's (default: plain's in the off-floor regime of full_sweep()'s plan, lr 3e-5)
    R = [[0.0] * 4, [new[0], 0, 0, 0], [0, new[1], 0, 0], [0, 0, new[2], 0], list(final)]
    R[4][3] = new[3]
    return {"label": label, "regime": regime, "seed": seed, "settings": {"lr": 3e-5} if settings is None else settings,
            "cl": {"R": R, "train_tasks": list(F.SEQUENCE)}, "general": general(k, kl, if_ok, answers)}


def wise_rec(seed, k, kl, regime="off-floor", answers=(1.0, 0.0)):
    # AP: (0.5 + 0.3 + 0.2 + 0.4 seed) / 4 = 0.25 + 0.1 seed
    return {"label": "wise", "regime": regime, "seed": seed, "settings": {"alpha": 0.5},
            "general": general(k, kl, answers=answers),
            "tasks": {"uppercase": 0.5, "date_iso": 0.3, "reverse_words": 0.2, "acronym": 0.0 + 0.4 * seed}}


def confirm_records():
    # plain: IF retention 1.0, 0.8, 0.6 and answers 0.9, 0.8, 0.7 over its seeds; wise: answers 0.6, 0.8
    return [confirm_rec("plain", 0, 8, 0.1, answers=(0.9, 0.01)),
            confirm_rec("plain", 1, 11, 0.2, new=(1.0, 0.6, 0.4, 0.2), if_ok=8, answers=(0.8, 0.01)),
            confirm_rec("plain", 2, 14, 0.3, final=(0.3, 0.1, 0.1, 0.2), if_ok=6, answers=(0.7, 0.01)),
            wise_rec(0, 17, 0.01, answers=(0.6, 0.02)), wise_rec(1, 20, 0.03, answers=(0.8, 0.02))]


def test_run_endpoints_and_confirm_table_average_over_seeds():
    e = FR.run_endpoints(confirm_rec("plain", 0, 8, 0.1), BASE)
    # new task: the diagonal (0.8 + 0.6 + 0.4 + 0.2) / 4; AP: the last row (0.1 + 0.1 + 0.1 + 0.2) / 4
    assert e["new_task"] == pytest.approx(0.5) and e["AP"] == pytest.approx(0.125)
    assert e["median_retention"] == pytest.approx(0.2) and e["drift_kl"] == 0.1 and e["tasks_kept"] == 1
    assert e["if_retention"] == pytest.approx(1.0) and e["answers"] == 1.0
    assert set(FR.ENDPOINTS) == {"median_retention", "tasks_kept", "mean_retention", "drift_kl", "if_strict",
                                 "if_retention", "answers"} and set(FR.ENDPOINTS) <= set(e)
    e = FR.run_endpoints(confirm_rec("plain", 0, 8, 0.1, if_ok=3, answers=(0.4, 0.1)), BASE)
    assert e["if_retention"] == pytest.approx(0.3) and e["if_strict"] == pytest.approx(0.3) and e["answers"] == 0.4
    w = FR.run_endpoints(wise_rec(0, 17, 0.01), BASE)
    assert "new_task" not in w and w["AP"] == pytest.approx(0.25)
    t = FR.confirm_table(confirm_records(), BASE)
    plain, wise = t["off-floor"]["plain"], t["off-floor"]["wise"]
    assert plain["seeds"] == [0, 1, 2]
    assert plain["median_retention"]["mean"] == pytest.approx(0.4) and plain["median_retention"]["std"] == pytest.approx(0.2)
    assert plain["drift_kl"]["mean"] == pytest.approx(0.2) and plain["drift_kl"]["std"] == pytest.approx(0.1)
    assert plain["drift_kl"]["se"] == pytest.approx(0.1 / 3 ** 0.5)       # the SE over seeds
    assert plain["new_task"]["mean"] == pytest.approx((0.5 + 0.55 + 0.5) / 3) and plain["new_task"]["n"] == 3
    assert plain["AP"]["mean"] == pytest.approx((0.125 + 0.125 + 0.175) / 3)
    assert plain["per_task"]["capital"] == pytest.approx(0.4) and plain["per_task"]["ifeval"] == pytest.approx(0.8)
    assert plain["if_retention"]["mean"] == pytest.approx(0.8) and plain["if_retention"]["std"] == pytest.approx(0.2)
    assert plain["answers"]["mean"] == pytest.approx(0.8) and plain["answers"]["std"] == pytest.approx(0.1)
    assert plain["answers"]["n"] == 3 and plain["answers"]["se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert wise["seeds"] == [0, 1] and "new_task" not in wise
    assert wise["AP"]["mean"] == pytest.approx((0.25 + 0.35) / 2)
    assert wise["median_retention"]["mean"] == pytest.approx((0.8 + 1.0) / 2)
    assert wise["answers"]["mean"] == pytest.approx(0.7) and wise["if_retention"]["mean"] == pytest.approx(1.0)
    # stat over seeds skips None (a report without "answers"): none left -> no mean, no SE, shown as a dash
    none = FR.stat_se([None, None])
    assert none == {"mean": None, "std": None, "n": 0, "se": None} and FR.fmt(none) == "—"
    # one seed has no spread: no "±" (common.stat gives its std as 0); two seeds and a sweep's SE show one
    one = FR.stat_se([0.5])
    assert one["n"] == 1 and FR.fmt(one) == "0.50" and FR.fmt({"mean": 0.5, "std": 0.1, "n": 1}) == "0.50"
    assert FR.fmt(FR.stat_se([0.4, 0.6]), 100, 1) == "50.0 ± 14.1"
    assert FR.fmt({"value": 0.5, "se": 0.25}) == "0.50 ± 0.25"
    # an arm that is the same run as an earlier one, of its regime or another, shows its records, marked
    t = FR.confirm_table(confirm_records(), BASE, {"off-floor": {"plain-less": ["off-floor", "plain"]},
                                                   "harsh": {"best": ["off-floor", "plain"]}})
    assert t["off-floor"]["plain-less"]["same_as"] == "off-floor/plain" and "same_as" not in t["off-floor"]["plain"]
    assert t["off-floor"]["plain-less"]["drift_kl"] == t["off-floor"]["plain"]["drift_kl"]
    assert list(t["harsh"]) == ["best"] and t["harsh"]["best"]["same_as"] == "off-floor/plain"
    assert t["harsh"]["best"]["seeds"] == [0, 1, 2] and t["harsh"]["best"]["drift_kl"]["mean"] == pytest.approx(0.2)
    # a twin of an arm with no records yet is left out
    assert "harsh" not in FR.confirm_table(confirm_records(), BASE, {"harsh": {"best": ["off-floor", "plain-less"]}})
    # with the plan's arms: a record trained with other settings than its arm's is refused, naming the arm;
    # WiSE-FT's records (settings {"alpha"}, no arm of their own) are not checked
    arms = {"off-floor": {"plain": {"lr": 3e-5}}}
    assert FR.confirm_table(confirm_records(), BASE, arms=arms) == FR.confirm_table(confirm_records(), BASE)
    stale = confirm_records() + [confirm_rec("guided-chosen", 0, 8, 0.1, settings={"lr": 3e-5, "kl_weight": 1.0})]
    arms["off-floor"]["guided-chosen"] = {"lr": 3e-5, "kl_weight": 10.0}
    with pytest.raises(ValueError, match="off-floor/guided-chosen seed 0.*stale record"):
        FR.confirm_table(stale, BASE, arms=arms)
    with pytest.raises(ValueError, match="off-floor/plain seed 0"):
        FR.confirm_table(confirm_records(), BASE, arms={"off-floor": {"plain": {"lr": 1e-5}}})
    # a record of an arm the plan no longer has is stale too
    with pytest.raises(ValueError, match="harsh/plain seed 0"):
        FR.confirm_table(confirm_records() + [confirm_rec("plain", 0, 8, 0.1, regime="harsh", settings={})], BASE,
                         arms={"off-floor": {"plain": {"lr": 3e-5}}})


def test_confirm_jobs_go_seed_by_seed_run_repeated_settings_once_and_mix_only_plain():
    plan = {"arms": {"off-floor": {"plain": {"lr": 3e-5, "epochs": 1.0}, "plain-less": {"epochs": 1.0, "lr": 3e-5},
                                   "guided-paper": {"preset": "guided"}},
                     "harsh": {"plain": {}, "guided-paper": {"preset": "guided"}}},
            "wise_alpha": 0.5}
    jobs = F.confirm_jobs(plan)
    # plain-less is off-floor's plain again; harsh's guided-paper is off-floor's (both at the default lr)
    one_seed = [("off-floor", "plain", {"lr": 3e-5, "epochs": 1.0}, 0.5), ("off-floor", "guided-paper", {"preset": "guided"}, None),
                ("harsh", "plain", {}, 0.5)]
    assert jobs == [(g, lab, s, seed, w) for seed in F.SEEDS for g, lab, s, w in one_seed]


# ---- WiSE-FT -------------------------------------------------------------------------------------------------

def linear_pair():
    torch.manual_seed(0)
    orig, tuned = nn.Linear(3, 2), nn.Linear(3, 2)
    return orig, tuned, {k: v.clone() for k, v in orig.state_dict().items()}, \
        {k: v.clone() for k, v in tuned.state_dict().items()}


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_mix_into_is_the_weighted_average_of_the_weights(a):
    orig, tuned, o, t = linear_pair()
    W.mix_into(tuned, orig, a)
    for name in ("weight", "bias"):
        want = torch.tensor([[(1 - a) * x + a * y for x, y in zip(xr, yr)]
                             for xr, yr in zip(o[name].view(len(o[name]), -1).tolist(),
                                               t[name].view(len(t[name]), -1).tolist())]).view_as(o[name])
        assert torch.allclose(tuned.state_dict()[name], want, atol=1e-7), name
        assert torch.equal(orig.state_dict()[name], o[name]), "the original is left as it was"
    if a == 0:
        assert all(torch.equal(tuned.state_dict()[k], o[k]) for k in o)
    if a == 1:
        assert all(torch.equal(tuned.state_dict()[k], t[k]) for k in t)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
        self.head.weight = self.emb.weight            # tied, as SmolLM2's embeddings and lm_head are
        self.register_buffer("step", torch.tensor(0))


def test_mix_into_mixes_a_tied_weight_once():
    torch.manual_seed(1)
    orig, tuned = Tied(), Tied()
    tuned.step.fill_(7)
    o, t = orig.emb.weight.detach().clone(), tuned.emb.weight.detach().clone()
    W.mix_into(tuned, orig, 0.5)
    # state_dict() names the tied tensor twice; mixed twice it would be 0.25 t + 0.75 o
    assert torch.allclose(tuned.emb.weight, 0.5 * o + 0.5 * t, atol=1e-7)
    assert tuned.step.item() == 7, "integer buffers are not mixed"


# ---- the report -------------------------------------------------------------------------------------------------

def test_pareto_keeps_the_points_no_other_beats_on_both_axes():
    rows = [{"new_task": 0.9, "y": {"value": 0.1}}, {"new_task": 0.5, "y": {"value": 0.5}},
            {"new_task": 0.4, "y": {"value": 0.4}}, {"new_task": 0.9, "y": {"value": 0.05}}]
    assert [r["new_task"] for r in FR.pareto(rows, "y")] == [0.9, 0.5]
    assert FR.pareto(rows, "y", higher=False) == [rows[3]], "lower y (drift) is better there"


def test_write_leaves_forgetting_json_and_md_with_the_amendment_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(FR, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(FR, "plot_curves", lambda rows, path: [])   # matplotlib's import: seconds, not the point
    assert "missing" in FR.write(full_sweep(), off_floor_regime(), confirm_records(), None, BASE)
    # the records must be the plan's arms: plain's from before the plan (lr 1e-4, the default) is refused
    with pytest.raises(ValueError, match="off-floor/plain seed 1"):
        FR.write(full_sweep(), off_floor_regime(), confirm_records() + [confirm_rec("plain", 1, 8, 0.1, settings={})],
                 BASE, BASE)
    # guided-paper has one seed; harsh's best shown as off-floor's plain (as if it were the same run)
    one = confirm_rec("guided-paper", 0, 11, 0.05, settings={"lr": 3e-5, "preset": "guided"})
    msg = FR.write(full_sweep(), off_floor_regime(), confirm_records() + [one], BASE, BASE,
                   {"harsh": {"best": ["off-floor", "plain"]}})
    assert "21 sweep points, 6 confirmatory runs" in msg
    d = json.loads((tmp_path / "results" / "forgetting.json").read_text())
    assert {"sweep", "replay", "regime", "plan", "confirm", "per_task", "decision"} <= set(d)
    assert len(d["sweep"]) == 21 and d["regime"]["lr"] == 3e-5 and d["plan"]["wise_alpha"] == 0.5
    assert d["per_task"]["off-floor"]["plain"]["capital"] == pytest.approx(0.4)
    # every arm but off-floor's plain (3 seeds) and harsh's best (its twin's 3) has fewer than 3 seeds; the
    # twin's runs are not counted again (3 plain + 2 wise + 1 guided-paper)
    assert d["decision"]["holds"] is None and d["decision"]["text"] == (
        "not yet decided: 6 confirmatory runs recorded; fewer than 3 seeds in off-floor/plain-less, "
        "off-floor/best-non-iv, off-floor/guided-paper, off-floor/guided-chosen, off-floor/free_kl, "
        "off-floor/guided+prompt-kl, harsh/plain, harsh/guided-paper")
    assert d["confirm"]["harsh"]["best"]["same_as"] == "off-floor/plain"
    md = (tmp_path / "results" / "forgetting.md").read_text()
    lines = md.splitlines()
    assert "| method | point | new task | drift KL | IF retention | IF strict | answers | median retention | " \
           "tasks kept |" in lines
    # guided λ=10,r=0.5: new task 0.5, drift 0.05, no IF prompt followed (retention 0, strict 0%, SE 0),
    # answers 30% ± 5%, every knowledge item kept (median 1.00, SE 0), six of seven tasks kept
    assert "| guided | λ=10,r=0.5 | 50.0 | 0.0500 ± 0.0000 | 0.00 ± 0.00 | 0.0 ± 0.0 | 30.0 ± 5.0 | 1.00 ± 0.00 | " \
           "6.0 ± 0.0 |" in lines
    assert "| lr | mean new task | IF retention | drift KL | median retention |" in lines
    # 3e-5: new task (0.8 + 0.6 + 0.4 + 0.2) / 4, IF 4 of 10 (its SE from the bootstrap), drift 0.1, k 20
    reg = next(x for x in lines if x.startswith("| 3e-05 |"))
    assert reg.startswith("| 3e-05 | 50.0 | 0.40 ± ") and reg.endswith(" | 0.1000 ± 0.0000 | 1.00 ± 0.00 |")
    assert "Chosen: lr 3e-05 (in the band (0.2, 0.6))." in md
    assert "| method | chosen | qualifies | new task | drift KL | median retention |" in lines
    assert "| lwf | λ=10 | yes | 78.0 | 0.0400 | 0.40 |" in lines
    assert "| guided | λ=10,r=0.25 | yes | 75.0 | 0.0300 | 0.40 |" in lines
    assert "| lora | r=8,lr=0.001 | no: the best learner | 60.0 | 0.0200 | 0.20 |" in lines
    assert "| arm | seeds | new task | AP | median retention | tasks kept | drift KL | IF retention | answers |" in lines
    # mean ± std over seeds (n - 1). plain: new task 0.5, 0.55, 0.5; AP 0.125, 0.125, 0.175 (std 0.05 /
    # sqrt 3); median 0.2, 0.4, 0.6 (std 0.2); tasks kept 1, 1, 7 (std sqrt 12); drift 0.1, 0.2, 0.3;
    # IF retention 1.0, 0.8, 0.6; answers 0.9, 0.8, 0.7 (std 0.1)
    assert "| plain | 3 | 51.7 ± 2.9 | 14.2 ± 2.9 | 0.40 ± 0.20 | 3.0 ± 3.5 | 0.2000 ± 0.1000 | 0.80 ± 0.20 | " \
           "80.0 ± 10.0 |" in lines
    # wise: no new task; AP 0.25, 0.35; median 0.8, 1.0; all 7 kept; drift 0.01, 0.03; IF whole; answers 0.6, 0.8
    # (std of two values a, b: |a - b| / sqrt 2)
    assert "| wise | 2 | — | 30.0 ± 7.1 | 0.90 ± 0.14 | 7.0 ± 0.0 | 0.0200 ± 0.0141 | 1.00 ± 0.00 | 70.0 ± 14.1 |" in lines
    # one seed: no spread shown. new task 0.5, AP 0.125, median (11 - 5) / 15, only IF kept, drift 0.05
    assert "| guided-paper | 1 | 50.0 | 12.5 | 0.40 | 1.0 | 0.0500 | 1.00 | 100.0 |" in lines
    # the twin, in the harsh regime's table: plain's row under its own label, marked
    harsh = lines[lines.index("## Confirmation, harsh regime (test split, mean ± std over seeds)"):]
    assert "| best (= off-floor/plain) | 3 | 51.7 ± 2.9 | 14.2 ± 2.9 | 0.40 ± 0.20 | 3.0 ± 3.5 | 0.2000 ± 0.1000 | " \
           "0.80 ± 0.20 | 80.0 ± 10.0 |" in harsh
    assert "not yet decided" in md


def test_replay_rows_read_stage_2_and_the_earlier_task_and_render_as_their_own_table():
    # R[i][j]: task j after stage i (0: before). replay 0.25: uppercase 0.9 after its stage, 0.6 after
    # date_iso (0.95 right after its own stage); replay 0: 0.85 -> 0.1, date_iso 1.0
    def rec(label, f, up, up2, di, k, kl):
        return {"method": "replay", "label": label, "strength": f, "settings": {"replay": f},
                "cl": {"R": [[0.0, 0.0], [up, 0.0], [up2, di]]}, "general": general(k, kl)}
    rows = FR.replay_rows([rec("replay=0.25", 0.25, 0.9, 0.6, 0.95, 17, 0.03), rec("replay=0", 0.0, 0.85, 0.1, 1.0, 11, 0.2)],
                          BASE)
    assert [r["label"] for r in rows] == ["replay=0", "replay=0.25"]           # by strength
    assert [(r["new_task"], r["earlier_before"], r["earlier_after"]) for r in rows] == [(1.0, 0.85, 0.1), (0.95, 0.9, 0.6)]
    assert rows[1]["median_retention"]["value"] == pytest.approx(ret(17)) and rows[1]["drift_kl"]["value"] == 0.03
    md = FR.markdown({"sweep": [], "replay": rows, "confirm": {}, "decision": {"text": "x"}}, []).splitlines()
    line = next(x for x in md if x.startswith("| replay=0.25 |"))     # the median's SE: the bootstrap's
    assert line.startswith("| replay=0.25 | 95.0 | 90.0 → 60.0 | 0.0300 ± 0.0000 | 1.00 ± 0.00 | 100.0 ± 0.0 | 0.80 ± ")
    assert not any(x.startswith("## Replay") for x in FR.markdown({"sweep": [], "confirm": {}, "decision": {"text": "x"}}, []).splitlines())


def test_twins_are_labels_that_resolve_to_the_same_train_py_run():
    # resolved as train.py resolves flags: an explicit default or another key order is the same run
    # across regimes too: harsh's best is LoRA at its own lr, as off-floor's best-non-iv (the first of the two);
    # harsh's plain and guided-paper train at the default lr 1e-4, off-floor's at 3e-5: not twins
    lora = {"regime": "lora", "lr": 1e-3, "epochs": 1.0}
    plan = {"arms": {"off-floor": {"plain": {"lr": 3e-5}, "plain-less": {"epochs": 1.0, "lr": 3e-5}, "best-non-iv": lora,
                                   "guided-paper": {"lr": 3e-5, "preset": "guided"},
                                   "guided-chosen": {"preset": "guided", "lr": 3e-5, "kl_weight": 1.0}},
                     "harsh": {"plain": {}, "guided-paper": {"preset": "guided"}, "free_kl": {"free_kl_weight": 10.0},
                               "best": {"epochs": 1.0, "lr": 1e-3, "regime": "lora"}}},
            "wise_alpha": 0.5}
    # [regime, label] lists (as JSON keeps them)
    assert F.twins(plan) == {"off-floor": {"plain-less": ["off-floor", "plain"], "guided-chosen": ["off-floor", "guided-paper"]},
                             "harsh": {"best": ["off-floor", "best-non-iv"]}}
    labels = [(j[0], j[1]) for j in F.confirm_jobs(plan) if j[3] == 0]
    assert labels == [("off-floor", "plain"), ("off-floor", "best-non-iv"), ("off-floor", "guided-paper"),
                      ("harsh", "plain"), ("harsh", "guided-paper"), ("harsh", "free_kl")]
    # a third arm of the same run points at the first, not at the second
    plan["arms"]["harsh"]["plain-less"] = {"lr": 3e-5}
    assert F.twins(plan)["harsh"]["plain-less"] == ["off-floor", "plain"]


# ---- the IF part scored again from its stored replies (amendment 3a) -------------------------------------------

SHORT = "green hills below."                   # 3 words, lowercase, one sentence: ifdev000's constraints alone pass
UPPER = "PACK A WARM SLEEPING BAG, A TORCH AND PLENTY OF WATER FOR THE NIGHT."           # 14 words, no "tent"
LONG = ("Play i spy, twenty questions, the alphabet game, the number plate game, would you rather, name that "
        "tune, counting cows and horses, and a long story where everyone adds one sentence.")   # 31 words > 25


def stored_if(replies, strict):
    # an IF part as a run before amendment 3a stored it: its verdicts are stale, the replies are what count
    items = [{"id": f"ifdev{i:03d}", "strict": s, "loose": s, "reply": t}
             for i, (t, s) in enumerate(zip(replies, strict))]
    return {"n": len(items), "prompt_strict": {"value": 1.0, "se": 0.0}, "items": items, "unfinished": 0.25}


def test_rescored_scores_the_stored_replies_on_the_dev_file_and_a_short_reply_follows_nothing():
    recs = {r["id"]: r for r in ifeval.load_ifeval(GE.SPLITS["dev"][0])}
    assert [recs[f"ifdev{i:03d}"]["constraints"] for i in range(3)] == [
        [{"kind": "lowercase", "args": {}}, {"kind": "max_sentences", "args": {"n": 3}}],
        [{"kind": "uppercase", "args": {}}, {"kind": "avoid_word", "args": {"word": "tent"}}],
        [{"kind": "max_words", "args": {"n": 25}}]]
    assert all(ifeval.check(SHORT, c) for c in recs["ifdev000"]["constraints"]), "alone, the short reply passes"
    assert [ifeval.count_words(t) for t in (SHORT, UPPER, LONG)] == [3, 14, 31]
    tuned = {**general(N), "settings": {"split": "dev"},
             "if": stored_if([SHORT, UPPER, LONG], [[True, True], [True, True], [True]])}
    new = F.rescored(tuned)
    assert new == GE.rescore_if(tuned) and F.rescored(None) is None
    got = new["if"]
    # ifdev000: too short to answer -> neither constraint; ifdev001: both; ifdev002: 31 words > 25
    assert [i["strict"] for i in got["items"]] == [[False, False], [True, True], [False]]
    assert [i["loose"] for i in got["items"]] == [[False, False], [True, True], [False]]
    assert [i["reply"] for i in got["items"]] == [SHORT, UPPER, LONG] and got["n"] == 3
    assert got["prompt_strict"]["value"] == pytest.approx(1 / 3)
    assert got["prompt_loose"]["value"] == pytest.approx(1 / 3)
    assert got["inst_strict"]["value"] == pytest.approx(2 / 5)          # 2 of the 5 constraints
    assert got["answers"]["value"] == pytest.approx(2 / 3)               # 2 of 3 replies have >= 10 words
    assert got["unfinished"] == 0.25 and "if_scored_by" in new
    assert new["knowledge"] == tuned["knowledge"] and new["drift"] == tuned["drift"]   # only the IF part changes
    # against a base that follows all three (13 and 15 words, within their constraints): IF retention 1/3
    base_replies = ["the fields roll away below in green and gold under a wide sky.", UPPER,
                    "Try i spy, twenty questions, the alphabet game and counting red cars along the way."]
    base = F.rescored({**general(N), "settings": {"split": "dev"},
                       "if": stored_if(base_replies, [[False, False], [False, False], [False]])})
    assert base["if"]["prompt_strict"]["value"] == 1.0 and base["if"]["answers"]["value"] == 1.0
    e = FR.endpoints(base, new)
    assert e["if_retention"]["value"] == pytest.approx(1 / 3) and e["answers"]["value"] == pytest.approx(2 / 3)


def test_wise_cli_refuses_a_bad_alpha_in_one_line(tmp_path, capsys):
    assert W.main(["--tuned", str(tmp_path), "--alpha", "1.5", "--tasks", "uppercase", "--out",
                   str(tmp_path / "w.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--alpha 1.5" in err and not (tmp_path / "w.json").exists()
