"""The fast reads the dashboard uses, against the plain ones they replace: the columnar
scalar read, spectra without eigenvalues, and the summary row a writer keeps (schema v2),
on real runs of the reference lab (schema v1, no summary row), on a run growing under a
writer, a diverged run, a resumed run, and random logging histories."""

import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stabilitylab import records, store
from stabilitylab.store import Run, RunWriter
from stabilitylab.store.schema import SCHEMA_VERSION, SUMMARY_FIELDS, compute_summary, real_sql

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference-lab"
# a diverged concat run (NaN/inf at the end) and a finished parcae run of the reference lab
REAL_RUNS = ["c1_stability_grid/injection=concat,lr=0.01,seed=1", "c1_stability_grid/injection=parcae,lr=0.01,seed=1"]


def old_scalars(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The read scalar_series replaces: one SELECT per name, rows where it was logged."""
    con = sqlite3.connect(f"{run.db.absolute().as_uri()}?mode=ro", uri=True)
    out = {}
    for name, nid in con.execute("SELECT name, id FROM scalar_columns"):
        rows = con.execute(f"SELECT step, {real_sql(f'v{nid}')} FROM scalars WHERE v{nid} IS NOT NULL "
                           "ORDER BY step").fetchall()
        if rows:
            out[name] = (np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.float64))
    con.close()
    return out


def same_series(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
        np.testing.assert_array_equal(a[name][1], b[name][1])  # NaN equals NaN here
        assert a[name][0].dtype == np.int64 and a[name][1].dtype == np.float64


def table_summary(run: Run) -> dict:
    """compute_summary straight from the tables (what a v1 run is read with)."""
    con = sqlite3.connect(f"{run.db.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return compute_summary(con)
    finally:
        con.close()


def same_summary(row: dict, expected: dict) -> None:
    for field in SUMMARY_FIELDS:
        a, b = row[field], expected[field]
        a, b = (math.nan if a is None else a), (math.nan if b is None else b)
        assert (math.isnan(a) and math.isnan(b)) or a == b, (field, a, b)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> list[Run]:
    if not (REFERENCE / REAL_RUNS[0] / "run.db").is_file():
        pytest.skip("the reference lab is not in this checkout")
    lab = tmp_path_factory.mktemp("ref")
    for run_id in REAL_RUNS:
        shutil.copytree(REFERENCE / run_id, lab / run_id)
    return [Run(lab / run_id, run_id) for run_id in REAL_RUNS]


def test_the_columnar_scalar_read_gives_the_per_name_reads_of_a_real_run(real_runs):
    for run in real_runs:
        same_series(run.scalar_series(), old_scalars(run))
        wanted = [records.LOSS, records.STATE_NORM, "never logged"]
        same_series(run.scalar_series(wanted), {k: v for k, v in old_scalars(run).items() if k in wanted})
        steps, values = run.scalar_series([records.LOSS], start=10, stop=60, stride=5)[records.LOSS]
        full_steps, full_values = old_scalars(run)[records.LOSS]
        keep = (full_steps >= 10) & (full_steps < 60) & (full_steps % 5 == 0)
        np.testing.assert_array_equal(steps, full_steps[keep])
        np.testing.assert_array_equal(values, full_values[keep])
        long = run.scalars()  # the long frame is built from it, sorted by name then step
        assert list(long["name"]) == sorted(long["name"])
        assert len(long) == sum(len(s) for s, _ in old_scalars(run).values())


def test_spectra_without_eigenvalues_are_the_same_numbers(real_runs):
    for run in real_runs:
        full = run.spectra()
        light = run.spectra(eigenvalues=False)
        assert list(light.columns) == ["step", *records.SPECTRUM_FIELDS]
        pd.testing.assert_frame_equal(light, full.drop(columns="eigenvalues"))
        pd.testing.assert_frame_equal(run.spectra(start=20, stride=3, eigenvalues=False),
                                      run.spectra(start=20, stride=3).drop(columns="eigenvalues"))


def test_an_old_run_without_a_summary_row_reads_and_a_writer_upgrades_it(real_runs, tmp_path):
    diverged = real_runs[0]
    con = sqlite3.connect(diverged.db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1  # the reference lab is schema v1
    con.close()
    before = diverged.summary()
    assert before["status"] == "diverged"
    losses = old_scalars(diverged)[records.LOSS][1]  # it trained on after its divergence, to a finite loss
    assert before["final_loss"] == losses[-1] and before["last_finite_loss"] == losses[np.isfinite(losses)][-1]
    copy = tmp_path / "copy"
    shutil.copytree(diverged.path, copy)
    with RunWriter.attach(copy) as writer:  # `stabilitylab analyze` opening an old run
        writer.log_event(3, "note", "attached")
    con = sqlite3.connect(copy / "run.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    row = dict(zip(SUMMARY_FIELDS, con.execute(f"SELECT {', '.join(SUMMARY_FIELDS)} FROM summary").fetchone()))
    con.close()
    same_summary(row, table_summary(diverged))
    after = Run(copy, diverged.id).summary()
    assert {k: v for k, v in after.items() if k not in ("path", "token")} == \
        {k: v for k, v in before.items() if k not in ("path", "token")}


def test_a_growing_run_keeps_its_summary_row_equal_to_the_tables(tmp_path):
    with RunWriter.create(tmp_path, "live", {}, experiment="t", flush_rows=7) as writer:
        run = Run(tmp_path / "live")
        for step in range(1, 120):
            loss = math.nan if step in (40, 41) else (math.inf if step == 90 else 3.0 / step)
            writer.log(step, {records.LOSS: loss, records.STATE_NORM: math.nan if step == 50 else float(step % 37)})
            if step % 10 == 0:
                writer.log_spectrum(step, [0.5 + step / 200, 0.1j], norm_a=1.0)
            if step % 13 == 0:  # a reader between flushes sees the last commit's summary, consistent with its rows
                same_summary(run.summary(), table_summary(run))
        writer.log(120, {records.LOSS: math.nan})
        writer.set_status("diverged", reason="loss is NaN")
    summary = run.summary()
    same_summary(summary, table_summary(run))
    assert summary["last_step"] == 120 and math.isnan(summary["final_loss"])
    assert summary["last_finite_loss"] == 3.0 / 119 and summary["max_state_norm"] == 36.0
    assert summary["max_rho"] == pytest.approx(0.5 + 110 / 200)


def test_a_resumed_run_recomputes_its_summary_without_the_dropped_steps(tmp_path):
    with RunWriter.create(tmp_path, "r", {}, experiment="t") as writer:
        for step in range(1, 51):
            writer.log(step, {records.LOSS: 1.0 / step, records.STATE_NORM: float(step)})
            writer.log_spectrum(step, [step / 10])
    with RunWriter.resume(tmp_path / "r", 20) as writer:
        writer.log(21, {records.LOSS: 0.5, records.STATE_NORM: 2.0})
    summary = Run(tmp_path / "r").summary()
    same_summary(summary, table_summary(Run(tmp_path / "r")))
    assert (summary["last_step"], summary["final_loss"], summary["max_state_norm"], summary["max_rho"]) == \
        (21, 0.5, 20.0, 2.0)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.none())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(st.tuples(st.integers(0, 3), numbers, numbers, numbers, st.booleans()), max_size=30))
@example(history=[(0, None, None, 1.0, False), (0, None, None, 0.0, False)])  # one step's spectrum twice, one flush
def test_the_summary_row_equals_the_tables_after_any_history(tmp_path_factory, history):
    """Steps that repeat or skip, NaN and ±inf values, names logged or not, spectra with
    NaN ρ(Ā), flushes anywhere: the kept row is what the tables give."""
    lab = tmp_path_factory.mktemp("h")
    with RunWriter.create(lab, "r", {}, experiment="t", flush_rows=10 ** 6, flush_seconds=10 ** 6) as writer:
        step = 0
        for gap, loss, norm, rho, flush in history:
            step += gap
            values = {k: v for k, v in ((records.LOSS, loss), (records.STATE_NORM, norm)) if v is not None}
            writer.log(step, values)
            if rho is not None:
                writer.log_spectrum(step, [0.5], rho=rho)
            if flush:
                writer.flush()
    run = Run(lab / "r")
    same_summary(run.summary(), table_summary(run))
    listed = store.list_runs(lab).iloc[0]
    same_summary(listed.to_dict(), table_summary(run))
