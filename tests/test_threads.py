"""Thread policy: LOWRANK_THREADS wins, the cores are shared among a launch's processes, load only with auto."""
import pytest
import torch

from lowrank_core import threads


def test_env_override_and_bad_values():
    assert threads.thread_count(env={"LOWRANK_THREADS": "3"}) == 3
    assert threads.thread_count(processes=8, env={"LOWRANK_THREADS": "3"}) == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match=f"LOWRANK_THREADS={bad!r} is not a thread count; allowed: an integer"
                                             ".*or 'auto'"):
            threads.thread_count(env={"LOWRANK_THREADS": bad})


def test_default_is_fixed_per_machine_and_ignores_load(monkeypatch):
    """The default count depends on the cores and the launch only: busy cores change nothing."""
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    for busy in (0, 12, 40):
        monkeypatch.setattr(threads, "busy_cores", lambda busy=busy: busy)
        assert threads.thread_count(env={}) == 16
        assert threads.thread_count(processes=4, env={}) == 4
        assert threads.thread_count(processes=32, env={}) == 1
    assert threads.policy_of({}) == "fixed" and threads.policy_of({"LOWRANK_THREADS": "4"}) == "env"


def test_auto_is_load_aware_only_when_asked(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    auto = {"LOWRANK_THREADS": "auto"}
    assert threads.policy_of(auto) == "auto" and threads.policy_of({"LOWRANK_THREADS": " AUTO "}) == "auto"
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.thread_count(env=auto) == 16
    monkeypatch.setattr(threads, "busy_cores", lambda: 12)   # another job keeps 12 cores busy
    assert threads.thread_count(env=auto) == 4
    assert threads.thread_count(processes=2, env=auto) == 2
    monkeypatch.setattr(threads, "busy_cores", lambda: 40)   # oversubscribed: still one thread
    assert threads.thread_count(env=auto) == 1


def test_configure_threads_is_recorded(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_policy", dict(threads._policy))
    monkeypatch.setenv("LOWRANK_THREADS", "1")
    try:
        assert threads.configure_threads() == 1
        record = threads.runtime_record()
        assert record["threads"] == 1 and record["thread_policy"] == "env"
        assert record["torch"] == torch.__version__
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_runnable_tasks(monkeypatch, tmp_path):
    readings = iter(["0.5 0.4 0.3 3/200 99\n", "0.5 0.4 0.3 5/200 99\n"])

    class FakePath:
        def __init__(self, _):
            pass

        def read_text(self):
            return next(readings)
    monkeypatch.setattr(threads, "Path", FakePath)
    assert threads.busy_cores(samples=2, interval=0) == 3   # (2 + 4) / 2 other runnable tasks
