"""Cutting one MoE layer's weights for good, and the pieces an export reuses.

Removal slices every expert-indexed tensor of a block (router rows, biases, per-expert scales,
tables of expert ids renumbered) and says the new count wherever the modules and the config
keep it; `slice_block` also makes a view that leaves the model as it is (what `apply.applied`
runs). Novices (MoNE) answer for pruned experts with one constant vector each (`NoviceExperts`).
Merges match neurons before averaging (`align_neurons`); weight sparsity zeroes MoE-Pruner's
masks (`layer_masks`). With `moeviz.apply`, the only code that changes weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .methods.moe_pruner import pruning_mask
from .moe_layer import MoELayer
from .plan import PlanError, PruningPlan

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                "n_experts", "expert_num", "n_total_experts", "num_router_classes")


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
            module.config = type(module.config).from_dict(module.config.to_dict())  # its own copy
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
