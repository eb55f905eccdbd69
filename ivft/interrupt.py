"""Ctrl-C and SIGTERM during a task, in one context manager, so that train.py's step loop holds
only the step.

While the steps run, a first Ctrl-C (or SIGTERM) only asks to stop: the step in flight finishes,
train.py sees `stop_requested`, raises KeyboardInterrupt, and on the way out the guard saves the
resumable checkpoint (out_dir/last) at the last finished step, with the RNG as it was after it. A
second Ctrl-C interrupts at once; inside an optimizer update that would leave half-updated weights,
so then nothing is saved and the last checkpoint stays the newest. During the evaluation after the
task a Ctrl-C interrupts at once and the trained task is saved (step = total)."""
from __future__ import annotations

import contextlib

from ivft.runtime import StopFlag


@contextlib.contextmanager
def deferred_stop():
    """Around a write that must not be cut (a stage checkpoint): a Ctrl-C or SIGTERM inside is acted on
    when the block has finished (a second one still aborts at once)."""
    with StopFlag() as stop:
        yield
    if stop.requested:
        raise KeyboardInterrupt


class TaskGuard:
    """with TaskGuard(save, log, f"task {j + 1}", total, start_step) as guard: ... -> save(step, rng)
    writes the checkpoint, log(text) reports; rng_state() is the RNG to save (ivft.checkpoint.rng_state)."""

    def __init__(self, save, log, label: str, total: int, step: int, rng_state):
        self.save, self.log, self.label, self.total, self.rng_state = save, log, label, total, rng_state
        self.step, self.rng = step, rng_state()      # the last finished step and the RNG right after it
        self._flag, self._in_update, self._evaluating = StopFlag(), False, False

    def __enter__(self):
        self._flag.__enter__()
        return self

    @property
    def stop_requested(self) -> bool:
        return self._flag.requested

    @contextlib.contextmanager
    def update(self):
        """Around the optimizer update: a second Ctrl-C in here saves nothing."""
        self._in_update = True
        yield
        self._in_update = False

    def step_done(self, step: int):
        self.step, self.rng = step, self.rng_state()

    def evaluating(self):
        """From here on (the task's evaluation) Ctrl-C interrupts at once, as outside training."""
        self._flag.__exit__(None, None, None)
        self._evaluating = True

    def __exit__(self, exc_type, exc, tb):
        self._flag.__exit__(None, None, None)
        if exc_type is not KeyboardInterrupt:
            return False
        if self._in_update:
            self.log("interrupted inside an optimizer update: nothing saved, the last checkpoint is kept")
            return False
        path = self.save(self.step, self.rng)
        self.log(f"interrupted {'while evaluating' if self._evaluating else 'at'} {self.label} step {self.step}/"
                 f"{self.total}: saved {path}; rerun the same command with --resume to continue")
        return False
