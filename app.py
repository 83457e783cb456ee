"""moeviz dashboard: `streamlit run app.py [-- --model PATH]`. Pages live in pages/ and call
moeviz functions; the model's weights live in its backend process, never in this one."""

import streamlit as st

from moeviz.demo import DEMO_MODELS
from pages.common import default_model

st.set_page_config(page_title="moeviz", layout="wide")

st.sidebar.title("moeviz")
if "model_name" not in st.session_state:  # first from the URL, else the command line, else demo
    st.session_state["model_name"] = st.query_params.get("model", default_model())


def _model_changed() -> None:
    st.session_state["model_name"] = st.session_state["model_input"].strip() or "demo"


st.sidebar.text_input(  # a callback, not the return value: st.navigation reruns would reset it
    "Model", value=st.session_state["model_name"], key="model_input", on_change=_model_changed,
    help="a shipped demo model (offline: " + ", ".join(DEMO_MODELS) + "), a local checkpoint path "
         "or a Hugging Face id",
)
st.sidebar.caption("\n\n".join(f"[{name}](?model={name}): {demo.teaches}" for name, demo in DEMO_MODELS.items()))
st.query_params["model"] = st.session_state["model_name"]

page = st.navigation([
    st.Page("pages/overview.py", title="Overview", default=True),
    st.Page("pages/calibrate.py", title="Calibrate"),
    st.Page("pages/experts.py", title="Experts"),
    st.Page("pages/similarity.py", title="Similarity"),
    st.Page("pages/layers.py", title="Layers"),
    st.Page("pages/prune.py", title="Prune"),
    st.Page("pages/trace.py", title="Trace"),
    st.Page("pages/compare.py", title="Compare"),
])
page.run()
