"""The figures of experiments/REPORT.md: plotly figures built from report.py's numbers,
written as PNG by kaleido driving Debian's chromium (never a downloaded browser).

    figs = {"c1_grid": outcome_grid(cells), ...}
    write(figs, "experiments/figures")      # → a line saying what was written, or why not
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

CHROMIUM = "/usr/bin/chromium"
OUTCOME_COLOUR = {"converged": "#2ca02c", "spiking": "#ff7f0e", "diverged": "#d62728"}
INJECTIONS = ["add", "concat", "free-diagonal", "parcae", "parcae-zoh"]
PALETTE = ["#1f77b4", "#d62728", "#9467bd", "#2ca02c", "#17becf", "#ff7f0e", "#8c564b", "#e377c2"]
LAYOUT = dict(template="plotly_white", font=dict(size=12), margin=dict(l=60, r=20, t=60, b=50))


def outcome_grid(cells: list[dict]) -> go.Figure:
    """C1: injection × learning rate, each cell coloured by its worst outcome and labelled
    with the seeds that diverged / spiked / converged."""
    lrs = sorted({c["lr"] for c in cells})
    injections = [i for i in INJECTIONS if any(c["injection"] == i for c in cells)]
    z, text = np.full((len(injections), len(lrs)), np.nan), [["" for _ in lrs] for _ in injections]
    for c in cells:
        i, j = injections.index(c["injection"]), lrs.index(c["lr"])
        z[i, j] = 2 if c["diverged"] else 1 if c["spiking"] else 0
        text[i][j] = f"{c['diverged']}/{c['seeds']} div<br>ρ≤{c['max_rho']:.2f}<br>loss {c['final_loss_mean']:.2f}"
    scale = [[0, OUTCOME_COLOUR["converged"]], [0.5, OUTCOME_COLOUR["spiking"]], [1, OUTCOME_COLOUR["diverged"]]]
    fig = go.Figure(go.Heatmap(z=z, x=[f"{lr:g}" for lr in lrs], y=injections, text=text, texttemplate="%{text}",
                               colorscale=scale, zmin=0, zmax=2, showscale=False, xgap=2, ygap=2))
    fig.update_layout(title="C1: outcome per injection × peak LR (green converged, orange spiking, red diverged)",
                      xaxis_title="peak learning rate", height=420, width=900, **LAYOUT)
    return fig


def stability_trajectories(trajectories: list[dict]) -> go.Figure:
    """C2: ρ(Ā), max ‖h_T‖ and loss over training for every injection, seed 0, at every LR
    (one row per LR)."""
    lrs = sorted({t["lr"] for t in trajectories})
    fig = make_subplots(rows=len(lrs) or 1, cols=3, shared_xaxes=True, vertical_spacing=0.03,
                        column_titles=["ρ(Ā)", "max ‖h_T‖", "training loss"],
                        row_titles=[f"lr {lr:g}" for lr in lrs])
    for t in trajectories:
        if t["seed"] != min(u["seed"] for u in trajectories):
            continue
        row = lrs.index(t["lr"]) + 1
        colour = PALETTE[INJECTIONS.index(t["injection"]) % len(PALETTE)]
        first = row == 1
        fig.add_scatter(x=t["rho_steps"], y=t["rho"], row=row, col=1, name=t["injection"], legendgroup=t["injection"],
                        line=dict(color=colour, width=1.2), showlegend=first)
        fig.add_scatter(x=t["h_steps"], y=t["h_T"], row=row, col=2, legendgroup=t["injection"],
                        line=dict(color=colour, width=1.2), showlegend=False)
        fig.add_scatter(x=t["h_steps"], y=t["loss"], row=row, col=3, legendgroup=t["injection"],
                        line=dict(color=colour, width=1.2), showlegend=False)
    for row in range(1, len(lrs) + 1):
        fig.add_hline(y=1, line=dict(dash="dot", color="black", width=1), row=row, col=1, layer="below")
        fig.add_hline(y=1e4, line=dict(dash="dot", color="black", width=1), row=row, col=2, layer="below")
        fig.update_yaxes(type="log", row=row, col=2)
        fig.update_yaxes(type="log", row=row, col=1)
    fig.update_layout(title="C2: ρ(Ā) (dotted: 1; add sits on it), max ‖h_T‖ (dotted: the 1e4 bound) and loss, "
                            "seed 0",
                      height=220 * max(len(lrs), 1) + 80, width=1100, **LAYOUT)
    return fig


def depth_sampling(runs: list[dict], groups: dict) -> go.Figure:
    """C3: training loss per run, and validation loss at each test depth per granularity
    (colour) and learning rate (dash)."""
    fig = make_subplots(rows=1, cols=2, column_titles=["training loss", "validation loss at test depth T (mean ± sd)"])
    colour = {"batch": "#d62728", "sequence": "#1f77b4", "token": "#2ca02c"}
    dashes = {lr: dash for lr, dash in zip(sorted({r["lr"] for r in runs}), ["solid", "dash", "dot", "dashdot"])}
    for r in runs:
        fig.add_scatter(y=r["loss"], x=list(range(1, len(r["loss"]) + 1)), row=1, col=1, opacity=0.6,
                        line=dict(color=colour.get(r["granularity"]), dash=dashes[r["lr"]], width=1),
                        name=f"{r['granularity']} lr {r['lr']:g} s{r['seed']}", showlegend=False)
    for name, g in groups.items():
        depths = list(g["val_loss_mean"])
        fig.add_scatter(x=depths, y=[g["val_loss_mean"][d] for d in depths], row=1, col=2, mode="lines+markers",
                        error_y=dict(array=[g["val_loss_std"][d] for d in depths]),
                        line=dict(color=colour.get(g["granularity"]), dash=dashes.get(g["lr"])),
                        name=f"per {name}: {g['spikes_total']} spikes")
    fig.update_xaxes(type="log", row=1, col=2, title_text="T")
    fig.update_layout(title="C3: per-batch vs per-sequence depth sampling (solid: lower LR, dashed: higher)",
                      height=420, width=1100, **LAYOUT)
    return fig


def prelude_norm(runs: list[dict]) -> go.Figure:
    """C4: ‖e‖ and max ‖h_T‖ over training, prelude norm on (solid) and off (dashed)."""
    fig = make_subplots(rows=1, cols=2, column_titles=["‖e‖ (mean per token)", "max ‖h_T‖"])
    lrs = sorted({r["lr"] for r in runs})
    for r in runs:
        colour = PALETTE[(lrs.index(r["lr"]) * 2 + r["seed"]) % len(PALETTE)]
        dash = "solid" if r["prelude_norm"] else "dash"
        name = f"norm {'on' if r['prelude_norm'] else 'off'}, lr {r['lr']:g}, s{r['seed']}"
        fig.add_scatter(x=r["e_steps"], y=r["e"], row=1, col=1, name=name, legendgroup=name,
                        line=dict(color=colour, dash=dash, width=1.2))
        fig.add_scatter(x=r["h_steps"], y=r["h_T"], row=1, col=2, legendgroup=name, showlegend=False,
                        line=dict(color=colour, dash=dash, width=1.2))
    fig.update_yaxes(type="log")
    fig.update_layout(title="C4: prelude norm on (solid) / off (dashed)", height=420, width=1100, **LAYOUT)
    return fig


def test_time(runs: list[dict]) -> go.Figure:
    """C5: validation loss against test depth T per model, with the four forms fitted on
    T ≤ μ_rec drawn out to 3·μ_rec."""
    from stabilitylab.analysis import scaling

    fig = go.Figure()
    dash = {"exp": "solid", "power1p": "dash", "power": "dot", "pure-power": "dashdot"}
    for i, r in enumerate(runs):
        colour = PALETTE[i % len(PALETTE)]
        fig.add_scatter(x=r["T"], y=r["L"], mode="markers", marker=dict(color=colour, size=6),
                        name=f"μ_rec {r['mu_rec']} s{r['seed']}")
        if not r["T"]:
            continue
        T = np.linspace(1, max(r["T"]), 200)
        for form, f in r["forms"].items():
            law = scaling.Fit.from_params(scaling.TEST_TIME_FORMS[form], **f["params"])
            fig.add_scatter(x=T, y=law.predict(T=T), mode="lines", line=dict(color=colour, dash=dash[form], width=1),
                            name=form, legendgroup=form, showlegend=i == 0)
        fig.add_vline(x=r["mu_rec"], line=dict(color=colour, dash="dot", width=1))
    fig.update_layout(title="C5: L(T), forms fitted on T ≤ μ_rec (dotted verticals), extrapolated to 3·μ_rec",
                      xaxis_title="test-time depth T", yaxis_title="validation loss (nats/byte)",
                      height=480, width=1000, **LAYOUT)
    return fig


def isoflop(runs: list[dict], points: list[dict], result: dict) -> go.Figure:
    """C6: loss at T = μ_rec against μ_rec per budget with the training law's prediction;
    and unified-law prediction against observation (largest budget held out)."""
    from stabilitylab.analysis import scaling

    fig = make_subplots(rows=1, cols=2, column_titles=["isoFLOP: L(T = μ_rec) vs μ_rec",
                                                       "unified law: predicted vs observed"])
    budgets = sorted({r["budget"] for r in runs})
    law = result.get("training_law", {})
    for i, b in enumerate(budgets):
        rs = sorted((r for r in runs if r["budget"] == b and r["L_mu"] is not None), key=lambda r: r["mu_rec"])
        colour = PALETTE[i % len(PALETTE)]
        fig.add_scatter(x=[r["mu_rec"] for r in rs], y=[r["L_mu"] for r in rs], mode="markers+lines", row=1, col=1,
                        line=dict(color=colour), name=f"C = {b:.2g}")
        if "params" in law and rs:
            fit = scaling.Fit.from_params(scaling.TRAINING, **law["params"])
            fig.add_scatter(x=[r["mu_rec"] for r in rs], y=fit.predict(N=[r["N"] for r in rs], D=[r["D"] for r in rs]),
                            mode="lines", line=dict(color=colour, dash="dot"), row=1, col=1, showlegend=False)
    unified = result.get("unified_law", {}).get("largest_budget_held_out")
    if unified and points:
        fit = scaling.Fit.from_params(scaling.UNIFIED, **unified["params"])
        top = max(budgets)
        for held in (False, True):
            ps = [p for p in points if (p["budget"] == top) == held]
            if not ps:
                continue
            pred = fit.predict(N=[p["N"] for p in ps], D=[p["D"] for p in ps], T=[p["T"] for p in ps],
                               mu_rec=[p["mu_rec"] for p in ps])
            fig.add_scatter(x=[p["L"] for p in ps], y=pred, mode="markers", row=1, col=2,
                            marker=dict(symbol="circle-open" if held else "circle", size=7),
                            name="held out (largest C)" if held else "fitted")
        lo, hi = min(p["L"] for p in points), max(p["L"] for p in points)
        fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="black", dash="dot", width=1),
                        row=1, col=2, showlegend=False)
    fig.update_xaxes(type="log", row=1, col=1, title_text="μ_rec")
    fig.update_xaxes(title_text="observed", row=1, col=2)
    fig.update_yaxes(title_text="predicted", row=1, col=2)
    fig.update_layout(title="C6: micro isoFLOP sweep (dotted: training law)", height=450, width=1100, **LAYOUT)
    return fig


def zoh(pairs: list[dict], grid_pairs: list[dict]) -> go.Figure:
    """C7: validation loss of exact ZOH minus Euler, per matched seed (c7) and per grid pair (c1)."""
    fig = go.Figure()
    fig.add_bar(x=[f"c7 seed {p['seed']}" for p in pairs], y=[p["zoh_minus_euler"] for p in pairs], name="c7 (400 steps)")
    fig.add_bar(x=[f"c1 lr {p['lr']:g} s{p['seed']}" for p in grid_pairs], y=[p["zoh_minus_euler"] for p in grid_pairs],
                name="c1 grid (200 steps)")
    fig.add_hline(y=0, line=dict(color="black", width=1))
    fig.update_layout(title="C7: val loss(parcae-zoh) − val loss(parcae) at T = μ_rec (below 0: ZOH better)",
                      yaxis_title="Δ validation loss (nats/byte)", height=420, width=1000, **LAYOUT)
    return fig


def dynamics(probes: list[dict]) -> go.Figure:
    """ρ(Ā) against ρ(∂F/∂h) at h_T and λ₁, every analysis probe of the lab."""
    fig = make_subplots(rows=1, cols=2, column_titles=["ρ(∂F/∂h) at h_T vs ρ(Ā)", "λ₁ (per iteration) vs ρ(Ā)"])
    for inj in INJECTIONS:
        ps = [p for p in probes if p["injection"] == inj]
        if not ps:
            continue
        colour = PALETTE[INJECTIONS.index(inj)]
        text = [f"{p['run']} @ {p['step']}" for p in ps]
        fig.add_scatter(x=[p["rho_A"] for p in ps], y=[p["rho_J"] for p in ps], mode="markers", row=1, col=1,
                        marker=dict(color=colour, size=7), name=inj, legendgroup=inj, text=text)
        fig.add_scatter(x=[p["rho_A"] for p in ps], y=[p["lambda_1"] for p in ps], mode="markers", row=1, col=2,
                        marker=dict(color=colour, size=7), legendgroup=inj, showlegend=False, text=text)
    fig.add_hline(y=1, line=dict(dash="dot", width=1), row=1, col=1)
    fig.add_hline(y=0, line=dict(dash="dot", width=1), row=1, col=2)
    for col in (1, 2):
        fig.add_vline(x=1, line=dict(dash="dot", width=1), row=1, col=col)
        fig.update_xaxes(type="log", title_text="ρ(Ā)", row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title="Does ρ(Ā) < 1 make the loop contract?", height=450, width=1100, **LAYOUT)
    return fig


def write(figs: dict[str, go.Figure], folder: str | Path) -> str:
    """Write every figure as folder/<name>.png with Debian's chromium; returns what it did."""
    browser = os.environ.get("BROWSER_PATH") or (CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"))
    if not browser:
        return "figures skipped: no chromium (apt-get install -y chromium, or set BROWSER_PATH)"
    os.environ["BROWSER_PATH"] = browser  # choreographer (kaleido's browser driver) reads it
    import plotly.io as pio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(figs)
    pio.write_images([figs[n] for n in names], [folder / f"{n}.png" for n in names], scale=1.5)
    return f"figures: {len(names)} written to {folder}/ ({', '.join(names)})"
