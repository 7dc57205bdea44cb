"""Time the Streamlit app in a real browser (Debian chromium via Playwright) on the embedded default.

Prints, in seconds: the first load (until the Model & data page shows the architecture map), the first
spectrum (cold: calibration Grams of that layer), the spectrum shown again once warm (navigating back to
the page), a switch to another module of the same layer, and a second browser session on the warm server.
Each time runs from the click (or page load) until the app is idle again with the result drawn.

    python bench/app_timing.py [--model default] [--data default]

The spectra disk cache lives in a fresh temporary LOWRANK_CACHE (the converted model folder is linked in
from the usual cache), so "cold" really is cold.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_browser import chromium, open_page, streamlit_server, wait_idle  # noqa: E402


TIMEOUT_MS = 1_800_000  # a contended CPU can take minutes for a cold calibration


def timed(label: str, results: dict, fn) -> None:
    t0 = time.perf_counter()
    fn()
    results[label] = time.perf_counter() - t0
    print(f"{label:<58} {results[label]:7.2f} s", flush=True)


def model_page_ready(page) -> None:
    page.get_by_text("Architecture map —").wait_for()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    wait_idle(page)


def spectrum_ready(page) -> None:
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for()
    wait_idle(page)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default")
    args = ap.parse_args()
    from lowrank_core.models import cache_dir

    tmp = Path(tempfile.mkdtemp(prefix="lowrank-app-timing-"))
    cache = tmp / "cache"
    cache.mkdir()
    if (cache_dir() / "models").is_dir():
        os.symlink(cache_dir() / "models", cache / "models")
    env = {"LOWRANK_APP_MODEL": args.model, "LOWRANK_APP_DATA": args.data, "LOWRANK_CACHE": str(cache)}
    results: dict = {}
    print(f"model {args.model!r}, data {args.data!r}, torch threads default, cache {cache}")
    t_start = time.perf_counter()
    with streamlit_server(env, tmp / "streamlit.log") as url:
        print(f"{'server up (streamlit run until /_stcore/health)':<58} {time.perf_counter() - t_start:7.2f} s")
        with chromium(timeout_ms=TIMEOUT_MS) as page:
            timed("first load: Model & data shows the architecture map", results,
                  lambda: (page.goto(url), model_page_ready(page)))
            timed("first spectrum (cold: Grams of that layer + SVDs)", results,
                  lambda: (open_page(page, "Spectra"), spectrum_ready(page)))
            open_page(page, "Budget")
            wait_idle(page)
            timed("spectrum again once warm (navigate back to Spectra)", results,
                  lambda: (open_page(page, "Spectra"), spectrum_ready(page)))

            def other_module():
                page.locator('[data-testid="stSelectbox"]').filter(has_text="Module").click()
                page.get_by_role("option", name="q_proj").click()
                page.get_by_text("q_proj (").wait_for()
                wait_idle(page)

            timed("another module of that layer (Grams of the layer in memory)", results, other_module)
        with chromium(timeout_ms=TIMEOUT_MS) as page:
            timed("second browser session: Model & data (server warm)", results,
                  lambda: (page.goto(url), model_page_ready(page)))
            timed("second session: Spectra (disk-cached; browser loads plotly)", results,
                  lambda: (open_page(page, "Spectra"), spectrum_ready(page)))
            open_page(page, "Budget")
            wait_idle(page)
            timed("second session: Spectra again", results,
                  lambda: (open_page(page, "Spectra"), spectrum_ready(page)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
