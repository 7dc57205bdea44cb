"""Shared fixtures. Tiny random models for unit tests; the embedded model for integration tests."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

# One torch thread count for the whole session, set before any fixture or test runs: floating-point sums
# depend on it, so a reference built by a module- or session-scoped fixture and the test body compared with
# it must run at the same count. It follows OMP_NUM_THREADS / the cores (at most 2, for speed on big
# machines), and the suite must pass at every such count (OMP_NUM_THREADS=1, 2, unset).
SESSION_THREADS = max(1, min(2, torch.get_num_threads()))
torch.set_num_threads(SESSION_THREADS)
# The app under AppTest (its script and job threads), the browser test's server and CLI children take the
# same count (tests of the thread policy itself clear or override this); the suite tests the CPU path.
USER_THREAD_VARIABLES = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "LOWRANK_THREADS")}
os.environ["LOWRANK_THREADS"] = str(SESSION_THREADS)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from lowrank_core.arch import ARCHS  # noqa: E402  (after the thread count is fixed)

FIXTURES = Path(__file__).parent / "fixtures"
MISTRAL_CONFIG = FIXTURES / "mistral-7b-openorca-config.json"


@pytest.fixture
def tiny():
    """(model, tokenizer): 2-layer random Llama (GQA 4/2 heads, hidden 64, tied head), float32 CPU."""
    from lowrank_core.models import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(params=list(ARCHS))
def tiny_any(request):
    from lowrank_core.models import tiny_model

    return tiny_model(request.param, seed=0)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (LoadedModel), float32 on CPU; converted once per cache."""
    from lowrank_core.models import load_model

    return load_model("default", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def mistral_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(MISTRAL_CONFIG))


def pytest_report_header(config):
    """What the numbers depend on: versions (and any that differ from requirements-lock.txt) and threads."""
    import platform
    import re
    from importlib import metadata

    from lowrank_core.threads import available_cores

    lock = Path(__file__).resolve().parents[1] / "requirements-lock.txt"
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", lock.read_text(), re.M)) if lock.exists() else {}
    differ = []
    for name, want in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have != want:
            differ.append(f"{name} {have} (lock {want})")
    env = ", ".join(f"{k}={v}" for k, v in USER_THREAD_VARIABLES.items())
    versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("torch", "transformers", "streamlit"))
    return [f"lowrank: python {platform.python_version()}, {versions}",
            f"lowrank: packages differing from requirements-lock.txt: {'; '.join(differ) or 'none'}",
            f"lowrank: torch threads {SESSION_THREADS} for the whole session ({env}; {available_cores()} cores)"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Every test body runs at the session's thread count (what its fixtures were built at) and leaves it so."""
    found = torch.get_num_threads()
    if found != SESSION_THREADS:
        torch.set_num_threads(SESSION_THREADS)
        pytest.fail(f"{item.nodeid} starts at {found} torch threads but the session's fixtures are built at "
                    f"{SESSION_THREADS}: a fixture changed the thread count (set it inside the test and restore it)")
    try:
        return (yield)
    finally:
        left, default = torch.get_num_threads(), _new_thread_count()
        if left != SESSION_THREADS or default != SESSION_THREADS:
            torch.set_num_threads(SESSION_THREADS)
            pytest.fail(f"{item.nodeid} left torch at {left} threads and a new thread at {default} (the session "
                        f"runs at {SESSION_THREADS}); restore the count it changed")


def _new_thread_count() -> int:
    """The count a thread started now gets (torch's process-wide default; the app's jobs start threads)."""
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]
