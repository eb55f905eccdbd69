"""Tests of experiments/study.py's bookkeeping on hand-made run results (no real model, no training):
the run names and flags, the parts and which one runs next, a run's wrapping (resume or overwrite,
raw copy, timings, checkpoints kept only where the analyses need them) with train.py stubbed out,
the decision rule and the paired differences on hand-made numbers, the recovered share and its noise
rule, the report's JSON schema and study.md; the analyses once end to end on a tiny random model."""
import contextlib
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# experiments/ is on the tests' path (pyproject.toml), where study.py finds its sibling common.py
spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

TASKS = ["a", "b", "c", "d"]
SIX = {"GP_drop", "IP_drop", "AP", "BWT", "FWT", "new_task"}


def fake_run(gp_drop: float, new_task: float) -> dict:
    """A finished results.json with 4 training tasks: R[j+1][j] = new_task, the final row 0.5 for the
    earlier tasks; GP from 0.4 down to 0.4 - gp_drop; IP = GP; log-probs per stage."""
    n = len(TASKS)
    R = [[0.0] * n] + [[new_task if j == i else 0.0 for j in range(n)] for i in range(n)]
    R[n] = [0.5] * (n - 1) + [new_task]
    gp = [0.4, 0.3, 0.2, 0.1, 0.4 - gp_drop]
    cl = {"train_tasks": TASKS, "R": R, "AP": sum(R[n]) / n,
          "BWT": sum(R[n][j] - R[j + 1][j] for j in range(n - 1)) / (n - 1), "FWT": 0.0,
          "GP": gp, "GP_drop": gp[0] - gp[-1], "IP": gp, "IP_drop": gp[0] - gp[-1],
          "general": {"choice_accuracy": [0.8] * 5, "instruction_logprob": [-9.0, -5, -5, -5, -5],
                      "knowledge_logprob": [-3.0] * 5}}
    return {"config": {}, "stages": [{}] * 5, "metrics": {}, "cl": cl}


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "OUT", tmp_path / "results")
    monkeypatch.setattr(study, "RAW", tmp_path / "results" / "study")
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    protocol = tmp_path / "protocol.md"
    protocol.write_text("# Protocol of the study (pre-registered)\n\nRule: halve it.\n")
    monkeypatch.setattr(study, "PROTOCOL", protocol)
    monkeypatch.setattr(study, "protocol_commit", lambda: ("abc1234", False))
    monkeypatch.setattr(study, "make_plots", lambda runs, regimes: [])
    (tmp_path / "results" / "study").mkdir(parents=True)
    return tmp_path


def popen_of(work):
    """A stand-in for subprocess.Popen: train.py's work faked by work(cmd) -> exit status."""
    class FakeChild:
        def __init__(self, cmd, **kw):
            self.cmd = cmd

        def wait(self):
            return work(self.cmd)
    return FakeChild


def write(dirs, name, r):
    (dirs / "results" / "study" / f"run_{name}.json").write_text(json.dumps(r))


# ---- names, flags, parts -----------------------------------------------------------------------

def test_run_names_and_flags():
    names = study.run_names()
    assert len(names) == 36 == len(set(names))
    assert {"A-plain-s0", "B-fvg-s2", "A-iv_only-s1"} <= set(names)
    f = study.run_flags("B-fvg-s2")
    pairs = list(zip(f, f[1:]))
    assert ("--regime", "lora") in pairs and ("--preset", "fvg") in pairs and ("--seed", "2") in pairs
    assert ("--eval_n", "50") in pairs and ("--eval_k_shot", "3") in pairs
    assert "--lr" not in f and "--max_train" not in f                 # the regime's and train.py's defaults
    g = study.run_flags("A-guided-s0")
    assert ("--regime", "full") in zip(g, g[1:]) and ("--preset", "guided") in zip(g, g[1:])
    assert study.parse_name("A-iv_only-s1") == ("A", "iv_only", 1)
    for bad in ("C-plain-s0", "A-kl_only-s0", "A-plain-s3", "plain-s0"):
        with pytest.raises(ValueError):
            study.parse_name(bad)
    assert study.KEEP_CHECKPOINTS == {"A-plain-s0", "A-guided-s0", "B-plain-s0", "B-guided-s0"}


def test_parts_in_order():
    p = study.parts()
    assert list(p) == ["A-s0", "B-s0a", "analysis-A", "analysis-B", "B-s0b", "B-s0c", "A-s1", "B-s1a", "B-s1b",
                       "B-s1c", "A-s2", "B-s2a", "B-s2b", "B-s2c"]
    assert p["A-s1"]["runs"] == [f"A-{m}-s1" for m in ("plain", "replay", "lwf", "iv_only", "guided", "fvg")]
    assert p["B-s1a"]["runs"] == ["B-plain-s1", "B-guided-s1"] and p["B-s2c"]["runs"] == ["B-iv_only-s2", "B-fvg-s2"]
    assert p["analysis-B"]["needs"] == ["B-plain-s0", "B-guided-s0"]
    assert sorted({k.split("/")[0] for k in p["analysis-A"]["items"]}) == ["b", "c", "d"]
    assert all(run in study.run_names() for q in p.values() if q["kind"] == "runs" for run in q["runs"])
    assert sum(len(q["runs"]) for q in p.values() if q["kind"] == "runs") == 36


def test_next_part_and_status(dirs):
    assert study.next_part() == "A-s0" and study.part_status("A-s0") == ("not started", 0, 6)
    (dirs / "runs" / "A-replay-s0").mkdir(parents=True)
    (dirs / "runs" / "A-replay-s0" / "log.txt").write_text("cut off")       # an interrupted run
    assert study.part_status("A-s0")[0] == "partly"
    for m in study.METHODS:
        write(dirs, f"A-{m}-s0", fake_run(0.3, 0.9))
    assert study.part_status("A-s0") == ("done", 6, 6) and study.next_part() == "B-s0a"
    for m in study.METHODS:
        if m != "guided":
            write(dirs, f"B-{m}-s0", fake_run(0.3, 0.9))
    unfinished = fake_run(0.3, 0.9)
    unfinished["stages"] = [{}] * 3                                            # 2 of 4 stages
    (dirs / "runs" / "B-guided-s0").mkdir(parents=True)
    (dirs / "runs" / "B-guided-s0" / "results.json").write_text(json.dumps(unfinished))
    assert study.part_status("B-s0a") == ("partly", 1, 2) and study.next_part() == "B-s0a"
    write(dirs, "B-guided-s0", fake_run(0.3, 0.9))
    assert study.next_part() == "analysis-A"
    items = study.analysis_items("A")
    (dirs / "results" / "study" / "analysis_A.json").write_text(json.dumps({items[0]: {}}))
    assert study.part_status("analysis-A") == ("partly", 1, len(items)) and study.next_part() == "analysis-A"
    (dirs / "results" / "study" / "analysis_A.json").write_text(json.dumps({k: {} for k in items}))
    assert study.next_part() == "analysis-B"
    (dirs / "results" / "study" / "analysis_B.json").write_text(json.dumps({k: {} for k in study.analysis_items("B")}))
    assert study.next_part() == "A-s1"                                         # B-s0b, B-s0c were done above
    listing = study.list_parts()
    assert "A-s0        done" in listing and "A-s1        not started" in listing and "next: A-s1" in listing


def test_one_notion_of_done_for_list_bare_run_and_report(dirs, monkeypatch, capsys):
    """A run whose runs/study/<name>/results.json is finished but whose raw copy is missing (the
    study.py was killed between the two) is not done for --list nor for a bare study.py, as it is
    not for --report: the bare study.py takes its part, copies the results without training, and
    only then do all three count it. (Before, --list and the bare study.py said "all parts are
    done" beside a report of 35 of 36 runs.)"""
    for name in study.run_names():
        write(dirs, name, fake_run(0.3, 0.9))
    for part in ("analysis-A", "analysis-B"):
        regime = part[-1]
        (dirs / "results" / "study" / f"analysis_{regime}.json").write_text(
            json.dumps({k: {} for k in study.analysis_items(regime)}))
    (dirs / "results" / "study" / "run_B-iv_only-s2.json").unlink()
    d = dirs / "runs" / "B-iv_only-s2"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(fake_run(0.3, 0.9)))
    assert not study.run_done("B-iv_only-s2") and "B-iv_only-s2" not in study.load_runs()
    assert study.part_status("B-s2c") == ("partly", 1, 2) and study.next_part() == "B-s2c"
    assert "all parts done" not in study.list_parts() and "next: B-s2c" in study.list_parts()
    from train import PRESETS
    lora = PRESETS["regime"]["lora"]
    (dirs / "results" / "lora_pilot.json").write_text(json.dumps(
        {"choice": {"lr": lora["lr"], "epochs": lora["epochs"], "all_learned": True}}))
    monkeypatch.setattr(study.subprocess, "Popen", popen_of(lambda cmd: pytest.fail(f"trained: {cmd}")))
    assert study.main([]) == 0
    out = capsys.readouterr().out
    assert "B-iv_only-s2: finished before, raw copy made now" in out and "36 of 36 runs" in out
    assert study.run_done("B-iv_only-s2") and study.next_part() is None and len(study.load_runs()) == 36
    assert "all parts done" in study.list_parts()


def test_list_minutes_measured_then_estimated(dirs):
    assert study.part_minutes("A-s0", {})[2] == "guess"
    timings = {"A-plain-s0": {"seconds": 600, "complete": True}, "A-guided-s0": {"seconds": 1200, "complete": True},
               "A-lwf-s0": {"seconds": 9999, "complete": False}}
    # A-s1: every run estimated from the measured runs of its regime, same method first
    total, left, kind = study.part_minutes("A-s1", timings)
    assert kind == "estimated" and total == pytest.approx((10 + 20 + 4 * 15) )
    assert study.run_minutes("A-plain-s1", timings) == (10.0, "estimated")
    assert study.run_minutes("A-plain-s0", timings) == (10.0, "measured")
    assert study.run_minutes("B-plain-s0", timings)[1] == "guess"           # nothing of regime B measured
    # ... until the LoRA pilot has timed plain training at its chosen lr and epochs: that, scaled by
    # the method's cost relative to plain in regime A
    (dirs / "results" / "lora_pilot.json").write_text(json.dumps(
        {"choice": {"lr": 3e-4, "epochs": 16}, "lr0.0003-ep16": {"seconds": 3000}}))
    assert study.run_minutes("B-guided-s1", timings) == (100.0, "estimated")
    assert study.run_minutes("B-lwf-s1", timings)[1] == "guess"             # A-lwf-s0 never finished
    assert study.part_minutes("A-s1", timings, workers=2)[0] == pytest.approx(45)
    # once regime B has a measured run, a method not yet run there is that run scaled by the
    # methods' cost ratio in regime A (guided/plain = 2 here); a cut run has only its rest left
    timings["B-plain-s0"] = {"seconds": 3600, "complete": True}
    assert study.run_minutes("B-guided-s1", timings) == (120.0, "estimated")
    assert study.run_minutes("B-lwf-s1", timings) == (60.0, "estimated")     # no A-lwf cost: B's mean
    timings["B-guided-s0"] = {"seconds": 1800, "complete": False}
    assert study.part_minutes("B-s0a", timings)[:2] == pytest.approx((180, 90))
    # two workers: the part lasts as long as its longer run (120 min), not half the sum (90)
    assert study.part_minutes("B-s0a", timings, workers=2)[:2] == pytest.approx((120, 90))
    assert study.wall_minutes([5, 5, 5, 5, 8], 2) == 18 and study.wall_minutes([], 2) == 0


# ---- one run, train.py stubbed ---------------------------------------------------------------------

def test_do_run_copies_times_and_cleans(dirs, monkeypatch):
    calls = []

    def fake_train(cmd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        for s in range(1, 5):
            (out / f"stage-{s}").mkdir(exist_ok=True)
        (out / "results.json").write_text(json.dumps(fake_run(0.3, 0.9)))
        return 0

    monkeypatch.setattr(study.subprocess, "Popen", popen_of(fake_train))
    ok, _ = study.do_run("A-replay-s1", threads=2)
    assert ok and "--overwrite" in calls[0] and "--resume" not in calls[0]
    assert calls[0][calls[0].index("--num_threads") + 1] == "2"
    assert calls[0][calls[0].index("--stage0_cache") + 1] == str(dirs / "runs" / "stage0.json")
    assert (dirs / "results" / "study" / "run_A-replay-s1.json").is_file()
    assert not list((dirs / "runs" / "A-replay-s1").glob("stage-*"))          # not needed: removed
    ok, _ = study.do_run("B-guided-s0", threads=1)
    assert ok and len(list((dirs / "runs" / "B-guided-s0").glob("stage-*"))) == 4   # the analyses read them
    t = json.loads((dirs / "results" / "study" / "timings.json").read_text())
    assert t["A-replay-s1"]["complete"] and t["A-replay-s1"]["sessions"] == 1 and "B-guided-s0" in t
    assert study.do_run("A-replay-s1", threads=2) == (True, "A-replay-s1: done before") and len(calls) == 2
    # a run cut off after a stage checkpoint resumes
    d = dirs / "runs" / "A-lwf-s1"
    (d / "stage-1").mkdir(parents=True)
    assert "--resume" in study.train_flags("A-lwf-s1", 1)


def test_failed_run_is_reported_and_timed(dirs, monkeypatch):
    monkeypatch.setattr(study.subprocess, "Popen", popen_of(lambda cmd: 3))
    ok, msg = study.do_run("A-plain-s2", threads=1)
    assert not ok and "FAILED (exit 3" in msg
    assert not (dirs / "results" / "study" / "run_A-plain-s2.json").exists()
    assert json.loads((dirs / "results" / "study" / "timings.json").read_text())["A-plain-s2"]["complete"] is False


def test_cut_run_stops_its_part(dirs, monkeypatch):
    """A run stopped by SIGTERM (train.py saves `last`, exits 143) stops the part: the next run of the
    part is not started, so stopping a session's study means stopping its train.py processes."""
    calls = []

    monkeypatch.setattr(study.subprocess, "Popen", popen_of(lambda cmd: calls.append(cmd) or 143))
    monkeypatch.setattr(study, "STOPPING", threading.Event())
    assert study.run_part("A-s2", workers=1, threads=1) is False
    assert len(calls) == 1 and "A-plain-s2" in calls[0][calls[0].index("--out_dir") + 1]
    ok, msg = study.do_run("A-replay-s2", threads=1)
    assert not ok and "not started" in msg and len(calls) == 1
    # a stop signal passed on by the script (experiments/common.py) also stops the part before its next run
    monkeypatch.setattr(study, "STOPPING", threading.Event())
    study.STOPPING.set()
    ok, msg = study.do_run("A-replay-s2", threads=1)
    assert not ok and "not started" in msg and len(calls) == 1


def test_part_with_two_workers_then_next(dirs, monkeypatch, capsys):
    """study.py --part A-s0 --workers 2: the first run alone (it writes the shared stage-0
    evaluation), then two at a time; the report follows, and a bare call runs the next part."""
    import time
    seen, lock = [], threading.Lock()

    def fake_train(cmd):
        out = Path(cmd[cmd.index("--out_dir") + 1])
        with lock:
            seen.append((out.name, (dirs / "runs" / "stage0.json").is_file()))
        time.sleep(0.05)
        out.mkdir(parents=True, exist_ok=True)
        (dirs / "runs" / "stage0.json").write_text("{}")
        (out / "results.json").write_text(json.dumps(fake_run(0.3, 0.9)))
        return 0

    monkeypatch.setattr(study.subprocess, "Popen", popen_of(fake_train))
    assert study.main(["--part", "A-s0", "--workers", "2", "--threads", "1"]) == 0
    assert seen[0] == ("A-plain-s0", False) and [s for _, s in seen].count(False) == 1 and len(seen) == 6
    assert study.part_status("A-s0")[0] == "done" and (dirs / "results" / "study.md").is_file()
    assert "next: B-s0a" in capsys.readouterr().out
    seen.clear()
    from train import PRESETS       # regime B waits for the LoRA pilot's choice
    lora = PRESETS["regime"]["lora"]
    (dirs / "results" / "lora_pilot.json").write_text(json.dumps({"choice": {"lr": lora["lr"], "epochs": lora["epochs"],
                                                                        "all_learned": True}}))
    assert study.main([]) == 0 and {n for n, _ in seen} == {"B-plain-s0", "B-guided-s0"}   # part B-s0a


def test_run_only_one_run_of_a_part(dirs, monkeypatch, capsys):
    """study.py --run A-guided-s0 trains that run alone; its part stays partly done, and a --part
    that does not hold the run is one clear error before anything runs."""
    seen = []

    def fake_train(cmd):
        out = Path(cmd[cmd.index("--out_dir") + 1])
        seen.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(fake_run(0.3, 0.9)))
        return 0

    monkeypatch.setattr(study.subprocess, "Popen", popen_of(fake_train))
    assert study.main(["--run", "A-guided-s0", "--threads", "1"]) == 0
    assert seen == ["A-guided-s0"] and study.run_done("A-guided-s0")
    assert study.part_status("A-s0")[:2] == ("partly", 1)
    assert study.main(["--run", "A-guided-s0", "--threads", "1"]) == 0 and seen == ["A-guided-s0"]  # done before
    capsys.readouterr()
    with pytest.raises(SystemExit):
        study.main(["--run", "A-guided-s0", "--part", "B-s0a"])
    assert "not a run of part B-s0a (it is in A-s0)" in capsys.readouterr().err and seen == ["A-guided-s0"]

# A child that behaves like train.py on a stop signal: it notes each signal, "saves" for a second
# after the first, then exits 128 + signal; a second signal before that is counted too.
CHILD = """
import os, pathlib, signal, sys, time
got = []
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
pathlib.Path(sys.argv[1]).write_text(str(os.getpgid(0)))
while not got:
    time.sleep(0.01)
time.sleep(1.0)
print("saved after", len(got), "signal(s)", flush=True)
sys.exit(128 + got[0])
"""

DRIVER = """
import sys
from pathlib import Path
from common import run_child, stop_signals_to_children
with stop_signals_to_children():
    print("exit", run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]], Path(sys.argv[3])), flush=True)
"""


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stop_signal_reaches_the_run_once_and_is_waited_for(tmp_path, how):
    """Ctrl-C in a terminal (SIGINT to the whole foreground process group) or SIGTERM to the study
    script: the running train.py gets exactly one signal, and the script waits while it saves and
    reports its exit status. Before, subprocess.run killed the child 0.25 s after a Ctrl-C, in the
    middle of its save."""
    import os
    import signal
    import subprocess
    import time
    ready, log = tmp_path / "ready", tmp_path / "child.log"
    # the driver stands for a script in experiments/: run from there, `python -c` finds common.py in
    # the current folder as such a script finds it in its own
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, CHILD, str(ready), str(log)],
                              cwd=ROOT / "experiments", stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        t0 = time.time()
        while not (ready.exists() and ready.read_text()) and time.time() - t0 < 60:
            time.sleep(0.02)
        assert ready.exists() and ready.read_text(), "the child never started"
        # in a process group of its own, so a terminal's Ctrl-C reaches it only through the script
        assert int(ready.read_text()) != os.getpgid(driver.pid)
        if how == "ctrl-c":
            os.killpg(driver.pid, signal.SIGINT)       # what the terminal does
        else:
            os.kill(driver.pid, signal.SIGTERM)
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    sig = signal.SIGINT if how == "ctrl-c" else signal.SIGTERM
    assert driver.returncode == 0 and out.split() == ["exit", str(128 + sig)]
    assert "saved after 1 signal(s)" in log.read_text()


# A stand-in for train.py in a real study.py: it says it started (its pid in a file), writes a log line,
# and on SIGTERM writes "terminated" and exits 143 as train.py does after saving `last`.
TRAIN_STANDIN = """
import os, signal, sys, time
def stop(signum, frame):
    print("terminated", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("step 1", flush=True)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(30)
"""

# a real study.py --run A-plain-s0 in the folders of the `dirs` fixture, train.py replaced by TRAIN_STANDIN
STUDY_DRIVER = """
import importlib.util, sys
from pathlib import Path
experiments, tmp, child = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]   # run in experiments/: common
spec = importlib.util.spec_from_file_location("study", experiments / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)
import common
study.RUNS, study.RAW, study.OUT = tmp / "runs", tmp / "results" / "study", tmp / "results"
study.PROTOCOL = tmp / "protocol.md"
standin = [sys.executable, "-c", child, str(tmp / "child.pid")]
study.run_train = lambda flags, log: common.run_child(standin, log)
with common.stop_signals_to_children():
    sys.exit(study.main(["--run", "A-plain-s0", "--threads", "1"]))
"""


def wait_for(cond, what, timeout=30):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_stopped_or_killed_study_stops_its_run_and_its_minutes_count(dirs, monkeypatch, capsys, how):
    """A real study.py --run A-plain-s0 with its train.py running. A second study.py of that run is
    refused with one line, and trains nothing. Then the first is stopped: by SIGTERM, it passes the
    signal on and records the run's minutes; by SIGKILL (no handler runs), the kernel sends the run
    SIGTERM (before, the orphaned train.py wrote on in the folder of the rerun that followed) and
    the next study.py of the run adds the killed one's minutes to timings.json, up to the run's last
    log line (before, they were never recorded)."""
    import os
    import signal
    import subprocess
    log, pid_file = dirs / "runs" / "logs" / "A-plain-s0.txt", dirs / "child.pid"
    driver = subprocess.Popen([sys.executable, "-c", STUDY_DRIVER, str(ROOT / "experiments"), str(dirs),
                               TRAIN_STANDIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, cwd=ROOT / "experiments")
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the run started")
        child = int(pid_file.read_text())
        monkeypatch.setattr(study.subprocess, "Popen", popen_of(lambda cmd: pytest.fail("trained twice")))
        capsys.readouterr()
        assert study.main(["--run", "A-plain-s0", "--threads", "1"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines() == [
            f"error: study run A-plain-s0 is in use by PID {driver.pid} on host {socket.gethostname()}: wait "
            f"for it to end or stop it (it holds {dirs / 'runs' / 'logs' / 'A-plain-s0.lock'})"]
        time.sleep(1.0)                                              # a run of a second at least
        driver.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        driver.communicate(timeout=60)
        # the run got SIGTERM either way, and stopped as train.py does
        # a line of its own: the "$ command" line of the log holds the stand-in's source
        wait_for(lambda: "terminated" in log.read_text().splitlines(), "the run got SIGTERM")
        # gone, or a zombie that nobody reaps (an orphan's new parent in a container may not)
        stat = Path(f"/proc/{child}/stat")
        def gone():
            try:
                return stat.read_text().rpartition(")")[2].split()[0] == "Z"
            except FileNotFoundError:
                return True
        wait_for(gone, "the run ended")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        if pid_file.exists() and pid_file.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    timings = dirs / "results" / "study" / "timings.json"
    lock = dirs / "runs" / "logs" / "A-plain-s0.lock"
    if how == "sigterm":
        assert driver.returncode == 1 and not lock.exists()
        t = json.loads(timings.read_text())["A-plain-s0"]
        assert t["sessions"] == 1 and t["complete"] is False and t["seconds"] >= 1.0
        return
    assert driver.returncode == -signal.SIGKILL and lock.exists() and not timings.exists()
    run_for = log.stat().st_mtime - json.loads(lock.read_text().split(" ", 2)[2])["started"]

    def fake_train(cmd):
        out = Path(cmd[cmd.index("--out_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(fake_run(0.3, 0.9)))
        return 0
    monkeypatch.setattr(study.subprocess, "Popen", popen_of(fake_train))
    assert study.main(["--run", "A-plain-s0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"min of a study.py that was killed (PID {driver.pid}) added to its timings" in out
    t = json.loads(timings.read_text())["A-plain-s0"]
    assert t["sessions"] == 2 and t["complete"] and t["seconds"] >= round(run_for, 1) >= 1.0
    assert not lock.exists()


def test_without_prctl_children_start_as_before(monkeypatch, tmp_path):
    """Where prctl is absent (not Linux) the child is started without the parent-death signal, and
    otherwise as before (own session)."""
    import common
    seen = {}

    class Child:
        def __init__(self, cmd, **kw):
            seen.update(kw)

        def wait(self):
            return 0
    monkeypatch.setattr(common.subprocess, "Popen", Child)
    monkeypatch.setattr(common, "_PRCTL", None)
    assert common.run_child(["true"], tmp_path / "log.txt") == 0
    assert seen["preexec_fn"] is None and seen["start_new_session"] is True


# ---- numbers ---------------------------------------------------------------------------------------

def seeds(gp, nt):
    return {s: {"GP_drop": g, "new_task": n} for s, g, n in zip((0, 1, 2), gp, nt)}


def test_decision_rule_by_hand():
    plain = seeds([0.40, 0.38, 0.42], [0.90, 0.91, 0.89])                  # means 0.40 and 0.90
    ok, nums = study.decide(plain, seeds([0.15, 0.16, 0.14], [0.89, 0.90, 0.88]))
    assert ok is True and nums["GP_ratio"] == pytest.approx(0.15 / 0.40)
    assert nums["new_task_diff"] == pytest.approx(-0.01) and nums["seeds_done"] == 3
    ok, nums = study.decide(plain, seeds([0.25, 0.24, 0.26], [0.90, 0.91, 0.89]))      # forgets 0.25 > 0.20
    assert ok is False and not nums["GP_halved"] and nums["new_task_kept"]
    ok, nums = study.decide(plain, seeds([0.10, 0.10, 0.10], [0.85, 0.86, 0.87]))      # learns 4 points less
    assert ok is False and nums["GP_halved"] and not nums["new_task_kept"]
    # both exactly at their limits (in exact arithmetic; float means land 1e-16 on the wrong side)
    ok, nums = study.decide(seeds([0.26, 0.70, 0.60], [0.80] * 3), seeds([0.28, 0.33, 0.17], [0.78] * 3))
    assert ok is True and nums["GP_halved"] and nums["new_task_kept"]
    ok, nums = study.decide(plain, {s: v for s, v in seeds([0.1] * 3, [0.9] * 3).items() if s < 2})
    assert ok is None and nums["seeds_done"] == 2 and nums["GP_halved"]           # provisional numbers
    ok, nums = study.decide(seeds([0.0, -0.02, 0.02], [0.9] * 3), seeds([-0.1] * 3, [0.9] * 3))
    assert ok is False and not nums["plain_forgets"] and nums["GP_ratio"] is None  # nothing forgotten
    assert study.decide({}, {}) == (None, {"seeds_done": 0, "seeds_needed": 3})


def test_paired_differences():
    p = study.paired(seeds([0.40, 0.30, 0.50], [0.90, 0.80, 0.70]),
                     {s: v for s, v in seeds([0.20, 0.20, 0.20], [0.90, 0.70, 0.0]).items() if s < 2})
    assert set(p["per_seed"]) == {"0", "1"}                                     # seed 2 of guided missing
    assert p["per_seed"]["0"]["GP_drop"] == pytest.approx(-0.2) and p["per_seed"]["1"]["new_task"] == pytest.approx(-0.1)
    assert p["GP_drop"]["mean"] == pytest.approx(-0.15) and p["GP_drop"]["n"] == 2
    assert p["GP_drop"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert study.stat([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(1.4142136), "n": 2}
    assert study.stat([]) == {"mean": None, "std": None, "n": 0}


def test_recovery_and_noise_rule():
    orig = [1] * 30 + [0] * 20                       # 0.60
    final = [0] * 50                                 # 0.00: a loss far above 2 se
    with_iv = [1] * 15 + [0] * 35                    # 0.30
    r = study.recovery(orig, final, with_iv)
    assert r["loss"] == pytest.approx(0.6) and r["recovered"] == pytest.approx(0.5) and r["n"] == 50
    # a loss of 2 examples in 50 is within the noise of the paired difference
    r = study.recovery([1, 1] + [0] * 48, [0] * 50, [1] * 50)
    assert r["recovered"] is None and r["note"] == "within noise" and r["with_iv"] == 1.0
    # a trained task the final model does better than the original: a gain, not noise
    r = study.recovery([0] * 50, [1] * 40 + [0] * 10, [1] * 30 + [0] * 20)
    assert r["recovered"] is None and r["note"] == "gained, nothing lost"


# ---- the report --------------------------------------------------------------------------------------

def analysis_file(dirs, regime):
    a = {"c/original": {"antonym": [1] * 30 + [0] * 20, "capital": [1, 1] + [0] * 48, "uppercase": [0] * 50}}
    for run in (f"{regime}-plain-s0", f"{regime}-guided-s0"):
        a[f"c/{run}"] = {"antonym": {"layer": 17, "final": [0] * 50, "with_iv": [1] * 15 + [0] * 35},
                         "capital": {"layer": 17, "final": [0] * 50, "with_iv": [0] * 50},
                         "uppercase": {"layer": 17, "final": [1] * 10 + [0] * 40, "with_iv": [0] * 50}}
        a[f"d/{run}"] = [{"stage": s, "task": t, "layer": 17, "cos": c, "score": c / 2}
                         for s in range(5) for t, c in (("antonym", 0.1 * s), ("uppercase", 0.05 * s + 0.01))]
        a[f"b/{run}"] = {"antonym": {"cos": 0.2, "head_overlap": 0.25, "norm_ratio": 1.1, "aie_corr": 0.4,
                                     "score_drop": 0.3, "heads_original": [[17, 1]], "heads_final": [[3, 2]]}}
    a["b/noise_floor"] = {"antonym": {"cos": 0.6, "head_overlap": 0.5, "norm_ratio": 1.0, "aie_corr": 0.8}}
    (dirs / "results" / "study" / f"analysis_{regime}.json").write_text(json.dumps(a))


def test_report_schema_and_markdown(dirs):
    for s, gp, nt in zip(study.SEEDS, (0.38, 0.40, 0.42), (0.89, 0.90, 0.91)):
        write(dirs, f"A-plain-s{s}", fake_run(gp, nt))
        write(dirs, f"A-guided-s{s}", fake_run(gp / 4, nt - 0.01))          # forgets a quarter, learns 1 point less
    write(dirs, "A-lwf-s0", fake_run(0.1, 0.85))
    write(dirs, "B-plain-s0", fake_run(0.3, 0.8))                          # regime B: one run, undecided
    write(dirs, "B-guided-s0", fake_run(0.1, 0.8))
    analysis_file(dirs, "A")
    point = lambda lr, ep, acr: {"lr": lr, "epochs": ep, "new_task": {"a": 0.9, "b": acr}, "seconds": 600 * ep}
    (dirs / "results" / "lora_pilot.json").write_text(json.dumps(
        {"lr0.0003-ep4": point(3e-4, 4, 0.5), "lr0.0001-ep4": point(1e-4, 4, 0.25), "lr0.0003-ep16": point(3e-4, 16, 0.75),
         "choice": {"lr": 3e-4, "epochs": 16, "all_learned": False, "epochs_tried": [4, 16]}}))
    msg = study.report()
    assert "(9 of 36 runs" in msg
    out = json.loads((dirs / "results" / "study.json").read_text())
    assert set(out["regimes"]) == {"A", "B"}
    for regime in ("A", "B"):
        s = out["regimes"][regime]
        assert {"methods", "paired", "decision", "decision_numbers", "learnability", "findings"} <= set(s)
        assert set(s["findings"]) == {"a", "b", "c", "d"}
        for m, v in s["methods"].items():
            assert set(v) == SIX and all(set(v[k]) == {"mean", "std", "n"} for k in SIX), m
    A, B = out["regimes"]["A"], out["regimes"]["B"]
    assert set(A["methods"]) == {"plain", "guided", "lwf"} and set(B["methods"]) == {"plain", "guided"}
    assert A["methods"]["plain"]["GP_drop"] == {"mean": pytest.approx(0.40), "std": pytest.approx(0.02), "n": 3}
    assert A["methods"]["lwf"]["new_task"] == {"mean": pytest.approx(0.85), "std": 0.0, "n": 1}
    assert A["decision"] is True and A["decision_numbers"]["GP_ratio"] == pytest.approx(0.25)
    assert B["decision"] is None and B["decision_numbers"]["seeds_done"] == 1
    assert A["paired"]["new_task"]["mean"] == pytest.approx(-0.01) and len(A["paired"]["per_seed"]) == 3
    assert A["learnability"]["a"] == {"mean": pytest.approx(0.90), "std": pytest.approx(0.01), "n": 3}
    # top level: regime A in the earlier study's schema
    assert out["methods"]["plain"]["n_seeds"] == 3 and out["methods"]["plain"]["GP_drop"]["mean"] == pytest.approx(0.40)
    assert out["methods"]["plain"]["instr_lp_change"]["mean"] == pytest.approx(4.0)
    # findings: (a) from the stage reports; (b)-(d) from analysis_A.json; none yet for B
    fa = A["findings"]["a"]["A-plain-s0"]
    assert fa["instruction_logprob"] == [-9.0, -5, -5, -5, -5] and fa["knowledge_logprob"] == [-3.0] * 5
    c = A["findings"]["c"]["runs"]["A-plain-s0"]
    assert c["antonym"]["recovered"] == pytest.approx(0.5) and c["capital"]["recovered"] is None
    assert c["uppercase"]["loss"] < 0 and c["uppercase"]["recovered"] is None
    assert set(A["findings"]["c"]["pooled_general"]["A-plain-s0"]) >= {"recovered", "loss", "se"}
    assert A["findings"]["d"]["runs"]["A-guided-s0"]["spearman"] == pytest.approx(1.0)
    assert A["findings"]["d"]["runs"]["A-guided-s0"]["n"] == 10
    b = A["findings"]["b"]
    assert b["runs"]["A-plain-s0"]["antonym"]["score_drop"] == 0.3 and b["means"]["noise_floor"]["cos"] == 0.6
    assert B["findings"]["a"] is not None and all(B["findings"][k] is None for k in "bcd")
    md = (dirs / "results" / "study.md").read_text()
    assert md.startswith("# Protocol of the study (pre-registered)\n\nRule: halve it.\n")
    assert "pre-registered in commit abc1234" in md
    assert "**Decision, regime A: true.**" in md
    assert "**Decision, regime B: not yet decided: 1 of 3 seeds**" in md
    assert "| plain | 3 | +40.0 ± 2.0 |" in md                                  # points, not fractions
    assert "| A-plain-s0 | capital | 4.0 | 0.0 | 0.0 |" in md and "within noise" in md
    assert "| A-plain-s0 | antonym | 60.0 | 0.0 | 30.0 | +60.0 ± 7.0 | 50% |" in md
    # regime B shows the LoRA pilot's grid (sorted by lr, epochs) and says that no count learned every task
    assert B["pilot"]["choice"]["epochs"] == 16 and A["pilot"] is None
    assert "| 0.0001 | 4 | 90.0 | 25.0 | 40 |\n| 0.0003 | 4 | 90.0 | 50.0 | 40 |\n| 0.0003 | 16 | 90.0 | 75.0 | 160 |" in md
    assert "Chosen: lr 0.0003, 16 epochs; no epoch count tried (4, 16) reaches 80 on every task" in md
    assert md.index("LoRA pilot") > md.index("## Regime B")


def test_decision_false_and_incomplete_in_report(dirs):
    for s in study.SEEDS:
        write(dirs, f"B-plain-s{s}", fake_run(0.4, 0.9))
        write(dirs, f"B-guided-s{s}", fake_run(0.1, 0.8))                  # forgets less, learns 10 points less
    write(dirs, "A-plain-s0", fake_run(0.4, 0.9))
    study.report()
    out = json.loads((dirs / "results" / "study.json").read_text())
    assert out["regimes"]["B"]["decision"] is False and out["regimes"]["A"]["decision"] is None
    assert out["regimes"]["A"]["decision_numbers"] == {"seeds_done": 0, "seeds_needed": 3}
    md = (dirs / "results" / "study.md").read_text()
    assert "**Decision, regime B: false.**" in md and "(not met)." in md
    assert "regime A: not yet decided: 0 of 3 seeds" in md


def test_report_with_nothing_finished(dirs):
    assert "(0 of 36 runs" in study.report()
    out = json.loads((dirs / "results" / "study.json").read_text())
    assert out["regimes"]["A"]["methods"] == {} and out["regimes"]["A"]["decision"] is None
    assert all(v is None for v in out["regimes"]["B"]["findings"].values())


def test_study_md_is_written_atomically(dirs, monkeypatch):
    """A full disk while study.md is written: the previous report stays whole and no temporary is
    left (study.md goes through ivft.files.write_atomic; a plain write_text left half a file)."""
    import errno
    import pathlib
    md = dirs / "results" / "study.md"
    md.write_text("the previous report\n")
    real_bytes, real_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def full_disk(real):
        def write(self, data, *a, **kw):
            if self.name == "study.md" or self.name.startswith(".study.md.tmp"):
                real(self, data[: len(data) // 2], *a, **kw)        # half of it fits
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data, *a, **kw)
        return write
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk(real_bytes))
    monkeypatch.setattr(pathlib.Path, "write_text", full_disk(real_text))
    with pytest.raises(OSError, match="No space left"):
        study.report()
    monkeypatch.undo()
    assert md.read_text() == "the previous report\n"
    assert sorted(p.name for p in md.parent.iterdir()) == ["study", "study.json", "study.md"]   # no temporary


# ---- the analyses, end to end on a tiny random model -------------------------------------------------

def test_analysis_on_a_toy(dirs, monkeypatch):
    """analysis() with the model loader, the tasks and the IV settings replaced by toys: every item
    lands in analysis_A.json, a second call redoes nothing, and the report reads it."""
    from toys import PAIRS, TOK, char_model
    from ivft import tasks as T
    from ivft.tasks import Example, Task

    def task(name, metric):
        ex = [Example(instruction="Say the opposite.", input=a, output=b) for a, b in PAIRS]
        return Task(name=name, kind="generate", metric=metric, train=ex[:10], test=ex[10:])

    toy = {"opp": task("opp", "exact_match"), "gen": task("gen", "reply_contains")}
    monkeypatch.setattr(T, "default_sequence", lambda: ["opp"])
    monkeypatch.setattr(T, "general_suite", lambda: ["gen"])
    monkeypatch.setattr(T, "load_task", lambda n, *a, **k: toy[n])
    loads = []

    def load_model(path=None, **kw):
        loads.append(path)
        return char_model(seed=0 if path is None else 1 + len(loads)), TOK

    monkeypatch.setattr(study, "load_model", load_model)
    monkeypatch.setattr(study, "ROOT", dirs)
    monkeypatch.setattr(study, "IV_SETTINGS", {"n_clean": 4, "n_corrupt": 4, "batch_size": 4, "layer": 2})
    monkeypatch.setattr(study, "N_ANALYSIS", 3)
    stage = {"tasks": {"opp": {"exact_match": 0.5}, "gen": {"reply_contains": 0.25}},
             "primary": {"opp": "exact_match", "gen": "reply_contains"}}
    for run in ("A-plain-s0", "A-guided-s0"):
        r = {"stages": [stage, stage], "cl": {"train_tasks": ["opp"]}}
        write(dirs, run, r)
        (dirs / "runs" / run / "stage-1").mkdir(parents=True)
    assert study.analysis("A", threads=1, say=lambda m: None) == "analysis-A: done"
    a = json.loads((dirs / "results" / "study" / "analysis_A.json").read_text())
    assert set(a) == set(study.analysis_items("A"))
    assert set(a["c/original"]) == {"opp", "gen"} and len(a["c/original"]["gen"]) == 3
    assert all(x in (0, 1) for x in a["c/A-plain-s0"]["opp"]["with_iv"]) and a["c/A-plain-s0"]["opp"]["layer"] == 2
    assert [(r["stage"], r["task"]) for r in a["d/A-guided-s0"]] == [(0, "opp"), (0, "gen"), (1, "opp"), (1, "gen")]
    assert a["d/A-guided-s0"][1]["score"] == 0.25 and -1 <= a["d/A-guided-s0"][0]["cos"] <= 1
    assert set(a["b/A-plain-s0"]) == {"gen"} and a["b/A-plain-s0"]["gen"]["score_drop"] == 0.0
    assert a["b/noise_floor"]["gen"]["head_overlap"] <= 1
    # (d) reads the hidden state after the IV's own layer (2 here), at the last prompt token
    import torch
    from ivft.ivfile import iv_filename, model_tag, read_iv
    from ivft.ivprompts import chat_prompt, score_prompts
    iv = read_iv(dirs / "ivs" / model_tag(None) / iv_filename(toy["gen"]))
    assert iv["layer"] == 2
    h = score_prompts(char_model(seed=0), [chat_prompt(TOK, ex) for ex in toy["gen"].test[:3]],
                      record_resid=True)["resid"][:, 2]
    want = float(torch.nn.functional.cosine_similarity(h, iv["iv"][None].float(), dim=-1).mean())
    assert a["d/A-plain-s0"][1]["cos"] == pytest.approx(want, abs=1e-6)
    # a second call loads the original model and its cached IVs, and recomputes nothing
    import extract_iv
    from ivft import ivcheck, ivprompts

    def boom(*a, **k):
        raise AssertionError("recomputed")

    for mod, name in ((ivcheck, "replies"), (ivprompts, "score_prompts"), (study, "score_prompts"),
                      (extract_iv, "extract_iv")):
        monkeypatch.setattr(mod, name, boom)
    n_loads = len(loads)
    assert study.analysis("A", threads=1, say=lambda m: None) == "analysis-A: done" and len(loads) == n_loads + 1
    assert study.part_status("analysis-A")[0] == "done"


def test_learnability_summary(tmp_path, monkeypatch):
    """experiments/learnability.py with train.py replaced by a stub that writes a results.json:
    the summary keeps before/after from the CL matrix, and a finished task is not run again."""
    spec = importlib.util.spec_from_file_location("learnability", ROOT / "experiments" / "learnability.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    monkeypatch.setattr(lm, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(lm, "OUT", tmp_path / "learnability.json")
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out_dir") + 1])
        (out / "stage-1").mkdir(parents=True)          # train.py makes its out_dir itself
        (out / "results.json").write_text(json.dumps({"cl": {"R": [[0.1], [0.85]]}}))
        return 0

    import subprocess
    monkeypatch.setattr(subprocess, "Popen", popen_of(fake_run))     # what experiments/common.run_child calls
    assert lm.main(["--tasks", "uppercase,acronym", "--steps", "7"]) == 0
    summary = json.loads((tmp_path / "learnability.json").read_text())
    assert summary["acronym@7"]["before"] == 0.1 and summary["acronym@7"]["after"] == 0.85
    assert len(calls) == 2 and "--max_steps" in calls[0] and calls[0][calls[0].index("--max_steps") + 1] == "7"
    assert not (tmp_path / "runs" / "acronym@7" / "stage-1").exists()     # checkpoints removed
    assert lm.main(["--tasks", "acronym", "--steps", "7"]) == 0 and len(calls) == 2   # skipped


def test_regime_b_waits_for_the_pilots_choice(dirs, monkeypatch):
    # regime B runs only with the lr and epochs the LoRA pilot chose on the dev split
    import train
    monkeypatch.setitem(train.PRESETS["regime"], "lora", {**train.PRESETS["regime"]["lora"], "lr": 3e-4, "epochs": 4.0})
    assert "has not chosen" in study.lora_unsettled()
    pilot = dirs / "results" / "lora_pilot.json"
    pilot.write_text(json.dumps({"choice": {"lr": 1e-4, "epochs": 4, "all_learned": True}}))
    assert "the pilot chose lr 0.0001" in study.lora_unsettled()
    assert study.run_part("B-s0a", workers=1, threads=1) is False and not (dirs / "runs" / "B-plain-s0").exists()
    pilot.write_text(json.dumps({"choice": {"lr": 3e-4, "epochs": 4, "all_learned": False, "epochs_tried": [2, 4]}}))
    assert "have not all been tried" in study.lora_unsettled()     # amendment 1: more epochs first
    pilot.write_text(json.dumps({"choice": {"lr": 3e-4, "epochs": 4, "all_learned": True}}))
    assert study.lora_unsettled() is None
    pilot.write_text(json.dumps({"choice": {"lr": 3e-4, "epochs": 4, "all_learned": False, "epochs_tried": [2, 4, 8, 16]}}))
    assert study.lora_unsettled() is None                          # nothing learns every task: the largest tried
