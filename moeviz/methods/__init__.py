"""Pruning methods, found by name in a registry.

A method is a small module: a pure score from `ExpertStats` (higher = keep), turned into a
plan by the shared selection in `moeviz.plan`; or, where the method decides more than a
ranking (C-Prune's clusters, MoE-Pruner's weight sparsity), a function returning the plan.
No method changes weights: `moeviz.apply` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..plan import PlanError, PruningPlan, select
from ..stats import ExpertStats


@dataclass(frozen=True)
class PlanConfig:
    method: str
    ratio: float = 0.25  # fraction pruned: of routed experts, or of each expert row's weights (moe_pruner)
    scope: str = "layer"  # "layer": the same ratio in every layer; "global": one threshold across layers
    mode: str | None = None  # remove, novice, drop or merge; None takes the method's default
    seed: int = 0  # for `random`
    nm: tuple[int, int] | None = None  # moe_pruner: n:m semi-structured sparsity instead
    features: str = "outputs"  # cprune: "outputs" (probes) or "weights" (needs the model's weights)
    linkage: str = "average"  # cprune: "average" or "ward" (the authors' code)
    representative: str = "frequency"  # cprune: each cluster keeps its most used member, or its "medoid"
    counts: str = "free"  # global scope: "free", "equal" (a standard export) or "N" (kept counts multiples of N)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    default_mode: str
    doc: str
    makes_plan: bool  # fn returns a PruningPlan instead of scores


METHODS: dict[str, Method] = {}


def register(name: str, default_mode: str = "remove", makes_plan: bool = False):
    def wrap(fn):
        METHODS[name] = Method(name, fn, default_mode, (fn.__doc__ or "").strip().splitlines()[0], makes_plan)
        return fn
    return wrap


def get_method(name: str) -> Method:
    _load_all()
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def plan_info(stats: ExpertStats) -> dict:
    """What a plan records of its model, from the stats' metadata."""
    keys = ("model", "model_fingerprint", "architecture", "layer_indices", "num_experts", "top_k", "group_count")
    info = {k: stats.meta.get(k) for k in keys}
    info["group_count"] = info["group_count"] or 1
    return info


def make_plan(stats: ExpertStats, config: PlanConfig, weights=None, calibration: str | None = None) -> PruningPlan:
    """The plan of `config.method` at `config.ratio` from cached stats (and weights where needed)."""
    method = get_method(config.method)
    mode = config.mode or method.default_mode
    info = plan_info(stats)
    if config.counts != "free" and (method.makes_plan or (config.scope != "global" and config.counts != "equal")):
        raise PlanError(f"counts={config.counts!r} shapes global scope's per-layer counts of a score-based method; "
                        f"{config.method} with scope {config.scope!r} decides its own.")
    if method.makes_plan:
        plan = method.fn(stats, config, info, weights)
        plan.mode = config.mode or plan.mode
    else:
        scores = np.asarray(method.fn(stats, config), dtype=float)
        pruned = select(scores, config.ratio, config.scope, info, config.counts)
        plan = PruningPlan(config.method, config.ratio, config.scope, mode, info, pruned=pruned)
    if plan.mode == "merge" and not plan.merge_into:
        raise PlanError(f"{config.method} has no merge targets; merge works with cprune.")
    plan.calibration = calibration
    plan.mix = stats.meta.get("mix")
    plan.validate()
    return plan


def method_scores(stats: ExpertStats, config: PlanConfig) -> np.ndarray:
    """(L, E) importance of a score-based method (higher = keep), for plots."""
    method = get_method(config.method)
    if method.makes_plan:
        raise PlanError(f"{config.method} does not rank experts by one score.")
    return np.asarray(method.fn(stats, config), dtype=float)


def _load_all() -> None:
    from . import baselines, cprune, moe_pruner, mone  # noqa: F401  (registration)
