"""One spec and one function per workflow behind every face: the ``search`` command and the Search page build
the same ``SearchSpec`` and run ``search_job.run_search``; the ``compare`` command (``CompareSpec`` ->
``compare_job.run_compare``) and the Evaluate page (``job.evaluate_job``) score through the same paired
comparison, with equal results (tiny model, tiny sizes)."""
from __future__ import annotations

import dataclasses
import json

import pytest
from streamlit.testing.v1 import AppTest

from lowrank_core import compare_job, job, search_job, stats
from lowrank_core.cli import build_parser, main
from lowrank_core.commands import compare as compare_cmd
from lowrank_core.commands import search as search_cmd

from test_app import compressed, metrics, started, texts, tiny_env  # noqa: F401  (tiny_env: autouse)

SEARCH_ARGV = ["search", "--model", "tiny", "--data", "chatterbot", "--calib", "4", "--val", "2", "--eval", "4",
               "--max-len", "128", "--val-max-len", "128", "--budget", "2%", "--json"]


@pytest.fixture(autouse=True)
def forget_teacher_scores():
    yield
    from ui import cache

    cache.forget("teacher_eval")


def spy(monkeypatch, module, name: str) -> list:
    """Record every call of ``module.name`` (its first argument), still running the real function."""
    calls, real = [], getattr(module, name)

    def recorded(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "seconds"}


def test_cli_and_search_page_run_one_spec_through_run_search_with_equal_results(monkeypatch, capsys):
    cli_calls = spy(monkeypatch, search_cmd, "run_search")
    assert main(SEARCH_ARGV) == 0
    record = json.loads(capsys.readouterr().out)
    (cli_spec,) = cli_calls
    assert cli_spec == search_cmd.spec_from_args(build_parser().parse_args(SEARCH_ARGV))

    page_calls = spy(monkeypatch, search_job, "run_search")
    at = started("pages/search.py")
    for key, value in {"search_val": 2, "search_calib": 4, "search_eval": 4}.items():
        at.number_input(key=key).set_value(value)
    at.text_input(key="search_budget").set_value("2%")
    at.button(key="search_go").click().run()
    assert not at.exception and not at.error, (at.exception, texts(at.error))
    assert at.session_state["lowrank_pending_search"].wait(120)
    at.run()
    assert not at.exception, at.exception
    (app_spec,) = page_calls
    assert dataclasses.replace(app_spec, name=cli_spec.name) == cli_spec  # the page's choices give the same spec

    found = at.session_state["lowrank_search"]
    assert found["result"].plan.to_dict() == record["plan"] and found["result"].ranks == record["ranks"]
    assert found["result"].val_loss == record["val_loss"]
    paired = found["comparison"].summary()
    assert comparable(paired) == comparable(record["comparison"])  # the same paired comparison, to the bit
    assert record["eval_loss"] == paired["student_loss"] and record["eval_examples"] == paired["examples"] == 4
    assert record["eval_delta"] == pytest.approx(paired["delta"], abs=1e-12)
    # the page reports the paired comparison: Δ, its interval and the verdict sentence
    shown = metrics(at)
    assert shown["evaluation Δloss"] == f"{paired['delta']:+.4f}"
    assert shown["95% interval"] == stats.interval_text(paired["delta_ci"])
    assert paired["verdict_text"] in texts(at.success) + texts(at.error) + texts(at.warning)


def test_search_record_keeps_its_keys_and_adds_the_comparison(capsys):
    assert main(SEARCH_ARGV) == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("model", "data", "budget_arg", "plan", "ranks", "params_before", "params_after", "teacher_val_loss",
                "teacher_loss", "val_loss", "eval_loss", "eval_delta", "eval_examples", "eval_tokens", "pareto",
                "split", "out", "seconds", "comparison", "job"):
        assert key in record, key
    c = record["comparison"]
    assert record["teacher_loss"] == c["teacher_loss"] and record["eval_tokens"] == c["tokens"]
    assert c["verdict"] and record["teacher_val_loss"] != record["teacher_loss"]
    assert (c["delta_ci"] is None) == (c["examples"] < stats.MIN_INTERVAL_N)  # an interval only where it holds
    assert record["job"]["goal"]["budget"] == "2%" and record["job"]["data"]["val"] == 2


def test_a_bad_search_goal_fails_before_any_model_or_example_is_read(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the search started work before checking its goal")

    monkeypatch.setattr(search_job, "load_model", refused)
    monkeypatch.setattr(search_job, "make_split", refused)
    spec = search_cmd.spec_from_args(build_parser().parse_args([*SEARCH_ARGV[:-3], "--keep-params", "1.5"]))
    with pytest.raises(ValueError, match="keep fraction 1.5"):
        search_job.run_search(spec)


def test_cli_compare_and_evaluate_page_score_through_the_same_paired_comparison(monkeypatch, capsys):
    scored = spy(monkeypatch, job, "compare_models")  # evaluate_job's comparison
    streamed = spy(monkeypatch, compare_job, "compare_models")  # run_compare's
    runs = spy(monkeypatch, compare_cmd, "run_compare")
    argv = ["compare", "--teacher", "tiny", "--student", "mlp:r8", "--data", "chatterbot", "--calib", "16",
            "--max-len", "128", "--n", "4", "--eval-max-len", "128", "--until-decided", "--json"]  # the app's default
    assert main(argv) == 0
    (s,) = json.loads(capsys.readouterr().out)["students"]
    (cli_spec,) = runs
    assert cli_spec == compare_cmd.spec_from_args(build_parser().parse_args(argv)) and len(streamed) == 1

    at = compressed("mlp:r8")  # the app's student: the Compress page's job on the cached split
    at.switch_page("pages/evaluate.py").run()
    at.number_input(key="eval_n").set_value(4)
    at.button(key="eval_go").click().run()
    assert not at.exception, at.exception
    assert at.session_state["lowrank_pending_compare"].wait(120)
    at.run()
    assert not at.exception, at.exception
    assert len(scored) == 1  # the Evaluate page went through job.evaluate_job
    app_job = at.session_state["lowrank_results"][at.session_state["lowrank_current_job"]]
    (cli_job,) = cli_spec.jobs().values()
    assert app_job.spec.plan == cli_job.plan and app_job.spec.settings() == cli_job.settings()
    app = app_job.comparison_summary()
    keep = ("examples", "tokens", "fingerprint", "teacher_loss", "student_loss", "delta", "delta_ci", "p_value",
            "verdict", "verdict_text", "kl", "top1_agreement", "worst", "decided", "stopping_n", "procedure")
    assert {k: app[k] for k in keep} == {k: s[k] for k in keep}
    assert metrics(at)["Δ loss (student − teacher)"] == f"{s['delta']:+.4f}"


def test_compare_spec_refuses_bad_students_before_any_model_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(compare_job, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="given twice"):
        compare_job.run_compare(compare_job.CompareSpec(students=["mlp:r8", "mlp:r8"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        compare_job.run_compare(compare_job.CompareSpec(students=[str(tmp_path / "empty")]))
    with pytest.raises(ValueError, match="bad margin"):
        compare_job.run_compare(compare_job.CompareSpec(students=["mlp:r8"],
                                                        compare=dataclasses.replace(compare_job.CompareSettings(),
                                                                                    margin="lots")))
