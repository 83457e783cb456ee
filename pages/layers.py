import streamlit as st

from moeviz import analysis, plots
from pages.common import current_model, stats_ui

name, model, tokenizer, adapter, fingerprint = current_model()
st.title("Layers")
stats = stats_ui(fingerprint)
if stats is None:
    st.stop()

space = "outputs" if stats.has_probes else "coactivation"
h = analysis.homogeneity(stats, analysis.similarity(stats, space))
st.caption(
    f"What am I looking at: for each MoE layer, how alike its experts are (mean pairwise {space} "
    "similarity), how evenly the router spreads tokens (entropy of expert frequencies, in bits) and "
    "the fraction of experts that carry half of the routed tokens. C-Prune reports deeper layers to "
    "be more homogeneous: they can give up more experts."
)
st.plotly_chart(plots.depth_curves(stats.layer_indices, {"mean similarity": h["mean_similarity"],
                                                         "half-mass fraction": h["half_mass_fraction"]},
                                   "Homogeneity across depth", "value"), key="homogeneity")
st.plotly_chart(plots.depth_curves(stats.layer_indices, {"usage entropy": h["usage_entropy"]},
                                   "Router usage entropy", "bits"), key="entropy")
layer_sim = analysis.layer_similarity(stats)
st.plotly_chart(plots.similarity_heatmap(layer_sim, None, "Layer × layer similarity of mean expert outputs",
                                         "cosine", axis="decoder layer", names=stats.layer_indices),
                key="layer_sim")
