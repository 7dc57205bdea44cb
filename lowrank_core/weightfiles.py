"""The weight files of an export as its manifest (``lowrank.json``) records them, and the check on load.

:func:`weight_files` lists every ``*.safetensors`` of a folder with its size and sha256 (the manifest's
``files``); :func:`files_problem` compares a folder with its manifest's list and names the first file
that is extra, missing or changed. A folder without a manifest, or whose manifest has no ``files``
(exports of older versions), is not checked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

MANIFEST = "lowrank.json"
WEIGHTS = "*.safetensors"
CHUNK = 1 << 24


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} of every ``*.safetensors`` in ``folder``, sorted by name."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(Path(folder).glob(WEIGHTS))}


def recorded_files(folder: Path) -> Optional[dict]:
    """The manifest's ``files`` of ``folder``; None without a readable manifest or without the list."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return files if isinstance(files, dict) else None


def files_problem(folder: Path) -> Optional[str]:
    """One line naming the first weight file of ``folder`` that differs from its manifest, else None."""
    folder = Path(folder)
    recorded = recorded_files(folder)
    if recorded is None:
        return None
    present = {p.name: p for p in folder.glob(WEIGHTS)}
    where = f"export {folder}: weight file"
    for name in sorted(set(present) - set(recorded)):
        return (f"{where} {name} is not in its {MANIFEST} (which lists {', '.join(sorted(recorded)) or 'none'}); "
                "remove it or export again")
    for name in sorted(set(recorded) - set(present)):
        return f"{where} {name} listed in its {MANIFEST} is missing; copy the whole folder or export again"
    for name in sorted(recorded):
        want, path = recorded[name], present[name]
        size = path.stat().st_size
        if size != want.get("bytes"):
            return (f"{where} {name} has {size:,} bytes, its {MANIFEST} records {want.get('bytes')}; the file was "
                    "changed or cut short: copy it again or export again")
        if sha256(path) != want.get("sha256"):
            return (f"{where} {name} does not match the sha256 in its {MANIFEST}; the file was changed: copy it "
                    "again or export again")
    return None
