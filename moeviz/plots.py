"""Plotly figures of moeviz's arrays: the palette, the layer × expert grids of statistics and
plans, and quality against pruning ratio. The analysis's figures (similarity, dendrograms, maps,
curves across depth) are in `analysis_plots`. No Streamlit here: every figure is tested on its own.

Selectable layer × expert grids: plotly never selects heatmap cells, so an invisible
`go.Scatter(mode="markers")` on the cell centres carries (layer_idx, expert_idx) in `customdata`
and the hover text. It keeps `hoverinfo="none"` (with "skip" a click sends nothing), the
heatmap itself skips hover, and `hoverdistance=-1` makes the nearest centre, that is the cell
under the cursor, answer anywhere in it (checked in Chromium through Streamlit 1.67). The
default drag stays "zoom": under "select" a plain click clears the selection instead of making
one; box and lasso stay in the modebar. `selected_cells` reads the cells back from an event.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

SEQUENTIAL = "Viridis"  # perceptually uniform and readable with colour-vision deficiencies
QUALITATIVE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]  # Okabe–Ito
LINES = [c for c in QUALITATIVE if c != "#F0E442"]  # Okabe–Ito's yellow is unreadable as a thin line on white
KEPT, PRUNED = "#0072B2", "#E69F00"  # Okabe–Ito blue and orange: apart in hue and lightness


# ---- layer × expert grids ---------------------------------------------------------------------
def layer_expert_heatmap(
    values: np.ndarray,
    layer_indices: list[int],
    title: str,
    colorbar: str,
    hover_format: str = ".4g",
    *,
    clip: tuple[float, float] | None = (2.0, 98.0),
    log: bool = False,
) -> go.Figure:
    """A layer × expert heatmap of `values` (L, E), its cells selectable (see the module doc).

    The colour range stops at the `clip` percentiles (None: min to max) so that one outlier
    does not flatten every other cell; `log` colours by log10 (non-positive values take the
    smallest positive one's colour). The colour bar says both; the hover shows the raw value.
    """
    values = np.asarray(values, dtype=float)  # (L, E)
    z = _log10(values) if log else values
    zmin, zmax, low, high = _colour_range(z, clip)
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(values.shape[1]), y=[str(i) for i in layer_indices], colorscale=SEQUENTIAL,
        zmin=zmin, zmax=zmax, hoverinfo="skip",
        colorbar=_colorbar(colorbar, zmin, zmax, low, high, log, clip),
    ))
    text = [f"{colorbar}: {v:{hover_format}}" for v in values.ravel()]
    fig.add_trace(_cell_overlay(layer_indices, values.shape[1], text))
    return _grid_layout(fig, title, values.shape[1], len(layer_indices))


def plan_heatmap(pruned: dict[int, list[int]], layer_indices: list[int], num_experts: int,
                 title: str = "Pruning plan", *, toggled=(), changed=()) -> go.Figure:
    """The plan as a layer × expert grid in two colours, kept and pruned, with a legend.

    `toggled`: (layer_idx, expert_idx) pairs flipped by hand, marked with a ring. `changed`:
    pairs whose fate differs from a reference plan (the even calibration mix), outlined with a
    square. Cells are selectable like `layer_expert_heatmap`'s.
    """
    grid = np.zeros((len(layer_indices), num_experts))  # (L, E): 1 = pruned
    for row, layer_idx in enumerate(layer_indices):
        grid[row, list(pruned.get(layer_idx, []))] = 1.0
    toggled = {(int(layer), int(expert)) for layer, expert in toggled}
    fig = go.Figure(go.Heatmap(
        z=grid, x=np.arange(num_experts), y=[str(i) for i in layer_indices], zmin=0, zmax=1, showscale=False,
        colorscale=[[0, KEPT], [0.5, KEPT], [0.5, PRUNED], [1, PRUNED]], hoverinfo="skip",
    ))
    for name, colour in (("kept", KEPT), ("pruned", PRUNED)):  # legend entries only: no data
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip", showlegend=True,
                                 marker=dict(symbol="square", size=12, color=colour)))
    cells = set(map(tuple, _cells(layer_indices, num_experts).tolist()))
    side = min(cell_px(num_experts, len(layer_indices)))  # overlays stay inside their cells
    moved = sorted({(int(layer), int(e)) for layer, e in changed} & cells)
    if moved:
        fig.add_trace(go.Scatter(  # an outline, not a fill: the cell's colour still says kept or pruned
            x=[e for _, e in moved], y=[str(layer) for layer, _ in moved], mode="markers",
            name="changed against the even mix", showlegend=True, hoverinfo="skip",
            marker=dict(symbol="square-open", size=max(2.0, min(15.0, side - 2)), color="#000000",
                        line=dict(width=max(0.5, min(2.0, side / 8)))),
            selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
        ))
    hand = sorted(pair for pair in toggled if pair[0] in layer_indices and 0 <= pair[1] < num_experts)
    if hand:
        fig.add_trace(go.Scatter(  # a small white dot ringed in black: readable on both colours, the fate colour
            # around it; skip: clicks reach the overlay
            x=[e for _, e in hand], y=[str(layer) for layer, _ in hand], mode="markers", name="changed by hand",
            showlegend=True, hoverinfo="skip",
            marker=dict(symbol="circle", size=max(2.0, min(9.0, side * 0.5)), color="#FFFFFF",
                        line=dict(color="#000000", width=max(0.5, min(2.0, side / 8)))),
            selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),  # not dimmed by a click
        ))
    state = np.where(grid > 0, "pruned", "kept")
    cell = cell_px(num_experts, len(layer_indices))[0]
    if cell >= AIM_PX:
        text = [f"{s} (by hand)" if (layer, e) in toggled else s
                for (layer, e), s in zip(_cells(layer_indices, num_experts).tolist(), state.ravel().tolist())]
        fig.add_trace(_cell_overlay(layer_indices, num_experts, text))
    else:  # too fine to aim at: a point per stretch of AIM_PX, whose click opens the layer (thousands fewer to draw)
        stride = int(np.ceil(AIM_PX / cell))
        starts = np.arange(0, num_experts, stride)
        cells = np.array([(layer, e) for layer in layer_indices for e in starts])
        text = [f"experts {e}–{min(e + stride, num_experts) - 1}: {int(grid[layer_indices.index(layer), e:e + stride].sum())} "
                f"pruned; click to open the layer" for layer, e in cells.tolist()]
        fig.add_trace(go.Scatter(
            x=cells[:, 1] + (stride - 1) / 2, y=[str(i) for i in cells[:, 0]], mode="markers", customdata=cells,
            text=text, marker=dict(size=1, opacity=0), showlegend=False, hoverinfo="none",
            hovertemplate="layer %{customdata[0]}, %{text}<extra></extra>"))
    fig = _grid_layout(fig, title, num_experts, len(layer_indices))
    fig.update_layout(showlegend=True, height=fig.layout.height + 40, margin=dict(b=90),  # the legend at the foot,
                      legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, xanchor="left", x=0))  # under the axis title
    return fig


CLOSEUP_CELL = 12  # px: the smallest cell a person clicks without aiming twice


def closeup_rows(num_experts: int) -> int:
    """How many rows one layer's experts wrap into so that each cell is at least CLOSEUP_CELL px wide."""
    return -(-num_experts * CLOSEUP_CELL // GRID_WIDTH)


def plan_closeup(pruned: dict[int, list[int]], layer_indices: list[int], num_experts: int, *,
                 scores: np.ndarray | None = None, frequency: np.ndarray | None = None, by_score: bool = False,
                 toggled=(), title: str = "Close-up") -> go.Figure:
    """A few layers of the plan at a size where every cell can be clicked: each layer's experts
    wrapped into rows (`closeup_rows`) of cells at least 12 px wide, kept and pruned as in
    `plan_heatmap`, in expert order or, with `by_score`, the method's order (highest score first:
    the method's cut shows as the line where the colours change). `scores` and `frequency` are
    (len(layer_indices), E) rows for the hover. Cells are selectable like the overview's."""
    rows_per_layer = closeup_rows(num_experts)
    per_row = -(-num_experts // rows_per_layer)
    z, labels, xs, ys, data, text, hand_x, hand_y = [], [], [], [], [], [], [], []
    toggled = {(int(layer), int(e)) for layer, e in toggled}
    for i, layer in enumerate(layer_indices):
        order = (np.argsort(-scores[i], kind="stable") if by_score and scores is not None
                 else np.arange(num_experts)).tolist()
        rank = {e: r + 1 for r, e in enumerate(np.argsort(-scores[i], kind="stable").tolist())} if scores is not None else {}
        gone = set(pruned.get(layer, []))
        for r in range(rows_per_layer):
            part = order[r * per_row:(r + 1) * per_row]
            label = f"layer {layer}" + (f" · {r + 1}/{rows_per_layer}" if rows_per_layer > 1 else "")
            labels.append(label)
            z.append([1.0 if e in gone else 0.0 for e in part] + [np.nan] * (per_row - len(part)))
            for pos, e in enumerate(part):
                xs.append(pos)
                ys.append(label)
                data.append([layer, e])
                hover = [f"{'pruned' if e in gone else 'kept'}{' (by hand)' if (layer, e) in toggled else ''}"]
                if frequency is not None:
                    hover.append(f"frequency {frequency[i][e]:.3g}")
                if scores is not None:
                    hover.append(f"score {scores[i][e]:.4g}, rank {rank[e]} of {num_experts}")
                text.append("<br>".join(hover))
                if (layer, e) in toggled:
                    hand_x.append(pos)
                    hand_y.append(label)
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(per_row), y=labels, zmin=0, zmax=1, showscale=False, hoverinfo="skip",
                               colorscale=[[0, KEPT], [0.5, KEPT], [0.5, PRUNED], [1, PRUNED]]))
    for name, colour in (("kept", KEPT), ("pruned", PRUNED)):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
                                 marker=dict(symbol="square", size=12, color=colour)))
    side = min(GRID_WIDTH / per_row, 22.0)
    if hand_x:
        fig.add_trace(go.Scatter(x=hand_x, y=hand_y, mode="markers", name="changed by hand", hoverinfo="skip",
                                 marker=dict(symbol="circle", size=side * 0.5, color="#FFFFFF",
                                             line=dict(color="#000000", width=1.5)),
                                 selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1))))
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", customdata=data, text=text, showlegend=False,
                             marker=dict(size=1, opacity=0), hoverinfo="none",
                             hovertemplate="layer %{customdata[0]}, expert %{customdata[1]}<br>%{text}<extra></extra>"))
    fig.update_layout(
        title=title, hoverdistance=-1, showlegend=True, modebar=dict(orientation="v"),
        height=int(150 + len(labels) * side), margin=dict(l=110, r=50, t=60, b=80),
        legend=dict(orientation="h", yanchor="top", y=-40 / (len(labels) * side + 1), x=0),
        xaxis=dict(range=[-0.5, per_row - 0.5], title="position" + (" in the method's order" if by_score else ""),
                   showticklabels=not by_score),
        yaxis=dict(type="category", autorange="reversed"),
    )
    return fig


def selected_cells(event) -> list[tuple[int, int]]:
    """(layer_idx, expert_idx) of every point selected in a Streamlit event on a grid above.

    A browser sends `customdata` as {"0": layer, "1": expert}; AppTest injects lists.
    """
    if not event:
        return []
    cells = []
    for point in event["selection"]["points"]:
        data = point.get("customdata")
        if data is None:
            continue
        pair = (data["0"], data["1"]) if isinstance(data, dict) else tuple(data)[:2]
        cells.append((int(pair[0]), int(pair[1])))
    return cells


def _cells(layer_indices, num_experts) -> np.ndarray:
    """(L·E, 2) of (layer_idx, expert_idx), row-major like `values.ravel()`."""
    layers = np.repeat(np.asarray(layer_indices, dtype=int), num_experts)
    return np.stack([layers, np.tile(np.arange(num_experts), len(layer_indices))], axis=1)


AIM_PX = 8  # overview cells narrower than this cannot be aimed at: a click there opens the layer instead
GRID_WIDTH = 700  # px of plot area a grid gets at 1280 px with the sidebar open (measured: 702 px in Chromium)
ROW_HEIGHT = 22  # px per decoder layer in a grid (at least; a few layers get more)


def cell_px(num_experts: int, layers: int) -> tuple[float, float]:
    """(width, height) of one grid cell in px, as `_grid_layout` sizes the figure."""
    return GRID_WIDTH / num_experts, max(ROW_HEIGHT, 240 / layers)


def _cell_overlay(layer_indices, num_experts, text: list[str]) -> go.Scatter:
    """The grid's clickable points, one per cell centre. Plotly gives a click to the point whose
    marker edge is nearest (distance minus the radius, at least 3 px): markers wider than a cell
    tie with their neighbours and the neighbour may win (a click on expert 0 flipped expert 1).
    At 1 px the nearest centre wins, and on a grid the nearest centre is the cell under the pointer."""
    cells = _cells(layer_indices, num_experts)
    return go.Scatter(
        x=cells[:, 1], y=[str(i) for i in cells[:, 0]], mode="markers", customdata=cells, text=text,
        marker=dict(size=1, opacity=0), showlegend=False, hoverinfo="none",
        hovertemplate="layer %{customdata[0]}, expert %{customdata[1]}<br>%{text}<extra></extra>",
    )


def _grid_layout(fig: go.Figure, title: str, num_experts: int, layers: int) -> go.Figure:
    fig.update_layout(
        title=title, xaxis_title="expert", yaxis_title="decoder layer", hoverdistance=-1,
        yaxis=dict(type="category", autorange="reversed"), margin=dict(l=60, r=50, t=60, b=50),  # r: the toolbar
        xaxis=dict(range=[-0.5, num_experts - 0.5], dtick=1 if num_experts <= 32 else None),
        height=int(110 + layers * cell_px(num_experts, layers)[1]),
        modebar=dict(orientation="v"),  # beside the plot, not over its title
    )
    return fig


def _log10(values: np.ndarray) -> np.ndarray:
    positive = values[values > 0]
    floor = positive.min() if positive.size else 1.0
    return np.log10(np.maximum(values, floor))


def _colour_range(z: np.ndarray, clip) -> tuple[float, float, bool, bool]:
    """(zmin, zmax, clipped below, clipped above) of the colour scale."""
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    if clip is None:
        return lo, hi, False, False
    zmin, zmax = (float(p) for p in np.nanpercentile(z, clip))
    if zmax <= zmin:  # most cells equal: the percentiles say nothing
        return lo, hi, False, False
    return zmin, zmax, zmin > lo, zmax < hi


def _colorbar(title, zmin, zmax, low, high, log, clip) -> dict:
    ticks = np.linspace(zmin, zmax, 5)
    text = [f"{10 ** t if log else t:.3g}" for t in ticks]
    text[0], text[-1] = ("≤ " if low else "") + text[0], ("≥ " if high else "") + text[-1]
    notes = (["log scale"] if log else []) + ([f"clipped to {clip[0]:g}–{clip[1]:g}th pct"] if low or high else [])
    return dict(title=dict(text="<br>".join([title, *notes])), tickvals=ticks, ticktext=text)


# ---- quality against pruning ratio ------------------------------------------------------------
def ratio_curves(frame, metric: str, title: str = "") -> go.Figure:
    """`metric` against pruning ratio, one line per method (and mode), the original as a dashed
    line; recovered runs as a dotted line of their own beside the method's; ± one standard error
    as error bars where the runs have one (`{metric}_se`)."""
    fig = go.Figure()
    base = frame[frame["method"] == "original"]
    frame = frame.assign(recovered=frame["recovered"] if "recovered" in frame else False)
    pruned = frame[frame["method"] != "original"]
    for (method, mode, recovered), group in pruned.groupby(["method", "mode", "recovered"], dropna=False):
        group = group.sort_values("ratio")
        name = method if mode is None or mode != mode else f"{method} ({mode})"
        se = group[f"{metric}_se"] if f"{metric}_se" in group else None
        fig.add_trace(go.Scatter(x=group["ratio"], y=group[metric], mode="lines+markers",
                                 name=f"{name} + recovery" if recovered else name,
                                 line=dict(dash="dot") if recovered else None,
                                 error_y=None if se is None else dict(type="data", array=se, visible=True)))
    if len(base) and metric in base:
        fig.add_hline(y=float(base[metric].iloc[-1]), line_dash="dash", annotation_text="original")
    top = float(frame["ratio"].max()) if len(frame) else 1.0
    fig.update_layout(title=title, xaxis_title="pruning ratio", yaxis_title=metric, showlegend=True,
                      xaxis=dict(range=[-0.02, max(top, 0.25) * 1.1], tickformat=".0%"))
    return fig


RATIO_PANELS = (("kl", "KL", "KL to the original<br>(lower is better)", ".4g"),
                ("top1_agreement", "top-1 agreement", "top-1 agreement<br>(higher is better)", ".1%"))


def ratio_curve(curves: dict[str, list[dict]], current_ratio: float | None = None, points: list[dict] | None = None,
                title: str = "Estimated quality against pruning ratio") -> go.Figure:
    """The Prune page's estimate: KL (top panel) and top-1 agreement (bottom) against ratio.

    `curves`: {method: [dict(ratio, kl, top1_agreement), …]}, ratios as fractions (0.25 =
    25 %), one line per method. `current_ratio`: the slider, a vertical line. `points`:
    stored full evaluations, dict(method, ratio, kl, top1_agreement[, label]), as diamonds.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12)
    colour = {m: LINES[k % len(LINES)] for k, m in enumerate(curves)}
    for row, (key, short, name, fmt) in enumerate(RATIO_PANELS, start=1):
        for method, rows in curves.items():
            rows = sorted(rows, key=lambda r: r["ratio"])
            fig.add_trace(go.Scatter(
                x=[r["ratio"] for r in rows], y=[r.get(key) for r in rows], mode="lines+markers", name=method,
                legendgroup=method, showlegend=row == 1, line=dict(color=colour[method]),
                hovertemplate=f"{method}<br>ratio %{{x:.1%}}<br>{short}: %{{y:{fmt}}}<extra>estimate</extra>",
            ), row=row, col=1)
        if points:
            fig.add_trace(go.Scatter(
                x=[p["ratio"] for p in points], y=[p.get(key) for p in points], mode="markers",
                name="full evaluation", legendgroup="full evaluation", showlegend=row == 1,
                text=[p.get("label") or p.get("method", "") for p in points],
                marker=dict(symbol="diamond", size=11, color=[colour.get(p.get("method"), "#000000") for p in points],
                            line=dict(color="#000000", width=1)),
                hovertemplate=f"%{{text}}<br>ratio %{{x:.1%}}<br>{short}: %{{y:{fmt}}}<extra>full evaluation</extra>",
            ), row=row, col=1)
        fig.update_yaxes(title_text=name, row=row, col=1, **(  # each panel reaches its perfect value
            dict(tickformat=".0%", autorangeoptions=dict(include=[1.0])) if key == "top1_agreement"
            else dict(rangemode="tozero")))
    ratios = [r["ratio"] for rows in curves.values() for r in rows] + [p["ratio"] for p in points or []]
    top = max([*ratios, current_ratio or 0.0, 0.25])
    fig.update_xaxes(tickformat=".0%", range=[-0.02, top * 1.05 + 0.01])
    fig.update_xaxes(title_text="pruning ratio", row=2, col=1)
    if current_ratio is not None:
        fig.update_layout(
            shapes=[dict(type="line", xref="x", yref="paper", x0=current_ratio, x1=current_ratio, y0=0, y1=1,
                         line=dict(color="#000000", width=1.5, dash="dash"))],
            annotations=[dict(x=current_ratio, xref="x", y=1, yref="paper", yanchor="bottom", showarrow=False,
                              text=f"current: {current_ratio:.1%}")],
        )
    fig.update_layout(title=title, hovermode="closest", height=520, margin=dict(t=70, b=90),
                      legend=dict(title_text="method", orientation="h", yanchor="top", y=-0.14, x=0),
                      modebar=dict(orientation="v"))  # the legend below, the toolbar beside: the title stays clear
    return fig


def mix_tradeoff(rows: list[dict], a: str, b: str, current: float | None = None, tasks: bool = False) -> go.Figure:
    """Each held-out source's quality as the calibration mix moves from all-`b` (left) to all-`a`
    (right): KL to the original (top) and, with `tasks`, the demo tasks' accuracy (bottom), one
    line per source; `current` (the share of `a` now) as a vertical line and ringed points.
    Points carry their share as customdata: a click selects that mix."""
    from plotly.subplots import make_subplots

    panels = [("kl", "KL to the original", ".3f")] + ([("task", "task accuracy", ".2f")] if tasks else [])
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.12)
    rows = sorted(rows, key=lambda r: r["share"])
    names = list(rows[0]["sources"]) if rows else []
    for panel, (key, label, fmt) in enumerate(panels, start=1):
        for k, name in enumerate(names):
            values = [r["sources"][name].get(key) for r in rows]
            fig.add_trace(go.Scatter(
                x=[r["share"] for r in rows], y=values, customdata=[r["share"] for r in rows], mode="lines+markers",
                name=f"held-out {name}", legendgroup=name, showlegend=panel == 1, line=dict(color=LINES[k % len(LINES)]),
                marker=dict(size=10), hoverinfo="none",
                hovertemplate=f"{a} %{{x:.0%}}<br>{name}: %{{y:{fmt}}}<extra>click: take this mix</extra>",
                selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
            ), row=panel, col=1)
            if current is not None:
                here = min(rows, key=lambda r: abs(r["share"] - current))
                fig.add_trace(go.Scatter(
                    x=[here["share"]], y=[here["sources"][name].get(key)], mode="markers", name="current mix",
                    legendgroup="current", showlegend=panel == 1 and k == 0, hoverinfo="skip",
                    marker=dict(symbol="circle-open", size=18, color="#000000", line=dict(width=2.5)),
                ), row=panel, col=1)
        fig.update_yaxes(title_text=label, row=panel, col=1, rangemode="tozero")
    fig.update_xaxes(tickformat=".0%", range=[-0.04, 1.04])
    rest = "" if b == "the rest" else f" (the rest: {b})"
    fig.update_xaxes(title_text=f"share of {a} in the calibration{rest}", row=len(panels), col=1)
    if current is not None:
        fig.update_layout(shapes=[dict(type="line", xref="x", yref="paper", x0=current, x1=current, y0=0, y1=1,
                                       line=dict(color="#000000", width=1.5, dash="dash"))])
    fig.update_layout(title=f"What each source keeps as the mix moves from {b} to {a}", hovermode="closest",
                      clickmode="event+select", margin=dict(t=70))
    return fig
