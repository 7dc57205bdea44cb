"""lowrank: compress causal LMs by replacing linear layers with low-rank factors.

The engine: plain functions and small dataclasses, no Streamlit. Faces: ``python -m lowrank_core``
(the CLI) and the Streamlit app (``app.py``, ``pages/``).
"""
__version__ = "0.1.0"
