"""One long-lived process per model that owns its weights and runs the app's long work.

The dashboard's own process never holds a model's weights: it starts one backend per model
on first need (or reaches one started by hand with `moeviz serve --model M`), which loads the
model once, on the GPU when there is one, and runs jobs (calibrate, evaluate a plan, export,
stability, weight similarities) one after another, each reporting its progress. Messages are
JSON over HTTP bound to 127.0.0.1; no pickle crosses the wire. A backend the app started
stops with the app: the app holds the other end of the backend's stdin, which the system closes
the moment the app ends, however it ends, and the backend exits on that end of file.

Only its owner may use it: other users of the machine reach 127.0.0.1 too, and so do web pages
open in the owner's browser. Every request but `/health` carries the backend's token (32 random
bytes, made at start; the app reads it from the ready file, a backend started by hand prints it
and leaves it in a file of the cache directory that only its owner can read), posts JSON, and
names the backend's own address as its Host (a DNS-rebound page names its own).

    client = Backend.start("demo")           # or Backend.connect(port), which finds the token
    job = client.submit("calibrate", data="demo", num_samples=64)
    client.status(job)                       # {"state": "running", "step": …, "done": …, "total": …}
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

JOB_KINDS = ("calibrate", "evaluate", "export", "verify", "recover", "stability", "similarity", "curve", "trace",
             "tradeoff")
MAX_BODY = 1 << 20  # bytes; a plan for 61 layers × 256 experts is about 0.1 MB of JSON


def token_file(cache_dir: str | os.PathLike, port: int) -> Path:
    """Where a backend started by hand leaves its token for `Backend.connect` (0600)."""
    return Path(cache_dir) / f"backend-{port}.token"


# ---- the server (runs in the backend process) ---------------------------------------------
@dataclass
class Job:
    id: str
    kind: str
    args: dict
    state: str = "queued"  # queued, running, done, failed
    step: str = ""
    done: float = 0
    total: float = 0
    started: float | None = None
    result: dict = field(default_factory=dict)
    error: str | None = None

    def view(self) -> dict:
        left = None
        if self.state == "running" and self.started and 0 < self.done < self.total:
            left = (time.time() - self.started) * (self.total - self.done) / self.done
        return dict(id=self.id, kind=self.kind, state=self.state, step=self.step, done=self.done,
                    total=self.total, seconds_left=left, result=self.result, error=self.error)


class Server:
    """Holds the model (loaded on the first job that needs it) and runs jobs in order."""

    def __init__(self, model: str, device: str = "auto", dtype: str | None = None, cache_dir: str = "cache"):
        self.model_name, self.device, self.dtype = model, device, dtype
        self.cache_dir = str(Path(cache_dir).resolve())  # jobs' output paths are checked against it
        self.model = self.tokenizer = self.fingerprint = None
        self.loads = 0  # how many times the weights were read (once, unless something is wrong)
        self.running: Job | None = None
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._work, daemon=True, name="jobs").start()

    def submit(self, kind: str, args: dict) -> Job:
        if kind not in JOB_KINDS:
            raise ValueError(f"Unknown job kind {kind!r}; kinds: {', '.join(JOB_KINDS)}")
        if not isinstance(args, dict):
            raise ValueError(f"A job's args are a JSON object, not {type(args).__name__}")
        from .jobs import check

        check(self, kind, args)  # before it is queued: a refused job leaves nothing behind
        with self.lock:
            job = Job(f"{kind}-{len(self.jobs) + 1}", kind, args)
            self.jobs[job.id] = job
        self.queue.put(job)
        return job

    def loaded(self):
        """(model, tokenizer, fingerprint), loading the model on first use: once per backend."""
        if self.model is None:
            from .loading import load_model, model_fingerprint

            if self.running is not None:  # what the first job waits for, on its progress bar
                self.running.step = "loading the model's weights"
            self.model, self.tokenizer = load_model(self.model_name, device=self.device, dtype=self.dtype)
            self.loads += 1
            self.fingerprint = model_fingerprint(self.model)
        return self.model, self.tokenizer, self.fingerprint

    def _work(self) -> None:
        from . import jobs

        while True:
            job = self.running = self.queue.get()
            job.state, job.started = "running", time.time()

            def progress(step: str, done: float, total: float) -> None:
                job.step, job.done, job.total = step, done, total

            try:
                job.result = getattr(jobs, job.kind)(self, progress=progress, **job.args) or {}
                job.state = "done"
            except Exception as err:  # a job's failure is reported to the app, the backend goes on
                job.error = f"{type(err).__name__}: {err}"
                job.state = "failed"
                traceback.print_exc()


def serve(model: str, port: int = 0, device: str = "auto", dtype: str | None = None, cache_dir: str = "cache",
          ready_file: str | None = None, until_stdin_closes: bool = False) -> None:
    """Run a backend for `model` until stopped (or, with `until_stdin_closes`, until the process
    holding the other end of its stdin ends)."""
    if ready_file:
        _check_private_dir(Path(ready_file).parent)
    server = Server(model, device, dtype, cache_dir)
    token = secrets.token_urlsafe(32)  # 32 random bytes
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(server, token))
    httpd.daemon_threads = True
    port = httpd.server_port
    if until_stdin_closes:
        threading.Thread(target=_exit_with_app, args=(ready_file,), daemon=True).start()
    print(f"moeviz backend for {model} on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    saved = None
    if ready_file:  # tell the starter the port and the token (atomically, readable by its owner only)
        _write_private(Path(ready_file), json.dumps(dict(port=port, pid=os.getpid(), token=token)))
    else:  # started by hand: the token once here, and in the cache directory for Backend.connect
        saved = token_file(cache_dir, port)
        _write_private(saved, token)
        print(f"token (send it as 'Authorization: Bearer TOKEN'; also in {saved}, readable by you only):\n{token}",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `finally` removes the token file
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()
        if saved is not None:
            saved.unlink(missing_ok=True)


def _check_private_dir(directory: Path) -> None:
    """The token goes into the ready file: refuse a directory other users can read or enter."""
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{directory} is open to other users (mode {mode:o}); the ready file holds the "
                              f"backend's token: make the directory 0700 (tempfile.mkdtemp does).")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by its owner only from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{path.name}")
    tmp.unlink(missing_ok=True)  # left by a killed backend: O_EXCL would refuse it
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _exit_with_app(ready_file: str | None) -> None:
    """Exit the moment the app ends, however it ends (Ctrl-C, a closed terminal, kill -9): the app
    holds the write end of this process's stdin and never writes, so reading it ends only when the
    system closes that end with the app. (Not PR_SET_PDEATHSIG: that fires when the thread that
    started the backend ends, and Streamlit starts it from a thread that ends after each rerun.)"""
    sys.stdin.buffer.read()  # returns at end of file
    if ready_file and Path(ready_file).parent.name.startswith("moeviz-backend-"):
        shutil.rmtree(Path(ready_file).parent, ignore_errors=True)  # its log and port file
    os._exit(0)  # the app is gone: so are its backend and the jobs running in it


def _handler(server: Server, token: str):
    secret = token.encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a client may take to send its request: a stalled one frees its thread

        def log_message(self, *args):  # quiet: the app polls often
            pass

        def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body, default=float).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, code: int, why: str) -> None:
            """Answer `code` and note it in the backend's log (a refusal is rare: someone else tried)."""
            path = self.path[:200].encode("unicode_escape").decode()  # no terminal escapes from a stranger
            print(f"refused {self.command} {path} from {self.client_address[0]}: {why}", file=sys.stderr, flush=True)
            self._send(code, dict(error=why), {"WWW-Authenticate": "Bearer"} if code == 401 else None)

        def _refusal(self, public: bool = False, posted: bool = False) -> tuple[int, str] | None:
            """Why this request may not be answered, checked before anything is done: (code, reason)."""
            port = self.server.server_port
            host = self.headers.get("Host", "")
            if host not in (f"127.0.0.1:{port}", f"localhost:{port}"):  # a DNS-rebound page sends its own name
                return 403, f"Host {host!r} is not this backend (127.0.0.1:{port})"
            if public:
                return None
            given = self.headers.get("Authorization", "")
            if not given:
                return 401, "no token: send the backend's token as 'Authorization: Bearer TOKEN'"
            scheme, _, presented = given.partition(" ")
            if not (scheme == "Bearer" and hmac.compare_digest(presented.encode(), secret)):  # in constant time
                return 401, "wrong token"
            if posted and self.headers.get_content_type() != "application/json":
                return 415, f"Content-Type {self.headers.get_content_type()} is not application/json"
            return None

        def _allowed(self, public: bool = False, posted: bool = False) -> bool:
            refusal = self._refusal(public, posted)
            if refusal:
                self._refuse(*refusal)
            return refusal is None

        def _body(self) -> bytes | None:
            """The request's body, at most MAX_BODY bytes (None: refused). It is read before the
            token is checked so that a refusal reaches the client (a socket closed on unread data
            is reset, and the answer with it)."""
            length = self.headers.get("Content-Length")
            if length is None:
                return self._refuse(411, "no Content-Length")
            if not (length.isascii() and length.isdigit()):
                return self._refuse(400, f"Content-Length {length!r} is not a number")
            if int(length) > MAX_BODY:
                return self._refuse(413, f"a body of {int(length):,} bytes; at most {MAX_BODY:,}")
            return self.rfile.read(int(length))

        def do_GET(self):
            if self.path == "/health":  # alive, and nothing more: the one answer without the token
                if self._allowed(public=True):
                    self._send(200, dict(ok=True))
                return None
            if not self._allowed():
                return None
            if self.path == "/info":
                return self._send(200, dict(model=server.model_name, loaded=server.model is not None,
                                            loads=server.loads, pid=os.getpid()))
            if self.path.startswith("/jobs/"):
                job = server.jobs.get(self.path.removeprefix("/jobs/"))
                return self._send(200, job.view()) if job else self._send(404, dict(error="no such job"))
            if self.path == "/jobs":
                return self._send(200, dict(jobs=[j.view() for j in server.jobs.values()]))
            self._send(404, dict(error=f"no route {self.path}"))

        def do_POST(self):
            raw = self._body()
            if raw is None or not self._allowed(posted=True):
                return None
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError as err:
                return self._send(400, dict(error=f"not JSON: {err}"))
            if not isinstance(body, dict):
                return self._send(400, dict(error="the body is not a JSON object"))
            if self.path == "/jobs":
                try:
                    job = server.submit(body.get("kind"), body.get("args") or {})
                except ValueError as err:
                    return self._send(400, dict(error=str(err)))
                return self._send(200, job.view())
            if self.path == "/shutdown":
                self._send(200, dict(ok=True))
                threading.Thread(target=lambda: os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
                return None
            self._send(404, dict(error=f"no route {self.path}"))

    return Handler


# ---- the client (runs in the app's process) -----------------------------------------------
class BackendError(RuntimeError):
    """The backend is unreachable or gone (crashed, killed); the next start replaces it."""


class Backend:
    """A handle on one backend process: submit jobs, read their status."""

    def __init__(self, port: int, token: str, process: subprocess.Popen | None = None, log: Path | None = None):
        self.port, self.token, self.process, self.log = port, token, process, log

    @classmethod
    def start(cls, model: str, device: str = "auto", cache_dir: str = "cache", dtype: str | None = None,
              timeout: float = 120) -> Backend:
        """Start `moeviz serve` for `model` as a child that exits when this process ends: it reads
        its stdin, a pipe only this process holds open, until the pipe closes."""
        workdir = Path(tempfile.mkdtemp(prefix="moeviz-backend-"))  # 0700: the ready file holds the token
        ready, log = workdir / "ready.json", workdir / "backend.log"
        cmd = [sys.executable, "-m", "moeviz.cli", "serve", "--model", model, "--device", device,
               "--cache-dir", str(Path(cache_dir).resolve()), "--ready-file", str(ready),
               "--until-stdin-closes"] + (["--dtype", dtype] if dtype else [])
        with open(log, "w") as out:  # stdin: a close-on-exec pipe, so this process's other children do not hold it
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        deadline = time.time() + timeout
        while not ready.exists():
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                process.communicate()  # closes its stdin, reaps it
                raise BackendError(f"The backend for {model} did not start: {_tail(log)}")
            time.sleep(0.1)
        found = json.loads(ready.read_text())
        return cls(found["port"], found["token"], process, log)

    @classmethod
    def connect(cls, port: int, token: str | None = None, cache_dir: str | os.PathLike = "cache") -> Backend:
        """A backend started by hand (`moeviz serve --port P`): `token`, else the one it left in
        `cache_dir` (its --cache-dir)."""
        if token is None:
            path = token_file(cache_dir, port)
            try:
                token = path.read_text().strip()
            except FileNotFoundError:
                raise BackendError(f"No token for the backend on port {port}: {path} does not exist (pass the "
                                   f"token it printed, or the --cache-dir it was started with)") from None
        backend = cls(port, token)
        backend.info()  # reachable, and the token is right
        return backend

    def alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            self.health()
        except BackendError:
            return False
        return True

    def health(self) -> dict:
        """{"ok": True} while it runs; the one call that needs no token."""
        return self._call("GET", "/health")

    def info(self) -> dict:
        """{"model", "loaded", "loads", "pid"}: which model, and how often its weights were read."""
        return self._call("GET", "/info")

    def jobs(self) -> list[dict]:
        """Every job this backend was given, in order, with its state."""
        return self._call("GET", "/jobs")["jobs"]

    def submit(self, kind: str, **args) -> str:
        return self._call("POST", "/jobs", dict(kind=kind, args=args))["id"]

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600, poll: float = 0.2) -> dict:
        deadline = time.time() + timeout
        while (status := self.status(job_id))["state"] not in ("done", "failed"):
            if time.time() > deadline:
                raise TimeoutError(f"Job {job_id} still {status['state']} after {timeout} s")
            time.sleep(poll)
        return status

    def stop(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()  # the backend exits on this alone; the signal below makes sure
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.log is not None:
            shutil.rmtree(self.log.parent, ignore_errors=True)  # its log and port file

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise BackendError(json.loads(err.read() or b"{}").get("error", str(err))) from err
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            code = self.process.poll() if self.process is not None else None
            why = f"exited with status {code}: {_tail(self.log)}" if code is not None else f"unreachable ({err})"
            raise BackendError(f"The backend {why}") from err


def _tail(log: Path | None, lines: int = 3) -> str:
    if log is None or not log.exists():
        return ""
    text = [line for line in log.read_text(errors="replace").strip().splitlines() if line.strip()]
    return " | ".join(text[-lines:])
