"""Tests of ivft/files.py with real processes: the run-folder lock (a second live holder is refused
with one line naming its PID and host; a holder killed by SIGKILL blocks nobody, and what it left
is readable; release leaves nothing behind), and the clean-up of a swap cut between its two renames
whose pid has since been given to another live process."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ivft import files
from ivft.errors import FolderInUse, TrainError
from ivft.files import RunLock

HOLDER = """
import sys, time
from ivft.files import RunLock
RunLock(sys.argv[1], note="train.py").acquire()
print("holding", flush=True)
time.sleep(120)
"""


def test_run_lock_refuses_a_live_holder_not_a_killed_one(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        assert (run / "run.lock").read_text() == f"{holder.pid} {socket.gethostname()} train.py\n"
        with pytest.raises(FolderInUse) as e:
            RunLock(run).acquire()
        assert isinstance(e.value, TrainError)         # train.py's one line and exit status 2
        assert str(e.value) == (f"{run} is in use by PID {holder.pid} on host {socket.gethostname()}: "
                                f"wait for it to end or stop it (it holds {run / 'run.lock'})")
        holder.send_signal(signal.SIGKILL)           # no handler runs: the file stays, the flock goes
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (run / "run.lock").is_file()
    with RunLock(run) as lock:
        assert lock.found == f"{holder.pid} {socket.gethostname()} train.py"        # what the dead one left
        assert (run / "run.lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(FolderInUse, match=f"in use by PID {os.getpid()} "):
            RunLock(run).acquire()                   # a second hold in the same process is refused too
    assert list(run.iterdir()) == []                 # released: the lock file is gone, the folder stays
    fresh = tmp_path / "new" / "run"
    with RunLock(fresh):
        assert fresh.is_dir()
    assert not (tmp_path / "new").exists()           # the folders the lock had to make go with it


def test_run_lock_on_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TrainError, match=f"^{tmp_path / 'file' / 'run' / 'run.lock'}: cannot write"):
        RunLock(tmp_path / "file" / "run").acquire()


def cut_swap(folder, monkeypatch):
    """replace_dir(new, folder/stage-2) cut between its two renames, as a SIGKILL would: the old
    copy renamed away, the new one never put in -> the swapped-out copy's path."""
    dst, new = folder / "stage-2", folder / ".stage-2.tmp-new"
    dst.mkdir()
    (dst / "weights").write_text("the only complete copy")
    new.mkdir()
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(new, dst)
    monkeypatch.undo()
    new.rmdir()
    [old] = [p for p in folder.iterdir() if ".old-" in p.name]
    return old


def test_cut_swap_is_restored_when_its_pid_now_belongs_to_another_process(tmp_path, monkeypatch):
    old = cut_swap(tmp_path, monkeypatch)
    assert files.clean_leftovers(tmp_path) == [] and old.exists()      # its writer (us) is alive: kept
    # the writer died and the kernel gave its pid to a new, live process
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        reused = old.with_name(old.name.replace(f".old-{os.getpid()}", f".old-{other.pid}", 1))
        old.rename(reused)
        time.sleep(0.1)
        notes = files.clean_leftovers(tmp_path)
    finally:
        other.kill()
        other.wait()
    assert notes == [f"restored {tmp_path / 'stage-2'} from an interrupted swap ({reused.name})"]
    assert (tmp_path / "stage-2" / "weights").read_text() == "the only complete copy" and not reused.exists()


def test_leftover_names_carry_the_owner(tmp_path):
    tag = files.owner_tag()
    assert tag.startswith(f"{os.getpid()}-S") and len(tag.split("-S")[1]) == 8
    assert files.temp_prefix("results.json") == f".results.json.tmp-{tag}-"
    (tmp_path / ".stage-1.old-999999999-Sdeadbeef").mkdir()                  # a dead writer's swap
    (tmp_path / f".log.txt.tmp-{tag}-abcdefgh").write_text("a live writer's")
    assert files.clean_leftovers(tmp_path) == [f"restored {tmp_path / 'stage-1'} from an interrupted swap "
                                               "(.stage-1.old-999999999-Sdeadbeef)"]
    assert (tmp_path / f".log.txt.tmp-{tag}-abcdefgh").exists()


# names a user may give their own files that look like leftovers but were not made by this code
# (no pid, a bare pid, no start token, a token of another form, a tail where none belongs)
USER_NAMES = [".report.tmp-final", ".settings.old-2023", ".last.old-999999999", ".stage-1.tmp-legacy",
              ".results.json.tmp-999999999", ".x.tmp-anything", ".x.old-anything", ".y.tmp-", ".z.old-",
              ".last.old-999999999-Sdeadbeef-copy", ".log.txt.tmp-999999999-S12-abc", ".a.tmp-1-SDEADBEEF-x"]


def test_clean_leftovers_never_touches_names_it_did_not_make(tmp_path):
    for i, name in enumerate(USER_NAMES):
        (tmp_path / name).write_text(f"user file {i}")
    assert files.clean_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(USER_NAMES)
    assert all((tmp_path / n).read_text() == f"user file {i}" for i, n in enumerate(USER_NAMES))
    # `ours` keeps even a name of this code's form when its target is not the caller's
    (tmp_path / ".mine.old-999999999-Sdeadbeef").mkdir()
    assert files.clean_leftovers(tmp_path, ours=lambda name: name == "last") == []
    assert (tmp_path / ".mine.old-999999999-Sdeadbeef").is_dir() and not (tmp_path / "mine").exists()
