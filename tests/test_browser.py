"""The dashboard as a person uses it, in a real headless Chromium: every page opens without an
error; calibrate in the backend; on the Prune page a click on a plan cell prunes or keeps that
expert and a second click undoes it, a box flips several, the ratio curve marks the slider;
evaluate, export (the kind named beside the button, the card with the evaluation), recover, then
compare."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = ["Overview", "Calibrate", "Experts", "Similarity", "Layers", "Prune", "Trace", "Compare"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]


CACHE = {}  # the app's cache directory, once the server runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    cache = CACHE["dir"] = tmp_path_factory.mktemp("cache")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--", "--model", "demo"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MOEVIZ_CACHE_DIR": str(cache)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})  # a laptop's screen, the sidebar open
        yield page
        browser.close()


def _idle(page, timeout=120_000):
    page.wait_for_timeout(300)  # let a rerun start before waiting for it to end
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)


def _type(page, field, text):
    """Type `text` into a widget and send it (Enter), as a person does; wait for the rerun."""
    field.fill(text)
    field.press("Enter")
    _idle(page)


def _open(page, name):
    page.get_by_role("link", name=name).click()
    page.get_by_role("heading", name=name).wait_for(timeout=60_000)
    _idle(page)


def _no_error(page):
    errors = page.locator("[data-testid='stException'], [data-testid='stAlertContentError']")
    assert errors.count() == 0, [errors.nth(i).inner_text() for i in range(errors.count())]


def _nothing_cut(page):
    """Every label, choice, button and table of the page is whole: no text ellipsised or clipped,
    no table that hides columns to the right (free-text inputs may scroll)."""
    cut = page.evaluate("""() => {
        const main = document.querySelector("[data-testid='stMain']"), cut = [];
        const wider = el => el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1;
        for (const el of main.querySelectorAll("*"))
            if (getComputedStyle(el).textOverflow === "ellipsis" && wider(el)) cut.push("text: " + el.innerText);
        for (const el of main.querySelectorAll(".stSelectbox input"))
            if (wider(el)) cut.push("choice: " + el.value);
        for (const el of main.querySelectorAll("[data-testid='stMultiSelectTagsContainer']"))
            if (wider(el)) cut.push("choices: " + el.innerText.replaceAll("\\n", ", "));
        for (const el of main.querySelectorAll("[data-testid='stDataFrame'] .dvn-scroller"))
            if (wider(el)) cut.push(`table: ${el.scrollWidth} px wide in ${el.clientWidth}`);
        for (const el of main.querySelectorAll("[data-testid='stTableStyledTable']"))  // scrolls in its parent
            if (wider(el.parentElement)) cut.push(`table: ${el.scrollWidth} px wide in ${el.parentElement.clientWidth}`);
        return cut;
    }""")
    assert not cut, cut


def _cell(page, chart, layer, expert):
    """Page coordinates of the centre of the plan's cell (layer, expert)."""
    xy = chart.evaluate("""(el, [layer, expert]) => {
        const gd = el.querySelector('.js-plotly-plot'), l = gd._fullLayout;
        const box = gd.getBoundingClientRect();
        const row = l.yaxis._categories.indexOf(String(layer));  // by position: "20" alone would read as index 20
        return [box.x + l.xaxis._offset + l.xaxis.d2p(expert), box.y + l.yaxis._offset + l.yaxis.c2p(row)];
    }""", [layer, expert])
    return xy[0], xy[1]


def _in_view(page, chart, point):
    """Scroll the page until `point()` (page coordinates) is in the viewport's middle; return them."""
    x, y = point()
    height = page.viewport_size["height"]
    if not 80 < y < height - 80:
        page.mouse.move(x if x > 0 else 600, height / 2)
        page.mouse.wheel(0, y - height / 2)
        page.wait_for_timeout(500)
        x, y = point()
    return x, y


def _pruned(page) -> int:
    return int(page.get_by_test_id("stMetricValue").first.inner_text())


def _plan_chart(page):
    return page.locator("[data-testid='stPlotlyChart']").filter(has_text="experts pruned").first


def test_every_page_and_the_pruning_flow(server, page, tmp_path):
    page.goto(server)
    _idle(page)
    page.get_by_role("heading", name="Overview").wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    _no_error(page)
    _nothing_cut(page)

    _open(page, "Calibrate")
    _type(page, page.get_by_label("Sequences"), "16")
    page.get_by_role("button", name="Calibrate").click()
    page.get_by_text("Handing the calibrate job to the model's backend").wait_for(timeout=30_000)  # at once
    page.get_by_text("Calibrated").wait_for(timeout=180_000)  # the backend ran it; the page polled
    _no_error(page)
    _nothing_cut(page)

    for name in ("Experts", "Similarity", "Layers"):
        _open(page, name)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        _no_error(page)
        _nothing_cut(page)

    _open(page, "Prune")
    chart = _plan_chart(page)
    chart.locator(".js-plotly-plot").wait_for(timeout=60_000)
    before = _pruned(page)
    assert before == 16  # mone at 25 %: 4 of 16 experts in each of 4 layers
    _nothing_cut(page)
    page.mouse.click(*_cell(page, chart, 0, 3))  # one click: that expert flips
    _idle(page)
    page.wait_for_function(f"() => document.querySelector('[data-testid=stMetricValue]').innerText != '{before}'")
    once = _pruned(page)
    assert abs(once - before) == 1
    page.mouse.click(*_cell(page, _plan_chart(page), 0, 3))  # again: back
    _idle(page)
    page.wait_for_function(f"() => document.querySelector('[data-testid=stMetricValue]').innerText == '{before}'")

    chart = _plan_chart(page)  # a box over layers 1–2 × experts 0–2 flips those six
    z = chart.evaluate("el => Array.from(el.querySelector('.js-plotly-plot')._fullData[0].z, r => Array.from(r))")  # (L, E): 1 = pruned
    box = [z[row][e] for row in (1, 2) for e in (0, 1, 2)]
    expected = before + sum(1 - 2 * v for v in box)  # kept ones are pruned now, pruned ones kept
    chart.hover()
    chart.locator(".modebar-btn[data-title='Box Select']").click()
    x0, y0 = _cell(page, chart, 1, 0)
    x1, y1 = _cell(page, chart, 2, 2)
    page.mouse.move(x0 - 8, y0 - 8)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1 + 8, y1 + 8, steps=5)
    page.mouse.up()
    _idle(page)
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(gd => "
                           "gd.data && gd.data.some(t => t.name === 'changed by hand' && t.x.length === 6))")
    page.wait_for_function(f"() => document.querySelector('[data-testid=stMetricValue]').innerText == '{expected}'")
    _idle(page)
    page.get_by_role("button", name="Undo").click()
    _idle(page)
    page.wait_for_function(f"() => document.querySelector('[data-testid=stMetricValue]').innerText == '{before}'",
                           timeout=90_000)

    page.get_by_role("button", name="Estimate quality at every ratio").click()
    curve = page.locator("[data-testid='stPlotlyChart']").filter(has_text="against pruning ratio")
    curve.wait_for(timeout=180_000)
    marked = curve.evaluate("el => el.querySelector('.js-plotly-plot').layout.shapes.length")
    assert marked >= 1  # the slider's ratio as a line
    assert curve.evaluate("el => el.querySelector('.js-plotly-plot')._fullLayout.xaxis._length") >= 400  # readable
    _no_error(page)

    page.get_by_role("button", name="Apply and evaluate").click()
    page.get_by_text("Evaluated as run").wait_for(timeout=300_000)
    _no_error(page)
    _nothing_cut(page)  # the run against the original, a row per metric and task
    page.screenshot(path=str(tmp_path / "prune.png"), full_page=True)

    page.get_by_text("Exports as expert substitution").wait_for(timeout=30_000)  # MoNE's novices, named first
    page.get_by_role("button", name="Export checkpoint").click()
    done = page.get_by_text("Exported to")
    done.wait_for(timeout=300_000)
    out = Path(done.inner_text().split("Exported to ")[1].split(" as a ")[0])
    assert out.name == "demo-mone-novice-25pct" and "expert_substitution" in (out / "config.json").read_text()
    assert "Evaluated in place" in (out / "README.md").read_text()  # the card has the run just evaluated
    _no_error(page)
    page.get_by_role("button", name="Verify", exact=True).click()  # in moeviz, which serves a substitution
    verified = page.get_by_text("Verified in moeviz.load_model")
    verified.wait_for(timeout=300_000)
    assert "5/5 prompts equal" in verified.inner_text() and "against the plan applied in place on demo" in verified.inner_text()
    assert "## Verification\n\n- Verified in moeviz.load_model" in (out / "README.md").read_text()
    page.get_by_role("button", name="Export checkpoint").click()  # again, to the same directory: refused
    refused = page.get_by_text("is a directory that is not empty")
    refused.wait_for(timeout=60_000)
    page.wait_for_timeout(3000)
    assert refused.is_visible()  # the message stays until the user acts
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # nothing else written

    _type(page, page.get_by_label("Minutes"), "0.5")  # recover the evaluated run, briefly
    page.get_by_role("button", name="Recover run").click()
    recovered = page.get_by_text(re.compile("Recovered as run|Recovery made the model worse")).first
    recovered.wait_for(timeout=300_000)
    _idle(page)
    _no_error(page)
    _nothing_cut(page)

    method = page.get_by_role("combobox", name="Method")  # another plan, evaluated: the recovery above is not its
    method.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # the list closes on a scroll, as a person's would: open it once the page stands
    method.click()
    page.get_by_role("option", name="frequency", exact=True).click()
    _idle(page)
    page.get_by_role("button", name="Apply and evaluate").click()
    page.get_by_text(re.compile(r"Evaluated as run \d+ \(frequency")).wait_for(timeout=300_000)
    _idle(page)
    assert page.get_by_role("button", name=re.compile("Recover run")).count() == 1
    assert page.get_by_text(re.compile("Recovered as run|Recovery made the model worse")).count() == 0

    _open(page, "Trace")  # a typed text, its tokens coloured; then under the Prune page's plan
    page.get_by_role("textbox", name="Text").fill("12+30=42\nrev abc:cba\n")
    page.get_by_role("button", name="Trace", exact=True).click()
    page.locator("span.tok").first.wait_for(timeout=120_000)
    tokens = page.locator("span.tok")
    assert tokens.count() == 22 and "background" in tokens.nth(1).get_attribute("style")
    page.get_by_text("Under the Prune page's plan").click()
    _idle(page)
    page.get_by_role("button", name="Trace", exact=True).click()
    page.get_by_text("of this layer's tokens to other experts").wait_for(timeout=120_000)
    page.get_by_role("combobox", name="Layer").click()
    page.get_by_role("option", name="3", exact=True).click()
    _idle(page)
    assert page.locator("span.tok[style*='wavy']").count() > 0  # rerouted tokens are marked
    _no_error(page)
    _nothing_cut(page)

    _open(page, "Compare")
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # the ratio curves
    page.get_by_role("heading", name="Before and after recovery").wait_for(timeout=60_000)
    assert page.locator(".js-plotly-plot").first.evaluate(
        "gd => gd.data.some(t => t.name.endsWith('+ recovery'))")  # its own line beside the plan's
    _no_error(page)
    _nothing_cut(page)

    from moeviz.tiny import tiny_model  # another model, typed into the sidebar, stays chosen

    tiny_model("olmoe").save_pretrained(tmp_path / "olmoe")
    box = page.get_by_role("textbox", name="Model", exact=True)
    _type(page, box, str(tmp_path / "olmoe"))
    _open(page, "Overview")
    page.locator("code", has_text="olmoe").first.wait_for(timeout=60_000)  # "… — `olmoe`, 2 MoE layers …"
    assert box.input_value() == str(tmp_path / "olmoe")
    _no_error(page)

    page.get_by_role("button", name="demo-fine", exact=True).click()  # a demo, from the sidebar: in this tab
    _idle(page)
    page.locator("code", has_text="qwen2_moe").first.wait_for(timeout=60_000)
    assert box.input_value() == "demo-fine" and len(page.context.pages) == 1
    _no_error(page)


def _plan_grid(page) -> list:
    return _plan_chart(page).evaluate(
        "el => Array.from(el.querySelector('.js-plotly-plot')._fullData[0].z, r => Array.from(r))")


def test_a_calibration_mix_moves_the_plan_at_once(server, page):
    """Two sources calibrated as one job; on the Prune page a share slider re-plans without any
    calibration; the trade-off view draws a point per mix, rings the current one, and a click on
    a point takes that mix."""
    page = page.context.browser.new_page(viewport={"width": 1400, "height": 1100})  # a session of its own
    page.goto(server)
    _idle(page)
    _open(page, "Calibrate")
    _type(page, page.get_by_label("Sequences"), "16")
    page.get_by_role("combobox", name="Text").click()
    page.get_by_role("option", name="several sources…").click()
    _idle(page)
    page.get_by_role("button", name="Calibrate").click()
    page.get_by_text("2 sources").wait_for(timeout=240_000)  # one job, one cache entry each
    _no_error(page)
    entries = sorted(p.parent.name for p in CACHE["dir"].glob("*/meta.json"))

    _open(page, "Prune")  # the new sources are offered for mixing, not mixed in behind the user's back
    mix = page.get_by_role("combobox", name="Mix with other calibrations")
    mix.wait_for(timeout=60_000)
    assert page.get_by_text("Shares of the calibration tokens").count() == 0
    mix.click()
    page.get_by_role("option", name="demo:code").click()
    page.keyboard.press("Escape")
    _idle(page)
    page.get_by_text("Shares of the calibration tokens").wait_for(timeout=60_000)
    _idle(page)
    math = page.get_by_role("slider", name="demo:arithmetic")  # one slider per source
    math.wait_for(timeout=60_000)
    page.get_by_role("slider", name="demo:code").wait_for(timeout=60_000)
    _plan_chart(page).locator(".js-plotly-plot").wait_for(timeout=60_000)
    before = _plan_grid(page)
    math.focus()
    page.keyboard.press("Home")  # all of the other source
    _idle(page)
    page.wait_for_function("g => { const el = Array.from(document.querySelectorAll('[data-testid=stPlotlyChart]'))"
                           ".find(el => el.innerText.includes('experts pruned'));"
                           "const gd = el && el.querySelector('.js-plotly-plot');"  # absent while the page reruns
                           "return !!(gd && gd._fullData) && JSON.stringify(gd._fullData[0].z.map(r => Array.from(r)))"
                           " !== g; }", arg=json.dumps(before), timeout=60_000)
    _idle(page)
    assert _plan_grid(page) != before  # the pruned cells moved
    assert _plan_chart(page).evaluate("el => el.querySelector('.js-plotly-plot').data.some("
                                      "t => t.name === 'changed against the even mix' && t.x.length > 0)")
    assert sorted(p.parent.name for p in CACHE["dir"].glob("*/meta.json")) == entries  # no calibration ran
    assert page.get_by_text("Calibration:").count() == 0
    _no_error(page)

    page.get_by_role("button", name="Compute the trade-off").click()
    chart = page.locator("[data-testid='stPlotlyChart']").filter(has_text="as the mix moves")
    chart.wait_for(timeout=300_000)
    data = chart.evaluate("el => el.querySelector('.js-plotly-plot').data.map(t => [t.name, t.x.length, t.x[0]])")
    lines = [d for d in data if d[0].startswith("held-out")]
    ring = [d for d in data if d[0] == "current mix"]
    assert len(lines) == 2 and all(n == 13 for _, n, _ in lines)  # a point per mix, per held-out source
    assert ring and ring[0][2] == 0  # the current mix: none of demo:arithmetic
    x, y = chart.evaluate("""el => { const gd = el.querySelector('.js-plotly-plot'), l = gd._fullLayout;
        const t = gd.data.find(t => t.name.startsWith('held-out')), box = gd.getBoundingClientRect();
        return [box.x + l.xaxis._offset + l.xaxis.d2p(t.x[12]), box.y + l.yaxis._offset + l.yaxis.d2p(t.y[12])]; }""")
    page.mouse.click(x, y)  # all of demo:arithmetic
    _idle(page)
    page.wait_for_function("() => { const el = Array.from(document.querySelectorAll('[data-testid=stPlotlyChart]'))"
                           ".find(el => el.innerText.includes('as the mix moves'));"
                           "return el && el.querySelector('.js-plotly-plot').data.some("
                           "t => t.name === 'current mix' && t.x[0] === 1); }", timeout=60_000)
    page.get_by_text("Shares of the calibration tokens: demo:arithmetic 100%").wait_for(timeout=30_000)  # the sliders
    _no_error(page)
    page.close()


def test_a_click_lands_on_the_cell_under_the_pointer_at_64_experts(server, page):
    """demo-fine's plan (4 layers × 64 experts) at 1280 × 900: a click at the centre of each of ten
    cells spread over the plan, neighbours among them, flips exactly those ten experts, as the
    page's own list of hand edits says (a click on expert 0 once flipped expert 1)."""
    page = page.context.browser.new_page(viewport={"width": 1280, "height": 900})  # a session of its own
    page.goto(f"{server}/?model=demo-fine")
    _idle(page)
    _open(page, "Calibrate")
    _type(page, page.get_by_label("Sequences"), "16")
    page.get_by_role("button", name="Calibrate").click()
    page.get_by_text("Calibrated").wait_for(timeout=240_000)
    _open(page, "Prune")
    _plan_chart(page).locator(".js-plotly-plot").wait_for(timeout=60_000)
    _idle(page)
    cells = [(0, 0), (0, 1), (0, 63), (1, 31), (1, 32), (2, 5), (2, 6), (3, 17), (3, 62), (2, 40)]
    for n, (layer, expert) in enumerate(cells, start=1):
        page.mouse.click(*_cell(page, _plan_chart(page), layer, expert))
        _idle(page)
        page.wait_for_function("n => [...document.querySelectorAll('.js-plotly-plot')].some(gd => gd.data && "
                               "gd.data.some(t => t.name === 'changed by hand' && t.x.length === n))", arg=n,
                               timeout=60_000)
    _idle(page)
    said = page.get_by_text("Changed by hand:").inner_text().removeprefix("Changed by hand: ")
    flipped = {(int(part.split(":")[0].removeprefix("layer ")), int(e))
               for part in said.split("; ") for e in part.split(": ")[1].split(", ")}
    assert flipped == set(cells)
    # every marker over the grid fits inside one cell: none can take a neighbour's click or hide its colour
    cell, sizes = _plan_chart(page).evaluate("""el => { const gd = el.querySelector('.js-plotly-plot');
        const l = gd._fullLayout, cell = Math.min(l.xaxis._length / 64, l.yaxis._length / 4);
        return [cell, gd._fullData.filter(t => t.type === 'scatter' && t.x.length && t.x[0] !== null)
                                    .map(t => t.marker.size)]; }""")
    assert cell >= 10 and sizes and max(sizes) < cell, (cell, sizes)  # about 11 px a cell at 1280 px
    _no_error(page)
    _nothing_cut(page)
    page.close()


def test_the_close_up_flips_the_expert_under_the_pointer_in_step_with_the_overview(server, page):
    """The close-up of one layer, in the method's score order: a click on a cell flips that expert,
    in the overview too, and Undo takes it back in both."""
    page = page.context.browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server}/?model=demo-fine")
    _idle(page)
    _open(page, "Calibrate")  # found in the cache when the test before ran
    _type(page, page.get_by_label("Sequences"), "16")
    page.get_by_role("button", name="Calibrate").click()
    page.get_by_text(re.compile("Calibrated|Found in the cache")).wait_for(timeout=240_000)
    _open(page, "Prune")
    closeup = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Close-up").first
    closeup.locator(".js-plotly-plot").wait_for(timeout=120_000)
    page.get_by_text("In the method's order").click()
    _idle(page)
    closeup = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Close-up").first
    target = closeup.evaluate("""el => { const gd = el.querySelector('.js-plotly-plot');
        const t = gd._fullData.find(t => t.customdata && t.customdata.length), l = gd._fullLayout, i = 3;
        const box = gd.getBoundingClientRect();
        return {expert: t.customdata[i][1], layer: t.customdata[i][0], cell: l.xaxis._length / l.xaxis.range[1],
                x: box.x + l.xaxis._offset + l.xaxis.d2p(t.x[i]), y: box.y + l.yaxis._offset + l.yaxis.d2p(t.y[i])}; }""")
    assert target["cell"] >= 12  # every cell clickable by hand
    page.mouse.click(target["x"], target["y"])
    _idle(page)
    page.get_by_text("Changed by hand:").wait_for(timeout=60_000)
    said = page.get_by_text("Changed by hand:").inner_text()
    assert said == f"Changed by hand: layer {target['layer']}: {target['expert']}"
    assert _plan_chart(page).evaluate("el => el.querySelector('.js-plotly-plot').data.some("
                                      "t => t.name === 'changed by hand' && t.x.length === 1)")  # the overview too
    page.get_by_role("button", name="Undo").click()
    page.get_by_text("Changed by hand:").wait_for(state="detached", timeout=60_000)  # Undo reruns the page once more
    _idle(page)
    assert page.get_by_text("Changed by hand:").count() == 0
    _no_error(page)
    page.close()


def test_a_deepseek_v3_shaped_plan_opens_a_layer_and_its_clicks_show_in_the_overview(server, page, tmp_path):
    """58 MoE layers × 256 experts (DeepSeek-V3's shape, tiny hidden size): the overview's cells are
    too small to aim at, so a click there opens that layer in the close-up; ten clicks in the
    close-up flip exactly those experts, in the overview as well; nothing on the page is cut."""
    import torch

    from moeviz.adapters import get_adapter
    from moeviz.calibrate import CalibConfig, calibrate
    from moeviz.loading import load_model
    from moeviz.tiny import tiny_model

    model = tiny_model("deepseek_v3", num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256,
                       num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=4)
    with torch.no_grad():
        for layer in get_adapter(model).layers:
            layer.router_weight.mul_(20)
    model.save_pretrained(tmp_path / "dsv3")  # 23 MB
    loaded = load_model(tmp_path / "dsv3", device="cpu")[0]
    calibrate(loaded, CalibConfig(data="random", num_samples=4, seq_len=32, probe_tokens=64, cache_dir=CACHE["dir"]))
    page = page.context.browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server}/?model={tmp_path / 'dsv3'}")
    _idle(page)
    _open(page, "Prune")
    chart = _plan_chart(page)
    chart.locator(".js-plotly-plot").wait_for(timeout=120_000)
    _idle(page)
    assert page.get_by_text("A click opens that layer in the close-up below").count() == 1
    page.mouse.click(*_in_view(page, chart, lambda: _cell(page, chart, 20, 100)))  # layer 20: opened, not flipped
    _idle(page)
    closeup = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Close-up: layer 20").first
    closeup.locator(".js-plotly-plot").wait_for(timeout=60_000)
    assert page.get_by_text("Changed by hand:").count() == 0
    targets = closeup.evaluate("""el => { const gd = el.querySelector('.js-plotly-plot');
        const t = gd._fullData.find(t => t.customdata && t.customdata.length), l = gd._fullLayout;
        return [0, 1, 40, 77, 128, 129, 200, 231, 254, 255].map(i => ({expert: t.customdata[i][1], x: t.x[i], y: t.y[i],
            cell: l.xaxis._length / (l.xaxis.range[1] - l.xaxis.range[0])})); }""")
    assert min(t["cell"] for t in targets) >= 12
    for n, target in enumerate(targets, start=1):
        closeup = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Close-up: layer 20").first
        def point(closeup=closeup, target=target):
            return closeup.evaluate("""(el, [x, y]) => { const gd = el.querySelector('.js-plotly-plot');
                const l = gd._fullLayout, box = gd.getBoundingClientRect();
                const row = l.yaxis._categories.indexOf(y);
                return [box.x + l.xaxis._offset + l.xaxis.d2p(x), box.y + l.yaxis._offset + l.yaxis.c2p(row)]; }""",
                                    [target["x"], target["y"]])
        page.mouse.click(*_in_view(page, closeup, point))
        _idle(page)
        page.wait_for_function("n => [...document.querySelectorAll('.js-plotly-plot')].some(gd => gd.data && "
                               "(gd.layout.title.text || '').includes('experts pruned') && "
                               "gd.data.some(t => t.name === 'changed by hand' && t.x.length === n))", arg=n,
                               timeout=60_000)
    said = page.get_by_text("Changed by hand:").inner_text()
    assert said == "Changed by hand: layer 20: " + ", ".join(str(e) for e in sorted(t["expert"] for t in targets))
    # eight groups of 32 that lose unequal numbers: said, and the plan stays on screen to be completed or undone
    assert page.get_by_text("must each lose the same number of experts").count() == 1
    _nothing_cut(page)

    # The pages beside Prune at 256 experts: every figure within the page's width, nothing cut. On
    # the Experts heatmap (cells about 2 px wide) a click takes the expert its hover label names,
    # within a cell of the one aimed at; the number beside it takes the exact one
    _open(page, "Experts")
    heatmap = page.locator("[data-testid='stPlotlyChart']").first
    heatmap.locator(".js-plotly-plot").wait_for(timeout=60_000)
    x, y = _in_view(page, heatmap, lambda: _cell(page, heatmap, 40, 177))
    page.mouse.move(x, y)
    page.wait_for_selector(".hovertext")
    named = re.search(r"layer (\d+), expert (\d+)", page.locator(".hovertext").first.text_content()).groups()
    page.mouse.click(x, y)
    _idle(page)
    page.get_by_role("heading", name=f"Layer {named[0]}, expert {named[1]}").wait_for(timeout=30_000)
    assert named[0] == "40" and abs(int(named[1]) - 177) <= 1, named
    _type(page, page.get_by_role("spinbutton", name="Expert", exact=True), "177")
    page.get_by_role("heading", name="Layer 40, expert 177").wait_for(timeout=30_000)
    for name in ("Experts", "Similarity", "Layers"):
        _open(page, name)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        _no_error(page)
        _nothing_cut(page)
        _figures_fit(page)
    page.close()


def _figures_fit(page):
    """Every figure lies within the page's main column, its plot area inside the figure."""
    over = page.evaluate("""() => {
        const main = document.querySelector("[data-testid='stMain'] [data-testid='stMainBlockContainer']")
            .getBoundingClientRect(), over = [];
        for (const gd of document.querySelectorAll('.js-plotly-plot')) {
            const box = gd.getBoundingClientRect(), l = gd._fullLayout;
            if (box.left < main.left - 1 || box.right > main.right + 1)
                over.push(`${l.title.text}: ${box.left}-${box.right} outside ${main.left}-${main.right}`);
            if (l.xaxis && l.xaxis._offset + l.xaxis._length > l.width + 1) over.push(`${l.title.text}: plot area cut`);
        }
        return over; }""")
    assert not over, over
