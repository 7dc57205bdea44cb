"""The app shows issue 23's input errors as the CLI's one line, never an exception: an over-long model path
and a model folder in the workspace whose chat template escapes the sandbox or hangs (refused within the
template budget, so no server worker is tied up)."""
from __future__ import annotations

import shutil

import pytest

from lowrank_core.data import template
from lowrank_core.models import tiny_model
from lowrank_core.workspace import workspace_dir
from test_app import started, texts, tiny_env  # noqa: F401  (tiny_env: autouse, sets the workspace)

HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"


def applied(source: str):
    at = started()
    at.selectbox(key="model_kind").set_value("Local folder, config.json or .gguf").run()
    at.text_input(key="model_text").set_value(source).run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    return at


def test_an_overlong_model_path_is_one_line_on_the_page():
    at = applied("a" * 5000)
    assert "is too long (5,000 characters; allowed: names of up to 255 bytes" in texts(at.error)
    assert "File name too long" not in texts(at.error) and "Errno" not in texts(at.error)
    assert at.session_state["lowrank_settings"].model_source == "tiny"


@pytest.mark.parametrize("text,why", [("{{ messages.__class__.__mro__ }}", "SecurityError"),
                                      (HANG, "did not finish rendering a probe conversation within 1 s")])
def test_a_bad_chat_template_in_the_workspace_is_one_line_on_the_page(text, why, monkeypatch):
    monkeypatch.setattr(template, "RENDER_BUDGET_S", 1.0)
    folder = workspace_dir() / "badtemplate"
    model, tokenizer = tiny_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(text)
    at = applied("badtemplate")
    shown = texts(at.error)
    assert "the chat template of" in shown and why in shown and "budget: 1 s" in shown, shown
    shutil.rmtree(folder)
