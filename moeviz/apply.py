"""Applying a plan: the only code that changes weights. The original model is never touched.

- `remove`: every expert-indexed parameter and buffer is sliced (fused tensors or the expert
  list, router rows, router bias, score-correction bias) and expert counts are updated.
- `novice` (MoNE) / `drop`: pruned experts' weights go; the router still routes to them and
  a routed token receives g_e(x)·μ_e (zeros for `drop`). A novice costs H numbers.
- `merge`: pruned experts are folded into their survivor by a frequency-weighted average of
  weights (neurons matched first) and router rows, then removed.
- weight sparsity (MoE-Pruner): zeros inside the kept experts, row by row.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import Adapter, MoELayer, get_adapter
from .loading import model_fingerprint
from .methods.moe_pruner import pruning_mask
from .plan import PlanError, PruningPlan
from .stats import ExpertStats

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def model_info(model: PreTrainedModel, adapter: Adapter | None = None, fingerprint: str | None = None) -> dict:
    """What a plan is checked against: the model's MoE layout (and fingerprint when given)."""
    adapter = adapter or get_adapter(model)
    info = dict(layer_indices=adapter.layer_indices, num_experts=adapter.num_experts,
                top_k=adapter.top_k, group_count=adapter.layers[0].group_count)
    if fingerprint is not None:
        info["model_fingerprint"] = fingerprint
    return info


@torch.no_grad()
def apply_plan(model: PreTrainedModel, plan: PruningPlan, stats: ExpertStats | None = None) -> PreTrainedModel:
    """A pruned copy of `model`. Novices, merges and weight sparsity need the plan's `stats`."""
    fingerprint = model_fingerprint(model)
    plan.validate(model_info(model, fingerprint=fingerprint))
    needs_stats = plan.mode in ("novice", "merge") or plan.sparsity or plan.nm
    if needs_stats and stats is None:
        raise PlanError(f"Applying this plan ({plan.mode}, sparsity {plan.sparsity}) needs its ExpertStats.")
    if stats is not None and stats.meta.get("model_fingerprint", fingerprint) != fingerprint:
        raise PlanError(f"These stats were calibrated on another model ({stats.meta.get('model')!r}).")
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    for row, layer in enumerate(adapter.layers):
        if plan.sparsity or plan.nm:
            sparsify_experts(layer, stats, row, plan)
        experts = plan.pruned.get(layer.layer_idx, [])
        if not experts:
            continue
        if plan.mode == "merge":
            merge_experts(layer, plan.merge_into.get(layer.layer_idx, {}), stats.frequency[row])
        keep = plan.kept(layer.layer_idx, layer.num_experts)
        if plan.mode in ("novice", "drop"):
            novices = torch.zeros(len(experts), layer.hidden_size, dtype=torch.float32)
            if plan.mode == "novice":
                novices = stats["out_mean"][row, experts].float()
            install_novices(layer, keep, experts, novices)
        else:
            remove_experts(layer, keep)
    if plan.mode in ("remove", "merge") and plan.num_pruned and plan.is_uniform():
        _set_count(pruned.config, adapter.layers[0].num_experts)
    return pruned


@contextmanager
def preview_plan(model: PreTrainedModel, plan: PruningPlan):
    """Run `model` as if the plan's experts were removed, without copying any weight.

    The routers' logits of pruned experts are masked to −inf (score-correction biases for
    DeepSeek-V3-style routers), which equals removal. Only `remove` plans without weight
    sparsity can be previewed. Everything is restored on exit, also on error.
    """
    if plan.mode != "remove" or plan.sparsity or plan.nm:
        raise PlanError("Only plans that remove experts (without weight sparsity) can be previewed.")
    adapter = get_adapter(model)
    plan.validate(model_info(model, adapter))
    undo = []
    try:
        for layer in adapter.layers:
            experts = plan.pruned.get(layer.layer_idx, [])
            if experts:
                undo.append(_mask_layer(layer, experts))
        yield model
    finally:
        for restore in undo:
            restore()


def _mask_layer(layer: MoELayer, experts: list[int]):
    if layer.family.routing == "biased":
        bias = layer.router.e_score_correction_bias
        saved = bias[experts].clone()
        bias[experts] = float("-inf")
        return lambda: bias.index_put_((torch.tensor(experts),), saved)
    if layer.family.routing is None:
        raise NotImplementedError(f"moeviz cannot re-route {layer.family.model_type}'s router; "
                                  "apply the plan instead of previewing it.")
    masked = torch.zeros(layer.num_experts, dtype=torch.bool, device=layer.router_weight.device)
    masked[experts] = True
    handle = layer.router.register_forward_hook(lambda m, a, out: layer.mask_router_output(out, masked))
    return handle.remove


# ---- removal ----------------------------------------------------------------------------
def remove_experts(layer: MoELayer, keep: list[int]) -> None:
    """Slice every expert-indexed tensor of `layer` to the experts in `keep`."""
    idx = torch.tensor(keep, device=layer.router_weight.device)
    if layer.fused:
        for name, param in list(layer.experts.named_parameters(recurse=False)):
            setattr(layer.experts, name, nn.Parameter(param.index_select(0, idx), requires_grad=False))
    else:
        layer.experts = layer.block.experts = nn.ModuleList(layer.experts[i] for i in keep)
    _slice_router(layer.router, idx)
    for module in (layer.block, layer.router, layer.experts):
        _set_count(module, len(keep))


def _slice_router(router: nn.Module, idx: torch.Tensor) -> None:
    router.weight = nn.Parameter(router.weight.index_select(0, idx), requires_grad=False)
    if isinstance(router, nn.Linear):
        router.out_features = len(idx)
    bias = getattr(router, "bias", None)
    if isinstance(bias, torch.Tensor):
        router.bias = nn.Parameter(bias.index_select(0, idx), requires_grad=False)
    corr = getattr(router, "e_score_correction_bias", None)
    if isinstance(corr, torch.Tensor):
        router.e_score_correction_bias = corr.index_select(0, idx)


def _set_count(obj, count: int) -> None:
    for attr in _COUNT_ATTRS:
        if isinstance(getattr(obj, attr, None), int):
            setattr(obj, attr, count)


# ---- novices ----------------------------------------------------------------------------
class NoviceExperts(nn.Module):
    """Kept experts plus novices: a token routed to pruned expert e receives g_e(x)·μ_e.

    Wraps the (sliced) experts module; routing still runs over all E original experts.
    """

    def __init__(self, inner: nn.Module, keep: list[int], pruned: list[int], novices: torch.Tensor):
        super().__init__()
        E = len(keep) + len(pruned)
        self.inner = inner
        self.num_experts = E
        to_inner = torch.full((E,), -1, dtype=torch.long)
        to_inner[keep] = torch.arange(len(keep))
        to_novice = torch.full((E,), -1, dtype=torch.long)
        to_novice[pruned] = torch.arange(len(pruned))
        self.register_buffer("to_inner", to_inner)
        self.register_buffer("to_novice", to_novice)
        self.novices = nn.Parameter(novices.clone(), requires_grad=False)  # (P, H)

    def forward(self, hidden, top_k_index, top_k_weights):
        inner_idx = self.to_inner[top_k_index]  # (T, k)
        is_novice = inner_idx < 0
        out = self.inner(hidden, inner_idx.clamp(min=0), top_k_weights.masked_fill(is_novice, 0))
        novice_w = top_k_weights.masked_fill(~is_novice, 0).to(self.novices.dtype)  # (T, k)
        novice_out = self.novices[self.to_novice[top_k_index].clamp(min=0)]  # (T, k, H)
        return out + (novice_w[..., None] * novice_out).sum(1).to(out.dtype)


def install_novices(layer: MoELayer, keep: list[int], pruned: list[int], novices: torch.Tensor) -> None:
    if not layer.fused:
        raise PlanError("Novices are supported for fused expert layouts (transformers 5 models).")
    device, dtype = layer.router_weight.device, layer.experts.down_proj.dtype
    idx = torch.tensor(keep, device=device)
    for name, param in list(layer.experts.named_parameters(recurse=False)):
        setattr(layer.experts, name, nn.Parameter(param.index_select(0, idx), requires_grad=False))
    _set_count(layer.experts, len(keep))
    layer.block.experts = NoviceExperts(layer.experts, keep, pruned, novices.to(device, dtype))


# ---- merging ----------------------------------------------------------------------------
def merge_experts(layer: MoELayer, merge_into: dict[int, int], frequency: torch.Tensor) -> None:
    """Fold each source expert into its survivor: frequency-weighted mean of weights and router
    rows, after permuting each source's intermediate neurons to match the survivor's."""
    groups: dict[int, list[int]] = {}
    for src, dst in merge_into.items():
        groups.setdefault(dst, [dst]).append(src)
    for dst, members in groups.items():
        for src in members[1:]:
            align_neurons(layer.expert_weights(dst), layer.expert_weights(src))
        w = frequency[members].float().clamp(min=1e-12)
        w = (w / w.sum()).to(layer.router_weight.device)
        for name, tensor in _expert_tensors(layer):
            tensor[dst] = sum(wi * tensor[m] for wi, m in zip(w, members))
        router = layer.router_weight
        router[dst] = sum(wi * router[m] for wi, m in zip(w, members))


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


def _expert_tensors(layer: MoELayer):
    """(name, tensor indexed by expert) for a fused layout."""
    if not layer.fused:
        raise PlanError("Merging is supported for fused expert layouts (transformers 5 models).")
    return [(n, p.data) for n, p in layer.experts.named_parameters(recurse=False)]


# ---- weight sparsity (MoE-Pruner) ---------------------------------------------------------
def sparsify_experts(layer: MoELayer, stats: ExpertStats, row: int, plan: PruningPlan) -> None:
    """Zero the lowest |W|·‖gX‖ weights of each row of every kept expert's gate, up and down."""
    gone = set(plan.pruned.get(layer.layer_idx, ()))
    for e in range(layer.num_experts):
        if e in gone:
            continue
        w = layer.expert_weights(e)  # views into the model's tensors
        in_norm, mid_norm = stats["in_sqnorm"][row, e], stats["mid_sqnorm"][row, e]
        for weight, norm in ((w.gate, in_norm), (w.up, in_norm), (w.down, mid_norm)):
            if weight is not None:
                weight.masked_fill_(pruning_mask(weight, norm.to(weight.device), plan.sparsity, plan.nm), 0)


# ---- export -----------------------------------------------------------------------------
PLAN_FILE = "moeviz_plan.json"


def export_model(model: PreTrainedModel, plan: PruningPlan, out_dir, tokenizer=None) -> str:
    """Write a pruned model. Returns "transformers" or "moeviz": how it reloads.

    A plan that removes the same number of experts from every layer, without novices, is a
    plain transformers checkpoint (config's expert count updated). Anything else (novices,
    uneven counts) is the original config, the pruned weights and the plan; it reloads
    through `moeviz.load_model`.
    """
    from pathlib import Path

    from safetensors.torch import save_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory.")
    out.mkdir(parents=True, exist_ok=True)
    plain = plan.mode in ("remove", "merge") and plan.is_uniform()
    if plain:
        model.save_pretrained(out)
    else:
        model.config.save_pretrained(out)
        save_model(model, str(out / "model.safetensors"))
        plan.save(out / PLAN_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return "transformers" if plain else "moeviz"


@torch.no_grad()
def load_exported(path, config, dtype=None) -> PreTrainedModel:
    """Rebuild a moeviz-format export: the original architecture, restructured by its plan."""
    from pathlib import Path

    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    plan = PruningPlan.load(Path(path) / PLAN_FILE)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    for layer in adapter.layers:
        experts = plan.pruned.get(layer.layer_idx, [])
        if not experts:
            continue
        keep = plan.kept(layer.layer_idx, layer.num_experts)
        if plan.mode in ("novice", "drop"):
            install_novices(layer, keep, experts, torch.zeros(len(experts), layer.hidden_size))
        else:
            remove_experts(layer, keep)
    load_model(model, str(Path(path) / "model.safetensors"), strict=True)
    return model.eval()
