"""Every dashboard page in AppTest on a small lab: no exception, the expected charts and
metrics, and widgets that change what is shown. Also: empty and missing labs, a corrupt
run, live growth of a run, read-only access, and no torch in the dashboard's process."""

import base64
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dashboard_lab import APPS, DASHBOARD, REPO, build_lab
from streamlit.testing.v1 import AppTest

from stabilitylab.cli import dashboard_command
from stabilitylab.store import RunWriter

TIMEOUT = 180  # seconds per script run; generous, the machine is shared and noisy
CONCAT = "lr-sweep/concat-lr4e-4-s0"
PARCAE = "lr-sweep/parcae-lr4e-4-s0"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_lab(tmp_path_factory.mktemp("dash") / "lab")


def app(lab: Path, page: str | None = None, selected: list[str] = ()) -> AppTest:
    """The dashboard on `lab`, on `page` (a file under apps/app_pages/), with runs selected."""
    at = AppTest.from_file(str(DASHBOARD), default_timeout=TIMEOUT)
    at.session_state["lab"] = str(lab)
    at.session_state["selected"] = list(selected)
    at.run()
    if page:
        at.switch_page(f"app_pages/{page}").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def array(value) -> np.ndarray:
    """A figure's data array: plotly writes numpy arrays as base64 ("bdata") in the spec."""
    if isinstance(value, dict):
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return a.reshape([int(n) for n in value["shape"].split(",")]) if "shape" in value else a
    return np.asarray(value)


def titles(at: AppTest) -> list[str]:
    return [c["layout"]["title"]["text"] for c in charts(at)]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_runs_page_lists_runs_status_and_the_unreadable_one(lab):
    at = app(lab, "runs.py")
    assert metrics(at) == {"runs": "5", "finished": "2", "diverged": "2", "running": "1", "unreadable": "1"}
    table = at.dataframe[0].value.set_index("run")
    assert table.loc[CONCAT, "status"].startswith("diverged @ ") and "1e+12" in table.loc[CONCAT, "status"]
    assert table.loc[CONCAT, "max ρ(Ā)"] > 1 > table.loc[PARCAE, "max ρ(Ā)"]
    assert np.isfinite(table.loc[CONCAT, "final loss"])  # its last loss was NaN: the last finite one shows
    assert table.loc["live/parcae-running", "status"] == "running (no writer)"
    assert "broken/garbage" not in table.index
    assert any("broken/garbage" in e.value and "not an SQLite database" in e.value for e in at.error)
    at.multiselect(key="filter_injection").set_value(["concat"]).run()
    assert sorted(at.dataframe[0].value["run"]) == [CONCAT, "lr-sweep/concat-lr4e-4-s1"]


def test_selection_carries_to_the_other_pages(lab):
    at = app(lab)
    at.multiselect(key="selected").set_value([CONCAT]).run()
    at.switch_page("app_pages/spectra.py").run()
    assert at.selectbox(key="spectra_left").value == CONCAT
    at.switch_page("app_pages/loop.py").run()
    assert at.selectbox(key="loop_left").value == CONCAT
    assert at.multiselect(key="selected").value == [CONCAT]


def test_compare_opens_on_the_headline_experiment_unconstrained_beside_constrained(lab):
    at = app(lab, "compare.py")
    assert at.multiselect(key="compare_experiments").value == ["lr-sweep"]  # not every run of the lab
    assert titles(at)[:5] == ["loss", "grad norm", "ρ(Ā)", "max ‖h_T‖", "‖e‖"]
    assert metrics(at) == {"unconstrained: diverged": "2 / 2", "constrained: diverged": "0 / 2"}
    rho = charts(at)[2]
    facets = [a["text"] for a in rho["layout"]["annotations"]]
    assert facets == ["unconstrained", "constrained"]
    assert rho["layout"]["yaxis2"]["matches"] == "y"  # one y axis across the columns
    assert [s["y0"] for s in rho["layout"]["shapes"] if s["xref"].endswith("domain")] == [1.0, 1.0]
    divergences = [s for s in rho["layout"]["shapes"] if s["yref"].endswith("domain")]
    assert sorted(s["x0"] for s in divergences) == [170.0, 176.0]
    assert {t["name"] for t in rho["data"] if t["mode"] == "markers"} == {"loss spike", "divergence"}
    assert charts(at)[3]["layout"]["yaxis"]["type"] == "log"
    legend = [t["name"] for t in charts(at)[0]["data"] if t.get("showlegend", True) and t["mode"] == "lines"]
    assert legend == ["injection=concat (N=2)", "injection=parcae (N=2)"]  # one entry per group, N shown
    assert len(at.get("download_button")) == len(charts(at)) == 5
    at.toggle(key="compare_parallel").set_value(True).run()
    assert len(charts(at)) == 6 and charts(at)[5]["data"][0]["type"] == "parcoords"


def test_compare_widgets_change_the_charts(lab):
    at = app(lab, "compare.py", selected=[CONCAT, PARCAE])
    at.radio(key="compare_mode").set_value("selected runs").run()
    names = {t.get("name") for t in charts(at)[0]["data"] if t["mode"] == "lines"}
    assert names == {"injection=concat (N=1)", "injection=parcae (N=1)"}
    steps_axis = charts(at)[0]["layout"]["xaxis"]["title"]["text"]
    at.radio(key="compare_x").set_value("tokens").run()
    assert (steps_axis, charts(at)[0]["layout"]["xaxis"]["title"]["text"]) == ("step", "tokens")
    at.radio(key="compare_mode").set_value("experiments").run()
    bands = [t for t in charts(at)[0]["data"] if t.get("fill") == "toself"]
    assert len(bands) == 2  # the concat and the parcae seed pairs, mean ± std
    faint = [t for t in charts(at)[0]["data"] if t.get("showlegend") is False and t["line"]["width"] == 1]
    assert len(faint) == 2  # the member runs of each colour (here: group) and column, faint, in one trace
    at.radio(key="compare_band").set_value("min–max").run()
    at.multiselect(key="compare_extra").set_value(["tokens_per_s"]).run()
    assert "tokens_per_s" in titles(at)


def test_compare_groups_by_the_chosen_fields_and_tables_only_the_differences(lab):
    at = app(lab, "compare.py")
    at.multiselect(key="compare_experiments").set_value(["lr-sweep", "live"]).run()
    group = at.multiselect(key="compare_group_experiments_live|lr-sweep")
    assert set(group.value) == {"config.model.injection", "config.train.lr", "config.train.steps"}
    group.set_value(["config.model.injection"]).run()
    legend = {t["name"] for t in charts(at)[0]["data"] if t.get("showlegend", True) and t["mode"] == "lines"}
    assert legend == {"injection=concat (N=2)", "injection=parcae (N=3)"}
    config = at.dataframe[0].value
    assert {"group", "seed", "status", "model.injection", "train.lr"} <= set(config.columns)
    assert "model.d_model" not in config.columns  # the same in every run: not a difference
    at.toggle(key="compare_diff_only").set_value(False).run()
    assert "model.d_model" in at.dataframe[0].value.columns


def test_chart_csvs_hold_every_point_while_the_charts_are_downsampled(tmp_path, monkeypatch):
    """The CSV behind a download button is made on click; capture those callables and run them."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    made = {}
    register = MediaFileManager.add_deferred

    def capture(self, data, mimetype, coordinates, file_name=None, **kw):
        made[file_name] = data
        return register(self, data, mimetype, coordinates, file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", capture)
    lab = build_lab(tmp_path / "lab", steps=2000)
    at = app(lab, "compare.py")
    loss = pd.read_csv(io.StringIO(made["compare_loss.csv"]()), keep_default_na=False, na_values=["NaN"])
    assert len(loss) == 2 * 2000 + (1700 + 1760)  # every step of every run (concat runs stop when they diverge)
    assert loss.groupby("run")["step"].max().to_dict()[PARCAE] == 2000
    means = [t for t in charts(at)[0]["data"] if t.get("showlegend", True) and t["mode"] == "lines"]
    assert max(len(array(t["y"])) for t in means) <= 602 < 2000  # the chart itself draws a min-max selection
    assert len([f for f in made if f.startswith("compare_")]) == len(charts(at)) == 5  # one CSV per chart


def test_compare_without_a_selection_says_what_to_do(lab):
    at = app(lab, "compare.py")
    at.radio(key="compare_mode").set_value("selected runs").run()
    assert not charts(at) and "No runs to compare" in at.info[0].value


def test_loop_dynamics_heatmap_and_step_slider(lab):
    at = app(lab, "loop.py", selected=[CONCAT])
    first = charts(at)
    assert [first[i]["data"][0]["type"] for i in (0, 2)] == ["heatmap", "heatmap"]  # left and right
    assert array(first[0]["data"][0]["z"]).shape == (8, 17)  # 8 loop iterations × 17 probe steps
    assert first[0]["data"][0]["zmin"] == first[2]["data"][0]["zmin"]  # one colour scale for both
    assert first[0]["data"][0]["zmax"] == first[2]["data"][0]["zmax"]
    steps = at.select_slider(key="loop_step").options
    at.select_slider(key="loop_step").set_value(steps[3]).run()
    curves = {t["name"] for t in charts(at)[1]["data"]}
    assert curves == {"step 10", "step 40", "step 170"}
    assert charts(at)[4]["layout"]["title"]["text"] == "validation loss vs test-time depth (last evaluation)"


def test_loop_dynamics_fits_the_test_time_depth_law(lab):
    at = app(lab, "loop.py", selected=[CONCAT])
    depth = charts(at)[4]
    assert [t["name"] for t in depth["data"]][:2] == ["left: step 150", "left: L = L_inf + Z*exp(-z*T)"]
    assert float(metrics(at)["z (left)"]) == pytest.approx(0.7, rel=1e-3)  # the lab's L(T) = L∞ + 1.5·e^(−0.7T)
    assert float(metrics(at)["z (right)"]) == pytest.approx(0.7, rel=1e-3)


def test_scaling_page_fits_an_uploaded_csv_and_reports_held_out_error(lab):
    at = app(lab, "scaling.py")
    at.radio(key="scaling_source").set_value("CSV upload").run()
    T = np.array([1, 2, 3, 4, 6, 8, 12, 16.0])
    noise = 1 + 1e-3 * np.random.default_rng(0).standard_normal(len(T))  # measured losses are never exact
    csv = pd.DataFrame({"depth": T, "loss": (2.0 + 1.5 * np.exp(-0.5 * T)) * noise}).to_csv(index=False).encode()
    at.file_uploader(key="scaling_csv").upload("depth.csv", csv, "text/csv").run()
    at.selectbox(key="scaling_col_T").set_value("depth")
    at.selectbox(key="scaling_col_L").set_value("loss").run()
    at.number_input(key="scaling_threshold_T").set_value(8.0).run()
    assert not at.exception, [e.value for e in at.exception]
    m = metrics(at)
    assert m["points fitted"] == "6" and m["held-out error"].endswith("%")
    params = at.dataframe[0].value.set_index("parameter")["value"]
    assert params["L_inf"] == pytest.approx(2.0, rel=1e-2) and params["z"] == pytest.approx(0.5, rel=5e-2)
    lower, upper = at.dataframe[0].value.set_index("parameter").loc["L_inf", ["lower", "upper"]]
    assert lower <= params["L_inf"] <= upper and lower < upper  # a bootstrap interval around the estimate
    assert titles(at) == ["L = L_inf + Z*exp(-z*T)", "predicted vs observed"]


def test_scaling_page_reads_a_sweep_from_the_runs(lab):
    at = app(lab, "scaling.py")
    assert at.selectbox(key="scaling_experiment_test-time (exp)").value == "lr-sweep"  # the one with finished runs
    assert at.multiselect(key="scaling_runs_lr-sweep").value == [PARCAE, "lr-sweep/parcae-lr4e-4-s1"]
    assert metrics(at)["points fitted"] == "6"  # two runs × depths 1, 2, 4 (8 and 16 held out: T > μ_rec)


def test_without_a_lab_argument_it_opens_the_reference_lab_on_its_story():
    at = AppTest.from_file(str(DASHBOARD), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.text_input(key="lab").value == str(REPO / "data" / "reference-lab")
    pair = at.table[0].value  # the headline pair, side by side without a click
    assert list(pair.columns) == ["concat (left)", "parcae (right)"]
    assert pair.loc["status", "concat (left)"].startswith("diverged") and pair.loc["status", "parcae (right)"] == "finished"
    assert float(pair.loc["max ρ(Ā)", "concat (left)"]) > 1 > float(pair.loc["max ρ(Ā)", "parcae (right)"])
    text = " ".join(m.value for m in at.markdown)
    assert all(f"**C{i}**" in text for i in range(1, 8))  # the claims table
    outcome = [c for c in charts(at) if c["data"][0]["type"] == "heatmap"]
    assert len(outcome) == 4  # c1, c2 (injection × lr), c3 (granularity × lr), c6 (budget × μ_rec)
    at.switch_page("app_pages/scaling.py").run()
    assert at.selectbox(key="scaling_experiment_test-time (exp)").value == "c5_test_time_depth"
    at.selectbox(key="scaling_law").set_value("unified").run()
    assert at.selectbox(key="scaling_experiment_unified").value == "c6_isoflop"
    assert not at.exception, [e.value for e in at.exception]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_missing_or_empty_lab_says_how_to_make_one(tmp_path, make):
    if make == "empty":
        (tmp_path / "lab").mkdir()
    at = app(tmp_path / "lab")
    text = " ".join(m.value for m in at.markdown)
    assert "make demo" in text and "stabilitylab dashboard" in text
    assert ("no runs yet" if make == "empty" else "There is no lab") in at.info[0].value


def test_a_growing_run_is_read_again_without_a_reload(tmp_path):
    lab = tmp_path / "lab"
    writer = RunWriter.create(lab, "live", {"model": {"injection": "parcae"}}, experiment="live")
    try:
        for step in range(1, 51):
            writer.log(step, {"loss": 1.0, "h_T_norm": 1.0})
        writer.flush()
        at = app(lab, "runs.py")
        assert at.toggle(key="live").value  # a live writer turns live refresh on
        assert at.dataframe[0].value["steps"].tolist() == [50]
        for step in range(51, 81):
            writer.log(step, {"loss": 1.0, "h_T_norm": 1.0})
        writer.flush()
        at.run()
        assert at.dataframe[0].value["steps"].tolist() == [80]
    finally:
        writer.close()


def test_a_full_session_leaves_the_lab_byte_identical(tmp_path):
    lab = build_lab(tmp_path / "lab", steps=60)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in lab.rglob("*") if p.is_file()}
    at = app(lab, selected=[CONCAT, PARCAE])
    for page in ("compare.py", "loop.py", "spectra.py", "scaling.py", "architecture.py", "runs.py", "overview.py"):
        at.switch_page(f"app_pages/{page}").run()
        assert not at.exception, (page, [e.value for e in at.exception])
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in lab.rglob("*") if p.is_file()}
    assert after == before


def test_the_dashboard_never_imports_torch(tmp_path):
    """Every page, in a fresh interpreter: the dashboard reads the lab through the store alone."""
    lab = build_lab(tmp_path / "lab", steps=60)
    code = f"""
import json, sys
sys.path.insert(0, {str(APPS)!r})
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(DASHBOARD)!r}, default_timeout={TIMEOUT})
at.session_state["lab"] = {str(lab)!r}
at.run()
for page in ("overview.py", "compare.py", "loop.py", "spectra.py", "scaling.py", "architecture.py"):
    at.switch_page("app_pages/" + page).run()
    assert not at.exception, (page, [e.value for e in at.exception])
ours = sorted(m for m in sys.modules if m.startswith("stabilitylab"))
print(json.dumps({{"torch": "torch" in sys.modules, "ours": ours}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not loaded["torch"], f"torch was imported; stabilitylab modules loaded: {loaded['ours']}"
    assert not [m for m in loaded["ours"] if m.startswith(("stabilitylab.model", "stabilitylab.train"))]


def test_the_cli_verb_serves_this_app_on_the_given_lab_and_port():
    command = dashboard_command("runs/x", 8600)
    assert command[1:5] == ["-m", "streamlit", "run", str(DASHBOARD)]
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--") + 1:] == ["--lab", "runs/x"]
    assert command[command.index("--server.scriptHealthCheckEnabled") + 1] == "true"  # apps/warm.py runs the app once
    assert (Path(command[4]).with_name("warm.py")).is_file()
    assert dashboard_command(None, 8501)[-1] == "--"  # no lab: the app opens the reference lab


def test_a_link_opens_its_page_on_the_selection_it_carries(lab):
    """The Overview's links (the claims', the pair's) carry their selection as query parameters."""
    at = AppTest.from_file(str(DASHBOARD), default_timeout=TIMEOUT)
    at.session_state["lab"] = str(lab)
    at.run()
    at.query_params["runs"] = f"{PARCAE},{CONCAT}"
    at.switch_page("app_pages/spectra.py").run()
    assert (at.selectbox(key="spectra_left").value, at.selectbox(key="spectra_right").value) == (PARCAE, CONCAT)
    at.switch_page("app_pages/loop.py").run()  # the pair follows to the next page
    assert (at.selectbox(key="loop_left").value, at.selectbox(key="loop_right").value) == (PARCAE, CONCAT)
    at.query_params["experiment"] = "live"
    at.switch_page("app_pages/compare.py").run()
    assert at.multiselect(key="compare_experiments").value == ["live"]
    at.query_params["law"] = "unified"
    at.query_params["experiment"] = "lr-sweep"
    at.switch_page("app_pages/scaling.py").run()
    assert at.selectbox(key="scaling_law").value == "unified"
    assert at.selectbox(key="scaling_experiment_unified").value == "lr-sweep"
    assert not at.exception, [e.value for e in at.exception]


def test_overview_tells_the_story_of_a_small_lab(lab):
    at = app(lab)
    pair = at.table[0].value
    assert list(pair.columns) == ["concat (left)", "parcae (right)"]
    assert pair.loc["final loss", "concat (left)"].endswith("(last finite)")  # it ended on NaN: not "–"
    assert float(pair.loc["final loss", "concat (left)"].split()[0]) > 0
    assert any("concat diverged @" in m.value for m in at.markdown)
    lines = {t["name"] for t in charts(at)[0]["data"]}
    assert lines == {"concat (left)", "parcae (right)"}
    sweep = next(d.value for d in at.dataframe if "cell" in d.value.columns)  # lr-sweep's pairs: one per seed
    assert sweep["cell"].tolist() == ["seed=0", "seed=1"] and set(sweep["concat status"]) == {"diverged"}


def test_loop_dynamics_shows_a_recorded_exit_report_and_the_hint_without_one(tmp_path):
    from stabilitylab.analysis import exits  # torch: the test builds the report, the dashboard only reads it
    from stabilitylab.store import Run

    lab = build_lab(tmp_path / "lab", steps=60)
    eps = (0.1, 0.01)
    reports = [exits.ExitReport(
        "tiny", step, 6, 4, (2, 3), [2.5, 2.3, 2.2, 2.15, 2.14, 2.14], 2.15,
        [exits.ExitCurve("latent", [exits.ExitPoint(0.1, 2.5, 4, 2.3), exits.ExitPoint(0.01, 4.2, 6, 2.15)],
                         {0.0: 0.0, 0.01: 0.375}),
         exits.ExitCurve("kl", [exits.ExitPoint(0.1, 1.5, 3, 2.4), exits.ExitPoint(0.01, 3.0, 5, 2.2)],
                         {0.0: None, 0.01: None})],
        [exits.ExitPrediction(e, [2, 3, 3, 4, 6, 6], [2, 3, 4, 4, 5, 6], [0.3] * 6, 0.95, err, 0.5)
         for e, err in zip(eps, (step / 40, step / 20))], {"gate": "the model has no exit gate"})
        for step in (20, 40)]
    exits.record(Run(lab / PARCAE, PARCAE), reports)
    at = app(lab, "loop.py", selected=[PARCAE, CONCAT])
    shown = {c["layout"]["title"]["text"]: c for c in charts(at)}
    loss = shown["loss vs mean exit depth (left)"]
    assert [t["name"] for t in loss["data"]] == ["fixed depth t", "latent", "kl"]
    assert array(loss["data"][1]["x"]).tolist() == [2.5, 4.2]
    assert [s["y0"] for s in loss["layout"]["shapes"]][0] == 2.15  # L(μ_rec)
    assert loss["layout"]["shapes"][1]["x0"] == 4  # μ_rec
    pred = shown["predicted vs measured exit depth (left)"]
    assert [t["name"] for t in pred["data"]] == ["predicted = measured", "ε = 0.1", "ε = 0.01"]
    assert np.all(np.abs(array(pred["data"][1]["y"]) - [2, 3, 3, 4, 6, 6]) <= 0.15)  # jittered, not moved
    over_steps = shown["exit prediction error over training (left)"]
    assert array(over_steps["data"][1]["y"]).tolist() == [1.0, 2.0]  # ε = 0.01 at steps 20, 40
    saved = next(d.value for d in at.dataframe if "latent" in d.value.index)  # compute saved per rule and δ
    assert saved.loc["latent"].tolist() == ["0%", "38%"] and saved.loc["kl"].tolist() == ["—", "—"]
    assert not any("(right)" in t and "exit" in t for t in shown)
    assert any(f"stabilitylab exit {CONCAT}" in i.value for i in at.info)
