"""Streamlit-side helpers of the app (session state, caches, progress, charts).

Only ``app.py`` and ``pages/`` import this package; ``lowrank_core`` never imports Streamlit.
"""
