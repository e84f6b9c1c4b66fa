"""Overview: the story of the open lab on one screen. First the headline pair (an
unconstrained run beside its constrained twin: same config but the injection), their
ρ(Ā), ‖h_T‖ and loss over training; on the reference lab the claims C1–C7 with their
verdicts, each linked to the page that shows it; then per experiment its matched pairs
with a verdict each, and for grid sweeps the outcome of every cell."""

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, claims, names, session, story, widgets
from dashkit import lab as labdata
from stabilitylab import records

PAIR_PANELS = [("ρ(Ā)", False, 1.0), ("max ‖h_T‖", True, None), ("loss", False, None)]


def pair_lines(lab: str, runs: pd.DataFrame, pair: tuple[str, str], side_names: tuple[str, str]) -> list:
    """(colour key, label, panel, x, y) of both runs: ρ(Ā), max ‖h_T‖, loss over training."""
    lines = []
    for run_id, side, key in zip(pair, side_names, ("left", "right")):
        token = session.token(runs, run_id)
        spectra = labdata.spectrum_norms(lab, run_id, token)
        scalars = labdata.scalars(lab, run_id, token, (names.SCALARS["loss"], names.SCALARS["state_norm"]))
        if len(spectra):
            lines.append((key, side, 0, spectra["step"].to_numpy(), spectra[records.RHO].to_numpy()))
        for panel, role in ((1, "state_norm"), (2, "loss")):
            if names.SCALARS[role] in scalars:
                lines.append((key, side, panel, *scalars[names.SCALARS[role]]))
    return lines


def sig(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3g}"


def side_table(rows: list[pd.Series], titles: tuple[str, str], extras: list[dict]) -> pd.DataFrame:
    """The pair's numbers, one column per side."""
    def status(r: pd.Series) -> str:
        return f"{r['status']} @ {int(r['status_step'])}" if r["status"] in ("diverged", "failed") else r["status"]

    return pd.DataFrame({title: {"status": status(r), "max ρ(Ā)": sig(r["max_rho"]),
                                 "max ‖h_T‖": sig(r["max_state_norm"]), "final loss": story.loss_text(r),
                                 "λ₁": sig(e["lambda1"]), "loss spikes": str(e["spikes"])}
                         for r, title, e in zip(rows, titles, extras)})


def headline(lab: str, runs: pd.DataFrame, pair: tuple[str, str]) -> None:
    rows = runs.set_index("run_id", drop=False)
    left, right = rows.loc[pair[0]], rows.loc[pair[1]]
    inj = names.config_column("injection")
    side_names = (f"{left[inj]} (left)", f"{right[inj]} (right)")
    fields = story.varying(rows.loc[list(pair)])
    cell = story.label(left, [f for f in story.varying(runs[runs["experiment"] == left["experiment"]])
                              if f not in fields]) if left["experiment"] == right["experiment"] else ""
    kind = "unconstrained vs constrained" if not story.constrained(left[inj]) and story.constrained(right[inj]) \
        else "matched pair"
    st.subheader(f"{left[inj]} vs {right[inj]}: {kind}")
    st.caption(f"experiment `{left['experiment']}` · {cell} · the two runs differ only in "
               f"{', '.join(story.short(f) for f in fields) or 'nothing'}")
    extras = [labdata.extras(lab, r["run_id"], r["token"]) for r in (left, right)]
    c = st.columns([1.4, 3])
    c[0].table(side_table([left, right], side_names, extras))
    c[0].markdown(f"**Verdict:** {story.verdict(left, right, str(left[inj]), str(right[inj]))}")
    c[0].caption(f"λ₁: the largest Lyapunov exponent of the loop at the last analysis probe (< 0: it "
                 f"contracts). Runs: `{left['run_id']}`, `{right['run_id']}`.")
    lines = pair_lines(lab, runs, pair, side_names)
    fig = charts.side_by_side_figure(PAIR_PANELS, lines, x_title="step")
    export = pd.DataFrame([(label, PAIR_PANELS[i][0], x, y) for _, label, i, xs, ys in lines for x, y in zip(xs, ys)],
                          columns=["run", "quantity", "step", "value"])
    with c[1]:
        widgets.chart(fig, export, "overview_pair")
    links = st.columns(4)
    for col, (page, label) in zip(links, (("loop", "Loop dynamics"), ("spectra", "Spectra"),
                                          ("architecture", "Architecture"))):
        with col:
            widgets.link(page, f"{label} of this pair →", runs=",".join(pair))
    with links[3]:
        widgets.link("compare", "Compare its experiment →", experiment=str(left["experiment"]))


def claims_table(experiments: list[str], pair: tuple[str, str] | None) -> None:
    rows = claims.read()
    if not rows:
        return
    st.subheader("The paper's claims, reproduced here")
    st.caption("From experiments/REPORT.md (numbers: experiments/results/*.json, regenerated from this lab "
               "by experiments/report.py). Each link opens the page and runs that show it.")
    widths = [0.55, 2.3, 3.3, 1.6, 1.9]
    head = st.columns(widths)
    for col, text in zip(head, ("", "paper", "here", "verdict", "shown by")):
        col.markdown(f"**{text}**")
    for claim in rows:
        c = st.columns(widths)
        c[0].markdown(f"**{claim.claim}**")
        c[1].markdown(claim.paper)
        c[2].markdown(claim.here)
        c[3].markdown(claim.verdict)
        params = claims.links_for(claim, experiments, pair)
        if params is not None:
            with c[4]:
                widgets.link(claim.page, claim.label + " →", **params)


def experiment_section(runs: pd.DataFrame, experiment: str, info: dict) -> None:
    members = runs[runs["experiment"] == experiment]
    status = members["status"].value_counts()
    grid = info["grid"][experiment]
    st.markdown(f"#### {experiment}")
    st.caption(f"{len(members)} runs · grid: {' × '.join(story.short(f) for f in grid) or 'one configuration'}"
               f" · " + ", ".join(f"{n} {s}" for s, n in status.items()))
    pairs = info["pairs"][experiment]
    cells = info["outcomes"][experiment]
    c = st.columns([3, 2]) if cells is not None else [st.container()]
    with c[0]:
        if pairs:
            st.markdown("\n".join(f"- {line}" for _, line, _ in pairs))
            options = {name: table for name, _, table in pairs}
            name = st.selectbox("matched pairs", list(options), key=f"overview_pairs_{experiment}") \
                if len(options) > 1 else next(iter(options))
            table = options[name]
            st.dataframe(table.drop(columns=["left", "right"]), hide_index=True, key=f"overview_table_{experiment}",
                         column_config={c: st.column_config.NumberColumn(format="%.4g") for c in table.columns
                                        if table[c].dtype.kind == "f"})
        else:
            st.caption("No matched pairs: no run has a twin that differs in the injection (or in one two-valued "
                       "field) alone. Its runs:")
            shown = members.assign(**{story.short(f): members[f] for f in grid})
            st.dataframe(shown[[story.short(f) for f in grid] + ["status", "final_loss", "max_rho",
                                                                  "max_state_norm"]],
                         hide_index=True, key=f"overview_runs_{experiment}")
    if cells is not None:
        fields = cells.attrs["fields"]
        fig = charts.outcome_figure(f"outcome per cell ({', '.join(fields[1:])} × {fields[0]}), seeds counted",
                                    cells, cells.attrs["rows"], cells.attrs["cols"], fields[0], ", ".join(fields[1:]))
        with c[1]:
            widgets.chart(fig, cells.drop(columns="worst"), f"overview_outcomes_{experiment}")


lab, runs = session.lab(), session.runs()
pair = session.first_pair()
st.title("Overview")
status = runs["status"].value_counts()
st.caption(f"lab `{lab}` · {len(runs)} runs in {runs['experiment'].nunique()} experiments · "
           + ", ".join(f"{n} {s}" for s, n in status.items()))
if pair is None:
    st.info("No matched pairs in this lab: no two runs differ in the injection alone. Train a constrained and an "
            "unconstrained run with one config (`make demo` does), or open Compare to see the runs.")
else:
    headline(lab, runs, pair)
if Path(lab).resolve() == labdata.REFERENCE_LAB.resolve():
    claims_table(runs["experiment"].dropna().unique().tolist(), pair)
info = session.story()
st.subheader("Experiments")
for experiment in info["experiments"]:
    experiment_section(runs, experiment, info)
