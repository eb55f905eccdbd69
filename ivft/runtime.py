"""What a training run needs around its loop: exit statuses for its errors (ivft.errors), the log,
and stopping cleanly on Ctrl-C / SIGTERM."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from ivft.errors import TrainError
from ivft.files import write_json_atomic
from ivft.report import fmt_score, plot_summary, run_summary


# ---------------------------------------------------------------------------------------------
# Logging: one line per --log_every steps, appended to out_dir/log.txt and echoed above the
# progress bar; optional wandb behind a flag, imported only when asked for

class Logger:
    """enabled: this process logs (rank 0). wandb_project: also log there (the run's settings are
    sent as its config)."""

    def __init__(self, out_dir: Path, enabled: bool, wandb_project: str | None = None, settings: dict | None = None):
        self.enabled = enabled
        self.file = Path(out_dir) / "log.txt"
        self.wandb = None
        if enabled and wandb_project:
            try:
                import wandb       # optional, not a dependency: only --wandb needs it
            except ImportError:
                raise TrainError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=settings, dir=str(out_dir))

    def line(self, text: str, echo: bool = True):
        if not self.enabled:
            return
        try:
            with open(self.file, "a") as f:
                f.write(text + "\n")
        except OSError as e:
            raise TrainError(f"{self.file}: cannot write ({e.strerror or e})") from None
        if echo:
            tqdm.write(text)      # above the progress bar, not through it

    def config(self, settings: dict, notes=()):
        """The resolved flags (printed, and as JSON in the log), then a line per note."""
        print("config:\n" + "\n".join(f"  {k} = {v}" for k, v in settings.items()))
        self.line(f"config: {json.dumps(settings, sort_keys=True)}", echo=False)
        for note in notes:
            self.line(note)

    def final(self, results: dict, out_dir: Path):
        """A run's last lines: its metrics, what it learned and forgot in plain words (report.run_summary)
        and, where matplotlib is installed, that as a picture in out_dir/summary.png."""
        if not self.enabled:
            return
        metrics, cl = results["metrics"], results.get("cl")
        if metrics:
            self.line("final: " + "  ".join(f"{k} {v:+.4f}" for k, v in metrics.items() if isinstance(v, (int, float))))
        if cl:
            for text in run_summary(cl, results["config"].get("preset", "")):
                self.line(text)
            try:
                png = plot_summary(cl, Path(out_dir) / "summary.png", title=f"{results['config'].get('preset')}: "
                                   f"AP {fmt_score(cl['AP'])}, general-suite drop {fmt_score(cl.get('GP_drop'))}")
            except OSError as e:
                raise TrainError(f"{Path(out_dir) / 'summary.png'}: cannot write ({e.strerror or e})") from None
            if png:
                self.line(f"plot: {png}")
        self.line(f"done: {Path(out_dir) / 'results.json'}")

    def step(self, where: str, step: int, total: int, loss: float, parts: dict, alpha: float, lr: float,
             gnorm: float, tok_s: float, dt: float, task: int = 0, shares: dict | None = None):
        """The one line per --log_every optimizer steps (and the same numbers to wandb). parts: the
        loss's named terms as they enter the total (weights included), whatever the loss returns;
        shares: each term's gradient norm over the cross-entropy's (dist.grad_shares)."""
        terms = "".join(f" {k} {float(v):.4f}" for k, v in parts.items())
        if shares:
            terms += " | grad share" + "".join(f" {k} {v:.3f}" for k, v in shares.items())
        self.line(f"{where} | step {step}/{total} | loss {loss:.4f}{terms} | "
                  f"alpha {alpha:.3f} | lr {lr:.2e} | gnorm {gnorm:.3f} | {tok_s:.0f} tok/s | dt {dt:.2f}s | "
                  f"eta {fmt_time(dt * (total - step))}")
        if self.wandb is not None:
            self.wandb.log({"loss": loss, **parts, **{f"share_{k}": v for k, v in (shares or {}).items()}, "lr": lr,
                            "alpha": alpha, "grad_norm": gnorm, "task": task}, step=step)


def write_json(path, obj):
    """results.json and friends, atomically; a failure is one line naming the file."""
    try:
        write_json_atomic(path, obj)
    except OSError as e:
        raise TrainError(str(e)) from None


def code_version() -> dict:
    """The code a run ran on: the git commit and a short hash of the uncommitted changes to its
    Python files ("" when clean); None values outside a git checkout. Recorded in train_config.json."""
    root = Path(__file__).resolve().parents[1]

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    commit, diff = git("rev-parse", "HEAD"), git("diff", "HEAD", "--", "*.py")     # the code, not the docs
    return {"commit": commit.decode().strip() if commit else None,
            "diff": hashlib.sha1(diff).hexdigest()[:12] if diff else ("" if diff is not None else None)}


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# Stopping. Inside the training loop the first Ctrl-C asks the loop to stop after the current
# optimizer step and save; a second one interrupts at once (the last checkpoint is then kept).
# SIGTERM (what job schedulers send before a kill) is handled exactly like Ctrl-C.

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))
TERMINATED = {"by": None}     # the signal that stopped the run (exit_status turns it into the status)


def on_main_thread() -> bool:
    # signal handlers can only be set there (tests run train() in threads too)
    return threading.current_thread() is threading.main_thread()


class StopFlag:
    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if on_main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        TERMINATED["by"] = signum
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _terminate(signum, frame):
    # outside the training loop (loading, evaluation) SIGTERM interrupts like Ctrl-C, so that the
    # code that saves on KeyboardInterrupt runs for it too
    TERMINATED["by"] = signum
    raise KeyboardInterrupt


def run_cli(fn, *args, **kw):
    """Call fn and turn our errors into one-line messages and exit statuses: 2 bad input, 3 a
    diverged loss, 130 after Ctrl-C, 143 after SIGTERM. The process group of torchrun is closed
    before returning."""
    TERMINATED["by"] = None
    old = signal.signal(signal.SIGTERM, _terminate) if hasattr(signal, "SIGTERM") and on_main_thread() else None
    try:
        return fn(*args, **kw)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
    except KeyboardInterrupt:
        sig = TERMINATED["by"] or signal.SIGINT
        print("terminated" if sig != signal.SIGINT else "interrupted", file=sys.stderr)
        raise SystemExit(128 + int(sig))
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        # a process group left to the interpreter's exit can abort there ("terminate called without
        # an active exception" from gloo's threads): close it while everything is still alive
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
