"""The Prune page at the size of today's models: load time, and the time from a click to the redrawn plan.

    python bench/prune_page.py [--clicks 5] [--dir DIR]

Builds once (cached in --dir, default /tmp/moeviz-bench/dsv3-tiny) a DeepSeek-V3-shaped model of
tiny hidden size: 61 decoder layers (the first 3 dense), 58 MoE layers × 256 experts, top-8 in
8 groups (23 MB, random weights, never committed), calibrated on random tokens. Starts the
dashboard on it in headless Chromium at 1280 × 900 and prints: the seconds from opening the Prune
page to its plan drawn and the page idle; then for each click on a close-up cell, the seconds until
the overview shows that edit (the page rerun, both charts redrawn), and their median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from memory import start_app  # bench/memory.py: the dashboard on a model, its own cache, up and healthy

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CLOSEUP_POINT = """(el, i) => { const gd = el.querySelector('.js-plotly-plot'), l = gd._fullLayout, box = gd.getBoundingClientRect();
    const t = gd._fullData.find(t => t.customdata && t.customdata.length), row = l.yaxis._categories.indexOf(t.y[i]);
    return [box.x + l.xaxis._offset + l.xaxis.d2p(t.x[i]), box.y + l.yaxis._offset + l.yaxis.c2p(row)]; }"""
EDITS = ("n => [...document.querySelectorAll('.js-plotly-plot')].some(gd => gd.data && "
         "(gd.layout.title.text || '').includes('experts pruned') && "
         "gd.data.some(t => t.name === 'changed by hand' && t.x.length === n))")


def build(path: Path, cache: Path) -> None:
    import torch

    from moeviz.adapters import get_adapter
    from moeviz.calibrate import CalibConfig, calibrate
    from moeviz.loading import load_model
    from moeviz.tiny import tiny_model

    if not (path / "config.json").is_file():
        model = tiny_model("deepseek_v3", num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256,
                           num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=4)
        with torch.no_grad():
            for layer in get_adapter(model).layers:
                layer.router_weight.mul_(20)
        model.save_pretrained(path)
    model = load_model(path, device="cpu")[0]
    calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=32, probe_tokens=64, cache_dir=cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeviz-bench/dsv3-tiny"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moeviz-bench-prune-"))
    build(args.dir, tmp / "app-cache")  # the cache `start_app` gives the dashboard
    app, url = start_app(args.dir, tmp)
    try:
        measure(url, args)
    finally:
        app.terminate()
        app.wait(timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(url: str, args) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/?model={args.dir}")
        page.wait_for_selector(IDLE, timeout=120_000)
        start = time.perf_counter()
        page.get_by_role("link", name="Prune").click()
        plan = page.locator("[data-testid='stPlotlyChart']").filter(has_text="experts pruned").first
        plan.locator(".js-plotly-plot").wait_for(timeout=120_000)
        page.wait_for_timeout(300)
        page.wait_for_selector(IDLE, timeout=120_000)
        print(f"Prune page, 58 × 256 experts: drawn and idle {time.perf_counter() - start:.2f} s after opening", flush=True)
        closeup = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Close-up").first
        times = []
        for n in range(1, args.clicks + 1):
            closeup.scroll_into_view_if_needed()  # the page above it may have grown (a warning)
            page.wait_for_timeout(300)
            x, y = closeup.evaluate(CLOSEUP_POINT, 7 * n)
            start = time.perf_counter()
            page.mouse.click(x, y)
            page.wait_for_function(EDITS, arg=n, timeout=60_000)
            times.append(time.perf_counter() - start)
            page.wait_for_selector(IDLE, timeout=60_000)
            print(f"click {n}: the overview shows the edit after {times[-1]:.2f} s", flush=True)
        print(f"median, click to redrawn plan: {statistics.median(times):.2f} s (target <= 1 s)")
        browser.close()


if __name__ == "__main__":
    main()
