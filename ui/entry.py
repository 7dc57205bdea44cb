"""Make every page run through ``app.py`` (page config, sidebar, navigation), and end pages early."""
from __future__ import annotations

from typing import NoReturn

import streamlit as st


class PageDone(Exception):
    """Raised by ``stop_page``; ``app.py`` catches it and still draws the sidebar."""


def stop_page() -> NoReturn:
    """End the current page here (like ``st.stop()``, which would also drop the sidebar drawn after it)."""
    raise PageDone


def ensure_app() -> None:
    """Call first thing in every page.

    Streamlit has a legacy mode for apps with a ``pages/`` folder in which a page file runs on its own.
    A server uses it until ``app.py`` calls ``st.navigation`` once, so a deep link (``/budget``) as the
    very first request of a server process would show the page without sidebar or navigation (AppTest
    re-enters that mode on every run). Leave the mode and rerun: ``app.py`` then shows the same page.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - a Streamlit without that mode
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()
