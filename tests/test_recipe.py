"""Recipes: schema validation naming the key, dry-run accounting, a whole tiny job through the CLI."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from lowrank_core.cli import main
from lowrank_core.job import dry_run
from lowrank_core.recipe import RecipeError, load_recipe, validate_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MISTRAL_CONFIG = Path(__file__).resolve().parent / "fixtures" / "mistral-7b-openorca-config.json"
TINY = {
    "model": {"source": "tiny"},
    "data": {"calib": 6, "eval": 6},
    "plan": "mlp:r8; attn:r8",
    "method": {"name": "svd"},
    "evaluate": {"examples": 6, "max_len": 256},
}


def with_change(path: str, value, base=TINY) -> dict:
    """A copy of ``base`` with the dotted key ``path`` set to ``value``."""
    data = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


@pytest.mark.parametrize("path,value,message", [
    ("export", {"format": "onnx", "dir": "x"}, "export.format: 'onnx' is not one of dense, factorized"),
    ("export", {"format": "dense"}, "export.dir: is required"),
    ("model.sourse", "tiny", "model.sourse: unknown key; allowed in model: source, dtype, device"),
    ("modle", {}, "modle: unknown key; allowed at the top level"),
    ("model.dtype", "float8", "model.dtype: 'float8' is not one of float32, bfloat16, float16"),
    ("model.device", "tpu", "model.device: 'tpu' is not one of auto, cpu, cuda"),
    ("data.calib", 0, "data.calib: 0 is below the minimum 1"),
    ("data.seed", "zero", "data.seed: 'zero' is not a int"),
    ("data.eval", True, "data.eval: True is not a int"),
    ("evaluate.examples", 7, "evaluate.examples: 7 is more than the split's data.eval = 6"),
    ("method.name", "qr", "method.name: 'qr' is not one of svd, whitened, refit"),
    ("method.refit.lr", "fast", "method.refit.lr: 'fast' is not a float"),
    ("method.refit.target", "weights", "method.refit.target: 'weights' is not one of block"),
    ("method.valid_fraction", 1.5, "method: valid_fraction 1.5 must be in"),
    ("method.refit.stepz", 3, "method.refit.stepz: unknown key"),
    ("plan", "mlp:q16", "plan: plan rule 1"),
    ("plan", {"rules": [{"modules": ["mlp"], "rank": -1}]}, "plan: plan rule 1 .*rank -1 is below 1"),
    ("model", "tiny", "model: expected a mapping"),
])
def test_bad_recipes_name_the_key(path, value, message):
    data = with_change(path, value)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_recipe(data)


def test_missing_plan_and_non_mapping_are_errors(tmp_path):
    with pytest.raises(RecipeError, match="plan: is required"):
        validate_recipe({k: v for k, v in TINY.items() if k != "plan"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_defaults_fill_every_section():
    r = validate_recipe(with_change("method", "svd"))  # shorthand for {name: svd}
    assert asdict(r.model) == {"source": "tiny", "dtype": "float32", "device": "auto"}
    assert asdict(r.data) == {"source": "default", "seed": 0, "calib": 6, "eval": 6, "val": 0}
    assert r.export is None and r.method.method == "svd" and r.method.of("refit").steps == 200
    settings = r.settings()
    assert (settings.method, settings.calib, settings.seed) == ("svd", 6, 0)


@pytest.mark.parametrize("name", ["smollm2-exp3.yaml", "mistral-7b-openorca-exp3.yaml"])
def test_example_recipes_are_valid_experiment_3(name):
    r = load_recipe(RECIPES / name)
    assert r.plan.to_dict() == {"rules": [{"layers": "17", "modules": ["mlp"], "rank": 16}]}
    assert r.method.method == "svd" and r.export.format in ("dense", "factorized")


def test_mistral_recipe_dry_run_gives_the_seed_number():
    data = yaml.safe_load((RECIPES / "mistral-7b-openorca-exp3.yaml").read_text())
    data["model"]["source"] = str(MISTRAL_CONFIG)  # offline: the model's config.json
    r = validate_recipe(data)
    assert (r.model.dtype, r.model.device, r.data.source) == \
        ("bfloat16", "cuda", "openaccess-ai-collective/oo-gpt4-filtered")
    acc = dry_run(r)
    assert acc.original == 7_241_748_480 and acc.compressed == 7_066_472_448


def test_cli_dry_run_prints_accounting(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_change("export", {"dir": str(tmp_path / "never")})))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "compressed" in out
    assert not (tmp_path / "never").exists()
    assert main(["run", str(path), "--dry-run", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc["compressed"] == dry_run(load_recipe(path)).compressed < acc["original"]
    assert len(acc["matrices"]) == 14


def test_cli_reports_recipe_errors(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_change("export", {"format": "onnx", "dir": "x"})))
    assert main(["run", str(path)]) == 2
    assert "export.format: 'onnx' is not one of dense, factorized" in capsys.readouterr().err


def test_run_tiny_recipe_end_to_end(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(with_change("export", {"format": "factorized", "dir": str(tmp_path / "out"),
                                                           "verify_examples": 3})))
    assert main(["run", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "[tiny] compressing 14 matrices with svd" in captured.err
    assert result["teacher"]["loss"] != result["student"]["loss"]
    assert result["accounting"]["compressed"] == result["export"]["parameters"]
    x = result["export"]
    assert x["verified"] and x["path"] == str(tmp_path / "out") and x["format"] == "factorized"
    assert x["reload_loss"] == pytest.approx(x["student_loss"], abs=1e-5)
    manifest = json.loads((tmp_path / "out" / "lowrank.json").read_text())
    assert manifest["job"]["name"] == "tiny" and manifest["method"]["name"] == "svd"
    assert manifest["metrics"]["student"]["loss"] == result["student"]["loss"]
    assert manifest["split"]["fingerprint"] == result["split"]["fingerprint"]
    # a second run is refused before any work, unless forced (here via the CLI override, as dense)
    assert main(["run", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["run", str(path), "--force", "--format", "dense"]) == 0
    out = capsys.readouterr().out
    assert "export       dense" in out and "verified" in out and "teacher" in out
    assert json.loads((tmp_path / "out" / "lowrank.json").read_text())["format"] == "dense"


@pytest.mark.integration
def test_embedded_recipe_small(tmp_path, capsys):
    """The embedded-model recipe, shrunk (few examples), exported factorized and verified."""
    data = yaml.safe_load((RECIPES / "smollm2-exp3.yaml").read_text())
    data["data"].update(calib=4, eval=4)
    data["evaluate"].update(examples=4, max_len=256)
    data["export"].update(dir=str(tmp_path / "smol"), format="factorized", verify_examples=0)  # logits only
    path = tmp_path / "smol.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["export"]["verified"] and result["export"]["max_logit_diff"] < 1e-3
    assert result["accounting"]["removed"] == 2_552_832
    assert result["export"]["ranks"] == {f"model.layers.17.mlp.{m}": 16 for m in ("gate_proj", "up_proj", "down_proj")}
    assert result["export"]["parameters"] == 134_515_008 - 2_552_832
