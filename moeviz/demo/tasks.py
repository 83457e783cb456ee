"""What the demo model does per domain: held-out task accuracy and expert usage.

Both work on any causal LM through the standard forward API only (so also on a pruned
model), on the model's own device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moeviz.demo.corpus import DOMAINS, SEP, TaskExample, task_examples


def _pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: (input_ids, attention_mask), both (B, T)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _encode_items(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[TaskExample], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, target_mask), each (B, T); target_mask marks answer + SEP."""
    rows, targets = [], []
    for item in items:
        prompt = tokenizer(item.prompt).input_ids  # with bos, as in training
        completion = tokenizer(item.answer + SEP, add_special_tokens=False).input_ids
        rows.append(prompt + completion)
        targets.append([0] * len(prompt) + [1] * len(completion))
    ids, mask = _pad(rows, tokenizer.pad_token_id, device)
    target_mask, _ = _pad(targets, 0, device)
    return ids, mask, target_mask.bool()


@torch.no_grad()
def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: str,
    n: int = 200,
    seed: int = 0,
    batch_size: int = 100,
) -> float:
    """Exact-match accuracy of greedy completion on ``n`` held-out items of ``domain``.

    Teacher-forced: an item counts when the argmax next token equals the reference at every
    position of ``answer + SEP``, which is exactly when greedy decoding would produce it.
    """
    items = task_examples(domain, n, seed)
    correct = 0
    for start in range(0, len(items), batch_size):
        ids, mask, target = _encode_items(tokenizer, items[start : start + batch_size], model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        hits = logits[:, :-1].argmax(-1) == ids[:, 1:]  # (B, T-1): next-token predictions
        correct += int((hits | ~target[:, 1:]).all(-1).sum())
    return correct / len(items)


def task_accuracies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domains: Iterable[str] = DOMAINS,
    n: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """``task_accuracy`` for each domain, in order."""
    return {domain: task_accuracy(model, tokenizer, domain, n, seed) for domain in domains}


@torch.no_grad()
def expert_frequencies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts_by_domain: Mapping[str, Sequence[str]],
    batch_size: int = 32,
) -> list[np.ndarray]:
    """Per MoE layer, a (domains, num_experts) array: the share of each domain's top-k routing
    choices (over all its non-padding tokens) that go to each expert; rows sum to 1.

    Routing is Mixtral's: top-k of the router logits (softmax preserves the order).
    """
    per_domain = [_routing_counts(model, tokenizer, texts, batch_size) for texts in texts_by_domain.values()]
    by_layer = [np.stack(counts) for counts in zip(*per_domain)]  # per layer: (domains, num_experts)
    return [counts / counts.sum(1, keepdims=True) for counts in by_layer]


def _routing_counts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int
) -> list[np.ndarray]:
    """Per MoE layer, how often each expert is chosen over the texts' real tokens: (num_experts,)."""
    totals = None
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer(text).input_ids for text in texts[start : start + batch_size]]
        ids, mask = _pad(rows, tokenizer.pad_token_id, model.device)
        router_logits = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        counts = [_choice_counts(logits, mask, model.config.num_experts_per_tok) for logits in router_logits]
        totals = counts if totals is None else [a + b for a, b in zip(totals, counts)]
    return totals


def _choice_counts(router_logits: torch.Tensor, attention_mask: torch.Tensor, top_k: int) -> np.ndarray:
    """How often each expert is among the top-k of a real token: (num_experts,)."""
    chosen = router_logits.topk(top_k, dim=-1).indices  # (B*T, top_k)
    keep = attention_mask.reshape(-1, 1).expand_as(chosen).bool()  # (B*T, top_k)
    counts = torch.bincount(chosen[keep], minlength=router_logits.shape[-1])
    return counts.double().cpu().numpy()


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions, in bits (0 = same, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nonzero = a > 0
        return float(np.sum(a[nonzero] * np.log2(a[nonzero] / m[nonzero])))

    return (kl(p) + kl(q)) / 2


def routing_divergence(frequencies: Sequence[np.ndarray]) -> list[float]:
    """Per layer, the mean pairwise JS divergence (bits) between the domains' expert usage."""
    return [
        float(np.mean([js_divergence_bits(p, q) for p, q in combinations(layer, 2)]))  # rows: domains
        for layer in frequencies
    ]
