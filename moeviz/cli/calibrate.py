"""Commands that run the model over calibration text: `calibrate` (the statistics, cached) and
`stability` (how many tokens before a pruning decision settles)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import check_fraction, device_map_arg, model_args, positive, progress_bar


def add_calibrate(sub) -> None:
    cal = sub.add_parser("calibrate", help="collect per-expert statistics (cached); prints the stats directory")
    model_args(cal)
    device_map_arg(cal)
    cal.add_argument("--data", default="demo",
                     help="demo, demo:DOMAIN[,DOMAIN], a .txt/.jsonl file, a dataset name (c4, wikitext2…) or random; "
                          "several sources as NAME=SOURCE,NAME=SOURCE (or demo:each, one per demo domain): the "
                          "model loads once and each source gets its own cache entry (one line each on stdout)")
    cal.add_argument("--samples", type=positive, default=64, help="calibration sequences")
    cal.add_argument("--seq-len", type=positive, default=128, help="tokens per sequence")
    cal.add_argument("--batch-size", type=positive, default=8)
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


def _calibrate(args) -> int:
    from dataclasses import replace

    from ..calibrate import CalibConfig, cache_path, calibrate
    from ..data import parse_sources
    from ..loading import load_model, load_skeleton, load_tokenizer

    sources = parse_sources(args.data)  # a bad source fails before the model loads
    check_fraction(args.sequential_sparsity, "--sequential-sparsity")
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
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, device_map=args.device_map,
                                      trust_remote_code=args.trust_remote_code, offload=args.offload)
    for label, source in sources:  # one cache entry per source, each reusable alone
        config = replace(config, data=source)
        cached = cache_path(model, config).exists()
        desc = "calibrating" if len(sources) == 1 else f"calibrating {label}"
        with progress_bar(desc, "layer" if config.layer_by_layer else "seq", rank != 0 or cached) as progress:
            stats, path = calibrate(model, config, tokenizer, progress=progress)
        if rank == 0:
            print(f"{label + ': ' if len(sources) > 1 else ''}{'cached: ' if cached else ''}{stats.meta['tokens']} "
                  f"tokens, {stats.num_layers} MoE layers × {stats.num_experts} experts", file=sys.stderr)
            print(path)
    if rank == 0 and len(sources) > 1:
        print("mix them with: moeviz plan --stats " + ",".join("DIR" for _ in sources) + " --mix "
              + ",".join("1" for _ in sources) + " …", file=sys.stderr)
    return 0


def add_stability(sub) -> None:
    st = sub.add_parser("stability", help="how many calibration tokens before a pruning decision settles")
    model_args(st)
    device_map_arg(st)
    st.add_argument("--data", default="demo", help="the calibration text source")
    st.add_argument("--samples", type=positive, default=256, help="calibration sequences in all")
    st.add_argument("--seq-len", type=positive, default=128)
    st.add_argument("--batch-size", type=positive, default=8)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--chunks", type=positive, default=16, help="disjoint chunks the sequences are split into")
    st.add_argument("--methods", default="mone,reap,frequency", help="score-based methods, comma-separated")
    st.add_argument("--ratio", type=float, default=0.25)
    st.add_argument("--bootstrap", type=int, default=5, help="resamples of the chunks per size")
    st.add_argument("--out", help="write {method: rows} as JSON here")
    _offload_arg(st)
    st.set_defaults(func=_stability)


def _stability(args) -> int:
    import json

    import pandas as pd
    from tqdm import tqdm

    from ..analysis import stability
    from ..calibrate import CalibConfig, calibrate_chunks
    from ..data import parse_source
    from ..loading import load_model
    from ..methods import PlanConfig, get_method

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
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, device_map=args.device_map,
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


def _offload_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", action="store_true",
                   help="keep the weights in CPU memory, each module on --device only while it runs "
                        "(for a model larger than the GPU; needs accelerate)")


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
