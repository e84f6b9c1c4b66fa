"""Architecture: the selected run's model unrolled over its loop, read from its config,
with Ā and B̄ annotated by their norms in the latest recorded spectrum."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import graph, names, session, widgets
from dashkit import lab as labdata

lab, runs = session.lab(), session.runs()
st.title("Architecture")
run_id = widgets.run_picker(runs, key="arch_run")
token = session.token(runs, run_id)
config = labdata.details(lab, run_id, token)["meta"].get("config", {})
spectra = labdata.spectrum_norms(lab, run_id, token)
latest = spectra.iloc[-1].to_dict() if len(spectra) else None

g = graph.build(config, latest)
title = f"{names.config_value(config, 'injection', '?')} · T = μ_rec = {g.graph['depth']}, " \
        f"the last {g.graph['backprop']} with gradient"
if latest:
    title += " · " + ", ".join(f"{label} = {latest[key]:.4g}" for key, label in names.SPECTRA.items()
                               if np.isfinite(latest.get(key, np.nan))) + f" (step {int(latest['step'])})"
nodes = pd.DataFrame([{"node": n, **{k: v for k, v in d.items() if k != "hover"}} for n, d in g.nodes(data=True)])
widgets.chart(graph.figure_of(g, title), nodes, f"architecture_{run_id}")
st.caption("Hover a node for its widths; red injection: ρ(Ā) ≥ 1 at the latest spectrum (unstable), "
           "green: ρ(Ā) < 1. Dark core blocks carry gradient, light ones run without.")
st.subheader("Model config")
st.json(config.get("model", config))
