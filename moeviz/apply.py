"""Applying a plan: with `moeviz.surgery` (the cuts of one layer: slicing, novices, neuron
matching, MoE-Pruner's masks), the only code that changes weights. Here: a plan checked
against the model, both ways of applying it, and the merged values.

Two ways, one set of rules:
- `applied(model, plan, stats)`: the plan in place and reversibly, on the model's own weights
  (no copy of the model, ever). Removal and drop mask the router (which equals removal);
  novices answer for pruned experts through a wrapper around the experts; merges write only
  the merged survivors; weight sparsity zeroes in place. Leaving the block puts back every
  value exactly, also when the body raises; `handle.original()` lends the unpruned model for a
  moment (evaluation compares both, batch by batch, on the same weights).
- `apply_plan(model, plan, stats)`: the same plan, for good: expert tensors are sliced, counts
  updated (the in-memory form of an export).

Modes:
- `remove`: the experts and their router rows go.
- `novice` (MoNE) / `drop`: the experts go; the router still routes to them and a routed token
  receives g_e(x)·μ_e (zeros for `drop`). A novice costs H numbers.
- `merge`: pruned experts are folded into their survivor by a frequency-weighted average of
  weights (neurons matched first) and router rows, then removed.
- weight sparsity (MoE-Pruner): zeros inside the kept experts, row by row.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import Adapter, get_adapter, swap_forward
from .checkpoint import fingerprint as model_fingerprint
from .moe_layer import ExpertWeights, MoELayer
from .plan import PlanError, PruningPlan
from .stats import ExpertStats
from .surgery import (NoviceExperts, align_neurons, install_novices, layer_masks, novices_of, remove_experts,
                      set_config_count, slice_block)


def model_info(model: PreTrainedModel, adapter: Adapter | None = None, fingerprint: str | None = None) -> dict:
    """What a plan is checked against: the model's MoE layout (and fingerprint when given)."""
    adapter = adapter or get_adapter(model)
    info = dict(layer_indices=adapter.layer_indices, num_experts=adapter.num_experts,
                top_k=adapter.top_k, group_count=adapter.layers[0].group_count)
    if fingerprint is not None:
        info["model_fingerprint"] = fingerprint
    return info


def check_plan(model: PreTrainedModel, plan: PruningPlan, stats: ExpertStats | None,
               adapter: Adapter | None = None, fingerprint: str | None = None) -> None:
    """Refuse a plan (or stats) made for another model, or a plan that needs stats it lacks."""
    fingerprint = fingerprint or model_fingerprint(model)
    plan.validate(model_info(model, adapter, fingerprint=fingerprint))
    if plan.mode in ("novice", "drop") and plan.num_pruned \
            and any(layer.gate_on_input for layer in (adapter or get_adapter(model)).layers):
        raise PlanError(f"{type(model).__name__} scales each expert's input by its gate (f(g·x), Llama-4): a novice "
                        "or a dropped expert has no form that transformers, vLLM and moeviz would run alike. "
                        "Use mode remove (or merge) for this model.")
    needs_stats = plan.mode in ("novice", "merge") or plan.sparsity or plan.nm
    if needs_stats and stats is None:
        raise PlanError(f"Applying this plan ({plan.mode}, sparsity {plan.sparsity}) needs its ExpertStats.")
    if stats is not None and stats.meta.get("model_fingerprint", fingerprint) != fingerprint:
        raise PlanError(f"These stats were calibrated on another model ({stats.meta.get('model')!r}).")


@torch.no_grad()
def apply_plan(model: PreTrainedModel, plan: PruningPlan, stats: ExpertStats | None = None) -> PreTrainedModel:
    """Prune `model` for good, in place, and return it: expert tensors sliced, counts updated.

    For a reversible view of the same plan on the same weights, use `applied`.
    """
    check_plan(model, plan, stats)
    adapter = get_adapter(model)
    for row, layer in enumerate(adapter.layers):
        if plan.sparsity or plan.nm:
            for weight, mask, _, _ in _sparsity_masks(layer, stats, row, plan):
                weight.masked_fill_(mask, 0)
        experts = plan.pruned.get(layer.layer_idx, [])
        if not experts:
            continue
        if plan.mode == "merge":
            for view, merged in _merged_tensors(layer, plan.merge_into.get(layer.layer_idx, {}), stats.frequency[row]):
                view.copy_(merged)
        keep = plan.kept(layer.layer_idx, layer.num_experts)
        if plan.mode in ("novice", "drop"):
            install_novices(layer, keep, experts, novices_of(layer, plan, stats, row, experts))
        else:
            remove_experts(layer, keep, plan.merge_into.get(layer.layer_idx))
    if plan.mode in ("remove", "merge") and plan.num_pruned and plan.is_uniform():
        set_config_count(model.config, adapter.layers[0].num_experts, plan.model["num_experts"][0])
    model.__dict__.pop("_moeviz_source", None)  # no longer the weights of those files
    return model


@contextmanager
def applied(model: PreTrainedModel, plan: PruningPlan, stats: ExpertStats | None = None,
            fingerprint: str | None = None):
    """Run `model` under `plan`, in place, without copying it; everything is put back on exit.

    Yields an `AppliedPlan`, whose `original()` context lends the unpruned model back for a
    moment. The outputs equal those of `apply_plan` (and of the exported checkpoint).
    """
    handle = AppliedPlan(model, plan, stats, fingerprint)
    try:
        handle.swap()
        yield handle
    finally:
        handle.close()


class AppliedPlan:
    """A plan's in-place edits, each an exchange of values that a second exchange undoes."""

    @torch.no_grad()
    def __init__(self, model, plan: PruningPlan, stats: ExpertStats | None = None, fingerprint: str | None = None):
        self.model, self.plan = model, plan
        self.adapter = get_adapter(model)
        check_plan(model, plan, stats, self.adapter, fingerprint)
        self.active = False
        self.edits: list = []
        for row, layer in enumerate(self.adapter.layers):
            if plan.sparsity or plan.nm:
                self.edits += _sparsity_edits(layer, stats, row, plan)
            experts = plan.pruned.get(layer.layer_idx, [])
            if not experts:
                continue
            if plan.mode == "merge":
                self.edits += [_ValueSwap(view, None, merged) for view, merged in
                               _merged_tensors(layer, plan.merge_into.get(layer.layer_idx, {}), stats.frequency[row])]
            if plan.mode in ("novice", "drop"):
                keep = plan.kept(layer.layer_idx, layer.num_experts)
                wrapper = NoviceExperts(layer.experts, keep, experts, novices_of(layer, plan, stats, row, experts),
                                        sliced=False)
                self.edits.append(_ModuleSwap(layer.block, "experts", wrapper))
            else:
                self.edits.append(_RemovalView(layer, experts, plan.merge_into.get(layer.layer_idx)))

    @torch.no_grad()
    def swap(self) -> None:
        for edit in self.edits:
            edit.swap()
        self.active = not self.active

    @contextmanager
    def original(self):
        """The model without the plan, for the duration of the block."""
        if self.active:
            self.swap()
        try:
            yield self.model
        finally:
            if not self.active:
                self.swap()

    def close(self) -> None:
        if self.active:
            self.swap()
        for edit in self.edits:
            getattr(edit, "close", lambda: None)()


class _ValueSwap:
    """Exchange the values of `tensor` (where `mask`, packed to bits, says; everywhere when None)
    with stored ones: a second exchange puts the first values back, bit for bit."""

    def __init__(self, tensor: torch.Tensor, mask: torch.Tensor | None, values: torch.Tensor):
        self.tensor, self.shape = tensor, tuple(tensor.shape)
        self.bits = None if mask is None else _pack(mask)
        count = int(mask.sum()) if mask is not None else tensor.numel()
        if values.dim() == 0:  # one value for every masked place (zeros, −inf): kept on the CPU
            values = values.to("cpu", tensor.dtype).expand(count).clone()
        self.values = values.to(tensor.dtype)

    def swap(self) -> None:
        if self.bits is None:
            current = self.tensor.clone()
            self.tensor.copy_(self.values)
        else:
            mask = _unpack(self.bits, self.shape)
            current = self.tensor[mask]
            self.tensor[mask] = self.values.to(self.tensor.device)
        # Into the buffer the stored values already have: a new one at every exchange (evaluation
        # exchanges around every batch) left freed gaps that glibc kept, 1.75x a checkpoint at peak.
        self.values.copy_(current)


def _sparsity_edits(layer: MoELayer, stats, row: int, plan: PruningPlan) -> list:
    """Zero MoE-Pruner's masked weights; the zeroed values wait on the CPU (a GPU keeps its memory)."""
    return [_ValueSwap(w, mask, torch.zeros((), dtype=w.dtype, device=w.device))
            for w, mask, _, _ in _sparsity_masks(layer, stats, row, plan)]


class _ModuleSwap:
    def __init__(self, parent: nn.Module, name: str, other: nn.Module):
        self.parent, self.name, self.other = parent, name, other

    def swap(self) -> None:
        current = getattr(self.parent, self.name)
        setattr(self.parent, self.name, self.other)
        self.other = current


class _RemovalView:
    """Removal without removing: while on, the block runs its own forward on a view of itself in
    which every expert-indexed tensor (router rows, biases, correction biases, per-expert scales)
    is sliced to the kept experts, its counts say how many, and its experts module answers for the
    kept ids with the model's own weights. That is the removed model's block, whatever its routing
    rule (groups, routed scaling, biases held by the block), and no expert weight is copied."""

    def __init__(self, layer: MoELayer, experts: list[int], merge_into: dict[int, int] | None = None):
        self.layer, self.block, self.merge_into = layer, layer.block, merge_into
        self.keep = [e for e in range(layer.num_experts) if e not in set(experts)]
        self.restore = None

    def swap(self) -> None:
        if self.restore is None:  # the view is cut when switched on: a merge has written its rows by then
            view = slice_block(self.layer, self.keep, in_place=False, merge_into=self.merge_into)
            view._modules["experts"] = _KeptExperts(self.layer, self.keep)
            self.restore = swap_forward(self.block, functools.partial(type(self.block).forward, view))
        else:
            self.restore()
            self.restore = None


class _KeptExperts(nn.Module):
    """The original experts answering for a removed model's ids 0…K-1 (the kept experts, in order)."""

    def __init__(self, layer: MoELayer, keep: list[int]):
        super().__init__()
        self.inner = layer.block.experts
        self.layer = layer if layer.gate_on_input else None
        self.num_experts = len(keep)
        self.register_buffer("keep", torch.tensor(keep), persistent=False)

    def forward(self, hidden, top_k_index=None, *args, **kwargs):
        if self.layer is not None:  # every kept expert on every token (Llama-4): (K·T, H), one expert at a time
            x = hidden.view(self.num_experts, -1, hidden.shape[-1])
            return torch.cat([self.layer.expert_forward(int(e), x[k])[1] for k, e in enumerate(self.keep)])
        keep = self.keep.to(top_k_index.device)
        return self.inner(hidden, keep[top_k_index], *args, **kwargs)

    def __getitem__(self, i):  # module-list experts
        return self.inner[int(self.keep[i])]

    def __len__(self):
        return self.num_experts


_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits (1/8 of a byte per value)."""
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return ((bits[:, None] & _BITS.to(bits.device)) > 0).reshape(-1)[:n].view(shape)


# ---- merging ----------------------------------------------------------------------------
def _merged_tensors(layer: MoELayer, merge_into: dict[int, int], frequency: torch.Tensor):
    """(view into the model, its merged value) for every survivor's weights and router row.

    Each source expert is folded into its survivor: a frequency-weighted mean of weights and
    router rows, after permuting a copy of each source's intermediate neurons to match the
    survivor's. Only the survivors change: the sources are removed (or masked) afterwards.
    """
    if not layer.fused:
        raise PlanError("Merging is supported for fused expert layouts (transformers 5 models).")
    groups: dict[int, list[int]] = {}
    for src, dst in merge_into.items():
        groups.setdefault(dst, [dst]).append(src)
    edits = []
    for dst, members in groups.items():
        target = layer.expert_weights(dst)
        weights = [target] + [_copy(layer.expert_weights(src)) for src in members[1:]]
        for expert in weights[1:]:
            align_neurons(target, expert)
        w = frequency[members].float().clamp(min=1e-12)
        w = (w / w.sum()).tolist()
        for field in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            view = getattr(target, field)
            if view is not None:
                edits.append((view, sum(wi * getattr(e, field).float() for wi, e in zip(w, weights)).to(view.dtype)))
        router = layer.router_weight
        edits.append((router[dst], sum(wi * router[m].float() for wi, m in zip(w, members)).to(router.dtype)))
    return edits


def _copy(weights: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(*(None if t is None else t.detach().clone() for t in (
        weights.gate, weights.up, weights.down, weights.gate_bias, weights.up_bias, weights.down_bias)))


# ---- weight sparsity (MoE-Pruner) ---------------------------------------------------------
def _sparsity_masks(layer: MoELayer, stats: ExpertStats, row: int, plan: PruningPlan):
    """(weight view, mask, expert, role) for the gate, up and down of every kept expert: the
    lowest |W|·‖gX‖ of each row (one expert at a time, so only one expert's scores exist at once)."""
    gone = set(plan.pruned.get(layer.layer_idx, ()))
    yield from layer_masks(layer, stats["in_sqnorm"][row], stats["mid_sqnorm"][row], plan.sparsity, plan.nm, gone)
