"""Serve the dashboard and drive Debian's chromium: shared by the browser test and the
page-time benchmark. Playwright only drives the chromium that apt installed
(executable_path); it never downloads a browser."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# no element still waiting for its code (Streamlit draws a skeleton while plotly.js loads)
NO_SKELETON = "!document.querySelector('[data-testid=\"stSkeleton\"]')"
# every plotly chart on the page has been drawn (plotly sets _fullLayout when it has), none pending
CHARTS_DRAWN = (f"[...document.querySelectorAll('.js-plotly-plot')].every(e => e._fullLayout) && {NO_SKELETON}")
# a chart drawn; on a page without charts (Runs), its table, once nothing waits for plotly.js
# (else Compare's config table at the bottom would count as its first chart)
ANY_CHART = ("[...document.querySelectorAll('.js-plotly-plot')].some(e => e._fullLayout)"
             f" || (!!document.querySelector('[data-testid=\"stDataFrame\"] canvas') && {NO_SKELETON})")
SCRIPT_DONE = ("document.querySelector('[data-test-script-state]')?.getAttribute('data-test-script-state')"
               " === 'notRunning'")
EXCEPTION = "!!document.querySelector('[data-testid=\"stException\"]')"


@contextlib.contextmanager
def serve(lab: str | Path, log_path: str | Path, timeout: float = 180.0):
    """`stabilitylab dashboard LAB --port N` on a free port of 127.0.0.1; yields its URL once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stabilitylab", "dashboard", str(lab), "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=5).read() == b"ok":
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not come up: {Path(log_path).read_text()[-2000:]}")
                time.sleep(0.2)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1800, timeout_ms: int = 180_000):
    """A headless Debian chromium page (a fresh profile each time)."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.set_default_timeout(timeout_ms)
            page = context.new_page()
            yield page
        finally:
            browser.close()


def open_and_time(page, url: str) -> dict[str, float]:
    """Load `url` and time, from the navigation: the first chart drawn (or, on a page
    without charts, the first table), and settled (the script has finished and every
    chart on the page is drawn). Seconds."""
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_function(f"({ANY_CHART}) || ({EXCEPTION})", polling=20)
    first = time.perf_counter() - start
    page.wait_for_function(f"(({SCRIPT_DONE}) && ({CHARTS_DRAWN})) || ({EXCEPTION})", polling=20)
    settled = time.perf_counter() - start
    return {"first": first, "settled": settled, "exception": page.evaluate(EXCEPTION)}


def navigate_and_time(page, title: str) -> float:
    """Click `title` in the sidebar's page list (a rerun in the same session, caches
    warm) and time until that page has settled: its heading is shown, the script is done
    and every chart is drawn. Seconds."""
    heading = f"[...document.querySelectorAll('h1')].some(e => e.textContent.startsWith({title!r}))"
    start = time.perf_counter()
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title, exact=True).click()
    page.wait_for_function(f"(({heading}) && ({SCRIPT_DONE}) && ({CHARTS_DRAWN})) || ({EXCEPTION})", polling=20)
    return time.perf_counter() - start
