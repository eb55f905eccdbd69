"""Tests of the reliability guarantees of docs/reliability.md that are not a single module's: a user's
files in a run folder, what "finished" means, the fingerprints caches and --resume key on, and bad
input refused at the door in one line. Runs use test_train.py's tiny model and tasks (a second each)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ivft import checkpoint as ckpt
from ivft import files
from test_train import Interrupt, base_args, env, expect_exit, run_main, tree_digest  # noqa: F401 (env: fixture)


# ---- item 7: a run without a general suite ends with its summary, not a TypeError -----------------

@pytest.mark.parametrize("spec", ["none", "", ",", "NONE"])
def test_a_run_without_a_general_suite_ends_cleanly(env, tmp_path, capsys, spec):
    out = tmp_path / "nogen"
    res = run_main([*base_args(env, out, "--eval_n", "2", "--eval_k_shot", "0"), "--general", spec])
    assert res["cl"]["GP"] == [None, None, None]
    assert "general suite: none" in (out / "log.txt").read_text()


# ---- item 1: a user's files are never touched ----------------------------------------------------

def snapshot(path: Path) -> dict:
    """Every name under path (folders too) with its content's digest: what must not change."""
    return {str(p.relative_to(path)): ("dir" if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def plant_user_files(folder: Path) -> list[str]:
    """A user's own files with every leftover-like name, plus names of this code's own form (a dead
    writer's, as a clean-up would take them) that are in a folder which is not a run's."""
    from test_files import USER_NAMES
    names = [*USER_NAMES, ".last.old-999999999-Sdeadbeef", ".log.txt.tmp-999999999-Sdeadbeef-abc12345"]
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        if name.startswith((".last.", ".stage-")):
            (folder / name).mkdir()
            (folder / name / "draft.txt").write_text(f"user folder {i}")
        else:
            (folder / name).write_text(f"user file {i}")
    return names


def test_user_files_with_leftover_like_names_are_never_touched(env, tmp_path, capsys):
    # the example, and every other leftover-like name, in a folder that is not a run's
    user = tmp_path / "v"
    plant_user_files(user)
    before = snapshot(user)
    for extra in ([], ["--overwrite"], ["--resume"]):
        msg = expect_exit(base_args(env, user, *extra), capsys)
        assert "not a run's (.a.tmp-1-SDEADBEEF-x, " in msg and "9 more" in msg, msg
        assert snapshot(user) == before
    # the same names inside a run's own folder: still someone else's, refused, nothing touched
    run = tmp_path / "run"
    run_main(base_args(env, run))
    for name in ("summary.png", "stage-2"):      # a finished run's folder as a user might tidy it
        shutil.rmtree(run / name, ignore_errors=True)
    (run / ".report.tmp-final").write_text("draft")
    (run / ".settings.old-2023").write_text("settings")
    (run / ".last.old-2023").mkdir()
    before = snapshot(run)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert ".last.old-2023" in expect_exit(base_args(env, run, *extra), capsys)
        assert snapshot(run) == before
