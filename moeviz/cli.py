"""The `moeviz` command line: thin wrappers over library calls.

Errors a user can cause (a bad path, an unsupported model, a bad ratio) end in one line on
stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, OSError, KeyError, NotImplementedError) as err:
        print(f"moeviz: error: {err}", file=sys.stderr)
        return 2


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
                     help="demo, demo:DOMAIN[,DOMAIN], a .txt/.jsonl file, a dataset name (c4, wikitext2…) or random")
    cal.add_argument("--samples", type=_positive, default=64, help="calibration sequences")
    cal.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence")
    cal.add_argument("--batch-size", type=_positive, default=8)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--probe-tokens", type=int, default=256, help="tokens per layer on which every expert runs")
    cal.add_argument("--no-probes", action="store_true", help="skip the probes (same as --probe-tokens 0)")
    cal.add_argument("--cache-dir", default="cache")
    cal.add_argument("--progress-file", help="also write progress as JSON here (for the app)")
    cal.set_defaults(func=_calibrate)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo', a local checkpoint path or a hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (only for repositories you trust)")


def _info(args) -> int:
    from .adapters import get_adapter
    from .loading import load_model

    model, _ = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    adapter = get_adapter(model)
    print(f"{args.model}: {model.config.model_type}, {len(adapter.layers)} MoE layers, "
          f"top-{adapter.top_k}")
    for layer in adapter.layers:
        print(f"  {layer}")
    return 0


def _calibrate(args) -> int:
    from tqdm import tqdm

    from .calibrate import CalibConfig, calibrate
    from .data import parse_source
    from .jobs import ProgressFile
    from .loading import load_model

    parse_source(args.data)  # a bad source fails before the model loads
    config = CalibConfig(
        data=args.data, num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
        seed=args.seed, probe_tokens=0 if args.no_probes else args.probe_tokens, cache_dir=args.cache_dir,
    )
    report = ProgressFile(args.progress_file)
    report.write("loading", 0, config.num_samples)
    model, tokenizer = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)
        report.write("calibrating", done, total)

    with tqdm(total=config.num_samples, unit="seq", desc="calibrating", file=sys.stderr) as bar:
        stats, path = calibrate(model, config, tokenizer, progress=progress)
    report.write("done", config.num_samples, config.num_samples, path=str(path))
    print(f"{stats.meta['tokens']} tokens, {stats.num_layers} MoE layers × {stats.num_experts} experts",
          file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
