"""One sparse MoE block read from its modules: `MoELayer`.

The router's decisions exactly as the model makes them (`Routing`), each expert's gate/up/down
weights in one orientation (`ExpertWeights`), the expert function f_e, and the shared experts,
read with what structure cannot tell of the model's family (`Family`; the table of them is
`adapters.FAMILIES`). `adapters` finds these blocks in a model; this module reads one.

Two expert layouts are supported:
- fused 3-D tensors (transformers 5, `@use_experts_implementation`): `gate_up_proj` (E, 2I, H)
  and `down_proj` (E, H, I), or transposed (E, H, 2I) / (E, I, H) with interleaved gate/up and
  biases as in GPT-OSS. The module's own `_apply_gate` gives the activation, so clamped
  SwiGLU variants come out right.
- a ModuleList of expert MLPs (`gate_proj`/`up_proj`/`down_proj`, or Mixtral's legacy
  `w1`/`w3`/`w2`) behind an `nn.Linear` router, as in remote-code and transformers-4 models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Family:
    """What structure cannot tell about one model family: small overrides, all optional.

    Every other family is read from its modules: the decoder layers wherever the model keeps
    them, in each a block holding `experts` and a router with one row per routed expert.
    """

    model_type: str
    shared_attrs: tuple[str, ...] = ()  # shared experts besides those named shared* (never pruned)
    scoring: str | None = None  # "softmax", "sigmoid", "identity"; None: found by probing the router
    refused: str | None = None  # why moeviz cannot prune this family, in one sentence


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
    """The sparse MoE block of one decoder layer, read from its modules."""

    def __init__(self, layer_idx: int, block: nn.Module, family: Family, config):
        self.layer_idx = layer_idx  # index of the decoder layer, not of the MoE layer
        self.block = block
        self.family = family
        self.config = config
        self.novices = getattr(block.experts, "novices", None)  # a moeviz export with novices: (P, H)
        self.experts = getattr(block.experts, "inner", block.experts)  # the kept experts inside such a wrapper
        self.fused = isinstance(self.experts, nn.Module) and not isinstance(self.experts, nn.ModuleList)
        # Experts called with the hidden states alone run every expert on every token, each on its
        # input scaled by the router's gate (Llama-4): the block adds f_e(g_e(x)·x), not g_e(x)·f_e(x).
        self.gate_on_input = self.fused and len(inspect.signature(type(self.experts).forward).parameters) == 2
        if self.fused and not hasattr(self.experts, "has_gate"):
            _read_layout(self.experts, _text_config(config).hidden_size)
        rows = block.experts.num_experts if self.novices is not None else self.num_experts  # the router's
        self.router_name, self.router, self.router_weight_name = _find_router(block, rows, self.hidden_size)
        # Router classes after the routed experts that are not experts moeviz may prune: LongCat-Flash's
        # zero (identity) experts, Inkling's shared experts, ZAYA's skip class. Always kept.
        self.extra_classes = self.router_weight.shape[0] - rows
        self.shared = [m for name, m in block.named_children()
                       if name != "experts" and ("shared" in name and "gate" not in name or name in family.shared_attrs)]

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        if self.fused:
            return self.experts.down_proj.shape[0]
        return len(self.experts)

    @property
    def top_k(self) -> int:
        for module in (self.router, self.block):
            for attr in ("top_k", "num_experts_per_tok", "moe_topk", "moe_k"):
                if isinstance(value := getattr(module, attr, None), int) and not isinstance(value, bool):
                    return value
        config = _text_config(self.config)
        for attr in ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise ValueError(f"Layer {self.layer_idx}: cannot find how many experts a token chooses.")

    @cached_property
    def hidden_size(self) -> int:
        return self.expert_weights(0).down.shape[0]

    @cached_property
    def intermediate_size(self) -> int:
        return self.expert_weights(0).down.shape[1]

    @property
    def group_count(self) -> int:
        """Groups of group-limited routing (DeepSeek); 1 when routing is not grouped."""
        for module in (self.router, self.block):
            for attr in ("n_group", "num_group", "num_expert_group", "n_groups"):
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                    return value
        return 1

    # ---- routing -----------------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.get_parameter(self.router_weight_name)  # (E, H)

    @property
    def router_bias(self) -> torch.Tensor | None:
        """The router's additive bias: a real bias (GPT-OSS) or a score-correction bias (DeepSeek-V3),
        wherever the block keeps it; None without one."""
        found = [t for name, t, dim in self.indexed_tensors() if t is not self.router_weight and t.dim() - dim == 1
                 and t.is_floating_point()]
        return found[0].reshape(-1) if found else None

    def indexed_tensors(self) -> list[tuple[str, torch.Tensor, int]]:
        """Every tensor of the block outside the experts with one entry per routed expert:
        (name in the block, tensor, the dimension indexed by expert). Removing experts slices
        these; the router's weight rows, biases and per-expert scales are among them."""
        E, found = self.num_experts, []
        own = [*self.block.named_parameters(recurse=False), *self.block.named_buffers(recurse=False)]
        router = [(f"{self.router_name}.{n}", t) for n, t in [*self.router.named_parameters(), *self.router.named_buffers()]]
        for name, t in own + router:
            dim = _expert_dim(t, E, E + self.extra_classes)
            if dim is not None:
                found.append((name, t, dim))
        return found

    def id_tables(self) -> list[tuple[str, torch.Tensor]]:
        """The router's tables of expert ids (name in the block, tensor): DeepSeek-V4's hash routing
        `tid2eid` (V, k), the experts each token id goes to. Removal renumbers them."""
        return [(f"{self.router_name}.{n}", t) for n, t in self.router.named_buffers()
                if not t.is_floating_point() and t.dim() == 2 and t.shape[-1] == self.top_k]

    def kept_rows(self, keep: list[int], size: int) -> list[int]:
        """The entries of an expert-indexed dimension of `size` that a removal keeps: the kept
        experts, and the router classes after the routed experts (`extra_classes`), if it has them."""
        return list(keep) + list(range(self.num_experts, size))

    def route(self, hidden: torch.Tensor) -> Routing:
        """Route hidden states (T, H) with a plain Linear router (module-list blocks)."""
        return self.routing_from_output(self.router(hidden))

    def routing_from_output(self, output) -> Routing:
        """Turn what the router module returned into a `Routing`."""
        if isinstance(output, tuple) and len(output) == 3:  # transformers 5: (logits, weights, indices)
            logits, weights, index = output
        else:  # a bare nn.Linear router: softmax, top-k, renormalise as the config says
            logits = output
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            weights, index = torch.topk(probs, self.top_k, dim=-1)
            if getattr(self.config, "norm_topk_prob", True):
                weights = weights / weights.sum(dim=-1, keepdim=True)
            weights = weights.to(logits.dtype)
        logits = logits.reshape(-1, logits.shape[-1])
        index, weights = index.reshape(logits.shape[0], -1), weights.reshape(logits.shape[0], -1)
        if isinstance(output, tuple) and not self.family.scoring:
            self._scoring = next((s for s in SCORINGS if _proportional(score(logits, s), index, weights)), None)
        return Routing(logits, self.scores(logits), index, weights)

    def dense_routing(self, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (T, E), chosen experts (T, k), gates (T, k)) from what a gate-on-input router
        returned: its dense gates (T, E), zero where not chosen, and its logits (Llama-4)."""
        gates, logits = output[0].reshape(-1, self.num_experts), output[1].reshape(-1, self.num_experts)
        index = torch.topk(logits, self.top_k, dim=-1).indices
        return logits, index, gates.gather(1, index)

    def router_logits(self, output) -> torch.Tensor | None:
        """The (T, E) logits among what the router returned (its first tensor with E columns), or
        (T, E + n) with the router's extra classes after the experts'."""
        for t in (output if isinstance(output, tuple) else (output,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.is_floating_point() \
                    and t.shape[-1] in (self.num_experts, self.num_experts + self.extra_classes):
                return t.reshape(-1, t.shape[-1])
        return None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """p(x) over all experts (T, E), as float32: the router's scores before top-k."""
        return score(logits, self.family.scoring or getattr(self, "_scoring", None) or "softmax")

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


SCORINGS = ("softmax", "sigmoid", "identity")  # what a router's scores p(x) may be, of its logits


def score(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """p(x) (T, E) in float32 from the router's logits (T, E)."""
    if scoring == "sigmoid":
        return torch.sigmoid(logits.float())
    if scoring == "identity":
        return logits.float()
    return F.softmax(logits.float(), dim=-1)


def _proportional(probs: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether the gate weights (T, k) are the scores at the chosen experts times one factor per
    token (renormalisation and routed scaling divide out)."""
    ratio = weights.float() / probs.gather(1, index).clamp(min=1e-30)
    return bool(torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-6))


def _text_config(config):
    return getattr(config, "get_text_config", lambda: config)()


def _read_layout(experts: nn.Module, hidden_size: int) -> None:
    """Name the layout of fused experts that do not declare it (Llama-4's, written before
    transformers' flags): one concatenated gate/up tensor, (E, H, 2I) when transposed, no biases.
    Sets plain attributes only; the module's forward and tensors are untouched."""
    experts.has_gate = hasattr(experts, "gate_up_proj")
    experts.is_transposed = experts.down_proj.shape[-1] == hidden_size
    experts.is_concatenated, experts.has_bias = True, False
    act = experts.act_fn

    def apply_gate(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    experts._apply_gate = apply_gate


def _find_router(block: nn.Module, num_experts: int, hidden_size: int) -> tuple[str, nn.Module, str]:
    """(name in the block, module, name of its (E, H) weight): the child of the block whose weight
    has one row per routed expert, routers named gate/router first. Failing that, a router's
    (E + n, ·) weight whose last n rows are classes that are not routed experts (zero experts,
    shared experts, a skip class) read from a hidden state of its own size (ZAYA)."""
    children = dict(block.named_children())
    order = sorted((n for n in children if n != "experts"), key=lambda n: ("router" not in n and n != "gate", n))
    for name in order:
        for pname, p in children[name].named_parameters():
            if p.dim() == 2 and tuple(p.shape) == (num_experts, hidden_size) and "shared" not in name:
                return name, children[name], pname
    extra = [(p.shape[0], name, pname) for name in order if "router" in name or name == "gate"
             for pname, p in children[name].named_parameters() if p.dim() == 2 and p.shape[0] > num_experts]
    if extra:  # the fewest extra classes (ZAYA's router also holds (D, H) and (D, D) projections); no bound on
        # their number: LongCat-Flash keeps its 256 zero experts whatever number of routed ones survive a pruning
        _, name, pname = min(extra)
        return name, children[name], pname
    rows = sorted({tuple(p.shape) for n in order for p in children[n].parameters() if p.dim() == 2})
    raise ValueError(f"{type(block).__name__} holds {num_experts} experts but no router weight of shape "
                     f"({num_experts}, {hidden_size}) (2-D weights there: {rows}).")


def _expert_dim(t: torch.Tensor, num_experts: int, rows: int) -> int | None:
    """The dimension of `t` that runs over experts (E entries, or the router's `rows` with its extra
    classes): its first, or its last when every other dimension is 1 (ERNIE's (1, E) correction
    bias); None when it has none."""
    if t.dim() and t.shape[0] in (num_experts, rows):
        return 0
    if t.dim() > 1 and t.shape[-1] in (num_experts, rows) and all(s == 1 for s in t.shape[:-1]):
        return t.dim() - 1
    return None


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
