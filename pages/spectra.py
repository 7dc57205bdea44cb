"""Spectra: singular values of a weight and its activation-aware spectrum; ranks needed for an energy."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lowrank_core.archmap import num_layers
from lowrank_core import spectra as spectra_mod
from ui import cache, charts, state
from ui.entry import ensure_app
from ui.grams import gram_id, grams_for
from ui.progress import run_with_status

ensure_app()

SPECTRA_CALIB = 16  # default calibration examples of an activation-aware spectrum

st.title("Spectra")
s = state.settings()
lm = cache.require_model(s)
linears = cache.linears(lm)
by_name = {li.name: li for li in linears}
n_layers = num_layers(linears)
modules = list(dict.fromkeys(li.module for li in linears))

c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 2, 2])
default_layer = 17 if n_layers > 17 else n_layers // 2
module = c2.selectbox("Module", modules, index=modules.index("down_proj") if "down_proj" in modules else 0,
                      key="spectra_module")
if module == "lm_head":
    layers, chosen = [None], [li for li in linears if li.module == "lm_head"]
    c1.caption("lm_head has no layer index.")
else:
    layers = c1.multiselect("Layers", list(range(n_layers)), default=[default_layer], key="spectra_layers")
    chosen = [li for li in linears if li.module == module and li.layer in layers]
aware = c3.toggle("Activation-aware", value=True, key="spectra_aware",
                  help="singular values of W·L with L Lᵀ = XᵀX on the calibration split (needs one forward pass; "
                       "cached on disk afterwards)")
max_rank = max((li.max_rank for li in chosen), default=1)
rank = c4.number_input("Rank marker", 1, max_rank, min(16, max_rank), key="spectra_rank")
n_calib = c5.number_input("Calibration examples", 1, max(1, s.n_calib), min(SPECTRA_CALIB, s.n_calib),
                          key="spectra_calib",
                          help="activation-aware spectra use the first N examples of the calib side "
                               "(Compress uses all of them); fewer is faster the first time")

if not chosen:
    st.info("Pick at least one layer.")
else:
    split = cache.data_split(s) if aware else None
    n = min(int(n_calib), len(split.calib)) if aware else 0
    gid = gram_id(split, s, n) if aware else None
    grams: dict = {}

    def lazy(info):
        def gram():
            if not grams:  # the first cache miss collects, in one pass, the Grams of every module of the
                # selected layers: switching the module afterwards needs no calibration
                same_layers = [li for li in linears if li.layer is not None and li.layer in layers]
                grams.update(grams_for(lm, split, s, n, same_layers or chosen))
            return grams[info.gram_key]
        return gram

    spectra = [spectra_mod.linear_spectrum(lm.model, li, gram=lazy(li) if aware else None,
                                           fingerprint=lm.fingerprint,
                                           gram_id=f"{gid}-{li.gram_key}" if aware else None) for li in chosen]
    kinds = ("weight", "aware") if aware else ("weight",)
    curves, energies = spectra_mod.spectrum_curves(spectra, kinds)
    rows = spectra_mod.spectrum_rows(spectra, int(rank), kinds)
    info0 = chosen[0]
    title = f"{module} ({info0.out_features} x {info0.in_features}): singular values / the largest one"
    st.plotly_chart(charts.spectrum_figure(curves, energies, int(rank), info0.break_even_rank, title),
                    key="spectra_chart")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="spectra_table", column_config={
        "energy kept at rank": st.column_config.NumberColumn(format="percent"),
        "rel. output error at rank": st.column_config.NumberColumn(format="%.3e")})
    st.caption("For the activation-aware spectrum, 1 − energy kept is exactly the relative output error "
               "‖(W − W_r)Xᵀ‖² / ‖WXᵀ‖² of the best rank-r factorisation on the calibration tokens"
               + (f" (calibration `{gid}`: {n} examples, ≤ {s.max_len} tokens each)." if aware else "."))

st.divider()
st.subheader("Rank needed for an energy, every layer and module")
h1, h2, h3 = st.columns([2, 2, 3])
energy = h1.slider("Energy kept", 0.50, 0.999, 0.90, step=0.005, format="%.3f", key="heat_energy")
basis = h2.radio("Spectrum", ["weight", "activation-aware"], horizontal=True, key="heat_basis")
kind = "aware" if basis == "activation-aware" else "weight"
heat_split = cache.data_split(s) if kind == "aware" else None
heat_n = min(int(n_calib), len(heat_split.calib)) if kind == "aware" else 0
heat_gid = gram_id(heat_split, s, heat_n) if kind == "aware" else None
memo_key = (lm.fingerprint, kind, heat_gid)
all_spectra = cache.cached("all_spectra", memo_key)
decoder = [li for li in linears if li.layer is not None]
if all_spectra is None:
    h3.caption(f"{len(decoder)} matrices; computed once, then cached on disk"
               + (" (needs Grams of every layer: one calibration pass)" if kind == "aware" else ""))
    if h3.button("Compute the heatmap", key="heat_go"):
        def compute():
            grams = grams_for(lm, heat_split, s, heat_n, decoder, keep=False) if kind == "aware" else None
            return run_with_status(f"Spectra of {len(decoder)} matrices", lambda p: spectra_mod.model_spectra(
                lm.model, decoder, grams=grams, fingerprint=lm.fingerprint, gram_id=heat_gid, progress=p))
        all_spectra = cache.memo("all_spectra", memo_key, compute, max_entries=4)
if all_spectra is not None:
    table = pd.DataFrame(spectra_mod.energy_rank_table(all_spectra, energy, kind))
    pivot = table.pivot(index="layer", columns="module", values="rank")[[m for m in modules if m != "lm_head"]]
    st.plotly_chart(charts.rank_heatmap(pivot, energy, basis), key="heat_chart")
    saves = int(table["saves"].sum())
    st.caption(f"{saves} of {len(table)} matrices reach {energy:.1%} of their {basis} energy below their "
               "break-even rank (factorising them at that rank saves parameters).")
