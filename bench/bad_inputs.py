"""Run every known bad input through the CLI and write the table ``docs/bad-inputs.md``: input -> exit code -> message.

    python bench/bad_inputs.py                    # writes docs/bad-inputs.md
    python bench/bad_inputs.py --out /tmp/x.md    # elsewhere
    python bench/bad_inputs.py --only plan        # the cases whose id contains 'plan' (printed, not written)

Each case runs in-process (``lowrank_core.cli.main``, stdout and stderr captured) in a scratch folder holding
the fixtures it names: tiny model folders (``good``, ``corrupt`` and ``truncated`` safetensors, ``nan``
weights, no ``tokenizer``, a config that is not JSON, a factorized export ``fact``), data files, plan and
recipe files, a file ``afile`` standing where a folder should be and a read-only folder; issue 23's input side
adds pickle-only folders, a custom-code config, bad chat templates and bad data files (``_input_fixtures``). Everything uses
``--model tiny`` (or a folder made from it) and ``--data chatterbot``. Every row of the table is the
message of a real run; ``tests/test_bad_inputs.py`` runs the same cases and checks each message names the bad
value. Items: A = refused before any work, B = a traceback before, C = silently wrong before, D = the CLI's
top-level handler, E = bad inputs already refused (found in the tests).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lowrank_core.cli import main  # noqa: E402
from lowrank_core.paths import check_output_folder  # noqa: E402

DOC = ROOT / "docs" / "bad-inputs.md"
TINY = ["--model", "tiny", "--data", "chatterbot"]
JOB = TINY + ["--calib", "4", "--eval", "4", "--max-len", "64"]
SEARCH = TINY + ["--calib", "8", "--val", "4", "--eval", "4", "--max-len", "64", "--val-max-len", "64"]
ITEMS = {"A": "refused before any work (output paths and options)",
         "B": "a traceback before, one line now",
         "C": "silently wrong before, refused or reported now",
         "D": "the top-level handler (argparse and multi-line messages)",
         "E": "already refused before this change (cases found in the tests)"}


@dataclass
class Case:
    id: str
    item: str                       # a key of ITEMS
    argv: list                      # CLI arguments; "{readonly}" and "{cuda}" are filled in by ``fixtures``
    expect: tuple                   # substrings of the message: the bad value and what is allowed
    rc: int = 2
    before_load: bool = True        # refused before any weights are loaded
    needs: tuple = field(default=())  # fixture names that must be available (else the case is skipped)
    env: dict = field(default_factory=dict)  # environment variables set for the run (values filled in too)


CASES = [
    # A: fail before the work
    Case("search-out-missing-folder", "A", ["search", *SEARCH, "--out", "missing/plan.yaml"],
         ("--out 'missing/plan.yaml'", "does not exist")),
    Case("search-out-not-a-plan-file", "A", ["search", *SEARCH, "--out", "plan.txt"], ("plan.txt", ".yaml")),
    Case("search-eval-0", "A", ["search", *SEARCH[:6], "--eval", "0"], ("--eval 0", "at least 1")),
    Case("export-parent-is-a-file", "A", ["compress", *JOB, "--plan", "mlp:r4", "--export", "afile/student"],
         ("afile/student", "is a file, not a folder")),
    Case("export-parent-read-only", "A", ["compress", *JOB, "--plan", "mlp:r4", "--export", "{readonly}/student"],
         ("student", "is not writable"), needs=("readonly",)),
    Case("recipe-export-parent-is-a-file", "A", ["run", "export-under-file.yaml"], ("afile/x", "is a file")),
    Case("run-export-dir-read-only", "A", ["run", "tiny.yaml", "--export-dir", "{readonly}/x"],
         ("is not writable",), needs=("readonly",)),
    Case("compare-per-example-parent-is-a-file", "A",
         ["compare", "--teacher", "tiny", "--data", "chatterbot", "--student", "all:k0.5", "--per-example",
          "afile/rows.csv"], ("--per-example 'afile/rows.csv'", "is a file")),
    # B: tracebacks before
    Case("corrupt-safetensors", "B", ["evaluate", "--model", "corrupt", "--data", "chatterbot", "--n", "2"],
         ("'corrupt'", "safetensors"), before_load=False),
    Case("truncated-safetensors", "B", ["evaluate", "--model", "truncated", "--data", "chatterbot", "--n", "2"],
         ("'truncated'", "safetensors"), before_load=False),
    Case("config-not-json", "B", ["count", "--model", "badconfig", "--plan", "mlp:r4"],
         ("'badconfig'", "config.json")),
    Case("no-tokenizer-files", "B", ["evaluate", "--model", "notokenizer", "--data", "chatterbot", "--n", "2"],
         ("'notokenizer'", "tokenizer"), before_load=False),
    Case("empty-jsonl", "B", ["evaluate", "--model", "tiny", "--data", "empty.jsonl", "--n", "2"],
         ("empty.jsonl", "is empty")),
    Case("plan-modules-is-a-number", "B", ["compress", *JOB, "--plan", "modules-5.yaml"],
         ("plan rule 1", "modules must be", "got 5")),
    Case("layer-device-without-cuda", "B", ["compress", *JOB, "--plan", "mlp:r4", "--layer-device", "{cuda}"],
         ("--layer-device", "{cuda}")),
    Case("layer-device-tpu", "B", ["compress", *JOB, "--plan", "mlp:r4", "--layer-device", "tpu"],
         ("'tpu'", "allowed: auto, cpu, cuda or cuda:N")),
    Case("spectrum-batch-size-0", "B", ["spectrum", *TINY, "--module", "q_proj", "--layer", "0", "--calib", "4",
                                        "--batch-size", "0"], ("--batch-size 0", ">= 1")),
    Case("compress-a-factorized-export", "B", ["compress", "--model", "fact", "--data", "chatterbot", "--plan",
                                               "mlp:r4"], ("'fact'", "already a factorized lowrank export")),
    # C: silently wrong before
    Case("nan-teacher-weights", "C", ["evaluate", "--model", "nan", "--data", "chatterbot", "--n", "2", "--json"],
         ("'nan'", "non-finite weights", "model.layers.0.mlp.up_proj.weight"), before_load=False),
    Case("plan-dense-string", "C", ["compress", *JOB, "--plan", "dense-string.yaml"],
         ("plan rule 1", "dense must be a boolean", "'false'")),
    Case("plan-keep-boolean", "C", ["compress", *JOB, "--plan", "keep-true.yaml"],
         ("plan rule 1", "keep must be a number", "True")),
    Case("plan-rank-boolean", "C", ["count", "--model", "tiny", "--plan", "rank-true.yaml"],
         ("plan rule 1", "rank must be an integer", "True")),
    Case("plan-method-number", "C", ["count", "--model", "tiny", "--plan", "method-number.yaml"],
         ("plan rule 1", "method must be a method name", "3")),
    Case("search-target-params-negative", "C", ["search", *SEARCH, "--target-params", "-5"],
         ("target_params -5", "must be in 1 ..")),
    Case("search-keep-params-above-one", "C", ["search", *SEARCH, "--keep-params", "1.5"], ("1.5",)),
    Case("spectrum-top-negative", "C", ["spectrum", *TINY, "--module", "q_proj", "--layer", "0", "--calib", "0",
                                        "--top", "-3"], ("--top -3", ">= 1")),
    Case("export-empty-path", "C", ["compress", *JOB, "--plan", "mlp:r4", "--export", ""],
         ("export target ''", "empty path")),
    Case("run-export-dir-empty", "C", ["run", "tiny.yaml", "--export-dir", ""], ("export target ''", "empty path")),
    Case("search-out-empty-path", "C", ["search", *SEARCH, "--out", ""], ("--out ''", "empty path")),
    Case("all-dense-plan", "C", ["compress", *JOB, "--plan", "mlp:dense"], ("mlp, dense", "replaces no matrix")),
    Case("plan-resolving-to-nothing", "C", ["compress", *JOB, "--plan", "0:mlp:r4; mlp:dense"],
         ("replaces no matrix",)),
    Case("compress-ranks-above-break-even-and-tied-head", "C",
         ["compress", *TINY, "--calib", "4", "--eval", "0", "--max-len", "64", "--plan", "mlp:r60; lm_head:r8",
          "--json"],
         ("warning:", "rank 60 is above the break-even rank 42"), rc=0, before_load=False),
    Case("data-records-dropped", "C", ["evaluate", "--model", "tiny", "--data", "holes.jsonl", "--split", "all",
                                       "--n", "4"], ("3 records dropped", "missing question", "duplicate"),
         rc=0, before_load=False),
    Case("evaluate-n-0", "C", ["evaluate", *TINY, "--n", "0"], ("--n 0", ">= 1")),
    Case("evaluate-max-len-4", "C", ["evaluate", *TINY, "--n", "2", "--max-len", "4"], ("--max-len 4", ">= 8")),
    # issue 23, the input side: nothing of a model folder is executed or unpickled, templates run under a budget
    Case("pickle-only-weights", "C", ["evaluate", "--model", "pickled", "--data", "chatterbot", "--n", "2"],
         ("'pickled'", "only pickled weights (pytorch_model.bin)", "convert it once"), before_load=False),
    Case("pickle-plain-tensor", "C", ["evaluate", "--model", "plaintensor", "--data", "chatterbot", "--n", "2"],
         ("'plaintensor'", "only pickled weights"), before_load=False),
    Case("pickle-with-code", "B", ["evaluate", "--model", "evilpickle", "--data", "chatterbot", "--n", "2"],
         ("'evilpickle'", "only pickled weights"), before_load=False),
    Case("custom-code-config", "B", ["evaluate", "--model", "automap", "--data", "chatterbot", "--n", "2"],
         ("'automap'", "model_type 'mystery'", "never runs code"), before_load=False),
    Case("template-sandbox-escape", "B", ["evaluate", "--model", "escape", "--data", "chatterbot", "--n", "2"],
         ("'escape'", "SecurityError", "budget: 10 s"), before_load=False),
    Case("template-hangs", "C", ["evaluate", "--model", "hang", "--data", "chatterbot", "--n", "2"],
         ("'hang'", "did not finish rendering a probe conversation within 10 s"), before_load=False),
    Case("cache-read-only-spectrum", "B", ["spectrum", *TINY, "--module", "q_proj", "--layer", "0", "--calib", "0"],
         ("cache folder '{readonly}' (LOWRANK_CACHE) is not writable", "LOWRANK_CACHE="), needs=("readonly",),
         env={"LOWRANK_CACHE": "{readonly}"}),
    Case("cache-read-only-default", "B", ["evaluate", "--model", "default", "--data", "chatterbot", "--n", "2"],
         ("cache folder '{readonly}' (LOWRANK_CACHE) is not writable",), needs=("readonly",),
         env={"LOWRANK_CACHE": "{readonly}"}, before_load=False),
    Case("data-not-utf8", "B", ["evaluate", "--model", "tiny", "--data", "latin1.jsonl", "--split", "all", "--n", "2"],
         ("latin1.jsonl", "(line 2) is not UTF-8", "b'\\xe9'")),
    Case("data-field-types", "C", ["evaluate", "--model", "tiny", "--data", "typed.jsonl", "--split", "all", "--n",
                                   "2"], ("typed.jsonl line 2", "field 'question' is int (1)", "allowed: a string"),
         before_load=False),
    Case("model-path-too-long", "B", ["count", "--model", "a" * 300, "--plan", "mlp:r4"],
         ("is too long (300 characters", "names of up to 255 bytes")),
    # D: the top-level handler
    Case("argparse-invalid-choice", "D", ["evaluate", *TINY, "--dtype", "float8"], ("float8", "invalid choice")),
    Case("yaml-plan-text-multi-line-error", "D", ["count", "--model", "tiny", "--plan", "{rules: [}"],
         ("not valid YAML", "line 1")),
    Case("recipe-not-found", "D", ["run", "no-such-recipe.yaml"], ("no-such-recipe.yaml", "not found")),
    # E: refused before this change (from the tests)
    Case("keep-above-one", "E", ["compare", "--teacher", "tiny", "--student", "all:k1.7", "--data", "chatterbot"],
         ("keep 1.7 is outside (0, 1]",)),
    Case("rank-above-min-dims", "E", ["compress", *JOB, "--plan", "0:mlp:r999"], ("rank 999 exceeds",)),
    Case("unknown-layer", "E", ["count", "--model", "tiny", "--plan", "5:mlp:r4"], ("unknown layer 5",)),
    Case("bad-margin", "E", ["compare", "--teacher", "tiny", "--student", "all:k0.5", "--margin", "lots"],
         ("'lots'", "margin")),
    Case("compare-per-example-missing-folder", "E",
         ["compare", "--teacher", "tiny", "--student", "all:k0.5", "--per-example", "missing/rows.csv"],
         ("--per-example 'missing/rows.csv'", "does not exist")),
    Case("student-folder-without-config", "E", ["compare", "--teacher", "tiny", "--student", "emptyfolder"],
         ("'emptyfolder'", "config.json")),
    Case("unknown-data-source", "E", ["evaluate", "--model", "tiny", "--data", "no-such-data", "--n", "4"],
         ("'no-such-data'", "allowed")),
    Case("export-target-exists", "E", ["compress", *JOB, "--plan", "mlp:r4", "--export", "existing"],
         ("existing", "already exists")),
    Case("export-flags-without-export", "E", ["compress", *JOB, "--plan", "mlp:r4", "--format", "dense"],
         ("--format", "need --export DIR")),
    Case("recipe-unknown-export-format", "E", ["run", "onnx.yaml"],
         ("export.format: 'onnx' is not one of dense, factorized",)),
    Case("spectrum-layer-out-of-range", "E", ["spectrum", "--model", "tiny", "--layer", "7", "--module", "q_proj",
                                              "--calib", "0"], ("--layer 7", "0..1")),
    Case("unknown-dtype-in-recipe", "E", ["run", "float8.yaml"], ("model.dtype: 'float8'",)),
    # issue 23, the write side: full disks, concurrent writers, changed export folders
    Case("export-disk-without-room", "C", ["compress", *JOB, "--plan", "mlp:r4", "--export", "{small}/exp"],
         ("{small}/exp", "bytes free", "needs about"), before_load=False, needs=("small",)),
    Case("export-target-being-written", "C", ["compress", *JOB, "--plan", "mlp:r4", "--export", "locked", "--force"],
         ("locked is being written by pid",), needs=("locked",)),
    Case("export-extra-safetensors", "C", ["evaluate", "--model", "factextra", "--data", "chatterbot", "--n", "2"],
         ("extra.safetensors is not in its lowrank.json",), before_load=False),
]


# ----------------------------------------------------------------------------- fixtures
def _save_tiny(folder: Path):
    from lowrank_core.models import tiny_model

    model, tokenizer = tiny_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def _copy(root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(root / "good", target)
    return target


def _readonly_folder(root: Path) -> Optional[str]:
    """A folder this process cannot write to: a 0555 folder, or (root ignores permission bits) a read-only
    mount such as /sys; None when there is none."""
    folder = root / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            check_output_folder(candidate / "probe", "probe")
        except ValueError:
            return str(candidate)
    return None


def fixtures(root: Path) -> dict:
    """Write every fixture the cases name into ``root``; returns {placeholder: value} ("readonly": a folder
    that cannot be written or None, "cuda": a CUDA device this machine lacks)."""
    from lowrank_core.decompose import svd_factors
    from lowrank_core.export import export_student
    from lowrank_core.student import low_rank_student

    model, tokenizer = _save_tiny(root / "good")
    (_copy(root, "corrupt") / "model.safetensors").write_bytes(b"\xff" * 64)
    weights = _copy(root, "truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (_copy(root, "badconfig") / "config.json").write_text("{not json")
    notok = _copy(root, "notokenizer")
    for p in notok.iterdir():
        if p.name.startswith("tokenizer") or p.name == "chat_template.jinja":
            p.unlink()
    names = [f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")]
    student = low_rank_student(model, {n: svd_factors(model.get_submodule(n).weight.detach(), 4) for n in names})
    export_student(student, tokenizer, root / "fact", "factorized", verify=False)
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.up_proj").weight[0, 0] = float("nan")
    model.save_pretrained(_copy(root, "nan"))
    (root / "afile").write_text("a file where a folder should be\n")
    (root / "emptyfolder").mkdir()
    (root / "existing").mkdir()
    (root / "existing" / "notes.txt").write_text("not an export\n")
    (root / "empty.jsonl").write_text("")
    records = [{"system_prompt": "", "question": "What is one plus one?", "response": "Two."},
               {"system_prompt": "", "response": "an answer without its question"},
               {"system_prompt": "", "question": "A question without its answer", "response": ""},
               {"system_prompt": "", "question": "What is one plus one?", "response": "Two."}]
    (root / "holes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plans = {"modules-5": {"modules": 5, "rank": 4}, "dense-string": {"modules": ["mlp"], "dense": "false"},
             "keep-true": {"modules": ["mlp"], "keep": True}, "rank-true": {"modules": ["mlp"], "rank": True},
             "method-number": {"modules": ["mlp"], "rank": 4, "method": 3}}
    for name, rule in plans.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    recipe = {"model": {"source": "tiny"}, "data": {"source": "chatterbot", "calib": 4, "eval": 4},
              "plan": "mlp:r4", "method": {"max_len": 64}}
    recipes = {"tiny": recipe, "export-under-file": dict(recipe, export={"dir": "afile/x"}),
               "onnx": dict(recipe, export={"dir": "x", "format": "onnx"}),
               "float8": dict(recipe, model={"source": "tiny", "dtype": "float8"})}
    for name, data in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    _input_fixtures(root)
    cuda = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    return {"readonly": _readonly_folder(root), "cuda": cuda, **_write_side(root)}


class _Reduces:
    """Unpickling this calls ``print``: a stand-in for a pickle that runs code."""
    def __reduce__(self):
        return print, ("a pickle ran code",)


def _input_fixtures(root: Path) -> None:
    """Issue 23's input-side fixtures: pickle-only folders (a state dict, a plain tensor, a pickle that runs
    code), a config naming custom code, chat templates that escape the sandbox or hang, data files with a
    latin-1 byte and with fields of the wrong type."""
    import pickle

    for name, payload in (("pickled", "state"), ("plaintensor", torch.zeros(3)), ("evilpickle", _Reduces())):
        folder = _copy(root, name)
        (folder / "model.safetensors").unlink()
        if payload == "state":
            from safetensors.torch import load_file
            torch.save(load_file(str(root / "good" / "model.safetensors")), folder / "pytorch_model.bin")
        elif isinstance(payload, torch.Tensor):
            torch.save(payload, folder / "pytorch_model.bin")
        else:
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    config_file = _copy(root, "automap") / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="mystery", auto_map={"AutoConfig": "mystery.Config", "AutoModelForCausalLM": "mystery.LM"})
    config_file.write_text(json.dumps(config))
    (_copy(root, "escape") / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    (_copy(root, "hang") / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}")
    row = {"system_prompt": "", "question": "What is one plus one?", "response": "Two."}
    (root / "latin1.jsonl").write_bytes(json.dumps(row).encode() + b"\n" + json.dumps(dict(row, question="caf\u00e9?"))
                                        .encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    (root / "typed.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(dict(row, question=1, response=[1, 2])) + "\n")


def release(root: Path) -> None:
    """Make the scratch folder removable again (the read-only folder, the small disk, the held lock)."""
    folder = root / "readonly"
    if folder.exists():
        folder.chmod(0o755)
    _HELD.close()
    if os.path.ismount(root / "small"):
        subprocess.run(["umount", str(root / "small")], check=False)


_HELD = contextlib.ExitStack()  # the writer lock of the ``locked`` target, held until ``release``


def _write_side(root: Path) -> dict:
    """Issue 23's fixtures: ``factextra`` (``fact`` plus an extra weight file), ``locked`` (an export whose
    writer lock this process holds), ``small`` (a 200 kB tmpfs; None where mounting is not allowed)."""
    from lowrank_core.tempdirs import writer_lock

    shutil.copytree(root / "fact", root / "factextra")
    shutil.copy(root / "fact" / "model.safetensors", root / "factextra" / "extra.safetensors")
    _HELD.enter_context(writer_lock(root / "locked"))
    small = root / "small"
    small.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    return {"small": str(small) if mounted else None, "locked": "locked"}


# ----------------------------------------------------------------------------- running
@dataclass
class Outcome:
    rc: int
    message: str   # the 'error:' line (or, for a run that succeeded, its first warning / note)
    stdout: str
    stderr: str


def filled(values, fills: dict) -> list:
    """``values`` with each ``{name}`` of ``fills`` replaced (other braces, e.g. a plan's YAML, stay)."""
    out = []
    for value in values:
        for name, fill in fills.items():
            value = value.replace("{" + name + "}", str(fill))
        out.append(value)
    return out


def message_of(stderr: str) -> str:
    """The (last) ``error:`` line of ``stderr``; else its first warning or note, counting the others."""
    lines = [line.strip() for chunk in stderr.split("\r") for line in chunk.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[-1]
    for marker in ("warning:", "note:"):
        found = [line for line in lines if line.startswith(marker)]
        if found:
            return found[0] + (f" (+{len(found) - 1} more {marker[:-1]}s)" if len(found) > 1 else "")
    return ""


def run_case(case: Case, root: Path, fills: dict) -> Outcome:
    """``case`` through ``lowrank_core.cli.main`` in ``root``; argparse's exit is caught as its status."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    saved = {name: os.environ.get(name) for name in case.env}
    os.environ.update(dict(zip(case.env, filled(case.env.values(), fills))))
    os.chdir(root)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main(filled(case.argv, fills))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(cwd)
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    return Outcome(rc, message_of(err.getvalue()), out.getvalue(), err.getvalue())


def shown(argv: list) -> str:
    """The command line as a user types it."""
    parts = [a if a and not set(a) & set(" ;{}[]'\"|*") else "'" + a.replace("'", "'\\''") + "'" for a in argv]
    return "python -m lowrank_core " + " ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_doc(rows: list[tuple[Case, list, Outcome]], path: Path, root: Path) -> None:
    lines = ["# Bad inputs", "",
             "What the CLI answers to bad input: every row is the output of a real run of "
             "`python bench/bad_inputs.py` (in-process `lowrank_core.cli.main`, the tiny model, `--data "
             "chatterbot`, fixtures in a scratch folder written as `$TMP`). A user error exits with status 2 and "
             "one line `error: ...` on stderr naming the bad value and what is allowed, before any weights are "
             "loaded where it can be checked from the flags, files and the model's config alone; unexpected "
             "errors keep their traceback (`lowrank_core/cli.py`, `USER_ERRORS`). Rows with exit code 0 show the "
             "warning or note that a successful run now prints on stderr.", "",
             "Fixtures: `good` (a saved tiny model) and its copies `corrupt` (garbage safetensors), `truncated` "
             "(half a safetensors file), `badconfig` (config.json not JSON), `notokenizer`, `nan` (one NaN "
             "weight); `fact` (a factorized export), `afile` (a file), `readonly` (a folder that cannot be "
             "written; `/sys` when running as root), `existing` (a non-export folder), `emptyfolder`, "
             "`empty.jsonl`, `holes.jsonl` (4 records: one without its question, one with an empty response, a "
             "duplicate), plan files (`modules-5.yaml`: `modules: 5`; `dense-string.yaml`: `dense: \"false\"`; "
             "`keep-true.yaml`: `keep: true`; `rank-true.yaml`; `method-number.yaml`) and recipes (`tiny.yaml`, "
             "`export-under-file.yaml`, `onnx.yaml`, `float8.yaml`). Input-side fixtures (`_input_fixtures`): "
             "`pickled`, `plaintensor` and `evilpickle` (only a `pytorch_model.bin`: a state dict, a plain tensor, "
             "a pickle that calls `print` when loaded), `automap` (`model_type: mystery` with an `auto_map`), "
             "`escape` and `hang` (a `chat_template.jinja` reaching for `__class__`, and two nested "
             "`range(100000)` loops), `latin1.jsonl` (a latin-1 `é` on line 2), `typed.jsonl` (line 2: "
             "`question: 1`, `response: [1, 2]`); the two cache rows run with `LOWRANK_CACHE` set to the "
             "read-only folder.", "",
             "Budgets and choices behind those rows: a chat template is rendered once, on a two-message probe, in "
             "a child Python that is killed after 10 s, may use 1 GiB of memory and must print under 100,000 "
             "characters (`lowrank_core/data/template.py`); weights load from safetensors only "
             "(`use_safetensors=True`; a pickle-only folder is refused with the command that converts it); a "
             "cache that cannot be written is refused as soon as something must be written there (the default "
             "model's first conversion, spectra; a cache already holding the converted model is read as it is), "
             "with no silent fallback to a temporary cache, which would convert the default model again on every "
             "run: set `LOWRANK_CACHE` to a writable folder.", "",
             "Write-side fixtures: `small` (a 200 kB tmpfs), `locked` (an export target whose writer lock is held "
             "by the running process), `factextra` (`fact` plus an extra `*.safetensors` file).", ""]
    for item, title in ITEMS.items():
        chosen = [r for r in rows if r[0].item == item]
        if not chosen:
            continue
        lines += [f"## {item}: {title}", "", "| case | input | exit code | message |", "|---|---|---|---|"]
        for case, argv, outcome in chosen:
            command, message = (_cell(text.replace(str(root), "$TMP")) for text in (shown(argv), outcome.message))
            lines.append(f"| {case.id} | `{command}` | {outcome.rc} | {message} |")
        lines.append("")
    path.write_text("\n".join(lines))


def run_all(cases: list[Case], verbose: bool = True) -> tuple[list, Path]:
    root = Path(tempfile.mkdtemp(prefix="lowrank-bad-inputs-")).resolve()
    fills = fixtures(root)
    rows = []
    try:
        for case in cases:
            if any(fills.get(n) is None for n in case.needs):
                print(f"skipped {case.id}: no {', '.join(case.needs)} on this machine", file=sys.stderr)
                continue
            outcome = run_case(case, root, fills)
            ok = outcome.rc == case.rc and all(e in outcome.message for e in filled(case.expect, fills))
            if verbose:
                print(f"{'ok ' if ok else 'BAD'} {case.id}: rc {outcome.rc}: {outcome.message}", file=sys.__stderr__)
            rows.append((case, filled(case.argv, fills), outcome))
    finally:
        release(root)
    return rows, root


def main_script(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DOC), help="markdown file to write (default: docs/bad-inputs.md)")
    p.add_argument("--only", default=None, help="run only cases whose id contains this text (nothing written)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = [c for c in CASES if args.only is None or args.only in c.id]
    rows, root = run_all(cases)
    try:
        bad = [case.id for case, _, outcome in rows
               if outcome.rc != case.rc or "Traceback" in outcome.stderr]
        if args.only is None:
            write_doc(rows, Path(args.out), root)
            print(f"wrote {args.out}: {len(rows)} cases", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if bad:
        print(f"unexpected exit codes or tracebacks: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main_script())
