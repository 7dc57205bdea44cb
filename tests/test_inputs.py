"""Issue 23, the input side: nothing of a model folder is executed or unpickled, chat templates run under a
budget, data records are typed and clipped before tokenisation, a read-only cache and an overlong app path
are one line. (The CLI's rows of the same cases are in ``bench/bad_inputs.py``, run by test_bad_inputs.)"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import tracemalloc

import pytest
import torch

from lowrank_core import cli, models
from lowrank_core.data import DataSourceError, Example, calibration_batches, encode_example, iter_examples
from lowrank_core.data import template
from lowrank_core.data.template import ChatTemplateError, check_chat_template
from lowrank_core.models import CacheDirError, ModelSourceError, load_model, tiny_model, tiny_tokenizer
from lowrank_core.workspace import WorkspaceError, app_source

HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
ESCAPE = "{{ messages.__class__.__mro__ }}"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs") / "good"
    model, tokenizer = tiny_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def copy(good, tmp_path, name: str):
    return shutil.copytree(good, tmp_path / name)


def no_weights_read(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(torch, "load", refused)
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refused)


# ----------------------------------------------------------------------------- weights: safetensors only
@pytest.mark.parametrize("what", ["state_dict", "plain_tensor"])
def test_a_pickle_only_folder_is_refused_before_torch_load(what, good, tmp_path, monkeypatch):
    folder = copy(good, tmp_path, "pickle")
    (folder / "model.safetensors").unlink()
    model, _ = tiny_model()
    torch.save(model.state_dict() if what == "state_dict" else torch.zeros(3), folder / "pytorch_model.bin")
    no_weights_read(monkeypatch)
    with pytest.raises(ModelSourceError, match=r"holds only pickled weights \(pytorch_model.bin\).*convert it once"):
        load_model(str(folder), device="cpu")


def test_every_weights_load_asks_for_safetensors(good, monkeypatch):
    from transformers import AutoModelForCausalLM
    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(str(good), device="cpu")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


def test_custom_code_config_is_one_line_without_trust_remote_code_advice(good, tmp_path, monkeypatch):
    folder = copy(good, tmp_path, "automap")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mystery", auto_map={"AutoConfig": "x.MyConfig", "AutoModelForCausalLM": "x.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    no_weights_read(monkeypatch)
    for call in (lambda: load_model(str(folder), device="cpu"), lambda: models.load_config(str(folder)),
                 lambda: models.load_config(str(folder / "config.json"))):
        with pytest.raises(ModelSourceError, match=r"model_type 'mystery'.*never runs code") as caught:
            call()
        assert "trust_remote_code" not in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- chat templates under a budget
def test_a_hanging_template_is_refused_within_the_budget(good, tmp_path, monkeypatch):
    monkeypatch.setattr(template, "RENDER_BUDGET_S", 1.0)
    folder = copy(good, tmp_path, "hang")
    (folder / "chat_template.jinja").write_text(HANG)
    no_weights_read(monkeypatch)
    with pytest.raises(ChatTemplateError, match=r"'.*hang' did not finish rendering a probe conversation within 1 s"):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("text,why", [(ESCAPE, r"SecurityError: access to attribute '__class__'"),
                                      ("{{ 'x' * 200000 }}", r"renders more than 100,000 characters"),
                                      ("{% for m in messages %}{{ m['content'] ", r"cannot render a probe")])
def test_unsafe_huge_or_broken_templates_are_one_line(text, why):
    with pytest.raises(ChatTemplateError, match=why) as caught:
        check_chat_template(text, "folder")
    assert "budget: 10 s, 1024 MiB" in str(caught.value) and "\n" not in str(caught.value)


def test_the_builtin_template_is_not_probed_and_a_render_error_is_one_line(monkeypatch):
    monkeypatch.setattr(template, "_probe", lambda *a, **k: pytest.fail("probed the built-in template"))
    models.check_template(tiny_tokenizer(), "tiny")
    tokenizer = tiny_tokenizer()  # a template that only fails on a system turn passes the probe, then renders
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                               "role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"failed to render an example \(TemplateError: no system role\)"):
        encode_example(tokenizer, Example("be brief", "Q?", "A."), 64)


# ----------------------------------------------------------------------------- data records
def test_fields_of_the_wrong_type_are_refused_naming_the_record(tmp_path):
    lines = [{"system_prompt": "", "question": "q1", "response": "a1"},
             {"system_prompt": "", "question": 1, "response": [1, 2]}]
    jsonl = tmp_path / "typed.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataSourceError, match=r"typed.jsonl line 2: field 'question' is int \(1\); allowed: a string"):
        list(iter_examples(str(jsonl)))
    array = tmp_path / "typed.json"
    array.write_text(json.dumps([lines[0], dict(lines[0], question="q2", response=[1, 2])]))
    with pytest.raises(DataSourceError, match=r"typed.json record 2: field 'response' is list \(\[1, 2\]\)"):
        list(iter_examples(str(array)))


def test_a_non_utf8_byte_is_refused_before_any_record_is_read(tmp_path):
    good_line = json.dumps({"system_prompt": "", "question": "q1", "response": "a1"}).encode() + b"\n"
    file = tmp_path / "bad.jsonl"
    file.write_bytes(good_line * 3 + b'{"system_prompt": "", "question": "q\xff", "response": "a"}\n')
    with pytest.raises(DataSourceError, match=r"bad.jsonl: byte \d+ \(line 4\) is not UTF-8 \(b'\\xff'\)"):
        iter_examples(str(file))  # at the call: not when (or whether) line 4 is read


def test_a_5mb_record_is_clipped_before_tokenisation_in_bounded_memory():
    tokenizer = tiny_tokenizer()
    huge = ("lorem ipsum dolor sit amet " * 200_000)[:5_000_000]
    for example, small in [(Example("", "Q?", huge), Example("", "Q?", huge[:50_000])),
                           (Example("", huge, "A."), Example("", huge[:50_000], "A."))]:
        tracemalloc.start()
        try:
            kept = encode_example(tokenizer, example, 256)
            batches = calibration_batches(tokenizer, [example], 1, 256)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4_000_000  # the uncut 5M-token id list alone is ~40 MB
        assert kept == encode_example(tokenizer, small, 256)  # what is kept: the uncut record's first tokens
        assert batches[0]["input_ids"].shape == (1, 256)
        assert kept is None or kept.input_ids == batches[0]["input_ids"][0].tolist()


# ----------------------------------------------------------------------------- cache and workspace paths
def test_a_read_only_cache_is_one_line_naming_it_and_the_variable(tmp_path, monkeypatch, capsys):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:  # root ignores permission bits: then a read-only mount
        for folder in (str(readonly), "/sys"):
            try:
                os.rmdir(tempfile.mkdtemp(dir=folder))
            except OSError:
                break
        else:
            pytest.skip("no read-only folder on this machine")
        monkeypatch.setenv("LOWRANK_CACHE", folder)
        with pytest.raises(CacheDirError):
            models.cache_dir(write=True)
        assert cli.main(["spectrum", "--model", "tiny", "--module", "q_proj", "--layer", "0", "--calib", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cache folder '{folder}' (LOWRANK_CACHE) is not writable") and err.count("\n") == 1
        assert "LOWRANK_CACHE=" in err
        monkeypatch.delenv("LOWRANK_WORKSPACE", raising=False)  # the app's workspace defaults to <cache>/workspace
        with pytest.raises(WorkspaceError, match=r"the workspace '.*workspace' cannot be created.*LOWRANK_WORKSPACE="):
            app_source("model", "model source")
    finally:
        readonly.chmod(0o755)


def test_an_overlong_app_path_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_WORKSPACE", str(tmp_path / "ws"))
    for value in ("a" * 5000, "x/" + "a" * 5000, "a/" * 2500):
        with pytest.raises(WorkspaceError, match=r"is too long \(5,00\d characters; allowed: names of up to 255"):
            app_source(value, "model source")


# ----------------------------------------------------------------------------- review mends
def test_a_template_verdict_holds_only_for_the_budget_it_was_probed_under(monkeypatch):
    """The probe's verdict is cached per template AND budget: a refusal under a 1 s budget (a test's, say) is
    not what a 10 s budget reports (the message names the budget it was probed under)."""
    probes = []
    monkeypatch.setattr(template, "_checked", {})
    monkeypatch.setattr(template, "_probe", lambda text: probes.append(template.RENDER_BUDGET_S) or
                        f"did not finish rendering a probe conversation within {template.RENDER_BUDGET_S:g} s")
    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    for budget in (1.0, 10.0, 10.0):
        monkeypatch.setattr(template, "RENDER_BUDGET_S", budget)
        with pytest.raises(ChatTemplateError, match=f"within {budget:g} s"):
            check_chat_template(text, "m")
    assert probes == [1.0, 10.0]  # the second 10 s check reuses its own verdict


def test_answers_side_by_side_tokenise_a_bounded_prompt_of_a_huge_record(monkeypatch):
    """A 2 MB prompt is cut before tokenisation: the generated-from prompt is bounded by the characters kept
    (PROMPT_TOKENS x CLIP_CHARS_PER_TOKEN + slack; the tiny tokenizer spends a token per character)."""
    from lowrank_core import generate
    from lowrank_core.data import encoding

    model, tok = tiny_model("llama", seed=0)
    lengths = []
    monkeypatch.setattr(generate, "_generate", lambda m, ids, *a, **k: lengths.append(ids.shape[1]) or [1, 2])
    out = generate.side_by_side(model, model, tok, [Example("", "word " * 400_000, "an answer")], k=1,
                                max_new_tokens=2, modes=("greedy",))
    kept = generate.PROMPT_TOKENS * encoding.CLIP_CHARS_PER_TOKEN + encoding.CLIP_SLACK
    assert len(out) == 1 and lengths and max(lengths) < 2 * kept < 2_000_000 // 10


def test_a_spectrum_is_returned_when_its_cache_cannot_be_written(monkeypatch):
    from lowrank_core import spectra
    from lowrank_core.linears import linear_map

    model, _ = tiny_model("llama", seed=0)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(spectra, "save_spectrum", read_only)
    info = linear_map(model)[0]
    got = spectra.linear_spectrum(model, info, fingerprint="not-cached-anywhere-" + str(os.getpid()))
    assert got.name == info.name and len(got.weight_sv) == min(info.out_features, info.in_features)
