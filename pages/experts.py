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
    "experts the statistic calls important; dark cells are pruning candidates. Click a cell for "
    "that expert's numbers."
)
log = persistent(st.toggle, "Log colour scale", key="expert_log", default=False,
                 help="for heavy-tailed statistics; the colours are clipped to the 2nd–98th percentile either way")
fig = plots.layer_expert_heatmap(stats.view(stat), stats.layer_indices, VIEWS[stat][0], stat, log=log)
event = st.plotly_chart(fig, key="expert_heatmap", on_select="rerun", selection_mode=("points",))
picked = plots.selected_cells(event)
if picked:
    st.session_state["expert_pick"] = picked[0]
pick = st.session_state.get("expert_pick")
if pick and pick[0] in stats.layer_indices and pick[1] < stats.num_experts:
    layer_idx, expert_idx = pick
    row = stats.layer_indices.index(layer_idx)
    st.subheader(f"Layer {layer_idx}, expert {expert_idx}")
    st.table({k: [f"{stats.view(k)[row, expert_idx]:.4g}"] for k in VIEWS})
