"""Methods as plug-ins: the registry feeds plan validation, the compress pipeline, CLI choices, the
recipe schema and the app; a method declares what it needs and the pipeline follows."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pytest

from lowrank_core import methods
from lowrank_core.cli import build_parser, main
from lowrank_core.commands.compress import job_from_args
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.decompose import svd_factors
from lowrank_core.methods.base import _REGISTRY
from lowrank_core.methods.refit import RefitSettings
from lowrank_core.methods.svd import SVD
from lowrank_core.models import tiny_model
from lowrank_core.options import OptionError, option
from lowrank_core.plan import PlanError, load_plan
from lowrank_core.recipe import RecipeError, load_recipe, validate_recipe


def test_builtin_methods_in_display_order():
    assert methods.names()[:3] == ("svd", "whitened", "refit") and "anchored" in methods.names()
    assert not methods.get("svd").needs_grams and methods.get("whitened").needs_grams
    assert methods.get("refit").sequential and methods.get("refit").refines
    assert not methods.get("whitened").refines
    with pytest.raises(methods.MethodError, match="unknown method 'qr'; allowed: svd, whitened, refit"):
        methods.get("qr")


@pytest.fixture
def half_svd():
    """A new method registered for the test: plain SVD factors, declared sequential (so the pipeline
    runs layer by layer) and refining (it records each call)."""
    calls = []

    @methods.register
    class HalfSVD(methods.Method):
        name = "half-svd"
        summary = "test method"
        sequential = True

        def factorize(self, weight, rank, gram=None, bias=None):
            calls.append((tuple(weight.shape), rank, gram))
            return svd_factors(weight, rank, bias=bias)

        def refine_layer(self, ctx, names, progress):
            calls.append(("refine", ctx.index, tuple(names)))
            return {"train": [1.0], "valid": [1.0]}

    yield calls
    _REGISTRY.pop("half-svd")


def test_a_registered_method_is_offered_everywhere_and_drives_the_pipeline(half_svd):
    assert "half-svd" in methods.names()
    assert load_plan("mlp:r4:half-svd").rules[0].method == "half-svd"
    with pytest.raises(PlanError, match=f"allowed: {', '.join(methods.names())}$"):
        load_plan("mlp:r4:nope")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["compress"]
    method_flag = next(a for a in sub._actions if "--method" in a.option_strings)
    assert "half-svd" in method_flag.choices and "half-svd: test method" in method_flag.help
    assert validate_recipe({"plan": "mlp:r4", "method": "half-svd"}).method.method == "half-svd"
    assert methods.names()[-1] == "half-svd"
    with pytest.raises(RecipeError, match=f"method.name: 'nope' is not one of {', '.join(methods.names())}$"):
        validate_recipe({"plan": "mlp:r4", "method": "nope"})

    model, tok = tiny_model("llama")
    split = make_split("chatterbot", n_calib=6, n_eval=0, seed=0)
    result = compress(model, tok, "mlp:r4:half-svd; 0:attn:r4:svd", split.calib, CompressSettings(calib=6, max_len=64))
    assert result.split["path"] == "layerwise"  # a sequential method chose the pipeline
    factorized = [c for c in half_svd if c[0] != "refine"]
    assert len(factorized) == 2 * 3 and all(gram is None for _, _, gram in factorized)  # needs no Grams
    assert [c for c in half_svd if c[0] == "refine"] == [("refine", 0, ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
                                                         ("refine", 1, ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))]
    assert set(result.refit_curves) == {"layer 0", "layer 1"}
    assert {r["method"] for r in result.layers} == {"half-svd", "svd"}


def test_grams_are_collected_only_for_methods_that_need_them(monkeypatch):
    import lowrank_core.compress as compress_mod

    model, tok = tiny_model("llama")
    split = make_split("chatterbot", n_calib=6, n_eval=0, seed=0)
    seen = []
    real = compress_mod.collect_grams
    monkeypatch.setattr(compress_mod, "collect_grams", lambda *a, **k: seen.append(1) or real(*a, **k))
    settings = CompressSettings(calib=6, max_len=64, hidden_mse=False)  # 1 or 2 of 6 examples held out
    compress(model, tok, "mlp:r4:svd", split.calib, settings)
    assert len(seen) == 1  # svd: the held-out Grams of the error report only, no fit Grams
    compress(model, tok, "mlp:r4:whitened", split.calib, settings)
    assert len(seen) == 3  # whitened: held-out and fit Grams


@dataclass
class ClipSettings:
    """The settings of the test's own method: one field of each kind a form draws."""

    energy: float = option(0.5, minimum=0.0, help="clip: share of the energy kept")
    passes: int = option(2, minimum=1, help="clip: passes per layer")
    mode: str = option("soft", choices=("soft", "hard"), help="clip: soft or hard clipping")
    enabled: bool = option(False, help="clip: switch the clipping on")
    seed: int = option(0, derived=True, help="the data seed")

    def validate(self) -> None:
        if self.energy > 1:
            raise ValueError(f"clip energy {self.energy!r} must be at most 1")


@pytest.fixture
def clip():
    """A method with its own settings, registered for the test only: plain SVD factors (inherited),
    sequential, its ``refine_layer`` recording the settings the pipeline hands it."""
    seen = []

    @methods.register
    class Clip(SVD):
        name = "clip"
        summary = "test method with settings"
        sequential = True
        settings_class = ClipSettings

        def refine_layer(self, ctx, names, progress):
            seen.append(ctx.settings.of(self.name))
            return None

    yield seen
    methods.unregister("clip")
    assert "clip" not in methods.names() and "clip" not in CompressSettings().method_settings


def test_a_method_declares_its_settings_and_gets_flags_recipe_keys_form_fields_and_validation(
        clip, capsys, monkeypatch, tmp_path):
    # flags: --<method>-<field>, in compress --help; their values reach the spec
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    shown = capsys.readouterr().out
    assert all(f in shown for f in ("--clip-energy", "--clip-passes", "--clip-mode", "--clip-enabled"))
    assert "--clip-seed" not in shown and "clip: share of the energy kept (default: 0.5)" in shown
    args = build_parser().parse_args(["compress", "--plan", "mlp:r4:clip", "--clip-energy", "0.25",
                                      "--clip-mode", "hard", "--clip-enabled", "--seed", "3"])
    spec = job_from_args(args)
    assert spec.settings().of("clip") == ClipSettings(energy=0.25, mode="hard", enabled=True, seed=3)
    assert spec.method.of("refit") == RefitSettings(seed=3)  # the built-in's settings are untouched
    with pytest.raises(OptionError, match=r"^method: clip energy 2\.0 must be at most 1$"):
        job_from_args(build_parser().parse_args(["compress", "--plan", "mlp:r4", "--clip-energy", "2"]))

    # recipe keys: method.clip.<field>; bad values refused naming the key path; the spec round-trips
    recipe = validate_recipe({"plan": "mlp:r4:clip", "method": {"name": "clip", "clip": {"passes": 5}}})
    assert recipe.method.of("clip") == ClipSettings(passes=5) and recipe.plan.rules[0].method == "clip"
    assert recipe.to_dict()["method"]["clip"] == {"energy": 0.5, "passes": 5, "mode": "soft", "enabled": False}
    assert load_recipe(recipe.to_dict()) == recipe
    for bad, message in [({"mode": "medium"}, "method.clip.mode: 'medium' is not one of soft, hard"),
                         ({"passes": 0}, "method.clip.passes: 0 is below the minimum 1"),
                         ({"energy": "all"}, "method.clip.energy: 'all' is not a float"),
                         ({"enrgy": 1}, "method.clip.enrgy: unknown key; allowed in method.clip: energy, passes"),
                         ({"energy": 1.5}, "method.clip: clip energy 1.5 must be at most 1")]:
        with pytest.raises(RecipeError, match="^" + re.escape(message)):
            validate_recipe({"plan": "mlp:r4", "method": {"clip": bad}})

    # plan validation: a rule naming the method is accepted; the pipeline hands the method its settings
    assert load_plan({"rules": [{"modules": ["mlp"], "rank": 4, "method": "clip"}]}).rules[0].method == "clip"
    model, tok = tiny_model("llama")
    examples = make_split("chatterbot", n_calib=4, n_eval=0, seed=0).calib
    compress(model, tok, recipe.plan, examples, replace(recipe.settings(), calib=4, max_len=32, hidden_mse=False))
    assert clip == [ClipSettings(passes=5)] * 2  # once per decoder layer

    # form fields: the Compress page draws the method's widgets from the same fields
    from test_app import _run_entrypoint_every_time, finish_job, started

    _run_entrypoint_every_time(monkeypatch)
    for name, value in [("LOWRANK_APP_MODEL", "tiny"), ("LOWRANK_APP_DATA", "chatterbot"),
                        ("LOWRANK_CACHE", str(tmp_path / "cache")), ("LOWRANK_WORKSPACE", str(tmp_path / "ws"))]:
        monkeypatch.setenv(name, value)
    at = started("pages/compress.py")
    assert "Clip settings (method clip)" in [e.label for e in at.expander]
    assert at.number_input(key="clip_energy").value == 0.5 and at.number_input(key="clip_passes").value == 2
    assert at.selectbox(key="clip_mode").options == ["soft", "hard"] and at.selectbox(key="clip_mode").value == "soft"
    assert at.checkbox(key="clip_enabled").value is False
    assert at.number_input(key="refit_steps").value == RefitSettings().steps  # the built-in's, drawn the same way
    at.text_area(key="compress_plan").set_value("1:mlp:r8:clip")
    at.number_input(key="clip_energy").set_value(2.0)
    at.form_submit_button[0].click().run()
    assert "Cannot compress: method: clip energy 2.0 must be at most 1" in [e.value for e in at.error]
    at.number_input(key="clip_energy").set_value(0.75)
    at.selectbox(key="clip_mode").set_value("hard")
    at.form_submit_button[0].click().run()
    at = finish_job(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = at.session_state["lowrank_results"][at.session_state["lowrank_current_job"]]
    assert job.spec.method.of("clip") == ClipSettings(energy=0.75, mode="hard")
    assert clip[-1] == ClipSettings(energy=0.75, mode="hard")  # the page's values reached the method


def test_a_method_whose_settings_would_shadow_a_key_of_the_method_section_is_refused():
    @methods.register
    class Device(methods.Method):
        name = "device"   # like CompressSettings.device: method.device could not be told apart
        summary = "test method"
        settings_class = ClipSettings

    try:
        with pytest.raises(RecipeError, match="^method: key 'device' is declared twice"):
            validate_recipe({"plan": "mlp:r4"})
    finally:
        methods.unregister("device")
