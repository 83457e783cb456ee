"""Plotly figures of moeviz's arrays. No Streamlit here: every figure is tested on its own."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

SEQUENTIAL = "Viridis"  # perceptually uniform and readable with colour-vision deficiencies


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
    )
    return fig
