from pathlib import Path

import numpy as np
import streamlit as st

from moeviz import analysis, analysis_plots
from pages.common import (cache_dir, calibration_sources, current_model, finished, load_stats, persistent, poll,
                          stats_ui, submit)

name, skeleton, adapter, fingerprint = current_model()
st.title("Similarity")
stats = stats_ui(fingerprint)
if stats is None:
    st.stop()

c1, c2, c3 = st.columns(3)
space = persistent(c1.selectbox, "Feature space", options=analysis.SPACES, key="sim_space",
                   default="outputs" if stats.has_probes else "coactivation",
                     help="outputs: probe outputs; weights_invariant: unchanged by neuron permutations")
layer_idx = persistent(c2.selectbox, "Layer", options=stats.layer_indices, key="sim_layer", default=stats.layer_indices[0])
n_clusters = persistent(c3.slider, "Clusters", 2, stats.num_experts, key="sim_clusters",
                        default=max(2, stats.num_experts // 4))


WEIGHT_SPACES = ("weights", "weights_invariant", "router")  # read the weights: computed in the backend


@st.cache_data(max_entries=16)
def similarity(stats_dir: str, fingerprint: str, space: str) -> np.ndarray:
    return analysis.similarity(stats, space)


if space in WEIGHT_SPACES:
    out = Path(cache_dir()).resolve() / "similarity" / f"{fingerprint}-{space}.npy"
    if not out.exists():
        finished("similarity_job", f"The {space} similarity")
        if st.session_state.get("similarity_job"):
            poll(name, "similarity_job", "Reading the weights")
        elif st.button(f"Compute the {space} similarity (reads every expert's weights in the backend)"):
            st.session_state["similarity_job"] = submit(name, "similarity", space=space, out=str(out))
            st.rerun()
        st.stop()
    sim = np.load(out)
else:
    try:
        sim = similarity(st.session_state.get("stats_dir", ""), fingerprint, space)
    except ValueError as err:
        st.error(str(err))
        st.stop()
row = stats.layer_indices.index(layer_idx)
labels, link = analysis.cluster_layer(sim[row], n_clusters=n_clusters)
st.caption(
    "What am I looking at: how alike every pair of this layer's experts is in the chosen space "
    "(1 = the same), in the dendrogram's leaf order, so that clusters of alike experts form bright "
    "blocks on the diagonal (outlined). The dendrogram is cut (dashed line) into the chosen number "
    "of clusters, coloured alike in both. C-Prune keeps one expert per cluster."
)
wide = stats.num_experts > 32  # many leaves: one figure per row
left, right = (st.container(), st.container()) if wide else st.columns(2)
left.plotly_chart(analysis_plots.similarity_heatmap(sim[row], labels, f"Layer {layer_idx}", space, link=link),
                  key="sim")
right.plotly_chart(analysis_plots.dendrogram(link, f"Layer {layer_idx}: hierarchical clustering",
                                             n_clusters=n_clusters),
                   key="dendro")
scores = analysis.silhouette_by_count(sim[row], range(2, min(stats.num_experts, 17)))
if scores:
    best = max(scores, key=scores.get)
    st.write(f"Silhouette suggests **{best} clusters** in this layer (score {scores[best]:.2f}).")

st.subheader("All experts on one map")
method = st.radio("Map", ["pca", "umap"], horizontal=True, help="UMAP takes seconds (first use ~30 s)")
sources = calibration_sources(fingerprint)
colour = st.selectbox("Colour by", ["layer", "frequency", "cluster"] + (["main source"] if len(sources) > 1 else []),
                      help="main source: the calibration source that uses the expert most (needs two or more)",
                      key="map_colour")


features = (stats.probe_mean if stats.has_probes else stats["out_mean"]).numpy()  # (L, E, H)


@st.cache_data(max_entries=8, show_spinner="Embedding the experts…")
def embedding(stats_dir: str, method: str) -> np.ndarray:
    return analysis.embed_experts(features, method)


@st.cache_data(max_entries=8, show_spinner="Clustering all experts…")
def global_clusters(stats_dir: str, n_clusters: int) -> np.ndarray:
    return analysis.cluster_all_layers(features, n_clusters)


stats_dir = st.session_state.get("stats_dir", "")
xy = embedding(stats_dir, method)
color, categories = None, None
if colour == "frequency":
    color = stats.view("frequency")
elif colour == "cluster":
    color = global_clusters(stats_dir, n_clusters)
elif colour == "main source":
    categories, shares = analysis.specialisation({src: load_stats(path) for src, path in sources.items()})
    color = shares.argmax(0)
st.caption("What am I looking at: every expert of every layer, placed so that experts with alike "
           "mean outputs sit close together.")
st.plotly_chart(analysis_plots.embedding_scatter(xy, stats.layer_indices, color, colour, categories=categories),
                key="map")
