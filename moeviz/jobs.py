"""The jobs a backend runs for the app, each a thin call into the library on the backend's
one loaded model. Arguments and results are plain JSON values; every job reports progress
as (step, done, total)."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path


def calibrate(server, progress, **config) -> dict:
    """Calibrate (or find cached) stats: {"path", "cached", "tokens", "paths"}. `config` holds
    CalibConfig's fields; its `data` may name several sources (`NAME=SOURCE,…`, `demo:each`):
    each gets its own cache entry, under one progress bar."""
    from dataclasses import replace

    from .calibrate import CalibConfig, cache_path
    from .calibrate import calibrate as run
    from .data import parse_sources

    sources = parse_sources(config.get("data", "demo"))
    config = CalibConfig(**{"cache_dir": server.cache_dir, **config, "data": sources[0][1]})
    if config.layer_by_layer:  # read layer by layer from the files, whether or not the model is loaded
        from .loading import load_skeleton, load_tokenizer

        model = load_skeleton(server.model_name, with_files=True)
        tokenizer, fingerprint = load_tokenizer(model._moeviz_source), None
    else:
        model, tokenizer, fingerprint = server.loaded()
    paths, cached, tokens = [], [], 0
    for i, (label, source) in enumerate(sources):
        config = replace(config, data=source)
        cached.append(cache_path(model, config, fingerprint).exists())
        step = ("calibrating, layer by layer" if config.layer_by_layer else "calibrating") + (
            f" {label} ({i + 1} of {len(sources)})" if len(sources) > 1 else "")
        stats, path = run(model, config, tokenizer, progress=lambda done, total: progress(
            step, i * total + done, len(sources) * total))
        paths.append(str(path))
        tokens += stats.meta["tokens"]
    return dict(path=paths[-1], paths=paths, cached=all(cached), tokens=tokens)


def evaluate(server, progress, plan: dict, stats: str | list | None, runs: str, **config) -> dict:
    """Evaluate `plan` (its JSON object) in place against the original; store it (and, once,
    the original as the baseline) in `runs`: {"run_id", "baseline_id"}."""
    from .evaluate import EvalConfig
    from .plan import PruningPlan
    from .runs import RunStore, store_evaluation
    from .stats import load_mix, mix_label

    model, tokenizer, fingerprint = server.loaded()
    plan = PruningPlan(**plan)
    config = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return store_evaluation(RunStore(runs), model, tokenizer, config, server.model_name, fingerprint,
                            plan, load_mix(stats), mix_label(stats), progress)


def export(server, progress, plan: dict, stats: str | list | None, out: str, runs: str | None = None,
           mtp: str | None = None) -> dict:
    """Write the pruned checkpoint, streamed from the original's files, with its model card (the
    plan's evaluation from `runs` when it holds one): {"path", "kind", "loaders"}."""
    from .export import export_plan
    from .loading import resolve_source
    from .plan import PruningPlan
    from .stats import load_mix

    loaded = load_mix(stats)
    kind = export_plan(resolve_source(server.model_name), PruningPlan(**plan), loaded, out,
                       progress=lambda done, total: progress("writing", done, total), runs=runs, mtp=mtp)
    return dict(path=str(out), kind=kind.name, loaders=kind.loaders)


def verify(server, progress, export: str, engine: str | None = None) -> dict:
    """`moeviz.verify.verify` of an export of the loaded model, its intended outputs from the
    loaded original with the plan applied in place: {"ok", "summary", "rows"}, or {"ok": False,
    "problems"} for files that are not whole."""
    import torch

    from .checkpoint import Checkpoint
    from .plan import read_lineage
    from .verify import VerifyError, default_engine, gpu_room
    from .verify import verify as run

    model, _, fingerprint = server.loaded()
    device = next(model.parameters()).device
    if device.type == "cuda":  # the engine loads the export beside the original this backend holds there
        why = gpu_room(Checkpoint(export).nbytes, *torch.cuda.mem_get_info(device), engine or default_engine(export))
        if why:
            return dict(ok=False, summary=f"Not run: {why}, beside the original this dashboard holds there. "
                                          f"`moeviz verify {export}` on the command line frees it before the engine starts.")
    lineage = read_lineage(export) or {}
    steps = iter(range(4))
    try:
        result = run(export, engine=engine, model=model if lineage.get("parent_fingerprint") == fingerprint else None,
                     progress=lambda text: progress(text, next(steps, 3), 4))
    except VerifyError as err:
        return dict(ok=False, problems=str(err).splitlines())
    return dict(ok=result.ok, summary=result.summary(), rows=result.rows)


def recover(server, progress, plan: dict, stats: str | list | None, runs: str, out: str, minutes: float,
            lr: float = 1e-4, train_samples: int = 1024, **config) -> dict:
    """Export `plan` to `out`/pruned, distil it from the loaded original for `minutes` into
    `out`/recovered, evaluate it and store it beside the plan's own run:
    {"run_id", "parent_id", "baseline_id", "checkpoint", "kept", "why"}: the recovered model, or
    the pruned one when recovery made it worse on held-out text. Trains and checks on the
    evaluation's data: a mix's sources in the mix's own shares. A failed job leaves nothing."""
    import shutil

    from .data import sample_mixed
    from .evaluate import EvalConfig
    from .export import export_plan
    from .loading import resolve_source
    from .plan import PruningPlan
    from .recover import DistillConfig, recover_checkpoint
    from .runs import RunStore, store_recovery
    from .stats import load_mix, mix_label

    model, tokenizer, fingerprint = server.loaded()
    plan = PruningPlan(**plan)
    loaded = load_mix(stats)
    config = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists already; recovery writes into a new directory.")
    # The page names a mix's sources in the mix's order, those with a share only.
    shares = [m["share"] for m in (loaded.meta.get("mix") or []) if m["share"] > 0] if loaded is not None else None
    try:
        export_plan(resolve_source(server.model_name), plan, loaded, out / "pruned",
                    progress=lambda done, total: progress("writing the pruned checkpoint", done, total))
        vocab = model.config.vocab_size
        tokens = sample_mixed(config.data, train_samples, config.seq_len, tokenizer, 0, "train", vocab, shares)
        check = sample_mixed(config.data, 8, config.seq_len, tokenizer, 7, "heldout", vocab, shares)  # must beat the pruned
        budget = DistillConfig(steps=None, max_minutes=minutes, lr=lr)
        student, report = recover_checkpoint(
            out / "pruned", model, server.model_name, tokens, budget, out / "recovered", server.device,
            lambda step, steps, row: progress(f"distilling, step {step}, loss {row['loss']:.3f}; seconds",
                                              round(row["seconds"]), round(minutes * 60)), check)
        ids = store_recovery(RunStore(runs), student, model, tokenizer, config, server.model_name, fingerprint, plan,
                             loaded, mix_label(stats), report, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # the job's own new directory: nothing half-written stays
        raise
    return dict(ids, checkpoint=report["checkpoint"], kept=report.get("kept"), why=report.get("why"))


def stability(server, progress, config: dict, chunks: int, methods: list[str], ratio: float, out: str,
              bootstrap: int = 5) -> dict:
    """Stats of `chunks` calibration chunks and each method's agreement with the full set,
    written to `out` (JSON {method: rows})."""
    import json

    from .analysis import stability as agreement
    from .calibrate import CalibConfig, calibrate_chunks
    from .methods import PlanConfig

    model, tokenizer, _ = server.loaded()
    config = CalibConfig(**{**config, "probe_tokens": 0})
    parts = calibrate_chunks(model, config, chunks, tokenizer, lambda done, total: progress("calibrating", done, total))
    sizes = sorted({max(1, chunks * i // 8) for i in range(1, 9)})
    result = {name: agreement(parts, PlanConfig(name, ratio=ratio), sizes, bootstrap) for name in methods}
    _write(out, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return dict(out=str(out))


def similarity(server, progress, space: str, out: str) -> dict:
    """A weight-space similarity (E × E per layer), saved to `out` (.npy). Read from the
    checkpoint's files one layer's experts at a time (the model need not be loaded), or from
    the loaded model when the files hold experts fused."""
    from types import SimpleNamespace

    import numpy as np

    from .adapters import get_adapter
    from .analysis import similarity as compute
    from .loading import file_layers

    if server.model is None:
        try:
            layers = file_layers(server.model_name)
        except NotImplementedError:
            layers = get_adapter(server.loaded()[0]).layers
    else:
        layers = get_adapter(server.model).layers
    sims = []
    for i, layer in enumerate(layers):
        progress(f"{space}, layer {layer.layer_idx}", i, len(layers))
        sims.append(compute(None, space, SimpleNamespace(layers=[layer]))[0])
    _write(out, lambda tmp: np.save(tmp, np.stack(sims)))
    return dict(out=str(out))


def curve(server, progress, stats: str | list, methods: list[str], ratios: list[float], out: str, mode: str | None = None,
          scope: str = "layer", num_samples: int = 8, seq_len: int = 128, data: str | None = None) -> dict:
    """A quick fidelity estimate (KL, top-1 agreement) of each method at each ratio, on a small
    held-out batch, every plan applied in place; written to `out` (JSON {method: rows}), or, where
    `out` holds "{method}", one file a method (JSON {method: rows}), so a method's curve is
    kept on its own while one job (and one progress bar) estimates them all."""
    import json

    from .evaluate import ratio_curve
    from .stats import load_mix

    model, tokenizer, fingerprint = server.loaded()
    loaded = load_mix(stats)
    data = data or loaded.calibration_data or "demo"
    result = ratio_curve(model, tokenizer, loaded, methods, ratios, mode, scope, data, num_samples, seq_len,
                         fingerprint, progress)
    if "{method}" not in out:
        _write(out, lambda tmp: tmp.write_text(json.dumps(result)))
        return dict(out=str(out))
    for method, rows in result.items():
        _write(out.format(method=method), lambda tmp: tmp.write_text(json.dumps({method: rows})))
    return dict(out=[out.format(method=method) for method in result])


def trace(server, progress, text: str, plan: dict | None = None, stats: str | list | None = None) -> dict:
    """`moeviz.trace.trace` of one text on the loaded model (and under `plan`, applied in place)."""
    from .plan import PruningPlan
    from .stats import load_mix
    from .trace import TraceError
    from .trace import trace as route

    model, tokenizer, fingerprint = server.loaded()
    if tokenizer is None:
        raise TraceError("This model has no tokenizer: moeviz cannot turn a text into its tokens.")
    progress("tracing", 0, 1)
    return route(model, tokenizer, text, PruningPlan(**plan) if plan else None, load_mix(stats), fingerprint)


def tradeoff(server, progress, a: list, b: list, config: dict, shares: list[float], data: dict[str, str], out: str,
             num_samples: int = 8, seq_len: int = 128, tasks: bool = False, task_examples: int = 50) -> dict:
    """`moeviz.evaluate.mix_tradeoff` of two calibrations `a` and `b` (each a directory, or a
    mix [[directory, share], …]; `a` and `b` are [name, spec]), written to `out` (JSON rows)."""
    import json

    from .evaluate import mix_tradeoff
    from .methods import PlanConfig
    from .stats import load_mix

    model, tokenizer, fingerprint = server.loaded()
    sources = {a[0]: load_mix(a[1]), b[0]: load_mix(b[1])}
    plan_config = PlanConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    rows = mix_tradeoff(model, tokenizer, sources, plan_config, shares, data, num_samples, seq_len, tasks,
                        task_examples, fingerprint, progress)
    _write(out, lambda tmp: tmp.write_text(json.dumps(rows)))
    return dict(out=str(out))


def _write(out: str, write) -> None:
    """Write a job's result file atomically: `write(tmp)` beside it, then renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp.{out.name}")  # the same suffix: np.save adds none
    write(tmp)
    tmp.replace(out)


# ---- what a job may be asked to do, checked before it is queued ---------------------------
OUTPUT_ARGS = ("out", "runs")  # the arguments a job writes to
# Where, inside the cache directory, the app puts each job's output; the rest of it (calibrations,
# a backend's token) is moeviz's own. Outside the cache directory any path will do.
RESULT_DIRS = dict(export="exports", recover="recovered", stability="stability", similarity="similarity",
                   curve="curves", tradeoff="tradeoffs")
RUNS_FILE = "runs.sqlite"  # the app's run store, at the top of the cache directory
NEW_DIRS = ("export", "recover")  # they write a checkpoint directory: it must be new or empty, as for the CLI


def check(server, kind: str, args: dict) -> None:
    """Refuse (ValueError) arguments `kind`'s function does not take or lacks, and outputs in the
    model's own directory, in the cache directory outside the app's result folders, or in a
    non-empty export directory."""
    allowed, required = arg_names(kind)
    if unknown := sorted(set(args) - allowed):
        raise ValueError(f"A {kind} job takes no argument {', '.join(map(repr, unknown))}; "
                         f"its arguments: {', '.join(sorted(allowed))}")
    if missing := sorted(required - set(args)):
        raise ValueError(f"A {kind} job needs {', '.join(map(repr, missing))}; its arguments: {', '.join(sorted(allowed))}")
    for name in OUTPUT_ARGS:
        if args.get(name) is not None:
            check_output(server, kind, name, args[name])


def arg_names(kind: str) -> tuple[set[str], set[str]]:
    """(every argument `kind` takes, the required ones), from its function's signature; a
    `**config` takes its dataclass's fields, but not the cache directory (the backend's own)."""
    params = list(inspect.signature(globals()[kind]).parameters.values())[2:]  # after server, progress
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    allowed = {p.name for p in named}
    if len(named) < len(params):
        allowed |= {f.name for f in fields(_config_class(kind))} - {"cache_dir"}
    return allowed, {p.name for p in named if p.default is p.empty}


def _config_class(kind: str):
    """The dataclass a job's `**config` builds."""
    from .calibrate import CalibConfig
    from .evaluate import EvalConfig

    return CalibConfig if kind == "calibrate" else EvalConfig


def check_output(server, kind: str, name: str, value) -> None:
    """Refuse an output path (ValueError) that would overwrite what is not the job's to write."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a path, not {value!r}")
    path = Path(value).expanduser().resolve()
    for protected, what in _protected(server):
        if path.is_relative_to(protected):
            raise ValueError(f"{name} {value!r} is inside {what} ({protected}); choose a path outside it")
    cache = Path(server.cache_dir).resolve()
    if path.is_relative_to(cache):
        if name == "runs":
            fits, where = path == cache / RUNS_FILE, str(cache / RUNS_FILE)
        else:  # inside the job's result folder, not the folder itself
            folder = cache / RESULT_DIRS[kind]
            fits, where = path.is_relative_to(folder) and path != folder, f"inside {folder}"
        if not fits:
            raise ValueError(f"{name} {value!r} is inside the cache directory {cache}, which moeviz manages; "
                             f"a {kind} job's {name} goes there only {where}")
    if kind in NEW_DIRS and name == "out" and path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "is a file" if not path.is_dir() else "is a directory that is not empty"
        raise ValueError(f"The {name} folder {value} {what}: give a new directory (or an empty one)")


def _protected(server) -> list[tuple[Path, str]]:
    """Directories no job writes into: the model's own (for a hub id, the Hugging Face cache)."""
    from .checkpoint import resolve_source

    try:
        source = resolve_source(server.model_name)
    except FileNotFoundError:  # no such directory: nothing there to overwrite
        return []
    if Path(source).is_dir():
        return [(Path(source).resolve(), "the model's own directory")]
    from huggingface_hub import constants

    return [(Path(constants.HF_HUB_CACHE).resolve(), "the Hugging Face cache, which holds the model")]
