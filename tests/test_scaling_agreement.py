"""`stabilitylab fit --lab` and the dashboard's Scaling laws page fit the same points with
the same N, so they find the same laws: checked on the reference lab's isoFLOP sweep for the
training law and the unified law (T > μ_rec held out by both)."""

import re

import pytest
from dashboard_lab import DASHBOARD, REPO
from streamlit.testing.v1 import AppTest

from stabilitylab.cli import main

LAB = REPO / "data" / "reference-lab"
EXPERIMENT = "c6_isoflop"


def cli_params(capsys, law: str) -> dict[str, float]:
    assert main(["fit", "--lab", str(LAB), "--experiment", EXPERIMENT, "--law", law, "--bootstrap", "0"]) == 0
    return {k: float(v) for k, v in re.findall(r"^\s+(\w+) = (\S+)$", capsys.readouterr().out, re.M)}


def dashboard_params(law: str) -> dict[str, float]:
    at = AppTest.from_file(str(DASHBOARD), default_timeout=180)
    at.session_state["lab"] = str(LAB)
    at.run()
    at.switch_page("app_pages/scaling.py").run()
    at.selectbox(key="scaling_law").set_value(law).run()
    at.selectbox(key=f"scaling_experiment_{law}").set_value(EXPERIMENT).run()
    at.select_slider(key="scaling_bootstrap").set_value(0).run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "parameter" in d.value.columns)
    return dict(zip(table["parameter"], table["value"].astype(float)))


@pytest.mark.skipif(not (LAB / EXPERIMENT).is_dir(), reason="the reference lab has no c6_isoflop sweep")
@pytest.mark.parametrize("law", ["training", "unified"])
def test_cli_and_dashboard_fit_the_same_law_to_the_reference_lab(capsys, law):
    cli, dashboard = cli_params(capsys, law), dashboard_params(law)
    assert set(cli) == set(dashboard) and len(cli) >= 5
    for name, value in cli.items():  # the CLI prints six significant digits
        assert dashboard[name] == pytest.approx(value, rel=1e-5), name
