"""lowrank lab: a Streamlit app over ``lowrank_core``. Run with ``streamlit run app.py``."""
from __future__ import annotations

import streamlit as st

from lowrank_core.threads import configure_threads, pin_thread

from ui.entry import PageDone
from ui.sidebar import draw_sidebar



@st.cache_resource
def _threads() -> int:
    """Once per server process (not per rerun, never while a job runs): the machine's cores, LOWRANK_THREADS wins."""
    return configure_threads()


_threads()
pin_thread()  # each rerun runs on a script thread of its own: give it the server's count
st.set_page_config(page_title="lowrank lab", page_icon=":material/compress:", layout="wide")

PAGES = [
    st.Page("pages/model_data.py", title="Model & data", icon=":material/memory:", default=True),
    st.Page("pages/budget.py", title="Budget", icon=":material/calculate:"),
    st.Page("pages/search.py", title="Search", icon=":material/query_stats:"),
    st.Page("pages/spectra.py", title="Spectra", icon=":material/show_chart:"),
    st.Page("pages/compress.py", title="Compress", icon=":material/compress:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/balance:"),
    st.Page("pages/export.py", title="Export", icon=":material/inventory_2:"),
]

page = st.navigation(PAGES)
summary = st.sidebar.container()
try:
    page.run()
except PageDone:  # a page that ended early (nothing to show yet)
    pass
draw_sidebar(summary)
