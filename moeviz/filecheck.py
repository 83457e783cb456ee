"""The file check of `moeviz verify`: what is wrong with an export's files, found with no engine
and no weights read, one line a problem, before any model is built.

Every file is a whole safetensors file (its header readable, its tensors' bytes all there: a
git-lfs pointer or a cut copy is named); every file the index names is there and every tensor is
where it says; every tensor the config promises is there with its shape (a dry run of the load on
the meta device; the MTP layers the files hold beyond the decoder are counted, not built); each
MoE layer holds exactly the experts its plan keeps, and the config counts them so; every
replacement vector exists; a layer's experts hold each tensor in one dtype; every file's sha256
matches the one the export wrote into the lineage. Files that do not shape the model (generation
config, tokenizer, chat template) are told apart: an edit there is a note, not a failure.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import Checkpoint, _header, parse_expert_key
from .export import file_checksums
from .plan import LINEAGE_FILE, MOEVIZ_ONLY, PLAN_FILE, STANDARD, SUBSTITUTION, PruningPlan
from .reload import meta_model, read_substitution, unfilled
from .rewrite import INDEX_FILE, mtp_layers


# ---- the files ------------------------------------------------------------------------------
MODEL_FILES = ("config.json", INDEX_FILE, PLAN_FILE)  # with every .safetensors file: what shapes the served model


def check_files(path, notes: list[str] | None = None) -> list[str]:
    """What is wrong with an export's files, one line each (empty: nothing found). Edits to files
    that do not shape the model go to `notes`, when given."""
    path = Path(path)
    problems: list[str] = []
    config = _json(path / "config.json", problems)
    lineage = _json(path / LINEAGE_FILE, problems) if (path / LINEAGE_FILE).is_file() else None
    index = _json(path / INDEX_FILE, problems) if (path / INDEX_FILE).is_file() else None
    if config is None or problems:
        return problems or [f"{path} holds no config.json: not a checkpoint directory (or a copy that lost it)."]
    manifest = (lineage or {}).get("files") or {}
    named = set((index or {}).get("weight_map", {}).values())
    missing = sorted({name for name in manifest if not (path / name).is_file()} | {f for f in named if not (path / f).is_file()})
    if missing:  # nothing further can be read
        return [f"{name} is missing: {_missing_why(name, manifest)}" for name in missing]
    headers = {}
    for file in sorted(path.glob("*.safetensors")):
        header = _whole(file, problems)
        if header is not None and (not named or file.name in named):
            headers[file.name] = header
        elif header is not None and notes is not None:  # a copy in another format beside (Mistral's consolidated.*)
            notes.append(f"{file.name} is not in {INDEX_FILE}: loaders that read the index leave it unread")
    if not problems:
        problems = _index(index, headers) or _structure(path, lineage)
    for name, got in file_checksums(path, list(manifest)).items() if manifest else ():
        if got != (want := manifest[name]):
            said = (f"{name} differs from the file the export wrote ({want['bytes']:,} bytes, sha256 {want['sha256'][:12]}…; "
                    f"now {got['bytes']:,} bytes, {got['sha256'][:12]}…)")
            if name.endswith(".safetensors") or name in MODEL_FILES:
                problems.append(f"{said}: a broken or edited copy; copy it again from the export")
            elif notes is not None:
                notes.append(f"{said}: edited after the export (it does not change the weights)")
    return problems


def _json(file: Path, problems: list[str]) -> dict | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as err:
        problems.append(f"{file.name} is not valid JSON ({err}; {file.stat().st_size:,} bytes): a cut or edited copy")
        return None


def _whole(file: Path, problems: list[str]) -> dict | None:
    """The header of a whole safetensors file; else None, and why in `problems` (a git-lfs pointer,
    a cut copy: the header promises more bytes than the file holds)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        start = f.read(64)
    if start.startswith(b"version https://git-lfs"):
        problems.append(f"{file.name} is a git-lfs pointer ({size:,} bytes), not the tensors: fetch them "
                        "(`git lfs pull`) or copy the export again")
        return None
    try:
        header = _header(file)
        end = 8 + int.from_bytes(start[:8], "little") + max((t["data_offsets"][1] for t in header.values()), default=0)
    except (ValueError, KeyError, TypeError, MemoryError, OverflowError):
        problems.append(f"{file.name} is not a safetensors file ({size:,} bytes): a broken copy")
        return None
    if end > size:
        problems.append(f"{file.name} is cut short: its header promises {end:,} bytes, it holds {size:,}; copy it again")
        return None
    return header


def _missing_why(name: str, manifest: dict) -> str:
    if name in manifest:
        return f"the export wrote it ({manifest[name]['bytes']:,} bytes); copy it again from the export"
    return f"{INDEX_FILE} names tensors in it"


def _index(index: dict | None, headers: dict[str, dict]) -> list[str]:
    """The index and the files' headers agree: each tensor where the index says, none unlisted."""
    if index is None:
        return []
    weight_map = index["weight_map"]
    problems = [f"{INDEX_FILE} puts {key} in {file}, which does not hold it" for key, file in weight_map.items()
                if key not in headers.get(file, {})]
    for file, header in headers.items():
        if extra := [k for k in header if weight_map.get(k) != file]:
            problems.append(f"{file} holds {len(extra)} tensor(s) {INDEX_FILE} does not list (e.g. {extra[0]}): "
                            "loaders would not read them")
    return problems


class _Shapes:
    """A `Checkpoint` whose tensors are empty meta tensors of the files' shapes and dtypes."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.file_of = ckpt, ckpt.file_of

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.empty(self.ckpt.shape(name), dtype=self.ckpt.dtype(name), device="meta")


def _structure(path: Path, lineage: dict | None) -> list[str]:
    """A dry run of `load_exported` on the meta device: the config's model, cut as the files
    say, and every file tensor put in its place, shapes compared; then what no file filled."""
    ckpt = Checkpoint(path)
    try:
        layout, adapter = meta_model(path, ckpt)
    except ValueError as err:
        return [str(err)]
    absent = [(layer_idx, name) for layer_idx, (_, values) in layout.substituted.items()
              for name in values.values() if name and name not in ckpt.file_of]
    if absent:
        return [f"{len(absent)} replacement vector(s) of the expert substitution are not in the files ("
                f"{_layers(sorted({layer for layer, _ in absent}))}, e.g. {absent[0][1]}): copy the export again"]
    if mixed := _mixed_dtypes(ckpt, adapter):
        return mixed
    kind = (lineage or {}).get("kind") or (SUBSTITUTION if layout.substituted else MOEVIZ_ONLY if layout.plan else
                                            STANDARD)  # a recovered checkpoint's lineage names its plan, not its kind
    if lineage and lineage.get("plan") and (problems := _experts(path, ckpt, adapter, PruningPlan(**lineage["plan"]),
                                                                 kind)):
        return problems  # a wrong count makes every tensor below look wrong
    mtp = mtp_layers(ckpt.keys(), adapter)  # beyond the decoder: transformers builds none of them
    if problems := _mtp_experts(ckpt, adapter, mtp):
        return problems
    try:
        layout.restructure(adapter)
        layout.bind(adapter)
    except ValueError as err:
        return [str(err)]
    problems, written, shapes = [], Counter(), _Shapes(ckpt)
    prefixes = tuple(f"{head}{n}." for n, head in mtp.items())
    for key in (k for k in ckpt.keys() if not (prefixes and k.startswith(prefixes))):
        try:
            pairs = layout.fill(shapes, key)
        except ValueError as err:
            problems.append(str(err))
            continue
        for target, value in pairs:
            if tuple(target.shape) != tuple(value.shape):
                problems.append(f"{key} is {list(value.shape)} in {ckpt.file_of[key].name}; the config makes it "
                                f"{list(target.shape)}")
            written[id(target if target._base is None else target._base)] += target.numel()
    if lost := unfilled(adapter.model, written):
        problems.append(f"The files lack {len(lost)} tensor(s) the config promises, e.g. {', '.join(lost[:3])}")
    return problems


def _mtp_experts(ckpt: Checkpoint, adapter, mtp: dict[int, str]) -> list[str]:
    """The multi-token-prediction layers the files hold beyond the decoder (DeepSeek-V3's
    `model.layers.61`) hold as many experts as the config counts (pruned alike, or kept whole
    with the count)."""
    count, said = adapter.layers[0].num_experts, []
    for n, head in mtp.items():
        pattern = re.compile(rf"^{re.escape(head)}{n}\.(?:.+\.)?experts\.(\d+)\.")
        ids = {int(m[1]) for key in ckpt.keys() if (m := pattern.match(key))}
        if ids and ids != set(range(count)):
            said.append(f"MTP layer {n} holds {len(ids)} experts (ids {min(ids)}–{max(ids)}); the config counts {count}")
    return said


def _mixed_dtypes(ckpt: Checkpoint, adapter) -> list[str]:
    """The experts of a layer hold each tensor in one dtype: another betrays a replaced tensor."""
    layers = {layer.layer_idx: layer for layer in adapter.layers}
    dtypes: dict[tuple[int, str], set[str]] = {}
    for key in ckpt.keys():
        ek = parse_expert_key(key, layers)
        if ek is not None and ek.expert_idx is not None and ek.name != "approx_value":
            dtypes.setdefault((ek.layer_idx, ek.name), set()).add(ckpt.info(key)["dtype"])
    return [f"layer {layer}: its experts' {name} come in {len(found)} dtypes ({', '.join(sorted(found))}): one was "
            "replaced by another tensor" for (layer, name), found in dtypes.items() if len(found) > 1]


def _experts(path: Path, ckpt: Checkpoint, adapter, plan: PruningPlan, kind: str) -> list[str]:
    """Each MoE layer holds exactly the experts its plan keeps, under the ids its kind gives
    them, and the config counts them so; every substituted expert has its vector."""
    original = dict(zip(plan.model.get("layer_indices") or [], plan.model.get("num_experts") or []))
    layers = {layer.layer_idx: layer for layer in adapter.layers}
    held: dict[int, set[int]] = {}  # the expert ids of per-expert keys
    fused: dict[int, set[int]] = {}  # the first dimension of fused (E, …) tensors: a count, not ids
    for key in ckpt.keys():
        ek = parse_expert_key(key, layers)
        if ek is not None and ek.expert_idx is not None and ek.name != "approx_value":
            held.setdefault(ek.layer_idx, set()).add(ek.expert_idx)
        elif ek is not None and ek.expert_idx is None and len(ckpt.shape(key)) >= 2:  # not a router's (E,) bias
            fused.setdefault(ek.layer_idx, set()).add(ckpt.shape(key)[0])
    substituted = read_substitution(json.loads((path / "config.json").read_text()))
    stored_plan = PruningPlan.load(path / PLAN_FILE) if (path / PLAN_FILE).is_file() else None
    problems, miscounted = [], {}
    if kind == MOEVIZ_ONLY and (stored_plan is None or stored_plan.pruned != plan.pruned):
        problems.append(f"{PLAN_FILE} is {'missing' if stored_plan is None else 'not the plan the lineage records'}: "
                        "moeviz cannot tell which experts the files hold")
    for layer_idx, layer in layers.items():
        n = original.get(layer_idx, layer.num_experts)
        kept = plan.kept(layer_idx, n)
        if kind == SUBSTITUTION:
            counted, ids = n, set(kept)
            values = substituted.get(layer_idx, (None, {}))[1]
            if set(values) != set(plan.pruned.get(layer_idx, ())):
                problems.append(f"layer {layer_idx}: the config substitutes experts {sorted(values)}, the plan prunes "
                                f"{plan.pruned.get(layer_idx, [])}")
        else:
            counted, ids = (n if kind == MOEVIZ_ONLY else len(kept)), set(range(len(kept)))
        if layer.num_experts != counted:
            miscounted.setdefault((layer.num_experts, counted), []).append(layer_idx)
        elif layer_idx in held and held[layer_idx] != ids:  # (a layout of its own, Aria's `fc1`: the dry run checks it)
            found = held[layer_idx]
            problems.append(f"layer {layer_idx}: the files hold {len(found)} experts ({_ids(found - ids, 'extra')}"
                            f"{_ids(ids - found, 'missing')}); its plan keeps {len(kept)}")
        elif layer_idx in fused and fused[layer_idx] != {len(kept)}:
            problems.append(f"layer {layer_idx}: the files' fused expert tensors hold {sorted(fused[layer_idx])} "
                            f"experts; its plan keeps {len(kept)}")
    for (says, counted), where in miscounted.items():  # one line for every layer miscounted alike
        problems.insert(0, f"config.json gives {says} experts a layer, the plan makes it {counted} in "
                           f"{_layers(where)} ({kind} export): the config was edited or is another model's")
    return problems


def _layers(indices: list[int]) -> str:
    return f"layer {indices[0]}" if len(indices) == 1 else f"layers {indices[0]}–{indices[-1]} ({len(indices)})"


def _ids(ids: set[int], what: str) -> str:
    return f"{what}: {sorted(ids)[:8]}{'…' if len(ids) > 8 else ''} " if ids else ""


