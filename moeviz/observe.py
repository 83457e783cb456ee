"""The observer: hooks that accumulate per-expert sums during ordinary forward passes.

The routed experts' outputs are captured where the model computes them (the experts' own
forward is swapped for an equivalent one that also records), so the cost stays close to one
plain forward pass. Every statistic is a sum over tokens (float64 totals on the model's
device; each batch reduced in float32 first), so observers of different batches, shards or
machines merge by addition. See METHODS.md.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .adapters import Adapter, execution_device, swap_forward
from .moe_layer import SCORINGS, MoELayer, score

# Sums per layer: name → shape given (E, H, I). Means and variances are derived later.
SUM_SHAPES = {
    "count": lambda E, H, I: (E,),  # routed tokens of e
    "gate_sum": lambda E, H, I: (E,),  # Σ g_e(x) over routed tokens
    "prob_sum": lambda E, H, I: (E,),  # Σ p_e(x) over all tokens (taken from the candidates at the end)
    "out_sum": lambda E, H, I: (E, H),  # Σ f_e(x)
    "out_sqsum": lambda E, H, I: (E, H),  # Σ f_e(x)²
    "in_sqnorm": lambda E, H, I: (E, H),  # Σ (g_e(x) · x_j)²
    "mid_sqnorm": lambda E, H, I: (E, I),  # Σ (g_e(x) · a_i)², a the input of down_proj
    "ean_sum": lambda E, H, I: (E,),  # Σ ‖f_e(x)‖
    "reap_sum": lambda E, H, I: (E,),  # Σ g_e(x) · ‖f_e(x)‖
    "coactivation": lambda E, H, I: (E, E),  # tokens that select both e and e'
    "tokens": lambda E, H, I: (),  # tokens seen
}


class LayerObserver:
    """The running sums of one MoE layer, and the reservoir of its probe tokens."""

    def __init__(self, layer: MoELayer, probe_tokens: int, generator: torch.Generator,
                 device: torch.device | None = None):
        self.layer = layer
        dev = device or execution_device(layer.router)
        E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
        self.sums = {k: torch.zeros(f(E, H, I), dtype=torch.float64, device=dev) for k, f in SUM_SHAPES.items()}
        self.probe_tokens = probe_tokens
        self.generator = generator
        self.probe_x = torch.empty(0, H, device=dev)  # (≤ probe_tokens, H) a uniform sample
        self.probe_keys = torch.empty(0, device=dev)
        self.candidates = torch.zeros(len(SCORINGS), E, dtype=torch.float64, device=dev)  # Σ p(x) per scoring
        self.misfit = torch.zeros(len(SCORINGS), device=dev)
        self.finished = False  # probe sums taken already (layer by layer: while the weights are there)

    def record_scores(self, logits, top_k_index, top_k_weights) -> None:
        """p(x) of every candidate score (softmax, sigmoid, identity of the logits (T, E)), and how far
        each is from being proportional to the gate weights (T, k) token by token: the scores the
        gates are made of are taken at the end (`scores_sum`), with no wait for the device here."""
        E = self.layer.num_experts
        chosen = top_k_weights != 0  # a choice of weight 0 stands for a zero expert or a skip class
        for c, scoring in enumerate(SCORINGS):
            probs = score(logits, scoring)[:, :E]  # over the router's classes, the routed experts' share
            self.candidates[c] += probs.sum(0, dtype=torch.float64)
            ratio = top_k_weights.float() / probs.gather(1, top_k_index).clamp(min=1e-30)
            ref = ratio.amax(1, keepdim=True)
            misfit = ((ratio - ref).abs() / ref.abs().clamp(min=1e-30) * chosen).amax()
            self.misfit[c] = torch.maximum(self.misfit[c], misfit.nan_to_num(float("inf")))

    def scores_sum(self) -> torch.Tensor:
        """Σ p_e(x) (E,) in the scores the router's gate weights are made of (softmax when none fits)."""
        if self.layer.family.scoring:
            return self.candidates[SCORINGS.index(self.layer.family.scoring)]
        fits = self.misfit < 1e-3
        first = torch.where(fits.any(), fits.int().argmax(), 0)  # chosen on the device: no wait
        return self.candidates.index_select(0, first.view(1))[0]

    def record_routing(self, logits, top_k_index, top_k_weights) -> None:
        """One batch's routing: the router's logits (T, E), the chosen experts and their gates (T, k)."""
        s = self.sums
        T, E = top_k_index.shape[0], self.layer.num_experts
        self.record_scores(logits, top_k_index, top_k_weights)
        selected = torch.zeros(T, E, device=s["count"].device)
        if self.layer.extra_classes:  # choices of weight 0 (zero experts, a skip class) select no expert
            selected.scatter_add_(1, top_k_index, (top_k_weights != 0).float()).clamp_(max=1)
        else:
            selected.scatter_(1, top_k_index, 1.0)  # (T, E) 0/1, exact in float32
        s["tokens"] += T
        s["coactivation"] += selected.T @ selected

    def record_experts(self, hidden, top_k_index, top_k_weights, expert_ids, counts, mid, out, gates) -> None:
        """One batch: tokens (T, H) with their routing (T, k), and the (token, expert) pairs
        sorted by expert: ids (S,), counts (E,), mids (S, I), outputs (S, H), gates (S,).

        A batch's sums are reduced in float32, in place (no float64 copy of a pair matrix),
        and added to the float64 totals. Overwrites `mid` and `out`.
        """
        s, E = self.sums, self.layer.num_experts

        def per_expert(values: torch.Tensor) -> torch.Tensor:  # (S, …) → (E, …) sums
            return values.new_zeros((E,) + values.shape[1:]).index_add_(0, expert_ids, values)

        out, g = out.float(), gates.float()
        # What the block scales each output by: g, or 1 where the gate scaled the input (Llama-4:
        # the output f_e(g·x) and down_proj's input a(g·x) are already the token's contribution).
        w = torch.ones_like(g) if self.layer.gate_on_input else g
        chosen = None
        if self.layer.extra_classes:  # a pair of weight 0 stands for a zero expert or a skip class: no access
            chosen = (g != 0).float()[:, None]
            out.mul_(chosen)
            counts = per_expert(chosen[:, 0])
        norms = torch.linalg.vector_norm(out, dim=1)
        gate_sum, ean_sum, reap_sum = per_expert(torch.stack([g, norms, w * norms], 1)).double().unbind(1)
        s["count"] += counts
        s["gate_sum"] += gate_sum
        s["ean_sum"] += ean_sum
        s["reap_sum"] += reap_sum
        # Σf and Σf² around the batch's own per-expert mean c, so that a large mean does not
        # swamp the variance in float32; folded back exactly into raw float64 sums.
        c = per_expert(out) / counts.clamp(min=1)[:, None]
        centred = out.sub_(c.index_select(0, expert_ids))
        if chosen is not None:
            centred.mul_(chosen)
        s1 = per_expert(centred).double()
        s2 = per_expert(centred.square_()).double()
        n, c = counts.double()[:, None], c.double()
        s["out_sum"] += s1 + n * c
        s["out_sqsum"] += s2 + 2 * c * s1 + n * c * c
        s["mid_sqnorm"] += per_expert(mid.float().mul_(w[:, None]).square_())
        # Σ over routed tokens of (g·x)², as one (E, T) @ (T, H) product over the batch's
        # tokens instead of a copy of x for each of its k experts.
        hidden = hidden.float()
        g2 = torch.zeros(hidden.shape[0], E, device=hidden.device)
        g2.scatter_(1, top_k_index, top_k_weights.float().square())
        s["in_sqnorm"] += g2.T @ (hidden * hidden)

    def offer_probe_tokens(self, hidden: torch.Tensor) -> None:
        """Keep a uniform sample of all tokens seen (reservoir by random keys)."""
        if self.probe_tokens <= 0:
            return
        keys = torch.rand(hidden.shape[0], generator=self.generator)  # on the CPU: the same sample on any device
        if hidden.device.type == "cuda":  # a copy from pinned memory does not make the host wait for the GPU
            keys = keys.pin_memory()
        keys = keys.to(hidden.device, non_blocking=True)
        keys = torch.cat([self.probe_keys, keys])
        pool = torch.cat([self.probe_x, hidden.detach().float()])
        if keys.numel() > self.probe_tokens:
            keep = torch.topk(keys, self.probe_tokens, largest=False).indices
            keys, pool = keys[keep], pool[keep]
        self.probe_keys, self.probe_x = keys, pool

    def pool_probe_tokens(self, dist) -> None:
        """Replace this rank's reservoir by the union of all ranks', cut to the lowest keys."""
        P, H = self.probe_tokens, self.layer.hidden_size
        n = self.probe_keys.shape[0]
        keys = torch.full((P,), float("inf"), device=self.probe_keys.device)
        keys[:n] = self.probe_keys
        pool = torch.zeros(P, H, device=self.probe_x.device)
        pool[:n] = self.probe_x
        all_keys = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
        all_pools = [torch.empty_like(pool) for _ in range(dist.get_world_size())]
        dist.all_gather(all_keys, keys)
        dist.all_gather(all_pools, pool)
        keys, pool = torch.cat(all_keys), torch.cat(all_pools)
        keep = torch.topk(keys, min(P, int(torch.isfinite(keys).sum())), largest=False).indices
        self.probe_keys, self.probe_x = keys[keep], pool[keep]

    @torch.inference_mode()
    def probe_sums(self, rank: int = 0, world_size: int = 1, budget: int = 2**25) -> dict[str, torch.Tensor]:
        """Run every expert on the probe tokens: Σ outputs (E, H) and Σ cosine similarities (E, E).

        Each chunk of c tokens goes through all E experts in one grouped call, with c chosen
        so that the E·c intermediate activations stay within `budget` elements.
        """
        layer, x = self.layer, self.probe_x[rank::world_size]  # a share of the pool per rank
        E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
        out_sum = torch.zeros(E, H, dtype=torch.float64, device=x.device)
        sim_sum = torch.zeros(E, E, dtype=torch.float64, device=x.device)
        chunk = max(1, budget // (E * 2 * max(H, I)))
        with _weights_on_device(layer.experts):
            for start in range(0, x.shape[0], chunk):
                xs = x[start:start + chunk].to(layer.router_weight.dtype)
                c = xs.shape[0]
                ids = torch.arange(E, device=x.device).repeat_interleave(c)
                counts = torch.full((E,), c, device=x.device)
                outs = layer.experts_forward_sorted(xs.repeat(E, 1), ids, counts)[1].float().view(E, c, H)
                out_sum += outs.sum(1)
                per_token = outs.transpose(0, 1)  # (c, E, H)
                gram = per_token @ per_token.transpose(1, 2)  # (c, E, E)
                norms = gram.diagonal(dim1=1, dim2=2).clamp(min=1e-24).sqrt()  # (c, E)
                sim_sum += (gram / (norms[:, :, None] * norms[:, None, :])).sum(0)
        return {"probe_out_sum": out_sum, "probe_sim_sum": sim_sum,
                "probe_tokens": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)}


class Observer:
    """Observes every MoE layer of a model. Use `with observer.attached(): model(...)`."""

    def __init__(self, adapter: Adapter, probe_tokens: int = 256, seed: int = 0, device: torch.device | None = None):
        if any(layer.novices is not None for layer in adapter.layers):
            raise NotImplementedError("This model answers for pruned experts with novices (a moeviz export): "
                                      "calibrate the original model, whose experts are all there.")
        self.adapter = adapter
        world = distributed()
        rank = world.get_rank() if world else 0
        # A generator per layer (other keys on every rank): the probe sample does not depend on
        # the order in which layers and batches are seen (one pass, or layer by layer).
        self.layers = [LayerObserver(layer, probe_tokens, torch.Generator().manual_seed(seed + 7919 * rank + 104729 * i),
                                     device) for i, layer in enumerate(adapter.layers)]

    @contextmanager
    def attached(self):
        """Swap in the recording forwards; always restore the model's own, also on error."""
        undo = []
        try:
            for obs in self.layers:
                undo.append(_attach(obs))
            yield self
        finally:
            for restore in undo:
                restore()

    def sums(self) -> dict[str, torch.Tensor]:
        """Every sum stacked over layers, on the CPU: name → (L, …).

        Under `torch.distributed` (each rank observed its own shard of the data), the sums are
        added across ranks, the probe reservoirs are pooled into one uniform sample of all
        ranks' tokens, and each rank runs the experts on its share of it: every rank returns
        the sums of the whole data.
        """
        world = distributed()
        per_layer = [dict(obs.sums, prob_sum=obs.scores_sum()) for obs in self.layers]
        if world is not None:
            for sums in per_layer:
                for tensor in sums.values():
                    world.all_reduce(tensor)
        if all(obs.probe_tokens > 0 for obs in self.layers):
            for sums, obs in zip(per_layer, self.layers):
                sums.update(obs.probe_part if obs.finished else self._probe_part(obs))
        return {k: torch.stack([s[k] for s in per_layer]).cpu() for k in per_layer[0]}

    def finish_layer(self, index: int) -> None:
        """Take layer `index`'s probe sums now, while its weights are in memory (layer by layer)."""
        obs = self.layers[index]
        if obs.probe_tokens > 0 and not obs.finished:
            obs.probe_part, obs.finished = self._probe_part(obs), True

    @staticmethod
    def _probe_part(obs: LayerObserver) -> dict[str, torch.Tensor]:
        world = distributed()
        if world is not None:
            obs.pool_probe_tokens(world)
        part = obs.probe_sums(*(world.get_rank(), world.get_world_size()) if world else (0, 1))
        if world is not None:
            for tensor in part.values():
                world.all_reduce(tensor)
        return part


def distributed():
    """torch.distributed when a process group with more than one rank is running, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _attach(obs: LayerObserver):
    """Patch one layer; return the function that undoes it."""
    layer = obs.layer
    if layer.gate_on_input:  # Llama-4: the router's dense gates and the tokens it saw; the experts' inputs
        handle = layer.router.register_forward_hook(
            lambda module, args, output: setattr(obs, "routed", (args[0].reshape(-1, args[0].shape[-1]), output)))
        undo = swap_forward(layer.experts, lambda routed_in: _observed_dense_experts(obs, routed_in))

        def restore():
            handle.remove()
            undo()
        return restore
    if layer.fused:
        # The router's logits, for p(x) over all experts; the choice and the gate weights are taken
        # where the experts receive them, so any routing rule is observed exactly as the model runs it.
        handle = layer.router.register_forward_hook(
            lambda module, args, output: setattr(obs, "logits", layer.router_logits(output)))
        undo = swap_forward(layer.experts, lambda hidden, index, weights, *a, **kw: _observed_experts(
            obs, hidden, index, weights, routed=True))

        def restore():
            handle.remove()
            undo()
        return restore
    if layer.shared:
        raise NotImplementedError(
            "Observing a ModuleList MoE block with shared experts is not supported; "
            "load the model with transformers' own (fused) implementation instead.")
    return swap_forward(layer.block, lambda hidden, *a, **kw: _observed_list_block(obs, hidden))


@contextmanager
def _weights_on_device(module: torch.nn.Module):
    """The module's weights where it computes, also when accelerate offloads them between calls."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def _observed_experts(obs: LayerObserver, hidden, top_k_index, top_k_weights, routed: bool = False) -> torch.Tensor:
    """The experts' forward over tokens sorted by expert, recording as it goes (the routing too when
    `routed`: the router's logits from its hook, the choice and the gates as the experts got them)."""
    layer = obs.layer
    if routed:
        logits, obs.logits = getattr(obs, "logits", None), None
        if logits is None or logits.shape[0] != top_k_index.shape[0]:
            raise RuntimeError(f"Layer {layer.layer_idx}: its experts ran without the router's logits for the same "
                               f"{top_k_index.shape[0]} tokens; moeviz cannot observe this block.")
        obs.record_routing(logits, top_k_index, top_k_weights)
    T, k = top_k_index.shape
    flat = top_k_index.reshape(-1)  # (S,) with S = T·k
    expert_ids, order = torch.sort(flat, stable=True)
    token = order // k
    x = hidden.index_select(0, token)  # (S, H)
    gates = top_k_weights.reshape(-1).index_select(0, order)  # (S,)
    # Not `bincount`: on a GPU its output size depends on the data, so the host would wait for it.
    counts = flat.new_zeros(layer.num_experts).index_add_(0, flat, torch.ones_like(flat))  # (E,)
    mid, out = layer.experts_forward_sorted(x, expert_ids, counts)
    weighted = out.float() * gates.float()[:, None]
    combined = torch.zeros(T, out.shape[1], device=out.device).index_add_(0, token, weighted)
    obs.record_experts(hidden, top_k_index, top_k_weights, expert_ids, counts, mid, out, gates)
    obs.offer_probe_tokens(hidden)
    return combined.to(hidden.dtype)


def _observed_dense_experts(obs: LayerObserver, routed_in: torch.Tensor) -> torch.Tensor:
    """Experts that run every expert on every token (Llama-4): routed_in (E·T, H) holds each
    expert's inputs g_e(x)·x, zero where the expert was not chosen. Only the chosen (token,
    expert) pairs are computed and recorded; the others' output is f_e(0) = 0, as the model's."""
    layer = obs.layer
    (hidden, output), obs.routed = obs.routed, None
    logits, index, weights = layer.dense_routing(output)
    obs.record_routing(logits, index, weights)
    E, H = layer.num_experts, routed_in.shape[-1]
    T, k = index.shape
    flat = index.reshape(-1)
    expert_ids, order = torch.sort(flat, stable=True)
    token = order // k
    x = routed_in.view(E, T, H)[expert_ids, token]  # (S, H): g·x, as the experts receive it
    counts = flat.new_zeros(E).index_add_(0, flat, torch.ones_like(flat))
    mid, out = layer.experts_forward_sorted(x, expert_ids, counts)
    dense = torch.zeros(E, T, H, dtype=routed_in.dtype, device=routed_in.device)
    dense[expert_ids, token] = out.to(routed_in.dtype)
    gates = weights.reshape(-1).index_select(0, order)
    obs.record_experts(hidden, index, weights, expert_ids, counts, mid, out, gates)
    obs.offer_probe_tokens(hidden)
    return dense.view(E * T, H)


def _observed_list_block(obs: LayerObserver, hidden: torch.Tensor) -> torch.Tensor:
    """A ModuleList block without shared experts: route, run the experts, combine."""
    shape = hidden.shape
    flat = hidden.reshape(-1, shape[-1])
    routing = obs.layer.route(flat)
    obs.record_routing(routing.logits, routing.top_k_index, routing.top_k_weights)
    return _observed_experts(obs, flat, routing.top_k_index, routing.top_k_weights).reshape(shape)
