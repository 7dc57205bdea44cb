"""Spectra: values, energy, rank for energy, disk cache (a hit recomputes nothing), heatmap table."""
import numpy as np
import pytest
import torch

import lowrank_core.spectra as spectra
from lowrank_core.linears import linear_map
from lowrank_core.calibrate import collect_grams
from lowrank_core.decompose import relative_output_error, whitened_factors


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def calibrated(tiny):
    model, _ = tiny
    ids = torch.randint(0, 250, (3, 40), generator=torch.Generator().manual_seed(0))
    linears = linear_map(model)
    grams = collect_grams(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], linears)
    return model, linears, grams


def test_energy_and_rank_for_energy():
    s = spectra.Spectrum("x", np.array([3.0, 2.0, 1.0, 0.0]), None, break_even_rank=2, max_rank=4)
    np.testing.assert_allclose(s.energy(), [9 / 14, 13 / 14, 1, 1])
    assert [s.rank_for_energy(f) for f in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="1.5"):
        s.rank_for_energy(1.5)
    with pytest.raises(ValueError, match="no activation-aware"):
        s.energy("aware")
    with pytest.raises(ValueError, match="'bogus'"):
        s.values("bogus")
    rows = s.rows()
    assert len(rows) == 4 and rows[1] == {"rank": 2, "weight_sv": 2.0, "weight_energy": pytest.approx(13 / 14)}


def test_spectrum_values_and_aware_energy_is_output_error(calibrated, cache):
    model, linears, grams = calibrated
    info = next(i for i in linears if i.module == "gate_proj")
    gram = grams[info.gram_key]
    s = spectra.linear_spectrum(model, info, gram, fingerprint="fp")
    W = model.get_submodule(info.name).weight
    np.testing.assert_allclose(s.weight_sv, torch.linalg.svdvals(W.detach().double()).numpy(), rtol=1e-6, atol=1e-9)
    assert s.aware_sv.shape == (info.max_rank,) and s.break_even_rank == info.break_even_rank
    r = s.rank_for_energy(0.9, "aware")
    err = relative_output_error(W, whitened_factors(W, gram, r).merged(), gram)
    assert err == pytest.approx(1 - s.energy("aware")[r - 1], abs=1e-6) and err <= 0.1 + 1e-6
    d = s.to_dict()
    assert d["shape"] == [info.out_features, info.in_features] and set(d["energy_ranks"]) == {"weight", "aware"}


def test_cache_hit_recomputes_nothing(calibrated, cache, monkeypatch):
    model, linears, grams = calibrated
    info = next(i for i in linears if i.module == "down_proj")
    calls = {"n": 0, "gram": 0}
    real = spectra.compute_spectrum

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    def lazy_gram():
        calls["gram"] += 1
        return grams[info.gram_key]

    monkeypatch.setattr(spectra, "compute_spectrum", counting)
    first = spectra.linear_spectrum(model, info, lazy_gram, fingerprint="fp", gram_id="calib-a")
    second = spectra.linear_spectrum(model, info, lazy_gram, fingerprint="fp", gram_id="calib-a")
    assert calls == {"n": 1, "gram": 1}
    np.testing.assert_array_equal(first.aware_sv, second.aware_sv)
    np.testing.assert_array_equal(first.weight_sv, second.weight_sv)
    assert second.name == info.name and second.layer == info.layer and second.gram_id == "calib-a"
    assert list((cache / "spectra" / "fp").glob("*.npz"))
    spectra.linear_spectrum(model, info, lazy_gram, fingerprint="fp", gram_id="calib-b")  # other calibration
    spectra.linear_spectrum(model, info, None, fingerprint="fp")                          # weight only
    spectra.linear_spectrum(model, info, None, fingerprint="other")                       # other model
    assert calls == {"n": 4, "gram": 2}
    damaged = next((cache / "spectra" / "fp").glob("*calib-a.npz"))
    damaged.write_bytes(b"not an npz")
    again = spectra.linear_spectrum(model, info, lazy_gram, fingerprint="fp", gram_id="calib-a")
    assert calls == {"n": 5, "gram": 3}
    np.testing.assert_array_equal(again.aware_sv, first.aware_sv)
    with pytest.raises(ValueError, match="gram_id"):
        spectra.linear_spectrum(model, info, lazy_gram, fingerprint="fp")


def test_model_spectra_and_heatmap_table(calibrated, cache):
    model, linears, grams = calibrated
    decoder = [i for i in linears if i.layer is not None]
    all_spectra = spectra.model_spectra(model, decoder, grams, fingerprint="fp", gram_id="c")
    table = spectra.energy_rank_table(all_spectra, 0.95, "aware")
    assert [(r["layer"], r["module"]) for r in table] == [(i.layer, i.module) for i in decoder]
    for row, s in zip(table, all_spectra):
        assert 1 <= row["rank"] <= row["max_rank"] and row["rank"] == s.rank_for_energy(0.95, "aware")
        assert row["saves"] == (row["rank"] < row["break_even_rank"])


def test_spectrum_cli_json_and_text(cache, capsys):
    import json

    from lowrank_core.cli import main

    assert main(["spectrum", "--model", "tiny", "--layer", "1", "--module", "gate_proj", "--calib", "3",
                 "--data", "chatterbot", "--max-len", "48", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "model.layers.1.mlp.gate_proj" and d["shape"] == [128, 64]
    assert len(d["weight_sv"]) == len(d["aware_sv"]) == 64 and d["calibration"]["examples"] == 3
    assert set(d["energy_ranks"]) == {"weight", "aware"} and d["break_even_rank"] == 42
    assert main(["spectrum", "--model", "tiny", "--layer", "0", "--module", "down_proj", "--calib", "0",
                 "--energy", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "64 x 128" in out and "break-even rank 42" in out and "50%" in out and "activation-aware" not in out
    assert main(["spectrum", "--model", "tiny", "--layer", "7", "--module", "q_proj", "--calib", "0"]) == 2
    assert "--layer 7" in capsys.readouterr().err


def test_spectrum_cli_and_app_share_calibration_id_gram_and_cache_entry(cache, capsys, monkeypatch):
    """The ``spectrum`` command and the app's Spectra path (``ui.grams``) name the same calibration the same
    way (``data.calibration_id``), calibrate on the same batches (``data.calibration_batches``: a prompt that
    fills max_len still counts) and so share the Gram and the on-disk spectrum cache entry."""
    import json

    import lowrank_core.calibrate as calibrate
    import ui.grams as app_grams
    from lowrank_core.cli import main
    from lowrank_core.data import batch_tokens, calibration_batches, calibration_id, make_split
    from lowrank_core.models import load_model
    from ui.state import Settings

    n, max_len = 6, 40  # 2 of the first 6 chatterbot calib prompts (seed 0) are longer than 40 tokens
    cli_grams = []
    collect = calibrate.collect_grams
    monkeypatch.setattr("lowrank_core.commands.spectrum.collect_grams",
                        lambda *a, **k: cli_grams.append(collect(*a, **k)) or cli_grams[-1])
    assert main(["spectrum", "--model", "tiny", "--layer", "1", "--module", "down_proj", "--calib", str(n),
                 "--data", "chatterbot", "--max-len", str(max_len), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(cli_grams) == 1  # one calibration pass (a cache miss: LOWRANK_CACHE is empty)

    # the app: a split with more calib examples than the spectrum uses (Settings.n_calib > n)
    s = Settings(model_source="tiny", data_source="chatterbot", n_calib=16, n_eval=8, max_len=max_len)
    app_split = make_split(s.data_source, n_calib=s.n_calib, n_eval=s.n_eval, seed=s.seed)
    cli_split = make_split("chatterbot", n_calib=n, n_eval=0, seed=0)
    cid = app_grams.gram_id(app_split, s, n)
    assert cid == calibration_id(app_split, n, max_len) == calibration_id(cli_split, n, max_len)
    assert cid == f"{cli_split.info.fingerprints['calib']}-n{n}-len{max_len}" == d["calibration"]["calibration_id"]
    assert app_split.calib[:n] == cli_split.calib
    assert calibration_id(app_split, 16, max_len).startswith(app_split.info.fingerprints["calib"])
    assert calibration_id(app_split, n, max_len + 1) != cid and calibration_id(app_split, n - 1, max_len) != cid
    with pytest.raises(ValueError, match="17"):
        calibration_id(app_split, 17, max_len)

    lm = load_model("tiny", device="cpu")
    info = next(li for li in linear_map(lm.model) if li.name == "model.layers.1.mlp.down_proj")
    monkeypatch.setattr(calibrate, "collect_grams", collect)
    monkeypatch.setattr(app_grams, "run_with_status", lambda label, work: work(None))  # no streamlit page
    layer = [li for li in linear_map(lm.model) if li.layer == 1]  # the page collects the whole layer at once
    app_gram = app_grams.grams_for(lm, app_split, s, n, layer, keep=False)[info.gram_key]
    cli_gram = cli_grams[0][info.gram_key]
    expected_tokens = batch_tokens(calibration_batches(lm.tokenizer, cli_split.calib, 4, max_len))
    assert app_gram.tokens == cli_gram.tokens == expected_tokens == n * max_len
    assert torch.allclose(app_gram.gram, cli_gram.gram, rtol=1e-10, atol=0)
    np.testing.assert_allclose(d["aware_sv"], spectra.compute_spectrum(lm.model, info, app_gram.gram).aware_sv,
                               rtol=1e-5)

    # the app's Spectra page asks for this spectrum exactly so: it is the CLI's disk cache entry, no Gram needed
    def no_gram():
        raise AssertionError("the app recomputed a spectrum the CLI had cached")
    hit = spectra.linear_spectrum(lm.model, info, no_gram, fingerprint=lm.fingerprint, gram_id=f"{cid}-{info.gram_key}")
    assert d["gram_id"] == hit.gram_id == f"{cid}-{info.gram_key}" and d["fingerprint"] == lm.fingerprint
    np.testing.assert_array_equal(hit.aware_sv, np.array(d["aware_sv"]))


def test_page_rows_and_curves_come_from_the_engine():
    """The Spectra page's table and curves: energy kept at a rank, the output error it implies, ranks per level."""
    from lowrank_core.spectra import Spectrum, spectrum_curves, spectrum_rows

    sp = Spectrum(name="model.layers.2.mlp.down_proj", weight_sv=np.array([2.0, 1.0, 1.0]),
                  aware_sv=np.array([3.0, 1.0, 0.0]), break_even_rank=1, max_rank=3, layer=2, module="down_proj")
    curves, energies = spectrum_curves([sp], ("weight", "aware"))
    assert list(curves) == ["L2 weight", "L2 activation-aware"]
    assert curves["L2 weight"] == [1.0, 0.5, 0.5] and energies["L2 activation-aware"] == pytest.approx([0.9, 1.0, 1.0])
    weight, aware = spectrum_rows([sp], rank=1, kinds=("weight", "aware"))
    assert weight["energy kept at rank"] == pytest.approx(4 / 6) and weight["rel. output error at rank"] is None
    assert aware["rel. output error at rank"] == pytest.approx(0.1)  # 1 - 9/10: exact on the calibration tokens
    assert aware["rank for 90%"] == 1 and weight["rank for 90%"] == 3
    assert spectrum_rows([sp], rank=99, kinds=("aware",))[0]["energy kept at rank"] == pytest.approx(1.0)  # capped
