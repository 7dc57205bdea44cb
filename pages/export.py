"""Export: write the current student as a dense or factorized folder, verified by reloading it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from lowrank_core import export as export_mod
from lowrank_core import job as job_mod
from lowrank_core.workspace import export_folder
from ui import cache, jobs, state
from ui.entry import ensure_app, stop_page
from ui.paths import workspace_caption
from ui.progress import run_with_status

ensure_app()

st.title("Export")
s = state.settings()
lm = cache.require_model(s)
key, _ = state.current_result()
keys = jobs.keys_for(lm.fingerprint)
if not keys:
    st.info("Compress a model on the **Compress** page first; the export writes that student.")
    stop_page()

results = state.results()
key = key if key in keys else keys[-1]
chosen = jobs.choose_run("Student", keys, key, key="export_run")
result = results[chosen]
run = next((r for r in reversed(state.runs()) if r["job"] == chosen), {})
fmt = st.radio("Format", export_mod.FORMATS, horizontal=True, key="export_format",
               help="dense: factors merged back into ordinary weights (plain transformers loads it); "
                    "factorized: the factors themselves (smaller), loadable with trust_remote_code or lowrank_core")
compressed = result.compressed
width = next(result.loaded.model.parameters()).element_size()  # bytes per stored weight (the model's dtype)
sizes = {"dense": compressed.params_before, "factorized": compressed.params_after}


def size_text(params: int) -> str:
    return f"{params:,} parameters, about {params * width / 2**20:,.2f} MiB of weights"


st.info(f"**dense**: as large as the teacher — {size_text(sizes['dense'])} (the factors multiplied back into "
        f"full matrices). **factorized**: {size_text(sizes['factorized'])} "
        f"({sizes['factorized'] / max(1, sizes['dense']):.1%} of the teacher)"
        + ("." if sizes["factorized"] < sizes["dense"] else ": no smaller than the teacher, this plan's ranks are "
           "above break-even."))
name = Path(lm.name).name if Path(lm.name).is_absolute() else lm.name.replace("/", "_")
default_dir = str(Path("exports") / f"{name}-run{run.get('run', 0)}-{fmt}")
target = st.text_input("Target folder", value=default_dir, key=f"export_dir_{fmt}_{chosen}")
workspace_caption()
replace = st.checkbox("Replace the existing folder", value=False, key="export_replace",
                      help="without it an existing folder is never touched; a folder that is not a lowrank "
                           "export is never replaced")
n_check = st.number_input("Also compare answer loss after reload on N eval examples (0 = skip)", 0, 10_000,
                          0, key="export_eval")

if st.button("Export and verify", type="primary", key="export_go"):
    st.session_state.pop("lowrank_last_export", None)  # a failed export must not leave an earlier success
    try:
        folder = export_folder(target, replace)
        export_mod.check_target(folder, replace)  # refused here, not rescued: a non-export folder, another writer
        spec = job_mod.ExportSpec(dir=str(folder), format=fmt, force=replace, verify=True,
                                  verify_examples=int(n_check))
        out = run_with_status(f"Writing a {fmt} export to {folder}",
                              lambda p: job_mod.export_job(result, spec, progress=p))
    except (ValueError, OSError) as e:
        st.error(f"Export failed: {e}")
    else:
        st.session_state["lowrank_last_export"] = out

out = st.session_state.get("lowrank_last_export")
if out is not None:
    if out.verified:
        st.success(f"Verified: {out.path} reloads to the student (max |Δlogit| {out.max_logit_diff:.2e} ≤ "
                   f"tolerance {out.tolerance:.2e}).")
    else:
        st.warning(f"Written to {out.path} without verification.")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("format", out.format)
    c2.metric("parameters stored", f"{out.parameters:,}")
    c3.metric("size on disk", f"{out.bytes_on_disk / 2**20:,.2f} MiB")
    c4.metric("seconds", f"{out.seconds.get('total', 0):.1f}")
    if out.reload_loss is not None:
        st.write(f"Answer loss after reload **{out.reload_loss:.4f}** vs in-memory student **{out.student_loss:.4f}**.")
    if out.format == "dense":
        st.caption(f"A dense export stores every matrix in full: the teacher's size. The factorized format would "
                   f"store {size_text(sizes['factorized'])}.")
    st.markdown(f"**Ranks of the {len(out.ranks)} replaced matrices**")
    st.dataframe(pd.DataFrame({"matrix": list(out.ranks), "rank": list(out.ranks.values())}), hide_index=True,
                 key="export_ranks")
