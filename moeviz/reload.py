"""Loading the checkpoints an export writes that stock transformers cannot: expert
substitution (moeviz's, or another tool's: `compression_config.transform_config.
expert_substitution` version 1, or vLLM's older `approximate_experts`) and moeviz-only.

`load_exported` builds the original architecture on the meta device, restructures it by the
layout the files describe (kept experts only, novices installed), materialises it once and fills
it tensor by tensor from the files: no random init, no second copy. FP8 weights are dequantized
to the model's dtype; tensors that transformers converts on load (fused, interleaved) go through
its own converters, as `from_pretrained` would. `ExportLayout` also maps a trained model back onto
those files (recovery).
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import Adapter, get_adapter
from .building import skeleton
from .checkpoint import (MOEVIZ_MODEL_TYPE, ROLES, Checkpoint, ExpertKey, dequantize, parse_expert_key, read_config,
                         scale_key)
from .plan import PLAN_FILE, PruningPlan
from .surgery import install_novices, remove_experts

# tensors beside a quantized weight that the weight consumes, or that only a quantized kernel reads
# (static activation scales, zero points): a dequantized model has no place for them
QUANT_SIDECARS = ("_scale_inv", "weight_scale", "input_scale", "k_scale", "v_scale", "weight_zero_point",
                  "weight_global_scale", "input_global_scale")
ROUTER_SEMANTICS = dict(preserve_logical_expert_ids=True, preserve_router_weights=True,
                        renormalize_after_substitution=False)  # the only semantics version 1 defines


def file_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The model's tensors other than routed experts, under the names its files give them
    (as `save_pretrained` writes them; the same tensor objects, renamed)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = adapter.model
    experts = {id(p) for layer in adapter.layers for p in layer.block.experts.parameters()}  # with novices
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in experts}
    return revert_weight_conversion(model, state)


def expert_file_tensors(adapter: Adapter) -> dict[str, tuple[int, torch.Tensor]]:
    """The routed experts' tensors under the names their files give them (as `save_pretrained`
    writes them: Granite-MoE's `input_linear.weight`, Aria's `experts.fc1.weight`, Mixtral's
    per-expert keys): file key → (decoder layer, tensor). The tensor is the model's own where
    saving only renames it, a new one where saving converts it."""
    from transformers.core_model_loading import revert_weight_conversion

    model = adapter.model
    name_of = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    found = {}
    for layer in adapter.layers:
        own = {name_of[id(t)].replace(".experts.inner.", ".experts."): t  # without moeviz's novice wrapper
               for t in layer.experts.state_dict(keep_vars=True).values() if id(t) in name_of}
        found.update({key: (layer.layer_idx, t) for key, t in revert_weight_conversion(model, own).items()})
    return found


# ---- the expert-substitution block --------------------------------------------------------
def substitution_block(config) -> dict | None:
    """`compression_config.transform_config.expert_substitution` of a config (object or dict)."""
    block = config.get("compression_config") if isinstance(config, dict) else getattr(config, "compression_config", None)
    return ((block or {}).get("transform_config") or {}).get("expert_substitution")


def read_substitution(config) -> dict[int, tuple[int | None, dict[int, str]]]:
    """{decoder layer: (logical expert count, {substituted expert: its constant's tensor name})}
    of an expert-substitution config (version 1, whoever wrote it), or of vLLM's older
    `approximate_experts` form (constants named `….experts.<e>.approx_value`, an empty name
    here; no count). Anything else is refused."""
    block = substitution_block(config)
    if block is None:
        approximate = (config.get("approximate_experts") if isinstance(config, dict)
                       else getattr(config, "approximate_experts", None))
        return {int(layer): (None, {int(e): "" for e in experts}) for layer, experts in (approximate or {}).items()}
    if block.get("version") != 1:
        raise ValueError(f"Unsupported expert substitution version {block.get('version')!r}: moeviz reads version 1.")
    if block.get("router_semantics") != ROUTER_SEMANTICS:
        raise ValueError(f"Unsupported expert substitution router semantics {block.get('router_semantics')!r}.")
    found = {}
    for path, target in (block.get("targets") or {}).items():
        layers = re.findall(r"(?:^|\.)layers\.(\d+)\.", path)
        if len(layers) != 1:
            raise ValueError(f"Expert substitution target {path!r} must name exactly one decoder layer.")
        if target.get("weight_layout") != "compact_retained_experts":
            raise ValueError(f"Unsupported expert substitution weight layout {target.get('weight_layout')!r}.")
        values = {}
        for e, replacement in (target.get("replacements") or {}).items():
            if replacement.get("format") != "constant-v1" or set(replacement.get("tensors") or {}) != {"value"}:
                raise ValueError(f"Unsupported expert substitution for expert {e} of {path!r}: {replacement!r}.")
            values[int(e)] = replacement["tensors"]["value"]
        found[int(layers[0])] = (target.get("num_logical_experts"), values)
    return found


def _part(key: str) -> str:
    """The first two parts of a tensor name (`model.visual`, `model.language_model`)."""
    return ".".join(key.split(".")[:2])


# ---- reloading ----------------------------------------------------------------------------
def is_pruned_export(path) -> bool:
    """Whether a checkpoint directory needs `load_exported` (substitution or moeviz-only)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    config = json.loads(file.read_text())
    return (config.get("model_type") == MOEVIZ_MODEL_TYPE or substitution_block(config) is not None
            or bool(config.get("approximate_experts")))


@torch.no_grad()
def load_exported(path, config=None, dtype=None, device="cpu") -> PreTrainedModel:
    """Rebuild an expert-substitution or moeviz-only checkpoint from its files: the original
    architecture restructured by its layout (kept experts only, novices installed), in the
    checkpoint's dtype (or `dtype`), with no random init and no second copy. FP8 weights are
    dequantized to that dtype. Raises if any parameter or persistent buffer of the model is
    not in the files, or a file tensor has no place in it (tensors of parts the causal LM does
    not hold, a composite checkpoint's vision tower, are left unread)."""
    path = Path(path)
    ckpt = Checkpoint(path)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    layout, adapter = meta_model(path, ckpt, config, dtype)
    model = adapter.model
    layout.restructure(adapter)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave tied parameters separate storage
    for module in model.modules():  # rotary frequencies and the like, as from_pretrained does
        if module._non_persistent_buffers_set:
            model._init_weights(module)
    layout.bind(adapter)
    written = Counter()
    for key in sorted(ckpt.keys(), key=lambda k: ckpt.file_of[k]):  # file by file
        for target, value in layout.fill(ckpt, key):
            _copy_into(target, value, written)
    if missing := unfilled(model, written):
        raise ValueError(f"{path} does not hold {len(missing)} of the model's tensors, e.g. {missing[:3]}.")
    model._moeviz_source = str(path)
    model.name_or_path = str(path)
    return model.eval()


def meta_model(path: Path, ckpt: Checkpoint, config=None, dtype=None) -> tuple[ExportLayout, Adapter]:
    """The export's layout and its original architecture on the meta device, not yet cut: a copy
    of the config in `dtype` (or the checkpoint's), without its quantization and substitution
    blocks (weights are dequantized, novices installed). The adapter is made before any wrapping,
    so that its layers keep the inner experts."""
    config = config if config is not None else read_config(path)
    config = type(config).from_dict(config.to_dict())  # a copy
    config.dtype = dtype or ckpt.main_dtype
    layout = ExportLayout(path, config)
    for attr in ("quantization_config", "compression_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    return layout, get_adapter(skeleton(config, str(path), ckpt.keys()))


def unfilled(model: PreTrainedModel, written: Counter) -> list[str]:
    """The model's parameters and persistent buffers that the files did not fill whole (`written`:
    elements copied, by the id of each tensor)."""
    transient = {name for name, _ in model.named_non_persistent_buffers()}
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n not in transient)]
    return [name for name, t in tensors if written[id(t)] < t.numel()]


class ExportLayout:
    """Where each tensor of a pruned checkpoint's files goes in the restructured model: kept
    experts (renumbered 0…K-1 in a moeviz-only export, under their logical ids in an expert
    substitution), constants, and everything else under its usual name. A file tensor that
    transformers converts on load (Lara's fused `in_proj`, Inkling-2's interleaved `w13_weight`)
    goes through transformers' own converter, once the converter has all its file tensors."""

    def __init__(self, path: Path, config):
        self.path = path
        self.substituted = read_substitution(config)  # layer → (logical count, {expert: value name})
        quantization = getattr(config, "quantization_config", None) or {}
        self.block = (quantization.get("weight_block_size") if isinstance(quantization, dict)
                      else getattr(quantization, "weight_block_size", None))
        plan_file = path / PLAN_FILE
        self.plan = PruningPlan.load(plan_file) if not self.substituted and plan_file.is_file() else None

    def restructure(self, adapter: Adapter) -> None:
        """Cut every pruned layer (on the meta device) to its kept experts, as `apply_plan` does."""
        for layer in adapter.layers:
            if layer.layer_idx in self.substituted:
                logical, values = self.substituted[layer.layer_idx]
                if logical not in (None, layer.num_experts):
                    raise ValueError(f"{self.path}: layer {layer.layer_idx} has {layer.num_experts} experts, its "
                                     f"expert substitution says {logical}.")
                pruned = sorted(values)
                keep = [e for e in range(layer.num_experts) if e not in values]
                install_novices(layer, keep, pruned, torch.empty(len(pruned), layer.hidden_size, device="meta"))
            elif self.plan is not None and self.plan.pruned.get(layer.layer_idx):
                remove_experts(layer, self.plan.kept(layer.layer_idx, layer.num_experts))

    def bind(self, adapter: Adapter) -> None:
        """Map the files' keys onto a model already restructured by this layout (and materialised)."""
        self.adapter = adapter
        self.layers = {layer.layer_idx: layer for layer in adapter.layers}
        self.named = file_tensors(adapter)
        self.parts = {_part(name) for name in self.named}  # `model.language_model`, `lm_head`: what the model holds
        kept = {id(t) for layer in adapter.layers for t in layer.experts.parameters()}
        for key, (_, t) in expert_file_tensors(adapter).items():
            ek = parse_expert_key(key, self.layers)
            if id(t) in kept or ek is None or ek.expert_idx is None:  # not one expert's: those go by logical id
                self.named[key] = t
        self._bind_conversions(adapter.model)
        self.physical: dict[int, dict[int, int]] = {}  # layer → {logical expert: index among the kept}
        self.values: dict[str, tuple[nn.Module, int]] = {}  # constant's name → (its novice wrapper, row)
        for layer_idx, (_, values) in self.substituted.items():
            wrapper = self.layers[layer_idx].block.experts
            self.physical[layer_idx] = {e: i for i, e in enumerate(wrapper.keep)}
            self.values.update({values[e] or f"{layer_idx}:{e}": (wrapper, row) for row, e in enumerate(wrapper.pruned)})

    def _bind_conversions(self, model: PreTrainedModel) -> None:
        """The file keys that saving converts rather than renames (`named` holds a new tensor for
        them, right for saving and useless to fill): each → the converter `from_pretrained` would
        apply to it, found as transformers finds it, and the first model tensor it makes."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        self.tensors = {n.replace(".experts.inner.", ".experts."): t  # transformers' names, without the novice wrapper
                        for n, t in model.state_dict(keep_vars=True).items()}
        own = {id(t) for t in self.tensors.values()}
        self.converted: dict[str, tuple[str, str]] = {}  # file key → (first model tensor, converter's pattern)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # first model tensor → {file key: tensor} read
        if all(id(t) in own for t in self.named.values()):
            return
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if not isinstance(t, WeightRenaming)]
        self.converters = {pattern: c for c in converters for pattern in c.source_patterns}
        for key in (k for k, t in self.named.items() if id(t) not in own):
            first, pattern = rename_source_key(key, renamings, converters)
            if pattern is None or first not in self.tensors:
                raise ValueError(f"{self.path}: transformers converts {key} on load in a way moeviz cannot follow.")
            self.converted[key] = first, pattern

    def fill(self, ckpt: Checkpoint, key: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(model tensor or view, value) for each tensor a file key fills: one, none for a scale,
        or, for a converted key, none until its converter's last file tensor, then all it makes."""
        from transformers.core_model_loading import dot_natural_key

        if key not in self.converted:
            target = self.target(key)
            return [] if target is None else [(target, self.value(ckpt, key, target.dtype))]
        first, _ = self.converted[key]
        read = self.pending.setdefault(first, {})
        read[key] = self.value(ckpt, key, self.tensors[first].dtype)
        if len(read) < sum(f == first for f, _ in self.converted.values()):
            return []
        converter = copy.deepcopy(self.converters[self.converted[key][1]])
        for k in sorted(self.pending.pop(first), key=dot_natural_key):  # in the order transformers collects them
            converter.add_tensor(first, k, self.converted[k][1], read[k])
        model = self.adapter.model
        made = converter.convert(first, model=model, config=model.config)
        return [(self.tensors[name], t[0] if isinstance(t, list) else t) for name, t in made.items()]

    def target(self, key: str) -> torch.Tensor | None:
        """The model tensor (or view) a file key fills; None for a quantization scale (consumed
        with its weight) or a part the causal LM does not hold. For a converted key, the tensor
        saving writes there (for recovery)."""
        if key in self.named:
            return self.named[key]
        ek = parse_expert_key(key, self.layers)
        if ek is not None and ek.name == "approx_value":
            key = f"{ek.layer_idx}:{ek.expert_idx}"
        if key in self.values:
            wrapper, row = self.values[key]
            return wrapper.novices[row]
        if key.endswith(QUANT_SIDECARS):
            return None
        if ek is None:
            if _part(key) not in self.parts:
                return None  # a part of a composite checkpoint that its causal LM does not hold: a vision tower
            raise ValueError(f"{self.path}: {key} has no place in this {self.adapter.model.config.model_type} model.")
        if ek.layer_idx in self.physical and ek.expert_idx is not None:
            if ek.expert_idx not in self.physical[ek.layer_idx]:
                raise ValueError(f"{self.path}: {key} is an expert its expert substitution replaces.")
            ek = ek._replace(expert_idx=self.physical[ek.layer_idx][ek.expert_idx])
        return expert_target(self.layers[ek.layer_idx], ek)

    def value(self, ckpt: Checkpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The file tensor for `key`, dequantized to `dtype` when it is FP8 with a scale beside it."""
        tensor = ckpt.tensor(key)
        scale = scale_key(ckpt, key)
        return dequantize(tensor, ckpt.tensor(scale), dtype, self.block) if scale is not None else tensor


def _copy_into(target: torch.Tensor, value: torch.Tensor, written: Counter) -> None:
    target.copy_(value)
    written[id(target if target._base is None else target._base)] += target.numel()


def expert_target(layer, ek: ExpertKey) -> torch.Tensor:
    if ek.expert_idx is None:  # a fused tensor in the file is the parameter itself (GPT-OSS)
        return getattr(layer.experts, ek.name)
    if ek.name not in ROLES:
        raise ValueError(f"Unknown expert tensor {ek.name!r} in layer {ek.layer_idx}.")
    return getattr(layer.expert_weights(ek.expert_idx), ROLES[ek.name])  # a view into the fused tensor
