"""Tests of experiments/study.py's bookkeeping on hand-made run results (no training): the per-method
mean and std over seeds, new_task, the goal verdict, the recovery share, and that the report and
study.json are written from whatever runs have finished."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def fake_run(gp_final: float, r_diag: float, seed_shift: float = 0.0) -> dict:
    """A results.json with 4 train tasks: R[j+1][j] = r_diag + shift, final row 0.5; GP 0.4 -> gp_final."""
    n = 4
    d = r_diag + seed_shift
    R = [[0.0] * n] + [[d if j == i else (0.5 if i == n - 1 and j < i else 0.0) for j in range(n)]
                       for i in range(n)]
    R[n] = [0.5, 0.5, 0.5, d]
    gp = [0.4, 0.3, 0.2, 0.1, gp_final]
    cl = {"train_tasks": ["a", "b", "c", "d"], "R": R, "AP": sum(R[n]) / n,
          "BWT": sum(R[n][j] - R[j + 1][j] for j in range(n - 1)) / (n - 1), "FWT": 0.0,
          "GP": gp, "GP_drop": gp[0] - gp[-1], "IP": gp, "IP_drop": gp[0] - gp[-1],
          "general": {"choice_accuracy": [0.8] * 5, "instruction_logprob": [-9, -5, -5, -5, -5],
                      "knowledge_logprob": [-3] * 5}}
    return {"config": {}, "stages": [{}] * 5, "metrics": {}, "cl": cl}


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "OUT", tmp_path)
    monkeypatch.setattr(study, "RAW", tmp_path / "study")
    (tmp_path / "study").mkdir()
    return tmp_path


def write(dirs, name, r):
    (dirs / "study" / f"run_{name}.json").write_text(json.dumps(r))


def test_summary_goal_and_report(dirs):
    # plain loses 0.4 - 0.0 = 0.4 of GP; guided loses 0.4 - 0.25 = 0.15 (< half) and learns 1 point less
    for s, shift in zip(study.SEEDS, (-0.01, 0.0, 0.01)):
        write(dirs, f"plain-s{s}", fake_run(0.0, 0.90, shift))
        write(dirs, f"guided-s{s}", fake_run(0.25, 0.89, shift))
    write(dirs, "kl_only-s0", fake_run(0.1, 0.85))      # one seed only: std 0
    msg = study.report()
    assert "(7 runs" in msg and (dirs / "study.md").is_file()
    out = json.loads((dirs / "study.json").read_text())
    p, g = out["methods"]["plain"], out["methods"]["guided"]
    assert p["n_seeds"] == 3 and p["GP_drop"]["mean"] == pytest.approx(0.4)
    assert p["new_task"]["mean"] == pytest.approx(0.90) and p["new_task"]["std"] == pytest.approx(0.01)
    assert g["GP_drop"]["mean"] == pytest.approx(0.15)
    assert out["methods"]["kl_only"]["n_seeds"] == 1 and out["methods"]["kl_only"]["AP"]["std"] == 0.0
    assert "iv_only" not in out["methods"]                 # nothing finished: left out, not zero
    assert p["instr_lp_change"]["mean"] == pytest.approx(4.0)   # -9 at stage 0 -> -5 at the end
    assert p["knowl_lp_change"]["mean"] == 0.0 and p["choice_change"]["mean"] == 0.0
    goal = out["goal"]
    assert goal["forgetting_ratio"] == pytest.approx(0.15 / 0.4)
    assert goal["new_task_diff"] == pytest.approx(-0.01)
    assert goal["forgetting_halved"] and goal["new_task_within_2_points"] and goal["goal_holds"]
    assert "**The goal holds" in (dirs / "study.md").read_text()


def test_goal_fails_when_learning_suffers(dirs):
    for s in study.SEEDS:
        write(dirs, f"plain-s{s}", fake_run(0.0, 0.90))
        write(dirs, f"guided-s{s}", fake_run(0.35, 0.80))   # forgets less, but learns 10 points less
    study.report()
    goal = json.loads((dirs / "study.json").read_text())["goal"]
    assert goal["forgetting_halved"] and not goal["new_task_within_2_points"] and not goal["goal_holds"]
    assert "does not hold" in (dirs / "study.md").read_text()


def test_recovery_and_stats_by_hand():
    ab = {"x": {"original": {"score": 0.8}, "finetuned": {"score": 0.2}, "with": {"score": 0.5}},
          "y": {"original": {"score": 0.4}, "finetuned": {"score": 0.0}, "with": {"score": 0.0}},
          "z": {"original": {"score": 0.1}, "finetuned": {"score": 0.3}, "with": {"score": 0.9}}}  # no loss
    rec = study.recovery(ab, "with")
    assert rec["per_task"] == pytest.approx({"x": 0.5, "y": 0.0})
    assert rec["pooled"] == pytest.approx(0.3 / 1.0)
    m, sd = study.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and sd == pytest.approx(1.0)
    assert study.mean_std([]) == (None, None)
    assert study.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isclose(study.pearson([1, 2, 3], [3, 2, 1]), -1.0)


def test_run_flags_and_names():
    names = study.run_names()
    assert len(names) == len(study.METHODS) * len(study.SEEDS) + len(study.GRID)
    assert names[0] == "plain-s0"                            # runs first: it writes the shared stage 0
    assert study.run_flags("guided-s2")[-2:] == ["--seed", "2"] and "--guided" in study.run_flags("guided-s2")
    assert "--no-kl_iv" in study.run_flags("kl_only-s1")
    assert study.run_flags("guided_lambda3-s0")[-4:-2] == ["--kl_weight", "3"]


def test_format_section_in_report(dirs):
    write(dirs, "plain-s0", fake_run(0.0, 0.9))
    rows = [{"stage": st, "task": "antonym", "reply_contains": 0.5 if st == 0 else 0.0,
             "ignoring_case": 0.5 if st == 0 else 0.25, "examples": [["cold", f"reply {st}"]]} for st in range(5)]
    (dirs / "study" / "analysis.json").write_text(json.dumps({"format/plain-s0": rows}))
    md = (study.report(), (dirs / "study.md").read_text())[1]
    assert "| plain-s0 | ignoring_case | 50.0 | 25.0 | 25.0 | 25.0 | 25.0 |" in md
    assert "| antonym | cold | `reply 0` | `reply 1`" in md


def test_learnability_summary(tmp_path, monkeypatch):
    """experiments/learnability.py with train.py replaced by a stub that writes a results.json:
    the summary keeps before/after from the CL matrix, and a finished task is not run again."""
    spec = importlib.util.spec_from_file_location("learnability", ROOT / "experiments" / "learnability.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    monkeypatch.setattr(lm, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(lm, "OUT", tmp_path / "learnability.json")
    calls = []

    class Done:
        returncode = 0

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out_dir") + 1])
        (out / "results.json").write_text(json.dumps({"cl": {"R": [[0.1], [0.85]]}}))
        (out / "stage-1").mkdir()
        return Done()

    monkeypatch.setattr(lm.subprocess, "run", fake_run)
    assert lm.main(["--tasks", "uppercase,acronym", "--steps", "7"]) == 0
    summary = json.loads((tmp_path / "learnability.json").read_text())
    assert summary["acronym@7"]["before"] == 0.1 and summary["acronym@7"]["after"] == 0.85
    assert len(calls) == 2 and "--max_steps" in calls[0] and calls[0][calls[0].index("--max_steps") + 1] == "7"
    assert not (tmp_path / "runs" / "acronym@7" / "stage-1").exists()     # checkpoints removed
    assert lm.main(["--tasks", "acronym", "--steps", "7"]) == 0 and len(calls) == 2   # skipped
