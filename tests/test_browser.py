"""The main flow in a real headless Chromium: overview → calibrate (worker + progress) → experts
→ prune (apply and evaluate in a worker) → compare."""

import os
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

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    cache = tmp_path_factory.mktemp("cache")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MOEVIZ_CACHE_DIR": str(cache)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
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
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def _wait_idle(page, timeout=120_000):
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)


def test_main_flow_on_the_demo_model(server, page, tmp_path):
    page.goto(server)
    _wait_idle(page)
    page.get_by_role("heading", name="Overview").wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)

    page.get_by_role("link", name="Calibrate").click()
    page.get_by_role("heading", name="Calibrate").wait_for()
    _wait_idle(page)
    page.get_by_label("Sequences").fill("8")
    page.get_by_label("Sequences").press("Enter")
    _wait_idle(page)
    page.get_by_role("button", name="Calibrate").click()
    page.get_by_text("Done:").wait_for(timeout=180_000)  # the fragment polls the worker

    page.get_by_role("link", name="Experts").click()
    page.get_by_role("heading", name="Experts").wait_for()
    _wait_idle(page)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    assert page.get_by_text("Exception").count() == 0
    page.screenshot(path=str(tmp_path / "experts.png"), full_page=True)

    page.get_by_role("link", name="Prune").click()
    page.get_by_role("heading", name="Prune").wait_for()
    _wait_idle(page)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    page.get_by_role("button", name="Apply and evaluate").click()
    page.get_by_text("Evaluated as run").wait_for(timeout=300_000)
    page.screenshot(path=str(tmp_path / "prune.png"), full_page=True)

    page.get_by_role("link", name="Compare").click()
    page.get_by_role("heading", name="Compare").wait_for()
    _wait_idle(page)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # the ratio curves
    assert page.get_by_text("Exception").count() == 0
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
