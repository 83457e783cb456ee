import pandas as pd
import streamlit as st

from moeviz import plots, router_norms
from pages.common import current_model

name, model, tokenizer, adapter, fingerprint = current_model()
st.title("Overview")
st.write(
    f"**{name}** — `{model.config.model_type}`, {len(adapter.layers)} MoE layers of "
    f"{adapter.num_experts[0]} routed experts, top-{adapter.top_k}."
)
st.dataframe(pd.DataFrame(adapter.summary()), hide_index=True)

st.subheader("Router rows")
st.caption(
    "What am I looking at: the length ‖w_e‖ of each expert's row in its layer's router. "
    "It is read from the weights alone, before any calibration; a much shorter row often "
    "means an expert the router rarely picks."
)
fig = plots.layer_expert_heatmap(router_norms(adapter), adapter.layer_indices, "Router row norms", "‖w_e‖")
st.plotly_chart(fig, key="router_norms")
