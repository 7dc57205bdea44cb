"""Data-parallel evaluation and comparison (``distributed.py``): two real processes (gloo, CPU) give the
one-process numbers; device_map dispatch scores like a plain load; the launch flags are checked first."""
from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_core import compare_job, distributed, models
from lowrank_core.cli import main
from lowrank_core.commands import evaluate as evaluate_cmd
from lowrank_core.compare import CompareSettings, compare_models
from lowrank_core.data import Example
from lowrank_core.evaluate import evaluate, evaluate_models
from lowrank_core.models import ModelSourceError, load_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = (*distributed.SIZE_VARS, *distributed.RANK_VARS, *distributed.LOCAL_RANK_VARS,
               *distributed.LOCAL_SIZE_VARS, "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")
TOL = 1e-6
# (name, batch size): batch 1, and length-bucketed batches of 4 (64 examples sorted by length per window)
SETTINGS = {"b1": CompareSettings(examples=30, batch_size=1, bootstrap=300, worst=5, max_len=128, margin="2%"),
            "b4": CompareSettings(examples=30, batch_size=4, bootstrap=300, worst=5, max_len=128, margin="2%")}
CHILD_THREADS = 1  # each launched process (2 share the cores); the one-process reference runs at it too


def examples() -> list:
    """36 short examples and 4 whose prompt fills max_len=128 (skipped), in a fixed order."""
    words = "the quick brown fox jumps over a lazy dog while seven zebras quietly eat hay".split()
    out = [Example("", " ".join(words[: 2 + i % 9]) + f" {i}?", " ".join(reversed(words[: 3 + (i * 7) % 12])))
           for i in range(36)]
    for j in (3, 11, 20, 29):
        out.insert(j, Example("", "long " * 60 + str(j), "never scored"))
    return out


def models_for_test():
    """(teacher, students, tokenizer): a tiny random Llama and two perturbed copies, the same in every process."""
    teacher, tok = tiny_model("llama", seed=0)
    students = {}
    for name, scale, seed in (("near", 0.05, 1), ("far", 0.5, 2)):
        torch.manual_seed(seed)
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(scale * p.abs().mean() * torch.randn_like(p))
        students[name] = student
    return teacher, students, tok


def score_all(world=None) -> dict:
    """Every result the exactness test checks: comparisons at two batch sizes, evaluations at two."""
    teacher, students, tok = models_for_test()
    out = {"compare": {}, "evaluate": {}}
    for label, settings in SETTINGS.items():
        out["compare"][label] = compare_models(teacher, students, tok, examples(), settings, world=world)
    for batch_size in (1, 3):
        out["evaluate"][batch_size] = evaluate_models({"teacher": teacher, **students}, tok, examples(), n=30,
                                                      batch_size=batch_size, max_len=128, world=world)
    return out


def _worker(rank: int, size: int, port: int, folder: str) -> None:
    """One process of a launch: the variables torchrun sets, then the engine under ``distributed.init``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init("cpu", timeout=120) == (rank, size)
    try:
        assert distributed.active_world() == (rank, size) and distributed.is_main() == (rank == 0)
        assert distributed.gather_objects([rank, rank]) == [0, 0, 1, 1][: 2 * size]
        assert torch.get_num_threads() == CHILD_THREADS  # LOWRANK_THREADS in the test's environment
        out = score_all()
        with open(Path(folder) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        distributed.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_launch(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOWRANK_THREADS", str(CHILD_THREADS))
    monkeypatch.setenv("OMP_NUM_THREADS", str(CHILD_THREADS))


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS=str(CHILD_THREADS), LOWRANK_THREADS=str(CHILD_THREADS), PYTHONPATH=str(ROOT))
    return env


def at_child_threads(work):
    """``work()`` in this process at the launched processes' thread count: the one-process reference must
    sum in the same order as the ranks it is compared with (float sums depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(CHILD_THREADS)
    try:
        return work()
    finally:
        torch.set_num_threads(before)


def close(a, b) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(a), abs(b))


def assert_same_comparison(one, two) -> None:
    assert two.keys == one.keys  # stream order, not rank order
    assert list(two.tokens) == list(one.tokens) and list(two.agree) == list(one.agree)
    for field in ("teacher", "student", "kl"):
        assert all(close(a, b) for a, b in zip(getattr(one, field), getattr(two, field))), field
    s1, s2 = one.summary(), two.summary()
    for key in ("examples", "tokens", "skipped", "stopped", "fingerprint", "verdict", "ci_level", "bootstrap",
                "more_examples", "alpha"):
        assert s2[key] == s1[key], key
    for key in ("teacher_loss", "student_loss", "delta", "delta_se", "p_value", "margin", "tost_p", "kl",
                "top1_agreement"):
        assert close(s2[key], s1[key]), (key, s1[key], s2[key])
    for key in ("delta_ci", "tost_ci"):
        assert all(close(a, b) for a, b in zip(s1[key], s2[key])), key
    assert [(w["key"], w["tokens"]) for w in s2["worst"]] == [(w["key"], w["tokens"]) for w in s1["worst"]]
    assert all(close(a["delta"], b["delta"]) for a, b in zip(s1["worst"], s2["worst"]))
    p1, p2 = one.interval_path(points=5), two.interval_path(points=5)
    assert [r["examples"] for r in p2] == [r["examples"] for r in p1]
    assert all(close(a[k], b[k]) for a, b in zip(p1, p2) for k in ("lo", "hi"))


# ----------------------------------------------------------------------------- helpers, one process
def test_shard_is_deterministic_and_covers_every_item_once():
    items = [f"x{i}" for i in range(11)]
    shards = [list(distributed.shard(items, rank, 3)) for rank in range(3)]
    assert shards[1] == [(1, "x1"), (4, "x4"), (7, "x7"), (10, "x10")]
    assert sorted(pair for shard in shards for pair in shard) == list(enumerate(items))
    assert list(distributed.shard(iter(items), 1, 3)) == shards[1]  # lazily, from any iterable
    with pytest.raises(ValueError, match="rank"):
        list(distributed.shard(items, 3, 3))


def test_one_process_without_launch_variables(no_launch, monkeypatch):
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.gather_objects([3, 1]) == [3, 1] and distributed.gather("x") == ["x"]
    assert distributed.rank_device("cpu") == torch.device("cpu")
    distributed.finish()  # nothing to destroy
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="2 processes but MASTER_ADDR, MASTER_PORT not set"):
        distributed.init("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        distributed.init("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ModelSourceError, match="CUDA is not available") if not torch.cuda.is_available() else \
            pytest.raises(ValueError, match="one GPU for all 2 processes"):
        distributed.rank_device("cuda:0")


def test_accelerate_cpu_launcher_running_one_process_is_named(no_launch, monkeypatch):
    assert distributed.one_process_launch() is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "accelerate launch --multi_gpu --num_processes N" in distributed.one_process_launch()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # accelerate launch --cpu --mpirun_hostfile: mpirun's ranks
    assert distributed.one_process_launch() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert distributed.env_world() == (1, 2) and distributed.local_rank() == 1


def test_world_of_one_is_the_plain_pass(no_launch):
    """``world=(0, 1)`` and the default (no process group) are the unchanged one-process pass."""
    teacher, students, tok = models_for_test()
    a = compare_models(teacher, students, tok, examples(), SETTINGS["b4"])
    b = compare_models(teacher, students, tok, examples(), SETTINGS["b4"], world=(0, 1))
    assert a["far"].rows() == b["far"].rows() and a["far"].summary()["delta"] == b["far"].summary()["delta"]


@pytest.mark.parametrize("size", [3, 9])
def test_ranks_merge_into_the_one_process_result_in_process(size, monkeypatch, no_launch):
    """N ranks simulated in this process (each rank's gather payload recorded, then handed to a last rank-0
    pass): the merge gives the one-process result, also with more ranks than batches (size 9, 8 batches)."""
    teacher, students, tok = models_for_test()
    settings = CompareSettings(examples=30, batch_size=4, bootstrap=200, worst=5, max_len=128)

    def run(world, fake):
        monkeypatch.setattr(distributed, "gather", fake)
        return (compare_models(teacher, students, tok, examples(), settings, world=world),
                evaluate_models({"teacher": teacher, **students}, tok, examples(), n=30, batch_size=4, max_len=128,
                                world=world))

    parts: dict = {"compare": [], "evaluate": []}
    for rank in range(size):
        calls = iter(("compare", "evaluate"))
        run((rank, size), lambda obj: parts[next(calls)].append(obj) or [obj])
    calls = iter(("compare", "evaluate"))
    merged_c, merged_e = run((0, size), lambda obj: parts[next(calls)])
    one_c, one_e = run((0, 1), lambda obj: pytest.fail("one process gathers nothing"))
    for name in students:
        assert_same_comparison(one_c[name], merged_c[name])
    for name, r in one_e.items():
        got = merged_e[name]
        assert (got.tokens, got.examples, got.fingerprint) == (r.tokens, r.examples, r.fingerprint)
        assert close(got.loss, r.loss)


# ----------------------------------------------------------------------------- two real processes
def test_two_processes_give_the_one_process_comparison_and_evaluation(tmp_path, no_launch):
    """2 processes (torch.multiprocessing.spawn, gloo, 1 thread each) against this process: per-example rows,
    Δ, interval, p, TOST, verdict, worst list, interval path and evaluation losses equal to 1e-6 (relative),
    at batch 1 and with length-bucketed batches of 4, with skipped examples and an n below the stream."""
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    single = at_child_threads(score_all)
    for out in ranks:  # every rank holds the whole result
        for label in SETTINGS:
            for name in ("near", "far"):
                one, two = single["compare"][label][name], out["compare"][label][name]
                assert one.examples == 30 and one.skipped == 4
                assert_same_comparison(one, two)
        for batch_size, results in single["evaluate"].items():
            for name, r in results.items():
                got = out["evaluate"][batch_size][name]
                assert (got.tokens, got.examples, got.skipped, got.fingerprint) == \
                    (r.tokens, r.examples, r.skipped, r.fingerprint)
                assert close(got.loss, r.loss) and close(got.perplexity, r.perplexity)
    assert ranks[0]["compare"]["b4"]["far"].rows() == ranks[1]["compare"]["b4"]["far"].rows()
    # the comparison's means are the evaluation's (same examples, same tokens)
    c, e = single["compare"]["b1"]["far"], single["evaluate"][1]
    assert c.eval_result("teacher").fingerprint != "" and c.eval_result("student").tokens == e["far"].tokens
    assert close(c.loss("student"), e["far"].loss) and close(c.loss("teacher"), e["teacher"].loss)


# ----------------------------------------------------------------------------- the CLI under a launcher
def _launch(launcher: list, argv: list, tmp_path: Path) -> tuple[dict, str]:
    proc = subprocess.run([*launcher, *argv], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def torchrun() -> list:
    """``torchrun --nproc_per_node 2 -m -- lowrank_core``: the ``--`` keeps torchrun's parser off ``--n``
    (an ambiguous prefix of its own flags)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "--", "lowrank_core"]


@pytest.mark.integration
def test_cli_compare_and_evaluate_under_torchrun_print_the_one_process_record(tmp_path, capsys, no_launch):
    """``torchrun --nproc_per_node 2 -m -- lowrank_core compare|evaluate ...``: one JSON object (rank 0's),
    one CSV, and the numbers of the one-process run (timings aside)."""
    common = ["--data", "chatterbot", "--max-len", "64"]
    argv = ["compare", "--teacher", "tiny", "--student", "all:k0.5", *common, "--calib", "8", "--n", "20",
            "--eval-max-len", "64", "--eval-batch-size", "4", "--bootstrap", "200", "--json"]
    two, _ = _launch(torchrun(), [*argv, "--per-example", str(tmp_path / "two.csv")], tmp_path)
    assert at_child_threads(lambda: main([*argv, "--per-example", str(tmp_path / "one.csv")])) == 0
    one = json.loads(capsys.readouterr().out)
    assert two.pop("processes") == 2
    for record in (one, two):
        assert record.pop("threads") == CHILD_THREADS and record.pop("runtime")["threads"] == CHILD_THREADS
        for s in record["students"]:
            s.pop("seconds")
    assert two == one
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    argv = ["evaluate", "--model", "tiny", *common, "--n", "20", "--batch-size", "3", "--json"]
    two, err = _launch(torchrun(), argv, tmp_path)
    assert at_child_threads(lambda: main(argv)) == 0
    one = json.loads(capsys.readouterr().out)
    assert two.pop("processes") == 2 and two.pop("seconds") > 0 and one.pop("seconds") > 0
    for record in (one, two):
        assert record.pop("threads") == CHILD_THREADS and record.pop("runtime")["threads"] == CHILD_THREADS
    assert two == one


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="no accelerate launcher")
def test_cli_evaluate_under_accelerate_launch(tmp_path, capsys, no_launch):
    """``accelerate launch --multi_gpu --num_processes 2 -m lowrank_core evaluate ...`` on a CPU machine: the
    two processes join with gloo and print the one-process record once."""
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "lowrank_core"]
    argv = ["evaluate", "--model", "tiny", "--data", "chatterbot", "--max-len", "64", "--n", "12", "--json"]
    if torch.cuda.is_available():
        argv += ["--device", "cpu"]
    two, _ = _launch(launcher, argv, tmp_path)
    assert at_child_threads(lambda: main(argv)) == 0
    one = json.loads(capsys.readouterr().out)
    assert two.pop("processes") == 2 and two.pop("seconds") > 0 and one.pop("seconds") > 0
    for record in (one, two):
        assert record.pop("threads") == CHILD_THREADS and record.pop("runtime")["threads"] == CHILD_THREADS
    assert two == one


# ----------------------------------------------------------------------------- device_map
@pytest.fixture
def tiny_folder(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    folder = tmp_path / "tiny-folder"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_device_map_auto_scores_like_the_plain_load(tiny_folder, no_launch):
    plain = load_model(str(tiny_folder))
    exs = examples()
    reference = evaluate(plain.model, plain.tokenizer, exs, n=20, batch_size=3, max_len=128)
    for device_map in models.DEVICE_MAPS:
        placed = load_model(str(tiny_folder), device_map=device_map)
        expected = "cuda:0" if torch.cuda.is_available() else "cpu"
        assert placed.device == expected and getattr(placed.model, "hf_device_map", None) is not None
        assert placed.fingerprint == plain.fingerprint or torch.cuda.is_available()
        got = evaluate(placed.model, placed.tokenizer, exs, n=20, batch_size=3, max_len=128)
        assert (got.tokens, got.fingerprint) == (reference.tokens, reference.fingerprint)
        assert got.loss == pytest.approx(reference.loss, rel=TOL, abs=TOL)
    built = load_model("tiny", device_map="auto")  # built in memory: dispatched by accelerate
    assert getattr(built.model, "hf_device_map", None) is not None
    got = evaluate(built.model, built.tokenizer, exs, n=20, batch_size=3, max_len=128)
    assert got.loss == pytest.approx(reference.loss, rel=TOL, abs=TOL)


def test_input_device_follows_the_embedding_hook():
    model, _ = tiny_model("llama", seed=0)
    assert models.input_device(model) == torch.device("cpu")

    class Hook:
        execution_device = 1

    model.get_input_embeddings()._hf_hook = Hook()
    assert models.input_device(model) == torch.device("cuda", 1)


def test_bad_device_map_values_are_refused():
    with pytest.raises(ModelSourceError, match="allowed: auto, balanced, balanced_low_0, sequential"):
        load_model("tiny", device_map="everywhere")
    with pytest.raises(ModelSourceError, match="leave the device at 'auto'"):
        load_model("tiny", device="cpu", device_map="auto")


@pytest.fixture
def no_loading(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError(f"load_model{args} ran: the bad input was not refused before the work")

    for module in (models, compare_job, evaluate_cmd):
        monkeypatch.setattr(module, "load_model", loaded)


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "tiny", "--device-map", "everywhere"], "--device-map 'everywhere' is not allowed"),
    (["evaluate", "--model", "tiny", "--device", "cpu", "--device-map", "auto"], "leave the device at 'auto'"),
    (["compare", "--teacher", "tiny", "--student", "all:k0.5", "--device-map", "gpu"],
     "allowed: auto, balanced, balanced_low_0, sequential"),
])
def test_cli_refuses_a_bad_device_map_before_loading(argv, message, capsys, no_loading, no_launch):
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in captured.err
    assert captured.out == ""


def test_device_map_in_a_launch_of_several_processes_is_refused():
    with pytest.raises(Exception, match="launch of 2 processes"):
        evaluate_cmd.check_device_map_flag("auto", "auto", size=2)
    evaluate_cmd.check_device_map_flag(None, "cuda:1", size=2)  # no map: nothing to refuse here


def test_cli_evaluate_with_device_map_matches_the_plain_run(tiny_folder, capsys, no_launch):
    argv = ["evaluate", "--model", str(tiny_folder), "--data", "chatterbot", "--n", "8", "--max-len", "64", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--device-map", "auto"]) == 0
    placed = json.loads(capsys.readouterr().out)
    assert placed["device_map"] == "auto" and placed["tokens"] == plain["tokens"]
    assert placed["loss"] == pytest.approx(plain["loss"], rel=TOL, abs=TOL)
