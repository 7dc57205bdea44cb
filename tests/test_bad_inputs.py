"""Bad input: refused with exit status 2 and one line naming the bad value, before any work where it can be.

The cases are ``bench/bad_inputs.py``'s (the same runs that write ``docs/bad-inputs.md``), one test per item
of the issue: A (output paths and options checked before any model loads), B (tracebacks that are one line
now), C (silently wrong results that are refused or reported now), D (the CLI's top-level handler), E (the
bad-input table). Every refused case also checks that nothing was written.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from lowrank_core import cli, compare_job, job, models, search_job
from lowrank_core.commands import count, evaluate, spectrum
from lowrank_core.compress import compress
from lowrank_core.data import make_split
from lowrank_core.data.split import _check_fractions
from lowrank_core.models import ModelSourceError
from lowrank_core.paths import OutputPathError, check_output_file, check_output_folder
from lowrank_core.plan import PlanError, load_plan

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bad_inputs.py"
_spec = importlib.util.spec_from_file_location("bad_inputs", BENCH)
bad_inputs = sys.modules.setdefault("bad_inputs", importlib.util.module_from_spec(_spec))  # dataclasses need it
_spec.loader.exec_module(bad_inputs)


def cases(item: str, rc: int = 2) -> list:
    return [pytest.param(c, id=c.id) for c in bad_inputs.CASES if c.item == item and c.rc == rc]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """(root, fills): the bench's fixtures in a scratch folder."""
    root = tmp_path_factory.mktemp("bad-inputs").resolve()
    fills = bad_inputs.fixtures(root)
    yield root, fills
    bad_inputs.release(root)


@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights fails the test: what ``before_load`` cases refuse must be refused before it."""
    def loaded(*args, **kwargs):
        raise AssertionError(f"load_model{args} ran: the bad input was not refused before the work")

    for module in (models, job, compare_job, search_job, evaluate, spectrum):
        monkeypatch.setattr(module, "load_model", loaded)


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "readonly" not in p.parts}


def run(case, scratch, request) -> "bad_inputs.Outcome":
    """Run ``case`` (skipped when its fixture is missing here), checking that it wrote nothing."""
    root, fills = scratch
    if any(fills.get(n) is None for n in case.needs):
        pytest.skip(f"no {', '.join(case.needs)} on this machine")
    if case.before_load:
        request.getfixturevalue("no_loading")
    before = tree(root)
    outcome = bad_inputs.run_case(case, root, fills)
    assert tree(root) == before, "a refused input left files behind"
    for value in bad_inputs.filled(case.argv, fills):
        if value.startswith("/sys/"):
            assert not Path(value).exists()
    return outcome


def check_refused(case, outcome, fills) -> None:
    """Exit status 2, one ``error:`` line naming the bad value and what is allowed, no traceback."""
    assert outcome.rc == case.rc == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    errors = [line.strip() for chunk in outcome.stderr.split("\r") for line in chunk.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == outcome.message, outcome.stderr
    for expected in bad_inputs.filled(case.expect, fills):
        assert expected in outcome.message
    assert outcome.stdout == ""


# ----------------------------------------------------------------------------- A: before the work
@pytest.mark.parametrize("case", cases("A"))
def test_A_output_paths_and_options_fail_before_any_model_loads(case, scratch, request):
    check_refused(case, run(case, scratch, request), scratch[1])


def test_A_paths_helper_walks_up_to_the_first_existing_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert check_output_folder(tmp_path / "new" / "deeper" / "export", "--export") == tmp_path / "new/deeper/export"
    with pytest.raises(OutputPathError, match=r"afile is a file, not a folder"):
        check_output_folder(tmp_path / "afile" / "a" / "b", "--export")
    with pytest.raises(OutputPathError, match=r"is a folder; name a file"):
        check_output_file(tmp_path, "--out")
    assert not any(p.name.startswith(".lowrank-write-check") for p in tmp_path.iterdir())


def test_A_job_spec_validate_checks_the_export_parent_for_every_face(scratch):
    """The app and recipes validate through ``JobSpec.validate``, as the CLI does."""
    root, _ = scratch
    spec = job.JobSpec(plan="mlp:r4", model=job.ModelSpec(source="tiny"),
                       export=job.ExportSpec(dir=str(root / "afile" / "student")))
    with pytest.raises(OutputPathError, match="afile is a file, not a folder"):
        spec.validate()
    with pytest.raises(OutputPathError, match="export target ' ' is an empty path"):
        job.JobSpec(plan="mlp:r4", model=job.ModelSpec(source="tiny"), export=job.ExportSpec(dir=" ")).validate()


# ----------------------------------------------------------------------------- B: one line, not a traceback
@pytest.mark.parametrize("case", cases("B"))
def test_B_former_tracebacks_are_one_line(case, scratch, request):
    check_refused(case, run(case, scratch, request), scratch[1])


def test_B_the_engine_refuses_a_factorized_teacher_and_an_empty_plan(scratch):
    root, _ = scratch
    examples = make_split("chatterbot", n_calib=2, n_eval=0).calib
    fact = models.load_model(str(root / "fact"), device="cpu")
    with pytest.raises(ModelSourceError, match=r"already factorized \(model.layers.0.mlp.gate_proj is a LowRankLinear"):
        compress(fact.model, fact.tokenizer, "attn:r4", examples)
    teacher, tokenizer = models.tiny_model()
    with pytest.raises(PlanError, match="replaces no matrix"):
        compress(teacher, tokenizer, "0:mlp:r4; mlp:dense", examples)


# ----------------------------------------------------------------------------- C: silently wrong
@pytest.mark.parametrize("case", cases("C"))
def test_C_silently_wrong_inputs_are_refused(case, scratch, request):
    check_refused(case, run(case, scratch, request), scratch[1])


def test_C_non_finite_losses_are_refused_and_json_is_strict(scratch, monkeypatch, capsys):
    root, _ = scratch
    monkeypatch.setattr(models, "check_finite", lambda *args, **kwargs: None)  # let the NaN model load
    monkeypatch.chdir(root)
    assert cli.main(["evaluate", "--model", "nan", "--data", "chatterbot", "--n", "2", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error: model: the answer loss on 2 examples is nan" in captured.err
    with pytest.raises(cli.CliError, match=r"holds nan at students\[1\]\.kl"):
        cli.print_json({"students": [{"kl": 0.5}, {"kl": math.nan}]})
    with pytest.raises(cli.CliError, match=r"holds inf at loss"):
        cli.print_json({"loss": math.inf})
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("case", cases("C", rc=0))
def test_C_successful_runs_report_warnings_and_dropped_records(case, scratch, request):
    outcome = run(case, scratch, request)
    assert outcome.rc == 0 and "Traceback" not in outcome.stderr
    assert all(expected in outcome.message for expected in case.expect)
    if "--json" in case.argv:  # compress: the plan's warnings on stderr and in the record, like count prints,
        record = json.loads(outcome.stdout)  # then the calibration's (4 examples: a 1-example held-out check)
        stderr = [line.split("warning: ", 1)[1] for line in outcome.stderr.splitlines() if "warning: " in line]
        assert record["warnings"] == stderr == record["accounting"]["warnings"] + record["compress"]["warnings"]
        assert any("held-out check is 1 example" in w for w in record["compress"]["warnings"])
        assert sum("above the break-even rank" in w for w in stderr) == 6
        assert any("lm_head is tied to the embedding" in w for w in stderr)


def test_C_split_counts_dropped_records_by_reason(scratch):
    root, _ = scratch
    split = make_split(str(root / "holes.jsonl"), n_calib=0, n_eval=0, n_val=0)
    assert split.info.dropped == {}  # nothing asked, nothing read
    with pytest.raises(ValueError, match=r"ran out after 1 examples \(3 records dropped \(1 duplicate, 1 empty "
                                         r"response, 1 missing question\)\)"):
        make_split(str(root / "holes.jsonl"), n_calib=5, n_eval=5)
    split = make_split("chatterbot", n_calib=4, n_eval=4)
    assert split.info.to_dict()["dropped"] == split.info.dropped and all(n > 0 for n in split.info.dropped.values())


@pytest.mark.parametrize("rule,key", [({"modules": ["mlp"], "dense": "true"}, "dense"),
                                      ({"modules": ["mlp"], "keep": False}, "keep"),
                                      ({"modules": ["mlp"], "keep": "0.5"}, "keep"),
                                      ({"modules": ["mlp"], "rank": 4.0}, "rank"),
                                      ({"modules": ["mlp"], "rank": 4, "layers": True}, "layers"),
                                      ({"modules": [3], "rank": 4}, "modules")])
def test_C_plan_values_are_typed(rule, key):
    with pytest.raises(PlanError, match=rf"plan rule 2 .*: {key} must be"):
        load_plan({"rules": [{"modules": ["attn"], "rank": 4}, rule]})
    assert load_plan({"rules": [{"modules": ["mlp"], "rank": 4, "dense": False, "layers": 1}]}).rules[0].rank == 4


# ----------------------------------------------------------------------------- D: the top-level handler
@pytest.mark.parametrize("case", cases("D"))
def test_D_expected_failures_are_one_line_with_status_2(case, scratch, request):
    outcome = run(case, scratch, request)
    assert outcome.rc == 2 and "Traceback" not in outcome.stderr
    assert all(expected in outcome.message for expected in case.expect)
    assert len([line for line in outcome.stderr.splitlines() if "error:" in line]) == 1


def test_D_unexpected_failures_keep_their_traceback(monkeypatch, capsys):
    assert not {ValueError, Exception, OSError, RuntimeError} & set(cli.USER_ERRORS)  # an explicit set

    def bug(*args, **kwargs):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(count, "account", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["count", "--model", "tiny", "--plan", "mlp:r4"])
    monkeypatch.setattr(count, "account", lambda *a, **k: {}["missing"])
    with pytest.raises(KeyError):
        cli.main(["count", "--model", "tiny", "--plan", "mlp:r4"])
    # a plain ValueError that lowrank's own code raises names a bad value: a user error
    monkeypatch.setattr(count, "account", lambda *a, **k: _check_fractions(2.0, 0.0))
    assert cli.main(["count", "--model", "tiny", "--plan", "mlp:r4"]) == 2
    assert capsys.readouterr().err == "error: eval_fraction 2.0 must be strictly between 0 and 1\n"


# ----------------------------------------------------------------------------- E: the table
def test_E_the_bad_input_table_lists_every_case_as_run():
    """``docs/bad-inputs.md`` is ``bench/bad_inputs.py``'s output: one row per case, its exit code as run."""
    doc = bad_inputs.DOC.read_text()
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in doc.splitlines()
                                          if line.startswith("| ") and not line.startswith("| case"))}
    assert set(rows) == {case.id for case in bad_inputs.CASES}
    for case in bad_inputs.CASES:
        _, _, rc, message = rows[case.id]
        assert rc == str(case.rc) and all(e in message for e in case.expect if "{" not in e), case.id


@pytest.mark.parametrize("case", cases("E"))
def test_E_inputs_refused_before_stay_refused(case, scratch, request):
    check_refused(case, run(case, scratch, request), scratch[1])
