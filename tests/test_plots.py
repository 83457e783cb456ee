"""The figures on their own: synthetic arrays, no model, no Streamlit."""

import time

import numpy as np
import pandas as pd
import pytest
from scipy.cluster.hierarchy import dendrogram as scipy_dendrogram
from scipy.cluster.hierarchy import fcluster

from moeviz import analysis, analysis_plots, plots


@pytest.fixture(scope="module")
def planted():
    """A similarity (40, 40) of experts drawn around 5 centres, clustered as the Similarity page does."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16))
    truth = rng.integers(0, 5, 40)
    sim = analysis.cosine_matrix(centres[truth] + 0.5 * rng.standard_normal((40, 16)))
    return sim, truth


def _leaf_trace(fig):
    return next(t for t in fig.data if t.mode == "markers" and t.y is not None and len(t.y) and not any(t.y))


def _leaf_x(fig):
    return np.asarray(_leaf_trace(fig).x, dtype=float)


def test_dendrogram_shows_and_labels_every_leaf(planted):
    sim, _ = planted
    _, link = analysis.cluster_layer(sim, n_clusters=5)
    fig = analysis_plots.dendrogram(link, "layer 0")
    leaves = _leaf_trace(fig)
    assert len(leaves.x) == 40 and sorted(leaves.customdata) == list(range(40))
    assert list(leaves.customdata) == scipy_dendrogram(link, no_plot=True)["leaves"]
    assert list(fig.layout.xaxis.ticktext) == [str(i) for i in leaves.customdata]
    x = _leaf_x(fig)
    lo, hi = fig.layout.xaxis.range
    assert lo <= x.min() - 5 and x.max() + 5 <= hi, "the outer leaves sit inside the axis"
    links = np.array([v for t in fig.data if t.mode == "lines" for v in t.x if v is not None])
    assert lo <= links.min() and links.max() <= hi
    ylo, yhi = fig.layout.yaxis.range
    assert ylo < 0 < link[:, 2].max() < yhi and fig.layout.yaxis.title.text.startswith("distance")
    named = analysis_plots.dendrogram(link, names=[f"L{i}" for i in range(40)], axis="layer")
    assert list(named.layout.xaxis.ticktext) == [f"L{i}" for i in leaves.customdata]


def test_dendrogram_links_are_few_traces():
    rng = np.random.default_rng(1)
    _, link = analysis.cluster_layer(analysis.cosine_matrix(rng.standard_normal((128, 8))), n_clusters=16)
    fig = analysis_plots.dendrogram(link, n_clusters=16)
    assert len(fig.data) <= len(plots.LINES) + 3  # one line trace per colour, merges, leaves
    assert sum(sum(v is None for v in t.x) for t in fig.data if t.mode == "lines") == 127  # every link drawn


def test_the_cut_splits_into_n_clusters_and_moves_with_n(planted):
    sim, _ = planted
    figs = {}
    for n in (3, 8):
        labels, link = analysis.cluster_layer(sim, n_clusters=n)
        cut = analysis_plots.cut_height(link, n)
        assert len(set(fcluster(link, cut, criterion="distance"))) == n
        np.testing.assert_array_equal(analysis_plots.cluster_labels(link, n), labels)
        fig = analysis_plots.dendrogram(link, n_clusters=n)
        line = fig.layout.shapes[0]
        assert line.y0 == line.y1 == pytest.approx(cut) and f"{n} clusters" in fig.layout.annotations[0].text
        leaf_colours = list(_leaf_trace(fig).marker.color)
        assert len(set(leaf_colours)) == min(n, len(plots.LINES))
        order = list(_leaf_trace(fig).customdata)
        for a, b in zip(order, order[1:]):  # neighbouring clusters never share a colour
            if labels[a] != labels[b]:
                assert leaf_colours[order.index(a)] != leaf_colours[order.index(b)]
        figs[n] = fig, leaf_colours
    assert figs[3][0].layout.shapes[0].y0 > figs[8][0].layout.shapes[0].y0
    assert figs[3][1] != figs[8][1]
    colours = {t.line.color for t in figs[8][0].data if t.mode == "lines"}
    assert analysis_plots.ABOVE_CUT in colours and len(colours) > 2
    assert analysis_plots.dendrogram(link).layout.shapes == ()  # no cut asked, none drawn


def test_similarity_heatmap_follows_the_dendrogram_and_outlines_clusters(planted):
    sim, truth = planted
    for n in (5, 9):
        labels, link = analysis.cluster_layer(sim, n_clusters=n)
        dendro = analysis_plots.dendrogram(link, n_clusters=n)
        heat = analysis_plots.similarity_heatmap(sim, labels, "layer 0", "outputs", link=link)
        order = list(_leaf_trace(dendro).customdata)
        assert list(heat.data[0].x) == [str(i) for i in order] == list(heat.data[0].y)
        np.testing.assert_allclose(heat.data[0].z, sim[np.ix_(order, order)])
        rects = heat.layout.shapes
        multi = [c for c in set(labels) if (labels == c).sum() > 1]
        assert len(rects) == len(multi)
        leaf_colour = dict(zip(order, _leaf_trace(dendro).marker.color))
        for rect in rects:  # a rectangle spans one cluster, in that cluster's dendrogram colour
            members = order[int(rect.x0 + 0.5):int(rect.x1 + 0.5)]
            assert len({labels[m] for m in members}) == 1 and (labels == labels[members[0]]).sum() == len(members)
            assert rect.line.color == leaf_colour[members[0]] and (rect.x0, rect.x1) == (rect.y0, rect.y1)
    # the same from the linkage alone, and an explicit order wins
    _, link = analysis.cluster_layer(sim, n_clusters=5)
    assert len(analysis_plots.similarity_heatmap(sim, link=link, n_clusters=5).layout.shapes) == 5
    assert analysis_plots.similarity_heatmap(sim[:16, :16]).layout.height is None  # Streamlit's default height
    tall = analysis_plots.similarity_heatmap(np.eye(64)).layout.height
    assert tall >= 64 * 12  # 64 labels, each with a row tall enough for its 9 px type
    assert list(analysis_plots.similarity_heatmap(sim, link=link, order=np.arange(40)[::-1]).data[0].x)[0] == "39"
    # alike experts sit together: the planted groups are contiguous in the leaf order
    order = analysis_plots.leaf_order(link)
    assert (np.diff(truth[order]) != 0).sum() == 4


def test_similarity_heatmap_keeps_its_old_calls():
    sim = np.eye(4)
    fig = analysis_plots.similarity_heatmap(sim, np.array([2, 1, 2, 1]), "layer 0", "outputs")
    assert fig.data[0].type == "heatmap" and fig.layout.xaxis.title.text == "expert"
    assert list(fig.data[0].x) == ["1", "3", "0", "2"] and len(fig.layout.shapes) == 2
    fig = analysis_plots.similarity_heatmap(sim, None, "layers", "cosine", axis="decoder layer", names=[3, 5, 7, 9])
    assert list(fig.data[0].x) == ["3", "5", "7", "9"] and fig.layout.shapes == ()


def test_colour_range_is_clipped_past_an_outlier():
    values = np.random.default_rng(0).uniform(0, 1, (48, 128))
    values[5, 17] = 1e3
    fig = plots.layer_expert_heatmap(values, list(range(48)), "frequency", "frequency")
    heat = fig.data[0]
    assert heat.zmax < 1.0 and heat.zmin > 0.0, "2nd–98th percentile, not the outlier"
    assert "clipped" in heat.colorbar.title.text
    assert heat.colorbar.ticktext[-1].startswith("≥") and heat.colorbar.ticktext[0].startswith("≤")
    assert "frequency: 1000" in fig.data[1].text[5 * 128 + 17], "the hover keeps the raw value"
    full = plots.layer_expert_heatmap(values, list(range(48)), "frequency", "frequency", clip=None).data[0]
    assert full.zmax == 1e3 and "clipped" not in full.colorbar.title.text
    assert not full.colorbar.ticktext[-1].startswith("≥")
    flat = plots.layer_expert_heatmap(np.ones((2, 8)), [0, 1], "f", "f").data[0]
    assert "clipped" not in flat.colorbar.title.text  # nothing to clip


def test_log_colour_scale_for_heavy_tails():
    values = np.array([[0.0, 1e-3, 1e-2], [1e-1, 1.0, 10.0]])
    fig = plots.layer_expert_heatmap(values, [0, 1], "f", "frequency", clip=None, log=True)
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z), np.log10([[1e-3, 1e-3, 1e-2], [1e-1, 1.0, 10.0]]))
    assert "log" in heat.colorbar.title.text and heat.colorbar.ticktext[-1] == "10"
    assert fig.data[1].text[0] == "frequency: 0"


def test_layer_expert_heatmap_cells_are_selectable():
    values = np.arange(2 * 8, dtype=float).reshape(2, 8)
    fig = plots.layer_expert_heatmap(values, [3, 5], "f", "frequency")
    heat, overlay = fig.data
    assert [t.type for t in fig.data] == ["heatmap", "scatter"] and fig.layout.yaxis.title.text == "decoder layer"
    assert heat.hoverinfo == "skip" and overlay.mode == "markers" and overlay.hoverinfo == "none"
    assert overlay.marker.opacity == 0 and fig.layout.hoverdistance == -1 and fig.layout.dragmode in (None, "zoom")
    assert [tuple(c) for c in overlay.customdata] == [(layer, e) for layer in (3, 5) for e in range(8)]
    assert overlay.text[9] == "frequency: 9" and "%{customdata[0]}" in overlay.hovertemplate


def test_plan_heatmap_is_two_colours_with_a_legend():
    fig = plots.plan_heatmap({0: [1, 2], 1: [7]}, [0, 1], 8, "plan", toggled={(1, 7), (0, 4), (9, 9)})
    heat, overlay = fig.data[0], fig.data[-1]
    assert heat.z[0][1] == 1 and heat.z[0][0] == 0 and heat.z[1].sum() == 1
    assert {c for _, c in heat.colorscale} == {plots.KEPT, plots.PRUNED} and heat.showscale is False
    assert heat.zmin == 0 and heat.zmax == 1 and heat.hoverinfo == "skip"
    legend = [t for t in fig.data if t.showlegend]
    assert [t.name for t in legend] == ["kept", "pruned", "changed by hand"] and fig.layout.showlegend
    assert [t.marker.color for t in legend[:2]] == [plots.KEPT, plots.PRUNED]
    hand = legend[2]
    assert sorted(zip(hand.y, hand.x)) == [("0", 4), ("1", 7)] and hand.hoverinfo == "skip"  # (9, 9) is off the grid
    assert overlay.type == "scatter" and overlay.mode == "markers" and overlay.hoverinfo == "none"
    assert [tuple(c) for c in overlay.customdata] == [(layer, e) for layer in (0, 1) for e in range(8)]
    assert overlay.text[1] == "pruned" and overlay.text[4] == "kept (by hand)"
    assert overlay.text[15] == "pruned (by hand)"
    assert [t.name for t in plots.plan_heatmap({0: [1]}, [0], 4).data if t.showlegend] == ["kept", "pruned"]


def test_selected_cells_reads_browser_and_apptest_events():
    browser = {"selection": {"points": [{"customdata": {"0": 3, "1": 12}}, {"x": 1}]}}
    assert plots.selected_cells(browser) == [(3, 12)]
    assert plots.selected_cells({"selection": {"points": [{"customdata": [1, 5]}]}}) == [(1, 5)]
    assert plots.selected_cells(None) == [] and plots.selected_cells({"selection": {"points": []}}) == []


def test_ratio_curve_marks_the_current_ratio():
    ratios = [0.5, 0.0, 0.25]
    curves = {"mone": [dict(ratio=r, kl=r, top1_agreement=1 - r / 2) for r in ratios],
              "frequency": [dict(ratio=r, kl=2 * r, top1_agreement=1 - r) for r in ratios]}
    points = [dict(method="mone", ratio=0.25, kl=0.3, top1_agreement=0.8, label="run 4")]
    fig = plots.ratio_curve(curves, 0.25, points)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 4 and [t.name for t in lines if t.showlegend] == ["mone", "frequency"]
    kl, agreement = lines[0], lines[2]
    assert list(kl.x) == [0.0, 0.25, 0.5] and list(kl.y) == [0.0, 0.25, 0.5] and kl.yaxis == "y"
    assert list(agreement.y) == [1.0, 0.875, 0.75] and agreement.yaxis == "y2"
    runs = [t for t in fig.data if t.name == "full evaluation"]
    assert len(runs) == 2 and list(runs[0].y) == [0.3] and list(runs[1].y) == [0.8] and runs[0].text == ("run 4",)
    assert runs[0].marker.color[0] == kl.line.color
    line = fig.layout.shapes[0]
    assert line.x0 == line.x1 == 0.25 and line.yref == "paper" and "25.0%" in fig.layout.annotations[0].text
    assert plots.ratio_curve(curves, 0.5).layout.shapes[0].x0 == 0.5
    assert plots.ratio_curve(curves).layout.shapes == ()
    assert fig.layout.xaxis.range[0] < 0 < 0.5 < fig.layout.xaxis.range[1]
    assert "lower is better" in fig.layout.yaxis.title.text and "higher is better" in fig.layout.yaxis2.title.text


def test_embedding_depth_stability_and_run_curves():
    xy = np.random.default_rng(0).standard_normal((2, 8, 2))
    fig = analysis_plots.embedding_scatter(xy, [0, 1])  # coloured by layer: a category each
    assert [t.name for t in fig.data] == ["0", "1"] and [len(t.x) for t in fig.data] == [8, 8]
    assert list(fig.data[1].customdata[1]) == [1, 1] and fig.data[0].marker.color != fig.data[1].marker.color
    many = analysis_plots.embedding_scatter(np.zeros((40, 4, 2)), list(range(40)))  # too many layers for categories
    assert len(many.data) == 1 and many.data[0].marker.colorbar.tickformat == "d"
    codes = np.array([[0] * 8, [1] * 4 + [0] * 4])
    fig = analysis_plots.embedding_scatter(np.zeros((2, 8, 2)), [0, 1], codes, "main source", categories=["a", "b"])
    assert [t.name for t in fig.data] == ["a", "b"] and [len(t.x) for t in fig.data] == [12, 4]
    runs = pd.DataFrame(dict(method=["original", "mone", "mone", "random"], mode=[None, "novice", "novice", "remove"],
                             ratio=[0.0, 0.5, 0.25, 0.25], task_mean=[0.99, 0.2, 0.47, 0.25]))
    fig = plots.ratio_curves(runs, "task_mean")
    assert [t.name for t in fig.data] == ["mone (novice)", "random (remove)"] and fig.layout.showlegend
    assert list(fig.data[0].x) == [0.25, 0.5] and list(fig.data[0].y) == [0.47, 0.2]  # sorted by ratio
    assert fig.layout.shapes[0].y0 == 0.99 and fig.layout.xaxis.range[0] < 0 < 0.5 < fig.layout.xaxis.range[1]
    assert fig.data[0].error_y.array is None  # no standard errors in these runs
    runs["task_mean_se"] = [0.01, 0.03, 0.04, 0.035]
    fig = plots.ratio_curves(runs, "task_mean")
    assert list(fig.data[0].error_y.array) == [0.04, 0.03] and fig.data[0].error_y.visible  # ± SE, in ratio order
    fig = analysis_plots.depth_curves([0, 1], {"mean similarity": [0.1, 0.2]})
    assert fig.layout.xaxis.title.text == "decoder layer" and list(fig.layout.xaxis.tickvals) == [0, 1]
    assert fig.layout.yaxis.range is None
    fig = analysis_plots.depth_curves([0, 1], {"usage entropy": [3.98, 3.95]}, y_range=(0, 4))
    assert list(fig.layout.yaxis.range) == [0, 4]  # the whole range of the entropy, not its ripple
    fig = analysis_plots.stability_curves([dict(tokens=10, overlap=0.5, rank_correlation=0.7)])
    assert [t.name for t in fig.data] == ["pruned-set overlap", "rank correlation"]


def test_figures_of_a_large_model_build_fast():
    """48 layers × 128 experts (Qwen3-30B-A3B's shape): build + serialise, as Streamlit does."""
    rng = np.random.default_rng(0)
    L, E = 48, 128
    sim = analysis.cosine_matrix(rng.standard_normal((E, 32)))
    labels, link = analysis.cluster_layer(sim, n_clusters=32)
    builds = {
        "layer × expert": lambda: plots.layer_expert_heatmap(rng.gamma(0.5, 1.0, (L, E)), list(range(L)), "f", "f",
                                                             log=True),
        "plan": lambda: plots.plan_heatmap({i: list(range(32)) for i in range(L)}, list(range(L)), E,
                                           toggled={(i, i) for i in range(L)}),
        "similarity": lambda: analysis_plots.similarity_heatmap(sim, labels, "layer 0", "outputs", link=link),
        "dendrogram": lambda: analysis_plots.dendrogram(link, n_clusters=32),
        "ratio curve": lambda: plots.ratio_curve(
            {m: [dict(ratio=r, kl=r, top1_agreement=1 - r) for r in np.linspace(0, 0.9, 15)] for m in "abcd"}, 0.25),
    }
    for name, build in builds.items():
        build().to_json()  # first use loads plotly's validators
        best = min(_timed(lambda: build().to_json()) for _ in range(3))
        assert best < 0.2, f"{name}: {best:.3f} s"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
