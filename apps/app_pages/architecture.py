"""Architecture: two runs' models unrolled over their loops side by side (by default the
lab's headline pair), read from their configs, with Ā and B̄ annotated by their norms in
the latest recorded spectrum; below, the config fields in which the two differ."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import graph, names, session, story, widgets
from dashkit import lab as labdata

lab, runs = session.lab(), session.runs()
st.title("Architecture")
pair = widgets.pair_picker(runs, "arch", session.first_pair())
configs = []
for col, side, run_id in zip(st.columns(2), ("left", "right"), pair):
    token = session.token(runs, run_id)
    config = labdata.details(lab, run_id, token)["meta"].get("config", {})
    configs.append(config)
    spectra = labdata.spectrum_norms(lab, run_id, token)
    latest = spectra.iloc[-1].to_dict() if len(spectra) else None
    g = graph.build(config, latest)
    title = f"{side}: {names.config_value(config, 'injection', '?')} · T = μ_rec = {g.graph['depth']}, " \
            f"the last {g.graph['backprop']} with gradient"
    with col:
        nodes = pd.DataFrame([{"node": n, **{k: v for k, v in d.items() if k != "hover"}}
                              for n, d in g.nodes(data=True)])
        widgets.chart(graph.figure_of(g, title), nodes, f"architecture_{side}")
        if latest:
            st.caption(" · ".join(f"{label} = {latest[key]:.4g}" for key, label in names.SPECTRA.items()
                                  if np.isfinite(latest.get(key, np.nan))) + f" (step {int(latest['step'])})")
        st.caption(f"`{run_id}`")
st.caption("Hover a node for its widths; red injection: ρ(Ā) ≥ 1 at the latest spectrum (unstable), "
           "green: ρ(Ā) < 1. Dark core blocks carry gradient, light ones run without.")
st.subheader("Where the two configs differ")
rows = runs.set_index("run_id").loc[list(pair)]
differ = story.varying(rows, seeds=True)
if differ:
    st.dataframe(rows[differ].T.rename(index=lambda c: names.field_name(c)).astype(str),
                 key="arch_differences")
else:
    st.caption("Nowhere: the two runs have the same config.")
with st.expander("Model configs"):
    for col, config in zip(st.columns(2), configs):
        col.json(config.get("model", config))
