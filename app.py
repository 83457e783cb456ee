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
    st.session_state["model_name"] = st.session_state["model_input"] = st.session_state["model_input"].strip() or "demo"


def _take(model: str) -> None:
    st.session_state.update(model_name=model, model_input=model)


st.session_state.setdefault("model_input", st.session_state["model_name"])
st.sidebar.text_input(  # a callback, not the return value: st.navigation reruns would reset it
    "Model", key="model_input", on_change=_model_changed,
    help="a shipped demo model (offline: " + ", ".join(DEMO_MODELS) + "), a local checkpoint path "
         "or a Hugging Face id",
)
for name, demo in DEMO_MODELS.items():  # buttons, not links: a link opens a new tab (and a new session)
    st.sidebar.button(name, key=f"demo_{name}", type="tertiary", on_click=_take, args=(name,),
                      disabled=name == st.session_state["model_name"])
    st.sidebar.caption(demo.teaches)
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
