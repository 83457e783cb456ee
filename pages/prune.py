import time
from pathlib import Path

import streamlit as st

from moeviz import plots
from moeviz.jobs import start_evaluation, start_export
from moeviz.methods import PlanConfig, get_method, make_plan, method_names
from moeviz.plan import PlanError
from moeviz.runs import RunStore
from pages.common import cache_dir, current_model, stats_ui

name, model, tokenizer, adapter, fingerprint = current_model()
st.title("Prune")
stats = stats_ui(fingerprint)
if stats is None:
    st.stop()


def settings_ui() -> PlanConfig:
    c1, c2, c3, c4 = st.columns(4)
    method = c1.selectbox("Method", method_names(), index=method_names().index("mone"),
                          format_func=lambda m: f"{m}: {get_method(m).doc}")
    ratio = c2.slider("Ratio", 0.0, 0.9, 0.25, 0.0625,
                      help="fraction of routed experts to prune (moe_pruner: of every expert row's weights)")
    scope = c3.radio("Scope", ["layer", "global"], horizontal=True)
    modes = ["remove", "novice", "drop", "merge"]
    mode = c4.selectbox("Mode", modes, index=modes.index(get_method(method).default_mode))
    linkage, representative = "average", "frequency"
    if method == "cprune":
        c1, c2 = st.columns(2)
        linkage = c1.radio("Linkage", ["average", "ward"], horizontal=True,
                           help="how cluster distances update as experts merge; the C-Prune authors' code uses ward")
        representative = c2.radio("Each cluster keeps", ["frequency", "medoid"], horizontal=True,
                                  help="its most used expert, or the one nearest the others (the paper)")
    return PlanConfig(method, ratio=ratio, scope=scope, mode=mode, linkage=linkage, representative=representative)


config = settings_ui()
if st.session_state.get("plan_settings") != config:  # new settings: forget the clicks
    st.session_state["plan_settings"], st.session_state["toggles"] = config, set()


try:
    plan = make_plan(stats, config, calibration=st.session_state.get("stats_dir"))
    for layer_idx, expert_idx in st.session_state["toggles"]:
        experts = set(plan.pruned.get(layer_idx, []))
        plan.pruned[layer_idx] = sorted(experts ^ {expert_idx})
    plan.merge_into = {} if st.session_state["toggles"] else plan.merge_into
    plan.validate()
except (PlanError, KeyError) as err:
    st.error(str(err))
    st.stop()

st.caption(
    "What am I looking at: the plan, one cell per expert; bright cells are pruned. Click a cell "
    "to keep or prune that expert by hand."
    + (f" Weight sparsity {plan.sparsity or plan.nm} inside every kept expert." if plan.sparsity or plan.nm else "")
)
fig = plots.plan_heatmap(plan.pruned, stats.layer_indices, stats.num_experts,
                         f"{plan.method}: {plan.num_pruned} experts pruned ({plan.mode})")
event = st.plotly_chart(fig, key="plan_chart", on_select="rerun", selection_mode=("points",))
clicked = tuple(tuple(p["customdata"]) for p in (event["selection"]["points"] if event else []))
if clicked != st.session_state.get("last_click", ()):  # a new click: flip those experts
    st.session_state["last_click"] = clicked
    if clicked:
        st.session_state["toggles"] ^= set(clicked)
        st.rerun()

plans_dir = Path(cache_dir()) / "plans"
c1, c2 = st.columns(2)
if c1.button("Apply and evaluate", type="primary"):
    plans_dir.mkdir(parents=True, exist_ok=True)
    plan_file = plan.save(plans_dir / f"{plan.method}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    data = (stats.meta.get("calibration") or {}).get("data", "demo")  # held-out text of the same source
    st.session_state["eval_job"] = start_evaluation(name, plan_file, plan.calibration,
                                                    Path(cache_dir()) / "runs.sqlite", ["--data", data])
out_dir = c2.text_input("Export to", value=str(Path(cache_dir()) / "exports" / f"{plan.method}-{plan.ratio:g}"))
if c2.button("Export checkpoint"):
    plans_dir.mkdir(parents=True, exist_ok=True)
    plan_file = plan.save(plans_dir / f"{plan.method}-export.json")
    st.session_state["export_job"] = start_export(name, plan_file, plan.calibration, out_dir)


@st.fragment(run_every=1)
def jobs_ui():
    for key, label in (("eval_job", "Evaluation"), ("export_job", "Export")):
        job = st.session_state.get(key)
        if job is None:
            continue
        status = job.status()
        if status["state"] == "failed":
            st.error(f"{label} failed: {status.get('error')}")
        elif status["state"] == "done" and key == "eval_job":
            run = RunStore(Path(cache_dir()) / "runs.sqlite").get(status["run_id"])
            shown = {k: v for k, v in run.metrics.items() if not isinstance(v, dict)}
            st.success(f"Evaluated as run {run.id}: see the Compare page.")
            st.dataframe([shown], hide_index=True)
        elif status["state"] == "done":
            st.success(f"Exported to {status['path']} (reload with {status['reload']}).")
        else:
            st.progress(status.get("done", 0) / max(status.get("total", 1), 1), text=f"{label}: {status['state']}…")


jobs_ui()
