"""The `moeviz` command line: thin wrappers over library calls.

Errors a user can cause (a bad path, an unsupported model, a bad ratio) end in one line on
stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_transformers()
    return_freed_memory()
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, OSError, KeyError, NotImplementedError, ImportError, MemoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # a KeyError's str() is quoted
        print(f"moeviz: error: {message}", file=sys.stderr)
        return 2


def quiet_transformers() -> None:
    """No progress bars of transformers' own (ours only), without importing it: it loads only
    when a command needs it, and reads the environment then."""
    import os

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def return_freed_memory() -> None:
    """On glibc (Linux), hand large freed blocks back to the system at once and keep one heap
    per thread pair: a forward pass's transient tensors then leave no lasting footprint, and
    the process's memory stays close to the weights it holds."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks of 1 MiB and more come from (and go back to) mmap
    libc.mallopt(-8, 2)  # M_ARENA_MAX


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeviz", description="Analyse and prune Mixture-of-Experts language models."
    )
    sub = parser.add_subparsers(title="commands")
    info = sub.add_parser("info", help="show a model's MoE layers (router, experts, shared experts)")
    _model_args(info)
    info.set_defaults(func=_info)

    cal = sub.add_parser("calibrate", help="collect per-expert statistics (cached); prints the stats directory")
    _model_args(cal)
    cal.add_argument("--data", default="demo",
                     help="demo, demo:DOMAIN[,DOMAIN], a .txt/.jsonl file, a dataset name (c4, wikitext2…) or random; "
                          "several sources as NAME=SOURCE,NAME=SOURCE (or demo:each, one per demo domain): the "
                          "model loads once and each source gets its own cache entry (one line each on stdout)")
    cal.add_argument("--samples", type=_positive, default=64, help="calibration sequences")
    cal.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence")
    cal.add_argument("--batch-size", type=_positive, default=8)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--probe-tokens", type=int, default=256, help="tokens per layer on which every expert runs")
    cal.add_argument("--no-probes", action="store_true", help="skip the probes (same as --probe-tokens 0)")
    cal.add_argument("--cache-dir", default="cache")
    cal.add_argument("--sequential-sparsity", type=float, default=0.0,
                     help="MoE-Pruner's sequential mode: prune each layer to this row sparsity before the next "
                          "is calibrated (implies --layer-by-layer; other statistics, another cache entry)")
    cal.add_argument("--layer-by-layer", action="store_true",
                     help="read one decoder layer at a time from the checkpoint's files (a model larger than "
                          "memory); the same statistics, the same cache entry")
    _offload_arg(cal)
    cal.set_defaults(func=_calibrate)

    plan = sub.add_parser("plan", help="make a pruning plan (JSON) from cached stats")
    plan.add_argument("--stats", required=True, help="a stats directory (what calibrate printed), or several, "
                      "comma-separated, mixed at --mix")
    plan.add_argument("--mix", help="with several --stats (comma-separated): each source's share of the tokens, "
                     "e.g. 3,1 (normalised; default even)")
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

    prune = sub.add_parser("prune", help="export the pruned checkpoint, streamed shard by shard from the original's")
    prune.add_argument("--model", default="demo", help="'demo', a local checkpoint path or a hub id (its files are read, "
                       "the model is never loaded)")
    prune.add_argument("--plan", help="the plan to export (or --sequential)")
    prune.add_argument("--stats", help="the stats directory (needed for novices, merges, weight sparsity; by "
                       "default the plan's own calibration or mix)")
    prune.add_argument("--mix", help="with several --stats (comma-separated): each source's share of the tokens, "
                     "e.g. 3,1 (normalised; default even)")
    prune.add_argument("--sequential", action="store_true",
                       help="MoE-Pruner, layer by layer: each layer scored on the outputs of the pruned layers "
                            "before it (needs --data, --ratio or --nm; no --plan)")
    prune.add_argument("--method", default="moe_pruner", help=argparse.SUPPRESS)
    prune.add_argument("--ratio", type=float, default=0.5, help="with --sequential: the row sparsity")
    prune.add_argument("--nm", help="with --sequential: n:m sparsity instead, e.g. 2:4")
    prune.add_argument("--data", default="demo", help="with --sequential: the calibration text")
    prune.add_argument("--samples", type=_positive, default=64, help="with --sequential: calibration sequences")
    prune.add_argument("--seq-len", type=_positive, default=128)
    prune.add_argument("--cache-dir", default="cache")
    prune.add_argument("--mtp", choices=("prune", "drop"),
                       help="multi-token-prediction layers in the files (DeepSeek-V3, GLM, MiMo), when the plan changes "
                            "the expert count: cut their experts to the same count by router-row norm, or drop them")
    prune.add_argument("--runs", help="a runs store (SQLite) that may hold this plan's evaluation, for the model card "
                       "(default: cache/runs.sqlite when it exists)")
    prune.add_argument("--out", required=True, help="a new directory for the pruned checkpoint")
    prune.set_defaults(func=_prune)

    ev = sub.add_parser("evaluate", help="perplexity, demo tasks, fidelity to a reference, size and speed")
    _model_args(ev)
    _eval_args(ev)
    ev.add_argument("--reference", help="the original model, for KL, top-1 agreement and savings")
    ev.add_argument("--plan", help="evaluate this plan applied to --model, against --model itself")
    ev.add_argument("--stats", help="the plan's stats directory (novices, merges, weight sparsity; by default the "
                    "plan's own calibration or mix)")
    ev.add_argument("--mix", help="with several --stats (comma-separated): each source's share of the tokens, "
                     "e.g. 3,1 (normalised; default even)")
    ev.add_argument("--runs", help="also store the report as a run in this SQLite file")
    ev.add_argument("--out", help="write the report as JSON here")
    ev.add_argument("--json", action="store_true", help="print the full report as JSON (default: a summary)")
    ev.set_defaults(func=_evaluate)

    di = sub.add_parser("distill", help="recover a pruned checkpoint: expert-wise distillation from the original")
    _model_args(di)
    di.set_defaults(model=None)
    _eval_args(di)
    di.add_argument("--teacher", help="the original model (default: the parent `moeviz prune` recorded)")
    di.add_argument("--steps", type=_positive, help="optimizer steps (default 200 when no other budget is given)")
    di.add_argument("--max-minutes", type=float, help="stop after this many minutes of training")
    di.add_argument("--max-tokens", type=_positive, help="stop after this many training tokens")
    di.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then cosine decay)")
    di.add_argument("--train-batch-size", type=_positive, default=8, help="training sequences a step")
    di.add_argument("--train-samples", type=_positive, default=2048,
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
    di.add_argument("--runs", default="cache/runs.sqlite", help="store the evaluation here, beside the plan's")
    di.add_argument("--no-evaluate", action="store_true", help="only train and save")
    di.add_argument("--no-check", action="store_true",
                    help="keep the trained model even when it is worse than the pruned one on held-out text")
    di.add_argument("--out", required=True, help="a new directory for the recovered checkpoint")
    di.set_defaults(func=_distill)

    sw = sub.add_parser("sweep", help="plan, apply, evaluate and store every method × ratio")
    _model_args(sw)
    _eval_args(sw)
    sw.add_argument("--stats", required=True, help="the stats directory of this model, or several, comma-separated, "
                    "mixed at --mix")
    sw.add_argument("--mix", help="with several --stats (comma-separated): each source's share of the tokens, "
                     "e.g. 3,1 (normalised; default even)")
    sw.add_argument("--methods", default="mone,mone:remove,cprune,reap,frequency,random",
                    help="comma-separated; method:mode overrides a mode, e.g. mone:remove")
    sw.add_argument("--ratios", default="0.25,0.5")
    sw.add_argument("--scope", choices=("layer", "global"), default="layer")
    sw.add_argument("--runs", default="cache/runs.sqlite", help="where runs are stored")
    sw.add_argument("--random-seeds", type=_positive, default=5, help="seeds averaged for the random baseline")
    sw.add_argument("--out", help="write the table as CSV here")
    sw.set_defaults(func=_sweep)

    st = sub.add_parser("stability", help="how many calibration tokens before a pruning decision settles")
    _model_args(st)
    st.add_argument("--data", default="demo", help="the calibration text source")
    st.add_argument("--samples", type=_positive, default=256, help="calibration sequences in all")
    st.add_argument("--seq-len", type=_positive, default=128)
    st.add_argument("--batch-size", type=_positive, default=8)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--chunks", type=_positive, default=16, help="disjoint chunks the sequences are split into")
    st.add_argument("--methods", default="mone,reap,frequency", help="score-based methods, comma-separated")
    st.add_argument("--ratio", type=float, default=0.25)
    st.add_argument("--bootstrap", type=int, default=5, help="resamples of the chunks per size")
    st.add_argument("--out", help="write {method: rows} as JSON here")
    _offload_arg(st)
    st.set_defaults(func=_stability)

    tr = sub.add_parser("trace", help="route one text through the experts (before and after a plan)")
    _model_args(tr)
    text = tr.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to trace")
    text.add_argument("--text-file", help="read the text from this file")
    tr.add_argument("--plan", help="also trace the text under this plan (applied in place)")
    tr.add_argument("--stats", help="the plan's stats directory (novices, merges, weight sparsity)")
    tr.add_argument("--json", action="store_true", help="print the whole trace as one JSON object")
    tr.add_argument("--html", help="write a self-contained page of the trace here")
    tr.set_defaults(func=_trace)

    srv = sub.add_parser("serve", help="a backend that holds the model once and runs the app's jobs")
    _model_args(srv)
    srv.add_argument("--port", type=int, default=0, help="on 127.0.0.1; 0 picks a free one")
    srv.add_argument("--cache-dir", default="cache", help="also where its token is left, for Backend.connect")
    srv.add_argument("--ready-file", help=argparse.SUPPRESS)  # the app learns the port here
    srv.add_argument("--until-stdin-closes", action="store_true", help=argparse.SUPPRESS)  # the app holds its other end
    srv.set_defaults(func=_serve)

    runs = sub.add_parser("runs", help="list stored runs, or delete one")
    runs.add_argument("--runs", default="cache/runs.sqlite")
    runs.add_argument("--model", help="only this model's runs")
    runs.add_argument("--method", help="only this method's runs")
    runs.add_argument("--delete", type=int, metavar="ID", help="delete run ID (asks first)")
    runs.add_argument("--yes", action="store_true", help="delete without asking")
    out = runs.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="the table as CSV")
    out.add_argument("--json", action="store_true", help="every run's full record as JSON")
    out.add_argument("--wide", action="store_true", help="also the model and each task's accuracy, in one wide table")
    runs.set_defaults(func=_runs)
    return parser


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="held-out text for perplexity and fidelity (default: demo; for a plan made "
                                  "from a mix, each of its sources, reported one by one); several as NAME=SOURCE,…")
    p.add_argument("--samples", type=_positive, default=128, help="held-out sequences")
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--tasks", default="auto",
                   help="'demo' (the demo tasks), 'none', lm-eval task names (comma-separated), "
                        "or 'auto': demo tasks for the demo model")
    p.add_argument("--task-examples", type=_positive, default=200, help="per demo domain")
    p.add_argument("--throughput", action="store_true", help="also time forward passes (a standalone model only)")


def _eval_config(args):
    from .evaluate import EvalConfig

    names = [] if args.tasks in ("none", "auto") else [t for t in args.tasks.split(",") if t]
    from .checkpoint import is_demo as shipped

    is_demo = shipped(args.model) or shipped(getattr(args, "reference", None) or "")  # or an export of one
    demo = args.tasks == "demo" or "demo" in names or (args.tasks == "auto" and is_demo)
    return EvalConfig(data=args.data or "demo", num_samples=args.samples, seq_len=args.seq_len,
                      batch_size=args.batch_size, demo_tasks=demo, task_examples=args.task_examples,
                      lm_eval_tasks=tuple(n for n in names if n != "demo"), throughput=args.throughput)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo', a local checkpoint path or a hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="the weights' dtype in memory; auto keeps the checkpoint's own")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (only for repositories you trust)")


def _offload_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", action="store_true",
                   help="keep the weights in CPU memory, each module on --device only while it runs "
                        "(for a model larger than the GPU; needs accelerate)")


def _info(args) -> int:
    from .adapters import get_adapter
    from .loading import load_skeleton

    model = load_skeleton(args.model, trust_remote_code=args.trust_remote_code)  # no weight is read
    adapter = get_adapter(model)
    print(f"{args.model}: {model.config.model_type}, {len(adapter.layers)} MoE layers, "
          f"top-{adapter.top_k}")
    for layer in adapter.layers:
        print(f"  {layer}")
    return 0


def _trace(args) -> int:
    import json

    from .loading import load_model
    from .trace import TraceError, loss_changes, page_html, trace

    text = Path(args.text_file).read_text() if args.text_file else args.text
    plan, stats = _plan_and_stats(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise TraceError(f"{args.model} has no tokenizer: moeviz cannot turn a text into its tokens.")
    result = trace(model, tokenizer, text, plan, stats)
    if args.html:
        Path(args.html).write_text(page_html(result, f"{args.model}: {text[:60]}"))
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    for i, layer_idx in enumerate(result["layers"]):
        first = [experts[0] for experts in result["experts"][i]]
        moved = f", {result['rerouted'][i]:.0%} rerouted by the plan" if plan else ""
        print(f"layer {layer_idx}: first expert of each token {first[:24]}{' …' if len(first) > 24 else ''}{moved}")
    print(f"mean next-token loss {sum(result['nll']) / max(len(result['nll']), 1):.3f} nats"
          + (f", under the plan {sum(result['pruned']['nll']) / max(len(result['nll']), 1):.3f}" if plan else ""))
    for row in loss_changes(result, 5):
        print(f"  position {row['position']} {row['token']!r}: p {row['p_before']:.3f} → {row['p_after']:.3f}")
    return 0


def _plan_and_stats(args):
    """The plan of `--plan` and its stats (`--stats`/`--mix`, or what the plan records), each
    None when there is none."""
    from .plan import PruningPlan

    plan = PruningPlan.load(args.plan) if args.plan else None
    return plan, _stats_of(args, plan) if plan is not None else None


def _calibration(args, stats) -> str | None:
    """How plans and runs name the statistics: the directory, or a mix's directories and shares."""
    from .stats import mix_label

    mix = (stats.meta.get("mix") if stats is not None else None) or None
    return mix_label([[m["path"], m["share"]] for m in mix]) if mix else args.stats


def _stats_of(args, plan=None):
    """`--stats` (mixed at `--mix`), or the calibration the plan records, or None."""
    from .stats import load_stats, plan_stats

    if args.stats:
        return load_stats(args.stats, getattr(args, "mix", None))
    if getattr(args, "mix", None):
        raise ValueError("--mix needs --stats with the sources it mixes.")
    return plan_stats(plan) if plan is not None else None


def _serve(args) -> int:
    from .backend import serve

    serve(args.model, args.port, args.device, None if args.dtype == "auto" else args.dtype, args.cache_dir,
          args.ready_file, args.until_stdin_closes)
    return 0


def _calibrate(args) -> int:
    from dataclasses import replace

    from .calibrate import CalibConfig, cache_path, calibrate
    from .data import parse_sources
    from .loading import load_model, load_skeleton, load_tokenizer

    sources = parse_sources(args.data)  # a bad source fails before the model loads
    _check_fraction(args.sequential_sparsity, "--sequential-sparsity")
    rank, device = _start_data_parallel(args.device)  # under torchrun: one shard per process
    config = CalibConfig(
        data=sources[0][1], num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
        seed=args.seed, probe_tokens=0 if args.no_probes else args.probe_tokens, cache_dir=args.cache_dir,
        layer_by_layer=args.layer_by_layer or bool(args.sequential_sparsity), device=device,
        sequential_sparsity=args.sequential_sparsity,
    )
    if config.layer_by_layer:  # a skeleton; each decoder layer is read when its turn comes
        model = load_skeleton(args.model, args.trust_remote_code, with_files=True)
        tokenizer = load_tokenizer(model._moeviz_source, args.trust_remote_code)
    else:  # loaded once for every source
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code, offload=args.offload)
    for label, source in sources:  # one cache entry per source, each reusable alone
        config = replace(config, data=source)
        cached = cache_path(model, config).exists()
        desc = "calibrating" if len(sources) == 1 else f"calibrating {label}"
        with _progress_bar(desc, "layer" if config.layer_by_layer else "seq", rank != 0 or cached) as progress:
            stats, path = calibrate(model, config, tokenizer, progress=progress)
        if rank == 0:
            print(f"{label + ': ' if len(sources) > 1 else ''}{'cached: ' if cached else ''}{stats.meta['tokens']} "
                  f"tokens, {stats.num_layers} MoE layers × {stats.num_experts} experts", file=sys.stderr)
            print(path)
    if rank == 0 and len(sources) > 1:
        print("mix them with: moeviz plan --stats " + ",".join("DIR" for _ in sources) + " --mix "
              + ",".join("1" for _ in sources) + " …", file=sys.stderr)
    return 0


@contextmanager
def _progress_bar(desc: str, unit: str, disable: bool = False):
    """A tqdm bar on stderr, handed out as a `progress(done, total)` callback."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit=unit, file=sys.stderr, disable=disable) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def _start_data_parallel(device: str) -> tuple[int, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs) and
    take this process's GPU. Returns (rank, device)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), "cpu" if device == "auto" else device


def _plan(args) -> int:
    from .methods import PlanConfig, make_plan
    from .plan import export_kind

    stats = _stats_of(args)
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    config = PlanConfig(args.method, args.ratio, args.scope, args.mode, args.seed, nm, args.features, args.linkage,
                        args.representative, args.counts)
    weights = None
    if args.features == "weights" and args.method == "cprune":
        weights = _weight_features(args.model, stats)
    plan = make_plan(stats, config, weights=weights, calibration=_calibration(args, stats))
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

    from .analysis import weight_features
    from .loading import file_layers

    if not model_name:
        raise ValueError("cprune --features weights needs --model.")
    return torch.stack([weight_features(layer) for layer in file_layers(model_name)])  # (L, E, D)


def _prune(args) -> int:
    from .export import export_plan
    from .plan import PruningPlan, export_kind

    _check_new_dir(args.out)  # before any work, and before a progress bar
    from .loading import load_skeleton

    load_skeleton(args.model)  # an architecture moeviz cannot prune: refused before anything is said or written
    if args.sequential:
        _check_fraction(args.ratio, "--ratio")
        plan, stats = _sequential_plan(args)
    elif args.plan:
        plan = PruningPlan.load(args.plan)
        stats = _stats_of(args, plan)
    else:
        raise ValueError("Give --plan, or --sequential for MoE-Pruner layer by layer.")
    runs = args.runs or ("cache/runs.sqlite" if Path("cache/runs.sqlite").is_file() else None)
    if runs is not None and not Path(runs).is_file():
        raise FileNotFoundError(f"No runs store at {runs}.")
    print(f"exporting as {export_kind(plan, _quantization(args.model))}", file=sys.stderr)  # before anything is written
    with _progress_bar("exporting", "tensor") as progress:  # source tensors, shard by shard
        export_plan(args.model, plan, stats, args.out, progress, runs=runs, mtp=args.mtp)
    what = f"weight sparsity {plan.sparsity or plan.nm}" if plan.sparsity or plan.nm else f"{plan.num_pruned} experts pruned ({plan.mode})"
    print(f"{what}; model card in {Path(args.out) / 'README.md'}", file=sys.stderr)
    print(args.out)
    return 0


def _check_new_dir(path) -> None:
    """Refuse, before any work, an output directory that exists and is not empty (or is a file)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give a new directory (or an empty one) for the output.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is a directory that is not empty: give a new directory (or an empty one).")


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} is a fraction of the weights in [0, 1), got {value}.")


def _quantization(model: str) -> dict | None:
    from .loading import load_config

    return getattr(load_config(model), "quantization_config", None)


def _sequential_plan(args):
    """MoE-Pruner's sequential mode: stats calibrated layer by layer, each layer pruned before the
    next sees it; the plan made from them gives exactly those masks."""
    from .calibrate import CalibConfig, calibrate
    from .loading import load_skeleton, load_tokenizer
    from .methods import PlanConfig, make_plan

    if args.method != "moe_pruner":
        raise ValueError("--sequential is MoE-Pruner's mode: use --method moe_pruner.")
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    config = CalibConfig(data=args.data, num_samples=args.samples, seq_len=args.seq_len, cache_dir=args.cache_dir,
                         layer_by_layer=True, sequential_sparsity=0.0 if nm else args.ratio, sequential_nm=nm)
    model = load_skeleton(args.model, with_files=True)
    tokenizer = load_tokenizer(model._moeviz_source)
    with _progress_bar("calibrating, layer by layer", "layer") as progress:
        stats, path = calibrate(model, config, tokenizer, progress=progress)
    print(f"sequential statistics: {path}", file=sys.stderr)
    return make_plan(stats, PlanConfig("moe_pruner", ratio=args.ratio, nm=nm), calibration=str(path)), stats


def _evaluate(args) -> int:
    import json

    from .evaluate import evaluate
    from .loading import load_model, model_fingerprint

    config = _eval_config(args)
    if args.plan and args.reference:
        raise ValueError("Give --plan (evaluated in place against --model) or --reference, not both.")
    plan, stats = _plan_and_stats(args)
    if args.data is None and plan is not None and plan.mix:  # each source the plan was calibrated on
        from dataclasses import replace

        from .data import mix_sources

        config = replace(config, data=mix_sources(plan.mix))
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)

    def progress(step, done, total):
        print(f"{step}…", file=sys.stderr)

    original = None  # a plan's figures are printed beside the original's, evaluated the same way
    if args.runs and args.reference:  # an exported checkpoint against its original: a run of its plan
        from .recover import plan_of
        from .runs import RunStore, store_export_evaluation

        store = RunStore(args.runs)
        reference, _ = load_model(args.reference, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
        ids = store_export_evaluation(store, model, reference, tokenizer, config, args.model, args.reference,
                                      plan_of(model), progress)
        report, original = store.get(ids["run_id"]).metrics, store.get(ids["baseline_id"]).metrics
        print(f"stored as run {ids['run_id']}", file=sys.stderr)
    elif args.runs:  # the plan in place, against the original; the original stored once as the baseline
        from .runs import RunStore, store_evaluation

        store = RunStore(args.runs)
        ids = store_evaluation(store, model, tokenizer, config, args.model, model_fingerprint(model),
                               plan, stats, _calibration(args, stats) or (plan.calibration if plan else None),
                               progress)
        report = store.get(ids["run_id"]).metrics
        if plan is not None and ids.get("baseline_id") is not None:
            original = store.get(ids["baseline_id"]).metrics
        print(f"stored as run {ids['run_id']}" + (" (already stored)" if ids["cached"] else ""), file=sys.stderr)
    else:
        reference = None
        if args.reference:
            reference, _ = load_model(args.reference, device=args.device, dtype=args.dtype,
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


def _distill(args) -> int:
    from tqdm import tqdm

    from .data import sample_sequences
    from .loading import load_model, model_fingerprint
    from .recover import DistillConfig, plan_of, read_lineage, recover_checkpoint

    if args.model is None:
        raise ValueError("Give --model: the pruned checkpoint `moeviz prune` wrote.")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"No such directory: {args.model} (--model is the pruned checkpoint `moeviz prune` "
                                "wrote).")
    _check_new_dir(args.out)
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
    eval_config = _eval_config(argparse.Namespace(**{**vars(args), "reference": teacher_name}))
    teacher, tokenizer = load_model(teacher_name, device=args.device, dtype=args.dtype,
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
        from .runs import RunStore, store_recovery

        plan = plan_of(student)
        stats_dir = args.stats or plan.calibration
        needs_stats = plan.mode in ("novice", "merge") or plan.sparsity or plan.nm
        stats = _stats_of(args, plan) if needs_stats else None
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


def _sweep(args) -> int:
    from tqdm import tqdm

    from .loading import load_model
    from .runs import RunStore
    from .sweep import paper_table, sweep

    stats = _stats_of(args)
    methods, ratios = _sweep_grid(args.methods, args.ratios)  # every argument checked before any work
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    with tqdm(total=1 + len(methods) * len(ratios), unit="run", file=sys.stderr) as bar:
        def progress(done, total, label):
            bar.total = total  # random runs several seeds a cell
            bar.set_postfix_str(label)
            bar.update(done - bar.n)
        frame = sweep(model, tokenizer, stats, methods, ratios, _eval_config(args), args.scope,
                      RunStore(args.runs), _calibration(args, stats), progress, args.random_seeds)
    table = paper_table(frame)
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else table.to_string(index=False))
    return 0


def _sweep_grid(methods: str, ratios: str) -> tuple[list[str], list[float]]:
    from .methods import get_method
    from .plan import MODES
    from .sweep import parse_method

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


def _stability(args) -> int:
    import json

    import pandas as pd
    from tqdm import tqdm

    from .analysis import stability
    from .calibrate import CalibConfig, calibrate_chunks
    from .data import parse_source
    from .loading import load_model
    from .methods import PlanConfig, get_method

    methods = [m for m in args.methods.split(",") if m]
    for name in methods:
        if get_method(name).makes_plan:
            raise ValueError(f"{name} does not rank experts by one score; stability takes score-based methods.")
    if not 1 < args.chunks <= args.samples:
        raise ValueError(f"--chunks must be between 2 and --samples ({args.samples}), got {args.chunks}.")
    parse_source(args.data)
    config = CalibConfig(data=args.data, num_samples=args.samples, seq_len=args.seq_len,
                         batch_size=args.batch_size, seed=args.seed, probe_tokens=0)
    rank, device = _start_data_parallel(args.device)  # under torchrun: one shard per process
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code, offload=args.offload)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    with tqdm(total=args.chunks, unit="chunk", desc="calibrating", file=sys.stderr, disable=rank != 0) as bar:
        chunks = calibrate_chunks(model, config, args.chunks, tokenizer, progress)
    sizes = sorted({max(1, args.chunks * i // 8) for i in range(1, 9)})
    result = {name: stability(chunks, PlanConfig(name, ratio=args.ratio), sizes, args.bootstrap)
              for name in methods}
    if rank != 0:
        return 0
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    for name, rows in result.items():
        print(f"\n{name} at ratio {args.ratio}: agreement with all {args.samples} sequences")
        print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))
    return 0


def _runs(args) -> int:
    import json

    if not Path(args.runs).exists():
        raise FileNotFoundError(f"No runs stored in {args.runs} yet.")
    from .runs import RunStore, delta_table, task_table

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


if __name__ == "__main__":
    sys.exit(main())
