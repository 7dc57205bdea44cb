"""End to end in a real browser: Debian chromium driven by Playwright over ``streamlit run app.py``.

Clicks through model -> budget -> spectra -> compress a small plan -> evaluate -> export on the tiny
random model and the chatterbot corpus, asserts on what is shown, and saves a screenshot of each page
under ``artifacts/screenshots/``. Skipped when ``/usr/bin/chromium`` is missing, unless ``CI`` is set.
The helpers (``streamlit_server``, ``chromium``, ``open_page``) are reused by ``bench/app_timing.py``.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(env: dict, log_path: Path, startup_s: float = 90.0):
    """``streamlit run app.py`` on a free local port; yields its URL; always stops the server."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer within {startup_s} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 1800, timeout_ms: int = TIMEOUT_MS):
    """A Playwright page in Debian chromium (never ``playwright install``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def wait_idle(page) -> None:
    """Wait until no script runs: the app root reports ``notRunning`` twice, 0.4 s apart (a rerun that a
    script requests itself starts in between)."""
    idle = ("() => document.querySelector('[data-testid=\"stApp\"]')"
            "?.getAttribute('data-test-script-state') === 'notRunning'")
    for _ in range(2):
        page.wait_for_function(idle)
        page.wait_for_timeout(400)
    page.wait_for_function(idle)


def open_page(page, title: str) -> None:
    """Click a page in the sidebar navigation and wait for its title."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.get_by_role("heading", name=title, exact=True).wait_for()


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


class StepTimer:
    """Wall time of each step of a walk through the app (printed as a table at the end)."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.rows.append((name, time.perf_counter() - t0))
        print(f"step {name:<48} {self.rows[-1][1]:7.2f} s", flush=True)

    def table(self) -> str:
        return "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in self.rows)


def main_text(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def require_chromium() -> None:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing on CI; install Debian's chromium package (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser test")


@pytest.mark.browser
def test_click_through_every_page(tmp_path):
    require_chromium()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    env = {"LOWRANK_APP_MODEL": "tiny", "LOWRANK_APP_DATA": "chatterbot", "LOWRANK_CACHE": str(tmp_path / "cache"),
           "LOWRANK_WORKSPACE": str(tmp_path / "workspace"), "OMP_NUM_THREADS": "2"}
    export_dir = tmp_path / "workspace" / "export"  # typed relative to the workspace
    with streamlit_server(env, tmp_path / "streamlit.log") as url, chromium() as page:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        step = StepTimer()
        with step("open: Model & data shows the architecture map"):
            page.goto(url)
            page.get_by_role("heading", name="Model & data", exact=True).wait_for()
            page.get_by_text("Architecture map — tiny").wait_for()
            wait_idle(page)
        sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
        assert "90,624 parameters" in sidebar and "CPU" in sidebar and "float32" in sidebar
        with step("first teacher-loss figure, then the finished score"):
            page.get_by_role("button", name="Score the teacher on 32 eval examples").click()
            page.get_by_text("teacher answer loss").wait_for()
            page.get_by_text(re.compile(r"^Scored in [\d.]+ s")).wait_for()
        wait_idle(page)
        assert "linears" in main_text(page)
        shot(page, "1-model")

        open_page(page, "Budget")
        page.get_by_text("Mistral-7B-OpenOrca — config only (seed fixture)").click()
        page.get_by_text("7,241,748,480").first.wait_for()
        wait_idle(page)
        shot(page, "2-budget")

        with step("Spectra: weight spectrum on open"):
            open_page(page, "Spectra")
            page.locator('[data-testid="stPlotlyChart"]').first.wait_for()
            wait_idle(page)
        assert "Calibrating on" not in main_text(page)  # the weight spectrum only, until the click
        with step("Spectra: activation-aware spectrum (click)"):
            page.get_by_role("button", name="Compute spectra").click()
            page.get_by_text("Calibrating on 16 examples").wait_for()
            wait_idle(page)
        assert page.locator(".js-plotly-plot").count() == 1
        with step("Spectra: energy heatmap"):
            page.get_by_role("button", name="Compute the heatmap").click()
            page.get_by_text("matrices reach 90.0% of their weight energy").wait_for()
            wait_idle(page)
        assert page.locator(".js-plotly-plot").count() == 2
        shot(page, "3-spectra")
        plan_before = page.locator('[data-testid="stSidebar"]').inner_text().split("Plan", 1)[1]
        with step("plan from the heatmap on the Budget page"):
            page.get_by_role("button", name="Use these ranks as a plan").click()
            page.get_by_role("heading", name="Budget", exact=True).wait_for()
            wait_idle(page)
        assert page.locator('[data-testid="stSidebar"]').inner_text().split("Plan", 1)[1] != plan_before
        shot(page, "3a-plan-from-heatmap")

        open_page(page, "Search")
        page.get_by_role("button", name="Search", exact=True).click()
        page.get_by_text("Open a point as a plan").wait_for()
        wait_idle(page)
        text = main_text(page)
        assert "validation Δloss" in text and "evaluation Δloss" in text
        assert page.locator(".js-plotly-plot").count() == 1  # the Pareto curve
        shot(page, "3b-search")
        page.get_by_role("button", name="Open as plan on Compress page").click()
        page.get_by_role("heading", name="Compress", exact=True).wait_for()
        wait_idle(page)
        assert "rules:" in page.locator('textarea[aria-label="Plan"]').input_value()

        open_page(page, "Compress")
        page.locator('textarea[aria-label="Plan"]').fill("mlp:r8")
        with step("Compress mlp:r8 (background job)"):
            page.get_by_role("button", name="Compress").click()
            with contextlib.suppress(PlaywrightTimeout):  # a fast job may finish before its progress shows
                page.get_by_text("Runs in the background").wait_for(timeout=5_000)
                shot(page, "4a-compress-running")
            page.get_by_text("parameters after").wait_for()
            wait_idle(page)
        text = main_text(page)
        assert "50,688" in text and "55.93%" in text
        assert page.locator('[data-testid="stPlotlyChart"]').count() >= 1
        shot(page, "4-compress")

        open_page(page, "Evaluate")
        with step("Evaluate: paired comparison, stopping when decided, at most 32 examples"):
            page.get_by_role("button", name="Compare on up to 32 examples").click()
            page.get_by_text("Where the student loses most").wait_for()
            wait_idle(page)
        page.get_by_role("heading", name="Evaluate", exact=True).scroll_into_view_if_needed()
        shot(page, "5-evaluate")
        page.get_by_role("button", name="Generate answers for 3 prompts").click()
        page.get_by_text("student · ").first.wait_for()
        wait_idle(page)
        text = main_text(page)
        assert "Runs of this session" in text and "95% interval" in text and "KL(teacher" in text
        assert any(v in text for v in ("Equivalent:", "Not equivalent:", "Inconclusive at"))
        assert page.locator(".js-plotly-plot").count() == 3  # histogram, scatter, interval path
        assert page.get_by_role("button", name="Download runs as CSV").count() == 1
        assert page.get_by_role("button", name="Download the report (JSON)").count() == 1
        shot(page, "5b-evaluate-answers")

        open_page(page, "Export")
        target = page.locator('input[aria-label="Target folder"]')
        target.fill("export")
        target.press("Enter")
        wait_idle(page)
        with step("Export: write and verify"):
            page.get_by_role("button", name="Export and verify").click()
            page.get_by_text("Verified:").wait_for()
            wait_idle(page)
        shot(page, "6-export")
        assert (export_dir / "lowrank.json").is_file() and (export_dir / "config.json").is_file()
        card = (export_dir / "README.md").read_text()
        assert "## Evaluation" in card and "Paired comparison on 32 held-out examples" in card
        print("| step | seconds |\n|---|---|\n" + step.table())
        assert not errors, errors


@pytest.mark.browser
def test_deep_link_as_the_first_request_shows_the_whole_app(tmp_path):
    """A fresh server whose first request is /budget still runs app.py: navigation titles and sidebar."""
    require_chromium()
    env = {"LOWRANK_APP_MODEL": "tiny", "LOWRANK_APP_DATA": "chatterbot", "LOWRANK_CACHE": str(tmp_path / "cache")}
    with streamlit_server(env, tmp_path / "streamlit.log") as url, chromium() as page:
        page.goto(url + "/budget")
        page.get_by_role("heading", name="Budget", exact=True).wait_for()
        page.get_by_text("original parameters").wait_for()
        wait_idle(page)
        nav = " ".join(page.locator('[data-testid="stSidebarNav"] a').all_inner_texts())
        assert "Model & data" in nav and "Spectra" in nav
        assert "Loaded model" in page.locator('[data-testid="stSidebar"]').inner_text()
