"""Commands over one model: `info` (its MoE layers), `trace` (one text through its experts) and
`serve` (the backend that holds it for the app)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import device_map_arg, model_args, plan_and_stats


def add_info(sub) -> None:
    info = sub.add_parser("info", help="show a model's MoE layers (router, experts, shared experts)")
    model_args(info)
    info.set_defaults(func=_info)


def _info(args) -> int:
    from ..adapters import get_adapter
    from ..loading import load_skeleton

    model = load_skeleton(args.model, trust_remote_code=args.trust_remote_code)  # no weight is read
    adapter = get_adapter(model)
    print(f"{args.model}: {model.config.model_type}, {len(adapter.layers)} MoE layers, "
          f"top-{adapter.top_k}")
    for layer in adapter.layers:
        print(f"  {layer}")
    return 0


def add_trace(sub) -> None:
    tr = sub.add_parser("trace", help="route one text through the experts (before and after a plan)")
    model_args(tr)
    device_map_arg(tr)
    text = tr.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to trace")
    text.add_argument("--text-file", help="read the text from this file")
    tr.add_argument("--plan", help="also trace the text under this plan (applied in place)")
    tr.add_argument("--stats", help="the plan's stats directory (novices, merges, weight sparsity)")
    tr.add_argument("--json", action="store_true", help="print the whole trace as one JSON object")
    tr.add_argument("--html", help="write a self-contained page of the trace here")
    tr.set_defaults(func=_trace)


def _trace(args) -> int:
    import json

    from ..loading import load_model
    from ..trace import TraceError, loss_changes, page_html, trace

    text = Path(args.text_file).read_text() if args.text_file else args.text
    plan, stats = plan_and_stats(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
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


def add_serve(sub) -> None:
    srv = sub.add_parser("serve", help="a backend that holds the model once and runs the app's jobs")
    model_args(srv)
    srv.add_argument("--port", type=int, default=0, help="on 127.0.0.1; 0 picks a free one")
    srv.add_argument("--cache-dir", default="cache", help="also where its token is left, for Backend.connect")
    srv.add_argument("--ready-file", help=argparse.SUPPRESS)  # the app learns the port here
    srv.add_argument("--until-stdin-closes", action="store_true", help=argparse.SUPPRESS)  # the app holds its other end
    srv.set_defaults(func=_serve)


def _serve(args) -> int:
    from ..backend import serve

    serve(args.model, args.port, args.device, None if args.dtype == "auto" else args.dtype, args.cache_dir,
          args.ready_file, args.until_stdin_closes)
    return 0
