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
