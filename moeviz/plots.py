"""Plotly figures of moeviz's arrays. No Streamlit here: every figure is tested on its own."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

SEQUENTIAL = "Viridis"  # perceptually uniform and readable with colour-vision deficiencies
QUALITATIVE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]  # Okabe–Ito


def layer_expert_heatmap(
    values: np.ndarray,
    layer_indices: list[int],
    title: str,
    colorbar: str,
    hover_format: str = ".4g",
) -> go.Figure:
    """A layer × expert heatmap of `values` (L, E).

    An invisible marker layer on the cell centres carries (layer, expert) in `customdata`,
    so that a Streamlit app can select cells (plotly cannot select heatmap cells).
    """
    values = np.asarray(values, dtype=float)
    num_layers, num_experts = values.shape
    experts = np.arange(num_experts)
    labels = [str(i) for i in layer_indices]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=values, x=experts, y=labels, colorscale=SEQUENTIAL, colorbar=dict(title=colorbar),
        hovertemplate=f"layer %{{y}}, expert %{{x}}<br>{colorbar}: %{{z:{hover_format}}}<extra></extra>",
    ))
    ex, ly = np.meshgrid(experts, np.arange(num_layers))
    fig.add_trace(go.Scatter(
        x=ex.ravel(), y=[labels[i] for i in ly.ravel()], mode="markers",
        marker=dict(size=12, opacity=0), hoverinfo="skip", showlegend=False,
        customdata=np.stack([np.asarray(layer_indices)[ly.ravel()], ex.ravel()], axis=1),
    ))
    fig.update_layout(
        title=title, xaxis_title="expert", yaxis_title="decoder layer",
        yaxis=dict(type="category", autorange="reversed"), margin=dict(l=60, r=20, t=50, b=50),
        xaxis=dict(range=[-0.5, num_experts - 0.5], dtick=1 if num_experts <= 32 else None),
    )
    return fig


def similarity_heatmap(sim: np.ndarray, labels: np.ndarray | None = None, title: str = "",
                       space: str = "similarity", axis: str = "expert", names=None) -> go.Figure:
    """A similarity matrix (N, N) of experts (or layers: `axis`, `names`), ordered by cluster
    when `labels` are given."""
    order = np.argsort(labels, kind="stable") if labels is not None else np.arange(len(sim))
    names = [str(names[i] if names is not None else i) for i in order]
    fig = go.Figure(go.Heatmap(
        z=sim[np.ix_(order, order)], x=names, y=names, colorscale=SEQUENTIAL, zmin=-1 if sim.min() < 0 else 0,
        zmax=1, colorbar=dict(title=space),
        hovertemplate=axis + "s %{y} and %{x}<br>" + space + ": %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis=dict(title=axis, type="category"),
                      yaxis=dict(title=axis, type="category", autorange="reversed"))
    return fig


def dendrogram(link: np.ndarray, title: str = "") -> go.Figure:
    """A SciPy linkage drawn as one line trace (None gaps), fast even for hundreds of leaves."""
    from scipy.cluster.hierarchy import dendrogram as scipy_dendrogram

    tree = scipy_dendrogram(link, no_plot=True)
    xs, ys = [], []
    for x, y in zip(tree["icoord"], tree["dcoord"]):
        xs += [*x, None]
        ys += [*y, None]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#3b528b", width=1.5),
                               hoverinfo="skip", showlegend=False))
    ticks = 5 + 10 * np.arange(len(tree["ivl"]))
    fig.update_layout(title=title, yaxis_title="distance (1 − similarity)",
                      xaxis=dict(title="expert", tickvals=ticks, ticktext=tree["ivl"]))
    return fig


def embedding_scatter(xy: np.ndarray, layer_indices: list[int], color: np.ndarray | None = None,
                      color_name: str = "layer", title: str = "", categories: list[str] | None = None) -> go.Figure:
    """Every expert of every layer as one point of a 2-D map: xy (L, E, 2); colour (L, E) or by layer.

    With `categories`, `color` holds category codes: one trace (and legend entry) per category.
    """
    L, E = xy.shape[:2]
    layers = np.repeat(np.asarray(layer_indices), E)
    experts = np.tile(np.arange(E), L)
    values = layers if color is None else np.asarray(color).reshape(-1)
    x, y, ids = xy[..., 0].reshape(-1), xy[..., 1].reshape(-1), np.stack([layers, experts], axis=1)
    scatter = go.Scattergl if L * E > 1000 else go.Scatter
    hover = "layer %{customdata[0]}, expert %{customdata[1]}<br>"
    if categories is None:
        traces = [scatter(x=x, y=y, mode="markers", customdata=ids,
                          marker=dict(color=values, colorscale=SEQUENTIAL, size=7, colorbar=dict(title=color_name)),
                          hovertemplate=hover + color_name + ": %{marker.color:.4g}<extra></extra>")]
    else:
        traces = [scatter(x=x[values == code], y=y[values == code], mode="markers", name=name,
                          customdata=ids[values == code], marker=dict(color=QUALITATIVE[code % len(QUALITATIVE)], size=7),
                          hovertemplate=hover + f"{color_name}: {name}<extra></extra>")
                  for code, name in enumerate(categories)]
    fig = go.Figure(traces)
    fig.update_layout(title=title, xaxis_title="dimension 1", yaxis_title="dimension 2", legend_title_text=color_name)
    return fig


def depth_curves(layer_indices: list[int], curves: dict[str, np.ndarray], title: str = "",
                 yaxis: str = "value") -> go.Figure:
    """One line per named curve across decoder layers (homogeneity, entropy, …)."""
    fig = go.Figure([
        go.Scatter(x=layer_indices, y=np.asarray(v), mode="lines+markers", name=name) for name, v in curves.items()
    ])
    fig.update_layout(title=title, xaxis_title="decoder layer", yaxis_title=yaxis, showlegend=True,
                      xaxis=dict(tickmode="array", tickvals=list(layer_indices)) if len(layer_indices) <= 24 else None)
    return fig


def stability_curves(rows: list[dict], title: str = "") -> go.Figure:
    """Overlap and rank correlation with the full calibration, against calibration tokens."""
    tokens = [r["tokens"] for r in rows]
    fig = go.Figure()
    for key, name in (("overlap", "pruned-set overlap"), ("rank_correlation", "rank correlation")):
        fig.add_trace(go.Scatter(x=tokens, y=[r[key] for r in rows], mode="lines+markers", name=name))
        if rows and rows[0].get(f"{key}_bootstrap") is not None:
            fig.add_trace(go.Scatter(x=tokens, y=[r[f"{key}_bootstrap"] for r in rows], mode="lines",
                                     line=dict(dash="dot"), name=f"{name} (bootstrap)"))
    fig.update_layout(title=title, xaxis_title="calibration tokens", yaxis_title="agreement with the full run",
                      yaxis=dict(range=[0, 1.05]))
    return fig


def plan_heatmap(pruned: dict[int, list[int]], layer_indices: list[int], num_experts: int,
                 title: str = "Pruning plan") -> go.Figure:
    """The plan as a layer × expert grid: 1 = pruned, 0 = kept; cells selectable like any heatmap."""
    grid = np.zeros((len(layer_indices), num_experts))
    for row, layer_idx in enumerate(layer_indices):
        grid[row, pruned.get(layer_idx, [])] = 1.0
    fig = layer_expert_heatmap(grid, layer_indices, title, "pruned", hover_format=".0f")
    fig.data[0].update(colorscale=[[0, "#440154"], [1, "#fde725"]], zmin=0, zmax=1,
                       colorbar=dict(title="pruned", tickvals=[0, 1], ticktext=["kept", "pruned"]))
    return fig


def ratio_curves(frame, metric: str, title: str = "") -> go.Figure:
    """`metric` against pruning ratio, one line per method (and mode), the original as a dashed line."""
    fig = go.Figure()
    base = frame[frame["method"] == "original"]
    for (method, mode), group in frame[frame["method"] != "original"].groupby(["method", "mode"], dropna=False):
        group = group.sort_values("ratio")
        name = method if mode is None or mode != mode else f"{method} ({mode})"
        fig.add_trace(go.Scatter(x=group["ratio"], y=group[metric], mode="lines+markers", name=name))
    if len(base) and metric in base:
        fig.add_hline(y=float(base[metric].iloc[-1]), line_dash="dash", annotation_text="original")
    top = float(frame["ratio"].max()) if len(frame) else 1.0
    fig.update_layout(title=title, xaxis_title="pruning ratio", yaxis_title=metric, showlegend=True,
                      xaxis=dict(range=[-0.02, max(top, 0.25) * 1.1], tickformat=".0%"))
    return fig
