"""The dashboard in a real browser: `stabilitylab dashboard LAB --port N` serves it on
127.0.0.1 and Debian's chromium, driven by Playwright, uses it (tests/dashboard_serve.py).
Every page opens on the reference lab and on a lab with a live writer, with its charts and
no exception, and leaves a screenshot in test-artifacts/<lab>-<page>.png (CI keeps them);
a run can be selected and compared; a run that is being written grows on screen without a
reload. Skipped without chromium; Playwright never downloads a browser here."""

import threading
import time

import pytest
from dashboard_lab import REPO, build_lab
from dashboard_serve import (ANY_CHART, CHARTS_DRAWN, CHROMIUM, EXCEPTION, SCRIPT_DONE, chromium,
                             navigate_and_time, serve)

from stabilitylab.store import RunWriter

ARTIFACTS = REPO / "test-artifacts"
RUN = "lr-sweep/concat-lr4e-4-s0"
# page path -> (sidebar title, the fewest plotly charts it draws on these labs; Runs: a table)
PAGES = {"": ("Overview", 1), "runs": ("Runs", 0), "compare": ("Compare", 5), "loop": ("Loop dynamics", 3),
         "spectra": ("Spectra", 4), "scaling": ("Scaling laws", 2), "architecture": ("Architecture", 2)}

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def settle(page) -> None:
    page.wait_for_function(f"({ANY_CHART}) || ({EXCEPTION})", polling=50)
    page.wait_for_function(f"(({SCRIPT_DONE}) && ({CHARTS_DRAWN})) || ({EXCEPTION})", polling=50)


def writing(lab, run_id: str, stop: threading.Event, started: threading.Event) -> None:
    """A writer in this process's thread: alive to the dashboard, committing every ~0.2 s."""
    with RunWriter.create(lab, run_id, {"model": {"injection": "parcae"}}, experiment="live",
                          flush_seconds=0.2) as writer:
        step = 0
        while not stop.is_set():
            step += 1
            writer.log(step, {"loss": 1 / step, "grad_norm": 1.0, "h_T_norm": 1.0})
            started.set()
            time.sleep(0.02)


def visit_every_page(lab, name: str, log) -> None:
    with serve(lab, log) as url, chromium() as page:
        page.goto(url)
        settle(page)
        for path, (title, charts) in PAGES.items():
            if path:
                navigate_and_time(page, title)
            settle(page)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / f"{name}-{path or 'overview'}.png", full_page=True)
            errors = page.locator('[data-testid="stException"]')
            assert errors.count() == 0, (title, errors.first.inner_text())
            drawn = page.locator(".js-plotly-plot").count()
            assert drawn >= charts, (title, drawn)
            if not charts:
                assert page.get_by_test_id("stDataFrame").count() >= 1, title


@pytest.mark.slow
def test_every_page_on_the_reference_lab(tmp_path):
    visit_every_page(REPO / "data" / "reference-lab", "reference", tmp_path / "streamlit.log")


@pytest.mark.slow
def test_every_page_on_a_lab_with_a_live_writer(tmp_path):
    lab = build_lab(tmp_path / "lab", steps=120)
    stop, started = threading.Event(), threading.Event()
    thread = threading.Thread(target=writing, args=(lab, "live/writing", stop, started))
    thread.start()
    try:
        assert started.wait(60)
        visit_every_page(lab, "live", tmp_path / "streamlit.log")
    finally:
        stop.set()
        thread.join(timeout=60)


def test_select_a_run_and_compare_it_in_chromium(tmp_path):
    lab = build_lab(tmp_path / "lab", steps=120)
    with serve(lab, tmp_path / "streamlit.log") as url, chromium() as page:
        page.goto(f"{url}/runs")
        page.get_by_test_id("stDataFrame").first.wait_for()
        box = page.get_by_role("combobox", name="Selected runs")
        box.click()
        box.fill(RUN)
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        page.get_by_test_id("stMultiSelectTagsContainer").first.get_by_text(RUN).wait_for()
        page.get_by_role("link", name="Compare").click()
        page.get_by_text("selected runs", exact=True).click()
        label = f"{RUN} (N=1)"
        page.wait_for_function(f"[...document.querySelectorAll('.legendtext')].some(e => e.textContent === '{label}')"
                               f" || ({EXCEPTION})")
        settle(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "dashboard-compare.png")
        errors = page.locator('[data-testid="stException"]')
        assert errors.count() == 0, errors.first.inner_text()
        legend = set(page.locator(".js-plotly-plot .legendtext").all_text_contents())
        assert label in legend and not any(t.startswith("lr-sweep/parcae") for t in legend)  # the selected run only
        assert page.locator(".js-plotly-plot").count() == 5


def test_a_run_being_written_grows_on_screen_without_a_reload(tmp_path):
    """Opened by its URL, Compare stays Compare through the live reruns (they once landed on
    the Overview: the watch fragment's first rerun left before the browser knew the page)."""
    stop, started = threading.Event(), threading.Event()
    thread = threading.Thread(target=writing, args=(tmp_path / "lab", "live", stop, started))
    thread.start()
    heading = "[...document.querySelectorAll('h1')].map(e => e.textContent).join('|')"
    try:
        assert started.wait(60)
        time.sleep(1)
        with serve(tmp_path / "lab", tmp_path / "streamlit.log") as url, chromium() as page:
            page.goto(f"{url}/compare")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 1")
            # null-safe: a live redraw briefly replaces the chart element
            last_step = "document.querySelector('.js-plotly-plot')?._fullLayout?.xaxis?.range?.[1] ?? -1"
            page.wait_for_function(f"({last_step}) >= 0")
            first = page.evaluate(last_step)
            page.wait_for_function(f"({last_step}) > {first} + 50")  # live refresh redrew it, no reload
            for _ in range(6):  # several live reruns later, still on the page the URL asked for
                time.sleep(0.5)
                assert page.evaluate(heading).startswith("Compare") and page.url.endswith("/compare")
            assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        stop.set()
        thread.join(timeout=60)
