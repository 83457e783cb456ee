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
        """One row per run: its settings, then every metric (and standard error) as a number."""
        rows = []
        for run in self.list(**where):
            flat = {k: v for k, v in run.metrics.items() if not isinstance(v, dict)}
            flat.update({f"{k}_se": v for k, v in (run.metrics.get("se") or {}).items()})
            recovery = run.metrics.get("recovery") or {}
            rows.append(dict(id=run.id, model=run.model, run=run_name(vars(run)), evaluated_on=setting(run),
                             method=run.method, mode=run.mode, ratio=run.ratio, scope=run.scope,
                             calibration=run.calibration, recovered=bool(recovery),
                             parent_run=recovery.get("parent_run"), recovery_steps=recovery.get("steps"),
                             recovery_minutes=recovery.get("minutes"), **flat))
        return pd.DataFrame(rows)


def plan_digest(plan) -> str:
    """What a plan does (not how it was named): its mode, pruned experts, merges and sparsity, and
    for novices, merges and sparsity the statistics they are computed from."""
    import hashlib

    what = dict(mode=plan.mode, pruned=plan.pruned, merge_into=plan.merge_into, sparsity=plan.sparsity, nm=plan.nm)
    if plan.mode in ("novice", "merge") or plan.sparsity or plan.nm:
        what["calibration"] = plan.calibration
        if plan.mix:
            what["mix"] = [(m["path"], round(m["share"], 12)) for m in plan.mix]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_evaluation(store: RunStore, model, tokenizer, config, name: str, fingerprint: str, plan=None,
                     stats=None, calibration: str | None = None, progress=None) -> dict:
    """Evaluate `plan` on `model` (in place, against the same weights without it) and store the
    run; the original is evaluated and stored once per evaluation setting, as the baseline of
    every comparison. An identical evaluation already stored is returned, not repeated.
    Returns {"run_id", "baseline_id", "cached"}."""
    from dataclasses import asdict

    from .evaluate import evaluate

    setting = json.loads(json.dumps(asdict(config), default=list))  # as it is stored (tuples become lists)

    def same(run: Run) -> bool:
        return run.metrics.get("eval") == setting

    baseline = next((r for r in store.list(fingerprint=fingerprint, method="original") if same(r)), None)
    if baseline is None:
        report = evaluate(model, config, tokenizer, progress=progress)
        report.update(kl=0.0, top1_agreement=1.0, params_saved=0.0, bytes_saved=0.0, eval=setting)
        baseline = store.get(store.add(Run(name, "original", 0.0, report, None, None, calibration, fingerprint)))
    if plan is None:
        return dict(run_id=baseline.id, baseline_id=baseline.id, cached=True)
    digest = plan_digest(plan)
    for run in store.list(fingerprint=fingerprint, method=plan.method):
        if run.metrics.get("plan_digest") == digest and same(run) and not run.metrics.get("recovery"):
            return dict(run_id=run.id, baseline_id=baseline.id, cached=True)
    report = evaluate(model, config, tokenizer, progress=progress, plan=plan, stats=stats, fingerprint=fingerprint)
    report.update(plan_digest=digest, eval=setting)
    mode = "sparsity" if plan.sparsity or plan.nm else plan.mode  # moe_pruner removes no expert
    run = Run(name, plan.method, plan.ratio, report, mode, plan.scope, calibration, fingerprint)
    return dict(run_id=store.add(run), baseline_id=baseline.id, cached=False)


def store_export_evaluation(store: RunStore, exported, reference, tokenizer, config, export_path: str, name: str,
                            plan, progress=None) -> dict:
    """Evaluate an exported checkpoint against its original `reference` and store it as a run of
    the plan it was exported with (its lineage's), beside the original's baseline, evaluated the
    same way: comparable with the same plan evaluated in place. Returns {"run_id", "baseline_id"}."""
    from dataclasses import asdict

    from .checkpoint import fingerprint as model_fingerprint
    from .evaluate import evaluate

    fp = model_fingerprint(reference)
    baseline = store_evaluation(store, reference, tokenizer, config, name, fp, progress=progress)["baseline_id"]
    report = evaluate(exported, config, tokenizer, reference=reference, progress=progress)
    report.update(plan_digest=plan_digest(plan), eval=json.loads(json.dumps(asdict(config), default=list)),
                  export=str(export_path))
    mode = "sparsity" if plan.sparsity or plan.nm else plan.mode
    run = Run(name, plan.method, plan.ratio, report, mode, plan.scope, plan.calibration, fp)
    return dict(run_id=store.add(run), baseline_id=baseline)


def store_recovery(store: RunStore, student, teacher, tokenizer, config, name: str, fingerprint: str, plan,
                   stats, calibration: str | None, recovery: dict, progress=None) -> dict:
    """Evaluate a recovered `student` against its `teacher` and store it as a run of the plan it
    was pruned with, linked to the plan's own run (stored first if it is not, with the original
    as the baseline): the pair before and after recovery, evaluated the same way.
    Returns {"run_id", "parent_id", "baseline_id"}. A rejected recovery (`recovery["kept"] ==
    "pruned"`: it made the model worse, the pruned model is kept) is no new model and stores no
    run: its "run_id" is None."""
    from dataclasses import asdict

    from .evaluate import evaluate

    parent = store_evaluation(store, teacher, tokenizer, config, name, fingerprint, plan, stats, calibration, progress)
    if recovery.get("kept") == "pruned":
        return dict(run_id=None, parent_id=parent["run_id"], baseline_id=parent["baseline_id"])
    before = store.get(parent["run_id"]).metrics
    report = evaluate(student, config, tokenizer, reference=teacher, progress=progress)
    report.update({k: before[k] for k in ("params_saved", "bytes_saved", "params", "bytes") if k in before})
    report.update(plan_digest=plan_digest(plan), eval=json.loads(json.dumps(asdict(config), default=list)),
                  recovery={**recovery, "parent_run": parent["run_id"]})
    mode = "sparsity" if plan.sparsity or plan.nm else plan.mode
    run = Run(name, plan.method, plan.ratio, report, mode, plan.scope, calibration, fingerprint)
    return dict(run_id=store.add(run), parent_id=parent["run_id"], baseline_id=parent["baseline_id"])


def run_name(run: dict) -> str:
    """What a run is, in words: `mone novice 25 %`, `moe_pruner sparsity 50 %`, `original`,
    `mone remove 25 % + recovery`."""
    if run.get("method") == "original":
        return "original"
    parts = [run["method"], run.get("mode"), f"{float(run['ratio']) * 100:g} %",
             "global" if run.get("scope") == "global" else None,
             "on a mix" if "@" in str(run.get("calibration") or "") else None,  # calibrations at shares
             "+ recovery" if (run.get("metrics") or {}).get("recovery") else None]
    return " ".join(p for p in parts if p)


SUMMARY = ("perplexity", "task_mean", "kl", "top1_agreement", "params_saved")


def setting(run: Run) -> str:
    """What a run was evaluated on, in a few words: `demo, 32 × 128, tasks`."""
    e = run.metrics.get("eval") or {}
    tasks = ", tasks" if e.get("demo_tasks") or e.get("lm_eval_tasks") else ""
    return f"{e.get('data', '?')}, {e.get('num_samples', '?')} × {e.get('seq_len', '?')}{tasks}"


def baseline_of(run: Run, originals: list[Run]) -> Run | None:
    """The original evaluated exactly as `run` was (same model, same evaluation setting)."""
    return next((o for o in originals if o.fingerprint == run.fingerprint
                 and o.metrics.get("eval") == run.metrics.get("eval")), None)


def recovery_pairs(runs: list[Run], keys=("task_mean", "perplexity", "kl", "top1_agreement")) -> pd.DataFrame:
    """One row per recovered run and metric (long, so it fits a page): the run, its plan, what
    recovery took, and the metric for the original, the plan before recovery and after it, all
    evaluated the same way."""
    by_id = {run.id: run for run in runs}
    originals = [r for r in runs if r.method == "original"]
    rows = []
    for run in runs:
        recovery = run.metrics.get("recovery")
        if not recovery or (parent := by_id.get(recovery.get("parent_run"))) is None:
            continue
        base = baseline_of(run, originals)
        took = f"{recovery.get('steps', '?')} steps, {recovery.get('minutes') or 0:.1f} min"
        rows += [dict(run=run.id, plan=run_name(vars(parent)), recovery=took, metric=key,
                      original=base.metrics.get(key) if base else None, pruned=parent.metrics.get(key),
                      recovered=run.metrics[key]) for key in keys if key in run.metrics]
    return pd.DataFrame(rows, columns=["run", "plan", "recovery", "metric", "original", "pruned", "recovered"])


def _shown(run: Run, key: str) -> str | None:
    """A metric as the tables show it: its value, ± its standard error where known."""
    m, se = run.metrics, run.metrics.get("se") or {}
    if key not in m:
        return None
    err = m.get(f"{key}_se", se.get(key))
    return f"{m[key]:.4g}" + (f" ± {err:.2g}" if err else "")


def _tasks(run: Run) -> list[str]:
    """The run's per-task accuracies (`task_arithmetic`, …), not their mean."""
    return sorted(k for k in run.metrics if k.startswith("task_") and k != "task_mean" and not k.endswith("_se"))


def delta_table(runs: list[Run], originals: list[Run] | None = None) -> pd.DataFrame:
    """One row per run: its name, what it was evaluated on, each main metric with its standard
    error where known, and the change against the original evaluated the same way (each demo
    task's accuracy is in `task_table`, so that both fit a page)."""
    originals = [r for r in runs if r.method == "original"] if originals is None else originals
    rows = []
    for run in runs:
        baseline = baseline_of(run, originals)
        row = dict(id=run.id, run=run_name(vars(run)), evaluated_on=setting(run))
        for key in SUMMARY:
            if key not in run.metrics:
                continue
            row[key] = _shown(run, key)
            if baseline is not None and key in baseline.metrics and key in ("perplexity", "task_mean"):
                row[f"Δ {key}"] = f"{run.metrics[key] - baseline.metrics[key]:+.3g}"
                if key == "perplexity" and run.metrics.get("recovery"):  # trained on text of this source
                    row[f"Δ {key}"] = "not comparable"
        rows.append(row)
    return pd.DataFrame(rows)


def task_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run evaluated on tasks: each task's accuracy ± its standard error (the demo
    model's five tasks, or lm-eval's), where pruning's damage often shows first."""
    return pd.DataFrame([dict(id=run.id, run=run_name(vars(run)),
                              **{key.removeprefix("task_"): _shown(run, key) for key in _tasks(run)})
                         for run in runs if _tasks(run)])


def against_original(run: Run, baseline: Run) -> pd.DataFrame:
    """One row per metric (the main ones, then each task): the original's value, the run's, and
    the change, both evaluated the same way."""
    rows = []
    for key in [k for k in SUMMARY if k != "params_saved"] + _tasks(run) + ["params_saved"]:
        if key not in run.metrics:
            continue
        change = run.metrics[key] - baseline.metrics[key] if key in baseline.metrics else None
        if key == "perplexity" and run.metrics.get("recovery"):
            change = None  # trained on text of this source: not comparable with the original's
        rows.append(dict(metric=key.removeprefix("task_") if key != "task_mean" else key,
                         original=_shown(baseline, key), **{run_name(vars(run)): _shown(run, key)},
                         change=None if change is None else f"{change:+.3g}"))
    return pd.DataFrame(rows)


def source_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run and held-out source, for runs evaluated on several sources (a mix's):
    each source's perplexity, KL, top-1 and demo task (± SE where known), and the change of
    perplexity and task against the original evaluated the same way."""
    originals = [r for r in runs if r.method == "original"]
    rows = []
    for run in runs:
        sources = run.metrics.get("sources") or {}
        base = (baseline_of(run, originals) or Run("", "", 0.0)).metrics.get("sources") or {}
        for name, m in sources.items():
            row = dict(id=run.id, run=run_name(vars(run)), source=name,
                       perplexity=f"{m['perplexity']:.4g} ± {m.get('perplexity_se', float('nan')):.2g}")
            if name in base and run.method != "original":
                row["Δ perplexity"] = ("not comparable" if run.metrics.get("recovery")
                                       else f"{m['perplexity'] - base[name]['perplexity']:+.3g}")
            row.update({k: round(m[k], 4) for k in ("kl", "top1_agreement") if k in m})
            if "task" in m:
                row["task"] = f"{m['task']:.3g}" + (f" ± {m['task_se']:.2g}" if m.get("task_se") else "")
                if name in base and "task" in base[name] and run.method != "original":
                    row["Δ task"] = f"{m['task'] - base[name]['task']:+.3g}"
            rows.append(row)
    return pd.DataFrame(rows)
