"""Plotly figures. Pure functions of arrays: no store, no Streamlit.

Figures are assembled as plain dicts and wrapped without plotly's per-property
validation (it costs ~4 ms per trace; a Compare page has hundreds). The tests rebuild
every figure with validation on, so a typo here still fails loudly.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dashkit import names
from dashkit.series import minmax_indices

PALETTE = qualitative.Dark24
DISPLAY_POINTS = 600  # per curve on screen; exports are full resolution
FAINT_POINTS = 200  # per member run drawn faint behind its group, and per band edge: 300
BAND_POINTS = 300
F32_MAX = float(np.finfo(np.float32).max)  # a larger finite value (a diverged ‖h_T‖) draws at the top, not as inf
HEIGHT = 330


SIDES = {"left": "#d62728", "right": "#1f77b4"}  # a pair's sides: unconstrained red, constrained blue


def scale(log: bool) -> dict:
    """An axis's type. On a log axis every tick is labelled with its whole value: plotly's default
    labels the ticks between powers of ten with their first digit alone, so 0.4 reads as "4"."""
    return {"type": "log", "minorloglabels": "complete"} if log else {"type": "linear"}


def color(key: str) -> str:
    """A run's (or seed group's) colour: the same on every page and in every session. The
    keys "left" and "right" are the two sides of a pair, always red and blue."""
    if key in SIDES:
        return SIDES[key]
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return PALETTE[int.from_bytes(digest, "big") % len(PALETTE)]


def faded(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def packed(values: np.ndarray, dtype: str = "f8") -> dict:
    """A numeric array as plotly.js's typed-array spec (base64 float64, or float32 where
    the chart alone needs it). Plotly would make the same from numpy itself, but at ~1 ms an
    array; a Compare page sends over a thousand."""
    a = np.ascontiguousarray(values, dtype=f"<{dtype}")
    spec = {"dtype": dtype, "bdata": base64.b64encode(a.tobytes()).decode()}
    if a.ndim > 1:
        spec["shape"] = ", ".join(map(str, a.shape))
    return spec


def figure_dict(data: list[dict], layout: dict, dtype: str = "f8") -> dict:
    """A figure as the plain dict st.plotly_chart sends as it is: numeric arrays packed (see
    packed), no plotly objects built (go.Figure deep-copies and walks every trace twice,
    ~1 s for a Compare panel of a few hundred traces). dtype "f4" sends float32, values
    beyond its range clipped to its largest (a diverged ‖h_T‖ draws at the top, not as inf)."""
    for trace in data:
        for key in ("x", "y", "z"):
            value = trace.get(key)
            if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.size:
                trace[key] = packed(value if dtype == "f8" else np.clip(value, -F32_MAX, F32_MAX), dtype)
    return {"data": data, "layout": {"height": HEIGHT, "margin": {"t": 40, "b": 40, "l": 60, "r": 20}, **layout}}


def figure(data: list[dict], layout: dict) -> go.Figure:
    """figure_dict as a go.Figure, for pages that add traces to it (without validation)."""
    fig = figure_dict(data, layout)
    return go.Figure(data=fig["data"], layout=fig["layout"], _validate=False)


@functools.lru_cache(maxsize=64)
def _subplots(cols: int, titles: tuple[str, ...] | None, shared_y: bool, spacing: float) -> str:
    """make_subplots' layout as JSON (make_subplots validates as it builds: ~0.1 s a call)."""
    return json.dumps(make_subplots(rows=1, cols=cols, shared_yaxes=shared_y, subplot_titles=titles,
                                    horizontal_spacing=spacing).layout.to_plotly_json())


def subplots_layout(cols: int, titles: list[str] | None = None, shared_y: bool = False,
                    spacing: float = 0.03) -> dict:
    """A fresh layout dict of one row of `cols` subplots."""
    return json.loads(_subplots(cols, tuple(titles) if titles else None, shared_y, spacing))


def _thin(x: np.ndarray, y: np.ndarray, points: int = DISPLAY_POINTS) -> tuple[np.ndarray, np.ndarray]:
    keep = minmax_indices(y, points)
    return x[keep], y[keep]


@dataclass
class Curve:
    """One line of a metric panel: a run, or a seed group (mean with lower/upper band)."""

    key: str  # colour key: run id or group name
    label: str
    facet: int  # column of the panel
    x: np.ndarray
    raw: np.ndarray
    smooth: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    members: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # a group's runs, drawn faint
    color_key: str | None = None  # colour by this key instead (e.g. the injection of a group)
    dash: str = "solid"  # and tell the groups of one colour apart by dash (e.g. their LR)


@dataclass
class Marker:
    """An event drawn on a curve: a loss spike, a divergence, an early warning."""

    key: str
    facet: int
    x: float
    y: float
    kind: str
    text: str


@dataclass
class Panel:
    title: str
    facets: list[str]
    x_title: str
    log_x: bool = False
    log_y: bool = False
    hline: float | None = None  # e.g. ρ = 1
    smoothed: bool = False  # draw each raw curve faint behind its smoothed one
    height: int = HEIGHT
    legend_right: bool = False  # a vertical legend beside the panel (many groups), else below
    curves: list[Curve] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    vlines: list[tuple[str, int, float]] = field(default_factory=list)  # (key, facet, x): a divergence


def _axes(facet: int) -> tuple[str, str]:
    return ("x", "y") if facet == 0 else (f"x{facet + 1}", f"y{facet + 1}")


def panel_figure(panel: Panel) -> dict:
    """Curves side by side, one column per facet, sharing the y axis: the smoothed curve
    bold over the raw one (faint), seed bands filled, events as markers, divergences as
    dotted vertical lines, and an optional horizontal reference line."""
    n = max(len(panel.facets), 1)
    layout = subplots_layout(n, panel.facets if n > 1 else None, shared_y=True)
    data: list[dict] = []
    shown: set[str] = set()  # one legend entry per key, whatever facets it appears in
    faint: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}  # (colour, facet) -> member runs
    for c in panel.curves:
        xa, ya = _axes(c.facet)
        rgb = color(c.color_key or c.key)
        common = {"type": "scatter", "mode": "lines", "xaxis": xa, "yaxis": ya, "legendgroup": c.key}
        faint.setdefault((rgb, c.facet), []).extend(_thin(mx, my, FAINT_POINTS) for mx, my in c.members)
        if c.lower is not None:  # the band as one closed polygon: upper forward, lower back
            x, lo = _thin(c.x, c.lower, BAND_POINTS)
            x2, hi = _thin(c.x, c.upper, BAND_POINTS)
            data.append({**common, "x": np.concatenate([x2, x[::-1]]), "y": np.concatenate([hi, lo[::-1]]),
                         "fill": "toself", "fillcolor": faded(rgb, 0.2), "line": {"width": 0},
                         "showlegend": False, "hoverinfo": "skip"})
        elif panel.smoothed and not c.members:
            x, y = _thin(c.x, c.raw)
            data.append({**common, "x": x, "y": y, "name": c.label, "showlegend": False,
                         "line": {"width": 1, "color": faded(rgb, 0.35)}, "hoverinfo": "skip"})
        x, y = _thin(c.x, c.smooth)
        data.append({**common, "x": x, "y": y, "name": c.label, "line": {"width": 2, "color": rgb, "dash": c.dash},
                     "showlegend": c.key not in shown})
        shown.add(c.key)
    # the member runs of every group of one colour in one faint trace per column, NaN between runs:
    # a few traces instead of one per group (plotly draws each trace on its own; a Compare page
    # of 25 groups × 5 panels spent ~0.7 s of its browser time on them). Behind everything.
    gap = np.array([np.nan])
    data[:0] = [{"type": "scatter", "mode": "lines", "xaxis": _axes(facet)[0], "yaxis": _axes(facet)[1],
                 "x": np.concatenate([p for px, _ in parts for p in (px, gap)]),
                 "y": np.concatenate([p for _, py in parts for p in (py, gap)]),
                 "name": "member runs", "showlegend": False, "hoverinfo": "skip", "connectgaps": False,
                 "line": {"width": 1, "color": faded(rgb, 0.3)}}
                for (rgb, facet), parts in faint.items() if parts]
    seen: set[str] = set()
    for kind in dict.fromkeys(m.kind for m in panel.markers):
        label, symbol = names.EVENTS.get(kind, names.OTHER_EVENT)
        ms = [m for m in panel.markers if m.kind == kind]
        for facet in sorted({m.facet for m in ms}):
            at = [m for m in ms if m.facet == facet]
            xa, ya = _axes(facet)
            data.append({"type": "scatter", "mode": "markers", "xaxis": xa, "yaxis": ya, "name": label,
                         "legendgroup": f"event:{label}", "showlegend": label not in seen,
                         "x": [m.x for m in at], "y": [m.y for m in at], "text": [m.text for m in at],
                         "hovertemplate": "%{text}<extra></extra>",
                         "marker": {"symbol": symbol, "size": 10, "color": [color(m.key) for m in at],
                                    "line": {"width": 1, "color": "black"}}})
            seen.add(label)
    shapes = []
    for key, facet, x in panel.vlines:
        xa, ya = _axes(facet)
        shapes.append({"type": "line", "xref": xa, "yref": f"{ya} domain", "x0": x, "x1": x, "y0": 0, "y1": 1,
                       "line": {"color": color(key), "dash": "dot", "width": 1.5}})
    if panel.hline is not None:
        for facet in range(n):
            xa, ya = _axes(facet)
            shapes.append({"type": "line", "xref": f"{xa} domain", "yref": ya, "x0": 0, "x1": 1,
                           "y0": panel.hline, "y1": panel.hline, "line": {"color": "crimson", "dash": "dash"}})
    for facet in range(n):
        xa, ya = _axes(facet)
        layout.setdefault(f"xaxis{facet + 1 if facet else ''}", {}).update(
            scale(panel.log_x), title={"text": panel.x_title})
        layout.setdefault(f"yaxis{facet + 1 if facet else ''}", {}).update(scale(panel.log_y))
    layout["yaxis"]["title"] = {"text": panel.title}
    legend = {"orientation": "v", "x": 1.02, "y": 1, "font": {"size": 11}} if panel.legend_right \
        else {"orientation": "h", "y": -0.25}
    # float32 on screen: half the bytes to send and parse (7 digits; the CSV is exact)
    return figure_dict(data, {**layout, "shapes": shapes, "title": {"text": panel.title}, "height": panel.height,
                              "legend": legend, "hovermode": "closest"}, dtype="f4")


def lines_figure(title: str, lines: list[tuple], *, x_title: str, y_title: str = "", log_y: bool = False,
                 hline: float | None = None, dash_key: str | None = None, mode: str = "lines",
                 y_range: tuple[float, float] | None = None) -> go.Figure:
    """A few plain lines: (colour key, label, x, y[, dash]) each; `dash_key` draws that key's
    lines dashed; `y_range` pins the y axis (shared between side-by-side charts; log10
    units on a log axis)."""
    data = [{"type": "scatter", "mode": mode, "x": line[2], "y": line[3], "name": line[1], "legendgroup": line[0],
             "line": {"color": color(line[0]), "width": 2,
                      "dash": line[4] if len(line) > 4 else "dash" if line[0] == dash_key else "solid"}}
            for line in lines]
    shapes = [] if hline is None else [{"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "y0": hline,
                                         "y1": hline, "line": {"color": "crimson", "dash": "dash"}}]
    return figure(data, {"title": {"text": title}, "shapes": shapes, "xaxis": {"title": {"text": x_title}},
                         "yaxis": {"title": {"text": y_title}, **scale(log_y),
                                   **({"range": list(y_range)} if y_range else {})}})


def shared_range(arrays: list[np.ndarray], log: bool, pad: float = 0.05) -> tuple[float, float] | None:
    """A y range that holds every finite value of the arrays (in log10 units when `log`), padded."""
    lo_hi = color_range(arrays, log)
    if lo_hi is None:
        return None
    lo, hi = lo_hi
    margin = (hi - lo) * pad or abs(hi) * pad or 1.0
    return lo - margin, hi + margin


def color_range(arrays: list[np.ndarray], log: bool) -> tuple[float, float] | None:
    """One colour scale for several heatmaps: the finite (log10 when `log`) min and max of all."""
    parts = []
    for a in arrays:
        a = np.asarray(a, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.log10(np.where(a > 0, a, np.nan)) if log else a
        parts.append(a[np.isfinite(a)])
    both = np.concatenate(parts) if parts else np.empty(0)
    return (float(both.min()), float(both.max())) if both.size else None


def heatmap_figure(title: str, steps: np.ndarray, values: np.ndarray, *, log_color: bool,
                   columns: int = 400, zrange: tuple[float, float] | None = None,
                   subtitle: str = "") -> go.Figure:
    """values[i, t] over training step (x) × loop iteration t + 1 (y); at most `columns` steps
    shown; `zrange` pins the colour scale (shared between side-by-side heatmaps)."""
    keep = np.unique(np.linspace(0, len(steps) - 1, min(columns, len(steps))).astype(int)) if len(steps) else []
    z = values[keep].T
    label = title
    if log_color:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(z > 0, z, np.nan))
        label = f"log10 {title}"
    data = [{"type": "heatmap", "x": np.asarray(steps)[keep], "y": np.arange(1, values.shape[1] + 1), "z": z,
             "colorscale": "Viridis", "colorbar": {"title": {"text": label}},
             **({"zmin": zrange[0], "zmax": zrange[1]} if zrange else {}),
             "hovertemplate": "step %{x}<br>iteration %{y}<br>%{z:.4g}<extra></extra>"}]
    return figure(data, {"title": {"text": subtitle or f"{title} over training step × loop iteration"},
                         "xaxis": {"title": {"text": "training step"}},
                         "yaxis": {"title": {"text": "loop iteration t"}, "dtick": 1}})


def eigen_figure(eigenvalues: np.ndarray, step: int, frames: list[tuple[int, np.ndarray]] | None = None,
                 reach: float | None = None, title: str = "") -> go.Figure:
    """Eigenvalues of Ā in the complex plane with the unit circle; |λ| ≥ 1 in red. With
    `frames` (step, eigenvalues), a play button animates them over training. `reach` pins
    the axes to ±reach (shared between side-by-side plots)."""

    def points(eig: np.ndarray) -> dict:
        outside = np.abs(eig) >= 1
        return {"type": "scatter", "mode": "markers", "x": eig.real, "y": eig.imag, "name": "λ(Ā)",
                "marker": {"size": 7, "color": np.where(outside, "crimson", "royalblue").tolist()},
                "hovertemplate": "λ = %{x:.4f} %{y:+.4f}i<extra></extra>"}

    theta = np.linspace(0, 2 * np.pi, 361)
    circle = {"type": "scatter", "mode": "lines", "x": np.cos(theta), "y": np.sin(theta), "name": "|λ| = 1",
              "line": {"color": "gray", "dash": "dash"}, "hoverinfo": "skip"}
    reach = reach or max(1.1, float(np.abs(eigenvalues).max(initial=0)) * 1.1,
                         *(float(np.abs(e).max(initial=0)) * 1.1 for _, e in frames or ()))
    layout = {"title": {"text": title or f"eigenvalues of Ā at step {step}"}, "height": 480,
              "xaxis": {"title": {"text": "Re λ"}, "range": [-reach, reach]},
              "yaxis": {"title": {"text": "Im λ"}, "range": [-reach, reach], "scaleanchor": "x", "scaleratio": 1}}
    fig = figure([circle, points(eigenvalues)], layout)
    if frames:
        fig.frames = [go.Frame(data=[circle, points(e)], name=str(s),
                               layout={"title": {"text": f"eigenvalues of Ā at step {s}"}}) for s, e in frames]
        fig.update_layout(
            updatemenus=[{"type": "buttons", "showactive": False, "x": 0, "y": -0.12, "xanchor": "left",
                          "buttons": [{"label": "▶ play", "method": "animate",
                                       "args": [None, {"frame": {"duration": 150, "redraw": True},
                                                       "fromcurrent": True}]}]}],
            sliders=[{"active": 0, "currentvalue": {"prefix": "step "}, "pad": {"t": 40},
                      "steps": [{"label": str(s), "method": "animate",
                                 "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}]}
                                for s, _ in frames]}])
    return fig


def histogram_figure(title: str, values: np.ndarray, *, x_title: str, vline: float | None = None,
                     x_range: tuple[float, float] | None = None, key: str | None = None) -> go.Figure:
    finite = values[np.isfinite(values)]
    shapes = [] if vline is None else [{"type": "line", "yref": "y domain", "x0": vline, "x1": vline, "y0": 0,
                                        "y1": 1, "line": {"color": "crimson", "dash": "dash"}}]
    return figure([{"type": "histogram", "x": finite, "nbinsx": 40,
                    "marker": {"color": color(key) if key else "royalblue"}}],
                  {"title": {"text": title}, "shapes": shapes,
                   "xaxis": {"title": {"text": x_title}, **({"range": list(x_range)} if x_range else {})},
                   "yaxis": {"title": {"text": "count"}}, "bargap": 0.05})


def event_markers(key: str, facet: int, events: list[tuple[int, str, str]], x: np.ndarray,
                  y: np.ndarray) -> list[Marker]:
    """Markers for (step, kind, detail) events at positions (x, y), one per event; events
    where the curve has no finite value are left out."""
    return [Marker(key, facet, float(xv), float(yv), kind, f"{key}<br>step {s}: {kind}<br>{detail}")
            for (s, kind, detail), xv, yv in zip(events, x, y) if np.isfinite(yv)]


def side_by_side_figure(panels: list[tuple[str, bool, float | None]],
                        lines: list[tuple[str, str, int, np.ndarray, np.ndarray]], *, x_title: str,
                        height: int = 320) -> dict:
    """Several quantities in a row, each its own y axis: panels are (title, log y,
    reference line); lines are (colour key, label, panel, x, y). One legend entry per label."""
    n = len(panels)
    layout = subplots_layout(n, [p[0] for p in panels], spacing=0.06)
    data, seen = [], set()
    for key, label, i, x, y in lines:
        xa, ya = _axes(i)
        x, y = _thin(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        data.append({"type": "scatter", "mode": "lines", "x": x, "y": y, "name": label, "legendgroup": label,
                     "showlegend": label not in seen, "xaxis": xa, "yaxis": ya,
                     "line": {"color": color(key), "width": 2}})
        seen.add(label)
    shapes = []
    for i, (_, log_y, hline) in enumerate(panels):
        xa, ya = _axes(i)
        suffix = i + 1 if i else ""
        layout.setdefault(f"xaxis{suffix}", {}).update(title={"text": x_title})
        layout.setdefault(f"yaxis{suffix}", {}).update(scale(log_y))
        if hline is not None:
            shapes.append({"type": "line", "xref": f"{xa} domain", "yref": ya, "x0": 0, "x1": 1, "y0": hline,
                           "y1": hline, "line": {"color": "crimson", "dash": "dash"}})
    return figure_dict(data, {**layout, "height": height, "shapes": shapes, "showlegend": True,
                         "legend": {"orientation": "h", "y": -0.3}, "margin": {"t": 40, "b": 60, "l": 60, "r": 20}})


OUTCOME_COLORS = ("#2ca02c", "#ff9f1c", "#d62728")  # finished, spiked, diverged


def outcome_figure(title: str, cells, rows: list[str], cols: list[str], row_title: str, col_title: str) -> go.Figure:
    """A sweep's outcome map: one cell per grid point, coloured by its worst outcome
    (green finished, orange spiked, red diverged), its text counting the seeds."""
    z = np.full((len(rows), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in rows]
    for c in cells.itertuples():
        i, j = rows.index(c.row), cols.index(c.col)
        z[i, j] = c.worst
        parts = [f"{getattr(c, k)} {k}" for k in ("finished", "spiked", "diverged") if getattr(c, k)]
        text[i][j] = "<br>".join(parts)
    scale = [[0, OUTCOME_COLORS[0]], [0.33, OUTCOME_COLORS[0]], [0.34, OUTCOME_COLORS[1]], [0.66, OUTCOME_COLORS[1]],
             [0.67, OUTCOME_COLORS[2]], [1, OUTCOME_COLORS[2]]]
    data = [{"type": "heatmap", "x": cols, "y": rows, "z": z, "zmin": 0, "zmax": 2, "colorscale": scale,
             "showscale": False, "text": text, "texttemplate": "%{text}", "textfont": {"size": 12},
             "xgap": 3, "ygap": 3,
             "hovertemplate": f"{row_title} %{{y}}<br>{col_title} %{{x}}<br>%{{text}}<extra></extra>"}]
    return figure(data, {"title": {"text": title}, "height": max(220, 60 * len(rows) + 110),
                         "xaxis": {"title": {"text": col_title}, "type": "category"},
                         "yaxis": {"title": {"text": row_title}, "type": "category", "autorange": "reversed"}})


def parallel_figure(title: str, dimensions: list[dict], color_values: np.ndarray, color_title: str) -> go.Figure:
    """A sweep as parallel coordinates: one line per run through its grid values and
    outcomes; `dimensions` are plotly parcoords dimensions (label, values[, tickvals, ticktext])."""
    finite = color_values[np.isfinite(color_values)]
    data = [{"type": "parcoords", "dimensions": dimensions,
             "line": {"color": np.where(np.isfinite(color_values), color_values, np.nan), "colorscale": "Viridis",
                      "showscale": True, "colorbar": {"title": {"text": color_title}},
                      **({"cmin": float(finite.min()), "cmax": float(finite.max())} if finite.size else {})}}]
    return figure(data, {"title": {"text": title}, "height": 420, "margin": {"t": 80, "b": 40, "l": 80, "r": 40}})


def exit_loss_figure(title: str, curves: list[tuple[str, list[float], list[float], list[float]]],
                     loss_by_depth: list[float], reference_loss: float, mu_rec: int) -> dict:
    """Adaptive exit: loss against mean exit depth, one line per rule (criterion, mean depths,
    losses, thresholds ε, one point per ε), over the no-exit loss L(t) at fixed depth t (grey);
    dashed reference lines at L(μ_rec) and μ_rec. A rule below-left of their crossing saves
    compute at no cost in loss."""
    data = [{"type": "scatter", "mode": "lines", "x": np.arange(1, len(loss_by_depth) + 1),
             "y": np.asarray(loss_by_depth, dtype=float), "name": "fixed depth t",
             "line": {"color": "gray", "dash": "dot", "width": 1.5}}]
    data += [{"type": "scatter", "mode": "lines+markers", "x": np.asarray(x, dtype=float),
              "y": np.asarray(y, dtype=float), "name": name, "text": [f"ε = {e:g}" for e in eps],
              "hovertemplate": f"{name} %{{text}}<br>mean depth %{{x:.2f}}<br>loss %{{y:.4f}}<extra></extra>",
              "line": {"color": color(f"exit:{name}"), "width": 2}} for name, x, y, eps in curves]
    shapes = [{"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "y0": reference_loss, "y1": reference_loss,
               "line": {"color": "crimson", "dash": "dash"}},
              {"type": "line", "yref": "y domain", "x0": mu_rec, "x1": mu_rec, "y0": 0, "y1": 1,
               "line": {"color": "crimson", "dash": "dash"}}]
    return figure_dict(data, {"title": {"text": title}, "shapes": shapes, "hovermode": "closest",
                              "xaxis": {"title": {"text": "mean exit depth"}},
                              "yaxis": {"title": {"text": "loss (nats/token)"}},
                              "legend": {"orientation": "h", "y": -0.25}})


def exit_prediction_figure(title: str, predictions: list[tuple[float, list[int], list[int]]],
                           max_depth: int, jitter: float = 0.15) -> dict:
    """Predicted against measured exit depth per token, one colour per ε (ε, predicted,
    measured); depths are integers, so points are jittered by ±`jitter` (seeded: the same
    picture every time) to show how many sit on each cell. The diagonal is a perfect prediction."""
    rng = np.random.default_rng(0)
    data = [{"type": "scatter", "mode": "lines", "x": [0.5, max_depth + 0.5], "y": [0.5, max_depth + 0.5],
             "name": "predicted = measured", "line": {"color": "gray", "dash": "dash"}, "hoverinfo": "skip"}]
    for eps, pred, meas in predictions:
        p, m = np.asarray(pred, dtype=float), np.asarray(meas, dtype=float)
        data.append({"type": "scatter", "mode": "markers", "name": f"ε = {eps:g}",
                     "x": m + rng.uniform(-jitter, jitter, len(m)), "y": p + rng.uniform(-jitter, jitter, len(p)),
                     "marker": {"size": 5, "opacity": 0.5, "color": color(f"eps:{eps:g}")},
                     "hovertemplate": f"ε = {eps:g}<br>measured %{{x:.0f}}<br>predicted %{{y:.0f}}<extra></extra>"})
    axis = {"range": [0.5, max_depth + 0.5], "dtick": max(1, max_depth // 8)}
    return figure_dict(data, {"title": {"text": title}, "hovermode": "closest",
                              "xaxis": {"title": {"text": "measured exit depth (latent rule)"}, **axis},
                              "yaxis": {"title": {"text": "predicted exit depth"}, **axis},
                              "legend": {"orientation": "h", "y": -0.25}})
