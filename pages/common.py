"""Helpers shared by the pages: the model's skeleton (no weights), its backend, cached stats,
and settings that survive page switches (and live in the URL)."""

import os
import sys
from pathlib import Path

import streamlit as st

import moeviz
from moeviz.backend import Backend, BackendError
from moeviz.checkpoint import Checkpoint
from moeviz.loading import load_skeleton, local_dir, model_fingerprint
from moeviz.stats import ExpertStats, StatsError, list_stats


def cache_dir() -> str:
    """Where calibrations are cached: ./cache, or $MOEVIZ_CACHE_DIR."""
    return os.environ.get("MOEVIZ_CACHE_DIR", "cache")


def default_model() -> str:
    """The model named on the command line (`streamlit run app.py -- --model PATH`), else demo."""
    args = sys.argv[1:]
    if "--model" in args and args.index("--model") + 1 < len(args):
        return args[args.index("--model") + 1]
    return "demo"


@st.cache_resource(max_entries=4, show_spinner="Reading the model's config…")
def describe(name: str):
    """The model's skeleton (meta device: no weights), adapter and fingerprint, by name."""
    skeleton = load_skeleton(name)
    return skeleton, moeviz.get_adapter(skeleton), model_fingerprint(name)


def current_model():
    """(name, skeleton, adapter, fingerprint) of the model named in the sidebar.

    The skeleton describes layers and shapes; the weights live in the model's backend.
    """
    name = st.session_state.get("model_name") or default_model()
    try:
        return name, *describe(name)
    except (ValueError, OSError, KeyError) as err:
        st.error(str(err))
        st.stop()


@st.cache_resource(max_entries=2, show_spinner=False)
def checkpoint(name: str) -> Checkpoint:
    """The model's safetensors files, read tensor by tensor (memory-mapped)."""
    return Checkpoint(local_dir(name))


@st.cache_resource(max_entries=2, show_spinner="Starting the model's backend…",
                   on_release=lambda backend: backend.stop())
def _backend(name: str, directory: str) -> Backend:
    return Backend.start(name, cache_dir=directory)


def backend(name: str) -> Backend:
    """The process that owns this model's weights, started on first need and again after a crash."""
    client = _backend(name, cache_dir())
    if client.alive():
        return client
    _backend.clear()  # gone (crashed or killed): the next call starts a new one
    return _backend(name, cache_dir())


def submit(name: str, kind: str, **args) -> str | None:
    """Start a job in the model's backend; an error message instead of a traceback."""
    try:
        with st.spinner(f"Handing the {kind} job to the model's backend (the model's first job starts it)…"):
            return backend(name).submit(kind, **args)
    except BackendError as err:
        st.error(f"The backend could not take the job: {err}")
        return None


def job_status(name: str, job_id: str) -> dict:
    """A job's state; a crashed backend is a failed job (the next job starts a new backend)."""
    try:
        return _backend(name, cache_dir()).status(job_id)
    except BackendError as err:
        return dict(state="failed", error=str(err))


def progress_ui(status: dict, label: str) -> None:
    """A progress bar with the step, counts and time left."""
    done, total = status.get("done") or 0, status.get("total") or 0
    text = f"{label}: {status.get('step') or status['state']}"
    if total:
        text += f" {done:g}/{total:g}"
    if status.get("seconds_left") is not None:
        text += f", about {status['seconds_left']:.0f} s left"
    st.progress(min(done / total, 1.0) if total else 0.0, text=text)


@st.cache_resource(max_entries=8)
def load_stats(path: str) -> ExpertStats:
    return ExpertStats.load(path)


def stats_ui(fingerprint: str) -> ExpertStats | None:
    """A picker over this model's cached calibrations; the choice is shared by every page."""
    found = list_stats(cache_dir(), fingerprint)
    if not found:
        st.info("No calibration of this model yet: run one on the Calibrate page.")
        return None
    labels = {str(path): _label(meta) for path, meta in found}
    by_name = {Path(path).name: path for path in labels}  # the URL keeps the directory's name
    chosen = st.session_state.get("stats_choice") or by_name.get(st.query_params.get("calibration", ""))
    index = list(labels).index(chosen) if chosen in labels else 0
    path = st.selectbox("Calibration", list(labels), index=index, format_func=labels.get, key="stats_dir")
    st.session_state["stats_choice"] = path
    st.query_params["calibration"] = Path(path).name
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


# ---- settings that survive page switches and live in the URL ------------------------------
def remembered(key: str, default):
    """A setting's last value in this session, else from the URL, else `default`."""
    store = st.session_state.setdefault("settings", {})
    if key not in store and key in st.query_params:
        text = st.query_params[key]
        try:
            store[key] = text == "True" if isinstance(default, bool) else type(default)(text)
        except (TypeError, ValueError):
            pass  # a hand-edited URL: keep the default
    return store.get(key, default)


def remember(key: str, value) -> None:
    st.session_state.setdefault("settings", {})[key] = value
    st.query_params[key] = str(value)


def persistent(widget, label: str, *args, key: str, default, options=None, **kwargs):
    """`widget` (st.selectbox, st.slider, …) whose value survives page switches and is kept in
    the URL, so a view can be bookmarked and shared. `options` for the choosing widgets."""
    value = remembered(key, default)
    if options is not None:
        options = list(options)
        index = options.index(value) if value in options else options.index(default)
        value = widget(label, options, *args, index=index, key=key, **kwargs)
    else:
        value = widget(label, *args, value=value, key=key, **kwargs)
    remember(key, value)
    return value


# ---- long work in the backend ---------------------------------------------------------------
@st.fragment(run_every=1)
def poll(name: str, key: str, label: str) -> None:
    """Progress of the backend job whose id is `st.session_state[key]`, polled every second
    (call it only while a job runs: an idle page does no work). When the job ends, its status
    goes to `st.session_state[key + "_status"]` and the whole page runs again."""
    status = job_status(name, st.session_state[key])
    if status["state"] in ("done", "failed"):
        st.session_state.pop(key)
        st.session_state[f"{key}_status"] = status
        st.rerun()
    progress_ui(status, label)


def finished(key: str, label: str) -> dict | None:
    """The result of the job under `key` once, when it has just ended (an error is shown)."""
    status = st.session_state.pop(f"{key}_status", None)
    if status is not None and status["state"] == "failed":
        st.error(f"{label} failed: {status.get('error')}")
        return None
    return status["result"] if status else None
