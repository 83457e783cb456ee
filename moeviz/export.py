"""Exporting a plan, streamed: from the original safetensors shards to new ones, shard by shard.

`export_plan` never builds the model. It reads each source shard one tensor at a time
(memory-mapped, `moeviz.checkpoint.Checkpoint`), rewrites what the plan changes and writes
the matching output shard, so its peak memory is about two shards whatever the model's size.
What happens to each tensor is `moeviz.rewrite`'s; here: the target directory, the config of
each kind, the lineage, checksums and the model card.

Every plan exports as one of three kinds, named by `moeviz.plan.export_kind` before anything
is written:
- **standard**: removal or merging with the same count in every layer, or weight sparsity
  alone. The architecture's own checkpoint (expert counts in the config updated, kept
  experts renumbered 0…K-1): stock transformers, vLLM and any engine that reads it.
- **expert substitution**: novices and drops, with any counts. The original config plus
  `compression_config.transform_config.expert_substitution` (version 1, the format vLLM reads
  from 0.33.0; llm-compressor has no MoNE modifier in any release as of 0.14.0.1, and its open
  pull request writes the older `approximate_experts` form): the router keeps all E rows and logical
  ids, only kept experts' weights are stored (under their original ids), and each pruned
  expert is one constant vector of the hidden size (zeros for a drop).
- **moeviz-only**: removal or merging with uneven counts across layers, which one config
  cannot describe. The config's model type is `moeviz_pruned`, so stock loaders refuse it
  naming moeviz; `moeviz.load_model` reads the original architecture from it.

`moeviz.reload.load_exported` reads the last two back (also substitution checkpoints another
tool wrote).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .adapters import Adapter, get_adapter
from .apply import check_plan
from .building import skeleton
from .card import model_card
from .checkpoint import (MOEVIZ_MODEL_TYPE, Checkpoint, demo_names, demo_path, fingerprint, local_dir, read_config,
                         readable)
from .plan import (LINEAGE_FILE, MOEVIZ_ONLY, PLAN_FILE, STANDARD, SUBSTITUTION, ExportKind, PruningPlan,
                   export_kind)
from .reload import ROUTER_SEMANTICS, is_pruned_export
from .rewrite import Progress, Rewriter, mtp_layers
from .stats import ExpertStats
from .surgery import set_config_count

CARD_FILE = "README.md"
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "spiece.model", "*.tiktoken", "chat_template*")


# ---- export -----------------------------------------------------------------------------
def export_name(model: str, plan: PruningPlan) -> str:
    """A directory name for the export of `plan` on `model`, in safe characters:
    `demo-fine-mone-novice-18.75pct-edited`."""
    total = sum(plan.model.get("num_experts") or []) or 1
    share = plan.num_pruned / total if plan.num_pruned else plan.ratio  # what was pruned, hand edits included
    parts = [Path(str(model)).name, plan.method, plan.mode if plan.num_pruned else None,
             f"{share * 100:.4g}pct", "global" if plan.scope == "global" else None]
    if plan.sparsity or plan.nm:
        parts.append(f"{plan.nm[0]}of{plan.nm[1]}" if plan.nm else f"sparsity{plan.sparsity * 100:g}pct")
    return re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(p for p in parts if p)).strip("-.")


def export_plan(source, plan: PruningPlan, stats: ExpertStats | None, out_dir,
                progress: Progress | None = None, runs=None, mtp: str | None = None) -> ExportKind:
    """Write `plan` applied to the checkpoint `source` (a directory, `demo` or a hub id) into
    the new directory `out_dir`, one source shard at a time, with a model card (`README.md`;
    the plan's evaluation from the `RunStore` `runs` when it holds one).

    `mtp`: what to do with multi-token-prediction layers the files hold beyond the decoder's
    (DeepSeek-V3's `model.layers.61`, GLM's, MiMo's), which transformers does not run:
    "prune" cuts their experts to the same count, keeping those with the largest router rows
    (the files allow no more: moeviz does not calibrate through them); "drop" leaves them out and
    says `num_nextn_predict_layers: 0`. Needed when the plan changes the expert count; without
    it they are kept whole (novices and drops leave the count as it was).

    Returns the `ExportKind`. Everything that can be checked is checked before the first
    shard: the plan and stats against the model, the target (a new or empty directory whose
    parent is writable), the free disk space, what the checkpoint's quantization allows. The
    output appears at once, by renaming a temporary directory beside `out_dir`.
    """
    out = Path(out_dir).expanduser().absolute()
    src = Path(local_dir(source))
    config = json.loads((src / "config.json").read_text())
    if (src / PLAN_FILE).is_file() or is_pruned_export(src):
        raise ValueError(f"{src} is a pruned export (its experts are cut already): export from the original.")
    ckpt = Checkpoint(src)
    adapter = get_adapter(skeleton(read_config(src), str(src), ckpt.keys()))
    parent_fingerprint = fingerprint(src)
    check_plan(adapter.model, plan, stats, adapter, parent_fingerprint)
    kind = export_kind(plan, config.get("quantization_config"))
    rewriter = Rewriter(ckpt, adapter, plan, stats, kind, config.get("quantization_config"), mtp)  # refuses what it cannot
    if rewriter.mtp_note:
        print(rewriter.mtp_note, file=sys.stderr)  # before anything is written
    tmp = _prepare_target(out, rewriter.output_bytes())
    try:
        rewriter.write(tmp, progress)
        _write_config(src, tmp, config, adapter, plan, kind, rewriter.replacement_names)
        if rewriter.mtp and mtp == "drop":
            _drop_mtp_config(tmp / "config.json")
        demo = [n for n in demo_names() if demo_path(n).resolve() == src.resolve()]  # the app passes the path
        parent = demo[0] if demo else str(Path(source).resolve()) if Path(source).exists() else str(source)
        lineage = dict(parent=parent, parent_fingerprint=parent_fingerprint, kind=kind.name,
                       plan=json.loads(plan.to_json()))
        if rewriter.mtp_note:
            lineage["mtp"] = rewriter.mtp_note
        if stats is not None and (data := stats.calibration_data):
            lineage["data"] = data  # the text `moeviz verify` takes its held-out prompts from
        if kind.name == MOEVIZ_ONLY:
            plan.save(tmp / PLAN_FILE)
        lineage["files"] = file_checksums(tmp)  # what `moeviz verify` checks a copy against
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))  # which original expert each one is
        (tmp / CARD_FILE).write_text(model_card(plan, kind, stats, parent, src, adapter, parent_fingerprint, runs,
                                                rewriter.mtp_note))
        readable(tmp)  # mkdtemp made it private, safetensors its files
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kind


UNHASHED = (CARD_FILE, LINEAGE_FILE)  # rewritten after the export (each verification updates both)


def file_checksums(directory, names=None) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} of an export's files (`names`, or all but the card and
    the lineage), hashed in threads (hashlib lets go of the GIL): about a second a GB."""
    from concurrent.futures import ThreadPoolExecutor

    directory = Path(directory)
    names = names or sorted(p.name for p in directory.iterdir()
                            if p.is_file() and p.name not in UNHASHED and not p.name.startswith("."))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda name: _sha256(directory / name), names))
    return {name: dict(bytes=(directory / name).stat().st_size, sha256=h) for name, h in zip(names, hashes)}


def _sha256(file: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(file: Path, text: str) -> None:
    """Replace a small text file at once: written to a file of its own beside it (two writers do not
    share one), flushed to disk, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file.stat().st_mode & 0o777 if file.exists() else 0o644)  # mkstemp's is 0o600
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prepare_target(out: Path, size: int) -> Path:
    """Check the target before anything is written; return a new temporary directory beside it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Cannot export to {out}: it is a file, not a directory.")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"Cannot export to {out}: it is a directory that is not empty; give a new directory "
                              "(or an empty one).")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"Cannot export to {out}: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK)):
        raise PermissionError(f"Cannot export to {out}: {out if out.is_dir() else existing} is not writable.")
    free = shutil.disk_usage(existing).free
    if size > free:
        raise OSError(f"Cannot export to {out}: the checkpoint needs {size / 2**30:.2f} GiB and only "
                      f"{free / 2**30:.2f} GiB is free there.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise OSError(f"Cannot export to {out}: {err.strerror or err}.") from err


def _move_into_place(tmp: Path, out: Path) -> None:
    try:
        tmp.rename(out)  # replaces an empty out_dir
    except OSError as err:
        raise OSError(f"Could not move the finished export into {out}: {err.strerror or err}. Nothing was "
                      "left behind; choose a directory you can write.") from err


def _write_config(src: Path, out: Path, config: dict, adapter: Adapter, plan: PruningPlan, kind: ExportKind,
                  replacements: dict[int, dict[int, str]]) -> None:
    """The source's config as the kind needs it (written as JSON: a quantization_config and
    every other field stay as they were), its generation config and tokenizer files."""
    config = json.loads(json.dumps(config))
    if kind.name == STANDARD and plan.num_pruned:
        first = adapter.layers[0]
        set_config_count(config, first.num_experts - len(plan.pruned.get(first.layer_idx, ())), first.num_experts)
    elif kind.name == SUBSTITUTION:
        targets = {}
        for layer_idx, values in replacements.items():
            targets[_target_path(values)] = dict(
                num_logical_experts=adapter.layer(layer_idx).num_experts, weight_layout="compact_retained_experts",
                replacements={str(e): {"format": "constant-v1", "tensors": {"value": name}} for e, name in values.items()})
        from . import __version__

        block = config.setdefault("compression_config", {})
        block.setdefault("producer", dict(name="moeviz", version=__version__))
        block.setdefault("provenance", dict(algorithm=plan.method, mode=plan.mode))
        block.setdefault("transform_config", {})["expert_substitution"] = dict(
            version=1, router_semantics=dict(ROUTER_SEMANTICS), targets=targets)
    elif kind.name == MOEVIZ_ONLY:
        config["moeviz"] = dict(
            note="Pruned by moeviz with a different number of experts per layer; load with moeviz.load_model.",
            model_type=config["model_type"], architectures=config.get("architectures"),
            experts_per_layer={str(i): n - len(plan.pruned.get(i, ()))
                               for i, n in zip(plan.model["layer_indices"], plan.model["num_experts"])})
        config["model_type"] = MOEVIZ_MODEL_TYPE  # stock loaders refuse it, naming moeviz
        config["architectures"] = ["MoevizPrunedForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for pattern in ("generation_config.json", *_TOKENIZER_FILES):
        for file in src.glob(pattern):
            shutil.copy2(file, out / file.name)


_MTP_COUNTS = ("num_nextn_predict_layers", "num_mtp_layers", "mtp_num_layers")


def _drop_mtp_config(file: Path) -> None:
    """Say no MTP layers wherever the written config (or its text config) counts them."""
    config = json.loads(file.read_text())
    for part in (config, config.get("text_config") or {}):
        for key in _MTP_COUNTS:
            if part.get(key):
                part[key] = 0
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def checkpoint_mtp_layers(source, adapter: Adapter) -> dict[int, str]:
    """`mtp_layers` of a checkpoint (a directory, `demo` or a hub id already downloaded), from its
    files' headers: none when its files are not here."""
    try:
        return mtp_layers(Checkpoint(local_dir(source)).keys(), adapter)
    except OSError:
        return {}


def _target_path(values: dict[int, str]) -> str:
    """`model.layers.3.mlp.experts` from the layer's replacement names."""
    name = next(iter(values.values()))
    return name.split(".expert_replacements.")[0] + ".experts"


