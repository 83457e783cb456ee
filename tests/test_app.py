"""The dashboard through Streamlit's AppTest, on a tiny model (no browser)."""

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from moeviz.calibrate import CalibConfig, calibrate
from moeviz.tiny import tiny_model

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_model("mixtral").save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_caches(tmp_path, monkeypatch):
    import streamlit as st

    monkeypatch.setenv("MOEVIZ_CACHE_DIR", str(tmp_path / "cache"))
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


def _app(model_dir, page=None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["model"] = str(model_dir)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert not at.exception, at.exception
    return at


def _wait(at, key: str, timeout: float = 180) -> dict:
    """Wait for the backend job whose id the page keeps in session state under `key`."""
    import pages.common as common

    job, name = at.session_state[key], at.session_state["model_name"]
    deadline = time.time() + timeout
    while (status := common.job_status(name, job))["state"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.3)
    assert status["state"] == "done", status
    return status


def _button(at, label: str):
    return next(b for b in at.button if b.label.startswith(label))


def test_overview_shows_the_layers(tiny_dir):
    at = _app(tiny_dir)
    assert at.title[0].value == "Overview"
    table = at.dataframe[0].value
    assert list(table["layer"]) == [0, 1] and set(table["routed experts"]) == {8}  # words, not snake_case
    assert "top-2" in at.markdown[0].value


def test_unsupported_model_is_an_error_not_a_crash(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    at = _app(tmp_path / "llama")
    assert "Unsupported architecture" in at.error[0].value


def test_calibrate_page_runs_a_job_and_lists_it(tiny_dir):
    at = _app(tiny_dir, "pages/calibrate.py")
    at.selectbox[0].select("random").run()
    at.number_input[0].set_value(4).run()
    at.number_input[1].set_value(16).run()
    at.button[0].click().run()
    _wait(at, "calibration_job")
    at.run()
    assert not at.exception
    assert at.success and "Calibrated" in at.success[0].value
    assert len(at.dataframe[0].value) == 1


def test_experts_page_shows_heatmaps_and_one_expert(tiny_dir, tmp_path):
    at = _app(tiny_dir, "pages/experts.py")
    assert "No calibration" in at.info[0].value
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path / "cache"))
    at.run()
    assert not at.exception and at.selectbox[1].value == "frequency"
    at.selectbox[1].select("reap").run()
    assert not at.exception
    # a click on a heatmap cell arrives as a selection event carrying (layer, expert)
    assert at.subheader[0].value == "Layer 0, expert 0"  # before any click, the first
    at.session_state["expert_heatmap"] = {"selection": {"points": [{"customdata": [1, 5]}]}}
    at.run()
    assert at.subheader[0].value == "Layer 1, expert 5"
    assert (at.selectbox(key="expert_layer").value, at.number_input(key="expert_number").value) == (1, 5)
    at.number_input(key="expert_number").set_value(6).run()  # a number typed after the click wins
    assert at.subheader[0].value == "Layer 1, expert 6"


@pytest.mark.parametrize("page", ["pages/similarity.py", "pages/layers.py"])
def test_analysis_pages_render(tiny_dir, tmp_path, page):
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=32, cache_dir=tmp_path / "cache"))
    at = _app(tiny_dir, page)
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 2
    if page.endswith("similarity.py"):
        at.selectbox[1].select("weights_invariant").run()  # a weight space: read in the backend
        _button(at, "Compute the weights_invariant").click().run()
        _wait(at, "similarity_job")
        at.run()
        assert not at.exception, at.exception
        assert any("Silhouette suggests" in m.value for m in at.markdown)


def test_prune_page_clicks_evaluates_and_compare_shows_the_run(tiny_dir, tmp_path):
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=32, cache_dir=tmp_path / "cache"))
    at = _app(tiny_dir, "pages/compare.py")
    assert "No runs" in at.info[0].value
    at.switch_page("pages/prune.py")
    at.run()
    assert not at.exception, at.exception
    assert "4 experts pruned (novice)" in at.get("plotly_chart")[0].proto.spec  # mone at 25 %: 2 per layer
    at.selectbox[1].select("frequency").run()
    # a click on a cell flips that expert between kept and pruned
    at.session_state["plan_chart"] = {"selection": {"points": [{"customdata": [0, 7]}]}}
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["toggles"] == {(0, 7)}
    spec = at.get("plotly_chart")[0].proto.spec
    assert "3 experts pruned" in spec or "5 experts pruned" in spec
    _button(at, "Apply and evaluate").click().run()
    _wait(at, "eval_job")
    at.run()
    assert not at.exception, at.exception
    assert "Evaluated as run" in at.success[0].value
    at.switch_page("pages/compare.py")
    at.run()
    assert not at.exception, at.exception
    runs = list(at.table[0].value["run"])
    assert runs[0] == "original" and runs[1].startswith("frequency (edited) remove 25 %")  # the baseline first, named


def test_layers_page_compares_calibration_sources(tmp_path):
    from moeviz.loading import load_model

    model, tokenizer = load_model("demo", device="cpu")
    cache = tmp_path / "cache"
    for seed in (0, 1):  # two seeds of one source are still one source
        calibrate(model, CalibConfig(data="demo:arithmetic", num_samples=4, seq_len=32, seed=seed,
                                     probe_tokens=0, cache_dir=cache), tokenizer)
    at = _app("demo", "pages/layers.py")
    assert len(at.get("plotly_chart")) == 3 and "two or more sources" in at.info[0].value
    calibrate(model, CalibConfig(data="demo:prose", num_samples=4, seq_len=32, probe_tokens=0, cache_dir=cache),
              tokenizer)
    at.run()
    assert not at.exception, at.exception
    assert at.multiselect(key="sources").value == ["demo:prose", "demo:arithmetic"]
    assert len(at.get("plotly_chart")) == 6  # + share heatmap, specialisation curve, agreement
    at.selectbox(key="share_of").select("demo:arithmetic").run()
    assert not at.exception, at.exception
    at.switch_page("pages/similarity.py").run()  # the expert map, coloured by each expert's main source
    at.selectbox(key="map_colour").select("main source").run()
    assert not at.exception, at.exception
    spec = at.get("plotly_chart")[-1].proto.spec
    assert '"name":"demo:arithmetic"' in spec and '"name":"demo:prose"' in spec


def test_layers_page_measures_calibration_stability_in_a_worker(tiny_dir, tmp_path):
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    calibrate(model, CalibConfig(data="random", num_samples=8, seq_len=16, probe_tokens=0, cache_dir=tmp_path / "cache"))
    at = _app(tiny_dir, "pages/layers.py")
    charts = len(at.get("plotly_chart"))
    at.number_input(key="stability_chunks").set_value(4).run()
    at.button[0].click().run()
    _wait(at, "stability_job")
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == charts + 3  # mone, reap, frequency
    assert not at.button  # measured once, kept on disk, and the page says why there is no button
    assert any("Measured for these settings" in c.value and "to measure again" in c.value for c in at.caption)


def test_settings_survive_page_switches_and_live_in_the_url(tiny_dir, tmp_path):
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=0, cache_dir=tmp_path / "cache"))
    at = _app(tiny_dir, "pages/prune.py")
    at.slider(key="prune_ratio").set_value(0.125).run()
    at.selectbox(key="prune_method").select("reap").run()
    at.switch_page("pages/experts.py").run()
    at.switch_page("pages/prune.py").run()
    assert not at.exception, at.exception
    assert at.slider(key="prune_ratio").value == 0.125 and at.selectbox(key="prune_method").value == "reap"
    assert at.query_params["prune_ratio"] == "0.125" and at.query_params["prune_method"] == "reap"
    shared = AppTest.from_file(str(APP), default_timeout=60)  # a bookmarked view opens as it was
    shared.query_params.update(model=str(tiny_dir), prune_ratio="0.125", prune_method="reap")
    shared.run()
    shared.switch_page("pages/prune.py").run()
    assert shared.slider(key="prune_ratio").value == 0.125 and shared.selectbox(key="prune_method").value == "reap"


def test_prune_page_runs_moe_pruner_sequentially(tiny_dir, tmp_path):
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=0, cache_dir=tmp_path / "cache"))
    at = _app(tiny_dir, "pages/prune.py")
    at.selectbox(key="prune_method").select("moe_pruner").run()
    at.toggle(key="sequential").set_value(True).run()
    _button(at, "Calibrate sequentially at 25%").click().run()
    _wait(at, "sequential_job")
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["current_plan_stats"] != at.session_state["stats_choice"]  # the sequential statistics
    from moeviz.stats import ExpertStats

    assert ExpertStats.load(at.session_state["current_plan_stats"]).meta["calibration"]["sequential"]["sparsity"] == 0.25


def test_the_calibration_the_user_chose_stays_and_edits_do_not_carry_over(tiny_dir, tmp_path):
    """Calibrating several sources at once (demo:each) offers them for mixing without changing the
    calibration the pages use; hand edits made on one calibration are dropped on another."""
    model = tiny_model("mixtral")
    model.name_or_path = str(tiny_dir)
    paths = [str(calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, seed=seed, probe_tokens=32,
                                              cache_dir=tmp_path / "cache"))[1]) for seed in (0, 1, 2)]
    at = _app(tiny_dir, "pages/prune.py")
    chosen = at.session_state["stats_choice"]
    at.session_state["plan_chart"] = {"selection": {"points": [{"customdata": [0, 7]}]}}
    at.run()
    assert at.session_state["toggles"] == {(0, 7)}
    at.switch_page("pages/calibrate.py")
    others = [p for p in paths if p != chosen]
    at.session_state["calibration_job_status"] = dict(state="done", result=dict(paths=others, cached=True, tokens=128))
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["stats_choice"] == chosen and not at.session_state["mix_choice"]  # offered, not mixed in
    at.switch_page("pages/prune.py")
    at.run()
    assert at.session_state["stats_choice"] == chosen and at.session_state["toggles"] == {(0, 7)}
    at.selectbox(key="stats_dir").select(others[0]).run()
    assert not at.exception, at.exception
    assert at.session_state["toggles"] == set()  # the edits belonged to the other calibration


def test_compare_opens_on_the_setting_last_evaluated(tiny_dir, tmp_path):
    from moeviz.checkpoint import fingerprint
    from moeviz.runs import Run, RunStore

    store, fp = RunStore(tmp_path / "cache" / "runs.sqlite"), fingerprint(str(tiny_dir))
    for data, n in (("demo", 32), ("random", 8)):  # the second evaluated last
        ev = dict(data=data, num_samples=n, seq_len=64)
        store.add(Run(str(tiny_dir), "original", 0.0, dict(eval=ev, perplexity=10.0), fingerprint=fp))
        store.add(Run(str(tiny_dir), "frequency", 0.25, dict(eval=ev, perplexity=12.0), "remove", "layer", fingerprint=fp))
    at = _app(tiny_dir, "pages/compare.py")
    assert not at.exception, at.exception
    assert at.selectbox(key="compare_setting").value == "random, 8 × 64"
