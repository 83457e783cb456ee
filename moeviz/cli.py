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
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
