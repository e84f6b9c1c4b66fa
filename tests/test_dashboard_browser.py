"""The dashboard in a real browser: `stabilitylab dashboard LAB --port N` serves it on
127.0.0.1, Debian's chromium (driven by Playwright) selects a run, opens Compare and waits
for the plotly charts. A screenshot lands in test-artifacts/. Skipped without chromium;
Playwright never downloads a browser here."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from dashboard_lab import REPO, build_lab

CHROMIUM = shutil.which("chromium")
ARTIFACTS = REPO / "test-artifacts"
RUN = "lr-sweep/concat-lr4e-4-s0"
WAIT_MS = 180_000  # the machine is shared and often loaded

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    lab = build_lab(tmp_path / "lab", steps=120)
    port = free_port()
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "stabilitylab", "dashboard", str(lab), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=5).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not come up: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_select_a_run_and_compare_it_in_chromium(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.set_default_timeout(WAIT_MS)
            page.goto(server)
            page.get_by_test_id("stDataFrame").first.wait_for()
            box = page.get_by_role("combobox", name="Selected runs")
            box.click()
            box.fill(RUN)
            page.keyboard.press("Enter")
            page.keyboard.press("Escape")
            page.get_by_test_id("stMultiSelectTagsContainer").first.get_by_text(RUN).wait_for()
            page.get_by_role("link", name="Compare").click()
            page.get_by_text("selected runs", exact=True).click()
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 5"
                                   " || document.querySelector('[data-testid=\"stException\"]')")
            page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')")
            page.wait_for_function(f"[...document.querySelectorAll('.legendtext')].some(e => e.textContent === '{RUN}')"
                                   " || document.querySelector('[data-testid=\"stException\"]')")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / "dashboard-compare.png")
            errors = page.locator('[data-testid="stException"]')
            assert errors.count() == 0, errors.first.inner_text()
            legend = set(page.locator(".js-plotly-plot .legendtext").all_text_contents())
            assert RUN in legend and "lr-sweep/parcae-lr4e-4-s0" not in legend  # only the selected run
            assert page.locator(".js-plotly-plot").count() == 5
        finally:
            browser.close()

