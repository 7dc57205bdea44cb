"""Results kept when their own destination fails: written elsewhere, with room, and named in the error.

A result written at the end of long work (an export, a search's plan, per-example rows) must not be lost
to a late failure of any kind (a full disk, a vanished folder, a concurrent writer, a bug).
:func:`rescue` writes it under the first of the cache's ``rescued/`` folder and the system temp folder
whose disk has room for the bytes it needs (the next one when writing there fails too);
:func:`fail` raises the error that names the target, the cause and the rescue. :func:`save_file`
writes one file atomically (a temp sibling renamed into place) and rescues it on failure.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, NoReturn, Optional, TypeVar

from safetensors import SafetensorError

from .models import cache_dir

T = TypeVar("T")
MARGIN = 1 << 20  # bytes a rescue folder must have free beyond what is written
USER_CAUSES = (OSError, ValueError, SafetensorError)  # environment and input failures; others are bugs


class WriteFailed(ValueError):
    """A result not written where asked; the message names the target, the cause and where it is kept."""


def rescue_roots() -> list[Path]:
    return [cache_dir() / "rescued", Path(tempfile.gettempdir()) / "lowrank-rescued"]


def free_bytes(path: Path) -> int:
    """Free bytes on the disk of ``path`` (its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _fresh(root: Path, name: str, suffix: str) -> Path:
    safe = name.replace("/", "_").replace(":", "_")
    return root / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**6:06d}{suffix}"


def rescue(name: str, needed: int, write: Callable[[Path], T], suffix: str = "") -> tuple[Path, T]:
    """``write(path)`` at a fresh path under the first rescue root with room for ``needed`` bytes (trying the
    next when it fails) -> (path, what ``write`` returned); WriteFailed naming the bytes needed when none takes it."""
    problems = []
    for root in rescue_roots():
        free = free_bytes(root)
        if free < needed + MARGIN:
            problems.append(f"{root} has {free:,} bytes free")
            continue
        path = _fresh(root, name, suffix)
        try:
            root.mkdir(parents=True, exist_ok=True)
            return path, write(path)
        except Exception as e:  # noqa: BLE001 - the next root may take it
            problems.append(f"{root} failed ({one_line(e)})")
    raise WriteFailed(f"no rescue folder could keep its {needed:,} bytes: {'; '.join(problems)}")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def fail(what: str, target, error: Exception, kept: Optional[Path], lost: str = "", how: str = "",
         error_class: type = WriteFailed) -> NoReturn:
    """Raise after ``error`` writing ``what`` to ``target``: an ``error_class`` (a WriteFailed) naming both and
    where it was ``kept`` (None: ``lost`` says why it is nowhere). A bug (not an OSError, ValueError or
    SafetensorError) is raised itself with the same sentence as a note, so it keeps its traceback."""
    where = f"it was saved{how} to {kept} instead" if kept is not None else f"it is not saved anywhere: {lost}"
    text = f"writing {what} to {target} failed ({one_line(error)}); {where}"
    if not isinstance(error, USER_CAUSES):
        error.add_note(text)
        raise error
    raise error_class(text) from error


def write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temp sibling of ``target`` (same suffix), then renamed into place: nothing half-written."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.tmp-{os.getpid()}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_file(target, write: Callable[[Path], None], what: str, name: str, needed: int) -> Path:
    """Write one file with ``write(path)`` atomically at ``target``; on any failure keep it in a rescue folder
    and raise (:func:`fail`). Returns the path written."""
    target = Path(target).expanduser().absolute()
    try:
        write_atomic(target, write)
        return target
    except Exception as e:  # noqa: BLE001 - any failure: the result is kept elsewhere
        cause = e
    try:
        kept, _ = rescue(name, needed, write, suffix=target.suffix)
    except WriteFailed as lost:
        fail(what, target, cause, None, lost=str(lost))
    fail(what, target, cause, kept)
