"""The reproduction pipeline end to end on a tiny lab: every experiments/c*.toml, shrunk to
its smallest cells (a width-32 model, a few steps), is swept into a lab; the report script
reads it back through the store, fits its laws and writes every number REPORT.md cites.
The numbers must come out the same on a second run of the script (they regenerate)."""

import importlib.util
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import tomli_w

from stabilitylab.experiment import build_experiment, read_experiment
from stabilitylab.config import training_flops_per_token
from stabilitylab.store import list_runs
from stabilitylab.train.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
EXPERIMENTS = REPO / "experiments"
TINY_MODEL = {"d_model": 32, "n_heads": 2, "block_size": 32}
# per experiment: the grid values kept (enough for the report's contrasts) and the seeds
SMALLEST = {
    "c1_stability_grid": ({"model.injection": ["concat", "parcae"]}, [0]),
    "c3_depth_sampling": ({"model.depth_granularity": ["batch", "sequence"]}, [0]),
    "c4_prelude_norm": ({"model.prelude_norm": [True, False], "train.lr": [5e-3]}, [0]),
    "c5_test_time_depth": ({"model.mean_recurrence": [3]}, [0]),
    "c6_isoflop": ({"model.mean_recurrence": [1, 2, 4]}, []),
    "c7_zoh": ({"model.injection": ["parcae", "parcae-zoh"]}, [0]),
}


def load_report():
    spec = importlib.util.spec_from_file_location("report", EXPERIMENTS / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def shrink(name: str, folder: Path, cache: Path) -> Path:
    """experiments/<name>.toml with the tiny model, 4 steps (or FLOP budgets worth 4 and 8
    steps at μ_rec 4) and the smallest cells of its grid."""
    raw = tomllib.loads((EXPERIMENTS / f"{name}.toml").read_text())
    keep, seeds = SMALLEST[name]
    grid = raw.get("sweep", {}).get("grid", {})
    for key, values in grid.items():
        grid[key] = keep.get(key, values[:1])
    raw["sweep"]["seeds"] = seeds
    raw["model"] |= TINY_MODEL
    raw["data"] |= {"seq_len": 32, "cache_dir": str(cache)}
    raw["train"] |= {"steps": 4, "warmup_steps": 1, "batch_size": 4, "eval_batches": 1}
    raw["probes"] |= {"trace_every": 2, "spectrum_every": 2, "batch_size": 1}
    if raw["probes"].get("analysis_every"):
        raw["probes"]["analysis_every"] = 4
    if name == "c1_stability_grid":  # every tiny run crosses this bound at once: the diverged-run path
        raw["divergence"]["max_state_norm"] = 1.0
    if name == "c5_test_time_depth":
        raw["train"]["eval_depths"] = list(range(1, 10))
    if name == "c6_isoflop":
        exp = build_experiment({**raw, "model": {**raw["model"], "mean_recurrence": 4}, "sweep": {}})
        per_step = training_flops_per_token(exp.model, 32).total * 4 * 32
        grid["train.flop_budget"] = [4 * per_step, 8 * per_step]
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    read_experiment(path)  # still a valid experiment
    return path


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory, corpus_cache, one_thread):
    folder = tmp_path_factory.mktemp("experiments")
    lab = folder / "lab"
    for name in SMALLEST:
        results = run_sweep(shrink(name, folder, corpus_cache), lab=lab, progress=False, report=lambda line: None)
        assert results and all(r.status in ("finished", "diverged") for r in results), results
    return lab


def test_every_claim_experiment_is_in_the_pipeline():
    shipped = {p.stem for p in EXPERIMENTS.glob("c*.toml")}
    assert shipped == set(SMALLEST) == set(load_report().EXPERIMENTS.values())


@pytest.fixture(scope="module")
def report_out(tiny_lab, tmp_path_factory):
    """The report script run once on the tiny lab, with its figures when chromium is here."""
    out = tmp_path_factory.mktemp("report")
    flags = [] if CHROMIUM else ["--no-figures"]
    assert load_report().main([str(tiny_lab), "--out", str(out), *flags]) == 0
    return out


def test_the_report_regenerates_every_number_from_a_tiny_lab(tiny_lab, report_out, tmp_path, capsys):
    table = list_runs(tiny_lab)
    assert table.readable.all() and set(table.experiment) == set(SMALLEST)
    results = {p.stem: json.loads(p.read_text()) for p in (report_out / "results").glob("*.json")}
    assert set(results) == {"c1", "c2", "c3", "c4", "c5", "c6", "c7", "dynamics", "runtimes"}
    assert {(c["injection"], c["seeds"]) for c in results["c1"]["cells"]} == {("concat", 1), ("parcae", 1)}
    assert set(results["c3"]["groups"]) == {"batch, lr 0.005", "sequence, lr 0.005"}
    assert {r["prelude_norm"] for r in results["c4"]["runs"]} == {True, False}
    assert set(results["c5"]["forms"]) == {"exp", "power1p", "power", "pure-power"}
    assert results["c5"]["runs"][0]["T"] == list(range(1, 10))
    assert set(results["c6"]["training_law"]["params"]) == {"E", "X", "x", "Y", "y"}
    assert results["c6"]["unified_law"]["largest_budget_held_out"]["held_out_points"] > 0
    assert [p["seed"] for p in results["c7"]["pairs"]] == [0]
    assert results["c2"]["diverged_runs"] == 2 and all(r["diverged_at"] == 1 for r in results["c2"]["runs"])
    assert [row["signal"] for row in results["c2"]["signals"]][-1] == "any"
    assert results["dynamics"]["summary"]["probes"] == 3  # step 4 of both c1 runs and of the c5 run
    assert set(results["runtimes"]) == set(SMALLEST)
    # a second run of the script prints every claim and writes the same numbers
    assert load_report().main([str(tiny_lab), "--out", str(tmp_path), "--no-figures"]) == 0
    printed = capsys.readouterr().out
    for claim in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "Dyn", "Time"):
        assert f"\n{claim} " in f"\n{printed}", claim
    for claim, value in results.items():
        assert json.loads((tmp_path / "results" / f"{claim}.json").read_text()) == value, claim


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: the figures need it (apt-get install chromium)")
def test_the_report_draws_its_figures_with_chromium(report_out):
    pngs = sorted(p.name for p in (report_out / "figures").glob("*.png"))
    assert pngs == sorted(f"{n}.png" for n in ("c1_grid", "c2_trajectories", "c3_depth_sampling", "c4_prelude_norm",
                                               "c5_test_time", "c6_isoflop", "c7_zoh", "dynamics"))
    assert all((report_out / "figures" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_reference_lab_replaces_the_claims_and_keeps_the_warning_benchmark(tmp_path):
    """`make reproduce`'s last part: the claim experiments of the reproduction lab, without
    checkpoints or writer locks, replace theirs in the reference lab; the warning benchmark
    (trained by `make warnings`, not by the sweeps) stays, since REPORT.md §C2 is computed from it.
    The venv's commands are stand-ins that record their arguments."""
    venv, repro, ref, calls = tmp_path / "venv", tmp_path / "repro", tmp_path / "ref", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    for tool in ("stabilitylab", "python"):
        (venv / "bin" / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (venv / "bin" / tool).chmod(0o755)
    (venv / ".installed").touch()  # newer than requirements.txt: make takes the venv as built
    claims = ["quick", *SMALLEST]
    for name in claims:
        run = repro / name / "seed=0"
        (run / "checkpoints").mkdir(parents=True)
        (run / "run.db").write_text("new")
        (run / "writer.lock").touch()
        (run / "checkpoints" / "step_000010.pt").touch()
    (ref / "c1_stability_grid" / "stale-run").mkdir(parents=True)
    (ref / "c2_late_divergence" / "seed=0").mkdir(parents=True)
    (ref / "c2_late_divergence" / "seed=0" / "run.db").write_text("benchmark")

    subprocess.run(["make", "-s", "-C", str(REPO), "reference-lab", f"VENV={venv}", f"REPRO_LAB={repro}",
                    f"REFERENCE_LAB={ref}"], check=True, capture_output=True)

    assert (ref / "c2_late_divergence" / "seed=0" / "run.db").read_text() == "benchmark"
    assert not (ref / "c1_stability_grid" / "stale-run").exists()
    for name in claims:
        assert sorted(p.name for p in (ref / name / "seed=0").iterdir()) == ["run.db"], name
    assert calls.read_text().splitlines() == [f"stabilitylab compact {ref}", f"python experiments/report.py {ref}"]
