"""Time the Streamlit app in a real browser (Debian chromium via Playwright) on the embedded default.

Prints, in seconds: the first load (until the Model & data page shows the architecture map), the first
spectrum (cold: calibration Grams of that layer), the spectrum shown again once warm (navigating back to
the page), a switch to another module of the same layer, and a second browser session on the warm server.
Each time runs from the click (or page load) until the app is idle again with the result drawn.

    python bench/app_timing.py [--model default] [--data default]
    python bench/app_timing.py --newcomer [--eval 20]   # the newcomer path, one row per step

``--newcomer`` walks what a new user does: open, the first teacher-loss figure with its interval, the
activation-aware spectrum, the energy heatmap turned into a plan, compress, the paired comparison on
``--eval`` examples, export. Each step runs from its click until the app is idle with the result drawn.

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

from test_browser import StepTimer, chromium, open_page, streamlit_server, wait_idle  # noqa: E402


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


def newcomer(page, url: str, eval_n: int) -> StepTimer:
    """The newcomer path (see the module docstring); returns the per-step times."""
    step = StepTimer()
    with step("open: Model & data shows the architecture map"):
        page.goto(url)
        model_page_ready(page)
    with step("first teacher-loss figure with its interval"):
        page.get_by_role("button", name="Score the teacher", exact=False).first.click()
        page.get_by_text("±").first.wait_for()
    page.get_by_role("button", name="Stop and keep the estimate").click()
    wait_idle(page)
    with step("Spectra: weight spectrum on open"):
        open_page(page, "Spectra")
        spectrum_ready(page)
    with step("Spectra: activation-aware spectrum (click)"):
        page.get_by_role("button", name="Compute spectra").click()
        page.get_by_text("Calibrating on").wait_for()
        wait_idle(page)
    with step("Spectra: energy heatmap"):
        page.get_by_role("button", name="Compute the heatmap").click()
        page.get_by_role("button", name="Use these ranks as a plan").wait_for()
        wait_idle(page)
    with step("plan from the heatmap on the Budget page"):
        page.get_by_role("button", name="Use these ranks as a plan").click()
        page.get_by_role("heading", name="Budget", exact=True).wait_for()
        wait_idle(page)
    with step("Compress that plan (background job)"):
        open_page(page, "Compress")
        page.get_by_role("button", name="Compress").click()
        page.get_by_text("parameters after").wait_for()
        wait_idle(page)
    with step(f"Evaluate: paired comparison on {eval_n} examples"):
        open_page(page, "Evaluate")
        box = page.locator('input[aria-label="Evaluation examples"]')
        box.fill(str(eval_n))
        box.press("Enter")
        wait_idle(page)
        page.get_by_role("button", name=f"Compare on {eval_n} examples").click()
        page.get_by_text("Where the student loses most").wait_for()
        wait_idle(page)
    with step("Export: write and verify (factorized)"):
        open_page(page, "Export")
        page.get_by_text("factorized", exact=True).first.click()
        target = page.locator('input[aria-label="Target folder"]')
        target.fill("exports/newcomer")
        target.press("Enter")
        wait_idle(page)
        page.get_by_role("button", name="Export and verify").click()
        page.get_by_text("Verified:").wait_for()
        wait_idle(page)
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default")
    ap.add_argument("--newcomer", action="store_true", help="time the newcomer path instead")
    ap.add_argument("--eval", type=int, default=20, help="--newcomer: examples of the paired comparison")
    args = ap.parse_args()
    from lowrank_core.models import cache_dir

    tmp = Path(tempfile.mkdtemp(prefix="lowrank-app-timing-"))
    cache = tmp / "cache"
    cache.mkdir()
    if (cache_dir() / "models").is_dir():
        os.symlink(cache_dir() / "models", cache / "models")
    env = {"LOWRANK_APP_MODEL": args.model, "LOWRANK_APP_DATA": args.data, "LOWRANK_CACHE": str(cache),
           "LOWRANK_WORKSPACE": str(tmp / "workspace")}
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.newcomer:
        with streamlit_server(env, tmp / "streamlit.log") as url, chromium(timeout_ms=TIMEOUT_MS) as page:
            step = newcomer(page, url, args.eval)
        print("| step | seconds |\n|---|---|\n" + step.table())
        print(f"load average after {os.getloadavg()[0]:.2f}")
        return 0
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
