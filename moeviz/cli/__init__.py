"""The `moeviz` command line: thin wrappers over library calls.

Each command's arguments are declared beside its handler, in a module per group of commands
(`add_<command>(subparsers)` and `_<command>(args)`); `COMMANDS` lists them in the order `--help`
shows them.

Errors a user can cause (a bad path, an unsupported model, a bad ratio) end in one line on
stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import calibrate, distill, evaluate, model, prune


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


COMMANDS = (model.add_info, calibrate.add_calibrate, prune.add_plan, prune.add_prune, prune.add_verify,
            evaluate.add_evaluate,
            distill.add_distill, evaluate.add_sweep, calibrate.add_stability, model.add_trace, model.add_serve,
            evaluate.add_runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeviz", description="Analyse and prune Mixture-of-Experts language models."
    )
    sub = parser.add_subparsers(title="commands")
    for add in COMMANDS:
        add(sub)
    return parser
