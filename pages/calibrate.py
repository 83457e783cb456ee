import pandas as pd
import streamlit as st

from moeviz.calibrate import CalibConfig
from moeviz.demo.corpus import DOMAINS
from moeviz.jobs import start_calibration
from moeviz.stats import list_stats
from pages.common import cache_dir, current_model

name, model, tokenizer, adapter, fingerprint = current_model()
st.title("Calibrate")
st.caption(
    "One pass over calibration text records, for every expert, how often the router picks it, "
    "with what weight, and what it outputs. The result is cached on disk; every other page reads it."
)


def settings_ui() -> CalibConfig:
    sources = ["demo", *[f"demo:{d}" for d in DOMAINS], "random", "a file or dataset…"]
    data = st.selectbox("Text", sources, help="demo domains, random token ids, or your own text")
    if data == "a file or dataset…":
        data = st.text_input("Path to a .txt/.jsonl file, or a dataset name (c4, wikitext2, …)", value="c4")
    c1, c2, c3 = st.columns(3)
    samples = c1.number_input("Sequences", 1, 100_000, 64)
    seq_len = c2.number_input("Tokens per sequence", 8, 32_768, 128)
    probes = c3.number_input("Probe tokens per layer", 0, 4096, 256,
                             help="every expert runs on this many sampled tokens (for similarities)")
    return CalibConfig(data=data, num_samples=int(samples), seq_len=int(seq_len),
                       probe_tokens=int(probes), cache_dir=cache_dir())


config = settings_ui()
if st.button("Calibrate", type="primary"):
    st.session_state["calibration_job"] = start_calibration(name, config)


@st.fragment(run_every=1)
def job_ui():
    job = st.session_state.get("calibration_job")
    if job is None:
        return
    status = job.status()
    total = max(status.get("total", 0), 1)
    if status["state"] == "failed":
        st.error(f"Calibration failed: {status.get('error')}")
    elif status["state"] == "done":
        st.success(f"Done: {status['path']}")
    else:
        st.progress(status.get("done", 0) / total, text=f"{status['state']}: {status.get('done', 0)}/{total} sequences")


job_ui()

st.subheader("Cached calibrations of this model")
rows = [dict(directory=str(path), **{k: meta["calibration"].get(k) for k in ("data", "num_samples", "seq_len", "seed", "probe_tokens")},
             tokens=meta.get("tokens")) for path, meta in list_stats(cache_dir(), fingerprint)]
st.dataframe(pd.DataFrame(rows), hide_index=True) if rows else st.write("None yet.")
