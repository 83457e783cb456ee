"""Exporting a plan, streamed: from the original safetensors shards to new ones, shard by shard.

`export_plan` never builds the model. It reads each source shard one tensor at a time
(memory-mapped, `moeviz.checkpoint.Checkpoint`), rewrites what the plan changes and writes
the matching output shard, so its peak memory is about two shards whatever the model's size.
Files hold experts as transformers saves them: one key per expert and projection
(`…layers.3.mlp.experts.5.gate_proj.weight`; Mixtral `…block_sparse_moe.experts.5.w1.weight`)
or fused (E, …) tensors (`…layers.3.mlp.experts.gate_up_proj`, GPT-OSS). Kept experts are
renumbered 0…K-1 in every mode; router rows go only where experts are removed or merged
(novices and drops keep all E, the router still routes to them).

`load_exported` rebuilds a moeviz-format export (novices, drops, uneven counts) without a
random init or a float32 copy: a meta skeleton restructured by the plan, materialised once,
filled tensor by tensor.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .adapters import Adapter, ExpertWeights, get_adapter
from .apply import align_neurons, check_plan, install_novices, remove_experts
from .checkpoint import ROLES, Checkpoint, ExpertKey, fingerprint, local_dir, parse_expert_key, readable, skeleton
from .methods.moe_pruner import pruning_mask
from .plan import LINEAGE_FILE, PLAN_FILE, PruningPlan
from .stats import ExpertStats

NOVICES_FILE = "moeviz_novices.safetensors"  # "layers.<decoder layer>": novices (P, H)
INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "spiece.model", "*.tiktoken", "chat_template*")
Progress = Callable[[int, int], None]  # (done, total) in source tensors


def file_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The model's tensors other than routed experts, under the names its files give them
    (as `save_pretrained` writes them; the same tensor objects, renamed)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = adapter.model
    experts = {id(p) for layer in adapter.layers for p in layer.block.experts.parameters()}  # with novices
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in experts}
    return revert_weight_conversion(model, state)


# ---- export -----------------------------------------------------------------------------
def export_plan(source, plan: PruningPlan, stats: ExpertStats | None, out_dir,
                progress: Progress | None = None) -> str:
    """Write `plan` applied to the checkpoint `source` (a directory, `demo` or a hub id) into
    the new directory `out_dir`, one source shard at a time.

    Returns how the result reloads: "transformers" (a uniform remove or merge plan: a plain
    checkpoint, the config's expert count updated) or "moeviz" (novices, drops, uneven
    counts: the original config plus the plan and the novices, read by `load_exported`).
    A plan or stats made for another model is refused before anything is written; the
    output appears at once, by renaming a temporary directory beside `out_dir`.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory.")
    src = Path(local_dir(source))
    if (src / PLAN_FILE).is_file():
        raise ValueError(f"{src} is a moeviz export (its experts are cut already): export from the original.")
    adapter = get_adapter(skeleton(AutoConfig.from_pretrained(src), str(src)))
    parent_fingerprint = fingerprint(src)
    check_plan(adapter.model, plan, stats, adapter, parent_fingerprint)
    ckpt = Checkpoint(src)
    rewriter = _Rewriter(ckpt, adapter, plan, stats)  # refuses layouts it cannot rewrite
    plain = plan.mode in ("remove", "merge") and plan.is_uniform()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rewriter.write(tmp, progress)
        _write_config(src, tmp, adapter, plan if plain else None)
        parent = str(Path(source).resolve()) if Path(source).exists() else str(source)  # demo, a hub id
        lineage = dict(parent=parent, parent_fingerprint=parent_fingerprint, plan=json.loads(plan.to_json()))
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))  # which original expert each one is
        if not plain:
            plan.save(tmp / PLAN_FILE)
            if plan.mode in ("novice", "drop"):
                save_file(novice_vectors(adapter, plan, stats, ckpt.main_dtype), tmp / NOVICES_FILE)
        readable(tmp)  # mkdtemp made it private, safetensors its files
        tmp.rename(out)  # replaces an empty out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return "transformers" if plain else "moeviz"


def novice_vectors(adapter: Adapter, plan: PruningPlan, stats: ExpertStats | None, dtype) -> dict[str, torch.Tensor]:
    """Per MoE layer with pruned experts, "layers.<decoder layer>": the novices μ_e (P, H),
    each pruned expert's mean output (zeros for `drop`)."""
    vectors = {}
    for row, layer in enumerate(adapter.layers):
        experts = plan.pruned.get(layer.layer_idx)
        if not experts:
            continue
        if plan.mode == "novice":
            mu = stats["out_mean"][row, experts].float()  # as apply_plan takes them
        else:
            mu = torch.zeros(len(experts), layer.hidden_size)
        vectors[f"layers.{layer.layer_idx}"] = mu.to(dtype).contiguous()
    return vectors


def _write_config(src: Path, out: Path, adapter: Adapter, plain_plan: PruningPlan | None) -> None:
    """The source's config (its expert count updated for a plain checkpoint), generation config
    and tokenizer files."""
    if plain_plan is not None and plain_plan.num_pruned:
        first = adapter.layers[0]
        count = first.num_experts - len(plain_plan.pruned.get(first.layer_idx, ()))
        config = AutoConfig.from_pretrained(src)
        for key in adapter.family.num_experts_keys:
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, count)
        config.save_pretrained(out)
    else:
        shutil.copy2(src / "config.json", out / "config.json")
    for pattern in ("generation_config.json", *_TOKENIZER_FILES):
        for file in src.glob(pattern):
            shutil.copy2(file, out / file.name)


class _Rewriter:
    """What the plan does to each tensor of the source files, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, adapter: Adapter, plan: PruningPlan, stats: ExpertStats | None):
        self.ckpt, self.plan, self.stats = ckpt, plan, stats
        self.row = {layer.layer_idx: row for row, layer in enumerate(adapter.layers)}
        self.num_experts = {layer.layer_idx: layer.num_experts for layer in adapter.layers}
        self.sparse = bool(plan.sparsity or plan.nm)
        self.expert_keys: dict[tuple[int, int], dict[str, str]] = {}  # (layer, expert) → {name: key}
        self.fused: set[int] = set()  # layers whose files hold fused (E, …) tensors
        for key in ckpt.keys():
            if (ek := parse_expert_key(key, self.row)) is None:
                continue
            if ek.expert_idx is None:
                self.fused.add(ek.layer_idx)
            else:
                self.expert_keys.setdefault((ek.layer_idx, ek.expert_idx), {})[ek.name] = key
        self.routers = self._router_keys(adapter)
        self._merged: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._check_layout()

    def _router_keys(self, adapter: Adapter) -> dict[str, tuple[int, bool]]:
        """File key of every expert-indexed router tensor → (decoder layer, is it the weight)."""
        key_of = {id(t): k for k, t in file_tensors(adapter).items()}
        keys = {}
        for layer in adapter.layers:
            router = layer.router
            for t in [*router.parameters(recurse=False), *router.buffers(recurse=False)]:
                if t.dim() and t.shape[0] == layer.num_experts:
                    keys[key_of[id(t)]] = (layer.layer_idx, t is layer.router_weight)
        return keys

    def _check_layout(self) -> None:
        for layer_idx, E in self.num_experts.items():
            if not (self.plan.pruned.get(layer_idx) or self.sparse):
                continue
            per_expert = all((layer_idx, e) in self.expert_keys for e in range(E))
            if not (per_expert or layer_idx in self.fused):
                raise NotImplementedError(f"moeviz cannot find the experts of layer {layer_idx} in "
                                          f"{self.ckpt.path}'s files.")
            if layer_idx in self.fused and (self.sparse or self.plan.mode == "merge"):
                raise NotImplementedError("Merging and weight sparsity are not supported when the files "
                                          "hold fused expert tensors (GPT-OSS): export remove, novice or "
                                          "drop plans, or apply the plan in memory.")

    def write(self, out: Path, progress: Progress | None) -> None:
        """One output shard per source shard (same file name), then the index."""
        by_file: dict[Path, list[str]] = {}
        for key in self.ckpt.keys():
            by_file.setdefault(self.ckpt.file_of[key], []).append(key)
        weight_map, total_size, done = {}, 0, 0
        for file in sorted(by_file):
            tensors = {}
            for key in by_file[file]:
                if (item := self.rewrite(key)) is not None:
                    tensors[item[0]] = item[1].contiguous()
                done += 1
                if progress is not None:
                    progress(done, len(self.ckpt.file_of))
            if tensors:
                save_file(tensors, out / file.name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, file.name))
                total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            self.ckpt.close()  # unmap the shards read so far, or their pages stay resident
        index = dict(metadata=dict(total_size=total_size), weight_map=dict(sorted(weight_map.items())))
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def rewrite(self, key: str) -> tuple[str, torch.Tensor] | None:
        """(new key, tensor) for one source tensor, or None when the plan drops it."""
        if key in self.routers:
            return key, self._router(key, *self.routers[key])
        ek = parse_expert_key(key, self.row)
        if ek is None or not (self.plan.pruned.get(ek.layer_idx) or self.sparse):
            return key, self.ckpt.tensor(key)
        keep = self.plan.kept(ek.layer_idx, self.num_experts[ek.layer_idx])
        if ek.expert_idx is None:  # fused (E, …): only removal-like plans reach here
            return key, self.ckpt.tensor(key).index_select(0, torch.tensor(keep))
        if ek.expert_idx not in keep:
            return None
        if ek.expert_idx in self._groups(ek.layer_idx):
            tensor = self._merged_expert(ek.layer_idx, ek.expert_idx).pop(ek.name)
        else:
            tensor = self._sparsified(ek.layer_idx, ek.expert_idx, ek.name, self.ckpt.tensor(key))
        return ek.renumbered(keep.index(ek.expert_idx)), tensor

    def _router(self, key: str, layer_idx: int, is_weight: bool) -> torch.Tensor:
        """Router rows (or biases) of the kept experts; a survivor's row merged as apply_plan does."""
        tensor = self.ckpt.tensor(key)
        if self.plan.mode not in ("remove", "merge") or not self.plan.pruned.get(layer_idx):
            return tensor  # novices and drops: the router still routes to all E experts
        if is_weight:
            for members in self._groups(layer_idx).values():
                w = self._merge_weights(layer_idx, members)
                tensor[members[0]] = sum(wi * tensor[m].float() for wi, m in zip(w, members)).to(tensor.dtype)
        return tensor.index_select(0, torch.tensor(self.plan.kept(layer_idx, self.num_experts[layer_idx])))

    def _sparsified(self, layer_idx: int, e: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Zero the lowest |W|·‖gX‖ weights of every row (MoE-Pruner), as `apply_plan` does."""
        role = ROLES.get(name)
        if not self.sparse or role in ("gate_bias", "up_bias", "down_bias"):
            return tensor
        if role is None:
            raise NotImplementedError(f"Weight sparsity: unknown expert tensor {name!r} in layer {layer_idx}.")
        norm = self.stats["mid_sqnorm" if role == "down" else "in_sqnorm"][self.row[layer_idx], e]
        return tensor.masked_fill(pruning_mask(tensor, norm, self.plan.sparsity, self.plan.nm), 0)

    # ---- merging ------------------------------------------------------------------------
    def _groups(self, layer_idx: int) -> dict[int, list[int]]:
        """survivor → [survivor, its sources…], in apply's order (merges only)."""
        groups: dict[int, list[int]] = {}
        if self.plan.mode == "merge" and self.plan.pruned.get(layer_idx):
            for src, dst in self.plan.merge_into.get(layer_idx, {}).items():
                groups.setdefault(dst, [dst]).append(src)
        return groups

    def _merge_weights(self, layer_idx: int, members: list[int]) -> list[float]:
        w = self.stats.frequency[self.row[layer_idx]][members].float().clamp(min=1e-12)
        return (w / w.sum()).tolist()  # as apply's merge takes them

    def _merged_expert(self, layer_idx: int, dst: int) -> dict[str, torch.Tensor]:
        """The survivor's tensors {name: (out, in)}: its members' weights, neurons aligned to the
        survivor's, averaged by frequency, as `apply_plan` does. Members may sit in other shards."""
        if (layer_idx, dst) not in self._merged:
            members = self._groups(layer_idx)[dst]
            experts = {e: self._expert_weights(layer_idx, e, sparsify=e == dst) for e in members}
            for src in members[1:]:
                align_neurons(experts[dst], experts[src])
            w = self._merge_weights(layer_idx, members)
            self._merged[layer_idx, dst] = {
                name: sum(wi * getattr(experts[m], ROLES[name]) for wi, m in zip(w, members))
                .to(self.ckpt.dtype(key)) for name, key in self.expert_keys[layer_idx, dst].items()}
        return self._merged[layer_idx, dst]

    def _expert_weights(self, layer_idx: int, e: int, sparsify: bool) -> ExpertWeights:
        found = {}
        for name, key in self.expert_keys[layer_idx, e].items():
            if name not in ROLES:
                raise NotImplementedError(f"Merging: unknown expert tensor {name!r} in layer {layer_idx}.")
            tensor = self.ckpt.tensor(key)
            found[ROLES[name]] = (self._sparsified(layer_idx, e, name, tensor) if sparsify else tensor).float()
        return ExpertWeights(**{"gate": None, **found})


# ---- reloading ----------------------------------------------------------------------------
@torch.no_grad()
def load_exported(path, config=None, dtype=None, device="cpu") -> PreTrainedModel:
    """Rebuild an export from its files: the original architecture restructured by its plan
    (`moeviz_plan.json`: kept experts only, novices installed), in the checkpoint's dtype
    (or `dtype`), with no random init and no second copy. Raises if any parameter or
    persistent buffer of the model is not in the files."""
    path = Path(path)
    ckpt = Checkpoint(path)
    config = type(config).from_dict(config.to_dict()) if config is not None else AutoConfig.from_pretrained(path)  # a copy
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    config.dtype = dtype or ckpt.main_dtype
    plan = PruningPlan.load(path / PLAN_FILE) if (path / PLAN_FILE).is_file() else None
    model = skeleton(config, str(path))
    adapter = get_adapter(model)  # before any wrapping: its layers keep the inner experts
    novices = _restructure(adapter, plan)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave tied parameters separate storage
    for module in model.modules():  # rotary frequencies and the like, as from_pretrained does
        if module._non_persistent_buffers_set:
            model._init_weights(module)
    written = _fill(model, adapter, ckpt)
    if novices:
        vectors = load_file(path / NOVICES_FILE)
        for key, wrapper in novices.items():
            _copy_into(wrapper.novices, vectors[key], written)
    transient = {name for name, _ in model.named_non_persistent_buffers()}
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n not in transient)]
    missing = [name for name, t in tensors if written[id(t)] < t.numel()]
    if missing:
        raise ValueError(f"{path} does not hold {len(missing)} of the model's tensors, e.g. {missing[:3]}.")
    model._moeviz_source = str(path)
    model.name_or_path = str(path)
    return model.eval()


def _restructure(adapter: Adapter, plan: PruningPlan | None) -> dict[str, nn.Module]:
    """Cut every pruned layer (on the meta device) to its kept experts, as `apply_plan` does.
    Returns the novice wrappers, under their keys in the novices file."""
    novices = {}
    for layer in adapter.layers:
        pruned = plan.pruned.get(layer.layer_idx) if plan is not None else None
        if not pruned:
            continue
        keep = plan.kept(layer.layer_idx, layer.num_experts)
        if plan.mode in ("novice", "drop"):  # the router keeps all E rows
            install_novices(layer, keep, pruned, torch.empty(len(pruned), layer.hidden_size, device="meta"))
            novices[f"layers.{layer.layer_idx}"] = layer.block.experts
        else:
            remove_experts(layer, keep)
    return novices


def _fill(model: PreTrainedModel, adapter: Adapter, ckpt: Checkpoint) -> Counter:
    """Copy every file tensor into its place. Returns {id of a parameter or buffer: elements written}."""
    layers = {layer.layer_idx: layer for layer in adapter.layers}
    named = file_tensors(adapter)
    written = Counter()
    for key in sorted(ckpt.keys(), key=lambda k: ckpt.file_of[k]):  # file by file
        if key in named:
            target = named[key]
        elif (ek := parse_expert_key(key, layers)) is not None:
            target = expert_target(layers[ek.layer_idx], ek)
        else:
            raise ValueError(f"{ckpt.path}: {key} has no place in this {model.config.model_type} model.")
        _copy_into(target, ckpt.tensor(key), written)
    return written


def _copy_into(target: torch.Tensor, value: torch.Tensor, written: Counter) -> None:
    target.copy_(value)
    written[id(target if target._base is None else target._base)] += target.numel()


def expert_target(layer, ek: ExpertKey) -> torch.Tensor:
    if ek.expert_idx is None:  # a fused tensor in the file is the parameter itself (GPT-OSS)
        return getattr(layer.experts, ek.name)
    if ek.name not in ROLES:
        raise ValueError(f"Unknown expert tensor {ek.name!r} in layer {ek.layer_idx}.")
    return getattr(layer.expert_weights(ek.expert_idx), ROLES[ek.name])  # a view into the fused tensor
