"""experiments/forgetting_report.py, forgetting.py and wise.py: amendment 3's registered rules by hand
(endpoints, choice, regime, plan, decision), the confirmation's table and jobs, WiSE-FT's mixing, and
the keys of results/forgetting.json, on synthetic general-eval reports (no model)."""
import json

import pytest
import torch
from torch import nn

import forgetting as F
import forgetting_report as FR
import wise as W
from tradeoff import settings_of

KNOW = ("antonym", "capital", "plural", "past_tense", "comparative", "language")
N = 20


def report(knowledge, if_items, kl=0.0, kl_se=0.0):
    # what general_eval.general_eval writes, as far as general_eval.endpoints and forgetting_report read it
    per = [float(all(s)) for s in if_items]
    return {"if": {"prompt_strict": {"value": sum(per) / len(per), "se": 0.0},
                   "items": [{"strict": s, "loose": s} for s in if_items]},
            "knowledge": {t: {"chance": c, "items": list(items)} for t, (c, items) in knowledge.items()},
            "drift": {"kl_per_token": {"value": kl, "se": kl_se}}}


def general(k, kl=0.05):
    # every knowledge task k of N right against a base of N of N at chance 0.25: retention (k - 5) / 15,
    # which is also the median (six of the seven tasks share it); IF kept whole
    return report({t: (0.25, [1] * k + [0] * (N - k)) for t in KNOW}, [[True]] * 4, kl)


BASE = general(N, 0.0)


def ret(k):
    return (k - 5) / 15


# ---- endpoints --------------------------------------------------------------------------------------------

def test_endpoints_are_chance_corrected_retentions_and_their_median_by_hand():
    # base: five tasks at chance 0.25 score 6/8, "language" at chance 0.5 scores 8/8; IF 3 of 4 prompts
    def know(ks):
        return {t: (0.5 if t == "language" else 0.25, [1] * k + [0] * (8 - k)) for t, k in zip(KNOW, ks)}
    base = report(know([6, 6, 6, 6, 6, 8]), [[True, True], [True], [True, False], [True]])
    tuned = report(know([6, 4, 3, 2, 1, 7]), [[True, False], [True], [False], [True, True]], kl=0.031, kl_se=0.002)
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


# ---- the choice rule -----------------------------------------------------------------------------------------

def row(med, kl, new, label="", method="m"):
    return {"method": method, "label": label, "median_retention": {"value": med}, "drift_kl": {"value": kl},
            "new_task": new}


def test_better_prefers_retention_then_lower_drift_within_a_tie_then_new_task():
    assert FR.better(row(0.50, 0.9, 0.1), row(0.47, 0.01, 0.9))          # 0.03 apart: retention decides
    assert not FR.better(row(0.47, 0.01, 0.9), row(0.50, 0.9, 0.1))
    a, b = row(0.50, 0.02, 0.5), row(0.51, 0.03, 0.9)                   # 0.01 apart: a tie, drift decides
    assert FR.better(a, b) and not FR.better(b, a)
    c, d = row(0.50, 0.02, 0.6), row(0.505, 0.02, 0.5)                  # tie in both: new task decides
    assert FR.better(c, d) and not FR.better(d, c)
    pts = [row(0.3, 0.01, 0.9, "x"), row(0.6, 0.05, 0.7, "y"), row(0.61, 0.04, 0.6, "z"), row(0.45, 0.0, 1.0, "w")]
    assert FR.best_of(pts)["label"] == "z" and FR.best_of(pts[::-1])["label"] == "z"


def test_choose_qualifies_at_point_nine_of_the_reference_and_marks_a_fallback():
    ref = {"new_task": 0.8}                                     # the bar: 0.72
    rows = [row(0.9, 0.0, 0.7199, "below"), row(0.5, 0.1, 0.72, "at"), row(0.3, 0.0, 0.9, "high"),
            row(1.0, 0.0, 0.5, "other", method="o")]
    c = FR.choose(rows, "m", ref)
    assert c["label"] == "at" and c["qualified"] is True, "just below the bar keeps more but does not qualify"
    c = FR.choose([r for r in rows if r["label"] != "at"], "m", ref)
    assert c["label"] == "high" and c["qualified"] is True
    low = [row(0.9, 0.0, 0.5, "a"), row(0.1, 0.0, 0.6, "b"), row(0.8, 0.0, 0.55, "c")]
    c = FR.choose(low, "m", ref)
    assert c["label"] == "b" and c["qualified"] is False        # none qualifies: the best learner
    assert FR.choose(rows, "nobody", ref) is None


# ---- the off-floor regime ----------------------------------------------------------------------------------------

DIAG = [[0.0] * 4, [0.8, 0, 0, 0], [0.1, 0.6, 0, 0], [0.1, 0.1, 0.4, 0], [0.1, 0.1, 0.1, 0.2]]


def regime_rec(lr, k, kl=0.1):
    return {"method": "plain", "lr": lr, "split": "dev", "cl": {"R": DIAG}, "general": general(k, kl)}


def test_choose_regime_takes_the_highest_lr_in_the_band_else_the_closest_to_its_middle():
    # retentions 1e-4: 0.133 (below), 3e-5: 0.267, 1e-5: 0.533 (both in [0.2, 0.6])
    r = FR.choose_regime([regime_rec(1e-4, 7), regime_rec(3e-5, 9), regime_rec(1e-5, 13)], BASE)
    assert r["lr"] == 3e-5 and r["in_band"] is True
    assert [x["lr"] for x in r["rows"]] == [1e-4, 3e-5, 1e-5]
    assert r["rows"][0]["new_task"] == pytest.approx(0.5)              # (0.8 + 0.6 + 0.4 + 0.2) / 4
    assert r["rows"][1]["median_retention"]["value"] == pytest.approx(ret(9))
    # none in the band: 0.0, 0.067, 0.667 -> distances to 0.4: 0.4, 0.333, 0.267
    r = FR.choose_regime([regime_rec(1e-4, 5), regime_rec(3e-5, 6), regime_rec(1e-5, 15)], BASE)
    assert r["lr"] == 1e-5 and r["in_band"] is False
    assert FR.choose_regime([regime_rec(1e-4, 9), regime_rec(3e-5, 9)], BASE) is None


# ---- the plan ---------------------------------------------------------------------------------------------------

# (method, label) -> (new task, k of N, drift KL); every other point learns 0.8 and keeps 0.2 (k 8)
POINTS = {
    ("plain", "lr=1e-05"): (0.3, 20), ("plain", "lr=3e-05"): (0.7, 20),    # keeps all, misses the bar 0.72
    ("plain", "lr=0.0001,ep=0.5"): (0.75, 14), ("plain", "lr=0.0001"): (0.8, 8),
    ("lora", "r=8,lr=0.0003"): (0.5, 20), ("lora", "r=8,lr=0.001"): (0.6, 8),          # none qualifies
    ("lwf", "λ=1"): (0.8, 11, 0.05), ("lwf", "λ=10"): (0.78, 11, 0.04),                 # a tie: drift decides
    ("guided", "λ=1,as extracted"): (0.8, 8), ("guided", "λ=1,r=0.5"): (0.79, 17),
    ("guided", "λ=10,r=0.5"): (0.5, 20), ("guided", "λ=10,r=0.25"): (0.75, 11),
    ("free_kl", "λ_free=30"): (0.74, 14),
    ("other_kl", "λ_other=10"): (0.76, 15), ("other_kl", "λ_other=30"): (0.6, 20),
    ("wise", "α=0.25"): (0.3, 20), ("wise", "α=0.5"): (0.73, 14), ("wise", "α=0.75"): (0.78, 11),
}


def sweep_rec(method, label, strength, settings, new, k, kl=0.05):
    rec = {"method": method, "label": label, "strength": strength, "settings": settings, "general": general(k, kl),
           "split": "dev", "task": "uppercase"}
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
    return [regime_rec(1e-4, 5), regime_rec(3e-5, 11), regime_rec(1e-5, 17)]       # only 3e-5 in the band


def test_plan_waits_for_every_grid_and_wise_point_and_the_regime_runs():
    s, reg = full_sweep(), off_floor_regime()
    assert FR.plan(s, reg, BASE) is not None
    assert FR.plan([r for r in s if r["label"] != "λ_other=30"], reg, BASE) is None
    assert FR.plan([r for r in s if r["label"] != "α=0.75"], reg, BASE) is None
    assert FR.plan(s, reg[:2], BASE) is None


def test_plan_arms_follow_amendment_3():
    p = FR.plan(full_sweep(), off_floor_regime(), BASE)
    assert p["regime"]["lr"] == 3e-5 and p["wise_alpha"] == 0.5
    ch = p["chosen"]
    assert ch["plain"]["label"] == "lr=0.0001,ep=0.5" and ch["plain"]["qualified"]
    assert ch["lora"]["label"] == "r=8,lr=0.001" and ch["lora"]["qualified"] is False
    assert ch["lwf"]["label"] == "λ=10" and ch["guided"]["label"] == "λ=1,r=0.5"
    assert ch["free_kl"]["label"] == "λ_free=30" and ch["other_kl"]["label"] == "λ_other=10"
    assert ch["guided"]["median_retention"] == pytest.approx(ret(17)) and ch["guided"]["new_task"] == 0.79
    guided = {"preset": "guided", "kl_weight": 1.0, "iv_norm_ratio": 0.5}
    assert list(p["arms"]) == ["off-floor", "harsh"]
    assert p["arms"]["off-floor"] == {
        "plain": {"lr": 3e-5},
        "plain-less": {"lr": 1e-4, "epochs": 0.5},          # the point sets its own lr: kept
        "best-non-iv": {"lr": 3e-5, "other_kl_weight": 10.0},   # other_kl 0.667 beats plain's and free_kl's 0.6
        "guided-paper": {"lr": 3e-5, "preset": "guided"},
        "guided-chosen": {"lr": 3e-5, **guided},
        "free_kl": {"lr": 3e-5, "free_kl_weight": 30.0},
        "guided+prompt-kl": {"lr": 3e-5, **guided, "other_kl_weight": 10.0}}
    assert p["arms"]["harsh"] == {"plain": {}, "guided-paper": {"preset": "guided"}, "best": guided}
    assert p["names"] == {"best-non-iv": "other_kl λ_other=10", "guided+prompt-kl": "guided λ=1,r=0.5 + other_kl "
                          "λ_other=10", "best": "guided λ=1,r=0.5"}


def test_plan_with_the_harsh_lr_off_the_floor_is_one_regime_holding_every_arm():
    reg = [regime_rec(1e-4, 11), regime_rec(3e-5, 14), regime_rec(1e-5, 17)]        # 1e-4 keeps 0.4: in the band
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


def test_decide_needs_all_three_conditions_over_three_seeds():
    plan = {"arms": {"off-floor": {}}}
    table = {"off-floor": {"plain": arm(0.90, 0.2, 0.1),
                           "guided-chosen": arm(0.885, 0.4, 0.05),      # each condition met at its edge
                           "free_kl": arm(0.90, 0.5, 0.06),             # drift not halved
                           "guided-paper": arm(0.87, 0.6, 0.01),        # learns 3 points less
                           "best-non-iv": arm(0.90, 0.39, 0.01),        # retention not doubled
                           "wise": arm(None, 0.9, 0.0)}}                # post hoc: no new task, not judged
    d = FR.decide(table, plan)
    assert d["per_arm"] == {"off-floor/guided-chosen": True, "off-floor/free_kl": False,
                            "off-floor/guided-paper": False, "off-floor/best-non-iv": False}
    assert d["holds"] is True and "halved: False" in d["text"]
    # only a non-guided arm meets it: the goal does not hold
    t2 = {"off-floor": {"plain": arm(0.9, 0.2, 0.1), "free_kl": arm(0.9, 0.5, 0.04), "guided-paper": arm(0.8, 0.5, 0.04)}}
    assert FR.decide(t2, plan)["holds"] is False
    # plain keeps nothing: the bar is 0.5 retention
    t3 = {"off-floor": {"plain": arm(0.9, -0.1, 0.1), "guided-chosen": arm(0.9, 0.45, 0.01),
                        "guided-paper": arm(0.9, 0.5, 0.01)}}
    assert FR.decide(t3, plan)["per_arm"] == {"off-floor/guided-chosen": False, "off-floor/guided-paper": True}


def test_decide_holds_none_until_plain_has_three_seeds_in_every_regime():
    plan = {"arms": {"off-floor": {}, "harsh": {}}}
    table = {"off-floor": {"plain": arm(0.9, 0.2, 0.1), "guided-chosen": arm(0.9, 0.5, 0.01)},
             "harsh": {"plain": arm(0.9, 0.2, 0.1, n=2), "guided-paper": arm(0.9, 0.5, 0.01, n=2)}}
    d = FR.decide(table, plan)
    assert d["holds"] is None and "not yet decided" in d["text"] and "harsh" in d["text"]
    assert "10 confirmatory runs" in d["text"]


def confirm_rec(label, seed, k, kl, new=(0.8, 0.6, 0.4, 0.2), final=(0.1, 0.1, 0.1, 0.2), regime="off-floor"):
    R = [[0.0] * 4, [new[0], 0, 0, 0], [0, new[1], 0, 0], [0, 0, new[2], 0], list(final)]
    R[4][3] = new[3]
    return {"label": label, "regime": regime, "seed": seed, "settings": {},
            "cl": {"R": R, "train_tasks": list(F.SEQUENCE)}, "general": general(k, kl)}


def wise_rec(seed, k, kl, regime="off-floor"):
    return {"label": "wise", "regime": regime, "seed": seed, "settings": {"alpha": 0.5}, "general": general(k, kl),
            "tasks": {"uppercase": 0.5, "date_iso": 0.3, "reverse_words": 0.2, "acronym": 0.0 + 0.1 * seed}}


def confirm_records():
    return [confirm_rec("plain", 0, 8, 0.1), confirm_rec("plain", 1, 11, 0.2, new=(1.0, 0.6, 0.4, 0.2)),
            confirm_rec("plain", 2, 14, 0.3, final=(0.3, 0.1, 0.1, 0.2)), wise_rec(0, 17, 0.01), wise_rec(1, 20, 0.03)]


def test_run_endpoints_and_confirm_table_average_over_seeds():
    e = FR.run_endpoints(confirm_rec("plain", 0, 8, 0.1), BASE)
    # new task: the diagonal (0.8 + 0.6 + 0.4 + 0.2) / 4; AP: the last row (0.1 + 0.1 + 0.1 + 0.2) / 4
    assert e["new_task"] == pytest.approx(0.5) and e["AP"] == pytest.approx(0.125)
    assert e["median_retention"] == pytest.approx(0.2) and e["drift_kl"] == 0.1 and e["tasks_kept"] == 1
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
    assert plain["per_task"]["capital"] == pytest.approx(0.4) and plain["per_task"]["ifeval"] == pytest.approx(1.0)
    assert wise["seeds"] == [0, 1] and "new_task" not in wise
    assert wise["AP"]["mean"] == pytest.approx((0.25 + 0.275) / 2)
    assert wise["median_retention"]["mean"] == pytest.approx((0.8 + 1.0) / 2)
    # a label that is the same run as an earlier one shows its records, marked
    t = FR.confirm_table(confirm_records(), BASE, {"off-floor": {"plain-less": "plain"}})
    assert t["off-floor"]["plain-less"]["same_as"] == "plain" and "same_as" not in t["off-floor"]["plain"]
    assert t["off-floor"]["plain-less"]["drift_kl"] == t["off-floor"]["plain"]["drift_kl"]


def test_confirm_jobs_go_seed_by_seed_run_repeated_settings_once_and_mix_only_plain():
    plan = {"arms": {"off-floor": {"plain": {"lr": 3e-5, "epochs": 1.0}, "plain-less": {"epochs": 1.0, "lr": 3e-5},
                                   "guided-paper": {"preset": "guided"}},
                     "harsh": {"plain": {}, "guided-paper": {"preset": "guided"}}},
            "wise_alpha": 0.5}
    jobs = F.confirm_jobs(plan)
    one_seed = [("off-floor", "plain", {"lr": 3e-5, "epochs": 1.0}, 0.5), ("off-floor", "guided-paper", {"preset": "guided"}, None),
                ("harsh", "plain", {}, 0.5), ("harsh", "guided-paper", {"preset": "guided"}, None)]
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
    msg = FR.write(full_sweep(), off_floor_regime(), confirm_records(), BASE, BASE)
    assert "21 sweep points, 5 confirmatory runs" in msg
    d = json.loads((tmp_path / "results" / "forgetting.json").read_text())
    assert {"sweep", "regime", "plan", "confirm", "per_task", "decision"} <= set(d)
    assert len(d["sweep"]) == 21 and d["regime"]["lr"] == 3e-5 and d["plan"]["wise_alpha"] == 0.5
    assert d["per_task"]["off-floor"]["plain"]["capital"] == pytest.approx(0.4)
    assert d["decision"]["holds"] is None and "harsh" in d["decision"]["text"]     # harsh has no runs yet
    md = (tmp_path / "results" / "forgetting.md").read_text()
    # guided λ=10,r=0.5: new task 0.5, every item kept (SE 0), drift 0.05, IF 100%
    assert "| guided | λ=10,r=0.5 | 50.0 | 1.00 ± 0.00 | 7.0 ± 0.0 | 0.0500 ± 0.0000 | 100.0 ± 0.0 |" in md
    assert "Chosen: lr 3e-05 (in the band (0.2, 0.6))." in md
    assert "| plain | 3 |" in md and "not yet decided" in md


def test_twins_are_labels_that_resolve_to_the_same_train_py_run():
    # resolved as train.py resolves flags: an explicit default or another key order is the same run
    plan = {"arms": {"off-floor": {"plain": {"lr": 3e-5}, "plain-less": {"epochs": 1.0, "lr": 3e-5},
                                   "guided-paper": {"lr": 3e-5, "preset": "guided"},
                                   "guided-chosen": {"preset": "guided", "lr": 3e-5, "kl_weight": 1.0}},
                     "harsh": {"plain": {}, "guided-paper": {"preset": "guided"}, "best": {"free_kl_weight": 10.0}}},
            "wise_alpha": 0.5}
    assert F.twins(plan) == {"off-floor": {"plain-less": "plain", "guided-chosen": "guided-paper"}}
    labels = {(j[0], j[1]) for j in F.confirm_jobs(plan)}
    assert labels == {("off-floor", "plain"), ("off-floor", "guided-paper"), ("harsh", "plain"),
                      ("harsh", "guided-paper"), ("harsh", "best")}
