"""LoopMonitor in a plain PyTorch loop: what it records, that the lab's readers read it, that
its numbers are the trainer's, and that bad input never ends a training run."""

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab import records
from stabilitylab.analysis.events import analyse_run
from stabilitylab.cli import main
from stabilitylab.config import DivergenceConfig
from stabilitylab.monitor import LoopMonitor, MonitorConfig, TensorBoardSink, check_interface, linear_part
from stabilitylab.store import list_runs, open_run
from stabilitylab.train.probes import injection_spectrum

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(injection="parcae"):
    torch.manual_seed(0)
    return sl.LoopedLM(sl.ModelConfig.preset("tiny", injection=injection, zero_init_out=False))


def batches(steps, batch=4, seq=16):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 64, (batch, seq + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def plain_loop(monitor, model, steps=6, lr=1e-3):
    """The README's loop: the monitor is three of its lines."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    out_steps = []
    for step, (x, y) in enumerate(batches(steps), 1):
        out = model(x, y, trace=True)
        out.loss.backward()
        opt.step()
        out_steps.append(monitor.step(step, loss=out.loss, model=model, tokens=x, state=out.state, trace=out.trace))
        opt.zero_grad()
    return out_steps


def test_a_plain_loop_writes_a_run_that_the_labs_readers_read(tmp_path):
    model = tiny()
    every = MonitorConfig().radius_every
    with LoopMonitor(model, tmp_path, "plain", config=MonitorConfig(spectrum_every=2)) as monitor:
        steps = plain_loop(monitor, model, steps=every)
    runs = list_runs(tmp_path)
    assert list(runs["run_id"]) == ["plain"] and runs["status"][0] == "finished" and runs["last_step"][0] == every
    run = open_run("plain", tmp_path)
    names = set(run.scalar_names())
    assert {records.LOSS, records.GRAD_NORM, records.STATE_NORM, records.RADIUS_ESTIMATE,
            records.CONTRACTION_RATE, records.TOKENS} <= names
    assert list(run.spectra()["step"]) == list(range(2, every + 1, 2))
    report = analyse_run(run)
    assert report.divergence is None and report.outcomes()["any"] == "quiet"
    assert main(["events", str(run.path)]) == 0 and main(["runs", str(tmp_path)]) == 0
    radii = {i: s.values[records.RADIUS_ESTIMATE] for i, s in enumerate(steps, 1)
             if records.RADIUS_ESTIMATE in s.values}
    assert list(radii) == [every] and all(0 < r < 10 for r in radii.values())
    assert all(0 < s.values[records.CONTRACTION_RATE] < 10 for s in steps)


def test_the_monitor_records_the_trainers_numbers_for_the_same_model_and_state(tmp_path):
    """ρ(Ā), ‖Ā‖₂, ‖B̄‖₂ as the trainer's spectrum probe; ‖h_T‖ as the trainer's state_norms;
    the loss and ‖∇‖ as given."""
    from stabilitylab.train.probes import grad_norms, state_norms
    from stabilitylab.train.optim import parameter_roles

    model = tiny("concat")
    x, y = next(batches(1))
    out = model(x, y)
    out.loss.backward()
    with LoopMonitor(model, tmp_path, "same", config=MonitorConfig(spectrum_every=1)) as monitor:
        recorded = monitor.step(1, loss=out.loss, model=model, tokens=x, state=out.state).values
    trainer = injection_spectrum(model)
    spectrum = open_run("same", tmp_path).spectra().iloc[0]
    assert spectrum[records.RHO] == trainer.rho and spectrum[records.NORM_A] == trainer.norm_a
    assert spectrum[records.NORM_B] == pytest.approx(trainer.norm_b, rel=1e-12)
    norm_max, norm_mean = state_norms(out.state)
    assert recorded[records.STATE_NORM] == float(norm_max) and recorded[records.STATE_NORM_MEAN] == float(norm_mean)
    total = torch.nn.utils.get_total_norm(list(grad_norms(parameter_roles(model), x.device).values()))
    assert recorded[records.GRAD_NORM] == pytest.approx(float(total), rel=1e-6)


def test_the_radius_on_a_frozen_model_converges_to_the_analysis_probes_radius(tmp_path):
    from stabilitylab.analysis import loop_jacobian

    model = tiny("concat").double()
    x, _ = next(batches(1, batch=1))
    h0 = model.initial_state(model.encode(x), torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x, depth=3, h0=h0)
    dense = loop_jacobian(model, x, 3, position=-1, h0=h0, k=1, method="dense").radius
    model.train()
    with LoopMonitor(model, None, config=MonitorConfig(grad_norm=False, radius_every=1)) as monitor:
        radii = [monitor.step(s, model=model, tokens=x, state=out.state).values[records.RADIUS_ESTIMATE]
                 for s in range(1, 21)]
    assert radii[-1] == pytest.approx(dense, rel=0.01)


def test_without_a_state_the_monitor_runs_the_loop_on_its_probe_tokens(tmp_path):
    model = tiny()
    probe, _ = next(batches(1, batch=2))
    monitor = LoopMonitor(model, None, probe_tokens=probe, config=MonitorConfig(radius_every=1))
    before = torch.get_rng_state()
    values = monitor.step(1, loss=2.0).values
    assert math.isfinite(values[records.RADIUS_ESTIMATE])
    assert torch.equal(torch.get_rng_state(), before)  # the monitor's h_0 comes from its own generator


def test_sinks_get_every_value_and_tensorboard_gets_prefixed_scalars():
    seen, scalars = [], []

    class FakeSummaryWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

    model = tiny()
    monitor = LoopMonitor(model, None, config=MonitorConfig(radius_every=1),
                          sinks=[lambda step, values: seen.append((step, dict(values))),
                                 TensorBoardSink(writer=FakeSummaryWriter())])
    plain_loop(monitor, model, steps=2)
    assert [s for s, _ in seen] == [1, 2] and records.RADIUS_ESTIMATE in seen[0][1]
    assert ("loop/" + records.LOSS, seen[1][1][records.LOSS], 2) in scalars


def test_a_model_without_the_loop_interface_is_refused_at_attach(tmp_path):
    with pytest.raises(TypeError, match="loop interface.*loop_map"):
        LoopMonitor(torch.nn.Linear(2, 2), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing recorded


def test_ddp_and_compile_wrappers_are_looked_through():
    model = tiny()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = model

    assert check_interface(Wrapped()) is model
    A, B = linear_part(model)
    assert A.shape == (32,) and B.shape == (32, 32)


def test_a_non_finite_state_is_a_probe_error_event_not_a_crash(tmp_path):
    model = tiny()
    x, y = next(batches(1))
    out = model(x, y)
    state = out.state.detach().clone()
    state[0, -1, 0] = math.nan
    with LoopMonitor(model, tmp_path, "nan", config=MonitorConfig(radius_every=1)) as monitor:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            result = monitor.step(1, loss=out.loss, model=model, tokens=x, state=state)
        after = monitor.step(2, loss=out.loss, model=model, tokens=x, state=out.state)  # training went on
    assert records.RADIUS_ESTIMATE not in result.values and math.isfinite(after.values[records.RADIUS_ESTIMATE])
    events = open_run("nan", tmp_path).events()
    assert records.PROBE_ERROR in set(events["kind"])
    assert math.isnan(result.values[records.STATE_NORM])  # data, kept: ‖h_T‖ of an overflowed state


def test_a_non_finite_loss_is_a_divergence_and_the_step_says_stop(tmp_path):
    model = tiny()
    with LoopMonitor(model, tmp_path, "inf") as monitor:
        monitor.step(1, loss=2.0)
        result = monitor.step(2, loss=math.inf)
        monitor.step(3, loss=2.0)  # the user's loop went on: still recorded, status unchanged
    assert result.stop and open_run("inf", tmp_path).status()["status"] == "diverged"


def test_a_crossed_bound_is_recorded_and_the_run_ends_diverged_at_its_first_crossing(tmp_path):
    config = MonitorConfig(divergence=DivergenceConfig(max_state_norm=1e-3, action="record"))
    model = tiny()
    with LoopMonitor(model, tmp_path, "bound", config=config) as monitor:
        plain_loop(monitor, model, steps=3)
    status = open_run("bound", tmp_path).status()
    assert (status["status"], status["step"]) == ("diverged", 1)


def test_a_store_that_is_not_writable_is_a_warning_and_the_sinks_go_on(tmp_path):
    lab = tmp_path / "lab"
    lab.write_text("a file where the lab directory should be")  # unwritable for root too
    seen = []
    with pytest.warns(RuntimeWarning, match="not recording"):
        monitor = LoopMonitor(tiny(), lab, "ro", sinks=[lambda s, v: seen.append(s)])
    monitor.step(1, loss=2.0)
    monitor.close()
    assert seen == [1] and monitor.writer is None


def test_a_store_that_fails_mid_run_is_dropped_with_one_warning(tmp_path):
    model = tiny()
    monitor = LoopMonitor(model, tmp_path, "broken")
    monitor.step(1, loss=2.0)
    monitor.writer.flush_rows = 1  # write every row at once
    monitor.writer._con.close()  # the database goes away under the writer
    with pytest.warns(RuntimeWarning, match="stopped recording"):
        monitor.step(2, loss=2.0)
    assert monitor.writer is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.step(3, loss=2.0)  # no store, no more warnings
    monitor.close()


def test_an_exception_in_the_users_loop_marks_the_run_failed(tmp_path):
    with pytest.raises(KeyError):
        with LoopMonitor(tiny(), tmp_path, "oops") as monitor:
            monitor.step(1, loss=2.0)
            raise KeyError("the user's bug")
    assert open_run("oops", tmp_path).status()["status"] == "failed"


def test_a_model_without_a_linear_part_has_no_spectrum(tmp_path):
    model = tiny()
    model.linear_part = lambda: None  # the interface's answer for a loop without an injection (Ouro)
    with LoopMonitor(model, tmp_path, "ouro-like", config=MonitorConfig(spectrum_every=1)) as monitor:
        monitor.step(1, loss=2.0)
    assert open_run("ouro-like", tmp_path).spectra().empty
    assert np.isnan(list_runs(tmp_path)["max_rho"][0])


def test_the_transformers_callback_steps_the_monitor_with_the_logged_loss(tmp_path):
    """The hooks the transformers Trainer calls, called as it calls them, including a step
    that logs nothing (the real Trainer: tests/test_monitor_hf.py)."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from stabilitylab.monitor import trainer_callback

    model = tiny()
    probe, _ = next(batches(1, batch=1))
    monitor = LoopMonitor(model, tmp_path, "hf", probe_tokens=probe, config=MonitorConfig(radius_every=1))
    callback = trainer_callback(monitor)
    for step in (1, 2, 3, 4):
        state = SimpleNamespace(global_step=step)
        callback.on_step_end(None, state, None, model=model)  # the Trainer's order: step end, then log
        if step != 3:  # step 3 logs nothing (logging_steps > 1)
            callback.on_log(None, state, None, logs={records.LOSS: 3.0 - step / 10})
    callback.on_train_end(None, state, None)
    run = open_run("hf", tmp_path)
    loss = run.scalars([records.LOSS])
    assert run.status()["status"] == "finished" and run.summary()["last_step"] == 4
    assert dict(zip(loss["step"], loss["value"])) == {1: 2.9, 2: 2.8, 4: 2.6}
    assert math.isfinite(run.scalars([records.RADIUS_ESTIMATE])["value"].iloc[-1])


def test_a_run_recorded_by_the_monitor_holds_the_trainers_numbers(tmp_path, corpus_cache):
    """experiments/monitored.py is the trainer's step written as a plain loop: the same
    experiment recorded by the trainer (radius and contraction rate on) and by the monitor
    has the same loss, ‖∇‖, ‖h_T‖, radius estimate and contraction rate at every step, and
    the same divergence verdicts."""
    import sys

    from stabilitylab.experiment import load_experiment
    from stabilitylab.train.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from monitored import train_monitored

    exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml",
                          [f"data.cache_dir={corpus_cache}", "train.steps=4", "train.eval_every=0",
                           "train.checkpoint_every=0", "probes.radius_every=1", "probes.rate_every=1"])
    train(exp, tmp_path, "trainer", progress=False)
    train_monitored(exp, tmp_path, "monitor", MonitorConfig(radius_every=1))
    names = [records.LOSS, records.GRAD_NORM, records.STATE_NORM, records.STATE_NORM_MEAN, records.LR,
             records.RADIUS_ESTIMATE, records.CONTRACTION_RATE]
    by_trainer, by_monitor = (open_run(r, tmp_path).scalars(names).pivot(index="step", columns="name", values="value")
                              for r in ("trainer", "monitor"))
    assert len(by_trainer) == 4 and by_trainer.notna().all().all()
    pd.testing.assert_frame_equal(by_trainer, by_monitor, check_exact=True)
    assert open_run("monitor", tmp_path).status()["status"] == open_run("trainer", tmp_path).status()["status"]
