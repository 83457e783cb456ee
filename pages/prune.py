import hashlib
import json
import time
from importlib.util import find_spec
from pathlib import Path

import streamlit as st

from moeviz import plots
from moeviz.checkpoint import is_demo
from moeviz.data import mix_sources
from moeviz.export import checkpoint_mtp_layers, export_name
from moeviz.methods import PlanConfig, get_method, make_plan, method_names, method_scores
from moeviz.plan import STANDARD, PlanError, export_kind
from moeviz.runs import RunStore, against_original, plan_digest, recovery_pairs, run_name, setting
from moeviz.stats import ExpertStats, StatsError, list_stats, mix_label
from pages.common import (cache_dir, current_model, finished, job_status, load_stats, persistent, poll, progress_ui,
                          stats_ui, submit)

name, skeleton, adapter, fingerprint = current_model()
st.title("Prune")
stats = stats_ui(fingerprint)
if stats is None:
    st.stop()
STATS_DIR = st.session_state["stats_choice"]
RUNS = Path(cache_dir()).resolve() / "runs.sqlite"
SHARES = [0.0, 0.05, *(i / 10 for i in range(1, 10)), 0.95, 1.0]  # the trade-off view's mixes: the first
# source's share; finer at the ends, where a few percent of the other source changes most (demo-fine)
CURVE_RATIOS = [i / 16 for i in range(0, 15)]


def settings_ui() -> PlanConfig:
    c1, c2, c3, c4 = st.columns(4)
    names = method_names()
    method = persistent(c1.selectbox, "Method", options=names, key="prune_method", default="mone",
                        help="\n".join(f"- **{m}**: {get_method(m).doc}" for m in names))
    ratio = persistent(c2.slider, "Ratio", 0.0, 0.9, step=0.0625, key="prune_ratio", default=0.25,
                       help="fraction of routed experts to prune (moe_pruner: of every expert row's weights)")
    scope = persistent(c3.radio, "Scope", options=["layer", "global"], key="prune_scope", default="layer",
                       horizontal=True)
    modes = ["remove", "novice", "drop", "merge"]
    mode = persistent(c4.selectbox, "Mode", options=modes, key=f"prune_mode_{method}",
                      default=get_method(method).default_mode)
    linkage, representative, counts = "average", "frequency", "free"
    if scope == "global" and not get_method(method).makes_plan:
        counts = persistent(st.radio, "Experts kept per layer", options=["free", "equal", "4", "8", "16"],
                            key="prune_counts", default="free", horizontal=True,
                            format_func=lambda c: {"free": "as the threshold falls", "equal": "equal (a standard "
                                                   "checkpoint)"}.get(c, f"a multiple of {c}"),
                            help="uneven counts export as moeviz-only checkpoints (or expert substitution for "
                                 "novices); a multiple of N suits expert parallelism over N GPUs")
    if method == "cprune":
        c1, c2 = st.columns(2)
        linkage = persistent(c1.radio, "Linkage", options=["average", "ward"], horizontal=True, key="prune_linkage",
                             default="average",
                           help="how cluster distances update as experts merge; the C-Prune authors' code uses ward")
        representative = persistent(c2.radio, "Each cluster keeps", options=["frequency", "medoid"], horizontal=True,
                                    key="prune_rep", default="frequency",
                                  help="its most used expert, or the one nearest the others (the paper)")
    st.caption(f"**{method}**: {get_method(method).doc}")
    return PlanConfig(method, ratio=ratio, scope=scope, mode=mode, linkage=linkage, representative=representative,
                      counts=counts)


# ---- the calibration mix ----------------------------------------------------------------
def mix_ui(stats):
    """Other calibrations to mix with the chosen one: one slider per source (its share of the
    tokens, normalised); moving one re-plans at once from the cached sums, no job.
    Returns (stats, the jobs' spec: a directory or [[directory, share], …], the even mix or None)."""
    found = {str(path): meta for path, meta in list_stats(cache_dir(), fingerprint)
             if not (meta.get("calibration") or {}).get("sequential")}
    others = [p for p in found if p != STATS_DIR and found[p].get("stats_version") == stats.meta.get("stats_version")
              and bool((found[p].get("calibration") or {}).get("probe_tokens")) == stats.has_probes]  # mixable
    if not others:
        return stats, STATS_DIR, None
    remembered_mix = [p for p in st.session_state.get("mix_choice", []) if p in others]
    chosen = st.multiselect("Mix with other calibrations", others, default=remembered_mix, key="mix_with",
                            format_func=lambda p: _source(found[p]),
                            help="What survives pruning depends on the calibration text: mix sources at any "
                                 "shares without calibrating again (the statistics are sums over tokens)")
    st.session_state["mix_choice"] = chosen
    if not chosen:
        return stats, STATS_DIR, None
    paths = [STATS_DIR, *chosen]
    for key, value in st.session_state.pop("pending_mix", {}).items():  # a mix taken from the trade-off view
        st.session_state[key] = value
    columns = st.columns(len(paths))
    weights = [col.slider(_source(found.get(p, stats.meta)), 0.0, 1.0, step=0.01, key=f"mix_{Path(p).name}",
                          **({} if f"mix_{Path(p).name}" in st.session_state else dict(value=1.0)))
               for col, p in zip(columns, paths)]
    if sum(weights) == 0:
        st.error("Every share is zero: give at least one source a share.")
        st.stop()
    shares = [w / sum(weights) for w in weights]
    st.caption("Shares of the calibration tokens: " + ", ".join(f"{_source(found.get(p, stats.meta))} {s:.0%}"
                                                               for p, s in zip(paths, shares))
               + ". Outlined cells change fate against the even mix.")
    try:
        mixed = ExpertStats.mix([(load_stats(p), w) for p, w in zip(paths, shares)])
        even = ExpertStats.mix([(load_stats(p), 1.0) for p in paths])
    except StatsError as err:
        st.error(str(err))
        st.stop()
    return mixed, [[p, s] for p, s in zip(paths, shares)], even


def _source(meta: dict) -> str:
    cal = meta.get("calibration") or {}
    return cal.get("data", "?") if isinstance(cal, dict) else "a mix"


stats, STATS, EVEN = mix_ui(stats)
STATS_LABEL = mix_label(STATS)
config = settings_ui()
if st.session_state.get("plan_settings") != (config, STATS_LABEL):  # new settings or calibration: forget the clicks
    st.session_state.update(plan_settings=(config, STATS_LABEL), toggles=set(), history=[], last_selection=())


def sequential_ui():
    """MoE-Pruner's sequential mode: statistics calibrated layer by layer, each layer pruned before
    the next sees it (a calibration of its own, at this ratio). Returns (stats, directory) or None."""
    if config.method != "moe_pruner" or EVEN is not None or not persistent(
            st.toggle, "Sequential: score each layer on the outputs of the pruned layers before it", key="sequential",
            default=False, help="MoE-Pruner as fusion_bench and Wanda's code run it; calibrates again, layer by layer"):
        return None
    cal = stats.meta.get("calibration") or {}
    same = {k: cal.get(k) for k in ("data", "num_samples", "seq_len", "seed")}
    for path, meta in list_stats(cache_dir(), fingerprint):
        mine = meta.get("calibration") or {}
        if {k: mine.get(k) for k in same} == same and (mine.get("sequential") or {}).get("sparsity") == config.ratio:
            return load_stats(str(path)), str(path)
    finished("sequential_job", "The sequential calibration")
    if st.session_state.get("sequential_job"):
        poll(name, "sequential_job", "Sequential calibration")
    elif st.button(f"Calibrate sequentially at {config.ratio:.0%} ({same['num_samples']} × {same['seq_len']} tokens "
                   f"of {same['data']}, layer by layer)"):
        st.session_state["sequential_job"] = submit(name, "calibrate", **same, probe_tokens=0, layer_by_layer=True,
                                                    sequential_sparsity=config.ratio)
        st.rerun()
    st.stop()


if (sequential := sequential_ui()) is not None:
    stats, STATS = sequential  # the plan's masks come from the sequential statistics
    STATS_LABEL = STATS


# ---- the ratio curve ------------------------------------------------------------------
def curve_ui() -> None:
    """Quality against ratio for this method (and baselines on demand), computed once in the
    backend per (calibration, method, mode, scope) and kept on disk."""
    baselines = persistent(st.toggle, "Also the baselines (frequency, random)", key="curve_baselines", default=False)
    methods = [config.method] + [m for m in ("frequency", "random") if baselines and m != config.method]
    curves, missing = {}, []
    for method in methods:
        out = _curve_file(method)
        if out.exists():
            curves.update(json.loads(out.read_text()))
        else:
            missing.append(method)
    if missing:
        jobs = st.session_state.get("curve_jobs")
        if not jobs:
            if st.button("Estimate quality at every ratio", help="KL to the original and top-1 agreement on a small "
                                                                "held-out batch, each ratio's plan applied in place "
                                                                "in the backend"):
                st.session_state["curve_jobs"] = [submit(  # one job, so one bar and one time estimate
                    name, "curve", stats=STATS, methods=missing, ratios=CURVE_RATIOS, mode=config.mode,
                    scope=config.scope, out=str(_curve_file("{method}")))]
                st.rerun()
        else:
            curve_job_ui(jobs)
    if curves:
        points = [dict(method=r["method"], ratio=r["ratio"], kl=r.get("kl"), top1_agreement=r.get("top1_agreement"),
                       label=run_name(r)) for r in _stored_runs()
                  if r["method"] in curves and r.get("calibration") == STATS_LABEL]  # the same calibration only
        st.plotly_chart(plots.ratio_curve(curves, config.ratio, points), key="ratio_curve")
        st.caption("What am I looking at: how far the model under each ratio's plan drifts from the original "
                   "(KL, lower is better; top-1 agreement, higher is better) on a small held-out batch. Look for "
                   "the knee, where quality starts to fall; the dashed line is the slider. Diamonds are full "
                   "evaluations already stored.")


def _curve_file(method: str) -> Path:
    """Where a method's curve is kept: named by the calibration, mode, scope and ratios, then the method."""
    key = json.dumps(dict(stats=STATS, mode=config.mode, scope=config.scope, ratios=CURVE_RATIOS), sort_keys=True)
    return Path(cache_dir()).resolve() / "curves" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{method}.json"


@st.fragment(run_every=1)
def curve_job_ui(jobs: list[str]) -> None:
    """Polls the backend while the estimate runs (one job for every method not yet estimated)."""
    statuses = [job_status(name, job) for job in jobs]
    if all(s["state"] in ("done", "failed") for s in statuses):
        st.session_state.pop("curve_jobs", None)
        errors = [s.get("error") for s in statuses if s["state"] == "failed"]
        if errors:
            st.session_state["curve_error"] = errors[0]
        st.rerun()
    running = next((s for s in statuses if s["state"] == "running"), statuses[0])
    progress_ui(running, "Estimating the curve")


def _stored_runs() -> list[dict]:
    table = RunStore(RUNS).table(fingerprint=fingerprint) if RUNS.exists() else None
    return [] if table is None or table.empty else table.to_dict("records")


# ---- the plan, clickable ---------------------------------------------------------------
def flip(selection: list) -> None:
    """Flip the experts of a click, box or lasso on a plan chart. A flip changes the figure, and a
    changed figure is a new chart whose selection starts empty: each selection is taken once."""
    if selection:
        st.session_state["history"].append(set(st.session_state["toggles"]))
        st.session_state["toggles"] ^= set(selection)


def open_layer(selection: list) -> None:
    """A click on an overview whose cells are too small to aim at opens the clicked layer in the
    close-up, where every cell can be clicked (a box opens the layers it spans)."""
    selection = tuple(selection)
    if not selection:
        st.session_state["last_selection"] = ()
    elif selection != st.session_state.get("last_selection", ()):
        layers = sorted({layer for layer, _ in selection})
        st.session_state.update(last_selection=selection, closeup_range=(layers[0], layers[-1]),
                                closeup_opened=st.session_state.get("closeup_opened", 0) + 1)  # a new slider


SMALL = plots.cell_px(stats.num_experts, len(stats.layer_indices))[0] < plots.AIM_PX  # a click opens a layer


def take_clicks() -> None:
    """A chart's selection is in session state when the run starts: flip (or open) now, before the
    plan is made and drawn, so that one run, not two, shows what a click did."""
    overview = plots.selected_cells(st.session_state.get("plan_chart"))
    if SMALL:
        open_layer(overview)
    else:
        flip(overview)
    flip(plots.selected_cells(st.session_state.get("closeup_chart")))


take_clicks()
try:
    plan = make_plan(stats, config, calibration=STATS_LABEL)
    changed = set()  # against the even mix: what the mix decides
    if EVEN is not None:
        even = make_plan(EVEN, config)
        changed = {(layer, e) for layer in stats.layer_indices
                   for e in set(plan.pruned.get(layer, [])) ^ set(even.pruned.get(layer, []))}
except (PlanError, KeyError) as err:
    st.error(str(err))
    plan = None
invalid = None  # hand edits the model cannot take yet (a group-limited router's groups lose unequal numbers)
if plan is not None:
    for layer_idx, expert_idx in st.session_state["toggles"]:
        plan.pruned[layer_idx] = sorted(set(plan.pruned.get(layer_idx, [])) ^ {expert_idx})
    if st.session_state["toggles"]:
        plan.merge_into = {}
        plan.method = f"{config.method} (edited)"  # stored and named apart from the method's own plan
    try:
        plan.validate()
    except PlanError as err:  # the edits stay on screen, to be completed or undone
        invalid = str(err)
        st.warning(f"{invalid} Keep editing (or Undo); evaluation and export wait for a plan the model can take.")


def closeup_ui(plan) -> None:
    """A few layers at a size where every cell can be clicked (at least 12 px), in step with the
    overview: the same plan, edits, undo and reset; optionally in the method's score order."""
    layers = stats.layer_indices
    c1, c2 = st.columns([3, 1])
    wanted = st.session_state.get("closeup_range", (layers[0], layers[0]))  # the slider's, or a click's
    if not set(wanted) <= set(layers):  # another model's or calibration's
        wanted = (layers[0], layers[0])
    lo, hi = (c1.select_slider("Close-up of layers", options=layers, value=wanted,
                               key=f"closeup_layers_{st.session_state.get('closeup_opened', 0)}",
                               help="one layer or a range (up to 8), every cell large enough to click")
              if len(layers) > 1 else (layers[0], layers[0]))
    st.session_state["closeup_range"] = (lo, hi)
    shown = [layer for layer in layers if lo <= layer <= hi][:8]
    scored = not get_method(config.method).makes_plan
    by_score = c2.toggle("In the method's order", key="closeup_by_score", disabled=not scored,
                         help="highest score first: the method's cut is where the colours change")
    rows = [layers.index(layer) for layer in shown]
    scores = method_scores(stats, config)[rows] if scored else None
    fig = plots.plan_closeup(plan.pruned, shown, stats.num_experts, scores=scores,
                             frequency=stats.frequency[rows].numpy(), by_score=by_score and scored,
                             toggled=st.session_state["toggles"],
                             title=f"Close-up: layer{'s' * (len(shown) > 1)} {', '.join(map(str, shown))}")
    st.plotly_chart(fig, key="closeup_chart", on_select="rerun", selection_mode=("points", "box", "lasso"))


plan_area = st.container()  # the plan across the page's width; the ratio curve in a row of its own below
with plan_area:
    if plan is not None:
        sparsity = f" Weight sparsity {plan.sparsity or plan.nm} inside every kept expert." if plan.sparsity or plan.nm else ""
        st.caption("What am I looking at: the plan, one cell per expert. "
                   + ("A click opens that layer in the close-up below, where each expert can be kept or pruned "
                      "by hand; " if SMALL else
                      "Click a cell to keep or prune that expert by hand (or in the close-up below); ")
                   + "drag a box or lasso (modebar) to flip several; ringed cells were changed by hand." + sparsity)
        fig = plots.plan_heatmap(plan.pruned, stats.layer_indices, stats.num_experts,
                                 f"{plan.method}: {plan.num_pruned} experts pruned ({plan.mode})",
                                 toggled=st.session_state["toggles"], changed=changed)
        st.plotly_chart(fig, key="plan_chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
        c1, c2, c3 = st.columns([2, 2, 3])
        c1.metric("Experts pruned", plan.num_pruned)
        if c2.button("Undo", disabled=not st.session_state["history"]):
            st.session_state["toggles"] = st.session_state["history"].pop()
            st.session_state["last_selection"] = ()
            st.rerun()
        if c3.button("Reset to the method's plan", disabled=not st.session_state["toggles"]):
            st.session_state["history"].append(set(st.session_state["toggles"]))
            st.session_state.update(toggles=set(), last_selection=())
            st.rerun()
        if st.session_state["toggles"]:  # the hand edits in words: what a click did, and what the plan holds
            st.caption("Changed by hand: " + "; ".join(
                f"layer {layer}: {', '.join(str(e) for e in sorted(e for l2, e in st.session_state['toggles'] if l2 == layer))}"
                for layer in sorted({layer for layer, _ in st.session_state["toggles"]})))
        closeup_ui(plan)
if error := st.session_state.pop("curve_error", None):
    st.error(f"The estimate failed: {error}")
curve_ui()

if plan is None or invalid:
    st.stop()
st.session_state.update(current_plan=json.loads(plan.to_json()), current_plan_stats=STATS)  # for the Trace page


# ---- the trade-off between sources ---------------------------------------------------------
def tradeoff_ui() -> None:
    """Each source's held-out quality at this method and ratio, along mixes from all of one
    source (or the rest) to all of another: computed in the backend once, cached; the current
    mix is marked; a click on a point takes that mix."""
    st.subheader("Trade-off between sources")
    finished("tradeoff_job", "The trade-off")  # a failure is shown; a result is the file below
    paths = [p for p, _ in STATS]
    found = {str(path): meta for path, meta in list_stats(cache_dir(), fingerprint)}
    names = [_source(found[p]) for p in paths]
    names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]  # unique keys
    first = st.selectbox("Trade off", range(len(paths)), format_func=lambda i: names[i], key="tradeoff_source",
                         help="this source against the others (mixed at their current relative shares)")
    rest = [i for i in range(len(paths)) if i != first]
    weights = [STATS[i][1] for i in rest]
    weights = [w / sum(weights) for w in weights] if sum(weights) else [1 / len(rest)] * len(rest)
    b_name = names[rest[0]] if len(rest) == 1 else "the rest"
    b_name = b_name if b_name != names[first] else f"{b_name} (other)"
    a_spec, b_spec = [[paths[first], 1.0]], [[paths[i], w] for i, w in zip(rest, weights)]
    tasks = is_demo(name) and st.toggle("With the demo tasks' accuracy (slower)", key="tradeoff_tasks")
    data = {names[first]: _heldout([found[paths[first]]]), b_name: _heldout([found[paths[i]] for i in rest])}
    args = dict(a=[names[first], a_spec], b=[b_name, b_spec], config=_jsonable(config), shares=SHARES, data=data,
                tasks=tasks, num_samples=8, seq_len=int((stats.meta.get("calibration") or [{}])[0].get("seq_len", 128)),
                task_examples=50)
    out = Path(cache_dir()).resolve() / "tradeoffs" / (hashlib.sha256(json.dumps(args, sort_keys=True).encode())
                                                      .hexdigest()[:16] + ".json")
    current = STATS[first][1]
    if out.exists():
        rows = json.loads(out.read_text())
        event = st.plotly_chart(plots.mix_tradeoff(rows, names[first], b_name, current, tasks), key="tradeoff_chart",
                                on_select="rerun", selection_mode="points")
        picked = [p["x"] for p in (event or {}).get("selection", {}).get("points", []) if "x" in p]
        if not picked:  # the figure changed (the ring moved): the same point may be picked again
            st.session_state.pop("tradeoff_picked", None)
        if picked and abs(picked[0] - current) > 1e-9 and picked[0] != st.session_state.get("tradeoff_picked"):
            st.session_state["tradeoff_picked"] = picked[0]
            share = picked[0]  # this source's share; the others keep their proportions
            st.session_state["pending_mix"] = {f"mix_{Path(paths[first]).name}": share, **{
                f"mix_{Path(paths[i]).name}": round((1 - share) * w, 4) for i, w in zip(rest, weights)}}
            st.rerun()
        st.caption(f"What am I looking at: the plan of {config.method} at {config.ratio:.1%} made from each mix of "
                   f"{names[first]} and {b_name}, applied in place in the backend; each held-out source's KL to "
                   "the original (lower is better)" + (" and its demo task's accuracy" if tasks else "")
                   + ". The ring is the current mix; click a point to take that mix.")
    elif st.session_state.get("tradeoff_job"):
        poll(name, "tradeoff_job", "Trade-off")
    elif st.button(f"Compute the trade-off ({len(SHARES)} mixes, in the backend)"):
        st.session_state["tradeoff_job"] = submit(name, "tradeoff", out=str(out), **args)
        st.rerun()


def _heldout(metas: list[dict]) -> str:
    """One held-out source for calibrations: their union when they are demo domains."""
    data = [(m.get("calibration") or {}).get("data", "demo") for m in metas]
    if all(d.startswith("demo:") for d in data):
        return "demo:" + ",".join(sorted({x for d in data for x in d.removeprefix("demo:").split(",") if x}))
    return data[0]


def _jsonable(config) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


if EVEN is not None:
    tradeoff_ui()


# ---- evaluate and export, in the backend -------------------------------------------------
def eval_settings_ui() -> dict:
    calibration = stats.meta.get("calibration") or {}
    calibration = calibration[0] if isinstance(calibration, list) else calibration  # a mix: its first source's
    mixed = [m for m in stats.meta.get("mix") or [] if m["share"] > 0]
    data = mix_sources(mixed) if mixed else calibration.get("data", "demo")  # held-out text of the same source(s)
    c1, c2, c3 = st.columns(3)
    samples = persistent(c1.number_input, "Held-out sequences", 4, 10_000, key="eval_samples", default=32,
                              help="more give a tighter perplexity (its standard error is shown)")
    seq_len = persistent(c2.number_input, "Tokens per sequence", 16, 32_768, key="eval_seq_len",
                         default=int(calibration.get("seq_len", 128)))
    demo = is_demo(name)
    tasks = persistent(c3.text_input, "Tasks", key="eval_tasks", default="demo" if demo else "",
                          help="'demo' (the demo model's five tasks), lm-eval task names (comma-separated), or empty")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    st.caption(f"Evaluated on held-out text of the calibration's own source ({data}), against the original "
               "model evaluated the same way (stored once).")
    return dict(data=data, num_samples=int(samples), seq_len=int(seq_len), demo_tasks="demo" in names,
                task_examples=100, lm_eval_tasks=[t for t in names if t != "demo"])


eval_config = eval_settings_ui()
c1, c2 = st.columns(2)
if c1.button("Apply and evaluate", type="primary"):
    job = submit(name, "evaluate", plan=json.loads(plan.to_json()), stats=STATS, runs=str(RUNS),
                 **eval_config)
    if job:
        st.session_state["eval_job"] = job
        st.session_state.pop("eval_job_error", None)
kind = export_kind(plan, getattr(skeleton.config, "quantization_config", None))
out_dir = c2.text_input("Export to", value=str(Path(cache_dir()) / "exports" / export_name(name, plan)),
                        key=f"export_dir_{plan_digest(plan)}")  # follows the plan; a typed path stays with it
c2.caption(f"Exports as **{kind.name}**: {kind.reason}. Loads with {kind.loaders}.")
mtp = None
if mtp_found := checkpoint_mtp_layers(name, adapter):  # DeepSeek-V3's model.layers.61 and the like
    mtp = c2.radio(f"Multi-token-prediction layers in the files ({', '.join(map(str, mtp_found))})",
                   ["prune", "drop"], horizontal=True, key="export_mtp",
                   help="when the plan changes the expert count: cut them to the same count (largest router rows; "
                        "they cannot be calibrated), or leave them out (num_nextn_predict_layers 0). "
                        "Novice and drop exports keep them whole either way.")
if c2.button("Export checkpoint"):
    job = submit(name, "export", plan=json.loads(plan.to_json()), stats=STATS, out=str(Path(out_dir).resolve()),
                 runs=str(RUNS), mtp=mtp if kind.name == STANDARD else None)
    if job:
        st.session_state["export_job"] = job
        st.session_state.pop("export_job_error", None)
if result := st.session_state.pop("export_job_result", None):  # beside the button that asked for it
    c2.success(f"Exported to {result['path']} as a {result['kind']} checkpoint, with its model card "
               f"(README.md). Loads with {result['loaders']}.")
    st.session_state["verify_target"] = result
if target := st.session_state.get("verify_target"):  # the last export: checked where it will be served
    engines = ["transformers" if target["kind"] == STANDARD else "moeviz"] + (["vllm"] if find_spec("vllm") else [])
    v1, v2 = c2.columns([1, 2])
    engine = v2.selectbox("Verify in", engines, key="verify_engine", label_visibility="collapsed",
                          help="the export's files first (checksums, every tensor, every expert the plan keeps), then "
                               "this engine's greedy tokens and log-probabilities on held-out prompts against the plan "
                               "applied in place")
    if v1.button("Verify", help=f"check {target['path']} as it will be served"):
        if job := submit(name, "verify", export=target["path"], engine=engine):
            st.session_state["verify_job"] = job
            st.session_state.pop("verify_job_error", None)
            st.session_state.pop("verify_job_result", None)
    if checked := st.session_state.get("verify_job_result"):
        if checked.get("problems"):
            c2.error("The files are not whole:\n\n" + "\n".join(f"- {line}" for line in checked["problems"]))
        else:
            (c2.success if checked["ok"] else c2.error)(checked["summary"] + " (also in the card and the lineage)")


@st.fragment(run_every=1)
def jobs_ui():
    """Polls the backend while a job runs (only then: an idle page does no work)."""
    for key, label in (("eval_job", "Evaluation"), ("export_job", "Export"), ("verify_job", "Verification"),
                       ("recover_job", "Recovery")):
        job = st.session_state.get(key)
        if job is None:
            continue
        status = job_status(name, job)
        if status["state"] == "failed":  # kept on the page (below) until a job of that kind starts again
            st.session_state.pop(key)
            st.session_state[f"{key}_error"] = f"{label} failed: {status.get('error')}"
            st.rerun()  # a whole run: the polling stops with the last job
        elif status["state"] == "done":
            st.session_state.pop(key)
            st.session_state[f"{key}_result"] = status["result"]
            st.rerun()
        else:
            progress_ui(status, label)


def recover_ui(run) -> None:
    """Recovery of an evaluated run: distil the pruned model from the original for a few minutes."""
    st.markdown("**Recover**: fine-tune the pruned model against the original for a few minutes (MoE-Pruner's "
                "expert-wise distillation: only what pruning touched trains), then evaluate it the same way.")
    c1, c2, c3 = st.columns([1, 1, 2])
    minutes = persistent(c1.number_input, "Minutes", 0.5, 600.0, key="recover_minutes", default=2.0, step=0.5)
    lr = persistent(c2.number_input, "Learning rate", 1e-6, 1e-2, key="recover_lr",
                    default=1e-3 if name.startswith("demo") else 1e-4, format="%.0e",
                    help="the demo models learn at 1e-3; large models want 1e-5 to 1e-4")
    c3.write("")
    if c3.button(f"Recover run {run.id}"):
        out = Path(cache_dir()).resolve() / "recovered" / f"run-{run.id}-{int(time.time())}"
        setting = {k: v for k, v in run.metrics["eval"].items() if k in eval_config}  # as the run was evaluated
        job = submit(name, "recover", plan=json.loads(plan.to_json()), stats=STATS, runs=str(RUNS), out=str(out),
                     minutes=float(minutes), lr=float(lr), **{**eval_config, **setting})
        if job:
            st.session_state["recover_job"] = job
            st.session_state.pop("recover_job_error", None)
            st.rerun()  # to poll it: the jobs' fragment ran above
    if error := st.session_state.get("recover_job_error"):
        st.error(error)  # beside the button that started it


if any(st.session_state.get(k) for k in ("eval_job", "export_job", "verify_job", "recover_job")):
    jobs_ui()
for key in ("eval_job", "export_job", "verify_job"):
    if error := st.session_state.get(f"{key}_error"):
        st.error(error)
recover_shown = False
if result := st.session_state.get("eval_job_result"):
    store = RunStore(RUNS)
    run, baseline = store.get(result["run_id"]), store.get(result["baseline_id"])
    st.success(f"Evaluated as run {run.id} ({run_name(run.__dict__)})" + (" — already stored" if result["cached"] else "")
               + f" on {setting(run)}: see the Compare page for every run.")
    st.table(against_original(run, baseline), hide_index=True)
    changes = plan is not None and (plan.num_pruned or plan.sparsity or plan.nm)
    if changes and run.metrics.get("plan_digest") == plan_digest(plan) and not st.session_state.get("recover_job"):
        recover_ui(run)
        recover_shown = True
if not recover_shown and (error := st.session_state.get("recover_job_error")):
    st.error(error)
shown_run = (st.session_state.get("eval_job_result") or {}).get("run_id")
if (result := st.session_state.get("recover_job_result")) and result.get("parent_id") != shown_run:
    st.session_state.pop("recover_job_result")  # it ended while another run was shown: said once
    st.info(f"The recovery of run {result.get('parent_id')} finished as run {result['run_id']}: see the Compare page.")
elif result:  # the recovery of the run shown above
    store = RunStore(RUNS)
    if result.get("kept") == "pruned":
        st.warning(f"Recovery made the model worse ({result['why']}): not stored as a run. The pruned model, "
                   f"unchanged, is run {result['parent_id']}, at {result['checkpoint']}.")
    else:
        st.success(f"Recovered as run {result['run_id']}, saved to {result['checkpoint']}"
                   + (f" ({result['why']})." if result.get("why") else "."))
        pairs = recovery_pairs(store.list(fingerprint=fingerprint))
        st.table(pairs[pairs["run"] == result["run_id"]].drop(columns=["run", "plan"]), hide_index=True)

