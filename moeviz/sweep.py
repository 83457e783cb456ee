"""Sweeps: plan, apply, evaluate and store every method × ratio, as the papers' tables do."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from transformers import PreTrainedModel

from .evaluate import EvalConfig, evaluate
from .loading import model_fingerprint
from .methods import PlanConfig, make_plan
from .runs import RunStore, store_evaluation
from .stats import ExpertStats

TABLE_COLUMNS = ("method", "mode", "ratio", "runs", "task_mean", "task_mean_std", "perplexity",
                 "perplexity_std", "kl", "top1_agreement", "params", "params_saved", "routed_nonzero")


def parse_method(spec: str) -> tuple[str, str | None]:
    """`mone` or `mone:remove` → (method, mode or None for the method's default)."""
    name, _, mode = spec.partition(":")
    return name, mode or None


def sweep(model: PreTrainedModel, tokenizer, stats: ExpertStats, methods: list[str], ratios: list[float],
          eval_config: EvalConfig, scope: str = "layer", store: RunStore | None = None,
          calibration: str | None = None, progress: Callable[[int, int, str], None] | None = None,
          random_seeds: int = 5) -> pd.DataFrame:
    """Evaluate the original, then every method × ratio against it; one table row per cell.

    `random` is a distribution, not a number: it runs `random_seeds` seeds, stores every run,
    and its row is their mean (with the spread of task accuracy and perplexity).
    """
    fingerprint = model_fingerprint(model)
    name = str(getattr(model, "name_or_path", ""))
    runs_per_cell = {spec: random_seeds if parse_method(spec)[0] == "random" else 1 for spec in methods}
    total, done, rows = 1 + sum(runs_per_cell.values()) * len(ratios), 0, []

    def run(label, plan=None) -> dict:
        nonlocal done
        if store is not None:  # stored once: an identical evaluation already stored is reused
            ids = store_evaluation(store, model, tokenizer, eval_config, name, fingerprint, plan, stats, calibration)
            report = store.get(ids["run_id"]).metrics
        elif plan is None:
            report = evaluate(model, eval_config, tokenizer, reference=model)
        else:  # the plan in place, against the same weights without it
            report = evaluate(model, eval_config, tokenizer, plan=plan, stats=stats, fingerprint=fingerprint)
        done += 1
        if progress is not None:
            progress(done, total, label)
        return report

    rows.append(dict(method="original", mode="", ratio=0.0, runs=1,
                     **run("original")))
    for spec in methods:
        method, mode = parse_method(spec)
        for ratio in ratios:
            reports = []
            for seed in range(runs_per_cell[spec]):
                plan = make_plan(stats, PlanConfig(method, ratio=ratio, scope=scope, mode=mode, seed=seed),
                                 calibration=calibration)
                reports.append(dict(run(f"{spec} {ratio:g}", plan),
                                    **({"seed": seed} if method == "random" else {})))
            kind = "sparsity" if plan.sparsity or plan.nm else plan.mode
            rows.append(dict(method=method, mode=kind, ratio=ratio, runs=len(reports), **_mean(reports)))
    return pd.DataFrame(rows)


def _mean(reports: list[dict]) -> dict:
    """The mean of every numeric metric; with several runs, the spread of the main two."""
    frame = pd.DataFrame(reports).select_dtypes("number").drop(columns="seed", errors="ignore")
    mean = frame.mean().to_dict()
    if len(reports) > 1:
        for key in ("task_mean", "perplexity"):
            if key in frame:
                mean[f"{key}_std"] = float(frame[key].std())
    return mean


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows method × ratio; columns the tasks, their mean, perplexity, KL and parameters."""
    tasks = sorted(c for c in frame.columns if c.startswith("task_") and c not in TABLE_COLUMNS)
    columns = [c for c in ("method", "mode", "ratio", "runs", *tasks, *TABLE_COLUMNS[4:]) if c in frame.columns]
    table = frame[columns].copy()
    for count in ("runs", "params", "routed_nonzero"):  # counts are whole numbers, also as means
        if count in table:
            table[count] = table[count].round().astype("int64")
    return table
