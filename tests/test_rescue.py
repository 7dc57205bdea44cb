"""Every result write survives its destination failing (kept where there is room, named in one error line);
exports list their weight files and a changed folder is refused; one writer per export target."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import SafetensorError

from lowrank_core import job, rescue, tempdirs
from lowrank_core.cli import main
from lowrank_core.commands import compare as compare_command
from lowrank_core.commands import search as search_command
from lowrank_core.decompose import svd_factors
from lowrank_core.export import ExportError, ExportWriteError, export_student, read_manifest
from lowrank_core.export import write
from lowrank_core.models import ModelSourceError, load_model, tiny_model
from lowrank_core.plan import load_plan
from lowrank_core.student import low_rank_student

JOB = ["compress", "--model", "tiny", "--data", "chatterbot", "--calib", "4", "--eval", "4", "--max-len", "64",
       "--plan", "mlp:r4"]


@pytest.fixture
def small(tmp_path):
    """A 200 kB tmpfs (skipped where mounting is not allowed); unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)], capture_output=True,
                              text=True)
    except OSError as e:
        pytest.skip(f"cannot mount a 200 kB tmpfs here: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 200 kB tmpfs here: {done.stderr.strip() or 'mount failed'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def filled(folder: Path) -> Path:
    """``folder`` (a small tmpfs) with no byte left."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
    return folder


def student(rank: int = 4):
    model, tokenizer = tiny_model()
    names = [f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")]
    return low_rank_student(model, {n: svd_factors(model.get_submodule(n).weight.detach(), rank) for n in names}), \
        tokenizer


def failing_once(real, error: BaseException):
    """``real`` that raises ``error`` on its first call (a fault-injected writer)."""
    calls = []

    def writer(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    return writer


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- exports
def test_a_disk_without_room_is_refused_before_compressing(small, cache, monkeypatch, capsys):
    monkeypatch.setattr(job, "compress", lambda *a, **k: pytest.fail("compressed although the export cannot fit"))
    assert main([*JOB, "--export", str(small / "exp")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(small / "exp") in lines[0] and "bytes free" in lines[0], lines


def test_a_disk_filling_during_the_write_keeps_the_student(small, cache, monkeypatch, capsys):
    """The issue's run: the weights no longer fit when they are written (the room was checked earlier)."""
    for module in (job, write):
        monkeypatch.setattr(module, "check_room", lambda *args: None)
    assert main([*JOB, "--export", str(small / "exp")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    kept = next((cache / "rescued").iterdir())
    assert f"writing the dense export to {small / 'exp'} failed" in lines[0] and "No space left" in lines[0]
    assert f"saved unverified to {kept} instead" in lines[0]
    assert read_manifest(kept)["plan"] == load_plan("mlp:r4").to_dict()
    load_model(str(kept), device="cpu")
    assert list(small.iterdir()) == []  # no half-written folder, no lock left


@pytest.mark.parametrize("error", [SafetensorError("Error while serializing: I/O error: No space left on device"),
                                   RuntimeError("a bug in the writer")], ids=["safetensors", "bug"])
def test_any_failure_of_the_weights_writer_keeps_the_student(tmp_path, cache, monkeypatch, error):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_once(safetensors.torch.save_file, error))
    spec = job.JobSpec(plan="mlp:r4", name="mine", model=job.ModelSpec(source="tiny"),
                       data=job.DataSpec(source="chatterbot", calib=4, eval=0),
                       method=job.CompressSettings(max_len=64), export=job.ExportSpec(dir=str(tmp_path / "wanted")))
    with pytest.raises(type(error) if isinstance(error, RuntimeError) else ExportWriteError) as failed:
        job.run_job(spec)
    kept = next((cache / "rescued").iterdir())
    text = str(failed.value) + " ".join(getattr(failed.value, "__notes__", []))
    assert str(tmp_path / "wanted") in text and f"saved unverified to {kept}" in text and kept.name.startswith("mine-")
    assert read_manifest(kept)["files"]["model.safetensors"]["bytes"] > 0 and not (tmp_path / "wanted").exists()


def test_nowhere_with_room_names_the_bytes_needed(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(rescue, "free_bytes", lambda path: 1000)

    def full(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(rescue.WriteFailed, match=r"writing the rows to .*rows.csv failed \(\[Errno 28\] No space left "
                                                 r"on device\); it is not saved anywhere: no rescue folder could keep "
                                                 r"its 5,000 bytes: .*rescued has 1,000 bytes free"):
        rescue.save_file(tmp_path / "rows.csv", full, "the rows", "compare", needed=5000)


# ----------------------------------------------------------------------------- plan files and CSV rows
def test_search_plan_on_a_full_disk_is_kept_and_nothing_half_written(small, cache):
    found = SimpleNamespace(allocation=SimpleNamespace(plan=load_plan("mlp:r4; 0:attn:r2")))
    target = filled(small) / "plan.yaml"
    with pytest.raises(rescue.WriteFailed, match=rf"writing the plan to {target} failed .*No space left") as failed:
        search_command._save(found, str(target))
    kept = next((cache / "rescued").iterdir())
    assert f"saved to {kept} instead" in str(failed.value) and kept.suffix == ".yaml"
    assert load_plan(str(kept)).to_dict() == found.allocation.plan.to_dict()
    assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_compare_rows_on_a_full_disk_are_kept(small, cache):
    rows = [{"index": i, "tokens": 3, "delta": 0.5} for i in range(50)]
    result = SimpleNamespace(comparisons={"s": SimpleNamespace(rows=lambda: rows)})
    target = filled(small) / "rows.csv"
    with pytest.raises(rescue.WriteFailed, match=rf"writing the per-example rows to {target} failed"):
        compare_command._write_rows(str(target), result)
    kept = next((cache / "rescued").iterdir())
    with open(kept, newline="") as f:
        assert len(list(csv.DictReader(f))) == 50
    assert sorted(p.name for p in small.iterdir()) == ["filler"]


# ----------------------------------------------------------------------------- the manifest's files
@pytest.fixture
def fact(tmp_path) -> Path:
    model, tokenizer = student()
    export_student(model, tokenizer, tmp_path / "fact", "factorized", verify=False)
    return tmp_path / "fact"


def _extra(folder: Path) -> str:
    shutil.copy(folder / "model.safetensors", folder / "extra.safetensors")
    return "weight file extra.safetensors is not in its lowrank.json"


def _missing(folder: Path) -> str:
    (folder / "model.safetensors").rename(folder / "elsewhere.bin")
    return "weight file model.safetensors listed in its lowrank.json is missing"


def _changed(folder: Path) -> str:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return "weight file model.safetensors does not match the sha256"


def test_the_manifest_lists_every_weight_file(fact):
    files = read_manifest(fact)["files"]
    weights = fact / "model.safetensors"
    assert list(files) == ["model.safetensors"] and files["model.safetensors"]["bytes"] == weights.stat().st_size
    assert len(files["model.safetensors"]["sha256"]) == 64
    load_model(str(fact), device="cpu")


@pytest.mark.parametrize("change", [_extra, _missing, _changed], ids=["extra", "missing", "changed"])
def test_a_folder_whose_weight_files_differ_is_refused(fact, change):
    expected = change(fact)
    with pytest.raises(ModelSourceError, match=expected):
        load_model(str(fact), device="cpu")


# ----------------------------------------------------------------------------- one writer per target
def test_two_concurrent_forced_exports_cannot_both_succeed(tmp_path, monkeypatch):
    target = tmp_path / "student"
    (first, tok), (second, _) = student(4), student(2)
    entered, go, results = threading.Event(), threading.Event(), {}
    real = write.write_export

    def held(*args, **kwargs):  # the first writer stops inside, holding the target
        if threading.current_thread().name == "first":
            entered.set()
            assert go.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(write, "write_export", held)
    thread = threading.Thread(name="first", target=lambda: results.setdefault(
        "first", export_student(first, tok, target, "factorized", force=True, verify=False)))
    thread.start()
    try:
        assert entered.wait(120)
        with pytest.raises(ExportError, match=rf"export target {target} is being written by pid {os.getpid()}"):
            export_student(second, tok, target, "factorized", force=True, verify=False)
        monkeypatch.setattr(write, "lock_holder", lambda target: None)  # both past the early check
        with pytest.raises(ExportWriteError, match=rf"{target} is being written by pid {os.getpid()}"):
            export_student(second, tok, target, "factorized", force=True, verify=False)
    finally:
        go.set()
        thread.join()
    assert set(read_manifest(target)["ranks"].values()) == {4} and "first" in results
    assert not tempdirs.lock_path(target).exists()


def test_a_dead_writers_lock_file_does_not_block(tmp_path):
    target = tmp_path / "student"
    tempdirs.lock_path(target).write_text("999999999\n")  # no process holds it
    model, tok = student()
    export_student(model, tok, target, "factorized", verify=False)
    assert (target / "lowrank.json").is_file() and not tempdirs.lock_path(target).exists()
