"""`distill`: recover a pruned checkpoint by expert-wise distillation from the original, then
evaluate it beside the original and the pruned model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import check_new_dir, device_map_arg, eval_args, eval_config_of, model_args, positive, stats_of


def add_distill(sub) -> None:
    di = sub.add_parser("distill", help="recover a pruned checkpoint: expert-wise distillation from the original")
    model_args(di)
    device_map_arg(di)
    di.set_defaults(model=None)
    eval_args(di)
    di.add_argument("--teacher", help="the original model (default: the parent `moeviz prune` recorded)")
    di.add_argument("--steps", type=positive, help="optimizer steps (default 200 when no other budget is given)")
    di.add_argument("--max-minutes", type=float, help="stop after this many minutes of training")
    di.add_argument("--max-tokens", type=positive, help="stop after this many training tokens")
    di.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then cosine decay)")
    di.add_argument("--train-batch-size", type=positive, default=8, help="training sequences a step")
    di.add_argument("--train-samples", type=positive, default=2048,
                    help="training sequences drawn from the train split of --data (cycled)")
    di.add_argument("--lambda", dest="expert_mse", type=float, default=1.0,
                    help="weight of the experts' (relative) squared error against the teacher's")
    di.add_argument("--kl", type=float, default=1.0,
                    help="weight of the logits' KL to the teacher (0: off, and no forward pass of the teacher)")
    di.add_argument("--train-all", action="store_true", help="train every parameter, not only what pruning touched")
    di.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (large models)")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--stats", help="the plan's stats directory, to evaluate the plan before recovery "
                                    "(default: the plan's own calibration)")
    di.add_argument("--runs", default="cache/runs.sqlite", help="store the evaluation here, beside the plan's (default: cache/runs.sqlite)")
    di.add_argument("--no-evaluate", action="store_true", help="only train and save")
    di.add_argument("--no-check", action="store_true",
                    help="keep the trained model even when it is worse than the pruned one on held-out text")
    di.add_argument("--out", required=True, help="a new directory for the recovered checkpoint")
    di.set_defaults(func=_distill)


def _distill(args) -> int:
    from tqdm import tqdm

    from ..data import sample_sequences
    from ..loading import load_model, model_fingerprint
    from ..plan import read_lineage
    from ..recover import DistillConfig, plan_of, recover_checkpoint

    if args.model is None:
        raise ValueError("Give --model: the pruned checkpoint `moeviz prune` wrote.")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"No such directory: {args.model} (--model is the pruned checkpoint `moeviz prune` "
                                "wrote).")
    check_new_dir(args.out)
    lineage = read_lineage(args.model) or {}
    teacher_name = args.teacher or lineage.get("teacher") or lineage.get("parent")  # a recovered one's, or the export's
    if teacher_name is None:
        raise ValueError(f"{args.model} records no parent model: give --teacher (the original it was pruned from).")
    budget = dict(steps=args.steps, max_minutes=args.max_minutes, max_tokens=args.max_tokens)
    if not any(budget.values()):
        budget["steps"] = 200
    config = DistillConfig(**budget, lr=args.lr, batch_size=args.train_batch_size, expert_mse=args.expert_mse,
                           logit_kl=args.kl, train_all=args.train_all,
                           gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    eval_config = eval_config_of(argparse.Namespace(**{**vars(args), "reference": teacher_name}))
    teacher, tokenizer = load_model(teacher_name, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                    trust_remote_code=args.trust_remote_code)
    tokens = sample_sequences(eval_config.data, args.train_samples, args.seq_len, tokenizer, args.seed, split="train",
                              vocab_size=teacher.config.vocab_size)
    with tqdm(total=config.steps, unit="step", desc="distilling", file=sys.stderr, mininterval=1.0) as bar:
        def progress(step, steps, row):
            bar.set_postfix(loss=f"{row['loss']:.3f}", mse=f"{row['mse']:.3f}", refresh=False)
            bar.update(step - bar.n)
        check = None if args.no_check else sample_sequences(  # it must beat the pruned model on these
            eval_config.data, 8, args.seq_len, tokenizer, args.seed + 7, split="heldout",
            vocab_size=teacher.config.vocab_size)
        student, report = recover_checkpoint(args.model, teacher, teacher_name, tokens, config, args.out, args.device,
                                             progress, check)
    print(f"{report['steps']} steps, {report['tokens']:,} tokens, {report['minutes']:.1f} min; "
          f"loss {report['first']['loss']:.3f} → {report['last']['loss']:.3f}"
          + (f"; {report['why']}" if report.get("why") else ""), file=sys.stderr)
    if not args.no_evaluate:
        from ..runs import RunStore, store_recovery

        plan = plan_of(student)
        stats_dir = args.stats or plan.calibration
        needs_stats = plan.mode in ("novice", "merge") or plan.sparsity or plan.nm
        stats = stats_of(args, plan) if needs_stats else None
        if needs_stats and stats is None:
            raise ValueError(f"Evaluating the plan before recovery needs its stats ({stats_dir}): give --stats, "
                             "or --no-evaluate.")
        store = RunStore(args.runs)
        ids = store_recovery(store, student, teacher, tokenizer, eval_config, teacher_name,
                             model_fingerprint(teacher), plan, stats, stats_dir, report,
                             lambda step, done, total: print(f"{step}…", file=sys.stderr))
        if ids["run_id"] is None:
            print(f"not stored as a run: the pruned model is kept, evaluated as run {ids['parent_id']}", file=sys.stderr)
        else:
            runs = {i: store.get(ids[i]).metrics for i in ("baseline_id", "parent_id", "run_id")}
            for key in ("perplexity", "task_mean", "kl", "top1_agreement"):
                if key in runs["run_id"]:
                    print(f"{key:>15}: original {runs['baseline_id'].get(key, 0):.4g}, pruned "
                          f"{runs['parent_id'][key]:.4g}, recovered {runs['run_id'][key]:.4g}"
                          + (" (trained on text of this source: not comparable with the other two)"
                             if key == "perplexity" else ""), file=sys.stderr)
            print(f"stored as run {ids['run_id']} (before recovery: run {ids['parent_id']})", file=sys.stderr)
    print(report["checkpoint"])
    return 0
