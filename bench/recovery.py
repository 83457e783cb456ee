"""What a short recovery returns on a demo model: docs/measurements.md's recovery tables.

    python bench/recovery.py [--model demo|demo-fine] [--minutes 5] [--lr 1e-3] [--only mone,reap]
                             [--ratios 0.25] [--out DIR]

For each plan of PLANS: export it from the demo checkpoint, distil it from the original for
--minutes on this machine (`moeviz.recover`, the defaults but the learning rate), then evaluate
the original, the plan before recovery and after it the same way as docs/measurements.md's sweep table
(128 held-out sequences of 128 tokens, 200 examples per demo task), all stored in DIR/runs.sqlite.
Prints one markdown row per plan as it finishes: mean task accuracy and perplexity of each,
the steps and the minutes. Calibration: 256 × 128 tokens of demo text, as the sweep's.

    python bench/recovery.py --model demo-fine --step-cost [--steps 40]

prints instead the seconds per recovery step of MoNE at 25 % with novices and with removal
(the same data and settings; the first 5 steps not counted), and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeviz.calibrate import CalibConfig, calibrate  # noqa: E402
from moeviz.checkpoint import demo_names  # noqa: E402
from moeviz.data import sample_sequences  # noqa: E402
from moeviz.evaluate import EvalConfig  # noqa: E402
from moeviz.export import export_plan  # noqa: E402
from moeviz.loading import load_model, model_fingerprint  # noqa: E402
from moeviz.methods import PlanConfig, make_plan  # noqa: E402
from moeviz.recover import DistillConfig, recover_checkpoint  # noqa: E402
from moeviz.runs import RunStore, recovery_pairs, store_recovery  # noqa: E402

PLANS = [("moe_pruner", None, 0.5), ("moe_pruner", None, 0.75),
         ("mone", "novice", 0.25), ("mone", "novice", 0.5), ("mone", "remove", 0.25), ("mone", "remove", 0.5),
         ("reap", "remove", 0.25), ("reap", "remove", 0.5), ("frequency", "remove", 0.25), ("frequency", "remove", 0.5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=demo_names(), default="demo")
    parser.add_argument("--minutes", type=float, default=5.0, help="recovery budget of each plan")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--only", help="comma-separated methods")
    parser.add_argument("--ratios", help="comma-separated ratios (default: PLANS' own)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="moeviz-recovery-")))
    parser.add_argument("--step-cost", action="store_true", help="time recovery steps: novices against removal")
    parser.add_argument("--steps", type=int, default=40, help="with --step-cost: steps timed per plan")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.step_cost:
        step_cost(args)
        return

    teacher, tokenizer = load_model(args.model, device="cpu")
    fingerprint = model_fingerprint(teacher)
    stats, stats_dir = calibrate(teacher, CalibConfig(data="demo", num_samples=256, seq_len=128,
                                                      cache_dir=args.out / "cache"), tokenizer)
    tokens = sample_sequences("demo", 2048, 128, tokenizer, seed=0, split="train")
    eval_config = EvalConfig(data="demo", num_samples=128, seq_len=128, demo_tasks=True, task_examples=200)
    store = RunStore(args.out / "runs.sqlite")
    print(f"runs and checkpoints in {args.out}", file=sys.stderr)
    print("| method | mode | ratio | task mean: original → pruned → recovered | perplexity: original → pruned "
          "→ recovered | steps | minutes |\n|---|---|---|---|---|---|---|", flush=True)
    only = set(args.only.split(",")) if args.only else None
    ratios = {float(r) for r in args.ratios.split(",")} if args.ratios else None
    for method, mode, ratio in PLANS:
        if (only and method not in only) or (ratios and ratio not in ratios):
            continue
        plan = make_plan(stats, PlanConfig(method, ratio=ratio, mode=mode), calibration=str(stats_dir))
        name = f"{method}-{mode or 'sparsity'}-{ratio:g}"
        export_plan(args.model, plan, stats, args.out / name / "pruned")
        student, report = recover_checkpoint(args.out / name / "pruned", teacher, args.model, tokens,
                                             DistillConfig(steps=None, max_minutes=args.minutes, lr=args.lr),
                                             args.out / name / "recovered", device="cpu")
        ids = store_recovery(store, student, teacher, tokenizer, eval_config, args.model, fingerprint, plan, stats,
                             str(stats_dir), report)
        rows = recovery_pairs(store.list()).query(f"run == {ids['run_id']}").set_index("metric")
        t, p = (rows.loc[key, ["original", "pruned", "recovered"]].tolist() for key in ("task_mean", "perplexity"))
        print(f"| {method} | {mode or 'sparsity'} | {ratio:g} | {t[0]:.2f} → {t[1]:.2f} → **{t[2]:.2f}** | "
              f"{p[0]:.1f} → {p[1]:.1f} → {p[2]:.1f} | {report['steps']} | {report['minutes']:.1f} |", flush=True)
        del student


def step_cost(args) -> None:
    """Seconds per recovery step of the same plan with novices and with removal."""
    import time

    from moeviz.recover import distill

    teacher, tokenizer = load_model(args.model, device="cpu")
    stats, _ = calibrate(teacher, CalibConfig(data="demo", num_samples=64, seq_len=128, cache_dir=args.out / "cache"),
                         tokenizer)
    tokens = sample_sequences("demo", 512, 128, tokenizer, seed=0, split="train")
    cost = {}
    for mode in ("remove", "novice"):
        plan = make_plan(stats, PlanConfig("mone", ratio=0.25, mode=mode))
        export_plan(args.model, plan, stats, args.out / mode)
        student, _ = load_model(str(args.out / mode), device="cpu")
        seen = []
        distill(student, teacher, tokens, DistillConfig(steps=args.steps + 5, lr=args.lr), plan,
                lambda step, steps, row: seen.append(row["seconds"]))
        cost[mode] = (seen[-1] - seen[4]) / (len(seen) - 5)
        print(f"{args.model}, mone 25 % {mode}: {cost[mode]:.3f} s/step over {len(seen) - 5} steps", flush=True)
    print(f"novice / remove: {cost['novice'] / cost['remove']:.2f}")


if __name__ == "__main__":
    main()
