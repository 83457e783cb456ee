"""Helpers shared by the pages: cached model loading and the current settings."""

import os

import streamlit as st

import moeviz
from moeviz.stats import ExpertStats, StatsError, list_stats



def cache_dir() -> str:
    """Where calibrations are cached: ./cache, or $MOEVIZ_CACHE_DIR."""
    return os.environ.get("MOEVIZ_CACHE_DIR", "cache")


@st.cache_resource(max_entries=1, show_spinner="Loading the model…")
def load(name: str):
    """The model, its tokenizer, its adapter and its fingerprint, cached by name."""
    model, tokenizer = moeviz.load_model(name)
    return model, tokenizer, moeviz.get_adapter(model), moeviz.model_fingerprint(model)


def current_model():
    """(name, model, tokenizer, adapter, fingerprint) of the model named in the sidebar."""
    name = st.session_state.get("model_name", "demo") or "demo"
    try:
        return name, *load(name)
    except (ValueError, OSError) as err:
        st.error(str(err))
        st.stop()


@st.cache_resource(max_entries=8)
def load_stats(path: str) -> ExpertStats:
    return ExpertStats.load(path)


def stats_ui(fingerprint: str) -> ExpertStats | None:
    """A picker over this model's cached calibrations; returns the chosen stats."""
    found = list_stats(cache_dir(), fingerprint)
    if not found:
        st.info("No calibration of this model yet: run one on the Calibrate page.")
        return None
    labels = {str(path): _label(meta) for path, meta in found}
    path = st.selectbox("Calibration", list(labels), format_func=labels.get, key="stats_dir")
    try:
        return load_stats(path)
    except StatsError as err:
        st.error(str(err))
        return None


def calibration_sources(fingerprint: str) -> dict[str, str]:
    """The newest cached calibration of each text source of this model: source → directory."""
    sources = {}
    for path, meta in list_stats(cache_dir(), fingerprint):
        sources.setdefault((meta.get("calibration") or {}).get("data", "?"), str(path))
    return sources


def _label(meta: dict) -> str:
    cal = meta.get("calibration") or {}
    return (f"{cal.get('data', '?')}: {cal.get('num_samples', '?')} × {cal.get('seq_len', '?')} tokens, "
            f"seed {cal.get('seed', '?')}")
