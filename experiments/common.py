"""What the experiment scripts share: one train.py run as a child process, its output appended to a
log file (the run's own folder holds only what train.py writes), stop signals passed on to it, and
its stop when the script itself dies; a run's results.json summarised, and the mean and std over
seeds; the IV settings of the analyses (study.py's, which reinject.py reuses so that its IV files
serve)."""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ivft.runtime import STOP_SIGNALS, on_main_thread  # train.py's own stop signals

ROOT = Path(__file__).resolve().parent.parent
# IV extraction in the analyses: extract_iv's defaults, with train.py's prompt counts (the settings
# of the training IVs, so the training tasks' IVs are train.py's own cached files)
IV_SETTINGS = {"method": "exact", "n_clean": 50, "n_corrupt": 25}
_LIVE: set = set()          # the running children; set.add/discard/copy are atomic, so no lock (a lock
                            # taken in a signal handler can deadlock against the thread it interrupted)
STOPPING = threading.Event()  # set by a stop signal: the scripts start no further run


def _prctl():
    """libc's prctl, resolved here in the parent so that the child, between fork and exec, only calls
    it; None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


PR_SET_PDEATHSIG = 1            # <linux/prctl.h>
_PRCTL = _prctl()


def die_with_parent():
    """A Popen preexec_fn that has the kernel send the child SIGTERM when this process dies, even by
    SIGKILL (Linux PR_SET_PDEATHSIG; kept across exec) -> None where prctl is absent: there an
    orphaned train.py runs on, and only its run-folder lock keeps a second one out of its folder.
    The signal comes when the *thread* that started the child ends; run_child's thread waits for
    the child, so that is the script's death."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec():
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:      # the script died before prctl: no signal will come
            os._exit(128 + signal.SIGTERM)
    return preexec


def run_child(cmd: list[str], log_path: Path) -> int:
    """Run cmd from the project root, output appended to log_path -> its exit status.

    The child runs in its own session, so a Ctrl-C in the terminal reaches only this script, which
    passes it on exactly once (see stop_signals_to_children). Sharing the terminal's process group
    instead, the child would get the Ctrl-C directly while this script, interrupted, killed it before
    it had saved its checkpoint. If this script is killed outright (SIGKILL: no handler runs), the
    child gets SIGTERM from the kernel (die_with_parent), saves its checkpoint and exits as on any
    SIGTERM, instead of writing on in its folder beside the rerun that would follow."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=die_with_parent(), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _LIVE.add(child)
        if STOPPING.is_set():      # the signal came while it was starting, before it was in _LIVE
            child.send_signal(signal.SIGTERM)
        try:
            return child.wait()
        finally:
            _LIVE.discard(child)


def run_train(flags: list[str], log_path: Path) -> int:
    """python train.py FLAGS from the project root -> its exit status (130/143 when a stop signal
    cut it; it has then saved `last`, and --resume goes on from there)."""
    return run_child([sys.executable, str(ROOT / "train.py"), *flags], log_path)


@contextlib.contextmanager
def stop_signals_to_children():
    """While open (main thread only): SIGINT or SIGTERM to this script goes to every running child
    instead, once per signal, and the script waits for them to save and exit; it sees their exit
    statuses, and STOPPING tells it to start no further run. train.py stops after its current step
    on the first signal and at once on a second. With no child running, the signals act as usual
    (KeyboardInterrupt, or exit 128 + SIGTERM)."""
    if not on_main_thread():          # signal handlers can only be set there
        yield
        return

    def forward(signum, frame):
        STOPPING.set()
        children = _LIVE.copy()
        if not children:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                c.send_signal(signum)
        print(f"\n{signal.Signals(signum).name}: passed to {len(children)} train.py run(s), which save a checkpoint "
              "and stop; the same command resumes them", file=sys.stderr, flush=True)

    old = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# A finished run's numbers, and statistics over seeds

def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def stat(xs) -> dict:
    """{"mean", "std", "n"} over the values that are not None (std over seeds, n - 1; 0 for one)."""
    xs = [x for x in xs if x is not None]
    m, sd = mean_std(xs)
    return {"mean": m, "std": sd, "n": len(xs)}


def summarise(r: dict) -> dict:
    cl = r["cl"]
    R, n = cl["R"], len(cl["train_tasks"])
    g = cl.get("general", {})
    delta = lambda k: g[k][-1] - g[k][0] if g.get(k) else None     # final stage - original model
    return {"AP": cl["AP"], "BWT": cl["BWT"], "FWT": cl["FWT"], "GP_drop": cl["GP_drop"], "IP_drop": cl["IP_drop"],
            "new_task": sum(R[j + 1][j] for j in range(n)) / n,
            "instr_lp_change": delta("instruction_logprob"), "knowl_lp_change": delta("knowledge_logprob"),
            "choice_change": delta("choice_accuracy"), "train_tasks": cl["train_tasks"],
            "GP": cl["GP"], "IP": cl["IP"], "general": g, "R": R}
