"""Sweeps: plan, apply, evaluate and store every method × ratio, as the papers' tables do."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from transformers import PreTrainedModel

from .apply import apply_plan
from .evaluate import EvalConfig, evaluate
from .loading import model_fingerprint
from .methods import PlanConfig, make_plan
from .runs import Run, RunStore
from .stats import ExpertStats

TABLE_COLUMNS = ("method", "mode", "ratio", "task_mean", "perplexity", "kl", "top1_agreement",
                 "params", "params_saved", "routed_nonzero")


def parse_method(spec: str) -> tuple[str, str | None]:
    """`mone` or `mone:remove` → (method, mode or None for the method's default)."""
    name, _, mode = spec.partition(":")
    return name, mode or None


def sweep(model: PreTrainedModel, tokenizer, stats: ExpertStats, methods: list[str], ratios: list[float],
          eval_config: EvalConfig, scope: str = "layer", store: RunStore | None = None,
          calibration: str | None = None, progress: Callable[[int, int, str], None] | None = None,
          ) -> pd.DataFrame:
    """Evaluate the original, then every method × ratio against it; one table row per run."""
    fingerprint = model_fingerprint(model)
    name = str(getattr(model, "name_or_path", ""))
    total, rows = 1 + len(methods) * len(ratios), []

    def record(label, method, mode, ratio, report):
        rows.append(dict(method=method, mode=mode, ratio=ratio, **report))
        if store is not None:
            store.add(Run(name, method, ratio, report, mode, scope, calibration, fingerprint))
        if progress is not None:
            progress(len(rows), total, label)

    record("original", "original", None, 0.0, evaluate(model, eval_config, tokenizer, reference=model))
    for spec in methods:
        method, mode = parse_method(spec)
        for ratio in ratios:
            plan = make_plan(stats, PlanConfig(method, ratio=ratio, scope=scope, mode=mode), calibration=calibration)
            pruned = apply_plan(model, plan, stats)
            record(f"{spec} {ratio:g}", method, plan.mode, ratio,
                   evaluate(pruned, eval_config, tokenizer, reference=model))
            del pruned
    return pd.DataFrame(rows)


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows method × ratio; columns the tasks, their mean, perplexity, KL and parameters."""
    tasks = sorted(c for c in frame.columns if c.startswith("task_") and c != "task_mean")
    columns = [c for c in ("method", "mode", "ratio", *tasks, *TABLE_COLUMNS[3:]) if c in frame.columns]
    return frame[columns]
