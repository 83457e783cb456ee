"""Evaluation runs, stored in one SQLite file (`cache/runs.sqlite`) and compared side by side.

A run is what was evaluated (model, calibration, method, mode, ratio, scope) and every
metric of its report. The original model is stored as method `original`, ratio 0: the
baseline of every comparison.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

DEFAULT_DB = Path("cache") / "runs.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    fingerprint TEXT,
    calibration TEXT,
    method TEXT NOT NULL,
    mode TEXT,
    ratio REAL NOT NULL,
    scope TEXT,
    metrics TEXT NOT NULL
)"""


@dataclass
class Run:
    model: str
    method: str
    ratio: float
    metrics: dict = field(default_factory=dict)
    mode: str | None = None
    scope: str | None = None
    calibration: str | None = None
    fingerprint: str | None = None
    id: int | None = None
    created: float | None = None


class RunStore:
    """Runs on disk. Each call opens and closes its own connection (safe across processes)."""

    def __init__(self, path: str | os.PathLike = DEFAULT_DB):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def add(self, run: Run) -> int:
        with closing(self._connect()) as db, db:
            cur = db.execute(
                "INSERT INTO runs (created, model, fingerprint, calibration, method, mode, ratio, scope, metrics)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), run.model, run.fingerprint, run.calibration, run.method, run.mode,
                 float(run.ratio), run.scope, json.dumps(run.metrics, default=float)),
            )
            return int(cur.lastrowid)

    def get(self, run_id: int) -> Run:
        runs = self.list(id=run_id)
        if not runs:
            raise KeyError(f"No run with id {run_id} in {self.path}")
        return runs[0]

    def list(self, **where) -> list[Run]:
        """Runs matching every `column=value` given (model, method, mode, scope, calibration, id)."""
        allowed = {"id", "model", "fingerprint", "calibration", "method", "mode", "scope", "ratio"}
        unknown = set(where) - allowed
        if unknown:
            raise KeyError(f"Cannot filter runs by {sorted(unknown)}; by: {', '.join(sorted(allowed))}")
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT * FROM runs WHERE {clause} ORDER BY id", tuple(where.values())).fetchall()
        return [Run(**{**dict(row), "metrics": json.loads(row["metrics"])}) for row in rows]

    def delete(self, run_id: int) -> None:
        with closing(self._connect()) as db, db:
            if db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 0:
                raise KeyError(f"No run with id {run_id} in {self.path}")

    def table(self, **where) -> pd.DataFrame:
        """One row per run: its settings, then every metric as a column."""
        rows = []
        for run in self.list(**where):
            flat = {k: v for k, v in run.metrics.items() if not isinstance(v, dict)}
            rows.append(dict(id=run.id, model=run.model, method=run.method, mode=run.mode, ratio=run.ratio,
                             scope=run.scope, calibration=run.calibration, **flat))
        return pd.DataFrame(rows)
