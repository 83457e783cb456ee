import hashlib
import json
import math
from pathlib import Path

import streamlit as st

from moeviz import analysis, analysis_plots, plots
from moeviz.calibrate import CalibConfig
from moeviz.methods import PlanConfig, get_method, method_names
from pages.common import cache_dir, calibration_sources, current_model, finished, load_stats, poll, stats_ui, submit

name, skeleton, adapter, fingerprint = current_model()
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
st.plotly_chart(analysis_plots.depth_curves(stats.layer_indices, {"mean similarity": h["mean_similarity"],
                                                                  "half-mass fraction": h["half_mass_fraction"]},
                                            "Homogeneity across depth", "value"), key="homogeneity")
st.plotly_chart(analysis_plots.depth_curves(stats.layer_indices, {"usage entropy": h["usage_entropy"]},
                                            "Router usage entropy (0 to log₂ E: all tokens to one expert, "
                                            "to all evenly)",
                                            "bits", y_range=(0, math.log2(stats.num_experts) * 1.02)), key="entropy")
layer_sim = analysis.layer_similarity(stats)
st.plotly_chart(analysis_plots.similarity_heatmap(layer_sim, None,
                                                  "Layer × layer similarity of mean expert outputs",
                                                  "cosine", axis="decoder layer", names=stats.layer_indices),
                key="layer_sim")



def specialisation_ui() -> None:
    st.subheader("Which experts serve which source")
    sources = calibration_sources(fingerprint)
    if len(sources) < 2:
        st.info("Calibrate this model on two or more sources (for the demo model: each demo domain, "
                "demo:arithmetic, demo:code, … on the Calibrate page) to see which experts each one uses.")
        return
    parts = [s for s in sources if "," not in s and s not in ("demo", "random")]  # not the mix of the others
    chosen = st.multiselect("Sources", list(sources), default=(parts if len(parts) >= 2 else list(sources))[:8],
                            key="sources")
    if len(chosen) < 2:
        return
    names, shares = analysis.specialisation({src: load_stats(sources[src]) for src in chosen})
    st.caption(
        "What am I looking at: each expert's usage split by calibration source (usage per token, so "
        f"sources of different sizes compare). A share of 1/{len(names)} means the expert serves "
        "every source alike; 1 means it serves this source only. The curve sums this up per layer: "
        "0 for no specialisation, 1 for experts that each serve one source."
    )
    source = st.selectbox("Share of", names, key="share_of")
    st.plotly_chart(plots.layer_expert_heatmap(shares[names.index(source)], stats.layer_indices,
                                               f"Share of each expert's usage due to {source}", "share"),
                    key="specialisation")
    st.plotly_chart(analysis_plots.depth_curves(stats.layer_indices,
                                                {"specialisation": analysis.specialisation_index(shares)},
                                                "Specialisation by source across depth", "index (0–1)"),
                    key="specialisation_depth")
    st.markdown("**Do the sources agree on what to prune?**")
    c1, c2 = st.columns(2)
    scored = [m for m in method_names() if not get_method(m).makes_plan]
    method = c1.selectbox("Method", scored, index=scored.index("mone") if "mone" in scored else 0, key="agree_method")
    ratio = c2.slider("Ratio", 0.0625, 0.75, 0.25, 0.0625, key="agree_ratio")
    names, overlap, _ = analysis.source_agreement({src: load_stats(sources[src]) for src in chosen},
                                                  PlanConfig(method, ratio=ratio))
    st.caption("What am I looking at: for every pair of calibration sources, the fraction of the experts "
               "one prunes that the other prunes too (1 = the same plan). Low values mean the decision "
               "depends on the calibration text: calibrate on text like the model's real use.")
    st.plotly_chart(analysis_plots.similarity_heatmap(overlap, None, f"{method} at {ratio:.0%}: pruned-set overlap",
                                                      "overlap", axis="source", names=names), key="agreement")


def stability_ui() -> None:
    st.subheader("Calibration stability")
    st.caption(
        "What am I looking at: how many calibration tokens a method needs before its decision stops "
        "changing. The calibration text is split into chunks; growing subsets (solid) and random "
        "resamples (dotted) are compared with all of it: the overlap of the experts pruned, and the "
        "rank correlation of the scores. 1 means the same decision as the full set."
    )
    cal = stats.meta.get("calibration") or {}
    scored = [m for m in method_names() if not get_method(m).makes_plan]
    methods = st.multiselect("Methods", scored, default=[m for m in ("mone", "reap", "frequency") if m in scored])
    c1, c2, c3 = st.columns(3)
    ratio = c1.slider("Ratio", 0.0625, 0.75, 0.25, 0.0625, key="stability_ratio")
    samples = c2.number_input("Sequences", 4, 100_000, max(4, int(cal.get("num_samples", 64))), key="stability_samples")
    chunks = c3.number_input("Chunks", 2, 64, min(16, int(samples)), key="stability_chunks")
    config = CalibConfig(data=cal.get("data", "demo"), num_samples=int(samples), seq_len=int(cal.get("seq_len", 128)),
                         seed=int(cal.get("seed", 0)))
    settings = dict(model=fingerprint, data=config.data, samples=config.num_samples, seq_len=config.seq_len,
                    seed=config.seed, chunks=int(chunks), methods=sorted(methods), ratio=ratio)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cache_dir()).resolve() / "stability" / f"{key}.json"
    if not out.exists() and methods and st.button(f"Measure on {config.data} ({config.num_samples} sequences)"):
        out.parent.mkdir(parents=True, exist_ok=True)
        st.session_state["stability_job"] = submit(
            name, "stability", config=dict(data=config.data, num_samples=config.num_samples, seq_len=config.seq_len,
                                           seed=config.seed), chunks=int(chunks), methods=methods, ratio=ratio, out=str(out))
    if st.session_state.get("stability_job"):
        poll(name, "stability_job", "Stability")
    finished("stability_job", "Stability")
    if not out.exists():
        return
    st.caption(f"Measured for these settings (kept in {out.parent.name}/{out.name}): change the ratio, the "
               "sequences, the chunks or the methods to measure again.")
    for method, rows in json.loads(out.read_text()).items():
        st.plotly_chart(analysis_plots.stability_curves(rows, f"{method}: agreement with the full calibration"),
                        key=f"stability_{method}")


stability_ui()
specialisation_ui()
