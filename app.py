"""moeviz dashboard: `streamlit run app.py [-- --model PATH]`. Pages live in pages/ and call
moeviz functions; the model's weights live in its backend process, never in this one."""

import streamlit as st

from pages.common import default_model

st.set_page_config(page_title="moeviz", layout="wide")

st.sidebar.title("moeviz")
model = st.sidebar.text_input(  # first from the URL, else the command line, else demo
    "Model", value=st.query_params.get("model", default_model()), key="model_input",
    help="'demo' (the shipped model, offline), a local checkpoint path or a Hugging Face id",
)
st.session_state["model_name"] = model.strip() or "demo"
st.query_params["model"] = st.session_state["model_name"]

page = st.navigation([
    st.Page("pages/overview.py", title="Overview", default=True),
    st.Page("pages/calibrate.py", title="Calibrate"),
    st.Page("pages/experts.py", title="Experts"),
    st.Page("pages/similarity.py", title="Similarity"),
    st.Page("pages/layers.py", title="Layers"),
    st.Page("pages/prune.py", title="Prune"),
    st.Page("pages/compare.py", title="Compare"),
])
page.run()
