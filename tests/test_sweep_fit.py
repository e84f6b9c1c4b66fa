"""`stabilitylab fit --lab`: a sweep's points gathered from the store (known N, D, T, L per
run), the laws fitted from them back to their generating parameters, written where the
docs say, and bad requests refused with the reason."""

import json
from pathlib import Path

import numpy as np
import pytest

import stabilitylab as sl
from stabilitylab.analysis.sweep import COLUMNS, sweep_points
from stabilitylab.cli import main
from stabilitylab.config import count_parameters
from stabilitylab.store import RunWriter, find_runs, open_run

REPO = Path(__file__).resolve().parents[1]
E, X, x, Y, y, Z, z = 1.5, 30.0, 0.3, 60.0, 0.35, 1.2, 1.5  # the unified law's parameters
DEPTHS = (1, 2, 3, 4, 6, 8, 12)


def unified(N, D, T, mu):
    return E + X * N ** -x + Y * D ** -y + Z * np.exp(-z * T / mu)


def sweep_run(lab, run_id, mu, D, status="finished", experiment="sweep", looped=True):
    """A run whose last evaluation (step 2) follows the unified law exactly; an older one
    (step 1) that sweep_points must ignore. A GPT baseline (looped=False) evaluates at depth 1."""
    cfg = sl.ModelConfig.preset("tiny", mean_recurrence=mu, looped=looped)
    N = count_parameters(cfg).unrolled(mu)
    with RunWriter.create(lab, run_id, {"model": cfg.to_dict()}, experiment=experiment) as w:
        w.log(1, {"tokens": D / 2, "flops": 3 * N * D})
        w.log(2, {"tokens": D, "flops": 6 * N * D})
        w.log_eval(1, 1, {"val_loss": 99.0})
        for T in DEPTHS if looped else (1,):
            w.log_eval(2, T, {"val_loss": unified(N, D, T, mu)})
        if status != "finished":
            w.set_status(status, 2, "test")
    return N


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = tmp_path_factory.mktemp("sweep-lab")
    for mu in (1, 2, 3, 4):
        for D in (1e4, 3e4, 1e5):
            sweep_run(lab, f"sweep/mu{mu}-D{D:.0e}", mu, D)
    sweep_run(lab, "sweep/diverged", 2, 3e4, status="diverged")
    sweep_run(lab, "other/mu2", 2, 3e4, experiment="other")
    sweep_run(lab, "other/gpt", 1, 3e4, experiment="other", looped=False)
    with RunWriter.create(lab, "sweep/no-evals", {"model": sl.ModelConfig.preset("tiny").to_dict()},
                          experiment="sweep"):
        pass
    return lab


def test_sweep_points_are_each_runs_last_evaluation_with_its_N_and_D(lab):
    points = sweep_points(find_runs(lab))
    assert list(points.columns) == list(COLUMNS)
    assert set(points["run"]) == {r.id for r in find_runs(lab)} - {"sweep/no-evals"}
    one = points[points["run"] == "sweep/mu3-D1e+05"]
    N = count_parameters(sl.ModelConfig.preset("tiny", mean_recurrence=3)).unrolled(3)
    assert one["T"].tolist() == list(DEPTHS) and (one["step"] == 2).all() and (one["mu_rec"] == 3).all()
    assert (one["N"] == N).all() and (one["D"] == 1e5).all() and (one["C"] == 6 * N * 1e5).all()
    assert np.allclose(one["L"], unified(N, 1e5, one["T"].to_numpy(), 3))
    assert points.loc[points["run"] == "sweep/diverged", "status"].iloc[0] == "diverged"
    gpt = points[points["run"] == "other/gpt"]
    params = count_parameters(sl.ModelConfig.preset("tiny", looped=False))
    assert gpt["T"].tolist() == [1] and gpt["mu_rec"].tolist() == [1] and gpt["N"].iloc[0] == params.static + params.core


def test_real_runs_give_D_from_their_tokens_and_N_from_their_config():
    ref = REPO / "data" / "reference-lab"
    points = sweep_points(find_runs(ref))  # D = steps × batch × seq_len
    parcae = points[points["run"] == "quick/injection=parcae"]
    config = open_run("quick/injection=parcae", ref).config()
    assert (parcae["D"] == config["train"]["steps"] * config["train"]["batch_size"] * config["data"]["seq_len"]).all()
    model = sl.ModelConfig(**config["model"])
    assert (parcae["N"] == count_parameters(model).unrolled(model.mean_recurrence)).all()


def test_the_test_time_law_is_fitted_per_run_and_saved_in_the_run(lab, capsys):
    assert main(["fit", "--lab", str(lab), "--experiment", "sweep", "--law", "test-time", "--bootstrap", "0",
                 "--write"]) == 0
    captured = capsys.readouterr()
    assert "skipped sweep/diverged: diverged" in captured.out
    assert "skipped sweep/mu1-D1e+04 (exp): L: 1 points to fit" in captured.err  # T ≤ μ_rec = 1: one point
    assert "held-out error" in captured.out
    result = open_run("sweep/mu4-D1e+05", lab).results()["test_time_fit.exp"]
    N = count_parameters(sl.ModelConfig.preset("tiny", mean_recurrence=4)).unrolled(4)
    assert result["params"]["z"] == pytest.approx(z / 4, rel=1e-4)  # exp(−z·T/μ) is rate z/μ in T
    assert result["params"]["L_inf"] == pytest.approx(E + X * N ** -x + Y * 1e5 ** -y, rel=1e-5)
    assert result["held_out_error"] < 1e-5 and result["n_points"] == 4 and result["step"] == 2
    assert "test_time_fit.exp" not in open_run("sweep/diverged", lab).results()


def test_the_training_law_is_fitted_across_runs_at_T_equal_mu_and_written_to_the_lab(lab, capsys):
    assert main(["fit", "--lab", str(lab), "--experiment", "sweep", "--law", "training", "--bootstrap", "0",
                 "--holdout", "sweep/mu4-D1e+05", "--write"]) == 0
    out = capsys.readouterr().out
    assert "12 runs, 12 points (1 held out)" in out and "held-out error" in out
    doc = json.loads((lab / "fits" / "sweep.training.json").read_text())
    assert doc["params"]["x"] == pytest.approx(x, rel=1e-3) and doc["params"]["y"] == pytest.approx(y, rel=1e-3)
    assert doc["params"]["E"] == pytest.approx(E + Z * np.exp(-z), rel=1e-3)  # at T = μ the depth term is Z·e^−z
    assert doc["held_out_error"] < 1e-4 and doc["holdout"] == ["sweep/mu4-D1e+05"]
    assert len(doc["points"]) == 12 and sum(p["held_out"] for p in doc["points"]) == 1


@pytest.mark.slow
def test_the_unified_law_holds_out_deeper_evaluations_and_recovers_its_parameters(lab, capsys):
    assert main(["fit", "--lab", str(lab), "--experiment", "sweep", "--law", "unified", "--bootstrap", "0",
                 "--write"]) == 0
    doc = json.loads((lab / "fits" / "sweep.unified.json").read_text())
    for name, value in dict(E=E, X=X, x=x, Y=Y, y=y, Z=Z, z=z).items():
        assert doc["params"][name] == pytest.approx(value, rel=1e-3)
    held = [p for p in doc["points"] if p["held_out"]]
    assert held and all(p["T"] > p["mu_rec"] for p in held) and doc["held_out_error"] < 1e-4


def test_a_run_without_a_model_config_is_refused_by_name(tmp_path):
    with RunWriter.create(tmp_path, "foreign", {}, experiment="x") as w:
        w.log_eval(1, 1, {"val_loss": 3.0})
    with pytest.raises(ValueError, match="foreign: its config has no \\[model\\] table"):
        sweep_points(find_runs(tmp_path))


@pytest.mark.parametrize("args, message", [
    ([], "give a CSV file or --lab LAB"),
    (["x.csv", "--lab", "L"], "give a CSV file or --lab LAB"),
    (["x.csv", "--experiment", "sweep"], "go with --lab"),
    (["--lab", "{lab}", "--experiment", "sweep", "--holdout", "sweep/nope"], "--holdout: sweep/nope is not a finished"),
    (["--lab", "{lab}", "--experiment", "nope"], "no finished run with evaluations"),
    (["--lab", "{lab}", "--experiment", "sweep", "--law", "test-time", "--holdout", "sweep/mu2-D1e+04"],
     "fitted per run"),
])
def test_bad_fit_requests_are_refused_with_the_reason(lab, capsys, args, message):
    args = [a.format(lab=lab) for a in args]
    if "--law" not in args:
        args += ["--law", "training"]
    assert main(["fit", *args, "--bootstrap", "0"]) == 2
    assert message in capsys.readouterr().err
