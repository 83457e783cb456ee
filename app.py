"""moeviz dashboard: `streamlit run app.py`. Pages live in pages/ and call moeviz functions."""

import streamlit as st

st.set_page_config(page_title="moeviz", layout="wide")

st.sidebar.title("moeviz")
st.sidebar.text_input(
    "Model", value="demo", key="model_name",
    help="'demo' (the shipped model, offline), a local checkpoint path or a Hugging Face id",
)

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
