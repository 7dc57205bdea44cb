"""Budget: a plan as an editable table of rules, with live exact parameter accounting, rank rounding and the
measured speed break-even ranks of the model's shapes (timed only on a click, kept for the session)."""
from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from lowrank_core.linears import num_layers
from lowrank_core import methods
from lowrank_core.models import resolve_device, resolve_dtype
from lowrank_core.plan import (RANK_MULTIPLES, PlanError, account, load_plan, plan_from_rows, resolve_plan,
                               rows_from_plan)
from lowrank_core.rescue import WriteFailed, save_file
from lowrank_core.speed import DECODE_TOKENS, PREFILL_TOKENS, measure_shapes, shape_groups, speed_rows
from lowrank_core.workspace import PLAN_SUFFIXES, app_source, plan_source, writable_file
from ui import cache, state
from ui.entry import ensure_app, stop_page
from ui.paths import workspace_caption
from ui.progress import run_with_status
from ui.presets import preset_plans
from ui.sidebar import PLAN_ERROR_KEY

ensure_app()

MISTRAL_FIXTURE = "tests/fixtures/mistral-7b-openorca-config.json"
COLUMNS = ["layers", "modules", "rank", "keep", "dense", "method"]
SOURCE = "Budget page"  # the plan source this page stores under
DEFAULT_ROWS = [{"layers": "all", "modules": "mlp", "rank": None, "keep": 0.9, "dense": False, "method": ""}]
MULTIPLE_KEY = "budget_rank_multiple"
SPEED_KEY = "budget_speed"  # {(source, device, dtype): {(out, in, tokens): SpeedBreakeven}}: this session's timings


def accounting(source_key: str, meta, plan):
    return cache.memo("account", (source_key, plan.to_yaml()), lambda: account(meta, plan), max_entries=64)


def check_rows(rows: list[dict], linears) -> tuple[list[dict], dict[int, str]]:
    """(the rows whose rule parses and resolves on the model's linears, {row number: the engine's error}):
    each rule is checked alone, so one bad row leaves the others counted."""
    good, problems = [], {}
    for number, row in enumerate(rows, 1):
        if not str(row.get("modules") or "").strip():
            continue
        try:
            resolve_plan(plan_from_rows([row]), linears)
        except PlanError as e:
            problems[number] = str(e).replace("plan rule 1", f"row {number}", 1)
        else:
            good.append(row)
    return good, problems


st.title("Budget")
s = state.settings()
targets = {f"Current model ({s.model_source})": s.model_source,
           "Mistral-7B-OpenOrca — config only (seed fixture)": MISTRAL_FIXTURE,
           "Another config.json or model folder": ""}
choice = st.radio("Count parameters for", list(targets), horizontal=True, key="budget_target")
source = targets[choice]
if not source:
    typed = st.text_input("Path of a config.json or model folder", key="budget_config_path").strip()
    workspace_caption()
    if not typed:
        stop_page()
try:
    source = source or app_source(typed, "config path")
    meta, linears = cache.config_linears(source)
except ValueError as e:
    st.error(str(e))
    stop_page()
n_layers = num_layers(linears)
st.caption(f"{type(meta).__name__}: {n_layers} layers, {len(linears)} compressible linears — "
           "counted from the config alone (no weights).")

st.subheader("Rules")
st.caption("Later rules override earlier ones. modules: attn, mlp, all, or names like q_proj,o_proj,lm_head; "
           "layers: all, 17, 6-31 (inclusive), 0-3,8; give a rank, a keep fraction (of the matrix's "
           "parameters) or tick dense to leave matrices alone.")
presets = preset_plans(n_layers)
stored = state.stored_plan()
if stored and stored["source"] != SOURCE and st.session_state.get("budget_rows"):
    # a plan opened on another page (Search) since this page last stored its rows: show that plan, not them
    st.session_state["budget_rows"] = rows_from_plan(stored["plan"])
    st.session_state[MULTIPLE_KEY] = stored["plan"].rank_multiple
    st.session_state["budget_editor_version"] = st.session_state.get("budget_editor_version", 0) + 1
version = st.session_state.setdefault("budget_editor_version", 0)
initial = st.session_state.get("budget_rows") or (rows_from_plan(stored["plan"]) if stored else DEFAULT_ROWS)
with st.expander("Start from a preset or import a plan"):
    c1, c2 = st.columns([2, 3])
    preset = c1.selectbox("Preset", list(presets), key="budget_preset")
    if c1.button("Load preset", key="budget_load_preset"):
        st.session_state["budget_rows"] = rows_from_plan(load_plan(presets[preset]))
        st.session_state["budget_editor_version"] = version + 1
        st.rerun()
    text = c2.text_area("Compact string or YAML", placeholder="6-31:attn:r16; 0-6:mlp:r16", key="budget_import")
    if c2.button("Import", key="budget_import_btn") and text.strip():
        try:
            import yaml

            parsed = yaml.safe_load(text) if "rules" in text else None
            imported = load_plan(parsed if parsed is not None else plan_source(text))
            st.session_state["budget_rows"] = rows_from_plan(imported)
            st.session_state[MULTIPLE_KEY] = imported.rank_multiple
            st.session_state["budget_editor_version"] = version + 1
            st.rerun()
        except (ValueError, yaml.YAMLError) as e:
            st.error(str(e))

edited = st.data_editor(
    pd.DataFrame(initial, columns=COLUMNS), num_rows="dynamic", hide_index=True, key=f"budget_editor_{version}",
    column_config={
        "layers": st.column_config.TextColumn("layers", default="all"),
        "modules": st.column_config.TextColumn("modules", required=True),
        "rank": st.column_config.NumberColumn("rank", min_value=0, step=1, format="%d"),  # 0: the row's error
        "keep": st.column_config.NumberColumn("keep", min_value=0.0, max_value=1.0, step=0.01),
        "dense": st.column_config.CheckboxColumn("dense", default=False),
        "method": st.column_config.SelectboxColumn("method", options=[""] + list(methods.names()), default=""),
    })

if MULTIPLE_KEY not in st.session_state:  # widget keys go when the page is left: the stored plan's rounding
    st.session_state[MULTIPLE_KEY] = stored["plan"].rank_multiple if stored else 1
multiple = st.selectbox("Round ranks to a multiple of", RANK_MULTIPLES, key=MULTIPLE_KEY,
                        format_func=lambda m: "1 (off)" if m == 1 else str(m),
                        help="every rank (from a keep fraction or given) is rounded down to a multiple, at least the "
                             "multiple, never above min(out, in); matmul kernels often run aligned ranks faster")

records = edited.to_dict("records")
valid, problems = check_rows(records, cache.config_linears(source, parts=True)[1])  # parts of fused linears too
for message in problems.values():
    st.error(f"Plan error in {message}")
try:
    plan = plan_from_rows(valid, rank_multiple=multiple)
    acc = accounting(source, meta, plan)
except PlanError as e:  # e.g. no valid row left
    st.error(f"Plan error: {e}")
    st.session_state[PLAN_ERROR_KEY] = str(e)
    stop_page()
if problems:  # keep the rows as typed (the bad ones too) and the last valid stored plan; say so
    st.session_state["budget_rows"] = records
    st.session_state[PLAN_ERROR_KEY] = "; ".join(problems.values())
    st.caption(f"The counts below are of the {len(plan.rules)} valid row(s); fix the row(s) in red to use or save "
               "the plan.")
else:
    st.session_state["budget_rows"] = rows_from_plan(plan)
    st.session_state.pop(PLAN_ERROR_KEY, None)
    state.store_plan(plan, SOURCE)

c1, c2, c3, c4 = st.columns(4)
c1.metric("original parameters", f"{acc.original:,}")
c2.metric("after the plan", f"{acc.compressed:,}", delta=f"{-acc.removed:,}", delta_color="inverse")
c3.metric("of the original", f"{acc.ratio:.2%}")
c4.metric("matrices replaced", f"{len(acc.rows)}")
if acc.warnings:
    above = [w for w in acc.warnings if "break-even" in w]
    st.warning(f"{len(above)} matrices have a rank above break-even (factorising them adds parameters)"
               if above else acc.warnings[0])
    with st.expander(f"All {len(acc.warnings)} warnings"):
        st.text("\n".join(acc.warnings))
with st.expander("Per-matrix accounting" + (f" (ranks rounded to multiples of {multiple}; planned_rank: before "
                                             "rounding)" if multiple != 1 else "")):
    st.dataframe(pd.DataFrame(acc.rows), hide_index=True, key="budget_rows_table")

st.subheader("Speed break-even")
st.caption(f"Parameter break-even: the largest rank whose factors r·(in+out) are no bigger than the dense out·in "
           "weight; below it a matrix gets smaller. Speed break-even: the largest rank whose factor pair (two "
           "matmuls) runs no slower than the dense matmul, measured on this machine at "
           f"{PREFILL_TOKENS} tokens per call (a prompt's forward pass) and {DECODE_TOKENS} token (one decode step); "
           "below it a matrix also gets faster. Timings are of this machine now: other load moves them.")
try:
    speed_device, speed_dtype = resolve_device(s.device), resolve_dtype(s.dtype)
except ValueError as e:
    st.error(str(e))
    stop_page()
groups = shape_groups(linears)
speed_key = (source, str(speed_device), s.dtype)
timed = st.session_state.setdefault(SPEED_KEY, {})
if st.button("Measure speed on this machine", key="budget_speed_go",
             help=f"times every distinct shape ({len(groups)}) in {s.dtype} on {speed_device}; a few seconds per "
                  "shape for the embedded model on CPU, longer for big shapes"):
    timed[speed_key] = run_with_status(
        f"Timing {len(groups)} shapes on {speed_device} ({s.dtype})",
        lambda progress: measure_shapes(groups, (PREFILL_TOKENS, DECODE_TOKENS), speed_device, speed_dtype,
                                        progress=progress))
measured = timed.get(speed_key)
if measured is None:
    st.info(f"Click **Measure speed on this machine** to time the {len(groups)} distinct shapes "
            f"({', '.join(g.shape for g in groups)}) on {speed_device} in {s.dtype}.")
else:
    st.dataframe(pd.DataFrame(speed_rows(groups, measured, {"plan rank": {r["name"]: r["rank"] for r in acc.rows}})),
                 hide_index=True, key="budget_speed_table")
    st.caption(f"Measured on {speed_device} ({s.dtype}, {torch.get_num_threads()} CPU threads). 0: even rank 1 is "
               "slower than the dense matrix. plan rank: this plan's ranks of that shape (dense: not replaced).")

st.subheader("Against presets")
table = [{"scenario": "Original model", "plan": "—", "parameters": acc.original, "of original": 1.0}]
for name, text in presets.items():
    pre = accounting(source, meta, load_plan(text))
    table.append({"scenario": name, "plan": text, "parameters": pre.compressed, "of original": pre.ratio})
table.append({"scenario": "This plan" + (" (valid rows)" if problems else ""), "plan": plan.describe(),
              "parameters": acc.compressed, "of original": acc.ratio})
st.dataframe(pd.DataFrame(table), hide_index=True, key="budget_presets", column_config={
    "parameters": st.column_config.NumberColumn(format="localized"),
    "of original": st.column_config.NumberColumn(format="percent")})

st.subheader("Save")
yaml_text = plan.to_yaml()
blocked = f"fix the plan error first ({'; '.join(problems.values())})" if problems else None
if blocked:
    st.warning(f"Saving is disabled: {blocked}.")
c1, c2 = st.columns(2)
c1.download_button("Download plan.yaml", yaml_text, file_name="plan.yaml", mime="text/yaml", key="budget_download",
                   disabled=bool(blocked), help=blocked)
path = c2.text_input("or save to a file", value="plans/plan.yaml", key="budget_save_path")
overwrite = c2.checkbox("Overwrite", value=False, key="budget_overwrite",
                        help="replace a file of that name; without it an existing file is never touched")
workspace_caption(c2)
if c2.button("Save", key="budget_save", disabled=bool(blocked), help=blocked):
    try:
        target = writable_file(path, "plan file", overwrite=overwrite, suffixes=PLAN_SUFFIXES)
        save_file(target, plan.save, "the plan", "budget", needed=len(yaml_text.encode()))
        c2.success(f"Saved {target}")
    except WriteFailed as e:  # kept in a rescue folder, which the message names
        c2.error(str(e))
    except ValueError as e:
        c2.error(f"Not saved: {e}")
    except OSError as e:
        c2.error(f"Could not save {path!r}: {e}")
with st.expander("Plan as YAML"):
    st.code(yaml_text, language="yaml")
