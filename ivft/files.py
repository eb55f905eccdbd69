"""Files that are never half-written: one atomic writer for every file the project writes, the
swap that puts a finished directory in place, and the clean-up of what a killed writer left.

Every temporary is named `.<target>.tmp-<pid>...` (a swapped-out directory `.<target>.old-<pid>`):
the pid lets a later run tell a crashed writer's leftovers from a live one's (clean_leftovers).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
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


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)?")


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


def clean_leftovers(folder) -> list[str]:
    """Remove what crashed writers of save_hf / replace_dir / atomic JSON writes left in `folder`:
    temporaries `.<name>.tmp-<pid>...` and swapped-out copies `.<name>.old-<pid>` whose process is
    gone (a name without a pid is from an older version of this code, and also stale). A swapped-out
    copy whose replacement never arrived is the only complete one: it is moved back, not deleted.
    -> one line per thing done."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or (m["pid"] and _alive(int(m["pid"]))):
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not target.exists():
            os.replace(p, target)
            done.append(f"restored {target} from an interrupted swap ({p.name})")
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        done.append(f"removed stale {p}")
    return done


def replace_dir(new: Path, dst: Path):
    """Swap a finished directory into place: the old one is renamed away first and deleted only
    after the new one is in, so at every moment one complete copy exists on disk."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(new, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


