"""The trainer: exact resume, probes that change nothing, divergence as data, the
optimiser's groups and schedule, spike detection."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import stabilitylab as sl
from stabilitylab.experiment import load_experiment
from stabilitylab.store import RunWriter, open_run
from stabilitylab.config import DivergenceConfig, TrainConfig
from stabilitylab.analysis.divergence import DivergenceMonitor, SpikeDetector
from stabilitylab.train.optim import build_optimizers, lr_factor, parameter_roles
from stabilitylab.train.probes import analysis_probe, injection_spectrum
from stabilitylab.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"
TIMING = {"tokens_per_s", "wall_time"}  # wall-clock measurements: the only scalars allowed to differ


def tiny(cache, *sets):
    return load_experiment(TINY, [f"data.cache_dir={cache}", *sets])


def records(lab, run_id):
    """Everything a run recorded except wall-clock time, as comparable Python values."""
    run = open_run(run_id, lab)
    scalars = run.scalars()
    scalars = scalars[~scalars["name"].isin(TIMING)]
    spectra = run.spectra()
    events = run.events()
    return {
        "scalars": list(zip(scalars["step"], scalars["name"], scalars["value"])),
        "traces": {k: (t.steps.tolist(), t.values.tolist()) for k, t in run.traces().items()},
        "spectra": [(*row[:6], row[6].tolist()) for row in spectra.itertuples(index=False)],
        "evals": list(run.evals().itertuples(index=False)),
        "events": [(s, k, d) for s, k, d in zip(events["step"], events["kind"], events["detail"]) if k != "resume"],
    }


def train_killed_at_step_5(exp, lab, run_id: str, monkeypatch) -> None:
    """Train `run_id` until the store's log of step 5 raises KeyboardInterrupt (a kill
    mid-run: steps 1-4 and the checkpoints before are kept)."""
    log = RunWriter.log

    def killed_at_step_5(writer, step, values):
        if step == 5:
            raise KeyboardInterrupt
        log(writer, step, values)

    monkeypatch.setattr(RunWriter, "log", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(exp, lab, run_id, progress=False)
    monkeypatch.undo()


def test_a_resumed_run_records_exactly_what_an_uninterrupted_one_does(tmp_path, corpus_cache, monkeypatch):
    exp = tiny(corpus_cache)  # 6 steps, checkpoints at 3 and 6, probes every 2, eval every 3
    assert train(exp, tmp_path, "whole", progress=False) == "finished"
    train_killed_at_step_5(exp, tmp_path, "resumed", monkeypatch)
    interrupted = open_run("resumed", tmp_path).summary()
    assert (interrupted["status"], interrupted["last_step"]) == ("failed", 4)

    assert train(exp, tmp_path, "resumed", resume=True, progress=False) == "finished"
    whole, resumed = records(tmp_path, "whole"), records(tmp_path, "resumed")
    assert len(whole["scalars"]) > 6 * 15 and whole["spectra"] and whole["traces"] and whole["evals"]
    assert resumed == whole
    assert "resume" in set(open_run("resumed", tmp_path).events()["kind"])


def test_probes_on_or_off_leave_the_training_curve_bit_for_bit_the_same(tmp_path, corpus_cache):
    train(tiny(corpus_cache, "probes.trace_every=1", "probes.spectrum_every=1", "probes.analysis_every=2"),
          tmp_path, "on", progress=False)
    train(tiny(corpus_cache, "probes.trace_every=0", "probes.spectrum_every=0"), tmp_path, "off", progress=False)
    on, off = open_run("on", tmp_path), open_run("off", tmp_path)
    assert len(on.spectra()) == 6 and len(off.spectra()) == 0 and not off.traces()
    analysis = on.analysis()
    assert analysis.groupby("name")["step"].apply(list).to_dict() == {
        "jacobian_radius": [2, 4, 6], "jacobian_moduli": [2, 4, 6], "lyapunov": [2, 4, 6]}
    assert all(len(v) == 8 for v in analysis[analysis["name"] == "lyapunov"]["values"])
    names = ["loss", "grad_norm", "grad_norm/core", "h_T_norm", "h_T_norm_mean"]
    assert on.scalars(names).equals(off.scalars(names))
    assert on.evals().equals(off.evals())


def test_an_exploding_loop_ends_as_diverged_with_its_records_and_last_good_checkpoint(tmp_path, corpus_cache):
    # a free diagonal Ā at LR 10: after one step ρ(Ā) ≈ 10 and ‖h_T‖ explodes
    exp = tiny(corpus_cache, "model.injection=free-diagonal", "train.lr=10.0", "train.warmup_steps=0",
               "train.checkpoint_every=1")
    assert train(exp, tmp_path, "boom", progress=False) == "diverged"
    run = open_run("boom", tmp_path)
    status = run.status()
    assert status["status"] == "diverged" and status["step"] == 2 and "‖h_T‖" in status["reason"]
    loss = run.scalars(["loss"])
    assert loss["step"].tolist() == [1, 2] and np.isfinite(loss["value"]).all()
    assert run.scalars(["h_T_norm"])["value"].iloc[-1] > 1e4
    assert run.spectra()["rho"].iloc[-1] > 1  # the probes ran at the divergence step
    assert "divergence" in set(run.events()["kind"])
    checkpoints = run.checkpoints()
    assert set(checkpoints["step"]) == {1}  # the last good one, nothing written after it
    weights = load_file(checkpoints["path"][checkpoints["path"].str.endswith(".safetensors")].iloc[0])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert train(exp, tmp_path, "boom", resume=True, progress=False) == "diverged"  # a result: left alone
    assert open_run("boom", tmp_path).status()["time"] == status["time"]


def test_record_mode_logs_the_crossing_once_keeps_training_and_ends_as_diverged(tmp_path, corpus_cache):
    exp = tiny(corpus_cache, "divergence.max_state_norm=1.0", "divergence.action='record'")
    assert train(exp, tmp_path, "recorded", progress=False) == "diverged"
    run = open_run("recorded", tmp_path)
    events = run.events()
    divergence = events[events["kind"] == "divergence"]
    assert divergence["step"].tolist() == [1] and "recorded" in divergence["detail"].iloc[0]
    summary = run.summary()
    assert summary["last_step"] == 6 and (summary["status"], summary["status_step"]) == ("diverged", 1)
    assert "trained on to step 6" in summary["status_reason"]


def test_non_finite_loss_or_gradient_is_terminal_even_when_recording():
    monitor = DivergenceMonitor(DivergenceConfig(action="record"))
    assert monitor.check(1, math.nan, 1.0, 1.0).stop == "loss is nan"
    assert monitor.check(2, 2.0, math.inf, 1.0).stop == "gradient norm is inf"
    assert monitor.check(3, 2.0, 1.0, math.nan).stop is None  # a NaN state counts as crossing the bound ...
    assert monitor.crossed == {"max_state_norm"} and monitor.first[0] == 3  # ... recorded, not terminal


def test_a_spike_is_a_loss_far_above_the_rolling_median():
    rng = np.random.default_rng(0)
    detector = SpikeDetector(window=50, k=6.0)
    flagged = [detector.update(2.0 + 0.01 * x) for x in rng.standard_normal(50)]
    assert not any(flagged)  # filling the window flags nothing
    assert detector.update(2.5) is not None
    assert detector.update(2.0) is None
    assert detector.update(math.nan) is None and math.nan not in detector.losses


def test_a_steadily_falling_loss_has_no_spikes():
    detector = SpikeDetector(window=20, k=6.0)
    assert not any(detector.update(5.0 * math.exp(-i / 50)) for i in range(300))


def test_the_trapezoid_warms_up_holds_then_cools_down_linearly_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, cooldown_fraction=0.2, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(1, 101)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert all(x == 1.0 for x in f[9:80])
    assert np.allclose(np.diff(f[79:]), -0.9 / 20) and f[-1] == pytest.approx(0.1)


def test_the_cosine_schedule_ends_at_the_floor():
    cfg = TrainConfig(steps=100, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(1, 101)]
    assert f[0] == pytest.approx(1.0, abs=1e-3) and f[-1] == pytest.approx(0.1) and np.all(np.diff(f) <= 0)


def test_no_weight_decay_for_the_injection_the_readout_and_norms():
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny", injection="concat"))
    (adamw,) = build_optimizers(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = ({id(p) for p in g["params"]} for g in adamw.param_groups)
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and adamw.param_groups[1]["weight_decay"] == 0.0
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    for p in [*model.injection.parameters(), model.readout.weight, model.prelude_norm.weight, model.ln_f.weight]:
        assert id(p) in no_decay
    for p in [model.wte.weight, model.core[0].attn.qkv.weight, model.coda[0].mlp.fc.weight]:
        assert id(p) in decay


def test_muon_takes_the_2d_block_weights_and_adamw_the_rest():
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny"))
    adamw, muon = build_optimizers(model, TrainConfig(optimizer="muon"))
    in_muon = {id(p) for p in muon.param_groups[0]["params"]}
    assert id(model.core[0].mlp.fc.weight) in in_muon and id(model.prelude[0].attn.proj.weight) in in_muon
    assert id(model.wte.weight) not in in_muon and id(model.readout.weight) not in in_muon
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
    roles = parameter_roles(model)
    assert sum(len(ps) for ps in roles.values()) == len(list(model.parameters()))


def test_training_with_muon_and_gradient_accumulation_runs(tmp_path, corpus_cache):
    exp = tiny(corpus_cache, "train.optimizer='muon'", "train.grad_accum=2", "train.steps=2",
               "train.schedule='cosine'")
    assert train(exp, tmp_path, "muon", progress=False) == "finished"
    assert np.isfinite(open_run("muon", tmp_path).scalars(["loss"])["value"]).all()


def test_gradient_accumulation_gives_the_loss_of_the_whole_batch(tmp_path, corpus_cache):
    one = tiny(corpus_cache, "train.steps=2")
    two = tiny(corpus_cache, "train.steps=2", "train.grad_accum=2")
    train(one, tmp_path, "one", progress=False)
    train(two, tmp_path, "two", progress=False)
    a, b = (open_run(r, tmp_path).scalars(["loss", "grad_norm"])["value"].to_numpy() for r in ("one", "two"))
    assert np.allclose(a, b, rtol=1e-5)


def test_old_checkpoints_are_pruned_to_keep_checkpoints(tmp_path, corpus_cache):
    train(tiny(corpus_cache, "train.checkpoint_every=1", "train.keep_checkpoints=2"), tmp_path, "k", progress=False)
    checkpoints = open_run("k", tmp_path).checkpoints()
    assert sorted(set(checkpoints["step"])) == [5, 6]
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == [
        "step_000000005.safetensors", "step_000000005.state.pt", "step_000000006.safetensors",
        "step_000000006.state.pt"]


def test_an_explicit_generator_makes_the_initial_state_reproducible():
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny"))
    draw = [model.draw_state((2, 5), "cpu", torch.float32, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*draw) and draw[0].shape == (2, 5, 32)
    std = model.cfg.std
    assert draw[0].abs().max() <= 3 * std


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_records(tmp_path, corpus_cache):
    """The real thing: kill -9 a CLI run after its first checkpoint, resume it, compare."""
    import signal
    import subprocess
    import sys
    import time

    sets = [f"data.cache_dir={corpus_cache}", "train.steps=40", "train.checkpoint_every=5", "train.eval_every=10"]
    train(tiny(corpus_cache, *sets[1:]), tmp_path, "whole", progress=False)
    command = [sys.executable, "-m", "stabilitylab", "train", str(TINY), *[a for s in sets for a in ("--set", s)],
               "--lab", str(tmp_path), "--run-id", "killed", "--no-progress"]
    process = subprocess.Popen(command, cwd=TINY.parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (tmp_path / "killed" / "run.db").exists() and len(open_run("killed", tmp_path).checkpoints()):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = open_run("killed", tmp_path).summary()
    assert killed["status"] == "running" and not killed["alive"] and killed["last_step"] < 40
    assert train(tiny(corpus_cache, *sets[1:]), tmp_path, "killed", resume=True, progress=False) == "finished"
    assert records(tmp_path, "killed") == records(tmp_path, "whole")


def test_the_spectrum_probe_gives_rho_and_the_norm_of_a_non_normal_transition():
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny", injection="concat"))
    with torch.no_grad():
        W1 = 0.5 * torch.eye(32)
        W1[0, 1] = 100.0  # non-normal: ρ = 0.5 but ‖Ā‖₂ ≈ 100
        model.injection.W[:, :32] = W1
    s = injection_spectrum(model)
    assert s.rho == pytest.approx(0.5) and s.norm_a == pytest.approx(100.0025, rel=1e-4)
    assert len(s.eigenvalues) == 32 and s.eigenvalues.dtype == torch.complex128
    assert s.norm_c == pytest.approx(float(torch.linalg.matrix_norm(model.readout.weight.detach().double(), 2)))


def test_the_analysis_probe_at_init_sees_the_linear_loop(tmp_path):
    """At init every core block is the identity, so F(h) = Ā h + B̄e: the loop Jacobian is
    Ā (ρ = 0.4472 for parcae) and every Lyapunov exponent is log 0.4472."""
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny", injection="parcae"))
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    h0 = model.draw_state((2, 8), "cpu", torch.float32, torch.Generator().manual_seed(1))
    with RunWriter.create(tmp_path, "r", {}, experiment="t") as writer:
        analysis_probe(model, tokens, h0, 4, 1, writer)
    values = open_run("r", tmp_path).analysis().set_index("name")["values"]
    assert values["jacobian_radius"][0] == pytest.approx(math.sqrt(1 / 5), rel=1e-4)
    assert np.allclose(values["lyapunov"], math.log(math.sqrt(1 / 5)), atol=1e-4)


def test_an_overflowed_loop_gets_a_probe_error_event_not_a_crash(tmp_path):
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny", injection="free-diagonal"))
    with torch.no_grad():
        model.injection.a.fill_(1e30)  # h overflows to inf within a few iterations
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    h0 = model.draw_state((2, 8), "cpu", torch.float32, torch.Generator().manual_seed(1))
    with RunWriter.create(tmp_path, "r", {}, experiment="t") as writer:
        analysis_probe(model, tokens, h0, 4, 7, writer)
    run = open_run("r", tmp_path)
    assert run.analysis().empty
    events = run.events()
    assert events["kind"].tolist() == ["probe_error"] and "non-finite" in events["detail"][0]


def test_the_gpt_baseline_trains_without_loop_records(tmp_path, corpus_cache):
    assert train(tiny(corpus_cache, "model.looped=false"), tmp_path, "gpt", progress=False) == "finished"
    run = open_run("gpt", tmp_path)
    names = set(run.scalar_names())
    assert {"loss", "grad_norm/core", "flops"} <= names and not names & {"h_T_norm", "depth_n_mean"}
    assert run.spectra().empty and not run.traces() and set(run.evals()["depth"]) == {1}
