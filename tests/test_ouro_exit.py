"""Adaptive exit (analysis/exits.py, the `exit` verb) on Ouro itself: a random Ouro written in
its published layout, its learned gate under the authors' rule (exit at the first step whose
cumulative exit probability reaches q, the last trained step taking the rest) and Huginn's
criteria, each checked against a direct computation from OuroLoop.forward (the authors' loop
written out), not through the loop interface the analysis uses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from test_ouro import SMALL, save_sharded, write

from stabilitylab import formats
from stabilitylab.analysis import exits
from stabilitylab.cli import main
from stabilitylab.formats.ouro import exit_distribution

N = SMALL["total_ut_steps"]  # 4 trained steps
LAM = 0.3  # the forced gate: λ_t = 0.3 for every token and step
# q → first t with 1 − 0.7^t ≥ q (0.3, 0.51, 0.657, 0.76, ...), capped at N: 0.9 would need 7
FORCED = {0.2: 1, 0.5: 2, 0.6: 3, 0.9: N}


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """A random Ouro whose gate is forced to λ = LAM (weight 0, bias logit(LAM)): known exit steps."""
    path = tmp_path_factory.mktemp("ouro_exit") / "forced"
    model = write(path, seed=1)
    with torch.no_grad():
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(math.log(LAM / (1 - LAM)))
    save_sharded({k: v.clone() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def random_gate(tmp_path_factory):
    path = tmp_path_factory.mktemp("ouro_exit") / "random"
    write(path, seed=2)
    return path


def chunk(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    """A (batch, length + 1) token array: inputs chunk[:, :-1], next tokens chunk[:, 1:]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (batch, length + 1), generator=gen).numpy()


def direct(path, x: torch.Tensor, y: torch.Tensor, depth: int) -> dict[str, torch.Tensor]:
    """Per-token statistics (D, N) straight from OuroLoop.forward's states and gates."""
    model, _ = formats.load(path)
    with torch.no_grad():
        _, states, gates = model.forward(x, depth)
        h = [model.encode(x), *states]
        logp = [Fn.log_softmax(model.decode(s).reshape(-1, SMALL["vocab_size"]), -1) for s in h]
    flat = [s.reshape(-1, s.shape[-1]) for s in h]
    diff = torch.stack([(flat[t] - flat[t - 1]).norm(dim=-1) / flat[t].norm(dim=-1) for t in range(1, depth + 1)])
    kl = torch.stack([(logp[t].exp() * (logp[t] - logp[t - 1])).sum(-1) for t in range(1, depth + 1)])
    nll = torch.stack([-logp[t].gather(-1, y.reshape(-1, 1))[:, 0] for t in range(1, depth + 1)])
    pdf = exit_distribution(gates[:N]).reshape(-1, N)  # the authors' distribution over their N steps
    return {"latent": diff, "kl": kl, "nll": nll, "gate_cdf": pdf.cumsum(-1).T,
            "argmax": torch.stack([p.argmax(-1) for p in logp])}


def first(hit: torch.Tensor, last: int) -> torch.Tensor:
    """First t (1-based) where hit (D, N) holds, else `last`."""
    t = torch.arange(1, hit.shape[0] + 1)[:, None].expand_as(hit)
    return torch.where(hit, t, torch.full_like(t, last)).min(0).values


def between(values: torch.Tensor) -> float:
    """A threshold in the widest gap of the middle half of `values`: no token sits near it, so
    the two roundings (forward vs loop_map) cannot flip a comparison."""
    v = values.flatten().double().sort().values
    lo, hi = len(v) // 4, 3 * len(v) // 4
    gaps = v[lo + 1:hi + 1] - v[lo:hi]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-4
    return float((v[lo + i] + v[lo + i + 1]) / 2)


def test_the_exit_verb_on_ouro_exits_where_the_forced_gate_says_and_stops_at_the_trained_depth(forced, tmp_path,
                                                                                                 capsys):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, chunk())
    args = ["exit", forced, "--tokens", tokens, "--max-depth", 8, "--criterion", "gate",
            *[a for q in FORCED for a in ("--eps", q)], "--out", tmp_path / "gate.json"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "gate.json").read_text())
    x, y = torch.from_numpy(chunk()[:, :-1]), torch.from_numpy(chunk()[:, 1:])
    stats = direct(forced, x, y, 8)
    [gate] = report["curves"]
    assert gate["criterion"] == "gate" and [p["eps"] for p in gate["points"]] == list(FORCED)
    for point, t in zip(gate["points"], FORCED.values()):
        assert point["mean_depth"] == t and point["max_depth"] == t
        assert point["loss"] == pytest.approx(float(stats["nll"][t - 1].mean()), abs=1e-5)
    assert report["loss_by_depth"] == pytest.approx(stats["nll"].mean(1).tolist(), abs=1e-5)
    assert report["mu_rec"] == N and report["max_depth"] == 8


def test_the_exit_verb_measures_huginns_criteria_on_ouro_too(forced, tmp_path, capsys):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, chunk(seed=3))
    code = main(["exit", str(forced), "--tokens", str(tokens), "--max-depth", "6", "--out", str(tmp_path / "all.json")])
    out = capsys.readouterr().out
    assert code == 0 and "gate" in out and "predicted vs measured" in out
    curves = {c["criterion"]: c for c in json.loads((tmp_path / "all.json").read_text())["curves"]}
    assert set(curves) == set(exits.CRITERIA)
    assert all(1 <= p["mean_depth"] <= N for p in curves["gate"]["points"])  # the gate never runs past N


def test_gate_and_huginn_criteria_match_a_direct_computation_per_token(random_gate):
    x, y = torch.from_numpy(chunk(seed=4)[:, :-1]), torch.from_numpy(chunk(seed=4)[:, 1:])
    D = 6
    stats = direct(random_gate, x, y, D)
    model, _ = formats.load(random_gate)
    roll = exits.rollout(model, x, y, D)
    q = between(stats["gate_cdf"][:-1])  # the last step's cdf is 1 by construction
    expected = first(stats["gate_cdf"] >= q, N)
    assert exits.exit_depths(roll, "gate", q).tolist() == expected.tolist()
    assert 1 < expected.float().mean() < N  # the threshold splits tokens across steps
    for name in ("latent", "kl"):
        eps = between(stats[name])
        assert exits.exit_depths(roll, name, eps).tolist() == first(stats[name] < eps, D).tolist(), name
    same = stats["argmax"][1:] == stats["argmax"][:-1]  # argmax, k = 2: unchanged at t−1 and t
    two = torch.cat([torch.zeros_like(same[:1]), same[1:] & same[:-1]])
    assert exits.exit_depths(roll, "argmax", 2).tolist() == first(two, D).tolist()
    report = exits.measure(model, x, y, D, ("gate",), {"gate": (q,)})
    [point] = report.curves[0].points
    assert point.mean_depth == pytest.approx(float(expected.float().mean()))
    assert point.loss == pytest.approx(float(stats["nll"].gather(0, expected[None] - 1).mean()), abs=1e-5)


def test_at_the_authors_default_threshold_every_token_runs_the_trained_depth(random_gate):
    """q = 1.0 (early_exit_threshold's default): the cumulative probability reaches 1 only at
    the last trained step (up to float32 rounding, the authors' own)."""
    x, y = torch.from_numpy(chunk(seed=5)[:, :-1]), torch.from_numpy(chunk(seed=5)[:, 1:])
    model, _ = formats.load(random_gate)
    roll = exits.rollout(model, x, y, 8)
    stats = direct(random_gate, x, y, 8)
    assert exits.exit_depths(roll, "gate", model.exit_threshold).tolist() == first(stats["gate_cdf"] >= 1.0,
                                                                                    N).tolist()
