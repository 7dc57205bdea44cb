"""A command's numbers depend on its inputs, settings and the machine's core count, never on the machine's load.

Whole CLI processes with the thread variables cleared (the default policy of ``lowrank_core/threads.py``):
one compression on the machine as it is, one beside CPU-burning processes (one per core), one rerun with
the manifest's thread count. Factors and losses must be bit-identical and the recorded thread count the same.
A fourth run with ``LOWRANK_THREADS=auto`` beside the burners shows they really take cores away (it records
fewer threads), so the check could fail if the default policy went back to counting free cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank_core.threads import available_cores, busy_cores

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("LOWRANK_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
COMPRESS = ["compress", "--model", "tiny", "--data", "chatterbot", "--calib", "8", "--eval", "8", "--max-len", "64",
            "--plan", "all:k0.5", "--format", "factorized", "--json"]

pytestmark = pytest.mark.skipif(available_cores() < 2, reason="one core: every policy gives one thread, so load "
                                                                "cannot change the count and there is nothing to tell apart")


def _compress(out: Path, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    clean.update(env)
    done = subprocess.run([sys.executable, "-m", "lowrank_core", *COMPRESS, "--export", str(out)], cwd=REPO,
                          env=clean, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    record["tensors"] = load_file(str(out / "model.safetensors"))
    record["manifest"] = json.loads((out / "lowrank.json").read_text())
    return record


class Burners:
    """One busy-looping process per core while the block runs."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(available_cores())]
        time.sleep(1.0)  # running before the measured process starts
        self.seen = busy_cores()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _same_numbers(a: dict, b: dict) -> None:
    assert a["threads"] == b["threads"]
    assert a["teacher_loss"] == b["teacher_loss"] and a["student_loss"] == b["student_loss"]
    assert [r["rel_error"] for r in a["compress"]["layers"]] == [r["rel_error"] for r in b["compress"]["layers"]]
    assert a["tensors"].keys() == b["tensors"].keys()
    for name, tensor in a["tensors"].items():
        assert torch.equal(tensor, b["tensors"][name]), name


def test_load_does_not_change_the_numbers_and_the_manifest_reproduces_them(tmp_path):
    quiet = _compress(tmp_path / "quiet")
    with Burners() as burners:
        if burners.seen < available_cores() - 1:
            pytest.skip(f"/proc/loadavg shows {burners.seen} busy cores beside {available_cores()} burners "
                        "(virtualised or CPU-quota'd machine): load cannot be made visible here")
        loaded = _compress(tmp_path / "loaded")
        auto = _compress(tmp_path / "auto", LOWRANK_THREADS="auto")
    assert quiet["threads"] == available_cores()  # the default: every core this process may use
    assert quiet["runtime"]["thread_policy"] == "fixed" and quiet["manifest"]["threads"] == quiet["threads"]
    _same_numbers(quiet, loaded)
    assert auto["runtime"]["thread_policy"] == "auto" and auto["threads"] < quiet["threads"], \
        "the burners left every core free: this test could not tell a load-aware default from a fixed one"
    rerun = _compress(tmp_path / "rerun", LOWRANK_THREADS=str(quiet["manifest"]["threads"]))
    assert rerun["runtime"]["thread_policy"] == "env"
    _same_numbers(quiet, rerun)
