"""A uniform view of every MoE layer of a transformers model.

Only this module knows module paths and weight layouts. Everything else sees `MoELayer`:
the router's decisions exactly as the model makes them, each expert's gate/up/down weights
in one orientation, the expert function f_e, and the shared experts.

Two expert layouts are supported:
- fused 3-D tensors (transformers 5, `@use_experts_implementation`): `gate_up_proj` (E, 2I, H)
  and `down_proj` (E, H, I), or transposed (E, H, 2I) / (E, I, H) with interleaved gate/up and
  biases as in GPT-OSS. The module's own `_apply_gate` gives the activation, so clamped
  SwiGLU variants come out right.
- a ModuleList of expert MLPs (`gate_proj`/`up_proj`/`down_proj`, or Mixtral's legacy
  `w1`/`w3`/`w2`) behind an `nn.Linear` router, as in remote-code and transformers-4 models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Family:
    """How one model family lays out its MoE blocks."""

    model_type: str
    block_attrs: tuple[str, ...] = ("mlp",)  # where the decoder layer keeps its MoE block
    router_attrs: tuple[str, ...] = ("gate",)  # the router inside the block
    shared_attrs: tuple[str, ...] = ()  # shared experts (never pruned)
    scoring: str = "softmax"  # "softmax" or "sigmoid": the router's score p(x) over all experts
    routing: str | None = "softmax_topk"  # the router's rule, for previews that mask experts:
    # softmax_topk (renormalised as the router's norm_topk_prob says), topk_softmax, biased
    # (choice by score + correction bias), or None when moeviz cannot re-route it
    num_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts")


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", block_attrs=("mlp", "block_sparse_moe")),
        Family("olmoe"),
        Family("qwen2_moe", shared_attrs=("shared_expert",)),
        Family("qwen3_moe"),
        Family("deepseek_v2", shared_attrs=("shared_experts",), routing=None),
        Family("deepseek_v3", shared_attrs=("shared_experts",), scoring="sigmoid", routing="biased"),
        Family("glm4_moe", shared_attrs=("shared_experts",), scoring="sigmoid", routing="biased"),
        Family("gpt_oss", router_attrs=("router",), routing="topk_softmax"),
        Family("phimoe", router_attrs=("router",), routing=None),
        Family("granitemoe", block_attrs=("block_sparse_moe",), router_attrs=("router",),
               routing="topk_softmax"),
        Family("minimax"),
        Family("jamba", block_attrs=("feed_forward",), router_attrs=("router",)),
        Family("ernie4_5_moe", shared_attrs=("shared_experts",), routing=None,
               num_experts_keys=("moe_num_experts",)),
    )
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


@dataclass(frozen=True)
class Routing:
    """One router decision for T tokens over E experts."""

    logits: torch.Tensor  # (T, E) raw router logits
    probs: torch.Tensor  # (T, E) softmax or sigmoid scores over all experts
    top_k_index: torch.Tensor  # (T, k) selected experts
    top_k_weights: torch.Tensor  # (T, k) gate weights g_e(x) as the model applies them


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights, always as nn.Linear stores them (out_features, in_features)."""

    gate: torch.Tensor | None  # (I, H); None for experts without a gate
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (H,)


class MoELayer:
    """The sparse MoE block of one decoder layer."""

    def __init__(self, layer_idx: int, block: nn.Module, family: Family, config):
        self.layer_idx = layer_idx  # index of the decoder layer, not of the MoE layer
        self.block = block
        self.family = family
        self.config = config
        self.router = _child(block, family.router_attrs)
        self.novices = getattr(block.experts, "novices", None)  # a moeviz export with novices: (P, H)
        self.experts = getattr(block.experts, "inner", block.experts)  # the kept experts inside such a wrapper
        self.shared = [m for a in family.shared_attrs if (m := getattr(block, a, None)) is not None]
        self.fused = isinstance(self.experts, nn.Module) and not isinstance(self.experts, nn.ModuleList)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        if self.fused:
            return self.experts.down_proj.shape[0]
        return len(self.experts)

    @property
    def top_k(self) -> int:
        return int(getattr(self.router, "top_k", None) or self.config.num_experts_per_tok)

    @cached_property
    def hidden_size(self) -> int:
        return self.expert_weights(0).down.shape[0]

    @cached_property
    def intermediate_size(self) -> int:
        return self.expert_weights(0).down.shape[1]

    @property
    def group_count(self) -> int:
        """Groups of group-limited routing (DeepSeek); 1 when routing is not grouped."""
        return int(getattr(self.router, "n_group", None) or getattr(self.router, "num_group", None) or 1)

    # ---- routing -----------------------------------------------------------------------
    def route(self, hidden: torch.Tensor) -> Routing:
        """Route hidden states (T, H) exactly as the model does."""
        return self.routing_from_output(self.router(hidden))

    def routing_from_output(self, output) -> Routing:
        """Turn what the router module returned into a `Routing`."""
        if isinstance(output, tuple):  # transformers 5: (logits, weights, indices)
            logits, weights, index = output
        else:  # a bare nn.Linear router: softmax, top-k, renormalise as the config says
            logits = output
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            weights, index = torch.topk(probs, self.top_k, dim=-1)
            if getattr(self.config, "norm_topk_prob", True):
                weights = weights / weights.sum(dim=-1, keepdim=True)
            weights = weights.to(logits.dtype)
        logits = logits.reshape(-1, logits.shape[-1])
        return Routing(logits, self.scores(logits), index.reshape(logits.shape[0], -1),
                       weights.reshape(logits.shape[0], -1))

    def renormalizes(self) -> bool:
        """Whether gate weights are renormalised over the selected experts (softmax_topk rule)."""
        if self.family.model_type == "jamba":
            return False
        return bool(getattr(self.router, "norm_topk_prob", True))

    def mask_router_output(self, output, masked: torch.Tensor):
        """The router's output with the `masked` experts (bool (E,)) excluded, as if removed."""
        logits, weights, _ = output
        logits = logits.masked_fill(masked, float("-inf"))
        rule = self.family.routing
        if rule == "softmax_topk":
            top, index = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
            if self.renormalizes():
                top = top / top.sum(dim=-1, keepdim=True)
        elif rule == "topk_softmax":
            top, index = torch.topk(logits, self.top_k, dim=-1)
            top = F.softmax(top.float(), dim=-1)
        else:
            raise NotImplementedError(f"moeviz cannot re-route {self.family.model_type}'s router; "
                                      "apply the plan instead of previewing it.")
        return logits, top.to(weights.dtype), index

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """p(x) over all experts (T, E), as float32."""
        if self.family.scoring == "sigmoid":
            return torch.sigmoid(logits.float())
        return F.softmax(logits.float(), dim=-1)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.weight  # (E, H)

    @property
    def router_bias(self) -> torch.Tensor | None:
        """The router's additive bias: a real bias (GPT-OSS) or a score-correction bias (DeepSeek-V3)."""
        bias = getattr(self.router, "bias", None)
        if bias is None:
            bias = getattr(self.router, "e_score_correction_bias", None)
        return bias

    # ---- experts -----------------------------------------------------------------------
    def expert_weights(self, expert_idx: int) -> ExpertWeights:
        if self.fused:
            return _fused_weights(self.experts, expert_idx)
        return _module_weights(self.experts[expert_idx])

    def expert_forward(self, expert_idx: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_e on tokens x (N, H): returns (the input of down_proj (N, I), the output (N, H))."""
        if not self.fused:
            return _module_forward(self.experts[expert_idx], x)
        exp = self.experts
        w_gu = exp.gate_up_proj[expert_idx] if exp.has_gate else exp.up_proj[expert_idx]
        b_gu = None
        if exp.has_bias:
            b_gu = exp.gate_up_proj_bias[expert_idx] if exp.has_gate else exp.up_proj_bias[expert_idx]
        h = x @ w_gu if exp.is_transposed else F.linear(x, w_gu)
        if b_gu is not None:
            h = h + b_gu
        mid = exp._apply_gate(h) if exp.has_gate else exp.act_fn(h)  # (N, I)
        w_d = exp.down_proj[expert_idx]
        out = mid @ w_d if exp.is_transposed else F.linear(mid, w_d)
        if exp.has_bias:
            out = out + exp.down_proj_bias[expert_idx]
        if getattr(exp, "has_post_expert_norm", False):
            out = exp.post_expert_norm(out)
        return mid, out

    def experts_forward_sorted(self, x: torch.Tensor, expert_ids: torch.Tensor,
                               counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_e for (token, expert) pairs sorted by expert: x (S, H), expert_ids (S,), counts (E,).

        Returns (mids (S, I), outputs (S, H)). Fused experts use one grouped matmul per
        projection, as transformers' default `grouped_mm` implementation does, without
        waiting for the device.
        """
        if self.fused and _GROUPED_MM is not None:
            return self._grouped_forward(x, expert_ids, counts)
        counts = counts.tolist()
        mids, outs = [], []
        for e, part in enumerate(torch.split(x, counts)):
            if counts[e]:
                mid, out = self.expert_forward(e, part)
                mids.append(mid)
                outs.append(out)
        return torch.cat(mids), torch.cat(outs)

    def _grouped_forward(self, x, expert_ids, counts):
        exp = self.experts
        rows = None
        if x.device.type == "cpu" and exp.down_proj.dtype in (torch.bfloat16, torch.float16):
            x, expert_ids, counts, rows = _bucketed_groups(x, counts)
        offsets = counts.cumsum(0).to(torch.int32)
        w_gu = exp.gate_up_proj if exp.has_gate else exp.up_proj
        h = _grouped_linear(x, w_gu, offsets, exp.is_transposed)
        if exp.has_bias:
            h = h + (exp.gate_up_proj_bias if exp.has_gate else exp.up_proj_bias)[expert_ids]
        mid = exp._apply_gate(h) if exp.has_gate else exp.act_fn(h)  # (S, I)
        out = _grouped_linear(mid, exp.down_proj, offsets, exp.is_transposed)
        if exp.has_bias:
            out = out + exp.down_proj_bias[expert_ids]
        if getattr(exp, "has_post_expert_norm", False):
            out = exp.post_expert_norm(out)
        if rows is not None:
            mid, out = mid.index_select(0, rows), out.index_select(0, rows)
        return mid, out

    def __repr__(self) -> str:
        kind = "fused" if self.fused else "list"
        novices = f", novices={len(self.novices)}" if self.novices is not None else ""
        return (f"MoELayer(layer_idx={self.layer_idx}, num_experts={self.num_experts}{novices}, "
                f"top_k={self.top_k}, {kind}, shared={len(self.shared)})")


class Adapter:
    """All MoE layers of one model, found through its family."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        self.layers = self._find_layers()
        if not self.layers:
            raise ValueError(f"No MoE layers found in this {self.family.model_type} model.")

    def _find_layers(self) -> list[MoELayer]:
        found = []
        for layer_idx, decoder_layer in enumerate(decoder_layers(self.model)):
            block = _child(decoder_layer, self.family.block_attrs, required=False)
            if block is not None and _is_moe_block(block):  # dense layers are skipped
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


def family_of(config) -> Family:
    """The family of a transformers config, or a ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = (getattr(config, "architectures", None) or [model_type])[0]
        raise ValueError(
            f"Unsupported architecture: {arch} (model_type {model_type!r}). "
            f"Supported: {', '.join(supported_architectures())}."
        )
    return FAMILIES[model_type]


def get_adapter(model: nn.Module) -> Adapter:
    return Adapter(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"Cannot find decoder layers in {type(model).__name__}.")
    return layers


def _child(module: nn.Module, names: tuple[str, ...], required: bool = True) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    if required:
        raise ValueError(f"{type(module).__name__} has none of {names}.")
    return None


def _is_moe_block(block: nn.Module) -> bool:
    experts = getattr(block, "experts", None)
    experts = getattr(experts, "inner", experts)  # kept experts wrapped with novices (a moeviz export)
    if isinstance(experts, nn.ModuleList):
        return len(experts) > 0
    return experts is not None and getattr(experts, "down_proj", None) is not None \
        and experts.down_proj.dim() == 3


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _bucketed_groups(x: torch.Tensor, counts: torch.Tensor):
    """x (S, H) sorted by expert, each expert's group padded with zero rows to one of few sizes.

    On the CPU, oneDNN caches a kernel per distinct matrix shape, and keeps it: with every
    expert's token count a new shape, its caches grew by 40–60 MiB per layer of a calibration
    and never shrank. Group sizes rounded up to four steps per octave (≤ 25 % more rows), and
    at least 16, leave a few dozen shapes; groups of fewer than 16 tokens (many experts, a small
    batch) can grow several times, a cost that stays small beside the large groups. Returns (padded x, expert ids, padded counts, the rows of
    the original tokens in the padded layout).
    """
    c = counts.to(torch.int64)
    step = torch.exp2((torch.log2(c.clamp(min=1).double()).floor() - 2).clamp(min=0)).to(torch.int64)
    padded = torch.where(c == 0, 0, ((c + step - 1) // step * step).clamp(min=16))
    shift = (padded.cumsum(0) - padded) - (c.cumsum(0) - c)  # where each group moves to
    rows = torch.arange(int(c.sum()), device=x.device) + torch.repeat_interleave(shift, c)
    padded_x = x.new_zeros(int(padded.sum()), x.shape[1]).index_copy_(0, rows, x)
    expert_ids = torch.repeat_interleave(torch.arange(len(c), device=x.device), padded)
    return padded_x, expert_ids, padded, rows


def _grouped_linear(x, weight, offsets, is_transposed: bool) -> torch.Tensor:
    """x (S, in) sorted by expert @ weight (E, out, in), or (E, in, out) when transposed."""
    w = weight if is_transposed else weight.transpose(-2, -1)
    return _GROUPED_MM(x.to(w.dtype), w, offs=offsets)


def _fused_weights(exp: nn.Module, e: int) -> ExpertWeights:
    t = (lambda w: w.T) if exp.is_transposed else (lambda w: w)
    w_gu = t(exp.gate_up_proj[e] if exp.has_gate else exp.up_proj[e])  # (2I, H) or (I, H)
    b_gu = None
    if exp.has_bias:
        b_gu = exp.gate_up_proj_bias[e] if exp.has_gate else exp.up_proj_bias[e]
    gate = gate_b = None
    up, up_b = w_gu, b_gu
    if exp.has_gate:
        if exp.is_concatenated:
            gate, up = w_gu.chunk(2, dim=0)
            gate_b, up_b = b_gu.chunk(2) if b_gu is not None else (None, None)
        else:  # interleaved rows: gate0, up0, gate1, up1, ...
            gate, up = w_gu[0::2], w_gu[1::2]
            gate_b, up_b = (b_gu[0::2], b_gu[1::2]) if b_gu is not None else (None, None)
    down = t(exp.down_proj[e])  # (H, I)
    down_b = exp.down_proj_bias[e] if exp.has_bias else None
    return ExpertWeights(gate, up, down, gate_b, up_b, down_b)


def _mlp_linears(mlp: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
    if hasattr(mlp, "down_proj"):
        return getattr(mlp, "gate_proj", None), mlp.up_proj, mlp.down_proj
    if hasattr(mlp, "w2"):  # Mixtral's legacy names: w1 gate, w3 up, w2 down
        return mlp.w1, mlp.w3, mlp.w2
    raise ValueError(f"Unknown expert MLP layout: {type(mlp).__name__}")


def _module_weights(mlp: nn.Module) -> ExpertWeights:
    gate, up, down = _mlp_linears(mlp)
    return ExpertWeights(
        gate.weight if gate is not None else None, up.weight, down.weight,
        gate.bias if gate is not None else None, up.bias, down.bias,
    )


def _module_forward(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, down = _mlp_linears(mlp)
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None) or F.silu
    mid = act(gate(x)) * up(x) if gate is not None else act(up(x))
    return mid, down(mid)
