import streamlit as st

from moeviz import plots
from moeviz.stats import VIEWS
from pages.common import current_model, persistent, stats_ui

name, skeleton, adapter, fingerprint = current_model()
st.title("Experts")
stats = stats_ui(fingerprint)
if stats is None:
    st.stop()

stat = persistent(st.selectbox, "Statistic", options=VIEWS, key="expert_stat", default="frequency",
                  format_func=lambda k: f"{k}: {VIEWS[k][0]}")
st.caption(
    "What am I looking at: one cell per expert (columns) of each MoE layer (rows), coloured by "
    f"the chosen statistic over {stats.meta['tokens']:,} calibration tokens. Bright cells are "
    "experts the statistic calls important; dark cells are pruning candidates. Click a cell, or "
    "choose the layer and expert below, for that expert's numbers."
)
log = persistent(st.toggle, "Log colour scale", key="expert_log", default=False,
                 help="for heavy-tailed statistics; the colours are clipped to the 2nd–98th percentile either way")
fig = plots.layer_expert_heatmap(stats.view(stat), stats.layer_indices, VIEWS[stat][0], stat, log=log)
event = st.plotly_chart(fig, key="expert_heatmap", on_select="rerun", selection_mode=("points",))
# A click sets the two choices below (once: the selection stays in the event across reruns, and
# a number typed after it wins); at 256 experts a cell is 2 px wide, so the number is the way in.
picked = plots.selected_cells(event)
if picked and picked[0] != st.session_state.get("expert_clicked"):
    st.session_state["expert_clicked"] = picked[0]
    if picked[0][0] in stats.layer_indices and picked[0][1] < stats.num_experts:
        st.session_state["expert_layer"], st.session_state["expert_number"] = picked[0]
c1, c2 = st.columns(2)
layer_idx = c1.selectbox("Layer", stats.layer_indices, key="expert_layer")
expert_idx = c2.number_input("Expert", 0, stats.num_experts - 1, key="expert_number")
row = stats.layer_indices.index(layer_idx)
st.subheader(f"Layer {layer_idx}, expert {expert_idx}")
st.table({k: [f"{stats.view(k)[row, expert_idx]:.4g}"] for k in VIEWS})
