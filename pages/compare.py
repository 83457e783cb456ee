from pathlib import Path

import streamlit as st

from moeviz import plots
from moeviz.runs import RunStore, delta_table, recovery_pairs, run_name, setting, source_table, task_table
from pages.common import cache_dir, current_model

name, skeleton, adapter, fingerprint = current_model()
st.title("Compare")
store = RunStore(Path(cache_dir()) / "runs.sqlite")
runs = store.list(fingerprint=fingerprint)
if not runs:
    st.info("No runs of this model yet: evaluate a plan on the Prune page, or run `moeviz sweep`.")
    st.stop()

st.caption(
    "What am I looking at: every evaluated run of this model, named after what it is, against the original: "
    "each metric with its standard error (± over the evaluation's sequences for perplexity, binomial for task "
    "accuracy), and the change from the original. A difference smaller than about twice the standard error "
    "may be noise. A recovered run's perplexity is not compared: recovery trained on text of that source."
)
full = store.table(fingerprint=fingerprint)
settings = list(dict.fromkeys(full["evaluated_on"]))
latest = setting(max(runs, key=lambda r: r.id))  # opens on the setting last evaluated
chosen = st.selectbox("Evaluated on", settings, index=settings.index(latest) if latest in settings else 0,
                      key="compare_setting",
                      help="runs evaluated on other text or sizes are not comparable: one setting at a time")
shown = [run for run in runs if setting(run) == chosen]
st.table(delta_table(shown, [r for r in runs if r.method == "original"]).drop(columns="evaluated_on"),
         hide_index=True)
if len(tasks := task_table(shown)):
    st.markdown("**Each task's accuracy** (± its standard error)")
    st.table(tasks, hide_index=True)
st.download_button("Download every metric of every run (CSV)", full.to_csv(index=False), file_name="moeviz-runs.csv",
                   mime="text/csv")

metrics = [c for c in full.columns if c not in ("id", "model", "method", "mode", "ratio", "scope", "calibration",
                                                "parent_run", "recovery_steps", "recovery_minutes")
           and full[c].dtype.kind in "fi" and not c.endswith("_se")]
default = "task_mean" if "task_mean" in metrics else "perplexity"
metric = st.selectbox("Metric", metrics, index=metrics.index(default), key="compare_metric")
st.plotly_chart(plots.ratio_curves(full[full["evaluated_on"] == chosen], metric, f"{metric} against pruning ratio"),
                key="curves")

per_source = source_table(shown)
if not per_source.empty:
    st.subheader("Per held-out source")
    st.caption("Runs of a plan made from a calibration mix are evaluated on each of its sources: what each "
               "source keeps, against the original evaluated on the same text.")
    st.table(per_source, hide_index=True)

pairs = recovery_pairs(shown)
if not pairs.empty:
    st.subheader("Before and after recovery")
    st.caption("Each recovered run beside its plan before recovery and the original, evaluated the same way "
               "(Prune page: Recover, or `moeviz distill`).")
    st.table(pairs, hide_index=True)

with st.expander("Delete a run"):
    labels = {r.id: f"{r.id}: {run_name(vars(r))}" for r in runs}
    run_id = st.selectbox("Run", list(labels), format_func=labels.get)
    if st.checkbox(f"Yes, delete run {labels[run_id]}") and st.button("Delete"):
        store.delete(int(run_id))
        st.rerun()
