"""What the experiment scripts share: one train.py run as a child process, its output appended to a
log file (the run's own folder holds only what train.py writes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_train(flags: list[str], log_path: Path) -> int:
    """python train.py FLAGS from the project root -> its exit status."""
    cmd = [sys.executable, str(ROOT / "train.py"), *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
