"""Adaptive exit (analysis/exits.py): known answers on linear contractions, the gate rule on a
stand-in gated model, and the `exit` / `trace` verbs on a small checkpoint of each family."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabilitylab.analysis import exits

N_TOKENS, D_STATE, VOCAB = 6, 4, 5


class LinearLoop(torch.nn.Module):
    """h ↦ a·h + b per token (a scalar a_i per token i), fixed point h* = b/(1−a) of norm
    ‖h*‖ = `scale`, started at h* + δ with δ ⟂ h*, ‖δ‖ = 1: the latent residual is exactly
    r_t = a^{t−1}(1−a), and ‖h_t‖ = ‖h*‖ up to a^{2t}/(2‖h*‖²). Optional gate λ_i per token."""

    mu_rec, mu_bwd, block_size, state_dim, vocab_size = 4, 4, N_TOKENS, D_STATE, VOCAB

    def __init__(self, a, scale=1e4, gate=None):
        super().__init__()
        self.a = torch.as_tensor(a, dtype=torch.float64)[None, :, None]
        star = torch.zeros(1, N_TOKENS, D_STATE, dtype=torch.float64)
        star[..., 0] = scale
        self.b = star * (1 - self.a)
        self.delta = torch.zeros_like(star)
        self.delta[..., 1] = 1.0
        self.star = star
        self.W = torch.randn(D_STATE, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        if gate is not None:
            self.lam = torch.as_tensor(gate, dtype=torch.float64)[None, :, None]

    def encode(self, tokens):
        return torch.zeros(*tokens.shape, 1, dtype=torch.float64)

    def initial_state(self, e, generator=None):
        return (self.star + self.delta).expand(e.shape[0], -1, -1).clone()

    def loop_map(self, e, tokens=None):
        return lambda h: self.a * h + self.b

    def decode(self, h, tokens=None):
        return (h / self.star[..., :1].abs()) @ self.W

    def linear_part(self):
        return None


class GatedLoop(LinearLoop):
    def exit_probability(self, h):
        return self.lam.expand(h.shape[0], -1, -1)[..., 0]


def tokens():
    x = torch.zeros(1, N_TOKENS, dtype=torch.long)
    return x, torch.arange(N_TOKENS)[None] % VOCAB


def closed_form(a: float, eps: float, scale: float) -> int:
    """First t with a^{t−1}(1−a)/scale < ε (‖h_t‖ = scale)."""
    x = math.log(eps * scale / (1 - a)) / math.log(a)
    return 1 + max(0, math.ceil(x))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.2, 0.9), min_size=N_TOKENS, max_size=N_TOKENS), st.floats(1e-8, 1e-5))
def test_latent_exit_of_a_linear_contraction_is_the_closed_form_and_the_prediction(a, eps):
    scale = 1e4
    xs = [math.log(eps * scale / (1 - ai)) / math.log(ai) for ai in a]
    if any(abs(x - round(x)) < 1e-6 for x in xs):  # on a step boundary ‖h_t‖'s 1e-8 wobble decides
        return
    roll = exits.rollout(LinearLoop(a, scale), *tokens(), depth=80)
    measured = exits.exit_depths(roll, "latent", eps)[0:].tolist()
    expected = [min(closed_form(ai, eps, scale), 80) for ai in a]
    assert measured == expected
    predicted, q = exits.predict_latent(roll, eps)
    assert predicted.tolist() == expected
    assert q.tolist() == pytest.approx(a, rel=1e-6)


def test_no_exit_predicted_or_measured_for_an_expanding_loop():
    roll = exits.rollout(LinearLoop([1.2] * N_TOKENS, scale=1.0), *tokens(), depth=10)
    assert exits.exit_depths(roll, "latent", 1e-3).tolist() == [10] * N_TOKENS
    assert exits.predict_latent(roll, 1e-3)[0].tolist() == [10] * N_TOKENS


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.05, 0.6), min_size=N_TOKENS, max_size=N_TOKENS), st.floats(0.3, 0.97))
def test_gate_exit_is_where_the_cumulative_exit_probability_reaches_q(lam, q):
    xs = [math.log(1 - q) / math.log(1 - x) for x in lam]
    if any(abs(x - round(x)) < 1e-6 for x in xs):
        return
    loop = GatedLoop([0.5] * N_TOKENS, gate=lam)
    loop.mu_rec = 200  # the gate's distribution spans the trained steps: make them all of D
    roll = exits.rollout(loop, *tokens(), depth=200)
    assert exits.exit_depths(roll, "gate", q).tolist() == [max(1, math.ceil(x)) for x in xs]
    loop.mu_rec = 4  # Ouro's last trained step takes the rest: every token is out by μ_rec, past it too
    roll = exits.rollout(loop, *tokens(), depth=10)
    assert exits.exit_depths(roll, "gate", q).tolist() == [min(4, max(1, math.ceil(x))) for x in xs]


def test_the_gate_rule_is_skipped_with_the_reason_on_a_model_without_a_gate():
    report = exits.measure(LinearLoop([0.5] * N_TOKENS), *tokens(), max_depth=8)
    assert "gate" in report.skipped and "gate" not in [c.criterion for c in report.curves]
    gated = exits.measure(GatedLoop([0.5] * N_TOKENS, gate=[0.3] * N_TOKENS), *tokens(), max_depth=8)
    assert "gate" in [c.criterion for c in gated.curves]


def test_argmax_rule_waits_k_unchanged_steps():
    roll = exits.rollout(LinearLoop([0.5] * N_TOKENS), *tokens(), depth=10)
    roll.argmax = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])[:, None]
    assert exits.exit_depths(roll, "argmax", 1).tolist() == [2]
    assert exits.exit_depths(roll, "argmax", 3).tolist() == [6]


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(0.2, 0.95), min_size=N_TOKENS, max_size=N_TOKENS))
def test_a_looser_threshold_never_exits_later_and_exit_loss_at_the_final_depth_is_the_full_loss(a):
    roll = exits.rollout(LinearLoop(a, scale=10.0), *tokens(), depth=12)
    for name, loose, tight in (("latent", 1e-2, 1e-4), ("kl", 1e-3, 1e-6), ("entropy", 1e-3, 1e-6)):
        assert (exits.exit_depths(roll, name, loose) <= exits.exit_depths(roll, name, tight)).all()
    full = torch.full((N_TOKENS,), 12)
    assert exits.exit_loss(roll, full) == pytest.approx(float(roll.nll[-1].mean()))


def test_report_renders_and_serialises():
    report = exits.measure(LinearLoop([0.3, 0.5, 0.6, 0.7, 0.8, 0.9], scale=10.0), *tokens(), max_depth=16)
    assert len(report.loss_by_depth) == 16 and report.predictions
    assert "predicted vs measured" in report.text()
    import json
    json.dumps(report.to_dict())


# ---- the verbs on every family and on a trained run ------------------------------------------------

def cli(capsys, *argv):
    from stabilitylab.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A small random checkpoint of each family in its published layout."""
    from test_hrm_text import reference
    from test_huginn import write as write_huginn

    from stabilitylab.config import ModelConfig
    from stabilitylab.formats.parcae_lm import save_parcae_checkpoint
    from stabilitylab.model import LoopedLM

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    small = dict(vocab_size=96, block_size=32, d_model=64, n_heads=2, n_prelude=1, n_core=2, n_coda=1,
                 mean_recurrence=4, backprop_depth=2)
    dirs = {"parcae_lm": save_parcae_checkpoint(LoopedLM(ModelConfig(**small)), root / "parcae")}
    write_huginn(root / "huginn")
    dirs["huginn"] = root / "huginn"
    reference().save_pretrained(root / "hrm")
    dirs["hrm_text"] = root / "hrm"
    return dirs


@pytest.mark.parametrize("family", ["parcae_lm", "huginn", "hrm_text"])
def test_exit_and_trace_run_on_a_random_checkpoint_of_each_family(capsys, family_dirs, family, tmp_path):
    import json

    path = family_dirs[family]
    code, out, err = cli(capsys, "exit", path, "--max-depth", 6, "--batch", 1, "--seq-len", 12,
                         "--out", tmp_path / "exit.json")
    assert code == 0, err
    assert "latent" in out and "predicted vs measured" in out and "gate: not measured" in out
    report = json.loads((tmp_path / "exit.json").read_text())
    assert report["max_depth"] == 6 and len(report["loss_by_depth"]) == 6
    assert all(1 <= t <= 6 for p in report["predictions"] for t in p["predicted"] + p["measured"])
    code, out, err = cli(capsys, "trace", path, "--depth", 3, "--batch", 1)
    assert code == 0, err
    assert out.count("\n") >= 5 and "rel. resid." in out


def test_exit_refuses_bad_flags_with_exit_2(capsys, family_dirs):
    path = family_dirs["parcae_lm"]
    assert cli(capsys, "exit", path, "--criterion", "nope")[0] == 2
    assert cli(capsys, "exit", path, "--criterion", "gate")[0] == 2  # no gate on this model
    assert cli(capsys, "exit", path, "--max-depth", 1)[0] == 2
    assert cli(capsys, "exit", path, "--eps", "-1")[0] == 2
    assert cli(capsys, "exit", path, "--criterion", "argmax", "--eps", "0.5")[0] == 2


def test_eps_sets_the_continuous_criteria_and_argmax_keeps_its_k_grid(capsys, family_dirs, tmp_path):
    import json

    code, _, err = cli(capsys, "exit", family_dirs["parcae_lm"], "--eps", "0.01", "--max-depth", 4, "--batch", 1,
                       "--seq-len", 8, "--out", tmp_path / "e.json")
    assert code == 0, err
    curves = {c["criterion"]: [p["eps"] for p in c["points"]] for c in json.loads((tmp_path / "e.json").read_text())["curves"]}
    assert curves["latent"] == curves["kl"] == curves["entropy"] == [0.01]
    assert curves["argmax"] == list(exits.DEFAULT_EPS["argmax"])


def test_exit_records_into_a_trained_run(capsys, pushed_lab):
    from stabilitylab import records
    from stabilitylab.store import open_run

    run_id = sorted(p.name for p in pushed_lab.iterdir() if p.is_dir())[0]
    code, out, err = cli(capsys, "exit", run_id, "--lab", pushed_lab, "--batch", 1, "--seq-len", 16)
    assert code == 0, err and "recorded in" in out
    run = open_run(run_id, pushed_lab)
    assert run.results()[records.EXIT_RESULT]["max_depth"] >= 2
    code, out, err = cli(capsys, "trace", run_id, "--lab", pushed_lab, "--depth", 2)
    assert code == 0, err
