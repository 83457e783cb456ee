"""Helpers shared by the pages: cached model loading and the current settings."""

import streamlit as st

import moeviz


@st.cache_resource(max_entries=1, show_spinner="Loading the model…")
def load(name: str):
    """The model, its tokenizer and its adapter, cached by name."""
    model, tokenizer = moeviz.load_model(name)
    return model, tokenizer, moeviz.get_adapter(model)


def current_model():
    name = st.session_state.get("model_name", "demo") or "demo"
    try:
        return name, *load(name)
    except (ValueError, OSError) as err:
        st.error(str(err))
        st.stop()
