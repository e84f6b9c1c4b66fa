"""The unrolled looped LM as a graph: prelude → (injection → core) × T → C → coda, laid out
by networkx and drawn with plotly, the injection annotated with the current ‖Ā‖, ρ(Ā), ‖B̄‖."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import plotly.graph_objects as go

from dashkit import names
from dashkit.charts import figure

SHOWN_ITERATIONS = 5  # a longer loop is drawn as the first 3, "…", and the last


def iterations(depth: int) -> list[int | None]:
    """Loop iterations to draw; None stands for the elided middle."""
    if depth <= SHOWN_ITERATIONS:
        return list(range(1, depth + 1))
    return [1, 2, 3, None, depth]


def build(config: dict, spectrum: dict | None) -> nx.DiGraph:
    """Nodes carry label, hover text, kind and layer (left to right); edges a label."""
    get = lambda role, default=None: names.config_value(config, role, default)  # noqa: E731
    d_model = get("d_model", "?")
    d_state = get("d_state") or d_model
    depth = int(get("mu_rec", 4))
    backprop = get("mu_bwd") or math.ceil(depth / 2)
    rho = (spectrum or {}).get(names.RHO, math.nan)
    a_text = ", ".join(f"{label} = {spectrum[key]:.4g}" for key, label in names.SPECTRA.items()
                       if spectrum and key in spectrum and np.isfinite(spectrum[key]))
    g = nx.DiGraph()
    chain = [("tokens", "tokens", f"vocabulary {get('vocab_size', '?')}", "io"),
             ("prelude", f"prelude ×{get('n_prelude', '?')}", f"{get('n_prelude', '?')} blocks, d = {d_model}",
              "block"),
             ("e", "RMSNorm → e" if get("prelude_norm", True) else "e", "the input, fixed during the loop", "io")]
    for t in iterations(depth):
        if t is None:
            chain.append(("more", "…", f"iterations 4 … {depth - 1}", "gap"))
            continue
        grad = t > depth - backprop
        chain.append((f"inject{t}", f"Ā h + B̄ e (t={t})", f"injection {get('injection', '?')}<br>{a_text}", "inject"))
        chain.append((f"core{t}", f"core ×{get('n_core', '?')}",
                      f"iteration {t}, {'with' if grad else 'no'} gradient<br>d_state = {d_state}",
                      "core" if grad else "core-no-grad"))
    chain += [("C", "C", f"readout d_state {d_state} → d_model {d_model}", "block"),
              ("coda", f"coda ×{get('n_coda', '?')}", f"{get('n_coda', '?')} blocks", "block"),
              ("logits", "logits", "final RMSNorm → tied head", "io")]
    for layer, (node, label, hover, kind) in enumerate(chain):
        g.add_node(node, label=label, hover=hover, kind=kind, layer=layer)
    for (a, *_), (b, *_) in zip(chain, chain[1:]):
        g.add_edge(a, b, label="B̄ e" if a == "e" else "")
    g.add_node("h0", label="h₀", hover="initial state", kind="io", layer=g.nodes["e"]["layer"])
    g.add_edge("h0", "inject1", label="h₀")
    for node in [n for n in g if g.nodes[n]["kind"] == "inject"][1:]:
        g.add_edge("e", node, label="B̄ e")
    g.graph.update(depth=depth, backprop=backprop, rho=rho)
    return g


COLORS = {"io": "#9e9e9e", "block": "#5c6bc0", "core": "#00897b", "core-no-grad": "#80cbc4", "gap": "#ffffff"}


def figure_of(g: nx.DiGraph, title: str) -> go.Figure:
    pos = nx.multipartite_layout(g, subset_key="layer", align="vertical", scale=1.0)
    pos["e"], pos["h0"] = (pos["e"][0], 0.3), (pos["h0"][0], -0.3)  # the input above the loop, h₀ below
    rho = g.graph["rho"]
    inject_color = "#9e9e9e" if not np.isfinite(rho) else ("crimson" if rho >= 1 else "#43a047")
    annotations = [{"x": pos[b][0], "y": pos[b][1], "ax": pos[a][0], "ay": pos[a][1], "xref": "x", "yref": "y",
                    "axref": "x", "ayref": "y", "showarrow": True, "arrowhead": 2, "arrowsize": 1.2,
                    "arrowwidth": 1.5, "standoff": 12, "startstandoff": 12, "text": "",
                    "arrowcolor": "#bdbdbd" if g.edges[a, b]["label"] else "#616161"}
                   for a, b in g.edges]
    nodes = list(g)
    data = [{"type": "scatter", "mode": "markers+text", "x": [pos[n][0] for n in nodes],
             "y": [pos[n][1] for n in nodes], "text": [g.nodes[n]["label"] for n in nodes],
             "textposition": ["top center" if g.nodes[n]["kind"] == "inject" or n == "e" else "bottom center"
                              for n in nodes],
             "hovertext": [g.nodes[n]["hover"] for n in nodes], "hoverinfo": "text",
             "marker": {"size": 26, "symbol": "square", "line": {"width": 1, "color": "#424242"},
                        "color": [inject_color if g.nodes[n]["kind"] == "inject" else COLORS[g.nodes[n]["kind"]]
                                  for n in nodes]}}]
    return figure(data, {"title": {"text": title}, "height": 360, "showlegend": False, "annotations": annotations,
                         "plot_bgcolor": "white", "xaxis": {"visible": False, "range": [-1.05, 1.15]},
                         "yaxis": {"visible": False, "range": [-0.6, 0.6]}})
