"""Long work outside the app's script: a worker process that reports progress to a file.

The app starts `moeviz calibrate … --progress-file F` and polls F; a click in the app never
interrupts the worker, and the worker never touches Streamlit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .calibrate import CalibConfig


class ProgressFile:
    """Progress as a small JSON file, replaced atomically on each write. A None path writes nothing."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None

    def write(self, state: str, done: int, total: int, **extra) -> None:
        if self.path is None:
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".progress.")
        with os.fdopen(fd, "w") as f:
            json.dump(dict(state=state, done=done, total=total, **extra), f)
        os.replace(tmp, self.path)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return dict(state="starting", done=0, total=0)


@dataclass
class Job:
    """A `moeviz` command running in a worker process, reporting to a progress file."""

    process: subprocess.Popen
    progress: ProgressFile
    log: Path

    def status(self) -> dict:
        """state (starting, loading, …, done, failed), done, total; the command's results when
        done (e.g. path); error, the last line it printed, when failed."""
        status = self.progress.read()
        code = self.process.poll()
        if code not in (None, 0) or (code == 0 and status.get("state") != "done"):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            status = dict(status, state="failed", error=lines[-1] if lines else f"exit status {code}")
        return status


def start_job(args: list[str], workdir: str | os.PathLike | None = None) -> Job:
    """Run `moeviz ARGS --progress-file …` in a worker process; poll the job's `status()`."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="moeviz-job-"))
    workdir.mkdir(parents=True, exist_ok=True)
    progress, log = ProgressFile(workdir / "progress.json"), workdir / "worker.log"
    cmd = [sys.executable, "-m", "moeviz.cli", *args, "--progress-file", str(progress.path)]
    with open(log, "w") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Job(process, progress, log)


def start_calibration(model: str, config: CalibConfig, device: str = "auto",
                      workdir: str | os.PathLike | None = None) -> Job:
    """`moeviz calibrate` in a worker: the stats directory is the status's `path` when done."""
    return start_job([
        "calibrate", "--model", model, "--device", device,
        "--data", config.data, "--samples", str(config.num_samples), "--seq-len", str(config.seq_len),
        "--batch-size", str(config.batch_size), "--seed", str(config.seed),
        "--probe-tokens", str(config.probe_tokens), "--cache-dir", str(Path(config.cache_dir).resolve()),
    ], workdir)


def start_evaluation(model: str, plan_file: str | os.PathLike, stats_dir: str | os.PathLike,
                     runs: str | os.PathLike, extra: list[str] = (), device: str = "auto",
                     workdir: str | os.PathLike | None = None) -> Job:
    """`moeviz evaluate` of a plan against the original, stored as a run (the status's `run_id`)."""
    return start_job([
        "evaluate", "--model", model, "--device", device, "--plan", str(plan_file),
        "--stats", str(stats_dir), "--runs", str(runs), *extra,
    ], workdir)


def start_export(model: str, plan_file: str | os.PathLike, stats_dir: str | os.PathLike, out: str | os.PathLike,
                 device: str = "auto", workdir: str | os.PathLike | None = None) -> Job:
    """`moeviz prune` in a worker: the checkpoint's directory is the status's `path` when done."""
    return start_job(["prune", "--model", model, "--device", device, "--plan", str(plan_file),
                      "--stats", str(stats_dir), "--out", str(out)], workdir)


def start_stability(model: str, config: CalibConfig, chunks: int, methods: list[str], ratio: float,
                    out: str | os.PathLike, device: str = "auto", workdir: str | os.PathLike | None = None) -> Job:
    """`moeviz stability` in a worker: {method: rows} is written to `out` (JSON) when done."""
    return start_job([
        "stability", "--model", model, "--device", device, "--data", config.data,
        "--samples", str(config.num_samples), "--seq-len", str(config.seq_len), "--seed", str(config.seed),
        "--chunks", str(chunks), "--methods", ",".join(methods), "--ratio", str(ratio), "--out", str(out),
    ], workdir)
