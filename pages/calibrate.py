from pathlib import Path

import pandas as pd
import streamlit as st

from moeviz.calibrate import CalibConfig
from moeviz.demo.corpus import DOMAINS
from moeviz.stats import list_stats
from pages.common import cache_dir, current_model, finished, persistent, poll, submit

name, skeleton, adapter, fingerprint = current_model()
st.title("Calibrate")
st.caption(
    "One pass over calibration text records, for every expert, how often the router picks it, "
    "with what weight, and what it outputs. The result is cached on disk; every other page reads it. "
    "The pass runs in the model's backend process, which holds the weights (on the GPU when there is one)."
)


def settings_ui() -> CalibConfig:
    sources = ["demo", *[f"demo:{d}" for d in DOMAINS], "demo:each", "random", "a file or dataset…",
               "several sources…"]
    labels = {"demo:each": "demo:each (one calibration per domain, to mix on the Prune page)"}
    data = persistent(st.selectbox, "Text", options=sources, key="cal_data", default="demo",
                      format_func=lambda s: labels.get(s, s),
                      help="demo domains, random token ids, or your own text; several sources are calibrated one "
                           "by one (the model loads once) and can be mixed at any shares on the Prune page")
    if data == "a file or dataset…":
        data = persistent(st.text_input, "Path to a .txt/.jsonl file, or a dataset name (c4, wikitext2, …)",
                          key="cal_custom", default="c4")
    elif data == "several sources…":
        data = persistent(st.text_input, "Sources as NAME=SOURCE, comma-separated", key="cal_several",
                          default="math=demo:arithmetic,code=demo:code",
                          help="each SOURCE as above: demo:DOMAIN, a .txt/.jsonl path or a dataset name")
    c1, c2, c3 = st.columns(3)
    samples = persistent(c1.number_input, "Sequences", 1, 100_000, key="cal_samples", default=64)
    seq_len = persistent(c2.number_input, "Tokens per sequence", 8, 32_768, key="cal_seq_len", default=128)
    probes = persistent(c3.number_input, "Probe tokens per layer", 0, 4096, key="cal_probes", default=256,
                             help="every expert runs on this many sampled tokens (for similarities)")
    return CalibConfig(data=data, num_samples=int(samples), seq_len=int(seq_len), probe_tokens=int(probes),
                       cache_dir=cache_dir())


config = settings_ui()
if st.button("Calibrate", type="primary"):
    job = submit(name, "calibrate", data=config.data, num_samples=config.num_samples, seq_len=config.seq_len,
                 probe_tokens=config.probe_tokens)
    if job:
        st.session_state["calibration_job"] = job


if st.session_state.get("calibration_job"):
    poll(name, "calibration_job", "Calibration")
if done := finished("calibration_job", "Calibration"):  # shown once, then gone; the list below has it
    paths = done.get("paths") or [done["path"]]
    if len(paths) > 1:  # offered for mixing; the calibration the pages use stays the one the user chose
        st.success(f"{'Found in the cache' if done['cached'] else 'Calibrated'}: {len(paths)} sources, "
                   f"{done['tokens']:,} tokens in all, one cache entry each. Mix them on the Prune page.")
        st.session_state.setdefault("stats_choice", paths[0])
    else:
        st.success(f"{'Found in the cache' if done['cached'] else 'Calibrated'}: {done['tokens']:,} tokens "
                   f"in {done['path']}. The other pages use it now.")
        st.session_state["stats_choice"] = paths[0]

st.subheader("Cached calibrations of this model")
st.caption(f"In {Path(cache_dir()).resolve()}.")
rows = [{"source": meta["calibration"].get("data"), "sequences": meta["calibration"].get("num_samples"),
         "tokens per sequence": meta["calibration"].get("seq_len"), "seed": meta["calibration"].get("seed"),
         "probe tokens": meta["calibration"].get("probe_tokens"), "tokens": meta.get("tokens"), "folder": path.name}
        for path, meta in list_stats(cache_dir(), fingerprint)]
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.write("None yet.")
