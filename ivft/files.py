"""Files that are never half-written: one atomic writer for every file the project writes, the
swap that puts a finished directory in place, the clean-up of what a killed writer left, and the
lock that keeps a second writer out of a run folder.

Every temporary is named `.<target>.tmp-<owner>-<random>` (a swapped-out directory
`.<target>.old-<owner>`), where <owner> is `<pid>-S<token>`: the token fingerprints the process's
start (owner_tag), so a later run tells a crashed writer's leftovers from a live one's even when the
pid has since been given to another process (clean_leftovers). Only names of exactly this form are
ever taken for leftovers: a user's `.draft.tmp-final` or `.notes.old-2023` is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

from ivft.errors import FolderInUse, TrainError


def chmod_ordinary(path) -> None:
    """The permissions a plain mkdir / open would give (umask applied): mkdtemp and mkstemp make
    0700 folders and 0600 files, which others on a shared machine cannot read."""
    umask = os.umask(0)       # the only way to read the umask is to set it
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def ordinary_permissions(folder: Path):
    """chmod_ordinary for a folder made by mkdtemp and the files in it."""
    chmod_ordinary(folder)
    for p in Path(folder).iterdir():
        if p.is_file():
            chmod_ordinary(p)


def write_atomic(path, data) -> Path:
    """Write `path` so that a reader (or a crash) only ever sees the old file or the whole new one:
    a temporary in the same folder, then os.replace. data: bytes, str, or a function that writes
    the temporary's path (e.g. safetensors' save_file). The temporary is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        chmod_ordinary(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path, obj, indent: int = 2) -> Path:
    """JSON through write_atomic. An OSError names the file (a full disk's error names none)."""
    text = json.dumps(obj, indent=indent, default=str)
    try:
        return write_atomic(path, text)
    except OSError as e:
        raise OSError(f"{path}: cannot write ({e.strerror or e})") from None


def check_writable(folder) -> None:
    """Raise OSError unless files can be written in `folder` (which need not exist yet): its
    nearest existing ancestor must take a file (a test file, created and removed at once; nothing
    else is created). The message names that ancestor."""
    p = os.path.abspath(os.fspath(folder))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        if not os.path.isdir(p):
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise OSError(f"cannot write in {p} ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# Who wrote a leftover: a pid alone is not enough, since the kernel hands a dead process's pid to
# a new one; the pid together with the process's start (boot id + start time) names one process.

def _start_token(pid: int) -> str | None:
    """8 hex digits fingerprinting the start of process `pid` (Linux /proc: the boot id and the start
    time in clock ticks since boot), or None when the process does not exist or /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # field 22 is the start time; field 2, the command name in parentheses, may hold spaces and ')'
    start = stat.rpartition(")")[2].split()[19]
    return hashlib.sha1(f"{boot}:{start}".encode()).hexdigest()[:8]


_OWN_TOKEN: dict[int, str | None] = {}     # by pid: a forked child computes its own


def owner_tag() -> str:
    """`<pid>-S<token>` of this process: the owner part of the name of every temporary and
    swapped-out copy."""
    pid = os.getpid()
    if pid not in _OWN_TOKEN:
        # without /proc a random token still makes the name ours alone (liveness then goes by the pid)
        _OWN_TOKEN[pid] = _start_token(pid) or secrets.token_hex(4)
    return f"{pid}-S{_OWN_TOKEN[pid]}"


def temp_prefix(target_name: str) -> str:
    """The prefix of a temporary (file or folder, for mkstemp / mkdtemp) that becomes `target_name`."""
    return f".{target_name}.tmp-{owner_tag()}-"


# exactly the names temp_prefix + mkstemp / mkdtemp (a random tail) and replace_dir (none) make
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<pid>\d+)-S(?P<token>[0-9a-f]{8})-[A-Za-z0-9_]+"
                       r"|(?P<old>old)-(?P<opid>\d+)-S(?P<otoken>[0-9a-f]{8}))")


def leftover_target(name: str) -> str | None:
    """The target of a temporary or swapped-out copy named `name` by this code, else None."""
    m = _LEFTOVER.fullmatch(name)
    return m["name"] if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True       # someone else's live process
    return True


def _owner_alive(pid: int, token: str) -> bool:
    """Is the process that wrote a leftover named with (pid, token) still running?"""
    now = _start_token(pid)
    if now is None:     # no such process, or no /proc here: kill(pid, 0) decides
        return _alive(pid)
    return now == token          # another start time: the pid was given to a new process since


def clean_leftovers(folder, ours=None) -> list[str]:
    """Remove what crashed writers of save_hf / replace_dir / atomic JSON writes left in `folder`:
    temporaries `.<name>.tmp-<owner>-<random>` and swapped-out copies `.<name>.old-<owner>` whose
    process is gone, also when its pid now belongs to another process (the owner's start token
    differs; see owner_tag). Nothing else is touched: a name must be exactly of that form, and with
    `ours` (a test on <name>) its target one the caller writes. Call it only on a folder known to be
    the caller's. A swapped-out copy whose replacement never arrived is the only complete one: it is
    moved back, not deleted. -> one line per thing done."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m or (ours is not None and not ours(m["name"])):
            continue
        pid, token = (m["opid"], m["otoken"]) if m["old"] else (m["pid"], m["token"])
        if _owner_alive(int(pid), token):
            continue
        target = folder / m["name"]
        if m["old"] and not target.exists():
            os.replace(p, target)
            done.append(f"restored {target} from an interrupted swap ({p.name})")
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        done.append(f"removed stale {p}")
    return done


def replace_dir(new: Path, dst: Path):
    """Swap a finished directory into place: the old one is renamed away first and deleted only
    after the new one is in, so at every moment one complete copy exists on disk."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{owner_tag()}")
        os.replace(dst, old)
    os.replace(new, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)




# ---------------------------------------------------------------------------------------------
# One writer per run folder

RUN_LOCK = "run.lock"


class RunLock:
    """An exclusive hold on a folder, for one process: fcntl.flock on the file `folder/name`, which
    says "<pid> <host>[ <note>]" of its holder. acquire() (or `with`) takes it or raises FolderInUse
    ("<what> is in use by PID n on host h: ..."); it is kept until release() or the end of the
    process. The kernel drops a flock when its holder dies, even by SIGKILL, so a file left behind
    by a dead process never blocks; its text is kept in `found` (None when there was none), for a
    caller that wants to account for what the dead one was doing. release() deletes the file, and
    the folders acquire() had to create when they are empty again, so a run refused after taking
    the lock leaves nothing behind.

    Two RunLocks on one file exclude each other even in one process (a flock belongs to an open
    file). The descriptor is not inherited by exec'd children, but a fork without exec (e.g. data
    loader workers) shares the hold while it lives. Between hosts it is as good as the file
    system's flock (local disks, NFSv4: yes)."""

    def __init__(self, folder, name: str = RUN_LOCK, what: str | None = None, note: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or str(self.folder)
        self.note = note
        self.found: str | None = None
        self._fd: int | None = None
        self._made: list[Path] = []           # folders acquire() created, deepest first

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> "RunLock":
        import fcntl      # POSIX only: the writers above stay importable where it is missing
        if self._fd is not None:
            return self
        missing = self.folder
        while not missing.exists() and missing.parent != missing:
            self._made.append(missing)
            missing = missing.parent
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd).strip().split(" ", 2)
                os.close(fd)
                self._remove_made()
                who = f"PID {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
                raise FolderInUse(f"{self.what} is in use by {who}: wait for it to end or stop it "
                                  f"(it holds {self.path})") from None
            except OSError as e:
                os.close(fd)
                self._remove_made()
                raise TrainError(f"{self.path}: cannot lock ({e.strerror or e})") from None
            # the holder before us may have deleted the file (release) between our open and our
            # flock: that lock is on a file no one else can open any more, so take the one at the path
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.found = _read_fd(fd).strip() or None
        if self.found and not re.match(r"\d+ \S+", self.found):     # a file of that name that is not a lock
            os.close(fd)                                            # of ours: neither rewritten nor removed
            self._remove_made()
            raise TrainError(f"{self.path} exists and is not a run lock (it says {self.found[:40]!r}): "
                             f"choose another folder")
        text = f"{os.getpid()} {socket.gethostname()}" + (f" {self.note}" if self.note else "") + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError as e:
            self._fd = fd
            self.release()
            raise TrainError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self._fd = fd
        return self

    def _open(self) -> int:
        """Open (or create) the lock file, creating its folder where needed."""
        for _ in range(10):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:      # a releasing holder removed the empty folder just now: again
                continue
            except OSError as e:
                self._remove_made()
                raise TrainError(f"{self.path}: cannot write ({e.strerror or e})") from None
        raise TrainError(f"{self.path}: cannot create (its folder keeps disappearing)")

    def release(self):
        if self._fd is None:
            return
        # deleted while still held: a newcomer that opened it before finds it gone (acquire's check)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _remove_made(self):
        for d in self._made:
            try:
                d.rmdir()           # only while empty: someone else's file keeps it
            except OSError:
                break
        self._made = []


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")
