"""Dashboard cost: the Compare page rendered cold (AppTest, caches cleared) against the store
queries it makes, alone, on a lab of 50 runs × 5000 steps with full probes (loop traces and
128-eigenvalue spectra every 10 steps). Timed in alternating rounds.

    .venv/bin/python -m pytest benchmarks/test_bench_dashboard.py --benchmark-only -s

The page must stay under twice the query: the drawing (smoothing, downsampling, figures)
may not cost more than reading the data.
"""

import sys
from pathlib import Path

import pytest
import streamlit as st
from conftest import THREADS
from streamlit.testing.v1 import AppTest
from timing import alternate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dashboard_lab import DASHBOARD, build_bench_lab  # noqa: E402

from stabilitylab import store  # noqa: E402

RUNS, STEPS = 50, 5000
COMPARE_SCALARS = ["grad_norm", "h_T_norm", "loss"]  # the Compare page's default panels (x axis: step)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Built once per session (~15-60 s here)."""
    return build_bench_lab(tmp_path_factory.mktemp("dashboard") / "lab", runs=RUNS, steps=STEPS)


def test_compare_page_renders_within_twice_the_store_query(benchmark, lab):
    def query():
        """What the page reads: the runs table, then per run its scalar names, the default
        panels' scalars at full resolution (columnar), the spectra without eigenvalues (ρ(Ā), ‖e‖)
        and the events."""
        table = store.list_runs(lab)
        for run_id in table["run_id"][table["readable"]]:
            run = store.Run(lab / run_id, run_id)
            run.scalar_names(), run.scalar_series(COMPARE_SCALARS), run.spectra(eigenvalues=False), run.events()

    at = AppTest.from_file(str(DASHBOARD), default_timeout=600)
    at.session_state["lab"] = str(lab)
    at.run()
    at.switch_page("app_pages/compare.py")

    def render():
        st.cache_data.clear()  # cold: every store read happens again
        st.cache_resource.clear()  # (Compare's per-view bundle of plain arrays too)
        at.run()

    times = alternate({"store query": query, "compare page": render}, rounds=5, warmup=1)
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) == 5
    ratio = times["compare page"] / times["store query"]
    benchmark.extra_info.update(threads=THREADS, query_s=round(times["store query"], 3),
                                page_s=round(times["compare page"], 3), ratio=round(ratio, 3))
    print(f"\nCompare page, {RUNS} runs × {STEPS} steps: store query {times['store query']:.2f} s, "
          f"page render {times['compare page']:.2f} s, ratio {ratio:.2f} (medians of 5 alternating rounds)")
    benchmark.pedantic(render, rounds=1, iterations=1)
    assert ratio < 2
