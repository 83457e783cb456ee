"""Applying a plan: the only code that changes weights.

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

import copy
import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .adapters import Adapter, get_adapter, swap_forward
from .moe_layer import ExpertWeights, MoELayer
from .checkpoint import fingerprint as model_fingerprint
from .methods.moe_pruner import pruning_mask
from .plan import PlanError, PruningPlan
from .stats import ExpertStats

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                "n_experts", "expert_num", "n_total_experts", "num_router_classes")


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


def novices_of(layer: MoELayer, plan: PruningPlan, stats, row: int, experts: list[int], dtype=None) -> torch.Tensor:
    """(P, H): MoNE's novices, the pruned experts' mean outputs; zeros for `drop`. In the experts'
    dtype (or `dtype`), as an export stores them: the plan in place gives the exported model's outputs."""
    dtype = dtype or layer.expert_weights(0).down.dtype
    if plan.mode == "novice":
        return stats["out_mean"][row, experts].float().to(dtype)
    return torch.zeros(len(experts), layer.hidden_size, dtype=dtype)


# ---- removal ----------------------------------------------------------------------------
def remove_experts(layer: MoELayer, keep: list[int], merge_into: dict[int, int] | None = None) -> None:
    """Slice every expert-indexed tensor of `layer` to the experts in `keep`, for good (a hash
    routing table sends a removed expert's tokens where `merge_into` says, if it says)."""
    E = layer.num_experts
    slice_block(layer, keep, in_place=True, merge_into=merge_into)
    idx = torch.tensor(keep, device=layer.router_weight.device)
    if layer.fused:
        for name, param in list(layer.experts.named_parameters(recurse=False)):
            setattr(layer.experts, name, nn.Parameter(param.index_select(0, idx.to(param.device)), requires_grad=False))
        _set_count(layer.experts, len(keep), E)
    else:
        layer.experts = layer.block.experts = nn.ModuleList(layer.experts[i] for i in keep)


def renumber_ids(table: torch.Tensor, keep: list[int], router: torch.Tensor,
                 merge_into: dict[int, int] | None = None) -> torch.Tensor:
    """A table of expert ids (hash routing's token → k experts) in the removed model's numbering.
    A slot of a removed expert goes to the expert it was merged into, or else to the kept expert
    whose router row is closest to its own (cosine) among those the row does not hold already."""
    E = router.shape[0]
    new_id = torch.full((E,), -1, dtype=table.dtype, device=table.device)
    new_id[keep] = torch.arange(len(keep), dtype=table.dtype, device=table.device)
    out = new_id[table]
    w = F.normalize(router.float(), dim=-1)
    for e in sorted(set(range(E)) - set(keep)):
        candidates = [merge_into[e]] if merge_into and e in merge_into else []
        candidates += [keep[i] for i in (w[keep] @ w[e]).argsort(descending=True).tolist()]
        for c in candidates:
            slot = (table == e) & (out < 0) & ~(out == new_id[c]).any(dim=1, keepdim=True)
            out[slot] = new_id[c]
    return out.masked_fill(out < 0, int(new_id[keep[0]]))  # only if every kept expert is in the row already


def slice_block(layer: MoELayer, keep: list[int], in_place: bool,
                merge_into: dict[int, int] | None = None) -> nn.Module:
    """The layer's block with its expert-indexed tensors outside the experts (`MoELayer.indexed_tensors`)
    cut to `keep`, and every expert count on the way said anew. `in_place=False` leaves the model
    as it is and returns a view: a shallow copy of the block (and of the modules between it and each
    sliced tensor) sharing every other tensor and module with the model."""
    E, count = layer.num_experts, len(keep)
    root = layer.block if in_place else _shallow(layer.block)
    touched = {id(root): root}
    tables = [(name, t, None) for name, t in layer.id_tables()]
    router = layer.router_weight[:E] if tables else None  # before it is sliced
    for name, t, dim in layer.indexed_tensors() + tables:
        if dim is None and t.is_meta:
            continue  # a skeleton's table keeps its shape: its values come from the files
        *path, attr = name.split(".")
        owner = root
        for part in path:
            child = owner._modules[part]
            if not in_place and id(child) not in touched:
                child = owner._modules[part] = _shallow(child)
            owner = child
            touched[id(owner)] = owner
        if dim is None:  # a table of expert ids
            sliced = renumber_ids(t, keep, router, merge_into)
        else:
            sliced = t.detach().index_select(dim, torch.tensor(layer.kept_rows(keep, t.shape[dim]), device=t.device))
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(sliced, requires_grad=False)
        else:
            owner._buffers[attr] = sliced
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features = sliced.shape[0]
    router = root._modules.get(layer.router_name)
    if not in_place and router is not None and router is not layer.router:
        router._moeviz_keep = keep  # the view's router names the kept experts by position (for trace)
    for module in touched.values():
        _set_count(module, count, E)
        if layer.extra_classes:  # LongCat's router counts its zero experts with the routed ones
            _set_count(module, count + layer.extra_classes, E + layer.extra_classes)
        if not in_place and getattr(module, "config", None) is not None:  # ZAYA's router reads the count there
            module.config = copy.deepcopy(module.config)  # a config: a few hundred bytes, no weights
            set_config_count(module.config, count, E)
    return root


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of the module object whose own tensors and children can be replaced without touching
    the original; the tensors themselves are shared."""
    copy_ = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(copy_, attr, dict(getattr(module, attr)))
    return copy_


def set_config_count(config, count: int, old: int) -> None:
    """Say `count` routed experts wherever a config (object or dict, nested text and FFN configs
    included) says `old`."""
    items = config.items() if isinstance(config, dict) else list(vars(config).items())
    for key, value in items:
        if key in _COUNT_ATTRS and value == old and isinstance(value, int) and not isinstance(value, bool):
            if isinstance(config, dict):
                config[key] = count
            else:
                setattr(config, key, count)
        elif isinstance(value, dict) or hasattr(value, "to_dict") and key.endswith("config"):
            set_config_count(value, count, old)


def _set_count(obj, count: int, old: int | None = None) -> None:
    """Say `count` experts wherever `obj` keeps its expert count (an int attribute naming experts,
    equal to `old` when given)."""
    for attr, value in list(vars(obj).items()):
        if isinstance(value, int) and not isinstance(value, bool) and attr in _COUNT_ATTRS \
                and (old is None or value == old):
            setattr(obj, attr, count)


# ---- novices ----------------------------------------------------------------------------
class NoviceExperts(nn.Module):
    """Experts plus novices: a token routed to pruned expert e receives g_e(x)·μ_e.

    Wraps the experts module `inner`; routing still runs over all E original experts. With
    `sliced=True` (an applied or exported plan) `inner` holds only the kept experts, in order;
    with `sliced=False` (an in-place view) it still holds all E and the pruned ones get weight 0.
    """

    def __init__(self, inner: nn.Module, keep: list[int], pruned: list[int], novices: torch.Tensor,
                 sliced: bool = True):
        super().__init__()
        self.inner = inner
        self.num_experts = len(keep) + len(pruned)
        self.keep, self.pruned, self.sliced = list(keep), list(pruned), sliced
        self.novices = nn.Parameter(novices.clone(), requires_grad=False)  # (P, H)
        self._index = None

    def index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Original expert → its index in `inner` (−1 if pruned), and → its novice (−1 if kept)."""
        if self._index is None or self._index[0].device != torch.device(device):
            to_inner = torch.full((self.num_experts,), -1, dtype=torch.long)
            to_inner[self.keep] = torch.arange(len(self.keep)) if self.sliced else torch.tensor(self.keep)
            to_novice = torch.full((self.num_experts,), -1, dtype=torch.long)
            to_novice[self.pruned] = torch.arange(len(self.pruned))
            self._index = (to_inner.to(device), to_novice.to(device))
        return self._index

    def forward(self, hidden, top_k_index, top_k_weights):
        to_inner, to_novice = self.index(top_k_index.device)
        inner_idx = to_inner[top_k_index]  # (T, k)
        is_novice = inner_idx < 0
        out = self.inner(hidden, inner_idx.clamp(min=0), top_k_weights.masked_fill(is_novice, 0))
        novice_w = top_k_weights.masked_fill(~is_novice, 0).to(self.novices.dtype)  # (T, k)
        novice_out = self.novices[to_novice[top_k_index].clamp(min=0)]  # (T, k, H)
        return out + (novice_w[..., None] * novice_out).sum(1).to(out.dtype)


def install_novices(layer: MoELayer, keep: list[int], pruned: list[int], novices: torch.Tensor) -> None:
    """Slice the layer's experts to `keep` and answer for `pruned` with novices (P, H), for good."""
    if not layer.fused:
        raise PlanError("Novices are supported for fused expert layouts (transformers 5 models).")
    device, dtype = layer.router_weight.device, layer.experts.down_proj.dtype
    idx = torch.tensor(keep, device=device)
    for name, param in list(layer.experts.named_parameters(recurse=False)):
        setattr(layer.experts, name, nn.Parameter(param.index_select(0, idx), requires_grad=False))
    _set_count(layer.experts, len(keep))
    layer.block.experts = NoviceExperts(layer.experts, keep, pruned, novices.to(device, dtype))


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


@torch.no_grad()
def align_neurons(reference, expert) -> None:
    """Permute `expert`'s intermediate neurons, in place, to best match `reference`'s.

    An expert is unchanged by any permutation of its intermediate neurons, so two experts'
    weights can only be averaged once their neurons are matched (as MC-SMoE does): neuron i
    is described by its gate and up rows and its down column; the matching maximises the
    summed cosine similarity (Hungarian algorithm, SciPy).
    """
    from scipy.optimize import linear_sum_assignment

    def neurons(w):  # (I, D)
        parts = [w.gate, w.up, w.down.T] + [b[:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
        return torch.nn.functional.normalize(torch.cat([p for p in parts if p is not None], 1).float(), dim=1)

    sim = (neurons(reference) @ neurons(expert).T).cpu().numpy()
    perm = torch.as_tensor(linear_sum_assignment(sim, maximize=True)[1], device=expert.up.device)
    for rows in (expert.gate, expert.up, expert.gate_bias, expert.up_bias):
        if rows is not None:
            rows.copy_(rows[perm].clone())
    expert.down.copy_(expert.down[:, perm].clone())


# ---- weight sparsity (MoE-Pruner) ---------------------------------------------------------
def _sparsity_masks(layer: MoELayer, stats: ExpertStats, row: int, plan: PruningPlan):
    """(weight view, mask, expert, role) for the gate, up and down of every kept expert: the
    lowest |W|·‖gX‖ of each row (one expert at a time, so only one expert's scores exist at once)."""
    gone = set(plan.pruned.get(layer.layer_idx, ()))
    yield from layer_masks(layer, stats["in_sqnorm"][row], stats["mid_sqnorm"][row], plan.sparsity, plan.nm, gone)


def layer_masks(layer: MoELayer, in_sqnorm: torch.Tensor, mid_sqnorm: torch.Tensor, sparsity: float,
                nm: tuple[int, int] | None = None, skip=()):
    """MoE-Pruner's masks of one layer from its sums Σ(g·x)² (E, H) and Σ(g·mid)² (E, I)."""
    for e in range(layer.num_experts):
        if e in skip:
            continue
        w = layer.expert_weights(e)  # views into the model's tensors
        for role, weight, norm in (("gate", w.gate, in_sqnorm[e]), ("up", w.up, in_sqnorm[e]), ("down", w.down, mid_sqnorm[e])):
            if weight is not None:
                yield weight, pruning_mask(weight, norm.to(weight.device), sparsity, nm), e, role


@torch.no_grad()
def sparsify_layer(layer: MoELayer, sums: dict, sparsity: float, nm: tuple[int, int] | None = None) -> None:
    """Zero MoE-Pruner's masks in one layer for good, from its observer sums (sequential mode)."""
    for weight, mask, _, _ in layer_masks(layer, sums["in_sqnorm"], sums["mid_sqnorm"], sparsity, nm):
        weight.masked_fill_(mask, 0)
