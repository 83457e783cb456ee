import pandas as pd
import streamlit as st

from moeviz import plots, router_norms
from pages.common import checkpoint, current_model

SUMMARY_COLUMNS = {"layer_idx": "layer", "num_experts": "routed experts", "top_k": "top-k", "hidden_size": "hidden size",
                   "intermediate_size": "expert width", "layout": "expert layout",
                   "expert_params": "routed expert parameters", "shared_params": "shared expert parameters"}

name, skeleton, adapter, fingerprint = current_model()
st.title("Overview")
st.write(
    f"**{name}** — `{skeleton.config.model_type}`, {len(adapter.layers)} MoE layers of "
    f"{adapter.num_experts[0]} routed experts, top-{adapter.top_k}."
)
st.markdown(
    "**Where to start:** 1. *Calibrate* — one pass over some text records what every expert does "
    "(on the demo model, the defaults take about half a minute on two CPU cores). 2. *Experts*, *Similarity*, *Layers* — "
    "which experts matter, which are alike, how layers differ. 3. *Prune* — pick a method and a "
    "ratio, click experts in or out, evaluate, and compare the runs on *Compare*."
)
st.dataframe(pd.DataFrame(adapter.summary()).rename(columns=SUMMARY_COLUMNS), hide_index=True)

st.subheader("Router rows")
st.caption(
    "What am I looking at: the length ‖w_e‖ of each expert's row in its layer's router. "
    "It is read from the weights alone, before any calibration; a much shorter row often "
    "means an expert the router rarely picks."
)
try:
    norms = router_norms(adapter, checkpoint(name))
except (KeyError, OSError) as err:
    st.info(f"The router rows could not be read from the checkpoint's files: {err}")
else:
    fig = plots.layer_expert_heatmap(norms, adapter.layer_indices, "Router row norms", "‖w_e‖")
    st.plotly_chart(fig, key="router_norms")
