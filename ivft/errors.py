"""Every error the project raises on bad input, in one module that imports nothing from the project,
so that any module can import it without an import circle.

Each message is one line naming the file, field or flag to change. A TrainError (and its subclasses)
is what runtime.run_cli prints as that line with an exit status (2 bad input, 3 a diverged loss);
LoadError and TaskError are ValueErrors that their callers report or wrap."""


class TrainError(Exception):
    """Bad input or an unusable checkpoint: reported as one line, exit status 2."""
    exit_code = 2


class Diverged(TrainError):
    """The loss became NaN/inf: nothing is saved, the last good checkpoint is kept. Exit status 3."""
    exit_code = 3


class FolderInUse(TrainError):
    """A files.RunLock that another live process holds: one line, exit status 2."""


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class TaskError(ValueError):
    """A task name or task file that cannot be loaded; the message names it."""


class ExtractError(TrainError, ValueError):
    """Bad input (task, settings, IV file): the message is one line that says what to change (a
    TrainError too, so that train.py reports it as its own: one line, exit status 2)."""


class StageCacheError(TrainError, ValueError):
    """A --stage0_cache file that cannot be read or written: one line naming it (train.py's exit 2)."""
