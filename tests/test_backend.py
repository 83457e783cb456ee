"""The backend: one process loads the model once and runs jobs in order; a crash is reported
and the next start replaces it; it exits when the process that started it ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeviz.backend import Backend, BackendError
from moeviz.methods import PlanConfig, make_plan
from moeviz.stats import ExpertStats


def test_two_evaluations_load_the_weights_once_in_one_process(backend):
    client, cache = backend
    assert client.info()["loaded"] is False  # nothing is read before a job needs the weights
    cal = client.wait(client.submit("calibrate", data="demo", num_samples=8, seq_len=64, probe_tokens=32))
    assert cal["state"] == "done", cal
    stats = ExpertStats.load(cal["result"]["path"])
    assert stats.meta["tokens"] == 8 * 64
    ids = []
    for method in ("frequency", "mone"):
        plan = make_plan(stats, PlanConfig(method, ratio=0.25))
        job = client.submit("evaluate", plan=json.loads(plan.to_json()), stats=cal["result"]["path"],
                            runs=str(cache / "runs.sqlite"), data="demo", num_samples=4, seq_len=64)
        ids.append(job)
    done = [client.wait(job) for job in ids]
    assert [d["state"] for d in done] == ["done", "done"], done
    assert done[0]["result"]["baseline_id"] == done[1]["result"]["baseline_id"]  # the original, once
    info = client.info()
    assert info["loads"] == 1 and info["pid"] == client.process.pid
    again = client.wait(client.submit("calibrate", data="demo", num_samples=8, seq_len=64, probe_tokens=32))
    assert again["result"]["cached"] is True

    # Recover the MoNE run: exported, distilled from the loaded original (still loaded once),
    # evaluated the same way and stored beside the plan's own run
    job = client.submit("recover", plan=json.loads(plan.to_json()), stats=cal["result"]["path"],
                        runs=str(cache / "runs.sqlite"), out=str(cache / "recovered" / "run"), minutes=0.05, lr=1e-3,
                        train_samples=16, data="demo", num_samples=4, seq_len=64)
    rec = client.wait(job)
    assert rec["state"] == "done", rec
    assert rec["result"]["parent_id"] == done[1]["result"]["run_id"]
    assert (cache / "recovered" / "run" / "recovered" / "model.safetensors").is_file()
    assert client.info()["loads"] == 1

    # The ratio curve of two methods: one job, counted over both, each method's rows in a file of its own
    curve = client.wait(client.submit("curve", stats=cal["result"]["path"], methods=["mone", "random"],
                                      ratios=[0.25, 0.5], out=str(cache / "curves" / "key-{method}.json"),
                                      num_samples=2, seq_len=32))
    assert curve["state"] == "done" and curve["total"] == 4 and curve["done"] == 4, curve
    for method in ("mone", "random"):
        rows = json.loads((cache / "curves" / f"key-{method}.json").read_text())
        assert list(rows) == [method] and [r["ratio"] for r in rows[method]] == [0.25, 0.5]


def test_a_failing_job_is_reported_and_the_backend_goes_on(backend):
    client, cache = backend
    bad = client.wait(client.submit("evaluate", plan={"method": "x", "ratio": 0.1, "mode": "nonsense"},
                                    stats=None, runs=str(cache / "runs.sqlite")))
    assert bad["state"] == "failed" and "nonsense" in bad["error"]
    with pytest.raises(BackendError, match="Unknown job kind"):
        client.submit("format_disk")
    assert client.alive()


def test_a_crashed_backend_is_reported_and_a_new_one_starts(tmp_path):
    client = Backend.start("demo", device="cpu", cache_dir=str(tmp_path))
    job = client.submit("calibrate", data="demo", num_samples=512, seq_len=128)
    time.sleep(1)
    os.kill(client.process.pid, signal.SIGKILL)
    client.process.wait()
    with pytest.raises(BackendError, match="exited with status"):
        client.status(job)
    assert not client.alive()
    fresh = Backend.start("demo", device="cpu", cache_dir=str(tmp_path))
    assert fresh.alive()
    fresh.stop()
    assert fresh.process.poll() is not None and not fresh.log.parent.exists()


def _running(pid: int) -> bool:
    """Whether `pid` runs. A process that exited stays a zombie until its new parent reaps it (a
    container's PID 1 may take seconds to); it holds nothing, so it counts as ended."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except FileNotFoundError:  # reaped meanwhile; or no /proc (not Linux), where os.kill's answer stands
        return not Path("/proc").is_dir()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_backend_exits_when_the_app_that_started_it_ends(tmp_path, sig):
    starter = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from moeviz.backend import Backend; "
        f"b = Backend.start('demo', device='cpu', cache_dir={str(tmp_path)!r}); "
        "print(b.process.pid, b.log.parent, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    pid, workdir = starter.stdout.readline().split(maxsplit=1)
    pid, workdir = int(pid), Path(workdir.strip())
    assert _running(pid) and workdir.is_dir()
    killed = time.time()
    starter.send_signal(sig)  # kill -9: no chance to clean up (nor has Python on SIGTERM)
    starter.wait()
    while _running(pid) and time.time() < killed + 10:
        time.sleep(0.01)
    took = time.time() - killed
    assert took < 0.5, f"the backend outlived the process that started it by {took:.2f} s"  # at once, not polled
    assert not workdir.exists()  # its log and ready file (which holds the token) go with it
