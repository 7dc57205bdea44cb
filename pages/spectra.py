"""Spectra: singular values of a weight and its activation-aware spectrum; ranks needed for an energy.

Nothing heavy runs when the page opens: the weight spectrum (one small SVD, cached on disk) shows at once,
the activation-aware one (a calibration pass) and the all-layers heatmap wait for their buttons. The
choices are mirrored into a plain session-state entry (widget keys are dropped when a page is left) and
seed the widgets when the page is opened again.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lowrank_core.linears import num_layers
from lowrank_core import spectra as spectra_mod
from ui import cache, charts, state
from ui.entry import ensure_app
from ui.grams import gram_id, grams_for
from ui.progress import run_with_status

ensure_app()

SPECTRA_CALIB = 16  # default calibration examples of an activation-aware spectrum
CHOICES_KEY = "spectra_choices"  # {widget key: value}: this page's choices, kept when the page is left
COMPUTED_KEY = "spectra_calibrated"  # {(fingerprint, gram id, layer)}: calibrations the user asked for
BASES = ["weight", "activation-aware"]

st.title("Spectra")
s = state.settings()
lm = cache.require_model(s)
linears = cache.linears(lm, parts=True)  # a fused linear and its parts (Phi-3)
n_layers = num_layers(linears)
modules = list(dict.fromkeys(li.module for li in linears))
choices = st.session_state.setdefault(CHOICES_KEY, {})
calibrated = st.session_state.setdefault(COMPUTED_KEY, set())


def remember(key: str, default, allowed=lambda value: True) -> None:
    """Seed widget ``key`` (before it is drawn) from the mirrored choice, or ``default``."""
    if key not in st.session_state:
        value = choices.get(key, default)
        st.session_state[key] = value if allowed(value) else default


def keep(key: str, value):
    choices[key] = value
    return value


remember("spectra_module", "down_proj" if "down_proj" in modules else modules[0], lambda m: m in modules)
remember("spectra_layers", [17 if n_layers > 17 else n_layers // 2], lambda ls: all(0 <= i < n_layers for i in ls))
remember("spectra_aware", True)
remember("spectra_calib", min(SPECTRA_CALIB, s.n_calib), lambda n: 1 <= n <= max(1, s.n_calib))
remember("spectra_rank", 16)
remember("heat_energy", 0.90)
remember("heat_basis", BASES[0], lambda b: b in BASES)
remember("heat_saving_only", False)

c1, c2, c3 = st.columns([3, 2, 2])
module = keep("spectra_module", c2.selectbox("Module", modules, key="spectra_module"))
if module == "lm_head":
    layers, chosen = [None], [li for li in linears if li.module == "lm_head"]
    c1.caption("lm_head has no layer index.")
else:
    layers = keep("spectra_layers", c1.multiselect("Layers", list(range(n_layers)), key="spectra_layers"))
    chosen = [li for li in linears if li.module == module and li.layer in layers]
    experts = sorted({li.expert for li in chosen if li.expert is not None})
    if experts:  # a mixture-of-experts linear: one expert's, in each chosen MoE layer
        remember("spectra_expert", experts[0], lambda e: e in experts)
        expert = keep("spectra_expert", c1.selectbox("Expert", experts, key="spectra_expert"))
        chosen = [li for li in chosen if li.expert in (None, expert)]
max_rank = max((li.max_rank for li in chosen), default=1)
if st.session_state["spectra_rank"] > max_rank:  # a remembered marker beyond this selection's largest rank
    st.session_state["spectra_rank"] = max_rank
rank = keep("spectra_rank", c3.number_input("Rank marker", 1, max_rank, key="spectra_rank"))
a1, a2, a3 = st.columns([3, 2, 2], vertical_alignment="bottom")
aware = keep("spectra_aware", a1.toggle(
    "Activation-aware", key="spectra_aware",
    help="also the singular values of W·L with L Lᵀ = XᵀX on the calibration split: 1 − energy kept is then "
         "the exact relative output error. Needs one calibration pass (press Compute spectra); cached on "
         "disk afterwards"))
n_calib = keep("spectra_calib", a2.number_input(
    "Calibration examples", 1, max(1, s.n_calib), key="spectra_calib", disabled=not aware,
    help="activation-aware spectra use the first N examples of the calib side (Compress uses all of them); "
         "fewer is faster the first time"))

if not chosen:
    st.info("Pick at least one layer.")
else:
    kinds, gid, n = ("weight",), None, 0
    spectra = [spectra_mod.linear_spectrum(lm.model, li, fingerprint=lm.fingerprint) for li in chosen]
    if aware:
        split = cache.data_split(s)
        n = min(int(n_calib), len(split.calib))
        gid = gram_id(split, s, n)
        ids = {li.name: f"{gid}-{li.gram_key}" for li in chosen}
        on_disk = all(spectra_mod.cached_spectrum(li, lm.fingerprint, ids[li.name]) for li in chosen)
        asked = all((lm.fingerprint, gid, li.layer) in calibrated for li in chosen)
        clicked = not on_disk and not asked and a3.button("Compute spectra", key="spectra_go", type="primary")
        if on_disk or asked or clicked:
            grams: dict = {}

            def lazy(info):
                def gram():
                    if not grams:  # the first cache miss collects, in one pass, the Grams of every module
                        # of the selected layers: switching the module afterwards needs no calibration
                        same = [li for li in linears if li.layer is not None and li.layer in layers]
                        grams.update(grams_for(lm, split, s, n, same or chosen))
                        calibrated.update((lm.fingerprint, gid, li.layer) for li in same or chosen)
                    return grams[info.gram_key]
                return gram

            spectra = [spectra_mod.linear_spectrum(lm.model, li, gram=lazy(li), fingerprint=lm.fingerprint,
                                                   gram_id=ids[li.name]) for li in chosen]
            kinds = ("weight", "aware")
        else:
            st.info(f"Showing the weight spectrum. **Compute spectra** adds the activation-aware one: a "
                    f"calibration pass on {n} examples (≤ {s.max_len} tokens each), cached on disk afterwards.")
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
               + (f" (calibration `{gid}`: {n} examples, ≤ {s.max_len} tokens each)." if "aware" in kinds else "."))

st.divider()
st.subheader("Rank needed for an energy, every layer and module")
h1, h2, h3 = st.columns([2, 2, 3])
energy = keep("heat_energy", h1.slider("Energy kept", 0.50, 0.999, step=0.005, format="%.3f", key="heat_energy"))
basis = keep("heat_basis", h2.radio("Spectrum", BASES, horizontal=True, key="heat_basis"))
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
    columns = [c for c in dict.fromkeys(table["column"]) if c != "lm_head"]   # MoE: one column per expert's linear
    pivot = table.pivot(index="layer", columns="column", values="rank")[columns]
    st.plotly_chart(charts.rank_heatmap(pivot, energy, basis), key="heat_chart")
    saves = int(table["saves"].sum())
    st.caption(f"{saves} of {len(table)} matrices reach {energy:.1%} of their {basis} energy below their "
               "break-even rank (factorising them at that rank saves parameters).")
    p1, p2 = st.columns([3, 2], vertical_alignment="center")
    saving_only = keep("heat_saving_only", p1.checkbox(
        "Only matrices that save parameters", key="heat_saving_only",
        help="leave the matrices whose rank is not below break-even dense; otherwise every matrix gets the "
             "heatmap's rank (the Budget page flags those above break-even)"))
    if p2.button("Use these ranks as a plan", key="heat_plan", type="primary"):
        try:
            plan = spectra_mod.plan_for_energy(all_spectra, energy, kind, decoder, saving_only=saving_only)
        except ValueError as e:
            st.error(str(e))
        else:
            state.store_plan(plan, source=f"Spectra: {energy * 100:g}% {basis} energy")
            st.switch_page("pages/budget.py")
