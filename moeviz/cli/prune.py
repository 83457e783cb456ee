"""Commands that prune: `plan` (a plan from cached statistics), `prune` (the pruned checkpoint,
streamed from the original's files) and `verify` (that checkpoint checked where it will be served)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (calibration_label, check_fraction, check_new_dir, device_map_arg, mix_arg, positive,
                     progress_bar, stats_of)


def add_plan(sub) -> None:
    plan = sub.add_parser("plan", help="make a pruning plan (JSON) from cached stats")
    plan.add_argument("--stats", required=True, help="a stats directory (what calibrate printed), or several, "
                      "comma-separated, mixed at --mix")
    mix_arg(plan)
    plan.add_argument("--method", required=True, help="cprune, ean, frequency, gate_frequency, moe_pruner, mone, random, reap, soft_usage")
    plan.add_argument("--ratio", type=float, default=0.25,
                      help="fraction pruned: of routed experts; for moe_pruner, of every expert row's weights")
    plan.add_argument("--scope", choices=("layer", "global"), default="layer")
    plan.add_argument("--counts", default="free",
                      help="with --scope global: 'free' (the threshold decides each layer's count), 'equal' (the "
                           "same count in every layer: a standard checkpoint) or N (every layer keeps a multiple of "
                           "N experts, for expert parallelism)")
    plan.add_argument("--mode", choices=("remove", "novice", "drop", "merge"), help="default: the method's own")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--nm", help="moe_pruner: n:m semi-structured sparsity, e.g. 2:4")
    plan.add_argument("--features", choices=("outputs", "weights"), default="outputs",
                      help="cprune: cluster on probe outputs or on (permutation-invariant) weights")
    plan.add_argument("--linkage", choices=("average", "ward"), default="average",
                      help="cprune: cluster linkage (the authors' code uses ward)")
    plan.add_argument("--representative", choices=("frequency", "medoid"), default="frequency",
                      help="cprune: each cluster keeps its most used expert, or the one nearest the others")
    plan.add_argument("--model", help="cprune --features weights: the model whose weights to read")
    plan.add_argument("--out", required=True, help="where to write plan.json")
    plan.set_defaults(func=_plan)


def _plan(args) -> int:
    from ..methods import PlanConfig, make_plan
    from ..plan import export_kind

    stats = stats_of(args)
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    config = PlanConfig(args.method, args.ratio, args.scope, args.mode, args.seed, nm, args.features, args.linkage,
                        args.representative, args.counts)
    weights = None
    if args.features == "weights" and args.method == "cprune":
        weights = _weight_features(args.model, stats)
    plan = make_plan(stats, config, weights=weights, calibration=calibration_label(args, stats))
    plan.save(args.out)
    counts = [len(plan.pruned.get(i, ())) for i in stats.layer_indices]
    print(f"{args.method}: {plan.num_pruned} experts pruned ({plan.mode}), per layer {counts}"
          + (f", weight sparsity {plan.sparsity or plan.nm}" if plan.sparsity or plan.nm else "")
          + f"; exports as {export_kind(plan).name}", file=sys.stderr)
    print(args.out)
    return 0


def _weight_features(model_name, stats):
    """C-Prune's invariant weight features, read from the checkpoint's files one layer at a time."""
    import torch

    from ..analysis import weight_features
    from ..loading import file_layers

    if not model_name:
        raise ValueError("cprune --features weights needs --model.")
    return torch.stack([weight_features(layer) for layer in file_layers(model_name)])  # (L, E, D)


def add_prune(sub) -> None:
    prune = sub.add_parser("prune", help="export the pruned checkpoint, streamed shard by shard from the original's")
    prune.add_argument("--model", default="demo", help="'demo', a local checkpoint path or a hub id (its files are read, "
                       "the model is never loaded)")
    prune.add_argument("--plan", help="the plan to export (or --sequential)")
    prune.add_argument("--stats", help="the stats directory (needed for novices, merges, weight sparsity; by "
                       "default the plan's own calibration or mix)")
    mix_arg(prune)
    prune.add_argument("--sequential", action="store_true",
                       help="MoE-Pruner, layer by layer: each layer scored on the outputs of the pruned layers "
                            "before it (needs --data, --ratio or --nm; no --plan)")
    prune.add_argument("--method", default="moe_pruner", help=argparse.SUPPRESS)
    prune.add_argument("--ratio", type=float, default=0.5, help="with --sequential: the row sparsity")
    prune.add_argument("--nm", help="with --sequential: n:m sparsity instead, e.g. 2:4")
    prune.add_argument("--data", default="demo", help="with --sequential: the calibration text")
    prune.add_argument("--samples", type=positive, default=64, help="with --sequential: calibration sequences")
    prune.add_argument("--seq-len", type=positive, default=128)
    prune.add_argument("--cache-dir", default="cache")
    prune.add_argument("--mtp", choices=("prune", "drop"),
                       help="multi-token-prediction layers in the files (DeepSeek-V3, GLM, MiMo), when the plan changes "
                            "the expert count: cut their experts to the same count by router-row norm, or drop them")
    prune.add_argument("--runs", help="a runs store (SQLite) that may hold this plan's evaluation, for the model card "
                       "(default: cache/runs.sqlite when it exists)")
    prune.add_argument("--out", required=True, help="a new directory for the pruned checkpoint")
    prune.set_defaults(func=_prune)


def _prune(args) -> int:
    from ..export import export_plan
    from ..plan import PruningPlan, export_kind

    check_new_dir(args.out)  # before any work, and before a progress bar
    from ..loading import load_skeleton

    load_skeleton(args.model)  # an architecture moeviz cannot prune: refused before anything is said or written
    if args.sequential:
        check_fraction(args.ratio, "--ratio")
        plan, stats = _sequential_plan(args)
    elif args.plan:
        plan = PruningPlan.load(args.plan)
        stats = stats_of(args, plan)
    else:
        raise ValueError("Give --plan, or --sequential for MoE-Pruner layer by layer.")
    runs = args.runs or ("cache/runs.sqlite" if Path("cache/runs.sqlite").is_file() else None)
    if runs is not None and not Path(runs).is_file():
        raise FileNotFoundError(f"No runs store at {runs}.")
    print(f"exporting as {export_kind(plan, _quantization(args.model))}", file=sys.stderr)  # before anything is written
    with progress_bar("exporting", "tensor") as progress:  # source tensors, shard by shard
        export_plan(args.model, plan, stats, args.out, progress, runs=runs, mtp=args.mtp)
    what = f"weight sparsity {plan.sparsity or plan.nm}" if plan.sparsity or plan.nm else f"{plan.num_pruned} experts pruned ({plan.mode})"
    print(f"{what}; model card in {Path(args.out) / 'README.md'}", file=sys.stderr)
    print(args.out)
    return 0


def _quantization(model: str) -> dict | None:
    from ..loading import load_config

    return getattr(load_config(model), "quantization_config", None)


def _sequential_plan(args):
    """MoE-Pruner's sequential mode: stats calibrated layer by layer, each layer pruned before the
    next sees it; the plan made from them gives exactly those masks."""
    from ..calibrate import CalibConfig, calibrate
    from ..loading import load_skeleton, load_tokenizer
    from ..methods import PlanConfig, make_plan

    if args.method != "moe_pruner":
        raise ValueError("--sequential is MoE-Pruner's mode: use --method moe_pruner.")
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    config = CalibConfig(data=args.data, num_samples=args.samples, seq_len=args.seq_len, cache_dir=args.cache_dir,
                         layer_by_layer=True, sequential_sparsity=0.0 if nm else args.ratio, sequential_nm=nm)
    model = load_skeleton(args.model, with_files=True)
    tokenizer = load_tokenizer(model._moeviz_source)
    with progress_bar("calibrating, layer by layer", "layer") as progress:
        stats, path = calibrate(model, config, tokenizer, progress=progress)
    print(f"sequential statistics: {path}", file=sys.stderr)
    return make_plan(stats, PlanConfig("moe_pruner", ratio=args.ratio, nm=nm), calibration=str(path)), stats


def add_verify(sub) -> None:
    verify = sub.add_parser("verify", help="check an export's files, then serve it in an engine and compare its outputs "
                                           "with the plan's")
    verify.add_argument("export", help="the exported checkpoint directory")
    verify.add_argument("--engine", choices=("transformers", "vllm", "moeviz"),
                        help="what serves it (default: stock transformers for a standard export, moeviz otherwise)")
    verify.add_argument("--python", help="run the engine in this Python (vLLM pins its own torch and transformers, so "
                                         "it often has a venv of its own; default: this one)")
    verify.add_argument("--data", help="the prompts' text (default: the plan's calibration text, held-out part)")
    verify.add_argument("--prompts", type=positive, default=5, help="held-out prompts")
    verify.add_argument("--prompt-tokens", type=positive, default=32)
    verify.add_argument("--new-tokens", type=positive, default=16, help="greedy tokens to continue each prompt by")
    verify.add_argument("--tolerance", type=float, help="the largest log-prob difference that passes (default: by "
                                                        "dtype, 1e-3 for float32, 0.05 float16, 0.15 bfloat16)")
    verify.add_argument("--device", default="auto")
    device_map_arg(verify)
    verify.add_argument("--tp", type=positive, default=1, help="vLLM's tensor-parallel size (GPUs)")
    verify.add_argument("--files-only", action="store_true", help="check the files alone (no engine, no weights read)")
    verify.set_defaults(func=_verify)


def _verify(args) -> int:
    from ..filecheck import check_files
    from ..verify import VerifyError, verify

    if args.files_only:
        notes: list[str] = []
        problems = check_files(args.export, notes)
        print("\n".join([*problems, *(f"note: {n}" for n in notes)]) or f"{args.export}: the files are whole")
        return 1 if problems else 0
    try:
        result = verify(args.export, args.engine, args.python, args.data, args.prompts, args.prompt_tokens,
                        args.new_tokens, args.device, args.tolerance, progress=lambda text: print(text, file=sys.stderr),
                        device_map=args.device_map, tp=args.tp)
    except VerifyError as err:  # the files, one line each: before any model was built
        print(err)
        return 1
    for i, row in enumerate(result.rows):
        same = "tokens equal" if row["first_difference"] is None else (
            f"tokens differ from token {row['first_difference']}" + (" (a tie)" if row["equal"] else ""))
        print(f"prompt {i}: {same}, largest log-prob difference {row['diff']:.2g}")
    print(result.summary())
    return 0 if result.ok else 1
