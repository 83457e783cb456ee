import streamlit as st

from moeviz import analysis, plots
from moeviz.stats import list_stats
from pages.common import cache_dir, current_model, load_stats, stats_ui

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

st.subheader("Which experts serve which source")
sources = {}  # the newest calibration of each text source
for path, meta in list_stats(cache_dir(), fingerprint):
    sources.setdefault((meta.get("calibration") or {}).get("data", "?"), str(path))
if len(sources) < 2:
    st.info("Calibrate this model on two or more sources (for the demo model: each demo domain, "
            "demo:arithmetic, demo:code, … on the Calibrate page) to see which experts each one uses.")
    st.stop()
chosen = st.multiselect("Sources", list(sources), default=list(sources)[:8])
if len(chosen) < 2:
    st.stop()
names, shares = analysis.specialisation({src: load_stats(sources[src]) for src in chosen})
st.caption(
    "What am I looking at: each expert's usage split by calibration source (usage per token, so "
    f"sources of different sizes compare). A share of 1/{len(names)} means the expert serves "
    "every source alike; 1 means it serves this source only. The curve sums this up per layer: "
    "0 for no specialisation, 1 for experts that each serve one source."
)
source = st.selectbox("Share of", names)
st.plotly_chart(plots.layer_expert_heatmap(shares[names.index(source)], stats.layer_indices,
                                           f"Share of each expert's usage due to {source}", "share"),
                key="specialisation")
st.plotly_chart(plots.depth_curves(stats.layer_indices, {"specialisation": analysis.specialisation_index(shares)},
                                   "Specialisation by source across depth", "index (0–1)"), key="specialisation_depth")
