"""Thread policy: LOWRANK_THREADS wins, the cores are shared among a launch's processes, busy cores are left."""
import pytest

from lowrank_core import threads


def test_env_override_and_bad_values():
    assert threads.thread_count(env={"LOWRANK_THREADS": "3"}) == 3
    assert threads.thread_count(processes=8, env={"LOWRANK_THREADS": "3"}) == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match=f"LOWRANK_THREADS={bad!r} is not a thread count; allowed: an integer"):
            threads.thread_count(env={"LOWRANK_THREADS": bad})


def test_cores_are_divided_among_processes_and_busy_cores_left(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.thread_count(env={}) == 16
    assert threads.thread_count(processes=4, env={}) == 4
    assert threads.thread_count(processes=32, env={}) == 1
    monkeypatch.setattr(threads, "busy_cores", lambda: 12)   # another job keeps 12 cores busy
    assert threads.thread_count(env={}) == 4
    assert threads.thread_count(processes=2, env={}) == 2
    assert threads.thread_count(env={}, load_aware=False) == 16
    monkeypatch.setattr(threads, "busy_cores", lambda: 40)   # oversubscribed: still one thread
    assert threads.thread_count(env={}) == 1


def test_busy_cores_reads_runnable_tasks(monkeypatch, tmp_path):
    readings = iter(["0.5 0.4 0.3 3/200 99\n", "0.5 0.4 0.3 5/200 99\n"])

    class FakePath:
        def __init__(self, _):
            pass

        def read_text(self):
            return next(readings)
    monkeypatch.setattr(threads, "Path", FakePath)
    assert threads.busy_cores(samples=2, interval=0) == 3   # (2 + 4) / 2 other runnable tasks
