"""One job behind every face: the CLI, a recipe and the app's backend build the same student (identical
factors) and write the same manifest from the same JobSpec; flags and recipe keys come from the specs."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import yaml
from safetensors.torch import load_file

from lowrank_core import methods
from lowrank_core.cli import COMMANDS, build_parser, main
from lowrank_core.commands.compress import job_from_args
from lowrank_core.compress import CompressSettings
from lowrank_core.data import make_split
from lowrank_core.export import read_manifest
from lowrank_core.heal import HealSettings
from lowrank_core.job import DataSpec, EvalSpec, ExportSpec, JobSpec, ModelSpec, evaluate_job, export_job
from lowrank_core.models import load_model
from lowrank_core.options import options_of
from lowrank_core.plan import PlanOptions
from lowrank_core.recipe import load_recipe

PLAN = "mlp:r8; 1:attn:k0.5"


def _spec(export_dir) -> JobSpec:
    return JobSpec(plan=PLAN, name="same", model=ModelSpec(source="tiny"),
                   data=DataSpec(source="chatterbot", seed=1, calib=8, eval=4),
                   method=CompressSettings(method="whitened", max_len=64, batch_size=2,
                                           valid_fraction=0.25),
                   evaluate=EvalSpec(max_len=64),
                   export=ExportSpec(dir=str(export_dir), format="factorized", verify_examples=2))


def _argv(spec: JobSpec) -> list[str]:
    """The compress command line a user would type for ``spec``."""
    return ["compress", "--model", spec.model.source, "--data", spec.data.source, "--seed", str(spec.data.seed),
            "--calib", str(spec.data.calib), "--eval", str(spec.data.eval), "--plan", PLAN,
            "--method", spec.method.method, "--max-len", str(spec.method.max_len),
            "--batch-size", str(spec.method.batch_size), "--valid-fraction", str(spec.method.valid_fraction),
            "--eval-max-len", str(spec.evaluate.max_len), "--export", spec.export.dir,
            "--format", spec.export.format, "--verify-examples", str(spec.export.verify_examples), "--json"]


def _comparable(manifest: dict) -> dict:
    """A manifest without what must differ between two runs: times, the job's name and export folder."""
    m = copy.deepcopy(manifest)
    m.pop("created")
    for side in ("teacher", "student"):
        m["metrics"][side].pop("seconds")
    m["comparison"].pop("seconds")
    m["job"].pop("name")
    m["job"]["export"].pop("dir")
    return m


def _tensors(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_cli_recipe_and_app_build_the_same_student_and_manifest(tmp_path, capsys):
    from ui import jobs
    from ui.state import Settings

    # the CLI
    cli_spec = _spec(tmp_path / "cli")
    argv = _argv(cli_spec)
    parsed = job_from_args(build_parser().parse_args(argv))
    assert dataclasses.replace(parsed, name="same") == cli_spec  # the flags give exactly this spec
    assert main(argv) == 0
    cli_record = json.loads(capsys.readouterr().out)

    # a recipe: the spec's own recipe form, read back
    recipe_spec = _spec(tmp_path / "recipe")
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(recipe_spec.to_dict()))
    assert load_recipe(path) == recipe_spec
    assert main(["run", str(path), "--json"]) == 0
    recipe_record = json.loads(capsys.readouterr().out)

    # the app's backend: its own choices -> JobSpec, the cached model and split, then the Export page's call
    app_target = _spec(tmp_path / "app")
    settings = Settings(model_source="tiny", data_source="chatterbot", n_calib=8, n_eval=4, seed=1, max_len=64)
    form = dataclasses.replace(app_target.method, calib=8)  # the Compress form's "Calibration examples"
    app_spec = jobs.job_spec(settings, app_target.plan, form)
    app_spec = dataclasses.replace(app_spec, name="same", evaluate=app_target.evaluate, export=app_target.export)
    assert app_spec == app_target
    lm = load_model(settings.model_source, dtype=settings.dtype, device=settings.device)
    split = make_split(settings.data_source, n_calib=settings.n_calib, n_eval=settings.n_eval, n_val=settings.n_val,
                       seed=settings.seed)
    job = jobs.run_app_job(app_spec, lm, split, progress=None)
    evaluate_job(job)
    export_job(job, app_spec.export)

    folders = [tmp_path / "cli", tmp_path / "recipe", tmp_path / "app"]
    tensors = [_tensors(f) for f in folders]
    factor_keys = [k for k in tensors[0] if k.endswith((".down.weight", ".up.weight"))]
    assert len(factor_keys) == 2 * (2 * 3 + 4)  # mlp of both layers, attention of layer 1
    for other in tensors[1:]:
        assert other.keys() == tensors[0].keys()
        for k in tensors[0]:
            assert other[k].equal(tensors[0][k]), k
    manifests = [read_manifest(f) for f in folders]
    assert manifests[0]["verification"]["reload_loss"] is not None
    assert _comparable(manifests[1]) == _comparable(manifests[0])
    assert _comparable(manifests[2]) == _comparable(manifests[0])
    # the printed records agree with each other and with the app's result
    assert cli_record["student_loss"] == recipe_record["student_loss"] == job.evaluation["student"].loss
    assert cli_record["split"] == recipe_record["split"] == split.info.to_dict()


def test_every_compress_flag_comes_from_a_spec_field():
    """No hand-written option: each flag of ``compress`` (but --plan/--json/--help) is a spec field's."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["compress"]
    flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
    derived = set()
    own = tuple((cls, f"{name}-") for name, cls in methods.settings_classes().items())  # each method's settings
    for cls, prefix in ((ModelSpec, ""), (DataSpec, ""), (PlanOptions, ""), (CompressSettings, ""), *own,
                        (HealSettings, "heal-"), (EvalSpec, "eval-"), (ExportSpec, "")):
        for opt in options_of(cls):
            if opt.derived or opt.nested is not None or opt.sections_spec is not None:
                continue
            name = opt.flag or f"--{prefix}{opt.name.replace('_', '-')}"
            derived.add(name)
            if bool in opt.types and opt.default is True:
                derived.add("--no-" + name[2:])
    assert flags - derived == {"--plan", "--json", "--help"}
    assert derived <= flags


def test_defaults_live_in_the_dataclasses(tmp_path):
    """Changing nothing on the command line or in a recipe gives the dataclass defaults."""
    args = build_parser().parse_args(["compress", "--plan", "mlp:r8"])
    spec = job_from_args(args)
    assert spec == JobSpec(plan="mlp:r8", name="compress")
    assert load_recipe({"plan": "mlp:r8", "name": "compress"}) == spec


@pytest.mark.parametrize("argv,message", [
    (["--calib", "0"], "--calib: 0 is below the minimum 1"),
    (["--format", "dense"], "export options --format need --export DIR"),
    (["--device", "tpu"], "--device: 'tpu' is not one of auto, cpu, cuda or cuda"),
])
def test_bad_flags_fail_before_any_work(argv, message, capsys):
    assert main(["compress", "--model", "tiny", "--plan", "mlp:r8"] + argv) == 2
    assert message in capsys.readouterr().err


def test_recipe_round_trip_keeps_every_setting(tmp_path):
    spec = _spec(tmp_path / "x")
    spec.method.of("refit").steps, spec.method.layerwise, spec.method.hidden_mse = 7, True, False
    assert load_recipe(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_its_help(command, capsys):
    """Help texts go through argparse's %-formatting: a literal '1%' in a derived help must not break it."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_late_write_failure_keeps_the_student_next_to_the_cache(tmp_path, monkeypatch):
    import lowrank_core.export.write as write
    from lowrank_core.export import ExportError, read_manifest
    from lowrank_core.job import run_job

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    real, calls = write._move_into_place, []

    def full_disk(tmp, target):
        calls.append(target)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(tmp, target)

    monkeypatch.setattr(write, "_move_into_place", full_disk)
    spec = _spec(tmp_path / "wanted")
    with pytest.raises(ExportError, match="saved unverified to") as failed:
        run_job(spec)
    rescued = calls[1]
    assert str(rescued) in str(failed.value) and rescued.parent == tmp_path / "cache" / "rescued"
    assert read_manifest(rescued)["plan"] == spec.plan.to_dict() and not (tmp_path / "wanted").exists()
