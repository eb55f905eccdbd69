"""Tests of experiments/tradeoff_report.py on hand-made sweeps (no model, no training): the Pareto front,
the registered choice rule, the schema check of tradeoff.json, results/tradeoff.md and the plot."""
import copy
import re

import pytest

import tradeoff_report as T     # experiments/ is on the tests' path (pyproject.toml)


def point(method, strength, new_task, general_after, task="uppercase", before=0.4):
    return {"method": method, "label": f"{method[0]}={strength:g}", "strength": strength, "settings": {},
            "task": task, "split": "dev", "new_task": new_task, "general_before": before,
            "general_after": general_after, "terms": {}, "seconds": 1.0}


# plain's best on uppercase is 0.8, so the choice rule's bar there is 0.72
SWEEP = [point("plain", 1e-5, 0.6, 0.38), point("plain", 1e-4, 0.8, 0.2),
         point("guided", 2.0, 0.7, 0.36),     # below the bar, though it keeps the most
         point("guided", 0.5, 0.74, 0.3),
         point("guided", 1.0, 0.78, 0.3),     # ties the one before on general_after, higher new_task: chosen
         point("lwf", 1.0, 0.5, 0.39),        # never reaches the bar
         point("guided", 1.0, 0.9, 0.4, task="date_iso"), point("plain", 1e-4, 0.9, 0.1, task="date_iso")]


def stat(mean, std, n=3):
    return {"mean": mean, "std": std, "n": n}


def valid(confirm=True) -> dict:
    c = {"guided-s1": {"method": "guided", "regime": "A", "settings": {"iv_weight": 1.0}, "seeds": [0, 1, 2],
                       "GP_drop": stat(0.123, 0.01), "new_task": stat(0.8, 0.02),
                       "general_stage_mean": stat(0.35, 0.005), "IP_drop": stat(0.05, None),
                       "BWT": stat(-0.1, 0.03), "instruction_logprob": stat(-5.0, 0.1)}}
    return {"sweep": copy.deepcopy(SWEEP), "confirm": c if confirm else {},
            "decision": {"holds": None, "text": "Waiting for the confirmatory runs."}}


# ---------------------------------------------------------------------------------------------
# The numbers

def test_pareto_front_drops_dominated_and_keeps_ties():
    pts = [{"new_task": 0.5, "general_after": 0.5},    # 0: front
           {"new_task": 0.6, "general_after": 0.4},    # 1: front (best new_task)
           {"new_task": 0.4, "general_after": 0.4},    # 2: dominated by 0 in both
           {"new_task": 0.5, "general_after": 0.5},    # 3: a duplicate of 0: neither dominates the other
           {"new_task": 0.6, "general_after": 0.3},    # 4: equal new_task to 1, lower general: dominated
           {"new_task": 0.3, "general_after": 0.5}]    # 5: equal general, lower new_task: dominated
    assert T.pareto_front(pts) == [0, 1, 3]
    assert T.pareto_front(pts[2:3]) == [0]
    assert T.pareto_front([]) == []


def test_retained():
    assert T.retained(point("plain", 1, 0.5, 0.3, before=0.4)) == pytest.approx(0.75)
    assert T.retained(point("plain", 1, 0.5, 0.3, before=0.0)) is None


def test_choose_point_rule():
    assert T.choose_point(SWEEP, "uppercase", "guided") is SWEEP[4]
    assert T.choose_point(SWEEP, "uppercase", "plain") is SWEEP[1]       # only its best clears 0.72
    assert T.choose_point(SWEEP, "uppercase", "lwf") is None
    assert T.choose_point(SWEEP, "uppercase", "guided", plain_best_frac=0.85) is SWEEP[2]   # bar 0.68
    assert T.choose_point(SWEEP, "uppercase", "guided", plain_best_frac=1.0) is None        # bar 0.8
    assert T.choose_point(SWEEP, "date_iso", "guided") is SWEEP[6]       # the other task's points only
    twins = [point("plain", 1, 0.8, 0.2), point("fvg", 1, 0.8, 0.3), point("fvg", 2, 0.8, 0.3)]
    assert T.choose_point(twins, "uppercase", "fvg") is twins[1]         # a full tie: the first
    assert T.choose_point([point("fvg", 1, 0.8, 0.3)], "uppercase", "fvg") is None   # no plain, no bar


# ---------------------------------------------------------------------------------------------
# The file's shape

def paths(d):
    """Every key check_tradeoff requires in `d`, as (container getter, key, name in the message)."""
    yield from ((lambda x: x, k, k) for k in ("sweep", "confirm", "decision"))
    for k in T.SWEEP_KEYS:
        yield lambda x: x["sweep"][2], k, f"sweep[2].{k}"
    for k in list(T.CONFIRM_KEYS) + list(T.CONFIRM_STATS):
        yield lambda x: x["confirm"]["guided-s1"], k, f"confirm['guided-s1'].{k}"
    for s in T.CONFIRM_STATS:
        for k in ("mean", "std", "n"):
            yield lambda x, s=s: x["confirm"]["guided-s1"][s], k, f"confirm['guided-s1'].{s}.{k}"
    for k in ("holds", "text"):
        yield lambda x: x["decision"], k, f"decision.{k}"


def test_check_tradeoff_accepts_a_valid_file():
    T.check_tradeoff(valid())
    T.check_tradeoff(valid(confirm=False))


def test_check_tradeoff_names_each_missing_key():
    names = []
    for get, key, name in paths(valid()):
        d = valid()
        del get(d)[key]
        with pytest.raises(ValueError, match=re.escape(f"{name} is missing")):
            T.check_tradeoff(d)
        names.append(name)
    assert len(names) == 3 + 7 + 8 + 15 + 2


@pytest.mark.parametrize("where, key, value, says", [
    (lambda d: d["sweep"][0], "new_task", "0.5", "sweep[0].new_task should be Real"),
    (lambda d: d["sweep"][0], "general_after", True, "sweep[0].general_after should be Real, not bool"),
    (lambda d: d["sweep"][1], "general_before", 1.5, "sweep[1].general_before = 1.5 is not a fraction"),
    (lambda d: d["sweep"][1], "new_task", -0.1, "sweep[1].new_task = -0.1 is not a fraction"),
    (lambda d: d["sweep"][0], "settings", [], "sweep[0].settings should be dict"),
    (lambda d: d["confirm"]["guided-s1"]["BWT"], "n", 3.0, "BWT.n should be int"),
    (lambda d: d["decision"], "holds", "yes", "decision.holds should be bool or NoneType"),
    (lambda d: d, "sweep", {}, "sweep should be list")])
def test_check_tradeoff_rejects_ill_typed(where, key, value, says):
    d = valid()
    where(d)[key] = value
    with pytest.raises(ValueError, match=re.escape(says)):
        T.check_tradeoff(d)


# ---------------------------------------------------------------------------------------------
# results/tradeoff.md and the plot

def test_markdown_tables_choices_and_decision():
    md = T.markdown(valid(confirm=False), ["tradeoff/curves.png"], protocol_note="Registered in abc123.")
    assert "![tradeoff/curves.png](tradeoff/curves.png)" in md and "Registered in abc123." in md
    assert "Confirmatory runs: not yet run." in md
    upper = md[md.index("## uppercase"):md.index("## date_iso")]
    rows = [l for l in upper.splitlines() if l.startswith("| ") and not l.startswith("| method")]
    # sorted by method, then strength; retained = after / 0.4; only guided 0.74/0.30 is dominated
    # (by guided 0.78/0.30): each other point beats every other one in new task or general after
    assert rows == ["| guided | g=0.5 | 74.0 | 30.0 | 75.0 | no |",
                    "| guided | g=1 | 78.0 | 30.0 | 75.0 | yes |",
                    "| guided | g=2 | 70.0 | 36.0 | 90.0 | yes |",
                    "| lwf | l=1 | 50.0 | 39.0 | 97.5 | yes |",
                    "| plain | p=1e-05 | 60.0 | 38.0 | 95.0 | yes |",
                    "| plain | p=0.0001 | 80.0 | 20.0 | 50.0 | yes |"]
    assert "- guided: g=1 (new task 78.0, general after 30.0)" in upper
    assert "- lwf: no point reaches 90% of plain's best new-task score" in upper
    assert "**not yet decided.** Waiting for the confirmatory runs." in md


def test_markdown_confirm_table():
    md = T.markdown(valid(), [])
    assert "not yet run" not in md and "![" not in md
    assert "| guided-s1 | guided | 3 | 80.0 ± 2.0 | 12.3 ± 1.0 | 35.0 ± 0.5 | 5.0 | -10.0 ± 3.0 | -5.00 ± 0.10 |" in md
    # a record set without the instruction log P (an older report) shows a dash, not a crash
    d = valid()
    del d["confirm"]["guided-s1"]["instruction_logprob"]
    assert "| -10.0 ± 3.0 | - |" in T.markdown(d, [])


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = T.plot_curves(SWEEP, tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]     # no temporary left behind
    assert T.plot_curves([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
