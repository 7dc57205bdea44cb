"""No code of a model folder ever runs, and no export points at any: only our own modeling file is trusted."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.export import export_student
from lowrank_core.export.common import MODELING_FILE
from lowrank_core.models import load_model, tiny_model

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise SystemExit('evil code ran')\n"


@pytest.fixture()
def booby_trapped(tmp_path):
    """A model folder whose tokenizer and model configs point at a Python file of the folder."""
    model, tok = tiny_model("llama")
    src = tmp_path / "source"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    marker = tmp_path / "evil-ran"
    (src / "evil.py").write_text(EVIL.format(marker=str(marker)))
    for name, entry in (("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
                        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})):
        data = json.loads((src / name).read_text())
        data["auto_map"] = entry
        (src / name).write_text(json.dumps(data))
    return src, marker


@pytest.mark.parametrize("fmt", ["dense", "factorized"])
def test_export_of_a_booby_trapped_folder_runs_and_ships_no_foreign_code(booby_trapped, tmp_path, fmt):
    src, marker = booby_trapped
    out = io.StringIO()
    with redirect_stdout(out):
        lm = load_model(str(src), device="cpu")
        split = make_split("chatterbot", n_calib=4, n_eval=2, seed=0)
        student = compress(lm.model, lm.tokenizer, "mlp:r8", split.calib, CompressSettings(calib=4, max_len=64)).student
        target = tmp_path / f"export-{fmt}"
        export_student(student, lm.tokenizer, target, fmt, verify=True, eval_examples=split.eval)
        reloaded = load_model(str(target), device="cpu")
    assert not marker.exists()
    assert out.getvalue() == ""  # no remote-code prompt (or anything else) on stdout
    assert sorted(p.name for p in target.glob("*.py")) == ([MODELING_FILE] if fmt == "factorized" else [])
    assert "auto_map" not in json.loads((target / "tokenizer_config.json").read_text())
    auto_map = json.loads((target / "config.json").read_text()).get("auto_map")
    if fmt == "dense":
        assert auto_map is None
    else:
        assert all(v.startswith(MODELING_FILE[:-3] + ".") for v in auto_map.values())
    assert reloaded.model is not None and not marker.exists()
