"""Compress: build a student from a plan, with progress; per-matrix errors, hidden MSE and refit curves."""
from __future__ import annotations


import pandas as pd
import streamlit as st

from lowrank_core import compress as compress_mod
from lowrank_core import heal as heal_mod
from lowrank_core import methods
from lowrank_core import plan as plan_mod
from lowrank_core.workspace import plan_source
from ui import cache, charts, forms, jobs, state
from ui.entry import ensure_app, stop_page
from ui.progress import POLL_SECONDS, job_status

ensure_app()
FORM_KEY = "lowrank_compress_form"
ERROR_KEY = "lowrank_compress_error"
STOPPED_KEY = "lowrank_compress_stopped"
_C, _H = compress_mod.CompressSettings(), heal_mod.HealSettings()  # engine defaults
DEFAULTS = dict(method=_C.method, batch_size=_C.batch_size, layerwise=_C.layerwise, valid=_C.valid_fraction,
                heal_tokens=_H.tokens, heal_lr=_H.lr, heal_loss=_H.loss, heal_batch_tokens=_H.batch_tokens,
                method_settings={name: forms.option_values(own) for name, own in _C.method_settings.items()})

def draw_form(v: dict, default_plan: str, n_calib: int, busy: bool) -> dict:
    """The job form, filled from ``v``. While a job runs it is drawn disabled under other keys (disabling
    a widget resets it), so the real widgets come back afterwards showing the submitted values."""
    sfx = "_busy" if busy else ""
    with st.form("compress_form"):
        st.caption("Plan: prefilled from the Budget page (or a point opened on the Search page); YAML or the "
                   "compact form (e.g. `6-29:attn:r16; 0-6:mlp:r16`).")
        plan = st.text_area("Plan", value=default_plan, height=120, key="compress_plan" + sfx, disabled=busy)
        c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 2, 2])
        names = list(methods.names())
        out = dict(plan=plan)
        out["method"] = c1.selectbox(
            "Method (rules without one)", names, index=names.index(v["method"]), key="compress_method" + sfx,
            disabled=busy, help=methods.help_text())
        out["calib"] = c2.number_input("Calibration examples", 1, max(1, n_calib), min(v["calib"], max(1, n_calib)),
                                       key="compress_calib" + sfx, disabled=busy,
                                       help="at most the split's calib side")
        out["batch_size"] = c3.number_input("Batch size", 1, 256, v["batch_size"], key="compress_batch" + sfx,
                                            disabled=busy)
        out["valid"] = c4.number_input("Held-out fraction", 0.0, 0.9, v["valid"], step=0.05,
                                       key="compress_valid" + sfx, disabled=busy,
                                       help="share of the calibration examples held out, for every method: "
                                            "per-matrix errors, hidden MSE and refit early stopping use them")
        out["layerwise"] = c5.checkbox("Layer by layer", value=v["layerwise"], key="compress_layerwise" + sfx,
                                       disabled=busy, help="sequential path: each layer calibrated on the "
                                                           "student's own inputs (always on for refit)")
        out["method_settings"] = {}
        for name, cls in methods.settings_classes().items():  # each method's own settings, from its fields
            with st.expander(f"{name.capitalize()} settings (method {name})"):
                out["method_settings"][name] = forms.settings_widgets(
                    cls, v.get("method_settings", {}).get(name, {}), key=name, disabled=busy, suffix=sfx)
        with st.expander("Healing: end-to-end distillation after compression (any method)"):
            h1, h2, h3, h4 = st.columns(4)
            out["heal_tokens"] = h1.number_input("training tokens (0 = off)", 0, 100_000_000, v["heal_tokens"],
                                                 step=1000, key="heal_tokens" + sfx, disabled=busy,
                                                 help="real tokens of calibration-side examples the student trains "
                                                      "on against the teacher's next-token distributions")
            out["heal_lr"] = h2.number_input("learning rate", 1e-7, 1.0, v["heal_lr"], format="%.1e",
                                             key="heal_lr" + sfx, disabled=busy)
            out["heal_loss"] = h3.selectbox("loss", list(heal_mod.LOSSES), index=list(heal_mod.LOSSES).index(
                v["heal_loss"]), key="heal_loss" + sfx, disabled=busy,
                help="kl: KL(teacher ‖ student) over every real token; ce: answer-token cross-entropy")
            out["heal_batch_tokens"] = h4.number_input("tokens per step", 16, 1_000_000, v["heal_batch_tokens"],
                                                       key="heal_batch_tokens" + sfx, disabled=busy)
        out["submitted"] = st.form_submit_button("Compress", type="primary", disabled=busy)
    return out


@st.fragment(run_every=POLL_SECONDS)
def job_progress(job, name: str) -> None:
    """Progress of the running job, redrawn every POLL_SECONDS; a full rerun once it has finished."""
    method = job.info["spec"].method.method
    with job_status(job, f"Compressing {name} ({method})", "preparing calibration batches…"):
        if job.heal_curve:
            tokens, train, valid = zip(*job.heal_curve)
            st.plotly_chart(charts.line_chart({"train (last step)": train, "valid (last check)": valid},
                                              "healing loss while it runs", "training tokens", "loss per token",
                                              x=tokens), key="compress_heal_live")
        if st.button("Stop", key="compress_stop", disabled=job.stop_requested):
            job.request_stop()
        st.caption("Runs in the background: other pages stay usable and nothing restarts it. Stopping ends "
                   "the job at its next progress report and keeps nothing of it.")


st.title("Compress")
s = state.settings()
lm = cache.require_model(s)
split = cache.data_split(s)
pending = st.session_state.get(state.JOB_KEY)
running = pending is not None
stored = state.stored_plan()
budget_text = stored["text"] if stored else "all:k0.9"
# the form's last submitted values: defaults of its widgets before, during and after a job
v = st.session_state.setdefault(FORM_KEY, dict(DEFAULTS, calib=len(split.calib)))
default_plan = v["plan"] if v.get("budget_text") == budget_text and v.get("plan") else budget_text

form = draw_form(v, default_plan, len(split.calib), running)
if ERROR_KEY in st.session_state:
    st.error(st.session_state.pop(ERROR_KEY))
if STOPPED_KEY in st.session_state:
    st.warning(st.session_state.pop(STOPPED_KEY))

if form.pop("submitted"):
    v.update(form, budget_text=budget_text)
    try:
        plan = plan_mod.load_plan(plan_source(v["plan"].strip()))  # plan files only inside the workspace
        own = {name: forms.settings_from(cls, v["method_settings"][name], f"method.{name}")
               for name, cls in methods.settings_classes().items()}
        settings = compress_mod.CompressSettings(method=v["method"], calib=v["calib"], max_len=s.max_len,
                                                 batch_size=v["batch_size"], valid_fraction=v["valid"],
                                                 seed=s.seed, layerwise=v["layerwise"],
                                                 method_settings=own).for_data(v["calib"], s.seed)
        heal = heal_mod.HealSettings(tokens=int(v["heal_tokens"]), lr=v["heal_lr"], loss=v["heal_loss"],
                                     batch_tokens=int(v["heal_batch_tokens"]), max_len=min(s.max_len, _H.max_len))
        spec = jobs.job_spec(s, plan, settings, heal)
        spec.validate()
        plan_mod.resolve_plan(plan, cache.linears(lm, parts=True), v["method"])  # a bad rule fails here, before any work
    except ValueError as e:
        st.error(f"Cannot compress: {e}")
    else:
        key = jobs.job_key(lm.fingerprint, split.info.fingerprint, spec)
        if key in state.results():
            st.session_state[state.CURRENT_KEY] = key
            st.success("Same model, data, plan and settings as a finished run: its result is shown, "
                       "nothing was recomputed.")
        else:
            st.session_state[state.JOB_KEY] = jobs.BackgroundJob(
                key, lambda p, spec=spec: jobs.run_app_job(spec, lm, split, p), spec=spec)
            st.rerun()  # draw the form disabled while the job runs

if running and pending.finished:
    st.session_state.pop(state.JOB_KEY, None)
    if pending.error is not None:
        st.session_state[STOPPED_KEY if pending.cancelled else ERROR_KEY] = pending.failure("Compression")
    else:
        jobs.store_result(pending.key, pending.result)
    st.rerun()  # enable the form again and show the result (or the error)
if running:
    job_progress(pending, lm.name)
    stop_page()

key, job = state.current_result()
if job is None:
    st.info("No compression yet in this session: choose a plan and press **Compress**.")
    stop_page()
result = job.compressed

st.subheader(jobs.run_label(key))
c1, c2, c3, c4 = st.columns(4)
c1.metric("parameters before", f"{result.params_before:,}")
c2.metric("parameters after", f"{result.params_after:,}", delta=f"{result.params_after - result.params_before:,}",
          delta_color="inverse")
c3.metric("of the original", f"{result.params_after / result.params_before:.2%}")
c4.metric("time", f"{result.timings.get('total', 0):.1f} s")

for message in result.warnings:  # the engine's: calibration too small to trust this run
    st.warning(f"Calibration: {message}.")

PERCENT = st.column_config.NumberColumn(format="percent")  # relative errors are fractions, shown as percent
layers = pd.DataFrame(result.layers)
if not layers.empty:
    st.plotly_chart(charts.error_bars(result.layers, result.error_key), key="compress_errors")
    with st.expander("Per-matrix table (relative errors in percent)"):
        st.dataframe(layers, hide_index=True, key="compress_layers",
                     column_config={col: PERCENT for col in ("rel_error", "rel_error_fit") if col in layers})
if result.hidden_mse:
    mse = pd.DataFrame(result.hidden_mse)
    col = "rel_mse" if "rel_mse" in mse else "mse"
    st.plotly_chart(charts.line_chart({col: mse[col].tolist()}, "teacher vs student hidden states per decoder "
                                      "layer", "layer", col, log=True, x=mse["layer"].tolist()), key="compress_mse")
if job.healed is not None:
    h = job.healed
    st.subheader("Healing")
    st.caption(f"{h.tokens:,} training tokens in {h.steps} steps ({h.seconds:.0f} s): validation {h.settings['loss']} "
               f"{h.initial_valid:.4f} → {h.best_valid:.4f} per token (best at step {h.best_step}; "
               f"{h.train_examples} training / {h.valid_examples} held-out calibration-side examples).")
    st.plotly_chart(charts.refit_figure(h.curve, f"{h.settings['loss']} per token", what="healing"), key="compress_heal")
if result.refit_curves:
    st.subheader("Refit curves")
    name = st.selectbox("Layer", list(result.refit_curves), key="compress_curve")
    curve = result.refit_curves[name]
    st.plotly_chart(charts.refit_figure(curve, name), key="compress_refit")
st.caption(" · ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()) + " — split: " +
           ", ".join(f"{k} {v}" for k, v in result.split.items()))
