"""The workspace: paths typed into the app are read and written only inside it (unit and AppTest checks)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowrank_core.workspace import (WorkspaceError, app_source, export_folder, plan_source, resolve_inside,
                                    workspace_dir, writable_file)
from test_app import compressed, started, texts, tiny_env  # noqa: F401  (tiny_env: autouse, sets the workspace)


@pytest.fixture
def ws(tmp_path) -> Path:
    """The workspace tiny_env points LOWRANK_WORKSPACE at (created on demand)."""
    root = workspace_dir()
    assert root == (tmp_path / "workspace").resolve() and root.is_dir()
    return root


# ----------------------------------------------------------------------------- the folder
def test_workspace_defaults_to_the_cache_and_is_created(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWRANK_WORKSPACE")
    assert workspace_dir() == (tmp_path / "cache" / "workspace").resolve()
    assert workspace_dir().is_dir()
    monkeypatch.setenv("LOWRANK_WORKSPACE", str(tmp_path / "elsewhere" / "ws"))
    assert workspace_dir() == (tmp_path / "elsewhere" / "ws").resolve() and workspace_dir().is_dir()


# ----------------------------------------------------------------------------- resolve_inside
def test_relative_and_absolute_paths_inside_are_allowed(ws):
    assert resolve_inside("plans/plan.yaml", "plan file") == ws / "plans" / "plan.yaml"
    assert resolve_inside(str(ws / "a" / "b"), "folder") == ws / "a" / "b"
    assert resolve_inside("a/../b", "folder") == ws / "b"  # `..` that stays inside is fine


@pytest.mark.parametrize("value, why", [
    ("../x.yaml", "outside the workspace"), ("a/../../x", "outside the workspace"),
    ("/etc/passwd", "outside the workspace"), ("/", "outside the workspace"), ("~/x", "outside the workspace"),
    ("", "is empty"), ("   ", "is empty"), (".", "the workspace itself"), ("a/..", "the workspace itself"),
    ("a\0b", "cannot be resolved"),
])
def test_paths_leaving_the_workspace_are_refused(ws, value, why):
    with pytest.raises(WorkspaceError) as e:
        resolve_inside(value, "plan file")
    message = str(e.value)
    assert why in message and repr(value.strip()) in message and str(ws) in message and "plan file" in message


def test_the_workspace_itself_given_absolute_is_refused(ws):
    with pytest.raises(WorkspaceError, match="the workspace itself"):
        resolve_inside(str(ws), "export target")


def test_symlinks_are_followed_before_the_check(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (ws / "link").symlink_to(outside)
    (ws / "inner").mkdir()
    (ws / "inner-link").symlink_to(ws / "inner")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        resolve_inside("link/secret.json", "data source")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        resolve_inside("link/new-file", "plan file")  # also for what does not exist yet
    assert resolve_inside("inner-link/x", "folder") == ws / "inner" / "x"


def test_an_existing_file_as_a_parent_is_refused(ws):
    (ws / "plans").mkdir()
    (ws / "plans" / "plan.yaml").write_text("rules: []\n")
    with pytest.raises(WorkspaceError, match="which is a file, not a folder") as e:
        resolve_inside("plans/plan.yaml/deeper/x", "export target")
    assert "plan.yaml" in str(e.value)


def test_must_exist(ws):
    with pytest.raises(WorkspaceError, match="not found"):
        resolve_inside("missing.json", "model source", must_exist=True)
    (ws / "here.json").write_text("{}")
    assert resolve_inside("here.json", "model source", must_exist=True) == ws / "here.json"


# ----------------------------------------------------------------------------- app_source
@pytest.mark.parametrize("name", ["default", "chatterbot", "tiny", "tiny-mistral", "tiny-qwen2",
                                  "Open-Orca/Mistral-7B-OpenOrca", "openaccess-ai-collective/oo-gpt4-filtered"])
def test_bundled_names_and_hub_ids_pass_unchanged(ws, name):
    assert app_source(name, "data source") == name


def test_local_sources_must_exist_inside_the_workspace(ws, tmp_path):
    (ws / "data").mkdir()
    (ws / "data" / "train.jsonl").write_text("")
    assert app_source("data/train.jsonl", "data source") == str(ws / "data" / "train.jsonl")
    assert app_source(str(ws / "data"), "data source") == str(ws / "data")
    for value in ("/", "/etc", "../cache", str(tmp_path)):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            app_source(value, "data source")
    for value in ("missing.jsonl", "org/missing.json", "org/model.gguf", "./x"):  # file names, not hub ids
        with pytest.raises(WorkspaceError, match="not found"):
            app_source(value, "model source")
    with pytest.raises(WorkspaceError, match="is empty"):
        app_source("  ", "model source")


def test_typed_as_a_path_even_a_name_is_a_path(ws):
    with pytest.raises(WorkspaceError, match="not found"):
        app_source("tiny", "model source", local=True)
    with pytest.raises(WorkspaceError, match="not found"):
        app_source("org/name", "model source", local=True)
    (ws / "org" / "name").mkdir(parents=True)
    assert app_source("org/name", "model source", local=True) == str(ws / "org" / "name")
    assert app_source("org/name", "model source") == str(ws / "org" / "name")  # a hub-like name of a local folder


def test_a_hub_like_name_of_the_servers_own_folder_is_refused(ws, monkeypatch, tmp_path):
    server = tmp_path / "server"
    (server / "tests" / "fixtures").mkdir(parents=True)
    monkeypatch.chdir(server)  # the engine would read tests/fixtures from here as a local folder
    with pytest.raises(WorkspaceError, match="server's own folder"):
        app_source("tests/fixtures", "data source")


def test_a_folder_linking_outside_is_refused(ws, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text("")
    (ws / "data" / "deep").mkdir(parents=True)
    (ws / "data" / "ok.jsonl").write_text("")
    (ws / "data" / "loop").symlink_to(ws / "data")  # a link inside is fine (and no endless walk)
    assert app_source("data", "data source") == str(ws / "data")
    (ws / "data" / "deep" / "secret.jsonl").symlink_to(tmp_path / "outside" / "secret.jsonl")
    with pytest.raises(WorkspaceError, match="a link to a place outside the workspace"):
        app_source("data", "data source")


def test_plan_source_reads_plan_files_only_inside(ws):
    assert plan_source("6-31:attn:r16; 0-6:mlp:k0.9") == "6-31:attn:r16; 0-6:mlp:k0.9"
    assert plan_source("rules:\n- modules: mlp\n  rank: 8") == "rules:\n- modules: mlp\n  rank: 8"
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        plan_source("/etc/secret.yaml")
    (ws / "p.yaml").write_text("rules: []\n")
    assert plan_source("p.yaml") == str(ws / "p.yaml")


# ----------------------------------------------------------------------------- writing
def test_writable_file_never_overwrites_unless_asked(ws):
    target = writable_file("plans/new.yaml", "plan file", suffixes=(".yaml",))
    assert target == ws / "plans" / "new.yaml" and target.parent.is_dir() and not target.exists()
    target.write_text("x")
    with pytest.raises(WorkspaceError, match="already exists"):
        writable_file("plans/new.yaml", "plan file")
    assert writable_file("plans/new.yaml", "plan file", overwrite=True) == target
    with pytest.raises(WorkspaceError, match="is a folder"):
        writable_file("plans", "plan file", overwrite=True)
    with pytest.raises(WorkspaceError, match="does not end in"):
        writable_file("plans/run.py", "plan file", suffixes=(".yaml", ".json"))


def test_export_folder(ws):
    assert export_folder("exports/a") == ws / "exports" / "a"
    (ws / "exports" / "a").mkdir(parents=True)
    with pytest.raises(WorkspaceError, match="already exists") as e:
        export_folder("exports/a")
    assert "--" not in str(e.value)  # no CLI flag in what the app shows
    assert export_folder("exports/a", replace=True) == ws / "exports" / "a"
    (ws / "file").write_text("")
    with pytest.raises(WorkspaceError, match="is a file"):
        export_folder("file", replace=True)


# ----------------------------------------------------------------------------- Budget page
def submit(at, path_input, path: str, checkbox: str, ticked: bool, button: str):
    """Type ``path``, set the checkbox, click; the page shows errors, never an exception."""
    path_input.set_value(path)
    at.checkbox(key=checkbox).set_value(ticked)
    at.button(key=button).click().run()
    assert not at.exception, at.exception
    return at


def budget_save(at, path: str, overwrite: bool = False):
    return submit(at, at.text_input(key="budget_save_path"), path, "budget_overwrite", overwrite, "budget_save")


def test_budget_saves_only_inside_the_workspace(ws, tmp_path):
    at = started("pages/budget.py")
    assert at.text_input(key="budget_save_path").value == "plans/plan.yaml"
    assert str(ws) in texts(at.caption)
    for bad in ("../x.yaml", "/etc/passwd", str(tmp_path / "x.yaml")):
        budget_save(at, bad)
        assert "outside the workspace" in texts(at.error) and not at.success
    assert not (tmp_path / "x.yaml").exists()
    budget_save(at, "plans/plan.yaml")
    saved = ws / "plans" / "plan.yaml"
    assert f"Saved {saved}" in texts(at.success) and "mlp" in saved.read_text()
    saved.write_text("rules: []  # mine\n")
    budget_save(at, "plans/plan.yaml")
    assert "already exists" in texts(at.error) and saved.read_text() == "rules: []  # mine\n"
    budget_save(at, "plans/plan.yaml", overwrite=True)
    assert f"Saved {saved}" in texts(at.success) and "mlp" in saved.read_text()


def test_budget_reads_configs_and_plan_files_only_inside_the_workspace(ws, tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text("rules:\n- modules: attn\n  rank: 4\n")
    at = started("pages/budget.py")
    at.text_area(key="budget_import").set_value(str(outside)).run()
    at.button(key="budget_import_btn").click().run()
    assert not at.exception, at.exception
    assert "outside the workspace" in texts(at.error)
    at.radio(key="budget_target").set_value("Another config.json or model folder").run()
    at.text_input(key="budget_config_path").set_value("/etc").run()
    assert not at.exception, at.exception
    assert "outside the workspace" in texts(at.error) and str(ws) in texts(at.caption)


# ----------------------------------------------------------------------------- Export page
def export(at, target: str, replace: bool = False):
    return submit(at, at.text_input[0], target, "export_replace", replace, "export_go")


def test_export_targets_stay_in_the_workspace_and_failures_clear_a_success(ws, tmp_path):
    at = compressed("mlp:r8")
    at.switch_page("pages/export.py").run()
    assert at.text_input[0].value.startswith("exports/tiny-run1-") and str(ws) in texts(at.caption)
    export(at, "")
    assert "is empty" in texts(at.error)
    existed = Path("/tmp/elsewhere").exists()
    export(at, "/tmp/elsewhere")
    assert "outside the workspace" in texts(at.error) and Path("/tmp/elsewhere").exists() == existed
    (ws / "a-file").write_text("")
    export(at, "a-file/student")
    assert "which is a file, not a folder" in texts(at.error) and "Traceback" not in texts(at.error)
    export(at, "exports/student")
    assert "Verified" in texts(at.success), texts(at.error)
    assert (ws / "exports" / "student" / "lowrank.json").is_file()
    export(at, "exports/student")  # exists, no replace: refused, and the earlier success is gone
    errors = texts(at.error)
    assert "already exists" in errors and "--" not in errors and not at.success
    before = (ws / "exports" / "student" / "lowrank.json").stat().st_ino
    export(at, "exports/student", replace=True)
    assert "Verified" in texts(at.success), texts(at.error)
    assert (ws / "exports" / "student" / "lowrank.json").stat().st_ino != before  # written anew
    export(at, "/tmp/elsewhere")
    assert not at.success and "outside the workspace" in texts(at.error)


# ----------------------------------------------------------------------------- Model & data page
def test_model_page_refuses_a_data_source_outside_and_keeps_the_settings(ws):
    at = started()
    before = at.session_state["lowrank_settings"]
    at.selectbox(key="data_kind").set_value("Local OpenOrca file or folder (.parquet/.jsonl/.json)").run()
    assert str(ws) in texts(at.caption)
    at.text_input(key="data_text").set_value("/").run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    error = texts(at.error)
    assert "data source '/'" in error and "outside the workspace" in error and str(ws) in error
    assert at.session_state["lowrank_settings"] == before  # the last good settings stay
    assert "calib **16** · val **0** · eval **32**" in texts(at.sidebar.markdown)


def test_model_page_applies_a_data_file_inside_the_workspace(ws):
    import json

    rows = [{"system_prompt": "", "question": f"question {i}?", "response": f"answer {i}."} for i in range(200)]
    (ws / "orca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at = started()
    at.selectbox(key="data_kind").set_value("Local OpenOrca file or folder (.parquet/.jsonl/.json)").run()
    at.text_input(key="data_text").set_value("orca.jsonl").run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    assert at.session_state["lowrank_settings"].data_source == str(ws / "orca.jsonl")
    assert not at.error, texts(at.error)
    assert "apply_settings" not in [b.key for b in at.button]  # what was typed is what is applied


def test_model_page_refuses_a_model_path_outside(ws, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    at = started()
    at.selectbox(key="model_kind").set_value("Local folder, config.json or .gguf").run()
    at.text_input(key="model_text").set_value(str(tmp_path / "model")).run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    assert "outside the workspace" in texts(at.error)
    assert at.session_state["lowrank_settings"].model_source == "tiny"
