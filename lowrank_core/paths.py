"""Output paths checked before any work: a bad ``--out`` or export target fails in a second, not after
the model was loaded, calibrated and compressed.

- :func:`check_output_file`: a file that will be written (``search --out``, ``compare --per-example``):
  a non-empty path, not a folder, in an existing folder that can be written;
- :func:`check_output_folder`: a folder that will be created with its missing parents (an export target):
  a non-empty path whose nearest existing ancestor is a folder that can be written (not a file,
  not read-only).

:func:`too_long` says why a path is longer than the file system allows (``File name too long``), for
the model / data sources and the app's workspace paths to refuse it in one line.

Writability is probed by creating (and removing) a temporary folder: permission bits alone do not tell
(a root process may not write to a read-only mount, ACLs...). Both raise :class:`OutputPathError` (a
``ValueError``) naming the flag, the path and what is allowed. Existing-target rules (``--force``, only
lowrank exports replaced) are ``export.check_target``'s.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["NAME_MAX", "PATH_MAX", "OutputPathError", "check_output_file", "check_output_folder", "too_long"]

NAME_MAX, PATH_MAX = 255, 4096  # bytes of one path component / of a whole path (Linux limits)


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the flag, the path and what is allowed."""


def _non_empty(path, what: str) -> Path:
    if path is None or not str(path).strip():
        raise OutputPathError(f"{what} {str(path or '')!r} is an empty path; name a file or folder to write")
    return Path(str(path)).expanduser().absolute()


def too_long(value, base: Path = Path()) -> Optional[str]:
    """Why the file system would refuse ``value`` (under ``base``) with ``File name too long``, or None: the
    callers (model and data sources, workspace paths) turn it into their own one-line error."""
    text = str(value)
    longest = max((len(part.encode("utf-8", "surrogatepass")) for part in text.split("/")), default=0)
    if longest > NAME_MAX or len(str(base / text).encode("utf-8", "surrogatepass")) > PATH_MAX:
        return (f"is too long ({len(text):,} characters; allowed: names of up to {NAME_MAX} bytes, paths of up to "
                f"{PATH_MAX:,} bytes)")
    return None


def shown_path(value, limit: int = 60) -> str:
    """``value`` as a message shows it: cut to ``limit`` characters."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _writable(folder: Path) -> bool:
    try:
        probe = tempfile.mkdtemp(prefix=".lowrank-write-check-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _check_folder(folder: Path, path, what: str) -> None:
    """``folder`` (an existing ancestor of ``path``) must be a folder that can be written."""
    if not folder.is_dir():
        raise OutputPathError(f"{what} {str(path)!r}: {folder} is a file, not a folder; choose a path inside a folder")
    if not _writable(folder):
        raise OutputPathError(f"{what} {str(path)!r}: folder {folder} is not writable (read-only or no permission); "
                              "choose a writable location")


def check_output_file(path, what: str, suffixes: Sequence[str] = ()) -> Path:
    """The absolute path of a file to be written, checked: not empty, not a folder, one of ``suffixes``
    (when given), in an existing writable folder."""
    target = _non_empty(path, what)
    if suffixes and target.suffix.lower() not in suffixes:
        raise OutputPathError(f"{what} {str(path)!r}: use a file name ending in {' or '.join(suffixes)}")
    if target.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder; name a file inside it")
    parent = target.parent
    if not parent.exists():
        raise OutputPathError(f"{what} {str(path)!r}: folder {parent} does not exist; create it first or choose a "
                              "file in an existing folder")
    _check_folder(parent, path, what)
    return target


def check_output_folder(path, what: str) -> Path:
    """The absolute path of a folder to be created (with missing parents) or replaced, checked: not empty,
    and its nearest existing ancestor (from the parent up) is a folder that can be written."""
    target = _non_empty(path, what)
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    _check_folder(ancestor, path, what)
    return target
