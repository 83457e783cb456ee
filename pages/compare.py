from pathlib import Path

import streamlit as st

from moeviz import plots
from moeviz.runs import RunStore
from pages.common import cache_dir, current_model

name, skeleton, adapter, fingerprint = current_model()
st.title("Compare")
store = RunStore(Path(cache_dir()) / "runs.sqlite")
table = store.table(fingerprint=fingerprint)
if table.empty:
    st.info("No runs of this model yet: evaluate a plan on the Prune page, or run `moeviz sweep`.")
    st.stop()

st.caption("What am I looking at: every evaluated run of this model; the original is the baseline.")
st.dataframe(table, hide_index=True)
metrics = [c for c in table.columns if c not in ("id", "model", "method", "mode", "ratio", "scope", "calibration")
           and table[c].dtype.kind in "fi"]
default = "task_mean" if "task_mean" in metrics else "perplexity"
metric = st.selectbox("Metric", metrics, index=metrics.index(default))
st.plotly_chart(plots.ratio_curves(table, metric, f"{metric} against pruning ratio"), key="curves")

with st.expander("Delete a run"):
    run_id = st.selectbox("Run", table["id"].tolist())
    if st.checkbox(f"Yes, delete run {run_id}") and st.button("Delete"):
        store.delete(int(run_id))
        st.rerun()
