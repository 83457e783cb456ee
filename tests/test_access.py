"""Only the owner uses the dashboard and its backend. The backend refuses a request without its
token, with a wrong one, for a foreign Host, with a body that is not JSON or too big, and starts
no job; a job refuses arguments it does not take and outputs where they do not belong; a web
page open in the owner's browser cannot start a job; the app listens on loopback only."""

import functools
import http.client
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from moeviz.backend import MAX_BODY, Backend, BackendError
from moeviz.checkpoint import demo_path
from moeviz.jobs import arg_names, check

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
JOB = json.dumps(dict(kind="calibrate", args=dict(data="demo", num_samples=8, seq_len=64))).encode()


def _request(port: int, method: str, path: str, headers: dict, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one raw request; http.client adds the Host header unless given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _refused(client: Backend) -> list[str]:
    return [line for line in client.log.read_text().splitlines() if line.startswith("refused ")]


@pytest.mark.parametrize("headers, code, why", [
    ({"Content-Type": "application/json"}, 401, "no token"),
    ({"Content-Type": "application/json", "Authorization": "Bearer " + "x" * 43}, 401, "wrong token"),
    ({"Content-Type": "application/json", "Authorization": "TOKEN"}, 401, "wrong token"),  # not as a Bearer
    ({"Content-Type": "application/json", "Authorization": "Bearer TOKEN", "Host": "evil.example:PORT"}, 403,
     "not this backend"),  # DNS rebinding: the page's own name, even with the token
    ({"Content-Type": "text/plain", "Authorization": "Bearer TOKEN"}, 415, "not application/json"),
    ({"Content-Type": "application/x-www-form-urlencoded", "Authorization": "Bearer TOKEN"}, 415, "not application"),
    ({"Content-Type": "application/json", "Authorization": "Bearer TOKEN", "Content-Length": str(MAX_BODY + 1)}, 413,
     "at most"),  # refused on its stated length, before a byte is read
])
def test_a_request_without_the_token_or_not_json_for_this_host_starts_no_job(backend, headers, code, why):
    client, _ = backend
    headers = {k: v.replace("TOKEN", client.token).replace("PORT", str(client.port)) for k, v in headers.items()}
    before = len(_refused(client))
    body = None if "Content-Length" in headers else JOB  # a stated length alone: nothing is left unread
    status, answer = _request(client.port, "POST", "/jobs", headers, body)
    assert status == code and why in answer["error"], (status, answer)
    assert client.jobs() == []  # read with the token: nothing was queued
    assert len(_refused(client)) == before + 1  # and the backend's log says so


def test_nothing_but_health_answers_without_the_token(backend):
    client, _ = backend
    status, answer = _request(client.port, "GET", "/health", {})
    assert status == 200 and answer == {"ok": True}  # alive, and nothing more
    for path in ("/info", "/jobs", "/jobs/calibrate-1"):
        assert _request(client.port, "GET", path, {})[0] == 401
    status, _ = _request(client.port, "GET", "/health", {"Host": f"rebound.example:{client.port}"})
    assert status == 403
    status, _ = _request(client.port, "POST", "/shutdown", {"Content-Type": "application/json"}, b"{}")
    assert status == 401 and client.alive()
    assert client.info()["model"] == "demo"  # with the token: what /health said before


def test_the_app_reads_the_token_from_a_file_only_its_owner_can_read(backend):
    client, _ = backend
    ready = client.log.parent / "ready.json"
    assert ready.stat().st_mode & 0o777 == 0o600 and ready.parent.stat().st_mode & 0o777 == 0o700
    assert json.loads(ready.read_text())["token"] == client.token and len(client.token) >= 43  # 32 bytes


def test_moeviz_serve_prints_its_token_once_and_leaves_it_for_connect(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moeviz.cli", "serve", "--model", "demo", "--device", "cpu",
                             "--port", str(port), "--cache-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        token = next((proc.stderr.readline().strip() for line in proc.stderr if line.startswith("token (")), None)
        saved = tmp_path / f"backend-{port}.token"  # the line after "token (send it as …)"
        assert token and saved.stat().st_mode & 0o777 == 0o600 and saved.read_text() == token
        client = Backend.connect(port, cache_dir=tmp_path)
        assert client.token == token and client.info()["model"] == "demo"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not saved.exists()  # gone with the backend


def test_a_hand_started_backend_is_found_with_its_token_file(backend, tmp_path):
    client, cache = backend
    with pytest.raises(BackendError, match="No token for the backend"):
        Backend.connect(client.port, cache_dir=tmp_path)
    with pytest.raises(BackendError, match="wrong token"):
        Backend.connect(client.port, token="x" * 43)
    (tmp_path / f"backend-{client.port}.token").write_text(client.token)
    assert Backend.connect(client.port, cache_dir=tmp_path).info()["pid"] == client.process.pid


@pytest.mark.parametrize("kind, args, why", [
    ("format_disk", {}, "Unknown job kind"),
    ("export", dict(plan={}, stats=None, out="OUT", overwrite=True), "takes no argument 'overwrite'; its arguments: "
                                                                     "mtp, out, plan, runs, stats"),
    ("calibrate", dict(data="demo", cache_dir="/tmp/elsewhere"), "takes no argument 'cache_dir'"),
    ("export", dict(plan={}, stats=None), "needs 'out'"),
    ("export", dict(plan={}, stats=None, out="MODEL/pruned"), "inside the model's own directory"),
    ("similarity", dict(space="weights", out="CACHE/demo-0123/similarity.npy"), "goes there only inside"),
    ("similarity", dict(space="weights", out="CACHE/exports/weights.npy"), "goes there only inside"),  # not its folder
    ("export", dict(plan={}, stats=None, out="CACHE/exports"), "goes there only inside"),  # the folder itself
    ("evaluate", dict(plan={}, stats=None, runs="CACHE/other.sqlite"), "runs.sqlite"),
    ("export", dict(plan={}, stats=None, out="FULL"), "is a directory that is not empty"),
])
def test_a_job_with_arguments_it_does_not_take_or_outputs_out_of_place_is_refused(backend, tmp_path, kind, args, why):
    client, cache = backend
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    places = dict(OUT=str(tmp_path / "out"), MODEL=str(demo_path()), CACHE=str(cache), FULL=str(tmp_path / "full"))
    for word, place in places.items():
        args = {k: v.replace(word, place) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(BackendError, match=why):
        client.submit(kind, **args)
    assert client.jobs() == []
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_the_apps_own_result_paths_and_paths_outside_are_accepted(tmp_path):
    server = SimpleNamespace(model_name="demo", cache_dir=str(tmp_path / "cache"))
    cache, plan = tmp_path / "cache", dict(plan={}, stats=None)
    (tmp_path / "empty").mkdir()
    check(server, "export", dict(plan, out=str(cache / "exports" / "mone-0.25")))
    check(server, "export", dict(plan, out=str(tmp_path / "empty")))  # an empty directory, as the CLI allows
    check(server, "recover", dict(plan, runs=str(cache / "runs.sqlite"), out=str(cache / "recovered" / "run-1-0"),
                                  minutes=1.0, data="demo"))
    check(server, "stability", dict(config={}, chunks=4, methods=["mone"], ratio=0.25, out=str(cache / "stability" / "k.json")))
    check(server, "similarity", dict(space="weights", out=str(cache / "similarity" / "f-weights.npy")))
    check(server, "curve", dict(stats="s", methods=["mone"], ratios=[0.5], out=str(cache / "curves" / "h.json")))
    check(server, "similarity", dict(space="weights", out=str(tmp_path / "mine.npy")))


def test_a_jobs_arguments_come_from_its_function_and_its_config():
    assert arg_names("export") == ({"plan", "stats", "out", "runs", "mtp"}, {"plan", "stats", "out"})  # runs, mtp: optional
    allowed, required = arg_names("calibrate")
    assert {"data", "num_samples", "layer_by_layer"} <= allowed and "cache_dir" not in allowed and not required
    allowed, required = arg_names("recover")
    assert {"minutes", "lr", "num_samples", "demo_tasks"} <= allowed and required == {"plan", "stats", "runs", "out",
                                                                                       "minutes"}


def test_a_hub_models_downloads_are_its_own_directory(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    server = SimpleNamespace(model_name="someone/some-moe", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="Hugging Face cache"):
        check(server, "export", dict(plan={}, stats=None, out=str(tmp_path / "hub" / "models--x" / "out")))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


ATTACK = """<!doctype html><title>loading</title>
<form id="form" method="POST" action="http://127.0.0.1:PORT/jobs" enctype="text/plain">
  <input name='{"kind": "calibrate", "args": {"data": "demo", "num_samples": 8}, "pad": "' value='"}'>
</form>
<script>
  // a "simple" request: no preflight, the answer unreadable (opaque) but the request sent
  fetch("http://127.0.0.1:PORT/jobs", {method: "POST", mode: "no-cors", body: JSON.stringify(
      {kind: "calibrate", args: {data: "demo", num_samples: 8}})}).then(
    () => document.title = "fetched", () => document.title = "fetch failed");
</script>"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_a_web_page_in_the_owners_browser_cannot_start_a_job(backend, tmp_path):
    from playwright.sync_api import sync_playwright

    client, _ = backend
    (tmp_path / "attack.html").write_text(ATTACK.replace("PORT", str(client.port)))
    site = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    before = len(_refused(client))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://localhost:{site.server_port}/attack.html")  # another origin: another port
            page.wait_for_function("document.title == 'fetched'", timeout=30_000)  # sent, whatever the answer
            with page.expect_navigation():
                page.evaluate("document.getElementById('form').submit()")  # a plain cross-site form post
            assert "no token" in page.content()
            browser.close()
    finally:
        site.shutdown()
    assert client.jobs() == []
    refused = [line for line in _refused(client)[before:] if line.startswith("refused POST /jobs")]
    assert len(refused) == 2, refused  # both reached the backend (then the browser asked for a favicon)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every TCP socket process `pid` listens on, read from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], line.split()[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)  # 32-bit words, each in the host's (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((ipaddress.ip_address(raw), int(port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from Linux's /proc")
def test_the_app_started_as_the_readme_says_listens_on_loopback_only(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--", "--model", "demo"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MOEVIZ_CACHE_DIR": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start")
        sockets = _listening(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert port in {p for _, p in sockets}, sockets
    assert all((getattr(ip, "ipv4_mapped", None) or ip).is_loopback for ip, _ in sockets), sockets
