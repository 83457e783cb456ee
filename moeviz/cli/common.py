"""What several commands share: their common arguments (the model, the evaluation), how they find a
plan's statistics, a progress bar, and the checks made before any work."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path


# ---- arguments --------------------------------------------------------------------------
def model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --trust-remote-code: the commands that load a model."""
    p.add_argument("--model", default="demo", help="'demo', a local checkpoint path or a hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="the weights' dtype in memory; auto keeps the checkpoint's own")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (only for repositories you trust)")


def device_map_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", choices=("auto",), help="auto: spread a model too large for one GPU over all of "
                                                           "them (accelerate's device map)")


def eval_args(p: argparse.ArgumentParser) -> None:
    """The held-out text and tasks of an evaluation (evaluate, distill, sweep); see `eval_config_of`."""
    p.add_argument("--data", help="held-out text for perplexity and fidelity (default: demo; for a plan made "
                                  "from a mix, each of its sources, reported one by one); several as NAME=SOURCE,…")
    p.add_argument("--samples", type=positive, default=128, help="held-out sequences")
    p.add_argument("--seq-len", type=positive, default=128)
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--tasks", default="auto",
                   help="'demo' (the demo tasks), 'none', lm-eval task names (comma-separated), "
                        "or 'auto': demo tasks for the demo model")
    p.add_argument("--task-examples", type=positive, default=200, help="per demo domain")
    p.add_argument("--throughput", action="store_true", help="also time forward passes (a standalone model only)")


def mix_arg(p: argparse.ArgumentParser) -> None:
    """--mix, beside --stats: the shares of a mix of calibrations."""
    p.add_argument("--mix", help="with several --stats (comma-separated): each source's share of the tokens, "
                   "e.g. 3,1 (normalised; default even)")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


positive.__name__ = "_positive"  # argparse prints it ("invalid _positive value: 'x'"): as it read before the split


# ---- what the arguments name -----------------------------------------------------------------
def eval_config_of(args):
    """The `EvalConfig` of `eval_args`: demo tasks when asked, or for a demo model (or an export of one)."""
    from ..evaluate import EvalConfig

    names = [] if args.tasks in ("none", "auto") else [t for t in args.tasks.split(",") if t]
    from ..checkpoint import is_demo as shipped

    is_demo = shipped(args.model) or shipped(getattr(args, "reference", None) or "")  # or an export of one
    demo = args.tasks == "demo" or "demo" in names or (args.tasks == "auto" and is_demo)
    return EvalConfig(data=args.data or "demo", num_samples=args.samples, seq_len=args.seq_len,
                      batch_size=args.batch_size, demo_tasks=demo, task_examples=args.task_examples,
                      lm_eval_tasks=tuple(n for n in names if n != "demo"), throughput=args.throughput)


def plan_and_stats(args):
    """The plan of `--plan` and its stats (`--stats`/`--mix`, or what the plan records), each
    None when there is none."""
    from ..plan import PruningPlan

    plan = PruningPlan.load(args.plan) if args.plan else None
    return plan, stats_of(args, plan) if plan is not None else None


def calibration_label(args, stats) -> str | None:
    """How plans and runs name the statistics: the directory, or a mix's directories and shares."""
    from ..stats import mix_label

    mix = (stats.meta.get("mix") if stats is not None else None) or None
    return mix_label([[m["path"], m["share"]] for m in mix]) if mix else args.stats


def stats_of(args, plan=None):
    """`--stats` (mixed at `--mix`), or the calibration the plan records, or None."""
    from ..stats import load_stats, plan_stats

    if args.stats:
        return load_stats(args.stats, getattr(args, "mix", None))
    if getattr(args, "mix", None):
        raise ValueError("--mix needs --stats with the sources it mixes.")
    return plan_stats(plan) if plan is not None else None


# ---- progress and checks -------------------------------------------------------------------
@contextmanager
def progress_bar(desc: str, unit: str, disable: bool = False):
    """A tqdm bar on stderr, handed out as a `progress(done, total)` callback."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit=unit, file=sys.stderr, disable=disable) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def check_new_dir(path) -> None:
    """Refuse, before any work, an output directory that exists and is not empty (or is a file)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give a new directory (or an empty one) for the output.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is a directory that is not empty: give a new directory (or an empty one).")


def check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} is a fraction of the weights in [0, 1), got {value}.")
