"""A uniform view of every MoE layer of a transformers model: `Adapter` finds them.

Only this module and `moe_layer` know module paths and weight layouts. Here: the small table of
per-family overrides (`FAMILIES`), finding the decoder layers and the sparse MoE block in each
(by structure), the `Adapter` over all of them, and `check_reading`, which checks the reading
against the model itself. Each block is read by `moe_layer.MoELayer`; everything else sees that.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PreTrainedModel

from .moe_layer import Family, MoELayer


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("hunyuan_v1_moe", shared_attrs=("shared_mlp",)),
        Family("jetmoe", refused="its experts are attention heads (mixture of attention) and MLPs routed by "
                                 "one router each, not a sparse MLP block moeviz can observe"),
        Family("switch_transformers", refused="an encoder-decoder model: moeviz prunes causal LMs"),
        Family("nllb-moe", refused="an encoder-decoder model: moeviz prunes causal LMs"),
        Family("doge", refused="product-key experts of a single neuron each: there is no expert MLP to prune"),
        Family("dbrx", refused="its experts are flattened 2-D tensors (E·F, H) in a module transformers does not "
                               "route through (hidden, top_k_index, top_k_weights); moeviz does not read them yet"),
    )
}


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where the module computes: its weights' device, or accelerate's execution device when
    its weights are offloaded. For a whole model: where its inputs go (the embeddings)."""
    if isinstance(module, PreTrainedModel):
        module = module.get_input_embeddings()
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(module.parameters()).device


class Adapter:
    """All MoE layers of one model, found by structure."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        self.layers = self._find_layers()
        if not self.layers:
            raise ValueError(f"Unsupported architecture: {_arch(model.config)}: no sparse MoE block (experts "
                             "and a router with a row per expert) in its decoder layers.")

    def _find_layers(self) -> list[MoELayer]:
        found = []
        for layer_idx, decoder_layer in enumerate(decoder_layers(self.model)):
            block = _moe_block(decoder_layer)
            if block is not None:  # dense layers are skipped
                found.append(MoELayer(layer_idx, block, self.family, self.model.config))
        return found

    @property
    def layer_indices(self) -> list[int]:
        return [layer.layer_idx for layer in self.layers]

    def layer(self, layer_idx: int) -> MoELayer:
        for layer in self.layers:
            if layer.layer_idx == layer_idx:
                return layer
        raise KeyError(f"Decoder layer {layer_idx} is not a MoE layer; MoE layers: {self.layer_indices}")

    @property
    def num_experts(self) -> list[int]:
        return [layer.num_experts for layer in self.layers]

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    def summary(self) -> list[dict]:
        """One row per MoE layer: sizes and parameter counts, for tables."""
        rows = []
        for layer in self.layers:
            w = layer.expert_weights(0)
            per_expert = sum(t.numel() for t in (w.gate, w.up, w.down) if t is not None)
            shared = sum(p.numel() for m in layer.shared for p in m.parameters())
            rows.append(dict(
                layer_idx=layer.layer_idx, num_experts=layer.num_experts, top_k=layer.top_k,
                hidden_size=layer.hidden_size, intermediate_size=layer.intermediate_size,
                layout="fused" if layer.fused else "module list",
                expert_params=per_expert * layer.num_experts, shared_params=shared,
            ))
        return rows


@torch.no_grad()
def check_reading(adapter: Adapter, tokens: torch.Tensor | None = None) -> None:
    """Check moeviz's reading of every MoE block against the model itself, before trusting it.

    Runs the model once on a few probe tokens; in every MoE layer, what the experts module
    returned must equal Σ_k g_k(x) · f_{e_k}(x) rebuilt from the adapter's expert function, with
    the choices and gates the module received (f_e on each expert's input, for experts that run
    every token on gate-scaled inputs), to float tolerance for the dtype. A block that
    differs is refused in one line naming the layer, the family and by how much: moeviz never
    computes statistics or exports on a reading it has not checked.
    """
    model = adapter.model
    if any(p.is_meta for p in model.parameters()):
        return  # a skeleton: nothing to run
    layers = [layer for layer in adapter.layers if layer.fused and layer.novices is None]
    seen, hooks = {}, []
    for layer in layers:
        hooks.append(layer.experts.register_forward_hook(
            lambda module, args, out, i=layer.layer_idx: None if i in seen else seen.update({i: (args, out)})))
    if tokens is None:
        vocab = model.get_input_embeddings().weight.shape[0]
        tokens = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    try:

        model(tokens.to(execution_device(model)))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        if layer.layer_idx not in seen:
            raise ValueError(f"Unsupported architecture: {_arch(model.config)}: layer {layer.layer_idx}'s experts did "
                             "not run as (hidden, top_k_index, top_k_weights) on the probe tokens.")
        (x, *routing), out = seen[layer.layer_idx]
        if layer.gate_on_input:  # every expert on every token: (E·T, H) in, (E·T, H) out
            x, out = x.view(layer.num_experts, -1, x.shape[-1]), out.view(layer.num_experts, -1, out.shape[-1])
            mine = torch.stack([layer.expert_forward(e, x[e])[1].float() for e in range(layer.num_experts)])
        else:
            index, weights = routing[:2]
            mine = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            for e in index.unique().tolist():
                tok, k = torch.where(index == e)
                mine.index_add_(0, tok, weights[tok, k, None].float() * layer.expert_forward(e, x[tok])[1].float())
        tol = 1e-4 if out.dtype == torch.float32 else 3e-2
        err = (mine - out.float()).abs().max().item()
        if err > tol * max(1.0, out.float().abs().max().item()):
            raise ValueError(f"Unsupported architecture: {_arch(model.config)}: layer {layer.layer_idx}'s experts "
                             f"returned other values than moeviz rebuilds from their weights (max difference "
                             f"{err:.3g}): moeviz misreads this expert layout.")


def _arch(config) -> str:
    model_type = getattr(config, "model_type", None)
    return f"{(getattr(config, 'architectures', None) or [model_type])[0]} (model_type {model_type!r})"


def family_of(config) -> Family:
    """The overrides of a config's family (none for most), or a ValueError for a refused one."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type) or Family(model_type)
    if family.refused:
        raise ValueError(f"Unsupported architecture: {_arch(config)}: {family.refused}.")
    return family


def get_adapter(model: nn.Module) -> Adapter:
    return Adapter(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, wherever the model keeps them: `model.layers`, a composite model's
    `model.language_model.layers`, DBRX's `transformer.blocks`."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    count = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and name.rsplit(".", 1)[-1] in ("layers", "blocks") and not re.search(r"mtp|vision|audio|visual", name)]
    if not lists:
        raise ValueError(f"Unsupported architecture: {_arch(config) if config is not None else type(model).__name__}: "
                         "no list of decoder layers (`layers` or `blocks`), so no sparse MoE block moeviz can find.")
    exact = [(name, m) for name, m in lists if len(m) == count]
    name, layers = min(exact or lists, key=lambda nm: ("language_model" not in nm[0], -len(nm[1]), nm[0]))
    return layers


def _moe_block(decoder_layer: nn.Module) -> nn.Module | None:
    """The module of a decoder layer that holds the routed experts (the layer itself for Gemma-4)."""
    for module in (decoder_layer, *decoder_layer.children()):
        if _is_experts(getattr(module, "experts", None)):
            return module
    return None


def _is_experts(experts) -> bool:
    experts = getattr(experts, "inner", experts)  # kept experts wrapped with novices (a moeviz export)
    if isinstance(experts, nn.ModuleList):
        return len(experts) > 0 and hasattr(experts[0], "down_proj") or hasattr(experts[0] if len(experts) else None, "w2")
    down, gate_up = getattr(experts, "down_proj", None), getattr(experts, "gate_up_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3 and (
        hasattr(experts, "has_gate") or isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3)


def swap_forward(module: nn.Module, forward) -> callable:
    """Run `forward` in place of the module's own; return the function that restores it.

    Under accelerate's hooks (device_map with offloading) the hook's wrapper stays, so the
    weights still arrive on the execution device first; its inner `_old_forward` is swapped.
    """
    name = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in vars(module) else "forward"
    had, before = name in vars(module), vars(module).get(name)
    setattr(module, name, forward)

    def restore():
        if had:
            setattr(module, name, before)
        else:
            delattr(module, name)
    return restore


