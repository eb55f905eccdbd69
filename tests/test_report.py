"""Tests for ivft/report.py: reports on disk, the printed tables, the end-of-run summary and its plot."""
import importlib.util
import json
import sys

from ivft import report as R

# shaped like evaluate_suite's report: ints, floats, None, lists, tables in order
REPORT = {"model": "tiny", "tasks": {"copy": {"n": 2, "exact_match": 0.5, "choice_accuracy": 1.0,
                                              "instruction_logprob": -3.25},
                                     "upper": {"n": 2, "choice_accuracy": 0.0, "knowledge_logprob": -1.5}},
          "primary": {"copy": "choice_accuracy", "upper": "exact_match"},
          "settings": {"n": None, "k_shot": 0, "seed": 0, "batch_size": 128, "dtype": "float32",
                       "metrics": ["exact_match", "choice_accuracy"], "seconds": 0.1}}
METRICS = ("exact_match", "choice_accuracy", "instruction_logprob", "knowledge_logprob")
# cl_metrics of a two-task run after its first stage
CL = {"stages": 1, "train_tasks": ["A", "B"], "general_tasks": ["g"], "R": [[0.1, 0.2], [0.9, 0.3]], "AP": 0.9,
      "BWT": None, "FWT": None, "forgetting": {"A": None}, "GP": [0.5, 0.4], "GP_drop": 0.09999999999999998,
      "IP": [0.6, 0.6], "IP_drop": 0.0, "general": {"exact_match": [0.5, 0.4], "exact_match_kshot": [0.6, 0.6]}}


def test_report_roundtrip_and_table(tmp_path, capsys):
    path = tmp_path / "sub" / "report.json"
    R.save_report(REPORT, path)
    assert json.loads(path.read_text()) == REPORT
    assert path.read_text() == json.dumps(REPORT, indent=1)          # the format reports always had
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    R.print_table(REPORT, METRICS)
    out = capsys.readouterr().out
    assert "copy" in out and "choice_accuracy" in out and "*" in out


def test_print_cl(capsys):
    R.print_cl(CL)
    out = capsys.readouterr().out
    assert "0.900" in out and "forgetting A=-" in out


def test_run_summary_says_what_was_learned_and_forgotten():
    lines = R.run_summary(CL, "plain")
    assert lines[0] == "learned (right after its stage): A 0.10 -> 0.90"
    assert lines[1].startswith("general suite (zero-shot, never trained on): 0.50 before -> 0.40 after (drop 0.10")
    assert "the tasks were learned (mean 0.90) while the general suite fell" in lines[2] and "--guided" in lines[2]
    held = {**CL, "GP": [0.5, 0.5], "GP_drop": 0.0}
    assert "held" in R.run_summary(held, "guided")[2] and "without --guided" in R.run_summary(held, "guided")[2]


def test_plot_summary_png_or_skip(tmp_path, monkeypatch):
    path = R.plot_summary(CL, tmp_path / "summary.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert path is None and not (tmp_path / "summary.png").exists()
    else:
        assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
        assert [p.name for p in tmp_path.iterdir()] == ["summary.png"]       # written atomically
    # without matplotlib: nothing drawn, no error
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert R.plot_summary(CL, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_run_summary_and_plot_without_a_general_suite(tmp_path):
    # --general none (or "", ",", "NONE"): cl_metrics over no general tasks gives GP = [None, None]
    import evaluate
    reports = [{"tasks": {"A": {"n": 2, "exact_match": s}}, "primary": {"A": "exact_match"}} for s in (0.1, 0.9)]
    cl = evaluate.cl_metrics(reports, ["A"], [])
    assert cl["GP"] == [None, None]
    lines = R.run_summary(cl, "plain")
    assert lines[0] == "learned (right after its stage): A 0.10 -> 0.90"
    assert lines[1].startswith("general suite: none") and len(lines) == 2
    R.plot_summary(cl, tmp_path / "summary.png")      # draws the tasks only, no error
