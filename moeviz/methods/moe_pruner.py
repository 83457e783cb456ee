"""MoE-Pruner (arXiv 2410.12013): one-shot unstructured weight pruning inside routed experts.

For a weight W_ij of an expert's linear layer (output neuron i, input channel j):
    S_ij = |W_ij| · ‖g · X_j‖₂
with ‖g·X_j‖₂ the norm of input channel j over the expert's routed tokens, each weighted by
its gate weight (`in_sqnorm` for gate/up, `mid_sqnorm` for down). Weights are compared
within each output row (as Wanda does) and the lowest fraction s of every row is zeroed, or
the lowest n of every m consecutive inputs (n:m). Attention, routers and shared experts are
untouched; no expert is removed.
"""

import math

import torch

from ..plan import PruningPlan
from . import register


@register("moe_pruner", makes_plan=True)
def moe_pruner(stats, config, info, weights=None):
    """MoE-Pruner: zero the |W|·‖gX‖-lowest fraction `ratio` of each row of every expert."""
    if config.nm:
        n, m = config.nm
        return PruningPlan("moe_pruner", n / m, config.scope, "remove", info, nm=config.nm)
    return PruningPlan("moe_pruner", config.ratio, config.scope, "remove", info, sparsity=config.ratio)


def pruning_mask(weight: torch.Tensor, act_sqnorm: torch.Tensor, sparsity: float,
                 nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Which weights to zero: (out, in) bool, from W (out, in) and Σ(g·x_j)² per input (in,)."""
    score = weight.abs().float() * act_sqnorm.float().sqrt()[None, :]  # S_ij, (out, in)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        blocks = score.view(score.shape[0], -1, m)  # (out, in/m, m)
        lowest = blocks.topk(n, dim=-1, largest=False).indices
        return mask.view_as(blocks).scatter_(-1, lowest, True).view_as(score)
    k = math.floor(sparsity * score.shape[1] + 1e-9)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return mask
