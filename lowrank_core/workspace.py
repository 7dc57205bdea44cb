"""The workspace: the one folder in which paths typed into the app are read and written.

The app is used from a browser by people who do not own the server, so a path they type never reaches
the file system as is. ``resolve_inside`` takes it relative to the workspace (an absolute path only when
it lies inside), resolves symlinks and refuses whatever leaves the workspace, is empty or is the
workspace itself. ``app_source`` applies that to model and data sources: the bundled names (``default``,
``chatterbot``, ``tiny``, ``tiny-<type>``) and hub ids (``org/name``) are not paths and pass unchanged;
everything else is a local path and must exist inside the workspace.

The workspace is ``$LOWRANK_WORKSPACE``, else ``<cache_dir()>/workspace``; it is created on demand.
The CLI and recipes are run by the server's owner and are not confined.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .data.sources import DATA_SOURCES, LOCAL_SUFFIXES
from .models import TINY_SOURCES, cache_dir
from .paths import shown_path, too_long

ENV = "LOWRANK_WORKSPACE"
BUNDLED_SOURCES = tuple(dict.fromkeys(("default",) + DATA_SOURCES + TINY_SOURCES))  # names, not paths
PLAN_SUFFIXES = (".yaml", ".yml", ".json")  # what ``plan.load_plan`` reads as a file (and ``Plan.save`` writes)
MODEL_FILE_SUFFIXES = (".gguf", ".json")  # a model file, never a hub id
# org/name: what the hub accepts (letters, digits, '-', '_', '.'), no leading '.', no '..'
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class WorkspaceError(ValueError):
    """A path typed into the app that is not allowed; the message names the value and the workspace."""


def workspace_dir() -> Path:
    """The workspace folder (absolute, symlinks resolved), created if missing."""
    raw = os.environ.get(ENV)
    root = Path(raw).expanduser() if raw else cache_dir() / "workspace"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkspaceError(f"the workspace {str(root)!r} cannot be created ({e.strerror or type(e).__name__}); set "
                             f"{ENV}=/a/writable/folder (or LOWRANK_CACHE, under which it defaults)") from None
    return root.resolve()


def _refused(what: str, value: str, why: str, root: Path) -> WorkspaceError:
    return WorkspaceError(f"{what} {value!r} {why}; give a path inside the workspace {root} "
                          "(relative to it, e.g. folder/name)")


def _check_length(value: str, what: str, root: Path) -> None:
    """A path the file system would refuse with ``File name too long`` is refused here, in one line."""
    why = too_long(value, root)
    if why:
        raise _refused(what, shown_path(value), why, root)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name the file system cannot even look up
        return False


def resolve_inside(user_path: str, what: str, must_exist: bool = False) -> Path:
    """``user_path`` as an absolute path inside the workspace, symlinks resolved.

    Relative paths are taken relative to the workspace; absolute ones are allowed when they resolve inside
    it. Raises WorkspaceError when the path is empty, is the workspace itself, leaves it (``..``, an
    absolute path elsewhere, a symlink pointing out), passes through an existing file, or — with
    ``must_exist`` — does not exist.
    """
    root = workspace_dir()
    value = str(user_path).strip()
    if not value:
        raise _refused(what, value, "is empty", root)
    _check_length(value, what, root)
    try:
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise _refused(what, value, f"cannot be resolved ({e})", root) from None
    if path == root:
        raise _refused(what, value, "is the workspace itself", root)
    if root not in path.parents:
        raise _refused(what, value, "is outside the workspace", root)
    for parent in path.relative_to(root).parents:
        if (root / parent).exists() and not (root / parent).is_dir():
            raise _refused(what, value, f"lies under {root / parent}, which is a file, not a folder", root)
    if must_exist and not path.exists():
        raise _refused(what, value, f"not found (looked for {path})", root)
    return path


def _check_links(folder: Path, root: Path, what: str, value: str) -> None:
    """Refuse a folder holding a symlink (at any depth) that points outside the workspace."""
    seen, todo = set(), [folder]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            entries = list(os.scandir(current))
        except OSError as e:
            raise _refused(what, value, f"cannot be listed ({e})", root) from None
        for entry in entries:
            target = Path(entry.path).resolve() if entry.is_symlink() else Path(entry.path)
            if target != root and root not in target.parents:
                raise _refused(what, value, f"holds {entry.path}, a link to a place outside the workspace", root)
            if target.is_dir():
                todo.append(target)


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` as the hub spells it. Stricter than the engine's guesses: ``org/x.json`` or
    ``org/x.gguf`` is a file name, not a hub id."""
    return (HUB_ID.fullmatch(value) is not None and ".." not in value
            and Path(value).suffix not in tuple(LOCAL_SUFFIXES) + MODEL_FILE_SUFFIXES)


def app_source(value: str, what: str, local: bool = False) -> str:
    """A model or data source typed into the app, safe to hand to the engine.

    Bundled names and hub ids come back unchanged; anything else (or anything, with ``local=True``) is a
    local path and comes back resolved inside the workspace, where it must exist. A hub-like value that
    names something in the workspace is that path; one that would be read from the server's own folder
    (the engine takes an existing relative path as local) is refused.
    """
    value, root = str(value).strip(), workspace_dir()
    if not local and value in BUNDLED_SOURCES:
        return value
    if value:
        _check_length(value, what, root)
    if not local and looks_like_hub_id(value) and not _exists(root / value):
        if _exists(Path(value)):
            raise _refused(what, value, "would be read from the server's own folder, outside the workspace", root)
        return value
    path = resolve_inside(value, what, must_exist=True)
    if path.is_dir():
        _check_links(path, root, what, value)
    return str(path)


def plan_source(text: str) -> str:
    """Plan text typed into the app: unchanged, unless it names a plan file (``.yaml``/``.yml``/``.json``,
    as ``plan.load_plan`` would read it): then that file, resolved inside the workspace."""
    text = str(text).strip()
    if "\n" in text or Path(text).suffix.lower() not in PLAN_SUFFIXES:
        return text
    return str(resolve_inside(text, "plan file", must_exist=True))


def writable_file(user_path: str, what: str, overwrite: bool = False,
                  suffixes: Optional[tuple[str, ...]] = None) -> Path:
    """Where to write a file named by the user: inside the workspace, its folder created; an existing
    file only with ``overwrite``; never a folder."""
    path = resolve_inside(user_path, what)
    root = workspace_dir()
    if suffixes and path.suffix.lower() not in suffixes:
        raise _refused(what, str(user_path).strip(), f"does not end in {', '.join(suffixes)}", root)
    if path.is_dir():
        raise _refused(what, str(user_path).strip(), "is a folder", root)
    if path.exists() and not overwrite:
        raise WorkspaceError(f"{what} {path} already exists; choose another name or allow overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_folder(user_path: str, replace: bool = False) -> Path:
    """An export target inside the workspace: a new folder, or an existing one only with ``replace``
    (the export writer still refuses a folder that is not empty and not a lowrank export)."""
    path = resolve_inside(user_path, "export target")
    if path.exists() and not path.is_dir():
        raise WorkspaceError(f"export target {path} is a file, not a folder; choose another folder")
    if path.exists() and not replace:
        raise WorkspaceError(f"export target {path} already exists; choose another folder or allow replacing it")
    return path
