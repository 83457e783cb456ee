"""A text through the experts: the trace equals what the model's own routers and logits say,
and a plan's removed experts never appear under it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeviz.adapters import get_adapter
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.cli import main
from moeviz.loading import load_model
from moeviz.methods import PlanConfig, make_plan
from moeviz.trace import NONE_WORSE, WORSE, TraceError, loss_changes, page_html, trace

APP = Path(__file__).resolve().parent.parent / "app.py"
TEXT = "12+30=42\nrev abc:cba\nthe tall king that the small cats saw hurt himself.\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model, tokenizer = load_model("demo", device="cpu")
    cache = tmp_path_factory.mktemp("cache")
    stats, path = calibrate(model, CalibConfig(data="demo", num_samples=16, seq_len=128, cache_dir=cache), tokenizer)
    return model, tokenizer, stats, path


def _plain_forward(model, tokenizer, text):
    """The routers' own top-k (hooked on the module outputs) and the logits of a plain forward."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    found, handles = {}, []
    for layer in get_adapter(model).layers:
        handles.append(layer.router.register_forward_hook(
            lambda m, a, out, i=layer.layer_idx: found.__setitem__(i, out[2].tolist())))  # (logits, weights, index)
    with torch.no_grad():
        logits = model(ids).logits[0]
    for h in handles:
        h.remove()
    return ids[0], found, logits


def test_the_trace_is_what_the_routers_and_logits_say(demo):
    model, tokenizer, _, _ = demo
    ids, routed, logits = _plain_forward(model, tokenizer, TEXT)
    result = trace(model, tokenizer, TEXT)
    assert len(result["tokens"]) == len(ids) and "".join(result["tokens"][1:]) == TEXT
    assert result["layers"] == sorted(routed)
    for row, layer_idx in enumerate(result["layers"]):
        assert result["experts"][row] == routed[layer_idx]  # token by token, in the router's order
        assert all(abs(sum(w) - 1) < 1e-4 for w in result["weights"][row])  # Mixtral renormalises
    nll = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    torch.testing.assert_close(torch.tensor(result["nll"]), nll, atol=1e-5, rtol=1e-5)


def test_under_a_removal_plan_no_removed_expert_appears(demo):
    model, tokenizer, stats, _ = demo
    plan = make_plan(stats, PlanConfig("mone", ratio=0.25, mode="remove"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trace(model, tokenizer, TEXT, plan, stats)
    used = []
    for row, layer_idx in enumerate(result["layers"]):
        gone = set(plan.pruned[layer_idx])
        assert not gone & {e for experts in result["pruned"]["experts"][row] for e in experts}
        used.append(any(gone & set(experts) for experts in result["experts"][row]))
        if used[-1]:  # where removed experts were used, tokens went elsewhere
            assert result["rerouted"][row] > 0
    assert any(used)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # put back


def test_only_tokens_whose_prediction_got_worse_are_listed_as_worse(demo):
    model, tokenizer, stats, _ = demo
    result = trace(model, tokenizer, TEXT, make_plan(stats, PlanConfig("mone", ratio=0.25, mode="remove")), stats)
    rises = [after - before for before, after in zip(result["nll"], result["pruned"]["nll"])]
    assert min(rises) < 0 < max(rises)  # some tokens better, some worse: the list must tell them apart
    rows = loss_changes(result, top=len(rises))
    assert len(rows) == sum(rise > WORSE for rise in rises) > 0
    assert all(r["p_after"] < r["p_before"] and r["nll_rise"] > 0 for r in rows)
    assert [r["nll_rise"] for r in rows] == sorted((r["nll_rise"] for r in rows), reverse=True)  # most risen first
    assert loss_changes(result, top=3) == rows[:3]
    assert NONE_WORSE not in page_html(result)

    unchanged = trace(model, tokenizer, TEXT, make_plan(stats, PlanConfig("frequency", ratio=0)), stats)
    assert unchanged["pruned"]["experts"] == unchanged["experts"]  # the plan prunes nothing
    assert loss_changes(unchanged) == [] and NONE_WORSE in page_html(unchanged)
    assert NONE_WORSE not in page_html(trace(model, tokenizer, TEXT))  # no plan: nothing to compare


def test_the_trace_page_says_when_no_prediction_got_worse(demo, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    model, tokenizer, stats, _ = demo
    monkeypatch.setenv("MOEVIZ_CACHE_DIR", str(tmp_path))
    for ratio, worse in ((0, False), (0.25, True)):
        result = trace(model, tokenizer, TEXT, make_plan(stats, PlanConfig("mone", ratio=ratio, mode="remove")), stats)
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["model"] = "demo"
        at.session_state["trace_result"] = result  # as a finished trace job leaves it
        at.switch_page("pages/trace.py").run()
        assert not at.exception, at.exception
        said = NONE_WORSE in [m.value for m in at.markdown]
        assert said != worse and len(at.dataframe) == worse
        if worse:
            assert len(at.dataframe[0].value) == len(loss_changes(result))


def test_empty_and_too_long_texts_are_refused(demo):
    model, tokenizer, _, _ = demo
    with pytest.raises(TraceError, match="empty"):
        trace(model, tokenizer, "  ")
    with pytest.raises(TraceError, match="reads at most 256"):
        trace(model, tokenizer, "1+1=2\n" * 100)


def test_cli_json_and_an_offline_page(demo, tmp_path, capsys):
    _, _, stats, path = demo
    plan = tmp_path / "plan.json"
    make_plan(stats, PlanConfig("frequency", ratio=0.25)).save(plan)
    assert main(["trace", "--model", "demo", "--text", TEXT, "--plan", str(plan), "--stats", str(path), "--json",
                 "--html", str(tmp_path / "trace.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    T, L = len(out["tokens"]), len(out["layers"])
    assert len(out["experts"]) == L and len(out["experts"][0]) == T and len(out["experts"][0][0]) == 2
    assert len(out["nll"]) == T - 1 and len(out["rerouted"]) == L and set(out["pruned"]) == {"experts", "weights", "nll"}
    page = (tmp_path / "trace.html").read_text()
    assert "http" not in page and page.count('class="tok"') == L * T
    if shutil.which("chromium"):  # it opens offline and shows the tokens
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page_ = browser.new_page()
            page_.goto((tmp_path / "trace.html").as_uri())
            assert page_.locator("span.tok").count() == L * T
            assert page_.locator("span.tok").nth(1).inner_text() == "1"
            size = "el => parseFloat(getComputedStyle(el).fontSize)"  # px
            assert page_.locator("span.tok").nth(1).evaluate(size) >= page_.locator("body").evaluate(size)  # readable
            browser.close()
    assert main(["trace", "--model", "demo", "--text", ""]) == 2


def test_colours_stay_distinct_at_many_experts_and_the_page_has_a_legend_and_visible_spaces(demo):
    from moeviz.trace import expert_colour, legend_html, page_html

    for E in (16, 64, 256):
        assert len({expert_colour(e, E) for e in range(E)}) == E  # 15 and 2 were both teal at 64
    model, tok, _, _ = demo
    result = trace(model, tok, TEXT)
    page = page_html(result)
    assert page.count("white-space:nowrap") >= len(result["layers"])  # a legend per layer, chips not broken
    assert "␣" in page if " " in "".join(result["tokens"]) else True
    chips = legend_html(result, result["layers"][0])
    assert sum(int(c.split(": ")[1].split("<")[0]) for c in chips.split("expert ")[1:]) == len(result["tokens"])
