"""Commands that measure and keep the measures: `evaluate` (one model or plan), `sweep` (every
method × ratio) and `runs` (the stored runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import (calibration_label, device_map_arg, eval_args, eval_config_of, mix_arg, model_args, plan_and_stats,
                     positive, stats_of)


def add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="perplexity, demo tasks, fidelity to a reference, size and speed")
    model_args(ev)
    device_map_arg(ev)
    eval_args(ev)
    ev.add_argument("--reference", help="the original model, for KL, top-1 agreement and savings")
    ev.add_argument("--plan", help="evaluate this plan applied to --model, against --model itself")
    ev.add_argument("--stats", help="the plan's stats directory (novices, merges, weight sparsity; by default the "
                    "plan's own calibration or mix)")
    mix_arg(ev)
    ev.add_argument("--runs", help="also store the report as a run in this SQLite file")
    ev.add_argument("--out", help="write the report as JSON here")
    ev.add_argument("--json", action="store_true", help="print the full report as JSON (default: a summary)")
    ev.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    import json

    from ..evaluate import evaluate
    from ..loading import load_model, model_fingerprint

    config = eval_config_of(args)
    if args.plan and args.reference:
        raise ValueError("Give --plan (evaluated in place against --model) or --reference, not both.")
    plan, stats = plan_and_stats(args)
    if args.data is None and plan is not None and plan.mix:  # each source the plan was calibrated on
        from dataclasses import replace

        from ..data import mix_sources

        config = replace(config, data=mix_sources(plan.mix))
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code)

    def progress(step, done, total):
        print(f"{step}…", file=sys.stderr)

    original = None  # a plan's figures are printed beside the original's, evaluated the same way
    if args.runs and args.reference:  # an exported checkpoint against its original: a run of its plan
        from ..recover import plan_of
        from ..runs import RunStore, store_export_evaluation

        store = RunStore(args.runs)
        reference, _ = load_model(args.reference, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code)
        ids = store_export_evaluation(store, model, reference, tokenizer, config, args.model, args.reference,
                                      plan_of(model), progress)
        report, original = store.get(ids["run_id"]).metrics, store.get(ids["baseline_id"]).metrics
        print(f"stored as run {ids['run_id']}", file=sys.stderr)
    elif args.runs:  # the plan in place, against the original; the original stored once as the baseline
        from ..runs import RunStore, store_evaluation

        store = RunStore(args.runs)
        ids = store_evaluation(store, model, tokenizer, config, args.model, model_fingerprint(model),
                               plan, stats, calibration_label(args, stats) or (plan.calibration if plan else None),
                               progress)
        report = store.get(ids["run_id"]).metrics
        if plan is not None and ids.get("baseline_id") is not None:
            original = store.get(ids["baseline_id"]).metrics
        print(f"stored as run {ids['run_id']}" + (" (already stored)" if ids["cached"] else ""), file=sys.stderr)
    else:
        reference = None
        if args.reference:
            reference, _ = load_model(args.reference, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                      trust_remote_code=args.trust_remote_code)
        report = evaluate(model, config, tokenizer, reference, progress=progress, plan=plan, stats=stats)
        if plan is not None:
            original = evaluate(model, config, tokenizer, progress=progress)
    text = json.dumps(report if original is None else dict(report, original=original), indent=2, default=float)
    if args.out:
        Path(args.out).write_text(text)
    print(text if args.json else _summary(report) if original is None else _beside(original, report))
    return 0


def _beside(original: dict, pruned: dict) -> str:
    """The plan's main figures beside the original's, evaluated the same way, with the change."""
    itself = dict(kl=0.0, top1_agreement=1.0, params_saved=0.0)  # the original against itself

    def cell(report: dict, key: str) -> str:
        value = report.get(key, itself.get(key))
        err = report.get(f"{key}_se", (report.get("se") or {}).get(key))
        return "" if value is None else f"{value:.4g}" + (f" ± {err:.2g}" if err else "")

    lines = [f"{'':>15}  {'original':>16}  {'pruned':>16}  change"]
    for key in ("perplexity", "task_mean", "kl", "top1_agreement", "params_saved"):
        if key in pruned:
            before = original.get(key, itself.get(key))
            change = "" if before is None else f"{pruned[key] - before:+.3g}"
            lines.append(f"{key:>15}  {cell(original, key):>16}  {cell(pruned, key):>16}  {change}")
    return "\n".join(lines)


def _summary(report: dict) -> str:
    """A few lines a person reads: each main metric with its standard error where known."""
    se = report.get("se") or {}
    lines = []
    for key in ("perplexity", "task_mean", "kl", "top1_agreement", "params_saved", "tokens_per_s"):
        if key in report:
            err = report.get(f"{key}_se", se.get(key))
            lines.append(f"{key:>15}: {report[key]:.4g}" + (f" ± {err:.2g}" if err else ""))
    tasks = [f"{k.removeprefix('task_')} {v:.2f}" for k, v in report.items() if k.startswith("task_") and k != "task_mean"]
    if tasks:
        lines.append(f"{'tasks':>15}: " + ", ".join(tasks))
    for name, entry in (report.get("sources") or {}).items():
        parts = [f"perplexity {entry['perplexity']:.4g} ± {entry['perplexity_se']:.2g}"]
        parts += [f"{k} {entry[k]:.3g}" for k in ("kl", "top1_agreement") if k in entry]
        if "task" in entry:
            parts.append(f"task {entry['task']:.2f} ± {entry['task_se']:.2f}")
        lines.append(f"{name:>15}: " + ", ".join(parts))
    return "\n".join(lines)


def add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="plan, apply, evaluate and store every method × ratio")
    model_args(sw)
    device_map_arg(sw)
    eval_args(sw)
    sw.add_argument("--stats", required=True, help="the stats directory of this model, or several, comma-separated, "
                    "mixed at --mix")
    mix_arg(sw)
    sw.add_argument("--methods", default="mone,mone:remove,cprune,reap,frequency,random",
                    help="comma-separated; method:mode overrides a mode, e.g. mone:remove")
    sw.add_argument("--ratios", default="0.25,0.5")
    sw.add_argument("--scope", choices=("layer", "global"), default="layer")
    sw.add_argument("--runs", default="cache/runs.sqlite", help="where runs are stored")
    sw.add_argument("--random-seeds", type=positive, default=5, help="seeds averaged for the random baseline")
    sw.add_argument("--out", help="write the table as CSV here")
    sw.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from tqdm import tqdm

    from ..loading import load_model
    from ..runs import RunStore
    from ..sweep import paper_table, sweep

    stats = stats_of(args)
    methods, ratios = _sweep_grid(args.methods, args.ratios)  # every argument checked before any work
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code)
    with tqdm(total=1 + len(methods) * len(ratios), unit="run", file=sys.stderr) as bar:
        def progress(done, total, label):
            bar.total = total  # random runs several seeds a cell
            bar.set_postfix_str(label)
            bar.update(done - bar.n)
        frame = sweep(model, tokenizer, stats, methods, ratios, eval_config_of(args), args.scope,
                      RunStore(args.runs), calibration_label(args, stats), progress, args.random_seeds)
    table = paper_table(frame)
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else table.to_string(index=False))
    return 0


def _sweep_grid(methods: str, ratios: str) -> tuple[list[str], list[float]]:
    from ..methods import get_method
    from ..plan import MODES
    from ..sweep import parse_method

    specs = [m.strip() for m in methods.split(",") if m.strip()]
    for spec in specs:
        name, mode = parse_method(spec)
        get_method(name)  # an unknown method lists the known ones
        if mode is not None and mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r} in {spec!r}; modes: {', '.join(MODES)}")
    try:
        values = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError as err:
        raise ValueError(f"--ratios must be numbers separated by commas, got {ratios!r}") from err
    bad = [r for r in values if not 0 <= r < 1]
    if bad or not values or not specs:
        raise ValueError(f"--ratios must be in [0, 1) and --methods not empty (got ratios {values}).")
    return specs, values


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def add_runs(sub) -> None:
    runs = sub.add_parser("runs", help="list stored runs, or delete one")
    runs.add_argument("--runs", default="cache/runs.sqlite", help="the runs store (SQLite) to read")
    runs.add_argument("--model", help="only this model's runs")
    runs.add_argument("--method", help="only this method's runs")
    runs.add_argument("--delete", type=int, metavar="ID", help="delete run ID (asks first)")
    runs.add_argument("--yes", action="store_true", help="delete without asking")
    out = runs.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="the table as CSV")
    out.add_argument("--json", action="store_true", help="every run's full record as JSON")
    out.add_argument("--wide", action="store_true", help="also the model and each task's accuracy, in one wide table")
    runs.set_defaults(func=_runs)


def _runs(args) -> int:
    import json

    if not Path(args.runs).exists():
        raise FileNotFoundError(f"No runs stored in {args.runs} yet.")
    from ..runs import RunStore, delta_table, task_table

    store = RunStore(args.runs)
    if args.delete is not None:
        run = store.get(args.delete)
        if not args.yes:
            if not sys.stdin.isatty():
                raise ValueError("Deleting needs a yes: run it in a terminal, or add --yes.")
            if input(f"Delete run {run.id} ({run.model}, {run.method} {run.ratio:g})? [y/N] ").strip().lower() != "y":
                print("kept", file=sys.stderr)
                return 0
        store.delete(args.delete)
        print(f"deleted run {args.delete}", file=sys.stderr)
        return 0
    where = {k: v for k, v in (("model", args.model), ("method", args.method)) if v}
    runs = store.list(**where)
    if args.json:
        print(json.dumps([vars(r) for r in runs], indent=1, default=float))
        return 0
    if args.csv:  # numbers, each standard error in a column of its own
        print(store.table(**where).to_csv(index=False), end="")
        return 0
    import shutil

    table = delta_table(runs, store.list(method="original"))
    if args.wide:  # the model and every task's accuracy too, as wide as it takes
        if len(tasks := task_table(runs)):
            table = table.merge(tasks.drop(columns="run"), on="id", how="left")
        table.insert(1, "model", [r.model for r in runs])
        print(table.to_string(index=False) if len(table) else "no runs")
        return 0
    # the main columns, wrapped in blocks that fit the terminal
    print(table.to_string(index=False, line_width=shutil.get_terminal_size().columns) if len(table) else "no runs")
    return 0
