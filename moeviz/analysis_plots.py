"""Plotly figures of moeviz's analysis: similarity matrices, dendrograms and their clusters,
maps of experts, curves across depth and across calibration size. No Streamlit here: every
figure is tested on its own. The palette and the layer × expert grids are in `plots`.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .plots import KEPT, LINES, QUALITATIVE, SEQUENTIAL

ABOVE_CUT = "#999999"  # dendrogram links that join clusters
LEAF_STEP = 10  # SciPy's leaf spacing: leaf i sits at x = 5 + 10 i


# ---- similarity and clusters ------------------------------------------------------------------
def similarity_heatmap(sim: np.ndarray, labels: np.ndarray | None = None, title: str = "",
                       space: str = "similarity", axis: str = "expert", names=None, *,
                       link: np.ndarray | None = None, order=None, n_clusters: int | None = None) -> go.Figure:
    """A similarity matrix (N, N) of experts (or layers, sources: `axis`, `names`).

    Rows and columns follow `order`, else the leaves of `link`'s dendrogram (alike experts
    form blocks on the diagonal), else the cluster `labels`. Clusters (`labels` (N,), or the
    cut of `link` into `n_clusters`) are outlined on the diagonal, their ticks coloured as in
    `dendrogram(link, n_clusters=…)`.
    """
    sim = np.asarray(sim, dtype=float)  # (N, N)
    if labels is None and link is not None and n_clusters is not None:
        labels = cluster_labels(link, n_clusters)
    if order is None:
        order = leaf_order(link) if link is not None else (
            np.argsort(labels, kind="stable") if labels is not None else np.arange(len(sim)))
    order = np.asarray(order, dtype=int)
    ticks = [str(names[i] if names is not None else i) for i in order]
    fig = go.Figure(go.Heatmap(
        z=sim[np.ix_(order, order)], x=ticks, y=ticks, colorscale=SEQUENTIAL, zmin=-1 if sim.min() < 0 else 0,
        zmax=1, colorbar=dict(title=space),
        hovertemplate=axis + "s %{y} and %{x}<br>" + space + ": %{z:.3f}<extra></extra>",
    ))
    shapes, ticktext = [], ticks
    if labels is not None:
        shown = np.asarray(labels)[order]
        colour = _cluster_colours(shown)
        for start, stop in _runs(shown):  # contiguous members of one cluster: a block on the diagonal
            if stop - start > 1:
                shapes.append(dict(type="rect", x0=start - 0.5, x1=stop - 0.5, y0=start - 0.5, y1=stop - 0.5,
                                   line=dict(color=colour[shown[start]], width=2.5)))
        ticktext = [f'<span style="color:{colour[c]}">{t}</span>' for t, c in zip(ticks, shown)]
    tickaxis = dict(type="category", tickfont=dict(size=_tick_size(len(ticks))))
    if len(ticks) <= 64:  # every tick, coloured by cluster; beyond that plotly thins them out
        tickaxis.update(tickmode="array", tickvals=ticks, ticktext=ticktext)
    fig.update_layout(title=title, shapes=shapes, margin=dict(l=60, r=20, t=60, b=60),
                      xaxis=dict(title=axis, **tickaxis), yaxis=dict(title=axis, autorange="reversed", **tickaxis))
    if len(ticks) > 32:  # one label per row: each row as tall as its label (9 px type needs about 12 px)
        fig.update_layout(height=min(12 * len(ticks), 900) + 140)
    return fig


def dendrogram(link: np.ndarray, title: str = "", n_clusters: int | None = None, *, names=None,
               axis: str = "expert") -> go.Figure:
    """A SciPy linkage (N-1, 4) as a dendrogram: links grouped in one line trace per colour.

    Every leaf is shown and labelled (`names`, default the index). With `n_clusters`, a
    horizontal line marks the height that cuts the tree into that many clusters and links
    and leaves take their cluster's colour (links above the cut grey).
    """
    link = np.asarray(link, dtype=float)
    N = len(link) + 1
    leaves, x, height, first_leaf = _tree(link)
    clustered = n_clusters is not None
    labels = cluster_labels(link, n_clusters) if clustered else np.ones(N, dtype=int)
    colour = _cluster_colours(labels[leaves]) if clustered else {1: KEPT}
    cut = cut_height(link, n_clusters) if clustered else np.inf
    node_colour = [colour[labels[first_leaf[N + i]]] if h <= cut else ABOVE_CUT for i, h in enumerate(link[:, 2])]
    fig = go.Figure(_link_traces(link, x, height, node_colour))
    fig.add_trace(go.Scatter(  # the merges: hover says where and how many
        x=x[N:], y=link[:, 2], mode="markers", marker=dict(size=8, opacity=0), showlegend=False,
        customdata=link[:, 3].astype(int),
        hovertemplate=f"merge at distance %{{y:.3f}}<br>%{{customdata}} {axis}s<extra></extra>",
    ))
    ticks = [str(names[i] if names is not None else i) for i in leaves]
    sizes = np.bincount(labels)[labels[leaves]]
    fig.add_trace(go.Scatter(
        x=x[leaves], y=np.zeros(N), mode="markers", cliponaxis=False, showlegend=False, customdata=leaves,
        marker=dict(size=7, color=[colour[c] for c in labels[leaves]], line=dict(color="#FFFFFF", width=0.5)),
        text=[f"{axis} {t}" + (f"<br>cluster of {s}" if clustered else "") for t, s in zip(ticks, sizes)],
        hovertemplate="%{text}<extra></extra>",
    ))
    top = max(float(link[:, 2].max()), cut if clustered else 0.0)
    if clustered:
        fig.update_layout(
            shapes=[dict(type="line", x0=0, x1=LEAF_STEP * N, y0=cut, y1=cut,
                         line=dict(color="#000000", width=1.5, dash="dash"))],
            annotations=[dict(x=LEAF_STEP * N, y=cut, xanchor="right", yanchor="bottom", showarrow=False,
                              text=f"cut: {len(set(labels))} cluster{'s' if len(set(labels)) > 1 else ''}")],
        )
        ticks = [f'<span style="color:{colour[c]}">{t}</span>' for t, c in zip(ticks, labels[leaves])]
    fig.update_layout(
        title=title, margin=dict(l=60, r=20, t=60, b=60),
        yaxis=dict(title="distance (1 − similarity)", range=[-0.04 * top, 1.08 * top]),
        xaxis=dict(title=axis, range=[0, LEAF_STEP * N],  # every leaf, half a step from either edge
                   tickmode="array", tickvals=x[leaves], ticktext=ticks, tickangle=-90 if N > 16 else 0,
                   tickfont=dict(size=_tick_size(N)), showgrid=False, zeroline=False),
    )
    return fig


def _tree(link: np.ndarray):
    """Leaf order (N,) and, per node (leaves 0..N-1, then merges N..2N-2), its x, its height and
    one leaf below it: SciPy's drawing, leaf i of the order at x = 5 + 10 i."""
    N = len(link) + 1
    leaves = leaf_order(link)
    x, height, first_leaf = np.zeros(2 * N - 1), np.zeros(2 * N - 1), np.arange(2 * N - 1)
    x[leaves] = 5 + LEAF_STEP * np.arange(N)
    for i, (a, b, h, _) in enumerate(link):
        a, b = int(a), int(b)
        x[N + i], height[N + i], first_leaf[N + i] = (x[a] + x[b]) / 2, h, first_leaf[a]
    return leaves, x, height, first_leaf


def _link_traces(link, x, height, node_colour) -> list[go.Scatter]:
    """Each merge as a ⊓ from its children up to its height; one trace per colour, None between links."""
    paths: dict[str, tuple[list, list]] = {}
    for (a, b, h, _), colour in zip(link, node_colour):
        a, b = int(a), int(b)
        xs, ys = paths.setdefault(colour, ([], []))
        xs += [x[a], x[a], x[b], x[b], None]
        ys += [height[a], h, h, height[b], None]
    return [go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=c, width=1.5), hoverinfo="skip", showlegend=False)
            for c, (xs, ys) in paths.items()]


def leaf_order(link: np.ndarray) -> np.ndarray:
    """The leaves of a linkage left to right, as the dendrogram draws them: (N,)."""
    from scipy.cluster.hierarchy import leaves_list

    return leaves_list(np.asarray(link, dtype=float))


def cut_height(link: np.ndarray, n_clusters: int) -> float:
    """A distance that cuts the tree into `n_clusters` (halfway between the merges around the cut)."""
    h = np.sort(np.asarray(link, dtype=float)[:, 2])  # (N-1,)
    N = len(h) + 1
    n = int(np.clip(n_clusters, 1, N))
    below = h[N - n - 1] if n < N else 0.0
    above = h[N - n] if n > 1 else 1.1 * h[-1]
    return float((below + above) / 2)


def cluster_labels(link: np.ndarray, n_clusters: int) -> np.ndarray:
    """(N,) labels from 1 of the cut into `n_clusters`: `analysis.cluster_layer`'s labels."""
    from scipy.cluster.hierarchy import fcluster

    return fcluster(np.asarray(link, dtype=float), t=n_clusters, criterion="maxclust")


def _cluster_colours(shown: np.ndarray) -> dict:
    """Cluster → colour, by first appearance along the display order: neighbours differ."""
    firsts = dict.fromkeys(np.asarray(shown).tolist())
    return {c: LINES[k % len(LINES)] for k, c in enumerate(firsts)}


def _runs(shown: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal labels."""
    edges = np.flatnonzero(np.diff(shown)) + 1
    bounds = [0, *edges.tolist(), len(shown)]
    return list(zip(bounds[:-1], bounds[1:]))


def _tick_size(n: int) -> int:
    return 11 if n <= 32 else 9 if n <= 64 else 7


# ---- maps and curves --------------------------------------------------------------------------
def embedding_scatter(xy: np.ndarray, layer_indices: list[int], color: np.ndarray | None = None,
                      color_name: str = "layer", title: str = "", categories: list[str] | None = None) -> go.Figure:
    """Every expert of every layer as one point of a 2-D map: xy (L, E, 2); colour (L, E) or by layer.

    With `categories`, `color` holds category codes: one trace (and legend entry) per category.
    """
    L, E = xy.shape[:2]
    layers = np.repeat(np.asarray(layer_indices), E)
    experts = np.tile(np.arange(E), L)
    if color is None and L <= len(QUALITATIVE):  # layers are categories: a colour and a legend entry each
        color, categories = np.repeat(np.arange(L), E), [str(i) for i in layer_indices]
    values = layers if color is None else np.asarray(color).reshape(-1)
    x, y, ids = xy[..., 0].reshape(-1), xy[..., 1].reshape(-1), np.stack([layers, experts], axis=1)
    scatter = go.Scattergl if L * E > 1000 else go.Scatter
    hover = "layer %{customdata[0]}, expert %{customdata[1]}<br>"
    if categories is None:
        bar = dict(title=color_name, **(dict(tickformat="d") if color is None else {}))  # layers: whole numbers
        traces = [scatter(x=x, y=y, mode="markers", customdata=ids,
                          marker=dict(color=values, colorscale=SEQUENTIAL, size=7, colorbar=bar),
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
                 yaxis: str = "value", y_range: tuple[float, float] | None = None) -> go.Figure:
    """One line per named curve across decoder layers (homogeneity, entropy, …); `y_range` fixes
    the axis to the quantity's whole range (so that a 0.03-bit ripple does not look like a cliff)."""
    fig = go.Figure([
        go.Scatter(x=layer_indices, y=np.asarray(v), mode="lines+markers", name=name) for name, v in curves.items()
    ])
    fig.update_layout(title=title, xaxis_title="decoder layer", yaxis_title=yaxis, showlegend=True,
                      xaxis=dict(tickmode="array", tickvals=list(layer_indices)) if len(layer_indices) <= 24 else None)
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
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
