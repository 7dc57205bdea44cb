"""Dense / factorized exports: reload without lowrank_core, equal losses, safe writing, verification."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from lowrank_core import __version__, export
from lowrank_core.arch import ARCHS
from lowrank_core.linears import count_parameters, linear_map
from lowrank_core.decompose import svd_factors
from lowrank_core.export import ExportError, ExportVerificationError, build_manifest, export_student, load_factorized
from lowrank_core.lowrank import LowRankLinear
from lowrank_core.models import tiny_model
from lowrank_core.plan import account, load_plan, resolve_plan
from lowrank_core.student import build_student

DENSE_PLAN = "mlp:r8"                     # lm_head stays tied to the embedding
FACTORIZED_PLAN = "all:r4; lm_head:r8"    # also the tied head: it becomes its own factors


def make_student(teacher, plan):
    """A student with every matrix of ``plan`` replaced by truncated-SVD factors."""
    assignments = resolve_plan(load_plan(plan), linear_map(teacher))
    replacements = {}
    for name, a in assignments.items():
        old = teacher.get_submodule(name)
        bias = old.bias.detach() if old.bias is not None else None
        replacements[name] = LowRankLinear.from_factors(svd_factors(old.weight.detach(), a.rank, bias))
    return build_student(teacher, replacements)


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 24))


def lm_loss(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def manifest_for(teacher, plan):
    return build_manifest(source="tiny", fingerprint="f00d", plan=plan, method="svd", settings={"calib": 8},
                          split={"source": "default", "seed": 0, "fingerprint": "abc"},
                          teacher_metrics={"loss": 5.5}, student_metrics={"loss": 5.6})


RELOAD_CODE = """
import json, sys
try:
    import lowrank_core  # noqa: F401
    raise SystemExit("lowrank_core must not be importable here")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
args = json.loads(sys.argv[1])
ids = torch.tensor(args["ids"])
out = {}
for name, spec in args["exports"].items():
    model = AutoModelForCausalLM.from_pretrained(spec["path"], trust_remote_code=spec["remote"]).eval()
    tok = AutoTokenizer.from_pretrained(spec["path"], trust_remote_code=spec["remote"])
    with torch.no_grad():
        result = model(input_ids=ids, labels=ids)
    out[name] = {"loss": result.loss.item(), "logits": result.logits.tolist(), "class": type(model).__name__,
                 "params": sum(p.numel() for p in model.parameters()),
                 "chat": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)}
out["lowrank_loaded"] = "lowrank_core" in sys.modules
print(json.dumps(out))
"""


def reload_isolated(folder: Path, exports: dict, ids) -> dict:
    """Load exports in ``python -I`` from a folder without the repo: lowrank_core cannot be imported there."""
    script = folder / "reload_check.py"
    script.write_text(RELOAD_CODE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(folder / "hf_modules")
    payload = {"ids": ids.tolist(), "exports": exports}
    proc = subprocess.run([sys.executable, "-I", str(script), json.dumps(payload)], cwd=folder, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny Llama (tied head): a dense export of a MLP-only student, a factorized export of an all-linears
    student (head included) and its dense twin, all reloaded once in an isolated subprocess."""
    folder = tmp_path_factory.mktemp("exports")
    teacher, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dense_student, fac_student = make_student(teacher, DENSE_PLAN), make_student(teacher, FACTORIZED_PLAN)
    results = {
        "dense": export_student(dense_student, tok, folder / "dense", "dense", manifest_for(teacher, DENSE_PLAN)),
        "fac": export_student(fac_student, tok, folder / "fac", "factorized", manifest_for(teacher, FACTORIZED_PLAN)),
        "fac_dense": export_student(fac_student, tok, folder / "fac_dense", "dense"),
    }
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 24))
    isolated = reload_isolated(folder, {"dense": {"path": results["dense"].path, "remote": False},
                                        "fac": {"path": results["fac"].path, "remote": True}}, ids)
    return dict(folder=folder, teacher=teacher, before=before, dense_student=dense_student, fac_student=fac_student,
                results=results, ids=ids, isolated=isolated)


def test_dense_export_loads_with_plain_transformers_without_lowrank_core(exported):
    teacher, student, ids = exported["teacher"], exported["dense_student"], exported["ids"]
    result, out = exported["results"]["dense"], exported["isolated"]
    assert result.verified and result.max_logit_diff < 1e-4
    assert all(torch.equal(exported["before"][k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert result.parameters == count_parameters(teacher)  # merged back: the teacher's shape
    names = {p.name for p in Path(result.path).iterdir()}
    assert {"config.json", "model.safetensors", "lowrank.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".py")) for n in names)
    assert not out["lowrank_loaded"] and out["dense"]["class"] == "LlamaForCausalLM"
    assert out["dense"]["params"] == count_parameters(teacher)
    assert out["dense"]["loss"] == pytest.approx(lm_loss(student, ids), abs=1e-4)
    assert out["dense"]["loss"] != pytest.approx(lm_loss(teacher, ids), abs=1e-4)  # really the student
    assert "<|im_start|>user" in out["dense"]["chat"]  # the chat template travels with the tokenizer


def test_factorized_export_reloads_both_ways_and_is_smaller(exported):
    teacher, student, ids = exported["teacher"], exported["fac_student"], exported["ids"]
    fac, dense, out = exported["results"]["fac"], exported["results"]["fac_dense"], exported["isolated"]
    expected_params = account(teacher.config, FACTORIZED_PLAN).compressed
    assert fac.verified and fac.max_logit_diff < 1e-5
    assert fac.bytes_on_disk < dense.bytes_on_disk and fac.weight_bytes < dense.weight_bytes / 2
    config = json.loads((Path(fac.path) / "config.json").read_text())
    ranks = {n: a.rank for n, a in resolve_plan(load_plan(FACTORIZED_PLAN), linear_map(teacher)).items()}
    assert config["lowrank_ranks"] == ranks == fac.ranks and ranks["lm_head"] == 8
    assert config["auto_map"] == {"AutoConfig": "modeling_lowrank.LowRankConfig",
                                  "AutoModelForCausalLM": "modeling_lowrank.LowRankForCausalLM"}
    assert config["architectures"] == ["LowRankForCausalLM"] and config["model_type"] == "lowrank_llama"
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in os.listdir(fac.path))

    loaded = load_factorized(fac.path)
    assert isinstance(loaded.model.lm_head, LowRankLinear)
    assert count_parameters(loaded.model) == expected_params == fac.parameters
    assert lm_loss(loaded.model, ids) == pytest.approx(lm_loss(student, ids), abs=1e-5)

    assert out["fac"]["class"] == "LowRankForCausalLM" and not out["lowrank_loaded"]
    assert out["fac"]["params"] == expected_params
    assert out["fac"]["loss"] == pytest.approx(lm_loss(student, ids), abs=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_factorized_roundtrip_other_architectures(tmp_path, ids, arch):
    """Every arch-table entry (e.g. Mistral: untied head, Qwen2: q/k/v biases -> up.bias) reloads through
    the remote-code path, whose modeling file subclasses the entry's transformers classes."""
    teacher, tok = tiny_model(arch)
    student = make_student(teacher, "attn:r4; 1:mlp:r4")
    result = export_student(student, tok, tmp_path / arch, "factorized")
    assert result.verified and result.max_logit_diff < 1e-5
    spec = ARCHS[arch]
    modeling = (tmp_path / arch / "modeling_lowrank.py").read_text()
    for line in (f'BASE_MODEL_TYPE = "{arch}"', f'BASE_CONFIG_CLASS = "{spec.hf_config}"',
                 f'BASE_MODEL_CLASS = "{spec.hf_model}"'):
        assert line in modeling.splitlines()
    assert "lowrank_core" not in modeling.split('"""', 2)[2]  # no import of lowrank_core below the docstring
    config = json.loads((tmp_path / arch / "config.json").read_text())
    assert config["model_type"] == "lowrank_" + arch and config["lowrank_base_model_type"] == arch
    loaded = load_factorized(tmp_path / arch)
    assert lm_loss(loaded.model, ids) == pytest.approx(lm_loss(student, ids), abs=1e-5)
    assert count_parameters(loaded.model) == account(teacher.config, "attn:r4; 1:mlp:r4").compressed


def test_unsupported_model_type_is_named(tmp_path):
    """A factorized export of a model outside the arch table fails before anything is written."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259, n_positions=64)).eval()
    with pytest.raises(ExportError, match="'gpt2'.*" + ", ".join(ARCHS)):
        export_student(model, None, tmp_path / "x", "factorized")
    assert list(tmp_path.iterdir()) == []


def test_modeling_template_lines_are_checked(tmp_path, monkeypatch):
    """The modeling file is written only if its three BASE_* lines are found (a plain text substitution)."""
    from lowrank_core.export import write

    template = tmp_path / "modeling_lowrank.py"
    template.write_text(write.MODELING_TEMPLATE.read_text().replace('BASE_CONFIG_CLASS = "LlamaConfig"', ""))
    monkeypatch.setattr(write, "MODELING_TEMPLATE", template)
    with pytest.raises(ExportError, match="BASE_CONFIG_CLASS"):
        write.modeling_source(ARCHS["mistral"])


def test_sharded_dense_export_reloads(tmp_path, ids):
    teacher, tok = tiny_model("mistral")
    student = make_student(teacher, DENSE_PLAN)
    result = export_student(student, tok, tmp_path / "sharded", "dense", max_shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert result.verified and result.max_logit_diff < 1e-4


def test_manifest_records_the_job(tmp_path):
    teacher, tok = tiny_model("llama")
    student = make_student(teacher, DENSE_PLAN)
    export_student(student, tok, tmp_path / "x", "dense", manifest_for(teacher, DENSE_PLAN))
    m = export.read_manifest(tmp_path / "x")
    assert m["source"] == {"model": "tiny", "fingerprint": "f00d"}
    assert m["plan"] == {"rules": [{"layers": "all", "modules": ["mlp"], "rank": 8}]}
    assert m["method"] == {"name": "svd", "settings": {"calib": 8}}
    assert m["split"]["fingerprint"] == "abc"
    assert m["metrics"] == {"teacher": {"loss": 5.5}, "student": {"loss": 5.6}}
    assert m["ranks"] == {f"model.layers.{i}.mlp.{p}": 8 for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert m["tool"]["version"] == __version__ and m["format"] == "dense"
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert m["verification"]["max_logit_diff"] < 1e-4


def test_existing_target_refused_unless_forced(tmp_path):
    teacher, tok = tiny_model("llama")
    student = make_student(teacher, DENSE_PLAN)
    target = tmp_path / "out"
    export_student(student, tok, target, "dense", verify=False)
    with pytest.raises(ExportError, match="already exists"):
        export_student(student, tok, target, "factorized", verify=False)
    assert not (target / "modeling_lowrank.py").exists()
    export_student(student, tok, target, "factorized", force=True, verify=False)
    assert export.read_manifest(target)["format"] == "factorized"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup or temp folder left
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a lowrank export"):
        export_student(student, tok, precious, "dense", force=True, verify=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_bad_format_is_named(tmp_path):
    teacher, tok = tiny_model("llama")
    with pytest.raises(ExportError, match="'onnx'.*dense, factorized"):
        export_student(teacher, tok, tmp_path / "x", "onnx")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, error):
    teacher, tok = tiny_model("llama")
    student = make_student(teacher, DENSE_PLAN)
    old = tmp_path / "old"
    export_student(student, tok, old, "dense", verify=False)
    old_files = sorted(p.name for p in old.iterdir())

    def interrupted(*args, **kwargs):  # weights already written, then the tokenizer write dies
        raise error("interrupted while writing the tokenizer")

    monkeypatch.setattr(type(tok), "save_pretrained", interrupted)
    raised = error if error is KeyboardInterrupt else export.ExportWriteError  # an OSError names the target
    with pytest.raises(raised, match=None if error is KeyboardInterrupt else f"export to {tmp_path / 'new'} failed"):
        export_student(student, tok, tmp_path / "new", "factorized")
    with pytest.raises(raised):
        export_student(student, tok, old, "factorized", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no target, no temp folder
    assert sorted(p.name for p in old.iterdir()) == old_files     # the forced target is untouched
    assert export.read_manifest(old)["format"] == "dense"


def test_failed_verification_raises_and_leaves_nothing(tmp_path, monkeypatch):
    teacher, tok = tiny_model("llama")
    student = make_student(teacher, DENSE_PLAN)
    old = tmp_path / "old"
    export_student(student, tok, old, "dense", verify=False)
    real_reload = export.reload_export

    def corrupted(*args, **kwargs):
        model, info = real_reload(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        return model, info

    monkeypatch.setattr("lowrank_core.export.verify.reload_export", corrupted)
    with pytest.raises(ExportVerificationError, match="logit"):
        export_student(student, tok, tmp_path / "new", "dense")
    with pytest.raises(ExportVerificationError):
        export_student(student, tok, old, "dense", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert "verification" not in export.read_manifest(old)  # the old, unverified export is untouched


def test_missing_weights_fail_verification(tmp_path, monkeypatch):
    """A writer that drops a tensor is caught by the reload's missing keys, not silently re-initialised."""
    teacher, tok = tiny_model("mistral")
    student = make_student(teacher, DENSE_PLAN)
    real = export.write._factorized_tensors

    def dropping(model):
        tensors = real(model)
        tensors.pop("model.layers.0.mlp.down_proj.down.weight")
        return tensors

    monkeypatch.setattr("lowrank_core.export.write._factorized_tensors", dropping)
    with pytest.raises(ExportVerificationError, match="missing"):
        export_student(student, tok, tmp_path / "x", "factorized")
    assert list(tmp_path.iterdir()) == []


def test_load_factorized_rejects_dense_folder(tmp_path):
    teacher, tok = tiny_model("llama")
    export_student(make_student(teacher, DENSE_PLAN), tok, tmp_path / "d", "dense", verify=False)
    with pytest.raises(ExportError, match="not a factorized lowrank export"):
        load_factorized(tmp_path / "d")



def test_compress_cli_exports(tmp_path, capsys):
    from lowrank_core.cli import main

    target = tmp_path / "cli"
    argv = ["compress", "--model", "tiny", "--plan", "mlp:r8", "--method", "svd", "--calib", "4", "--eval", "4",
            "--max-len", "256", "--export", str(target), "--format", "factorized", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["export"]["path"] == str(target) and summary["export"]["verified"] is True
    assert summary["export"]["parameters"] == summary["params_after"]
    m = export.read_manifest(target)
    assert m["format"] == "factorized" and m["split"] == summary["split"]
    assert m["metrics"]["student"]["loss"] == summary["student_loss"]
    assert main(argv) == 2  # refused before any work: the folder exists
    assert "already exists" in capsys.readouterr().err
    assert main(argv[:-5] + ["--format", "dense"]) == 2
    assert "need --export" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["dense", "factorized"])
def test_bfloat16_student_exports_in_bfloat16(tmp_path, format):
    teacher, tok = tiny_model("llama")
    teacher = teacher.to(torch.bfloat16)
    student = make_student(teacher, FACTORIZED_PLAN).to(torch.bfloat16)
    result = export_student(student, tok, tmp_path / format, format)
    assert result.verified and result.max_logit_diff <= result.tolerance
    from safetensors import safe_open

    with safe_open(str(tmp_path / format / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / format / "config.json").read_text())["dtype"] == "bfloat16"
