"""Synthetic but realistic labs for the dashboard's tests and benchmark, written with RunWriter.

A Parcae run converges with ρ(Ā) < 1 and a bounded state; an unconstrained "concat" run
learns ρ(Ā) > 1 about 60% of the way in, its ‖h_T‖ grows to 1e12, it spikes, and it is
marked diverged. Seeds form groups (same sweep cell); one run is left 'running' with no
writer; one run directory holds a garbage run.db.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from stabilitylab.store import RunWriter

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "apps"
DASHBOARD = APPS / "dashboard.py"
if str(APPS) not in sys.path:  # the pages import `dashkit` from apps/, as `streamlit run` does
    sys.path.insert(0, str(APPS))

DEPTHS = (1, 2, 4, 8, 16)
TRACE_NAMES = ("state_norm_mean", "state_norm_max", "delta_norm_mean", "rel_residual", "cosine")
DIVERGED_AT = 1e12


def config(injection: str, lr: float, steps: int, mu_rec: int = 4) -> dict:
    return {"model": {"injection": injection, "d_model": 64, "d_state": 64, "n_heads": 4, "n_prelude": 1,
                      "n_core": 2, "n_coda": 1, "mean_recurrence": mu_rec, "backprop_depth": mu_rec // 2,
                      "prelude_norm": True, "vocab_size": 256},
            "train": {"lr": lr, "steps": steps, "batch_size": 8, "seq_len": 64}}


def write_run(lab: Path, run_id: str, *, injection: str, lr: float, seed: int, steps: int,
              probe_every: int = 10, eval_every: int = 50, n_eig: int = 32, depth: int = 8,
              experiment: str = "lr-sweep", finish: bool = True) -> None:
    """One run. 'concat' diverges (ρ crosses 1 at ~60%, ‖h_T‖ reaches 1e12 at ~85%);
    anything else converges. finish=False leaves it 'running' (writer closed, no status)."""
    rng = np.random.default_rng(seed * 7919 + len(injection))
    unstable = injection == "concat"
    mu_rec = 4
    writer = RunWriter.create(lab, run_id, config(injection, lr, steps, mu_rec), experiment=experiment,
                              sweep_cell=f"injection={injection},lr={lr:g}", seed=seed)
    step = np.arange(1, steps + 1)
    p = step / steps
    cross = int(steps * (0.6 + 0.03 * seed))  # ρ(Ā) = 1 here
    end = int(steps * (0.85 + 0.03 * seed)) if unstable else steps + 1  # ‖h_T‖ = 1e12 here
    loss = 1.4 + 2.6 * np.exp(-5 * p) + 0.03 * rng.standard_normal(steps)
    if unstable:
        rho = 0.85 + 0.15 * step / cross
        growth = math.log(DIVERGED_AT / 10) / max(end - cross, 1)
        h_norm = 10 * np.exp(growth * np.clip(step - cross, 0, None)) * (1 + 0.02 * rng.random(steps))
        loss += np.where(step > cross, 0.5 * (step - cross) / steps, 0)
    else:
        rho = 0.45 + 0.45 * np.sqrt(p)
        h_norm = 8 + 2 * p + 0.1 * rng.random(steps)
    spikes = set(rng.choice(np.arange(cross, end), 3, replace=False).tolist()) if unstable else set()
    grad = 1 / (1 + 3 * p) + 0.05 * rng.random(steps) + (np.log10(h_norm) - 1) * unstable
    tokens = step * 8 * 64
    try:
        for i, s in enumerate(step.tolist()):
            value = loss[i] + (2.0 if s in spikes else 0.0)
            if s == end:
                value, h_norm[i] = math.nan, DIVERGED_AT
            writer.log(s, {"loss": value, "lr": lr * min(1.0, s / 20), "grad_norm": grad[i],
                           "grad_norm/core": 0.6 * grad[i], "tokens_per_s": 4000 + 100 * rng.random(),
                           "depth_n": 2, "depth_k": 2, "wall_time": 0.05 * s, "h_T_norm": h_norm[i],
                           "h_T_norm_mean": 0.6 * h_norm[i], "flops": 6 * 2e5 * tokens[i], "tokens": tokens[i]})
            if s in spikes:
                writer.log_event(s, "spike", f"loss {value:.3f} > 3 × running median")
            if s % probe_every == 0:
                t = np.arange(1, depth + 1)
                norms = h_norm[i] * (rho[i] ** (t - depth) if unstable else 1 - 0.5 * 0.45 ** t)
                writer.log_trace(s, {"state_norm_mean": 0.7 * norms, "state_norm_max": norms,
                                     "delta_norm_mean": np.abs(np.diff(norms, prepend=0.0)),
                                     "rel_residual": np.abs(np.diff(norms, prepend=0.0)) / norms,
                                     "cosine": 1 - 0.5 * 0.5 ** t, "e_norm_mean": 1.0, "h0_norm_mean": 0.2})
                phase = np.exp(2j * np.pi * rng.random(n_eig)) if unstable else np.ones(n_eig)
                eig = rho[i] * np.linspace(1.0, 0.3, n_eig) * phase
                writer.log_spectrum(s, eig, norm_a=rho[i] * (1.2 if unstable else 1.0), norm_b=0.8 + 0.1 * p[i],
                                    norm_c=1.0, norm_e=8.0 + p[i])
            if s % eval_every == 0:
                l_inf = loss[i] - 0.05
                for d in DEPTHS:
                    writer.log_eval(s, d, {"val_loss": l_inf + 1.5 * math.exp(-0.7 * d)})
                writer.log_analysis("jacobian_radius", s, rho[i] * 1.05)
                writer.log_analysis("lyapunov", s, np.log(rho[i]) + np.linspace(0, -1.5, 6))
            if s == end:
                writer.log_event(s, "divergence", f"‖h_T‖ = {DIVERGED_AT:.0e}")
                writer.set_status("diverged", s, f"‖h_T‖ ≥ {DIVERGED_AT:.0e} (loss is NaN)")
                break
        if not unstable:
            writer.save_result("depth_law", {"form": "exp", "L_inf": float(loss[-1] - 0.05), "Z": 1.5, "z": 0.7})
        if finish and writer.status == "running":
            writer.set_status("finished")
    finally:
        writer.close()


def build_lab(lab: Path, steps: int = 200) -> Path:
    """The tests' lab: Parcae and concat at one LR, two seeds each, a running run, a corrupt run."""
    for injection in ("parcae", "concat"):
        for seed in (0, 1):
            write_run(lab, f"lr-sweep/{injection}-lr4e-4-s{seed}", injection=injection, lr=4e-4, seed=seed,
                      steps=steps)
    write_run(lab, "live/parcae-running", injection="parcae", lr=2e-4, seed=0, steps=steps // 2,
              experiment="live", finish=False)
    broken = lab / "broken" / "garbage"
    broken.mkdir(parents=True)
    (broken / "run.db").write_bytes(b"this is not a database" * 50)
    return lab


def build_bench_lab(lab: Path, runs: int = 50, steps: int = 5000) -> Path:
    """The benchmark's lab: `runs` finished or diverged runs with full probes every 10 steps."""
    for i in range(runs):
        injection, lr = ("parcae", "concat")[i % 2], 1e-4 * (1 + i % 5)
        write_run(lab, f"sweep/{injection}-lr{lr:.0e}-s{i // 10}", injection=injection, lr=lr, seed=i // 10,
                  steps=steps, probe_every=10, eval_every=500, n_eig=128)
    return lab
