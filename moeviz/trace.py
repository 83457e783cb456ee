"""One text through the experts: which experts each token visits in each MoE layer, and what a
plan changes for that text (tokens sent elsewhere, tokens whose prediction gets worse).

The routing is read with the same adapter code calibration uses (a hook on each router,
`MoELayer.routing_from_output`), so the trace is what the model does, not a re-implementation.
With a plan, the model runs once more under the plan applied in place (`moeviz.apply.applied`);
expert numbers stay the original ones.
"""

from __future__ import annotations

import colorsys
import html
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .adapters import get_adapter
from .adapters import execution_device

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
           "#7F3C8D", "#11A579", "#3969AC", "#F2B701", "#E73F74", "#80BA5A", "#E68310", "#008695")
WORSE = 1e-3  # nats: a smaller rise of a token's loss (its probability down by under 0.1 %) is the noise of
# bf16 and GPU kernels, not a worse prediction
NONE_WORSE = "No token's prediction got worse under the plan."


class TraceError(ValueError):
    """A text that cannot be traced (empty, or longer than the model's context)."""


def encode(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    """The text's token ids (1, T), as the model is fed them (with its special tokens)."""
    if not text or not text.strip():
        raise TraceError("The text is empty: give a few words to trace.")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if max_tokens and ids.shape[1] > max_tokens:
        raise TraceError(f"The text is {ids.shape[1]} tokens long; this model reads at most {max_tokens}.")
    return ids


@torch.inference_mode()
def trace(model, tokenizer, text: str, plan=None, stats=None, fingerprint: str | None = None) -> dict:
    """Route `text` through the model: {"tokens" (T), "layers" (L), "experts" (L × T × k),
    "weights" (L × T × k), "nll" (T − 1, nats)}; with `plan`, also "pruned" (the same three
    under the plan) and "rerouted" (per layer, the fraction of tokens whose set of experts changed)."""
    ids = encode(tokenizer, text, getattr(model.config, "max_position_embeddings", None))
    adapter = get_adapter(model)
    result = dict(tokens=[tokenizer.decode([i]) for i in ids[0].tolist()], layers=adapter.layer_indices,
                  num_experts=max(adapter.num_experts), **_routed_pass(model, adapter, ids))
    if plan is not None:
        from .apply import applied

        with applied(model, plan, stats, fingerprint):
            result["pruned"] = _routed_pass(model, adapter, ids)
        result["rerouted"] = [_changed(a, b) for a, b in zip(result["experts"], result["pruned"]["experts"])]
    return result


def _routed_pass(model, adapter, ids: torch.Tensor) -> dict:
    """One forward pass with a hook on every router: top-k experts and weights, and the NLL."""
    routes = {}
    with _hooked(adapter, routes):
        logits = model(input_ids=ids.to(execution_device(model)), use_cache=False).logits[0].float()
    nll = F.cross_entropy(logits[:-1], ids[0, 1:].to(logits.device), reduction="none")
    order = adapter.layer_indices
    return dict(experts=[routes[i][0] for i in order], weights=[routes[i][1] for i in order],
                nll=nll.cpu().tolist())


@contextmanager
def _hooked(adapter, routes: dict):
    """Hooks registered after any plan's own router hooks, so they see the routing the plan makes."""
    handles = []

    def record(layer):
        def hook(module, args, output):
            routing = layer.routing_from_output(output)  # in the router's own order (its first choice first)
            index = routing.top_k_index
            keep = getattr(module, "_moeviz_keep", None)  # a plan's removal view: positions among the kept
            if keep is not None:
                index = torch.tensor(keep, device=index.device)[index]
            routes[layer.layer_idx] = (index.cpu().tolist(), routing.top_k_weights.float().cpu().tolist())
        return hook

    try:
        for layer in adapter.layers:
            handles.append(layer.router.register_forward_hook(record(layer)))
        yield routes
    finally:
        for handle in handles:
            handle.remove()


def _changed(before: list[list[int]], after: list[list[int]]) -> float:
    return sum(set(a) != set(b) for a, b in zip(before, after)) / max(len(before), 1)


def loss_changes(result: dict, top: int = 10) -> list[dict]:
    """The tokens whose loss rose under the plan, most risen first (at most `top`): the predicted
    token, and its probability before and after. Tokens whose loss fell or stayed are left out."""
    if "pruned" not in result:
        return []
    rows = []
    for t, (before, after) in enumerate(zip(result["nll"], result["pruned"]["nll"])):
        if after - before > WORSE:
            rows.append(dict(position=t + 1, token=result["tokens"][t + 1], context=result["tokens"][t],
                             p_before=math.exp(-before), p_after=math.exp(-after),
                             nll_rise=after - before))
    return sorted(rows, key=lambda r: -r["nll_rise"])[:top]


# ---- drawing ------------------------------------------------------------------------------
def expert_colour(expert: int, num_experts: int = len(PALETTE)) -> str:
    """A colour per expert, distinct among `num_experts`: the palette up to 16, beyond it hues a
    golden angle apart at three lightnesses (no two of 64 or 256 experts share one)."""
    if num_experts <= len(PALETTE):
        return PALETTE[expert % len(PALETTE)]
    r, g, b = colorsys.hls_to_rgb((expert * 0.381966) % 1.0, (0.35, 0.5, 0.65)[expert % 3], 0.75)
    return f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}"


def shown_token(token: str) -> str:
    """A token as it reads on the page: spaces as ␣, line breaks as ↵, an empty token as ·."""
    return token.replace(" ", "␣").replace("\n", "↵") or "·"


def legend_html(result: dict, layer_idx: int) -> str:
    """Each first-choice expert of the layer with its colour and token count, largest first; a chip
    never breaks across lines."""
    row = result["layers"].index(layer_idx)
    counts: dict[int, int] = {}
    for experts in result["experts"][row]:
        counts[experts[0]] = counts.get(experts[0], 0) + 1
    E = result.get("num_experts", len(PALETTE))
    chips = [f'<span style="background:{expert_colour(e, E)}33;border-bottom:3px solid {expert_colour(e, E)};'
             f'padding:0 4px;font-family:monospace;white-space:nowrap;display:inline-block">expert {e}: {n}</span>'
             for e, n in sorted(counts.items(), key=lambda en: (-en[1], en[0]))]
    return f'<div style="line-height:2">{" ".join(chips)}</div>'


def tokens_html(result: dict, layer_idx: int, highlight: int | None = None, pruned: bool = False) -> str:
    """One layer's tokens, each on its top-1 expert's colour, the top-k and weights on hover.
    With a plan, tokens sent to other experts are underlined in red; `highlight`: an expert
    whose tokens are framed."""
    row = result["layers"].index(layer_idx)
    source = result["pruned"] if pruned else result
    spans = []
    for t, token in enumerate(result["tokens"]):
        experts, weights = source["experts"][row][t], source["weights"][row][t]
        hover = ", ".join(f"expert {e}: {w:.2f}" for e, w in zip(experts, weights))
        colour = expert_colour(experts[0], result.get("num_experts", len(PALETTE)))
        style = f"background:{colour}33;border-bottom:3px solid {colour};"
        if "pruned" in result and set(result["experts"][row][t]) != set(result["pruned"]["experts"][row][t]):
            style += "text-decoration:underline wavy #D55E00;"
            hover += " · rerouted by the plan"
        if highlight is not None and highlight in experts:
            style += "outline:2px solid #000;"
        shown = html.escape(shown_token(token))
        spans.append(f'<span class="tok" title="{html.escape(hover)}" style="{style}">{shown}</span>')
    # font-size set: monospace alone gets the browser's 13px, smaller than the text around it
    look = "line-height:2;font-family:monospace;font-size:1rem;white-space:pre-wrap"
    return f'<div class="trace" style="{look}">{"".join(spans)}</div>'


def page_html(result: dict, title: str = "moeviz trace") -> str:
    """A self-contained page (no network) of every layer's tokens, and the loss changes."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>Each token on the colour of its first expert in that layer; hover for the top-k experts "
             "and their weights." + (" Wavy red underline: the plan sends the token to other experts."
                                     if "pruned" in result else "") + "</p>"]
    for i, layer_idx in enumerate(result["layers"]):
        note = f" — {result['rerouted'][i]:.0%} of tokens rerouted" if "rerouted" in result else ""
        parts.append(f"<h3>Decoder layer {layer_idx}{note}</h3>"
                     + tokens_html(result, layer_idx, pruned="pruned" in result) + legend_html(result, layer_idx))
    if rows := loss_changes(result):
        cells = "".join(f"<tr><td>{r['position']}</td><td>{html.escape(shown_token(r['token']))}</td>"
                        f"<td>{r['p_before']:.3f}</td><td>{r['p_after']:.3f}</td></tr>" for r in rows)
        parts.append("<h3>Where the prediction got worse</h3><table><tr><th>position</th><th>next token</th>"
                     f"<th>p before</th><th>p after</th></tr>{cells}</table>")
    elif "pruned" in result:
        parts.append(f"<h3>Where the prediction got worse</h3><p>{NONE_WORSE}</p>")
    body = "\n".join(parts)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;max-width:60em;margin:2em auto'>{body}</body></html>")
