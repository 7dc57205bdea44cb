"""Methods as plug-ins: the registry feeds plan validation, the compress pipeline, CLI choices, the
recipe schema and the app; a method declares what it needs and the pipeline follows."""
from __future__ import annotations

import pytest

from lowrank_core import methods
from lowrank_core.cli import build_parser
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.decompose import svd_factors
from lowrank_core.methods.base import _REGISTRY
from lowrank_core.models import tiny_model
from lowrank_core.plan import PlanError, load_plan
from lowrank_core.recipe import RecipeError, validate_recipe


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
