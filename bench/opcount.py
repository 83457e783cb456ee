"""Operators per MoE layer: a plain forward pass against calibration's, counted by torch.profiler.

    python bench/opcount.py [--experts 4 16 64] [--family olmoe]

On a GPU, a per-expert Python loop shows as kernels that grow with the number of experts, and a
host synchronisation (`.item()`, `.tolist()`, `nonzero`, a data-dependent output size, a blocking
copy) as a stall per layer. Neither needs a GPU to be seen: the profiler on the CPU lists every
aten operator called, and the ones whose result the host must wait for are known by name. This
counts, per MoE layer and per forward, the operators of the model's own forward and of the same
forward with the observer attached (its probes included), for several expert counts.
"""

from __future__ import annotations

import argparse
from collections import Counter
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

# Operators the host waits on when the tensors are on a GPU: a value read back, or an output
# whose size depends on the data (`nonzero`, `bincount`, boolean indexing, `unique` …).
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
            "aten::bincount", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive",
            "aten::masked_select", "aten::equal", "aten::allclose"}


@contextmanager
def counting_tolist(counter: Counter):
    """`Tensor.tolist()` reads a CPU tensor without any aten operator: count its calls by hand."""
    original = torch.Tensor.tolist

    def tolist(self):
        counter["Tensor.tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


def op_counts(fn) -> tuple[Counter, Counter]:
    """(the aten operators `fn()` calls from Python, the host syncs among all it runs).

    An operator inside another is the outer one's business (`aten::linear` runs `aten::mm`):
    only the outermost count as calls. Syncs are counted at any depth, except inside
    `aten::_grouped_mm`, whose CPU kernel loops over the groups and reads each offset back; on
    a GPU (bf16, sm90 and later) it is one kernel that reads nothing back.
    """
    calls, syncs = Counter(), Counter()
    with counting_tolist(syncs), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        outer = _aten_ancestors(event)
        if not outer:
            calls[event.name] += 1
        if event.name in SYNC_OPS and "aten::_grouped_mm" not in outer \
                and not (event.name == "aten::_local_scalar_dense" and "aten::item" in outer):  # one sync, two names
            syncs[event.name] += 1
    return calls, syncs


def _aten_ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            names.append(parent.name)
        parent = parent.cpu_parent
    return names


def per_layer(model, tokens: torch.Tensor, probe_tokens: int = 16) -> dict:
    """Per MoE layer and forward: operators and host syncs of the plain pass and of calibration's."""
    from moeviz.adapters import get_adapter
    from moeviz.calibrate import CalibConfig, observe

    adapter = get_adapter(model)
    config = CalibConfig(batch_size=len(tokens), probe_tokens=probe_tokens)

    def plain():
        with torch.inference_mode():
            model(input_ids=tokens, use_cache=False)

    plain(), observe(model, adapter, tokens, config)  # warm: lazy initialisation is not counted
    counts = {"plain": op_counts(plain), "calibrate": op_counts(lambda: observe(model, adapter, tokens, config))}
    L = len(adapter.layers)
    result = {}
    for name, (calls, syncs) in counts.items():
        result[name] = dict(ops=sum(calls.values()) / L, syncs=sum(syncs.values()) / L, sync_ops=dict(syncs),
                            grouped_mm=calls["aten::_grouped_mm"] / L)
    result["extra_ops"] = result["calibrate"]["ops"] - result["plain"]["ops"]
    result["extra_syncs"] = result["calibrate"]["syncs"] - result["plain"]["syncs"]
    return result


def main() -> None:
    from moeviz.tiny import tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--family", default="olmoe")
    args = parser.parse_args()
    print("| family | experts | plain ops/layer | calibrate ops/layer | extra | plain syncs/layer | "
          "calibrate syncs/layer |\n|---|---|---|---|---|---|---|")
    for E in args.experts:
        key = "num_local_experts" if args.family in ("mixtral", "gpt_oss") else "num_experts"
        model = tiny_model(args.family, **{key: E, "num_experts_per_tok": 2})
        tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        r = per_layer(model, tokens)
        print(f"| {args.family} | {E} | {r['plain']['ops']:.1f} | {r['calibrate']['ops']:.1f} | {r['extra_ops']:+.1f} | "
              f"{r['plain']['syncs']:.1f} | {r['calibrate']['syncs']:.1f} {r['calibrate']['sync_ops'] or ''} |")


if __name__ == "__main__":
    main()
