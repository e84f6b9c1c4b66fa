"""`stabilitylab check` and `stabilitylab analyze` on every kind of target: runs trained
through the trainer at a pushed learning rate (conftest.PUSHED_RUNS), checkpoint files and
parcae_lm directories; exit codes 0 / 1 / 2, JSON and JUnit outputs, and the analysis
recorded where the dashboard reads it."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from stabilitylab.cli import main
from stabilitylab.config import ModelConfig
from stabilitylab.model import STABLE_BY_CONSTRUCTION, LoopedLM
from stabilitylab.formats.parcae_lm import save_parcae_checkpoint
from stabilitylab.store import open_run
from stabilitylab.targets import TargetError, load_target
from test_imports import build_reference, needs_ref, parcae_lm  # the authors' models, if the ref is set

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BOUNDS = ROOT / "checks" / "bounds.toml"
# a small parcae_lm-expressible model (value embeddings where parcae_lm applies them)
SMALL = dict(vocab_size=96, block_size=32, d_model=64, n_heads=2, n_prelude=1, n_core=2, n_coda=1,
             mean_recurrence=4, backprop_depth=2, value_embed_layers=(1, 3))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def parcae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_parcae_checkpoint(LoopedLM(ModelConfig(**SMALL)), tmp_path_factory.mktemp("parcae") / "small")


@pytest.fixture(scope="module")
def exploding_dir(tmp_path_factory) -> Path:
    """A concat model with Ā = 1e10·I: its state overflows float32 within a few iterations."""
    torch.manual_seed(0)
    model = LoopedLM(ModelConfig(**SMALL, injection="concat"))
    with torch.no_grad():
        model.injection.W[:, :64] = 1e10 * torch.eye(64)
    return save_parcae_checkpoint(model, tmp_path_factory.mktemp("exploding") / "concat")


# ---- check: runs trained through the trainer -----------------------------------------------------------

@pytest.mark.parametrize("run_id", sorted(STABLE_BY_CONSTRUCTION))
def test_runs_of_injections_stable_by_construction_pass_every_bound_after_pushed_training(capsys, pushed_lab,
                                                                                          run_id):
    code, out, _ = cli(capsys, "check", run_id, "--lab", pushed_lab, "--bounds", BOUNDS)
    assert code == 0, out
    assert f"check of {run_id} (step 6)" in out and "all 7 bounds hold" in out


@pytest.mark.parametrize("run_id", ["concat", "free-diagonal"])
def test_runs_of_unconstrained_injections_fail_after_pushed_training(capsys, pushed_lab, run_id):
    """Measured: concat ρ 2.53, ‖h_12‖/‖h_3‖ 4290, ρ(∂F/∂h) 2.53, λ₁ +0.38; free-diagonal ρ 1.55,
    growth 26.7, ρ(∂F/∂h) 1.56, λ₁ +0.32 (and its norms and depth loss fail too)."""
    code, out, _ = cli(capsys, "check", run_id, "--lab", pushed_lab, "--bounds", BOUNDS, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["passed"] is False
    failed = {r["name"]: r for r in doc["results"] if not r["passed"]}
    assert {"rho_margin", "max_state_growth", "max_jacobian_radius", "max_lyapunov"} <= set(failed), sorted(failed)
    rho = failed["rho_margin"]
    assert rho["measured"] > 1 and rho["allowed"] == 1.0 and rho["margin"] < 0 and rho["relation"] == "<"


def test_the_failure_table_and_junit_show_measured_against_allowed(capsys, pushed_lab, tmp_path):
    junit = tmp_path / "reports" / "check.xml"
    junit.parent.mkdir()
    code, out, _ = cli(capsys, "check", "concat", "--lab", pushed_lab, "--bounds", BOUNDS, "--junit", junit)
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("rho_margin"))
    assert "ρ(Ā) in bfloat16" in row and "< 1" in row and "FAIL" in row
    root = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert len(cases) == 7 and root.find("testsuite").get("failures") == str(out.count("FAIL"))
    message = cases["rho_margin"].find("failure").get("message")
    assert message.startswith("ρ(Ā) in bfloat16 = 2.") and message.endswith("allowed < 1")
    assert cases["max_readout_norm"].find("failure") is None


def test_a_checkpoint_step_can_be_chosen_and_a_missing_one_is_refused(capsys, pushed_lab):
    code, out, _ = cli(capsys, "check", "concat", "--lab", pushed_lab, "--bounds", BOUNDS, "--checkpoint", 3,
                       "--json")
    assert code == 1 and json.loads(out)["target"] == "concat (step 3)"
    code, _, err = cli(capsys, "check", "concat", "--lab", pushed_lab, "--bounds", BOUNDS, "--checkpoint", 4)
    assert code == 2 and "has no checkpoint of step 4 (indexed steps: 3, 6)" in err


def test_a_checkpoint_file_is_a_target_inside_its_run_or_beside_its_config(capsys, pushed_lab, tmp_path):
    run = open_run("parcae-zoh", pushed_lab)
    weights = pushed_lab / "parcae-zoh" / "checkpoints" / "step_000000003.safetensors"
    inside = load_target(weights)
    assert (inside.kind, inside.step, inside.run.id, inside.label) == ("checkpoint", 3, "parcae-zoh",
                                                                       "parcae-zoh (step 3)")
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(weights, loose / "weights.safetensors")
    with pytest.raises(TargetError, match="outside a run has no model config.*config.json beside it"):
        load_target(loose / "weights.safetensors")
    shutil.copy(run.path / "config.json", loose)
    target = load_target(loose / "weights.safetensors")
    assert (target.kind, target.step, target.run) == ("checkpoint", None, None)
    assert torch.equal(target.model.injection.A_log, inside.model.injection.A_log)
    code, out, _ = cli(capsys, "check", loose / "weights.safetensors", "--bounds", BOUNDS)
    assert code == 0 and "all 7 bounds hold" in out


@pytest.mark.parametrize("breakage, says", [
    (lambda p, lab: p.write_bytes(b"not safetensors"), "cannot read it as safetensors weights"),
    (lambda p, lab: p.unlink(), "is not a run directory, a run id in lab"),
    (lambda p, lab: shutil.copy(lab / "concat" / "checkpoints" / "step_000000006.safetensors", p),
     "the weights do not fit the run's [model] config"),  # concat weights, parcae config
])
def test_an_unreadable_target_exits_2_naming_the_problem(capsys, pushed_lab, tmp_path, breakage, says):
    file = tmp_path / "step.safetensors"
    shutil.copy(pushed_lab / "parcae" / "config.json", tmp_path)
    file.write_bytes(b"")
    breakage(file, pushed_lab)
    code, out, err = cli(capsys, "check", file, "--bounds", BOUNDS)
    assert code == 2 and out == "" and says in err and str(file) in err


@pytest.mark.parametrize("text, says", [
    ("[bounds]\nmax_lyapunof = 0.0\n", "bounds.max_lyapunof: unknown bound. allowed bounds: rho_margin"),
    ("[bounds]\nrho_margin = \n", "not valid TOML"),
])
def test_a_bad_bounds_file_exits_2_naming_the_problem(capsys, parcae_dir, tmp_path, text, says):
    bounds = tmp_path / "bounds.toml"
    bounds.write_text(text)
    code, _, err = cli(capsys, "check", parcae_dir, "--bounds", bounds)
    assert code == 2 and says in err and str(bounds) in err


# ---- parcae_lm directories -------------------------------------------------------------------------------

def test_a_parcae_lm_directory_is_checked_on_random_tokens_or_the_tokens_given(capsys, parcae_dir, tmp_path):
    code, out, _ = cli(capsys, "check", parcae_dir, "--bounds", BOUNDS, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["target"] == str(parcae_dir) and len(doc["results"]) == 7
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 96, size=(1, 17)))
    code, out, _ = cli(capsys, "check", parcae_dir, "--bounds", BOUNDS, "--tokens", tokens, "--json")
    assert code == 0 and json.loads(out)["results"][3]["detail"] != doc["results"][3]["detail"]  # another batch
    np.save(tokens, np.full((1, 17), 96))
    code, _, err = cli(capsys, "check", parcae_dir, "--bounds", BOUNDS, "--tokens", tokens)
    assert code == 2 and "outside the model's vocabulary 0..95" in err
    code, _, err = cli(capsys, "check", parcae_dir, "--bounds", BOUNDS, "--checkpoint", 3)
    assert code == 2 and "a parcae_lm directory holds one checkpoint" in err


def test_an_exploding_parcae_lm_model_fails_check_and_analyze(capsys, exploding_dir):
    code, out, _ = cli(capsys, "check", exploding_dir, "--bounds", BOUNDS, "--json")
    results = {r["name"]: r for r in json.loads(out)["results"]}
    assert code == 1 and results["rho_margin"]["measured"] > 1e9
    assert results["max_jacobian_radius"]["measured"] is None and "error" in results["max_jacobian_radius"]["detail"]
    code, out, _ = cli(capsys, "analyze", exploding_dir, "--jacobian")
    assert code == 1 and "no analysis: " in out


def test_the_console_script_exits_with_the_verdict(exploding_dir, tmp_path):
    junit = tmp_path / "check.xml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a small model: one thread is fastest on a shared machine
    done = subprocess.run([Path(sys.executable).with_name("stabilitylab"), "check", exploding_dir, "--bounds",
                           BOUNDS, "--junit", junit], capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr
    assert ET.parse(junit).getroot().find("testsuite").get("failures") != "0"


@needs_ref
def test_a_directory_written_by_parcae_lm_itself_is_checked_against_its_own_parameters(capsys, tmp_path):
    """ρ(Ā), ‖B̄‖₂ and ‖C‖₂ of a random parcae_lm model saved by their save_pretrained, from
    their parameters directly: Ā = exp(−softplus(dt_bias)·exp(A_log)), B̄ = softplus(dt_bias) ⊙ B."""
    ref = build_reference("ParcaeConfig", {}, seed=7)
    parcae_lm().save_pretrained(ref, tmp_path / "theirs")
    state = {k: v.detach().double() for k, v in ref.state_dict().items()}
    dt = torch.nn.functional.softplus(state["transformer.adapter.dt_bias"])
    rho = float(torch.exp(-dt * torch.exp(state["transformer.adapter.A_log"])).max())
    norm_b = float(torch.linalg.matrix_norm(dt[:, None] * state["transformer.adapter.B"], 2))
    norm_c = float(torch.linalg.matrix_norm(state["transformer.C.weight"], 2))
    bounds = tmp_path / "bounds.toml"
    bounds.write_text("[bounds]\nrho_margin = 0.0\nmax_input_norm = 100.0\nmax_readout_norm = 100.0\n"
                      "[settings]\ndtype = \"float64\"\n")
    code, out, _ = cli(capsys, "check", tmp_path / "theirs", "--bounds", bounds, "--json")
    measured = {r["name"]: r["measured"] for r in json.loads(out)["results"]}
    assert code == 0
    assert measured["rho_margin"] == pytest.approx(rho, rel=1e-6)  # our float32 transition, read in float64
    assert measured["max_input_norm"] == pytest.approx(norm_b, rel=1e-6)
    assert measured["max_readout_norm"] == pytest.approx(norm_c, rel=1e-6)


# ---- analyze ----------------------------------------------------------------------------------------------

def test_analyze_reproduces_the_trainers_analysis_probe_at_each_checkpoint(capsys, pushed_lab):
    run = open_run("parcae", pushed_lab)  # trained with probes.analysis_every = 3: probes at the checkpoint steps
    probed = {(n, s): v for n, s, v in run.analysis().itertuples(index=False)}
    assert {s for _, s in probed} == {3, 6}
    code, out, _ = cli(capsys, "analyze", "parcae", "--lab", pushed_lab, "--all-checkpoints")
    assert code == 0 and "parcae (step 3): depth 6, batch 2×32" in out and "recorded in" in out
    analysed = {(n, s): v for n, s, v in run.analysis().itertuples(index=False)}
    assert analysed.keys() == probed.keys()
    # the probe evaluates the last position against cached keys and values, analyze the whole
    # sequence: the same float32 JVPs up to rounding (measured: 1.4e-8 relative)
    for key, values in probed.items():
        np.testing.assert_allclose(analysed[key], values, rtol=1e-6, err_msg=str(key))
    assert run.results()["analyze"] == {"steps": [3, 6], "depth": 6, "position": -1, "batch": [2, 32]}
    assert run.status()["status"] == "finished"


def test_analyze_records_what_the_dashboard_reads_into_a_run_that_had_none(capsys, pushed_lab, tmp_path):
    lab = tmp_path / "lab"
    shutil.copytree(pushed_lab / "concat", lab / "concat")  # trained without the analysis probe
    run = open_run("concat", lab)
    assert run.analysis().empty
    code, out, _ = cli(capsys, "analyze", "concat", "--lab", lab, "--jacobian", "--depth", 4, "--batch", 1,
                       "--out", tmp_path / "a.json")
    assert code == 0 and "Lyapunov" not in out
    table = run.analysis()
    assert sorted(set(table["name"])) == ["jacobian_moduli", "jacobian_radius"] and set(table["step"]) == {6}
    radius = table[table["name"] == "jacobian_radius"]["values"].iloc[0][0]
    assert radius > 1  # the pushed concat loop expands
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["results"][0]["jacobian"]["radius"] == pytest.approx(radius, rel=1e-12)
    assert (doc["results"][0]["depth"], doc["results"][0]["batch"]) == (4, [1, 32])


def test_analyze_on_a_parcae_lm_directory_prints_and_writes_json_only(capsys, parcae_dir, tmp_path):
    before = sorted(p.name for p in parcae_dir.iterdir())
    code, out, _ = cli(capsys, "analyze", parcae_dir, "--seq-len", 16, "--out", tmp_path / "a.json")
    assert code == 0 and "depth 8, batch 2×16" in out and "recorded" not in out
    doc = json.loads((tmp_path / "a.json").read_text())["results"][0]
    assert doc["step"] is None and doc["jacobian"]["radius"] == pytest.approx(0.4472136, rel=1e-5)  # identity core
    assert doc["lyapunov"]["exponents"][0] == pytest.approx(np.log(0.4472136), rel=1e-4)
    assert sorted(p.name for p in parcae_dir.iterdir()) == before


def test_analyze_refuses_contradictory_or_impossible_requests(capsys, pushed_lab, parcae_dir):
    code, _, err = cli(capsys, "analyze", "parcae", "--lab", pushed_lab, "--all-checkpoints", "--checkpoint", 3)
    assert code == 2 and "--all-checkpoints: and --checkpoint both pick checkpoints" in err
    code, _, err = cli(capsys, "analyze", parcae_dir, "--all-checkpoints")
    assert code == 2 and "is not in a run" in err
    code, _, err = cli(capsys, "analyze", parcae_dir, "--position", 64)
    assert code == 2 and "position: 64 is outside a sequence of 32 tokens" in err
    code, _, err = cli(capsys, "analyze", parcae_dir, "--batch", 0)
    assert code == 2 and "--batch: must be ≥ 1, got 0" in err  # refused before anything is loaded


# ---- the released sizes on this machine ------------------------------------------------------------------

def measure_140m(directory: str) -> dict:
    """A random parcae-140m (out-projections random too, so the loop is not linear) exported to
    parcae_lm format, then `stabilitylab check` (ρ, ‖B̄‖, ‖C‖) and `analyze --jacobian` at 1×64
    tokens, each in a fresh process: wall time and peak RSS."""
    import resource
    import time

    torch.manual_seed(0)
    cfg = ModelConfig.preset("parcae-140m", value_embed_layers=(1, 3, 5))
    model = LoopedLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.02)
    save_parcae_checkpoint(model, Path(directory) / "parcae-140m")
    del model
    bounds = Path(directory) / "bounds.toml"
    bounds.write_text("[bounds]\nrho_margin = 0.0\nmax_input_norm = 10.0\nmax_readout_norm = 10.0\n"
                      "[settings]\ndtype = \"bfloat16\"\n")
    script = Path(sys.executable).with_name("stabilitylab")
    commands = {"check": [script, "check", Path(directory) / "parcae-140m", "--bounds", bounds],
                "analyze_jacobian": [script, "analyze", Path(directory) / "parcae-140m", "--jacobian", "--batch", "1",
                                     "--seq-len", "64"]}
    out = {}
    for name, command in commands.items():
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_exit"] = done.returncode
        out[f"{name}_output"] = done.stdout
        out[f"{name}_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # max so far
    return out


@pytest.mark.slow
def test_the_140m_model_is_checked_and_analysed_on_cpu_within_memory(tmp_path):
    out = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, check=True)
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n140M:", json.dumps(numbers, indent=2, ensure_ascii=False))
    assert numbers["check_exit"] == 0 and numbers["analyze_jacobian_exit"] == 0
    assert numbers["analyze_jacobian_peak_rss_gib"] < 8


if __name__ == "__main__":
    print(json.dumps(measure_140m(sys.argv[1])))
