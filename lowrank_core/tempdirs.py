"""Folders written beside their target and renamed into place — and the leftovers of killed writers.

A writer makes ``.<target>.<tag>-<pid>-<random>`` next to the target, marks it incomplete, fills it and
renames it into place only once it is whole (``os.replace`` on one file system). A process killed
meanwhile (SIGKILL, power loss) leaves its folder behind: :func:`temp_sibling` removes every sibling
of the same target whose writer is no longer alive before making a new one, and a folder that still
holds the :data:`INCOMPLETE` marker never loads as a model (:func:`check_complete`).

One writer per target at a time: :func:`writer_lock` holds ``fcntl.flock`` on ``.<target>.lock`` beside it
(the kernel releases it when its holder dies, so no lock goes stale); a second writer fails at once with
:class:`TargetLocked` naming the holder's pid (:func:`lock_holder` tells without taking it).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

INCOMPLETE = ".lowrank-incomplete"   # present while a folder is being written; removed just before the rename
LEGACY_AGE_S = 24 * 3600             # unstamped leftovers (older versions) are removed after a day


class TargetLocked(ValueError):
    """Another writer (this process or another) is writing the same target."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_siblings(target: Path) -> list[Path]:
    """Leftover temp folders of ``target`` whose writing process is gone (or unstamped and a day old)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z]+-(?:(\d+)-)?.+$")
    out = []
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m is None or not p.is_dir():
            continue
        pid = m.group(1)
        if pid is not None and int(pid) != os.getpid() and not _alive(int(pid)):
            out.append(p)
        elif pid is None and time.time() - p.stat().st_mtime > LEGACY_AGE_S:
            out.append(p)
    return out


def temp_sibling(target: Path, tag: str, mode: int | None = None) -> Path:
    """A new, empty, incomplete-marked folder beside ``target`` (stale ones of earlier killed writers are
    removed first). ``mode``: its permissions (default: what ``mkdtemp`` gives, 0700)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in stale_siblings(target):
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-{os.getpid()}-", dir=target.parent))
    if mode is not None:
        os.chmod(tmp, mode)
    (tmp / INCOMPLETE).write_text("written by a process that has not finished; never load this folder\n")
    return tmp


def mark_complete(folder: Path) -> None:
    """Remove the incomplete marker (just before the folder is renamed into place)."""
    (Path(folder) / INCOMPLETE).unlink(missing_ok=True)


def check_complete(folder: Path) -> None:
    """ValueError when ``folder`` is a half-written folder (its writer was killed or is still at work)."""
    if (Path(folder) / INCOMPLETE).exists():
        raise ValueError(f"{folder} was never finished (its writer was interrupted or is still writing); "
                         "it is not a model: remove it or write it again")


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder_text(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another writer"


def lock_holder(target: Path) -> str | None:
    """Who holds ``target``'s writer lock (``pid N``), None when nobody does; takes nothing."""
    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_flock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _holder_text(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(target: Path, what: str = "target"):
    """Hold ``target``'s writer lock for the block; :class:`TargetLocked` at once when another writer holds it.
    The lock file holds the holder's pid and is removed on release."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd):
            os.close(fd)
            raise TargetLocked(f"{what} {Path(target)} is being written by {_holder_text(path)} right now; wait "
                               "for it to finish or choose another folder")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its last holder removed it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
