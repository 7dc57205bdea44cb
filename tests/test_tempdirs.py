"""Leftovers of killed writers are removed on the next run; a half-written folder never looks valid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowrank_core import tempdirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_siblings_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "student"
    dead = tmp_path / f".student.tmp-{_dead_pid()}-abc"
    live = tmp_path / f".student.tmp-{os.getppid()}-def"
    other = tmp_path / f".someone-else.tmp-{_dead_pid()}-x"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    fresh = tempdirs.temp_sibling(target, "tmp")
    assert not dead.exists() and live.exists() and other.exists()
    assert fresh.name.startswith(f".student.tmp-{os.getpid()}-")
    with pytest.raises(ValueError, match="never finished"):
        tempdirs.check_complete(fresh)
    tempdirs.mark_complete(fresh)
    tempdirs.check_complete(fresh)


def test_unstamped_leftovers_go_only_when_old(tmp_path):
    target = tmp_path / "model"
    old, young = tmp_path / ".model.tmp-oldstyle", tmp_path / ".model.tmp-young"
    old.mkdir()
    young.mkdir()
    past = time.time() - tempdirs.LEGACY_AGE_S - 60
    os.utime(old, (past, past))
    assert tempdirs.stale_siblings(target) == [old]


def test_a_killed_export_leaves_a_marked_folder_that_the_next_export_removes(tmp_path):
    """SIGKILL in the middle of writing: the hidden folder is marked incomplete, and the next export of the
    same target cleans it away."""
    target = tmp_path / "student"
    script = f"""
import time, torch
from lowrank_core.models import tiny_model
from lowrank_core.export import write as w
model, tok = tiny_model("llama")
real = w.write_export
def slow(*a, **k):
    real(*a, **k)
    print("written", flush=True)
    time.sleep(60)
w.write_export = slow
w.export_student(model, tok, {str(target)!r}, "dense", verify=False)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".student.tmp-")]
    assert (left / "model.safetensors").is_file() or any(left.glob("*.safetensors"))
    with pytest.raises(ValueError, match="never finished"):
        tempdirs.check_complete(left)
    from lowrank_core.export import export_student
    from lowrank_core.models import tiny_model

    model, tok = tiny_model("llama")
    export_student(model, tok, target, "dense", verify=False)
    assert not left.exists() and target.is_dir() and not (target / tempdirs.INCOMPLETE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_the_conversion_cache_cleans_leftovers_and_half_written_folders_never_load(tmp_path, monkeypatch):
    from lowrank_core import models

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    target = models.cache_dir() / "models" / models.EMBEDDED_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    left = target.parent / f".{target.name}.tmp-{_dead_pid()}-abc"
    left.mkdir()
    assert models.embedded_model_dir() == target and not left.exists()
    half = tempdirs.temp_sibling(tmp_path / "export", "tmp")
    with pytest.raises(ValueError, match="never finished"):
        models.load_model(str(half))
